"""LoRA on the tiny Wan transformer: exact identity at init, merge parity, gradients confined to the
adapters, a training step that leaves the base untouched, parameter count, axis names, target errors, and
stacked adapters (``scan_layers``) equal to the per-block ones."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shelllcc.models.wan_transformer import Dense, WanTransformer, get_config, stack_blocks
from shelllcc.training.lora import (
    DEFAULT_TARGETS,
    LoRADense,
    LoRAParam,
    apply_lora,
    base_filter,
    lora_filter,
    lora_param_count,
    merge_lora,
    split_lora,
)

RANK, ALPHA = 16, 16.0


def _names(variable):
    """The logical axis names a parameter carries (flax's ``out_sharding`` metadata)."""
    return variable.get_metadata().get("out_sharding")


def _inputs(cfg, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    latents = jax.random.normal(k1, (1, 2, 4, 4, cfg.in_channels))
    timestep = jax.random.uniform(k2, (1,), minval=0.0, maxval=1000.0)
    context = jax.random.normal(k3, (1, 5, cfg.text_dim))
    return latents, timestep, context


def _model(seed=0, scan_layers=True):
    return WanTransformer(get_config("tiny", scan_layers=scan_layers), rngs=nnx.Rngs(seed))


def _lora_model(seed=0, scan_layers=True):
    return apply_lora(_model(seed, scan_layers), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(100 + seed))


def _randomize_b(model, seed=1, scale=0.1):
    # B = 0 at init makes the adapters invisible; give them a non-trivial value to test the update path.
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for path, var in nnx.iter_graph(model):
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            var[...] = scale * jax.random.normal(next(keys), var.shape, var.dtype)


def _base_values(model):
    return jax.tree.map(np.asarray, nnx.state(model, base_filter))


def test_initial_outputs_equal_base_exactly():
    cfg = get_config("tiny")
    base, adapted = _model(), _lora_model()
    inputs = _inputs(cfg)
    np.testing.assert_array_equal(np.asarray(base(*inputs)), np.asarray(adapted(*inputs)))
    # base params keep their paths and values; adapters sit beside them
    assert isinstance(adapted.blocks.self_attn.query, LoRADense)
    assert isinstance(adapted.blocks.ffn.up, Dense) and not isinstance(adapted.blocks.ffn.up, LoRADense)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(base, nnx.Param), nnx.state(adapted, base_filter))


def test_merge_matches_adapted_and_removes_adapters():
    cfg = get_config("tiny")
    base, model = _model(), _lora_model()
    _randomize_b(model)
    inputs = _inputs(cfg)
    y_adapted = np.asarray(model(*inputs))
    assert not np.allclose(y_adapted, np.asarray(base(*inputs)), rtol=1e-3, atol=1e-4)
    merged = merge_lora(model)
    assert lora_param_count(merged) == 0
    assert not any(isinstance(m, LoRADense) for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(np.asarray(merged(*inputs)), y_adapted, rtol=1e-5, atol=1e-5)
    # merged state has exactly the base model's structure (loadable like a plain checkpoint)
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(base))
    assert _names(merged.blocks.cross_attn.out.kernel) == ("layers", "heads", "embed")


def _regression_loss(model, inputs, target):
    return jnp.mean(jnp.square(model(*inputs) - target))


def test_gradients_only_for_lora_params():
    cfg = get_config("tiny")
    model = _lora_model()
    inputs = _inputs(cfg)
    target = jax.random.normal(jax.random.key(7), model(*inputs).shape)
    graphdef, lora, frozen = split_lora(model)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    assert all(isinstance(v, LoRAParam) for v in jax.tree.leaves(lora, is_leaf=is_var))
    assert not any(isinstance(v, LoRAParam) for v in jax.tree.leaves(frozen, is_leaf=is_var))

    def loss_fn(lora_state):
        return _regression_loss(nnx.merge(graphdef, lora_state, frozen), inputs, target)

    grads = jax.grad(loss_fn)(lora)
    # same tree as the LoRA split: no base parameter gets a gradient
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    flat = {k: np.asarray(v) for k, v in nnx.to_flat_state(grads)}
    # with B = 0, dL/dA = x^T (dL/dy) B^T (alpha/r) = 0 exactly, while dL/dB is non-zero
    for path, g in flat.items():
        if path[-1] == "lora_a":
            assert not g.any(), path
        else:
            assert path[-1] == "lora_b" and np.abs(g).max() > 0, path

    # once B is non-zero every adapter gets a gradient; nnx.grad over a DiffState agrees
    _randomize_b(model)
    graphdef, lora, frozen = split_lora(model)
    grads = jax.grad(loss_fn)(lora)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    nnx_grads = nnx.grad(_regression_loss, argnums=nnx.DiffState(0, lora_filter))(model, inputs, target)
    assert jax.tree.structure(nnx_grads) == jax.tree.structure(grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), nnx_grads, grads)


