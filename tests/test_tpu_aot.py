"""The tiny DiT's reward_finetune step compiles for a 2-host TPU v5p topology (v5p:2x2x2) on this CPU, and
the per-chip memory report agrees with the shardings it was built with (issue 16).

libtpu compiles for a TPU topology without a TPU (``jax.experimental.topologies``). Skipped only when
libtpu cannot be imported; it is in requirements-test.txt.
"""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'); it compiles for TPU topologies",
                allow_module_level=True)


import tpu_aot  # noqa: E402

from experiments import reward_finetune  # noqa: E402

TOPOLOGY = "v5p:2x2x2"
LATENT = (3, 16, 16, 16)
TEXT = (8, 32)


def tiny_config(fsdp: int):
    c = reward_finetune.default_config()
    c.model.preset, c.model.dtype, c.model.param_dtype = "tiny", "bfloat16", "float32"
    c.model.attention_impl, c.model.remat_policy = "flash", "attention_forward_saveable"
    c.mesh.data, c.mesh.fsdp = -1, fsdp
    c.data.batch_size, c.train.microbatch_size = 16, 1
    c.reward.manifold, c.reward.kernel = "random", "auto"
    return c


@pytest.fixture(scope="module")
def aot():
    devices = tpu_aot.topology_devices(TOPOLOGY)
    c = tiny_config(fsdp=8)
    built, compiled, times = tpu_aot.compile_abstract(c, devices, LATENT, TEXT)
    return devices, built, compiled, tpu_aot.report(c, devices, LATENT, TEXT, built, compiled, times)


@pytest.fixture(scope="module")
def compiled(aot):
    return aot[0], aot[3]


def _shard_bytes(tree) -> int:
    """Bytes one chip holds of ``tree``'s arrays (ShapeDtypeStructs with shardings)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_topology_is_two_hosts_of_four_chips(compiled):
    devices, r = compiled
    assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
    assert r["processes"] == 2 and r["mesh"] == {"data": 1, "fsdp": 8}
    # the reader gives each of the 2 hosts half the global batch; the batch sharding must ask for that
    assert r["rows_per_process"] == 8
    # kernels were picked for the mesh (TPU) although this host's backend is the CPU
    assert jax.default_backend() == "cpu" and r["attention_impl"] == "tpu_flash"


def test_memory_report_matches_the_shardings(aot):
    _, built, compiled, r = aot
    shardings = compiled.input_shardings[0]
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), built.state, shardings[0])
    state_bytes, full_bytes = _shard_bytes(state), sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(built.state))
    m = r["bytes"]
    # every state array is an argument, stored at least as large as its shard (TPU tiles pad small arrays)
    assert m["argument"] >= state_bytes
    # the weights and Adam's moments are split 8 ways: one chip holds well under the whole state
    assert m["argument"] >= built.param_bytes / 8
    assert m["argument"] < 0.5 * full_bytes
    # the step donates its state: the new state is written over the old one
    assert m["alias"] >= 0.9 * state_bytes and m["output"] >= m["alias"]
    assert m["temp"] > 0 and m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    assert r["flops"] > 0 and r["model_flops"] > 0


def test_summary_line_fits(compiled):
    _, r = compiled
    s = tpu_aot.summarize(r, tpu_aot.CHIPS["v5p"])
    assert s["fits"] and s["per_chip_gib"]["total"] < 1.0
    tiny_hbm = dict(tpu_aot.CHIPS["v5p"], hbm_gib=r["bytes"]["total"] / 2 ** 31)   # half the total
    assert not tpu_aot.summarize(r, tiny_hbm)["fits"]


def test_platform_choice_follows_the_mesh():
    from shelllcc.models.wan_transformer import resolve_attention_impl
    from shelllcc.rewards.fused_values import resolve_kernel
    assert [resolve_attention_impl("flash", p) for p in ("gpu", "tpu", "cpu")] == ["cudnn", "tpu_flash", "xla"]
    assert resolve_kernel("auto", "amortized", "gpu") == "pallas"
    assert resolve_kernel("auto", "amortized", "tpu") == "xla"
    with pytest.raises(ValueError, match="TPU"):
        resolve_kernel("pallas", "amortized", "tpu")
    with pytest.raises(ValueError, match="GPU only"):
        resolve_attention_impl("cudnn", "tpu")


def test_remat_policy_keeps_the_flash_forward_only():
    """``attention_forward_saveable`` saves the Pallas flash forward's outputs (o, l, m) and none of its
    backward kernels', so a remat'd block does not rerun attention on TPU (as with cuDNN on GPU)."""
    import jax.numpy as jnp

    from shelllcc.models import wan_transformer as wt

    def pallas_calls(jaxpr, out):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                out.append((len(e.params["out_avals"]), wt.save_attention_forward(e.primitive, **e.params)))
            for p in e.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    pallas_calls(inner if hasattr(inner, "eqns") else inner.jaxpr, out)
        return out

    q = jnp.ones((1, 200, 2, 128), jnp.bfloat16)      # 200 tokens: padded to 256, padded keys masked
    loss = lambda x: wt.tpu_flash_attention(x, x, x).astype(jnp.float32).sum()  # noqa: E731
    calls = pallas_calls(jax.make_jaxpr(jax.grad(loss))(q).jaxpr, [])
    assert sorted(calls) == [(1, False), (2, False), (3, True)]


def test_multi_slice_mesh_keeps_fsdp_within_a_slice():
    """Two v5p slices over DCN: the data axis runs across them, each fsdp group (per-layer gathers) lies in
    one slice, and each slice's hosts feed their own batch rows."""
    from shelllcc import parallel
    devices = tpu_aot.topology_devices("v5p:2x2x1", slices=2)
    mesh = parallel.make_mesh(1, -1, devices, slices=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}, {1}]
    assert tpu_aot.check_process_rows(parallel.batch_sharding(mesh), 8) == 4
    with pytest.raises(ValueError, match="slice"):
        parallel.make_mesh(1, -1, devices, slices=4)


