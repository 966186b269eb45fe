"""Wan2.1 causal VAE: parity with diffusers' AutoencoderKLWan, gradients, latent scaling, input and
checkpoint errors. The reference is a tiny random torch model saved with ``save_pretrained`` and read
back through ``load_vae``.
"""

import dataclasses
import inspect
import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
from flax import nnx

from shelllcc.models.wan_vae import WanVAEConfig, config_from_diffusers, denormalize_latents, normalize_latents, run_chunked
from tests.helpers import rel_err
from third_party.safetensors_checkpoint import weight_files
from third_party.wan_vae_weights import abstract_vae, convert_tensor, diffusers_key_to_path, load_vae, path_to_diffusers_key

# Parity tolerances: ||ours - diffusers|| / ||diffusers||, about 10x the value measured in float32 on CPU
ENCODE_TOL = 5e-6         # measured: mean 1.4e-7 / 2.3e-7 / 2.6e-7, logvar 2.5e-7 / 3.5e-7 / 5.3e-7 (1, 7, 9 frames)
DECODE_TOL = 1e-5         # measured: 8.7e-7 (1 latent frame), 9.8e-7 (3)
OTHER_ENCODE_TOL = 4e-6   # measured: 3.9e-7 (the other layout, 5 frames)
OTHER_DECODE_TOL = 3e-5   # measured: 2.7e-6
DECODE_GRAD_TOL = 2e-5    # measured: 1.6e-6 (gradient of a weighted sum of the decoded video)
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
H, W = 16, 24  # non-square; latents 2 x 3


def _random_reference(seed: int, **config):
    """A random ``AutoencoderKLWan`` in eval mode; RMS-norm gammas randomised so no part is an identity.

    With PyTorch's default init the decoded pixels stay mostly inside the [-1, 1] clamp, so the comparisons
    below see the network, not the clamp (checked in ``test_decode_matches_diffusers``).
    """
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def _to_torch(x):  # [B, T, H, W, C] -> [B, C, T, H, W]
    return torch.from_numpy(np.array(x, np.float32)).permute(0, 4, 1, 2, 3).contiguous()


def _to_jax(t):  # [B, C, T, H, W] -> [B, T, H, W, C]
    return jnp.asarray(t.detach().permute(0, 2, 3, 4, 1).numpy())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = _random_reference(0, **TINY)
    root = tmp_path_factory.mktemp("wan_vae")
    single, sharded = str(root / "single"), str(root / "sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    return model, single, sharded


@pytest.fixture(scope="module")
def vae(reference):
    return load_vae(reference[2])


@pytest.fixture(scope="module")
def jitted():
    return {"encode": nnx.jit(lambda m, v: m.encode_moments(v)),
            "decode": nnx.jit(lambda m, z: m.decode(z))}


# ------------------------------------------------------------------------------------------ config / loading

def test_tiny_reference_config_and_preset(reference):
    cfg = config_from_diffusers(dict(reference[0].config))
    assert cfg.latents_std == tuple(TINY["latents_std"])
    assert dataclasses.replace(cfg, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4) == WanVAEConfig.preset("tiny")
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)


