"""Training with the stacked blocks (``scan_layers``) behaves as with one module per block: the AdamW update
(weight decay on matrices only) is the per-block update stacked, and a training checkpoint written per
block resumes into the stacked layout."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import dit_setup
from shelllcc import parallel
from shelllcc.models.wan_transformer import WanTransformer, get_config, stack_blocks
from shelllcc.training import checkpoints, optimizers
from shelllcc.training import train_state as ts


def _state(scan_layers: bool) -> nnx.State:
    model = WanTransformer(get_config("tiny", scan_layers=scan_layers), rngs=nnx.Rngs(0))
    return nnx.state(model, nnx.Param)


def _config(weight_decay=0.1):
    c = ml_collections.ConfigDict()
    c.optim = dit_setup.optim_section(learning_rate=1e-2)
    c.optim.weight_decay = weight_decay
    c.train = dit_setup.train_section(steps=10)
    return c


def test_adamw_update_with_weight_decay_is_the_per_block_one_stacked():
    per_block, stacked = _state(False), _state(True)
    p_pb, p_st = nnx.to_pure_dict(per_block), nnx.to_pure_dict(stacked)
    rng = np.random.default_rng(0)
    grads_pb = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), p_pb)
    grads_st = stack_blocks(grads_pb)
    axes = dit_setup.layer_axes(stacked)
    assert axes["blocks"]["ffn"]["up"]["bias"] == 1 and axes["time_proj"]["kernel"] == 0
    opt_pb, _ = dit_setup.optimizer_from(_config(), p_pb, dit_setup.layer_axes(per_block))
    opt_st, _ = dit_setup.optimizer_from(_config(), p_st, axes)
    # a stacked bias [L, out] is still a vector: no weight decay, as per block
    mask = optimizers.decay_mask(p_st, False, axes)
    assert not mask["blocks"]["ffn"]["up"]["bias"] and mask["blocks"]["ffn"]["up"]["kernel"]
    assert optimizers.decay_mask(p_st)["blocks"]["ffn"]["up"]["bias"]   # without layer_axes it would be decayed

    def step(opt, params, grads):
        state = ts.create(params, opt)
        for _ in range(2):
            state, _ = ts.apply_gradients(state, grads, jnp.float32(1.0), opt)
        return state

    s_pb, s_st = step(opt_pb, p_pb, grads_pb), step(opt_st, p_st, grads_st)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s_st.params,
                 stack_blocks(s_pb.params))


def test_per_block_checkpoint_resumes_into_the_stacked_layout(tmp_path):
    """A run's checkpoint from before stacked blocks (params and Adam moments one entry per block)."""
    mesh = parallel.make_mesh(data=4, fsdp=2)
    rules = parallel.DEFAULT_RULES
    per_block, stacked = _state(False), _state(True)
    p_pb = nnx.to_pure_dict(per_block)
    opt_pb, _ = dit_setup.optimizer_from(_config(), p_pb, dit_setup.layer_axes(per_block))
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), p_pb)
    state, _ = ts.apply_gradients(ts.create(p_pb, opt_pb), grads, jnp.float32(1.0), opt_pb)   # non-zero moments
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), asynchronous=False)
    key = jax.random.PRNGKey(0)
    ckpt.save(1, ts.checkpoint_items(state), key, data_state={"pos": 3}, meta={"experiment": "test"})
    ckpt.wait_until_finished()

    # the stacked run's restore target, sharded as dit_setup.run_training shards it
    p_st = nnx.to_pure_dict(stacked)
    opt_st, _ = dit_setup.optimizer_from(_config(), p_st, dit_setup.layer_axes(stacked))
    with dit_setup.sharding_context(mesh, rules):
        param_sh = dit_setup.state_shardings(stacked, mesh)
        opt_sh = parallel.optimizer_shardings(opt_st, stacked, mesh)
    abstract = jax.eval_shape(lambda p: ts.create(p, opt_st), p_st)
    state_sh = ts.TrainState(step=parallel.replicated(mesh), skipped=parallel.replicated(mesh), params=param_sh,
                             opt_state=opt_sh, frozen=None)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          ts.checkpoint_items(abstract), ts.checkpoint_items(state_sh))
    rng_target = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))
    items, rng_key, data_state, meta = dit_setup.restore_checkpoint(ckpt, 1, target, rng_target)
    ckpt.close()
    assert data_state == {"pos": 3} and meta["experiment"] == "test" and int(items["step"]) == 1
    want = stack_blocks(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(items["params"]), want)
    mu_want = jax.tree.map(np.asarray, stack_blocks(state.opt_state[1][0].mu))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(items["opt_state"][1][0].mu), mu_want)
    # placed where the stacked run wants them: FSDP over 'embed', the layer axis on no mesh axis
    assert items["params"]["blocks"]["ffn"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                                                                         None)
    assert jax.tree.structure(items) == jax.tree.structure(target)
