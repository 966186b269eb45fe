"""The patch reward model (shelllcc.rewards.patch_reward): its grid, its head against a float64 statement, the
per-patch BCE against float64 numpy and finite differences, initialisation from a video reward model, saving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer, get_config
from shelllcc.rewards import patch_reward as pr
from shelllcc.rewards import reward_model as rm

CFG = get_config("tiny", text_dim=16, num_layers=2, scan_layers=False)      # patch (1, 2, 2)


def _inputs(seed=0, b=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, 2, 8, 8, 16)).astype(np.float32),
            rng.standard_normal((b, 5, 16)).astype(np.float32))


def test_latent_patch_masks_partition_the_grid_row_major():
    m = pr.latent_patch_masks((2, 8, 8), (1, 4, 4))
    assert m.shape == (8, 2, 8, 8) and m.dtype == np.float32
    np.testing.assert_array_equal(m.sum(0), 1.0)
    assert m[0, 0, :4, :4].all() and m[1, 0, :4, 4:].all() and m[2, 0, 4:, :4].all() and m[4, 1, :4, :4].all()
    with pytest.raises(ValueError, match=r"patch \(1, 3, 4\) .* must tile the latent grid \(2, 8, 8\)"):
        pr.latent_patch_masks((2, 8, 8), (1, 3, 4))


def _np_head(model, tokens, temb, masks_tok):
    """float64: mean of each patch's tokens, + temb, LN (no scale), Dense, gelu (tanh form), Dense."""
    f = np.einsum("pn,bnd->bpd", masks_tok, tokens) / masks_tok.sum(1)[None, :, None] + temb[:, None]
    mu, var = f.mean(-1, keepdims=True), f.var(-1, keepdims=True)
    f = (f - mu) / np.sqrt(var + model.config.eps)
    w1, b1 = (np.asarray(x, np.float64) for x in (model.patch_hidden.kernel[...], model.patch_hidden.bias[...]))
    w2, b2 = (np.asarray(x, np.float64) for x in (model.patch_out.kernel[...], model.patch_out.bias[...]))
    h = f @ w1 + b1
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return (h @ w2 + b2)[..., 0]


def test_model_pools_each_patchs_tokens_as_the_masks_say():
    model = pr.PatchRewardModel(WanTransformer(CFG, rngs=nnx.Rngs(0)), 2, patch_tokens=(1, 2, 2), rngs=nnx.Rngs(1))
    assert model.config.patch() == (1, 4, 4)
    z, c = _inputs()
    t = jnp.array([0.0, 300.0, 900.0])
    r = nnx.jit(lambda m, z, t, c: m(z, t, c))(model, z, t, c)
    assert r.shape == (3, 8)                               # (2 / 1) (8 / 4) (8 / 4) patches
    tokens, _, temb = nnx.jit(lambda m, z, t, c: m.features(z, t, c))(model, z, t, c)
    # token n covers the latent cell (t, 2i, 2j): a patch's tokens are those whose first cell is in its mask
    masks = pr.latent_patch_masks((2, 8, 8), (1, 4, 4))
    masks_tok = masks[:, :, ::2, ::2].reshape(8, -1)
    want = _np_head(model, np.asarray(tokens, np.float64), np.asarray(temb, np.float64), masks_tok)
    np.testing.assert_allclose(np.asarray(r), want, rtol=2e-4, atol=2e-5)


def _bce_np(r, y, v):
    r, y, v = (np.asarray(x, np.float64) for x in (r, y, v))
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    return np.sum(v * (-y * log_sig(r) - (1 - y) * log_sig(-r))) / max(v.sum(), 1.0)


