"""Wan2.1 transformer: parity with diffusers through the streaming loader (single and sharded checkpoints,
stacked and per-block layouts), parameter counts of the real configs, input and checkpoint errors, remat /
bf16 knobs, sharding names, and the stacked (``scan_layers``) blocks against the per-block ones."""

import json
import os
import shutil
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

# third_party/ is not an installed package; make the repo root importable however pytest is launched.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shelllcc import parallel
from shelllcc.models.wan_transformer import WanTransformer, convert_layout, get_config, stack_blocks, unstack_blocks
from tests.helpers import rel_err
from third_party.wan_transformer_weights import CheckpointMismatchError, config_from_diffusers, load_transformer

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
REAL = {
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
SHAPES = [(2, 3, 6, 10), (1, 1, 4, 8)]  # (B, T, H, W): non-square, multi-frame and single-frame
# ||ours - diffusers|| / ||diffusers|| of the tiny model's output, float32 on CPU: measured 2.4e-7 (2, 3, 6, 10)
# and 3.2e-7 (1, 1, 4, 8), single and sharded checkpoints alike; about 10x that
PARITY_TOL = 3e-6


@nnx.jit
def forward(model, latents, timestep, context):
    return model(latents, timestep, context)


def _names(variable):
    """The logical axis names a parameter carries (flax's ``out_sharding`` metadata)."""
    return variable.get_metadata().get("out_sharding")


def inputs(batch, t, h, w, seed=0):
    """Channels-last latents, timesteps in [0, 1000], context."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, t, h, w, 16)).astype(np.float32)
    timestep = rng.uniform(0, 1000, batch).astype(np.float32)
    context = rng.standard_normal((batch, 7, TINY["text_dim"])).astype(np.float32)
    return latents, timestep, context


def torch_forward(model, latents, timestep, context):
    with torch.no_grad():
        x = torch.from_numpy(latents).permute(0, 4, 1, 2, 3)
        out = model(x, torch.from_numpy(timestep), torch.from_numpy(context), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # move every norm and table away from identity / zero
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "scale_shift_table" in name:
                p.copy_(0.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch_model):
    root = tmp_path_factory.mktemp("wan")
    single, sharded = str(root / "single"), str(root / "sharded")
    torch_model.save_pretrained(single)
    torch_model.save_pretrained(sharded, max_shard_size="100KB")
    index = os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json")
    with open(index) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    return {"single": single, "sharded": sharded}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return load_transformer(checkpoints["single"])


@pytest.mark.parametrize("kind,scan_layers", [("single", True), ("sharded", True), ("single", False)])
def test_parity_with_diffusers(torch_model, checkpoints, kind, scan_layers):
    model = load_transformer(checkpoints[kind], scan_layers=scan_layers)
    assert model.config.scan_layers == scan_layers
    for shape in SHAPES:
        args = inputs(*shape)
        ref = torch_forward(torch_model, *args)
        with jax.default_matmul_precision("float32"):  # no TF32 on GPUs; CPU is exact anyway
            out = forward(model, *map(jnp.asarray, args))
        assert out.shape == ref.shape == (*shape, 16)
        assert rel_err(out, ref) < PARITY_TOL, (kind, shape, rel_err(out, ref))


@pytest.mark.parametrize("name", sorted(REAL))
def test_parameter_count_matches_diffusers(name):
    with torch.device("meta"):
        reference = diffusers.WanTransformer3DModel(**{**TINY, **REAL[name], "text_dim": 4096, "freq_dim": 256})
    expected = sum(p.numel() for p in reference.parameters())
    abstract = nnx.eval_shape(lambda: WanTransformer(get_config(name), rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    print(f"{name}: {count:,} parameters (diffusers {expected:,})")
    assert abs(count - expected) <= 0.005 * expected
    assert count == expected


def test_config_from_diffusers_round_trip(checkpoints):
    with open(os.path.join(checkpoints["single"], "config.json")) as f:
        cfg = config_from_diffusers(json.load(f))
    assert cfg == get_config("tiny")
    with pytest.raises(ValueError, match="image-to-video"):
        config_from_diffusers({**TINY, "image_dim": 1280, "added_kv_proj_dim": 5120})


def test_bad_inputs_name_the_problem(loaded):
    model = loaded
    latents, timestep, context = map(jnp.asarray, inputs(2, 3, 6, 10))
    with pytest.raises(ValueError, match="8 channels.*in_channels=16"):
        model(latents[..., :8], timestep, context)
    with pytest.raises(ValueError, match="H=5"):
        model(latents[:, :, :5], timestep, context)
    with pytest.raises(ValueError, match="W=9"):
        model(latents[:, :, :, :9], timestep, context)
    with pytest.raises(ValueError, match="text_dim=32"):
        model(latents, timestep, jnp.zeros((2, 7, 48)))
    with pytest.raises(ValueError, match="timestep"):
        model(latents, jnp.zeros((3,)), context)


def _state_dict_numpy(torch_model):
    return {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}


def _write_checkpoint(folder, tensors, config_from):
    os.makedirs(folder)
    shutil.copy(os.path.join(config_from, "config.json"), folder)
    safetensors_numpy.save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return folder


def test_checkpoint_mismatches_name_the_key(tmp_path, torch_model, checkpoints):
    tensors = _state_dict_numpy(torch_model)
    missing = dict(tensors)
    del missing["blocks.1.attn2.norm_k.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): blocks\.1\.attn2\.norm_k\.weight"):
        load_transformer(_write_checkpoint(str(tmp_path / "missing"), missing, checkpoints["single"]))
    extra = {**tensors, "blocks.0.attn1.norm_added_q.weight": np.ones(64, np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\): blocks\.0\.attn1\.norm_added_q\.weight"):
        load_transformer(_write_checkpoint(str(tmp_path / "extra"), extra, checkpoints["single"]))
    wrong = {**tensors, "proj_out.bias": np.zeros(63, np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"proj_out\.bias \[63\] \(expected \[64\]\)"):
        load_transformer(_write_checkpoint(str(tmp_path / "wrong"), wrong, checkpoints["single"]))


def _loss_and_grads(model, args):
    def loss(m):
        return jnp.mean(jnp.square(m(*args)))
    return nnx.jit(nnx.value_and_grad(loss))(model)


def _with_params_of(config, source):
    """A model of ``config`` whose parameters are copied from the same paths of ``source`` (its first
    ``config.num_layers`` layers of the stacked blocks)."""
    values = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(source))}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanTransformer(config, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        value = values[path]
        var.set_value(value if value.shape == var.shape else value[:var.shape[0]])
    return nnx.merge(graphdef, state)


def test_remat_policies_match_no_remat(loaded):
    # one block of the loaded model: each gradient compile costs ~4 s on CPU, the bulk of this file
    args = tuple(map(jnp.asarray, inputs(*SHAPES[0])))
    with jax.default_matmul_precision("float32"):  # on GPUs TF32 would differ between recomputations
        results = {policy: _loss_and_grads(
                       _with_params_of(get_config("tiny", num_layers=1, remat_policy=policy), loaded), args)
                   for policy in ("none", "full", "attention_saveable")}
    base_loss, base_grads = results.pop("none")
    for policy, (loss, grads) in results.items():
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        errors = [rel_err(g, g0) for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads))]
        print(f"remat {policy}: max relative gradient difference {max(errors):.1e}")
        assert max(errors) < 1e-5, policy


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_compute_close_to_f32(loaded, checkpoints, param_dtype):
    model = load_transformer(checkpoints["single"], dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert model.blocks.ffn.up.kernel.dtype == param_dtype
    assert model.blocks.modulation_table.dtype == jnp.float32  # kept in float32, as diffusers does
    args = tuple(map(jnp.asarray, inputs(*SHAPES[0])))
    out = forward(model, *args)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), forward(loaded, *args)) < 3e-2


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logical_axis_names_on_big_weights(scan_layers):
    model = nnx.eval_shape(lambda: WanTransformer(get_config("wan2.1-t2v-1.3b", scan_layers=scan_layers),
                                                  rngs=nnx.Rngs(0)))
    block, layers = (model.blocks, ("layers",)) if scan_layers else (model.blocks[0], ())
    assert _names(block.self_attn.query.kernel) == (*layers, "embed", "heads")
    assert _names(block.cross_attn.out.kernel) == (*layers, "heads", "embed")
    assert _names(block.ffn.up.kernel) == (*layers, "embed", "mlp")
    assert _names(block.ffn.down.kernel) == (*layers, "mlp", "embed")
    assert _names(block.modulation_table) == (*layers, None, None, "embed")
    assert _names(model.time_proj.kernel) == ("embed", "modulation")
    assert _names(model.text_embed.linear_1.kernel) == ("text_embed", "embed")
    assert _names(model.time_embed.linear_1.kernel) == ("freq", "embed")
    assert _names(model.proj_out.kernel) == ("embed", "patch")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = _names(var)
        assert names is not None and len(names) == var.ndim, path
        assert (names[0] == "layers") == (scan_layers and path[0] == "blocks"), path
        if len([n for n in names if n != "layers"]) == 2 and var.ndim == len(layers) + 2:
            assert any(n for n in names if n != "layers"), path  # every matrix can be sharded by some rule


def test_load_onto_mesh_with_rules(loaded, checkpoints):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"), ("text_embed", "fsdp"), ("patch", None)]
    model = load_transformer(checkpoints["single"], mesh=mesh, rules=rules)
    # the stacked blocks' leading 'layers' axis is on no mesh axis
    assert model.blocks.ffn.up.kernel[...].sharding.spec == P(None, "fsdp", None)  # fsdp taken by 'embed' first
    assert model.blocks.ffn.down.kernel[...].sharding.spec == P(None, "fsdp", None)
    assert model.blocks.self_attn.query_norm.scale[...].sharding.spec == P(None, None)
    args = tuple(map(jnp.asarray, inputs(*SHAPES[0])))
    assert rel_err(forward(model, *args), forward(loaded, *args)) < 1e-5
    per_block = load_transformer(checkpoints["single"], mesh=mesh, rules=rules, scan_layers=False)
    assert per_block.blocks[1].ffn.up.kernel[...].sharding.spec == P("fsdp", None)
    assert rel_err(forward(per_block, *args), forward(loaded, *args)) < 1e-5
    # The project's default rules: FSDP over the model dim, nothing else on a mesh without 'tensor'.
    default = load_transformer(checkpoints["single"], mesh=mesh, rules=parallel.DEFAULT_RULES)
    assert default.blocks.ffn.up.kernel[...].sharding.spec == P(None, "fsdp", None)
    assert default.blocks.self_attn.out.kernel[...].sharding.spec == P(None, None, "fsdp")


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_stacked_blocks_are_the_per_block_ones_stacked():
    """A seed gives the same weights in both layouts, so outputs and gradients agree too (float32: the
    scanned and the unrolled programs differ only in rounding)."""
    cfg = get_config("tiny", num_layers=3)
    stacked = WanTransformer(cfg, rngs=nnx.Rngs(3))
    per_block = WanTransformer(get_config("tiny", num_layers=3, scan_layers=False), rngs=nnx.Rngs(3))
    assert type(stacked.blocks).__name__ == "WanBlock" and stacked.blocks.ffn.up.kernel.shape == (3, 64, 128)
    assert len(per_block.blocks) == 3
    want, got = stack_blocks(_params(per_block)), _params(stacked)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(got), _params(per_block))
    args = tuple(map(jnp.asarray, inputs(*SHAPES[0])))
    with jax.default_matmul_precision("float32"):
        (l_s, g_s), (l_p, g_p) = _loss_and_grads(stacked, args), _loss_and_grads(per_block, args)
        y_s, y_p = forward(stacked, *args), forward(per_block, *args)
    assert rel_err(y_s, y_p) < 1e-6
    np.testing.assert_allclose(l_s, l_p, rtol=1e-6)
    g_s, g_p = nnx.to_pure_dict(g_s), stack_blocks(nnx.to_pure_dict(g_p))
    errors = [rel_err(a, b) for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_p))]
    assert max(errors) < 1e-5, max(errors)
    # and the conversion between layouts keeps the outputs
    assert rel_err(forward(convert_layout(per_block, scan_layers=True), *args), y_s) < 1e-6
    assert rel_err(forward(convert_layout(stacked, scan_layers=False), *args), y_p) < 1e-6


def _dot_count(model, args) -> int:
    """Matrix products in the traced forward program (nested jaxprs, e.g. a scan's body, included)."""
    graphdef = nnx.graphdef(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args))(nnx.state(model))
    return str(jaxpr).count("dot_general[")


def test_scanned_program_holds_one_block():
    """The point of scan_layers: the traced program has one block whatever the depth; the loop has all."""
    args = tuple(map(jnp.asarray, inputs(*SHAPES[1])))
    scanned = [_dot_count(WanTransformer(get_config("tiny", num_layers=n), rngs=nnx.Rngs(0)), args) for n in (2, 4)]
    looped = [_dot_count(WanTransformer(get_config("tiny", num_layers=n, scan_layers=False), rngs=nnx.Rngs(0)), args)
              for n in (2, 4)]
    assert scanned[0] == scanned[1] < looped[0] < looped[1]


def test_rank_deficient_head_warns_and_its_samples_keep_the_initial_noise():
    """A head Linear(dim -> patch volume x C) with dim below that spans only dim directions of a token; a
    flow sampler moves the rest only by the head's bias b: dx/ds = b there, so the sample's component off the
    head's span is the noise's minus sigma_0 b, whatever the weights (any solver exact for a constant field)."""
    from shelllcc.flow.samplers import unipc_sample
    from shelllcc.flow.timesteps import wan_sampling_schedule

    with pytest.warns(UserWarning, match="dim=32 < patch volume x out_channels = 64"):
        cfg = get_config("tiny", dim=32, num_heads=2, ffn_dim=64, num_layers=1)
    model = WanTransformer(cfg, rngs=nnx.Rngs(0))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    model.proj_out.bias[...] = 0.3 * jax.random.normal(k1, model.proj_out.bias.shape)
    model.proj_out.kernel[...] = 0.3 * jax.random.normal(k2, model.proj_out.kernel.shape)  # not the zero init
    noise = jax.random.normal(k3, (2, 2, 4, 4, 16))
    context = jax.random.normal(jax.random.key(2), (2, 8, cfg.text_dim))
    schedule = wan_sampling_schedule(8, shift=3.0)
    out = unipc_sample(lambda x, t, c: model(x, t, c), noise, context, schedule, guidance_scale=1.0)

    def tokens(x):  # [B, T, H, W, C] -> [B * T * H/2 * W/2, 2 * 2 * C], the head's (pt, ph, pw, c) order
        b, t, h, w, c = x.shape
        x = np.asarray(x, np.float64).reshape(b, t, h // 2, 2, w // 2, 2, c)
        return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(-1, 4 * c)

    kernel = np.asarray(model.proj_out.kernel[...], np.float64)            # [32, 64]
    _, _, vt = np.linalg.svd(kernel, full_matrices=True)
    span, off = vt[:32], vt[32:]
    bias = np.asarray(model.proj_out.bias[...], np.float64)
    expected = tokens(noise) @ off.T - float(schedule.sigmas[0]) * (bias @ off.T)
    np.testing.assert_allclose(tokens(out) @ off.T, expected, atol=2e-4)
    # the head's own directions did move: the check above is not of an idle sampler
    assert np.abs(tokens(out) @ span.T - tokens(noise) @ span.T).mean() > 0.1


def test_full_rank_presets_do_not_warn():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
            get_config(name)