def test_wan21_preset_matches_diffusers_defaults_and_layout():
    """The released architecture: config defaults and every parameter name and converted shape."""
    defaults = {k: p.default for k, p in inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    cfg = config_from_diffusers(defaults)
    assert cfg == WanVAEConfig.preset("wan2.1")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**defaults)
    expected = {diffusers_key_to_path(k): convert_tensor(k, np.broadcast_to(np.uint8(0), v.shape)).shape
                for k, v in ref.state_dict().items()}
    _, state = nnx.split(abstract_vae(cfg))
    got = {p: tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    assert got == expected
    assert all(path_to_diffusers_key(diffusers_key_to_path(k)) == k for k in ref.state_dict())


def test_sharded_and_single_file_load_the_same(reference, vae):
    _, single, sharded = reference
    assert len(weight_files(sharded)) > 1 and len(weight_files(single)) == 1
    a = dict(nnx.to_flat_state(nnx.state(load_vae(single), nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))


def test_param_dtype_and_compute_dtype(reference):
    vae16 = load_vae(reference[1], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert vae16.encoder.conv_in.kernel[...].dtype == jnp.float32
    assert load_vae(reference[1], dtype=jnp.bfloat16).encoder.conv_in.kernel[...].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("frames", [1, 7, 9])
def test_encode_matches_diffusers(reference, vae, jitted, frames):
    """Posterior mean and log-variance: the first frame alone, one or two chunks of 4 after it; with 7 frames
    diffusers drops the 2 frames after the last full chunk."""
    model = reference[0]
    video = np.random.default_rng(frames).uniform(-1, 1, (2, frames, H, W, 3)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(_to_torch(video)).latent_dist
    mean, logvar = jitted["encode"](vae, jnp.asarray(video))
    assert mean.shape == (2, vae.config.latent_frames(frames), H // 8, W // 8, 4) == _to_jax(dist.mean).shape
    assert rel_err(mean, _to_jax(dist.mean)) < ENCODE_TOL
    assert rel_err(logvar, _to_jax(dist.logvar)) < ENCODE_TOL


@pytest.mark.parametrize("latent_frames", [1, 3])
def test_decode_matches_diffusers(reference, vae, jitted, latent_frames):
    model = reference[0]
    z = np.random.default_rng(latent_frames).normal(size=(2, latent_frames, 2, 3, 4)).astype(np.float32)
    with torch.no_grad():
        want = _to_jax(model.decode(_to_torch(z)).sample)
    got = jitted["decode"](vae, jnp.asarray(z))
    assert got.shape == (2, 1 + 4 * (latent_frames - 1), H, W, 3) == want.shape
    assert float(jnp.mean(jnp.abs(want) >= 1.0)) < 0.01  # the network, not the clamp, decides the output
    assert float(jnp.std(want)) > 0.05
    assert rel_err(got, want) < DECODE_TOL


def test_other_layouts_match_diffusers(tmp_path):
    """A variant with its own decoder width and temporal downsampling in the first two levels."""
    config = dict(base_dim=8, decoder_base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[True, True, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    model = _random_reference(1, **config)
    model.save_pretrained(str(tmp_path))
    vae = load_vae(str(tmp_path))
    video = np.random.default_rng(0).uniform(-1, 1, (1, 5, H, W, 3)).astype(np.float32)
    with torch.no_grad():
        want_z = _to_jax(model.encode(_to_torch(video)).latent_dist.mean)
        want_x = _to_jax(model.decode(_to_torch(np.asarray(want_z))).sample)
    z = nnx.jit(lambda m, v: m.encode(v))(vae, jnp.asarray(video))
    assert rel_err(z, want_z) < OTHER_ENCODE_TOL
    assert rel_err(nnx.jit(lambda m, z: m.decode(z))(vae, want_z), want_x) < OTHER_DECODE_TOL


# ------------------------------------------------------------------------------------------ gradients

def test_decode_gradient_matches_torch_autograd(reference, vae):
    model = reference[0]
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 2, 2, 3, 4)).astype(np.float32)
    weights = rng.normal(size=(1, 5, H, W, 3)).astype(np.float32)

    z_t = _to_torch(z).requires_grad_(True)
    (model.decode(z_t).sample * _to_torch(weights)).sum().backward()
    want = _to_jax(z_t.grad)

    got = jax.jit(jax.grad(lambda latents: jnp.sum(vae.decode(latents) * weights)))(jnp.asarray(z))
    assert bool(jnp.all(jnp.isfinite(got)))
    assert rel_err(got, want) < DECODE_GRAD_TOL


def test_run_chunked_streams_a_causal_step_and_remat_keeps_gradients():
    """``run_chunked`` on a toy causal step (running sum of the previous frame): equal to the one-piece
    computation, with and without rematerialisation, values and gradients."""
    def step(x, cache):  # y_t = x_t + x_{t-1}, the cache holds the last frame
        past = jnp.zeros_like(x[:, :1]) if cache is None else cache
        seq = jnp.concatenate([past, x], axis=1)
        return jnp.tanh(seq[:, 1:] + seq[:, :-1]), x[:, -1:]

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 3))
    whole = step(x, None)[0]

    def chunked(x, remat):
        rest = jnp.moveaxis(x[:, 1:].reshape(2, 2, 4, 3), 1, 0)
        return run_chunked(step, x[:, :1], rest, remat=remat)

    for remat in (False, True):
        np.testing.assert_allclose(chunked(x, remat), whole, rtol=1e-6, atol=1e-6)
        g = jax.grad(lambda x: jnp.sum(chunked(x, remat) ** 2))(x)
        np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(step(x, None)[0] ** 2))(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ dtypes / jit

def test_bfloat16_compute_is_close_to_float32(reference, vae, jitted):
    vae16 = load_vae(reference[1], dtype=jnp.bfloat16)
    # the shapes of the float32 parity tests, so only the bfloat16 model compiles here
    video = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 9, H, W, 3)), jnp.float32)
    mean32, _ = jitted["encode"](vae, video)
    mean16, _ = jitted["encode"](vae16, video)
    assert mean16.dtype == jnp.bfloat16
    assert rel_err(mean16.astype(jnp.float32), mean32) < 5e-2
    x32, x16 = jitted["decode"](vae, mean32), jitted["decode"](vae16, mean32)
    assert x16.dtype == jnp.bfloat16
    assert rel_err(x16.astype(jnp.float32), x32) < 5e-2