def test_patch_bce_matches_float64_numpy_and_its_metrics():
    rng = np.random.default_rng(2)
    r = 3 * rng.standard_normal((5, 12))
    y = (rng.random((5, 12)) < 0.7).astype(np.int32)
    v = (rng.random((5, 12)) < 0.8).astype(np.float32)
    loss, m = jax.jit(pr.patch_bce_loss)(jnp.asarray(r, jnp.float32), y, v)
    np.testing.assert_allclose(float(loss), _bce_np(r, y, v), rtol=1e-5)
    right = (r > 0) == (y == 1)
    np.testing.assert_allclose(float(m["patch_accuracy"]), (right * v).sum() / v.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy_degraded"]), (right * v * (y == 0)).sum() / (v * (y == 0)).sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(float(m["reward_clean"]), (r * v * y).sum() / (v * y).sum(), rtol=1e-5)
    loss_all, _ = pr.patch_bce_loss(jnp.asarray(r, jnp.float32), y)
    np.testing.assert_allclose(float(loss_all), _bce_np(r, y, np.ones_like(r)), rtol=1e-5)
    # large logits: the log-sigmoid form stays finite where log(sigmoid) would not
    big, _ = pr.patch_bce_loss(jnp.array([[80.0, -80.0]]), jnp.array([[0, 1]]))
    np.testing.assert_allclose(float(big), 80.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"rewards and labels must both be \[B, P\], got \(5, 12\) and \(5, 11\)"):
        pr.patch_bce_loss(jnp.asarray(r), y[:, :11])


def test_patch_bce_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    r = rng.standard_normal((3, 4))
    y = (rng.random((3, 4)) < 0.5).astype(np.float64)
    v = np.ones((3, 4))
    g = np.asarray(jax.grad(lambda x: pr.patch_bce_loss(x, y)[0])(jnp.asarray(r, jnp.float32)))
    h, want = 1e-6, np.zeros_like(r)
    for idx in np.ndindex(r.shape):
        e = np.zeros_like(r)
        e[idx] = h
        want[idx] = (_bce_np(r + e, y, v) - _bce_np(r - e, y, v)) / (2 * h)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
    # and the closed form: (sigmoid(r) - y) / N
    np.testing.assert_allclose(want, (1 / (1 + np.exp(-r)) - y) / r.size, rtol=1e-6)


def test_from_video_model_copies_the_backbone_and_saves_exactly(tmp_path):
    video = rm.LatentRewardModel(WanTransformer(CFG, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
    saving.save_model(str(tmp_path / "video"), video)
    video = rm.load_reward_model(str(tmp_path / "video"))
    model = pr.PatchRewardModel.from_video_model(video, (1, 2, 2), rngs=nnx.Rngs(5))
    assert model.config.num_blocks == 2 and model.config.num_layers == 2 and model.config.patch_tokens == (1, 2, 2)
    z, c = _inputs(1)
    feats = nnx.jit(lambda m, z, c: m.features(z, jnp.zeros((3,)), c)[0])
    np.testing.assert_array_equal(np.asarray(feats(model, z, c)), np.asarray(feats(video, z, c)))
    # copies, not shared: training the patch model leaves the video model alone
    assert model.blocks[0] is not video.blocks[0]
    loaded = pr.load_patch_reward_model(saving.save_model(str(tmp_path / "patch"), model))
    assert isinstance(loaded, pr.PatchRewardModel) and loaded.config == model.config
    score = nnx.jit(pr.patch_rewards)
    np.testing.assert_array_equal(np.asarray(score(loaded, z, c)), np.asarray(score(model, z, c)))
    with pytest.raises(ValueError, match="holds a 'latent_reward_model' model, not a patch_reward_model"):
        pr.load_patch_reward_model(str(tmp_path / "video"))
    with pytest.raises(ValueError, match=r"do not tile into patches of \(1, 4, 4\)"):
        model(jnp.zeros((1, 2, 6, 8, 16)), jnp.zeros((1,)), jnp.zeros((1, 5, 16)))


def test_frozen_filter_trains_the_head_only():
    model = pr.PatchRewardModel(WanTransformer(CFG, rngs=nnx.Rngs(0)), 1, rngs=nnx.Rngs(1))
    _, trained, rest = nnx.split(model, pr.trainable_filter("frozen"), ...)
    assert set(nnx.to_pure_dict(trained)) == set(pr.HEAD_MODULES)
    assert "blocks" in nnx.to_pure_dict(rest)