def test_sgd_step_lowers_loss_and_freezes_base():
    cfg = get_config("tiny")
    model = _lora_model()
    inputs = _inputs(cfg)
    target = jax.random.normal(jax.random.key(7), model(*inputs).shape)
    before = _base_values(model)
    graphdef, lora, frozen = split_lora(model)
    tx = optax.sgd(0.5)
    opt_state = tx.init(lora)

    @jax.jit
    def step(lora_state, opt_state):
        def loss_fn(s):
            return _regression_loss(nnx.merge(graphdef, s, frozen), inputs, target)
        loss, grads = jax.value_and_grad(loss_fn)(lora_state)
        updates, opt_state = tx.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    lora, opt_state, loss0 = step(lora, opt_state)
    nnx.update(model, lora)
    loss1 = _regression_loss(model, inputs, target)
    assert float(loss1) < float(loss0)
    jax.tree.map(np.testing.assert_array_equal, before, _base_values(model))


def test_param_count_and_axis_names():
    cfg = get_config("tiny")
    model = _lora_model()
    expected = cfg.num_layers * len(DEFAULT_TARGETS) * RANK * (cfg.dim + cfg.dim)
    assert lora_param_count(model) == expected
    q = model.blocks.self_attn.query
    n = cfg.num_layers
    assert q.lora_a.shape == (n, cfg.dim, RANK) and q.lora_b.shape == (n, RANK, cfg.dim)
    assert q.lora_a.dtype == jnp.float32 and q.lora_b.dtype == jnp.float32
    assert _names(q.lora_a) == ("layers", "embed", None)
    assert _names(q.lora_b) == ("layers", None, "heads")
    assert _names(model.blocks.cross_attn.out.lora_b) == ("layers", None, "embed")
    # the base kernel keeps its path and names
    assert _names(q.kernel) == ("layers", "embed", "heads")
    # per block: the same adapters without the layer axis
    per_block = _lora_model(scan_layers=False)
    assert lora_param_count(per_block) == expected
    q = per_block.blocks[1].self_attn.query
    assert q.lora_a.shape == (cfg.dim, RANK) and _names(q.lora_a) == ("embed", None)
    assert _names(q.lora_b) == (None, "heads")


