"""PatchVAE (the embedded benchmark's VAE) and the train_vae experiment's pure pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import train_vae
from shelllcc.models import saving
from shelllcc.models.patch_vae import PatchVAE, PatchVAEConfig, tokenize, untokenize
from shelllcc.models.wan_vae import WanVAEConfig

SMALL = PatchVAEConfig(z_dim=4, width=16, conv_width=4, depth=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


def test_tokenize_layout_against_loops():
    cfg = PatchVAEConfig(z_dim=4, patch=2, temporal_patch=2, in_channels=1, latents_mean=(0.0,) * 4,
                         latents_std=(1.0,) * 4)
    v = np.random.default_rng(0).random((1, 5, 4, 6, 1)).astype(np.float32)
    tok = np.asarray(tokenize(jnp.asarray(v), cfg))
    assert tok.shape == (1, 3, 2, 3, 2 * 2 * 2 * 1)
    # latent frame 0 holds frame 0 in both temporal slots; frame k >= 1 holds frames 2k-1, 2k
    for t in range(3):
        frames = [0, 0] if t == 0 else [2 * t - 1, 2 * t]
        for i in range(2):
            for j in range(3):
                want = np.stack([v[0, f, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 0] for f in frames]).reshape(-1)
                np.testing.assert_array_equal(tok[0, t, i, j], want)
    back = np.asarray(untokenize(jnp.asarray(tok), cfg))
    np.testing.assert_array_equal(back, v)


def test_geometry_matches_wan_vae():
    wan = WanVAEConfig.preset("wan2.1")
    cfg = PatchVAEConfig()
    assert (cfg.spatial_factor, cfg.temporal_factor) == (wan.spatial_factor, wan.temporal_factor)
    for t in (1, 5, 17, 20, 81):
        assert cfg.latent_frames(t) == wan.latent_frames(t)
    vae = PatchVAE(SMALL, rngs=nnx.Rngs(0))
    z = vae.encode(jnp.zeros((2, 17, 16, 24, 3)))
    assert z.shape == (2, 5, 2, 3, 4)
    assert vae.decode(z).shape == (2, 17, 16, 24, 3)


def test_encoder_is_causal_in_time():
    vae = PatchVAE(SMALL, rngs=nnx.Rngs(1))
    v = jax.random.uniform(jax.random.PRNGKey(0), (1, 13, 16, 16, 3), minval=-1, maxval=1)
    w = v.at[:, 9:].set(0.0)                      # change frames of latent frame 3 only
    a, b = np.asarray(vae.encode(v)), np.asarray(vae.encode(w))
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert np.abs(a[:, 3:] - b[:, 3:]).max() > 0


def test_bad_inputs_name_the_shape():
    vae = PatchVAE(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(jnp.zeros((1, 5, 12, 16, 3)))
    with pytest.raises(ValueError, match="channels"):
        vae.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match=r"\[B, T', h, w, 4\]"):
        vae.decode(jnp.zeros((1, 2, 2, 2, 3)))
    with pytest.raises(ValueError, match="latents_std"):
        PatchVAEConfig(z_dim=2, latents_mean=(0.0, 0.0), latents_std=(1.0, 0.0))


def test_save_load_round_trip(tmp_path):
    cfg = PatchVAEConfig(**{**SMALL.__dict__, "latents_mean": (0.1, 0.2, 0.3, 0.4), "latents_std": (1.0, 2.0, 3.0, 4.0)})
    vae = PatchVAE(cfg, rngs=nnx.Rngs(3))
    saving.save_model(str(tmp_path / "vae"), vae)
    back = saving.load_model(str(tmp_path / "vae"))
    assert back.config == cfg
    v = jax.random.uniform(jax.random.PRNGKey(1), (1, 5, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_array_equal(np.asarray(back.encode(v)), np.asarray(vae.encode(v)))
    z = jnp.ones((1, 2, 2, 2, 4))
    want = np.broadcast_to((1.0 - np.array([0.1, 0.2, 0.3, 0.4])) / [1, 2, 3, 4], z.shape)
    np.testing.assert_allclose(np.asarray(back.normalize(z)), want, rtol=1e-6)


def test_random_crops_are_aligned_windows():
    t, h, w = 17, 16, 16
    video = np.arange(2 * t * h * w * 3, dtype=np.int32).reshape(2, t, h, w, 3)
    crops = np.asarray(train_vae.random_crops(jnp.asarray(video), jax.random.PRNGKey(5), 9, 8, 4))
    assert crops.shape == (2, 9, 8, 8, 3)
    for b in range(2):
        # recover the offsets from the first element and check the whole window
        flat = int(crops[b, 0, 0, 0, 0]) - b * t * h * w * 3
        t0, rest = divmod(flat, h * w * 3)
        y0, x0 = divmod(rest // 3, w)
        assert t0 % 4 == 0 and t0 + 9 <= t
        np.testing.assert_array_equal(crops[b], video[b, t0:t0 + 9, y0:y0 + 8, x0:x0 + 8])


def test_vae_loss_against_numpy():
    rng = np.random.default_rng(0)
    y, x = rng.normal(size=(2, 5, 8, 8, 3)), rng.normal(size=(2, 5, 8, 8, 3))
    m, lv = rng.normal(size=(2, 2, 1, 1, 4)), rng.normal(size=(2, 2, 1, 1, 4))

    class W:
        l1, kl = 0.7, 0.01
    loss, metrics = train_vae.vae_loss(*(jnp.asarray(a, jnp.float32) for a in (y, x, m, lv)), W)
    l1 = np.mean(np.abs(y - x))
    kl = 0.5 * np.mean(m ** 2 + np.exp(lv) - 1 - lv)
    np.testing.assert_allclose(float(metrics["l1"]), l1, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * l1 + 0.01 * kl, rtol=1e-5)


def test_reconstruction_report_ratios():
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (3, 5, 16, 16, 3)).astype(np.uint8)
    same = train_vae.reconstruction_report(real, real)
    assert same["l1"] == 0 and same["laplacian_ratio"] == pytest.approx(1.0) and same["hf_ratio"] == pytest.approx(1.0)
    flat = np.full_like(real, 128)
    r = train_vae.reconstruction_report(real, flat)
    assert r["laplacian_ratio"] == pytest.approx(0.0, abs=1e-9) and r["l1"] > 0.1