def test_manifold_fit_compiles_with_replicated_parameters():
    """The fit's two stage steps compile for the pod; the manifold is replicated and the patches split over
    the 8 chips, so each chip's arguments hold the whole parameter and optimizer state plus 1/8 of the batch."""
    from experiments import fit_manifold
    from shelllcc.manifold import fit, io
    from shelllcc.manifold.params import ManifoldConfig

    c = fit_manifold.default_config()
    c.manifold.num_anchors, c.manifold.hidden_dim, c.manifold.patch_size = 64, 32, (1, 1, 1)
    c.stage1.batch_size = c.stage2.batch_size = 1024
    r = tpu_aot.compile_fit(c, tpu_aot.topology_devices(TOPOLOGY), (3, 8, 8, 16))
    assert r["devices"] == 8 and r["processes"] == 2 and r["manifold"]["dim"] == 16
    mc = ManifoldConfig(dim=16, num_anchors=64, hidden_dim=32, patch_size=(1, 1, 1))
    opt = fit.make_optimizer(fit.stage_optim_config(c.stage1))
    state = jax.eval_shape(lambda p: fit.init_state(p, opt, 1), io.abstract_params(mc))
    leaves = jax.tree.leaves(state)
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    batch_bytes = 1024 // 8 * 16 * 4

    def tiled(shape, itemsize):
        # a TPU buffer's last two dimensions are laid out in (8, 128) tiles (scalars and vectors as 1 x n)
        shape = (1, 1, *shape)[-max(2, len(shape)):] if len(shape) < 2 else shape
        *lead, a, b = shape
        return int(np.prod(lead or [1])) * -(-a // 8) * 8 * -(-b // 128) * 128 * itemsize

    state_tiled = sum(tiled(x.shape, x.dtype.itemsize) for x in leaves)
    # arguments: the whole state (replicated) and this chip's rows, no more than their tiled layout
    arg = r["stages"][1]["bytes"]["argument"]
    assert state_bytes + batch_bytes <= arg <= state_tiled + tiled((1024 // 8, 16), 4), (arg, state_bytes,
                                                                                         state_tiled)
    assert r["stages"][1]["flops"] > 0 and r["stages"][2]["flops"] > 0