def test_target_patterns():
    cfg = get_config("tiny")
    # fnmatch pattern: only block 1's FFN up-projection, which needs one module per block
    model = apply_lora(_model(scan_layers=False), rank=4, alpha=4.0, targets=("blocks.1.ffn.up",), rngs=nnx.Rngs(0))
    assert lora_param_count(model) == 4 * (cfg.dim + cfg.ffn_dim)
    with pytest.raises(ValueError, match=r"some layers of stacked blocks.*blocks\.ffn\.up \(1 of 2 layers\)"):
        apply_lora(_model(), rank=4, alpha=4.0, targets=("blocks.1.ffn.up",), rngs=nnx.Rngs(0))
    # patterns name per-block paths in both layouts
    for scan_layers in (True, False):
        model = apply_lora(_model(scan_layers=scan_layers), rank=2, alpha=2.0, targets=("blocks.*.self_attn.[qk]*",),
                           rngs=nnx.Rngs(0))
        assert lora_param_count(model) == cfg.num_layers * 2 * 2 * 2 * cfg.dim
    with pytest.raises(ValueError, match="self_attn.qeury"):
        apply_lora(_model(), rank=4, alpha=4.0, targets=("self_attn.query", "self_attn.qeury"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attn.query"):  # suffixes match whole path components only
        apply_lora(_model(), rank=4, alpha=4.0, targets=("attn.query",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(_lora_model(), rank=4, alpha=4.0, rngs=nnx.Rngs(0))


def test_stacked_adapters_equal_the_per_block_ones():
    """Same seeds, both layouts: the stacked adapters are the per-block ones stacked (the keys go out in
    the per-block order), so with the same B the adapted and the merged models agree, and an SGD step
    moves the adapters alike."""
    cfg = get_config("tiny")
    targets = DEFAULT_TARGETS + ("ffn.up", "time_proj")     # block modules and one outside the blocks
    stacked = apply_lora(_model(), rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(5))
    per_block = apply_lora(_model(scan_layers=False), rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(5))
    lora_s, lora_p = nnx.state(stacked, lora_filter), nnx.state(per_block, lora_filter)
    want = stack_blocks(nnx.to_pure_dict(lora_p))
    assert jax.tree.structure(want) == jax.tree.structure(nnx.to_pure_dict(lora_s))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(lora_s), want)
    assert lora_param_count(stacked) == lora_param_count(per_block)

    rng = np.random.default_rng(0)
    b_values = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32) if "lora_b" in jax.tree_util.keystr(p)
        else np.asarray(x), nnx.to_pure_dict(lora_p))
    nnx.replace_by_pure_dict(lora_p, b_values)
    nnx.update(per_block, lora_p)
    nnx.replace_by_pure_dict(lora_s, stack_blocks(b_values))
    nnx.update(stacked, lora_s)
    inputs = _inputs(cfg)
    y_s, y_p = np.asarray(stacked(*inputs)), np.asarray(per_block(*inputs))
    np.testing.assert_allclose(y_s, y_p, rtol=1e-5, atol=1e-5)

    target = jax.random.normal(jax.random.key(7), y_s.shape)

    def sgd_step(model):
        graphdef, lora, frozen = split_lora(model)
        grads = jax.grad(lambda s: _regression_loss(nnx.merge(graphdef, s, frozen), inputs, target))(lora)
        return nnx.to_pure_dict(jax.tree.map(lambda p, g: p - 0.5 * g, lora, grads))

    after_s, after_p = sgd_step(stacked), stack_blocks(sgd_step(per_block))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after_s, after_p)

    merge_lora(stacked), merge_lora(per_block)
    np.testing.assert_allclose(np.asarray(stacked(*inputs)), np.asarray(per_block(*inputs)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stacked(*inputs)), y_s, rtol=1e-5, atol=1e-5)


def test_validation_sees_a_lora_row_as_the_base_graph_with_folded_adapters():
    """The embedded benchmark's validation samples with the base's graph: a LoRA row reaches it merged, in a
    copy (the training model keeps its adapters), with the adapted model's outputs."""
    from experiments import embedded_validation
    cfg = get_config("tiny")
    adapted = _lora_model()
    _randomize_b(adapted)
    inputs = _inputs(cfg)
    plain = embedded_validation._plain(adapted)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(plain))
    assert any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(adapted))
    assert nnx.graphdef(plain) == nnx.graphdef(_model())
    np.testing.assert_allclose(np.asarray(plain(*inputs)), np.asarray(adapted(*inputs)), rtol=1e-5, atol=1e-5)
    base = _model()
    assert embedded_validation._plain(base) is base