def test_encode_sample_uses_the_posterior(vae):
    video = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 1, H, W, 3)), jnp.float32)
    key = jax.random.PRNGKey(0)
    mean, logvar, sample = nnx.jit(lambda m, v, k: (*m.encode_moments(v), m.encode_sample(v, k)))(vae, video, key)
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-5)
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0


# ------------------------------------------------------------------------------------------ latent scaling

def test_latent_normalisation_round_trip_and_pipeline_formula():
    cfg = WanVAEConfig.preset("wan2.1")
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5, 16)) * 2.0 + 0.5
    zn = normalize_latents(z, cfg.latents_mean, cfg.latents_std)
    np.testing.assert_allclose(denormalize_latents(zn, cfg.latents_mean, cfg.latents_std), z, rtol=1e-5, atol=1e-5)
    # diffusers' WanPipeline before vae.decode, channels-first: latents / (1 / std) + mean
    zn_t = _to_torch(zn)
    mean_t = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    inv_std_t = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    np.testing.assert_allclose(denormalize_latents(zn, cfg.latents_mean, cfg.latents_std),
                               _to_jax(zn_t / inv_std_t + mean_t), rtol=1e-5, atol=1e-5)
    # per channel: normalised latents have the statistics' mean removed and unit scale
    std = np.asarray(cfg.latents_std)
    np.testing.assert_allclose(zn[..., 3], (z[..., 3] - cfg.latents_mean[3]) / std[3], rtol=1e-5, atol=1e-6)


def test_vae_methods_use_config_statistics(vae):
    z = jnp.ones((1, 1, 2, 3, 4))
    np.testing.assert_allclose(vae.normalize(z), (1.0 - np.array(TINY["latents_mean"])) / np.array(TINY["latents_std"])
                               * np.ones((1, 1, 2, 3, 4)), rtol=1e-6)
    np.testing.assert_allclose(vae.denormalize(vae.normalize(z)), z, rtol=1e-6)


def test_frame_count_helpers():
    cfg = WanVAEConfig.preset("wan2.1")
    assert [cfg.latent_frames(t) for t in (1, 2, 4, 5, 7, 8, 9, 81)] == [1, 1, 1, 2, 2, 2, 3, 21]
    assert [cfg.video_frames(t) for t in (1, 2, 21)] == [1, 5, 81]


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("shape, message", [
    ((1, 5, H, W, 4), "channels"),
    ((1, 5, H, W - 4, 3), "divisible by 8"),
    ((1, 5, 12, W, 3), "divisible by 8"),
    ((5, H, W, 3), "rank 5"),
    ((1, 0, H, W, 3), "no frames"),
])
def test_encode_rejects_bad_videos(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(jnp.zeros(shape))


@pytest.mark.parametrize("shape, message", [((1, 2, 2, 3, 16), "channels"), ((2, 2, 3, 4), "rank 5")])
def test_decode_rejects_bad_latents(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.decode(jnp.zeros(shape))


def test_unknown_preset_and_bad_configs():
    with pytest.raises(ValueError, match="preset"):
        WanVAEConfig.preset("wan9")
    with pytest.raises(ValueError, match="Wan2.2"):
        config_from_diffusers({"is_residual": True})
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="attn_scales"):
        config_from_diffusers({"attn_scales": [0.5]})


def _rewrite_checkpoint(src: str, dst: str, edit) -> None:
    """Copy a single-file diffusers folder, applying ``edit(dict of arrays)`` to its tensors."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors_numpy.load_file(path).items()}
    edit(tensors)
    safetensors_numpy.save_file(tensors, path)


def test_checkpoint_missing_key_is_named(reference, tmp_path):
    dst = str(tmp_path / "missing")
    _rewrite_checkpoint(reference[1], dst, lambda t: t.pop("decoder.up_blocks.1.upsamplers.0.time_conv.bias"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder\.up_blocks\.1\.upsamplers\.0\.time_conv\.bias"):
        load_vae(dst)


def test_checkpoint_unexpected_key_is_named(reference, tmp_path):
    dst = str(tmp_path / "unexpected")
    _rewrite_checkpoint(reference[1], dst, lambda t: t.update({"encoder.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): encoder\.extra\.weight"):
        load_vae(dst)


def test_checkpoint_wrong_shape_is_named(reference, tmp_path):
    dst = str(tmp_path / "shape")
    _rewrite_checkpoint(reference[1], dst, lambda t: t.update({"quant_conv.bias": np.zeros((3,), np.float32)}))
    with pytest.raises(ValueError, match="quant_conv.bias"):
        load_vae(dst)


def test_missing_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({}, f)  # the Wan2.1 defaults
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_vae(str(tmp_path))
