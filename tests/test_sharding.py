"""On 8 forced CPU devices, sharded distances, gradients and fitting steps equal the single-device ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shelllcc import parallel
from shelllcc.manifold import fit
from shelllcc.rewards import KINDS, manifold_distance
from tests.helpers import random_manifold, rel_err


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    return parallel.make_mesh(data=8)


def _target(kind):
    return 1.5 if kind == "shell_band" else None


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_distance_and_gradient_equal_single_device(mesh, kind):
    params, _ = random_manifold(0)
    lat = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2, 3, 4, 16)).astype(np.float32))
    single = lambda x: manifold_distance(params, x, kind, _target(kind), chunk_size=10)
    sharded = lambda x: manifold_distance(params, x, kind, _target(kind), chunk_size=10, mesh=mesh)
    v1, g1 = jax.value_and_grad(single)(lat)
    lat_sharded = jax.device_put(lat, parallel.batch_sharding(mesh))
    v8, g8 = jax.jit(jax.value_and_grad(sharded))(lat_sharded)
    np.testing.assert_allclose(v8, v1, rtol=1e-6)
    assert rel_err(g8, g1) < 1e-6
    # The gradient stays split over the batch like the latents, not gathered to one device.
    assert g8.sharding.is_equivalent_to(lat_sharded.sharding, lat.ndim)


def test_sharded_per_example_and_flat(mesh):
    params, _ = random_manifold(1)
    lat = jnp.asarray(np.random.default_rng(1).standard_normal((16, 1, 2, 2, 16)).astype(np.float32))
    per1 = manifold_distance(params, lat, "shell", per_example=True)
    per8 = manifold_distance(params, lat, "shell", per_example=True, mesh=mesh)
    np.testing.assert_allclose(per8, per1, rtol=1e-6)
    flat = lat.reshape(-1, 16)
    np.testing.assert_allclose(manifold_distance(params, flat, "lcc", mesh=mesh),
                               manifold_distance(params, flat, "lcc"), rtol=1e-6)


def test_sharded_rejects_uneven_batch(mesh):
    params, _ = random_manifold(2)
    with pytest.raises(ValueError, match="not divisible by the 8 shards"):
        manifold_distance(params, np.zeros((6, 1, 2, 2, 16), np.float32), "lcc", mesh=mesh)


def test_mesh_over_data_and_fsdp_axes():
    mesh = parallel.make_mesh(data=4, fsdp=2)
    params, _ = random_manifold(3)
    lat = jnp.asarray(np.random.default_rng(3).standard_normal((8, 1, 2, 3, 16)).astype(np.float32))
    got = manifold_distance(params, lat, "shell_norm", mesh=mesh, data_axis=("data", "fsdp"))
    np.testing.assert_allclose(got, manifold_distance(params, lat, "shell_norm"), rtol=1e-6)
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh(data=3, fsdp=2)


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_fit_step_equals_single_device(mesh, stage):
    params, cfg = random_manifold(4)
    # SGD: Adam's first steps are ~lr * sign(g), which turns rounding-level gradient differences on
    # near-zero entries into lr-sized parameter differences and would hide real discrepancies.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    if stage == 1:
        step_fn = functools.partial(fit.stage1_step, optimizer=opt, config=cfg)
    else:
        step_fn = functools.partial(fit.stage2_step, optimizer=opt, config=cfg)
    batches = np.random.default_rng(4).standard_normal((3, 256, 16)).astype(np.float32)

    def run(m):
        state = jax.tree.map(jnp.copy, fit.init_state(params, opt, stage))   # the step donates its state
        state = parallel.replicate_tree(state, m) if m is not None else state
        step = fit.jit_step(step_fn, m)
        for b in batches:
            state, metrics = step(state, parallel.shard_batch(b, m) if m is not None else b)
        return jax.device_get(state), jax.device_get(metrics)

    s1, m1 = run(None)
    s8, m8 = run(mesh)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6)
    assert int(s8.step) == 3


def test_sharded_pallas_kernel_equals_xla(mesh):
    """The Pallas kernels inside shard_map (their outputs vary over the batch axis); interpret mode here."""
    from shelllcc.manifold.softmax_code_pallas import Blocks
    params, _ = random_manifold(2)
    lat = jnp.asarray(np.random.default_rng(3).standard_normal((8, 1, 2, 4, 16)).astype(np.float32))
    blocks = Blocks(block_n=16, block_k=16, bwd_block_n=16, bwd_block_k=16)
    xla = lambda x: manifold_distance(params, x, "shell", chunk_size=5, kernel="xla")
    pallas = lambda x: manifold_distance(params, x, "shell", chunk_size=5, kernel="pallas", blocks=blocks, mesh=mesh)
    v1, g1 = jax.value_and_grad(xla)(lat)
    v8, g8 = jax.jit(jax.value_and_grad(pallas))(jax.device_put(lat, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(v8, v1, rtol=1e-5)
    assert rel_err(g8, g1) < 1e-5


def test_random_init_on_devices_equals_the_host_program_and_is_born_sharded():
    """``model.random_init='devices'`` (one program per parameter, on the mesh; the 14B presets' setting) gives
    bit for bit the parameters of the one-program host init, each already with its fsdp sharding."""
    from flax import nnx

    from experiments import dit_setup

    m = dit_setup.model_section()
    m.preset, m.seed = "tiny", 3
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rules = parallel.DEFAULT_RULES
    host = nnx.to_pure_dict(nnx.state(dit_setup.build_model(m, mesh, rules).model))
    m.random_init = "devices"
    per_leaf = nnx.to_pure_dict(nnx.state(dit_setup.build_model(m, mesh, rules).model))
    flat_host, flat_dev = jax.tree.leaves_with_path(host), jax.tree.leaves_with_path(per_leaf)
    assert [p for p, _ in flat_host] == [p for p, _ in flat_dev]
    sharded = 0
    for (path, a), (_, b) in zip(flat_host, flat_dev):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim), jax.tree_util.keystr(path)
        sharded += any(ax is not None for ax in b.sharding.spec)
    assert sharded > 10       # the fsdp rules did shard the big matrices, so the check above compared something

    m.random_init = "disk"
    with pytest.raises(Exception, match="model.random_init='disk'"):
        dit_setup.build_model(m, mesh, rules)


def test_init_per_leaf_logs_progress_and_takes_one_sharding_for_all():
    def make():
        k1, k2 = jax.random.split(jax.random.key(0))
        return {"a": jax.random.normal(k1, (16, 8)), "b": {"c": jax.random.uniform(k2, (8,))}}
    lines = []
    out = parallel.init_per_leaf(make, parallel.replicated(parallel.make_mesh(data=8)), log=lines.append)
    ref = jax.jit(make)()
    np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(ref["a"]))
    np.testing.assert_array_equal(np.asarray(out["b"]["c"]), np.asarray(ref["b"]["c"]))
    assert out["a"].sharding.is_fully_replicated and len(out["a"].sharding.device_set) == 8
    assert lines and lines[-1].startswith("init: 2/2 parameters")
