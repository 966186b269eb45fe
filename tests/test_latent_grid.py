"""Pixel maps on the latent grid (shelllcc.data.latent_grid) and the region-weighted flow loss
(shelllcc.flow.objectives.region_weights / sft_loss(weights=...)), against float64 loop statements."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shelllcc.data.latent_grid import PooledField, pool_to_latent_grid
from shelllcc.flow.objectives import region_weights, sft_loss


def _pool_loop(x, t, h, w, causal):
    """The definition, one latent cell at a time, in float64."""
    T, H, W = x.shape
    sh, sw = H // h, W // w
    r = (T - 1) // (t - 1) if causal and t > 1 else T // t
    out = np.zeros((t, h, w))
    for k in range(t):
        frames = ([0] if k == 0 else list(range(1 + r * (k - 1), 1 + r * k))) if causal else \
            list(range(r * k, r * (k + 1)))
        for i in range(h):
            for j in range(w):
                out[k, i, j] = np.mean(x[frames][:, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw].astype(np.float64))
    return out


@pytest.mark.parametrize("shape,grid,causal", [((9, 16, 12), (3, 4, 3), True), ((9, 16, 12), (3, 4, 3), False),
                                               ((17, 8, 8), (5, 2, 2), True), ((8, 8, 8), (2, 8, 1), False),
                                               ((1, 4, 4), (1, 1, 1), True)])
def test_pool_equals_the_cellwise_mean(shape, grid, causal):
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    got = pool_to_latent_grid(x, grid, causal)
    np.testing.assert_allclose(got, _pool_loop(x, *grid, causal), rtol=1e-6, atol=1e-7)
    # leading axes are carried through
    batch = np.stack([x, 1 - x])
    np.testing.assert_allclose(pool_to_latent_grid(batch, grid, causal)[1], 1 - got, atol=1e-6)


def test_pool_refuses_layouts_that_do_not_fit():
    x = np.zeros((10, 8, 8))
    with pytest.raises(ValueError, match="causal layout"):
        pool_to_latent_grid(x, (3, 2, 2), causal=True)          # 10 != 1 + r * 2
    with pytest.raises(ValueError, match="do not divide"):
        pool_to_latent_grid(x, (3, 2, 2), causal=False)
    with pytest.raises(ValueError, match="8 x 8 pixels"):
        pool_to_latent_grid(x, (5, 3, 2), causal=False)


def test_pooled_field_reads_uint8_as_coverage_and_names_a_missing_field():
    rng = np.random.default_rng(1)
    source = [{"m": rng.integers(0, 256, (5, 4, 4)).astype(np.uint8), "index": i} for i in range(3)]
    pooled = PooledField(source, "m", (2, 2, 2), causal=True)
    assert len(pooled) == 3
    for i, ex in enumerate(pooled.__getitems__([0, 2])):
        src = source[[0, 2][i]]
        np.testing.assert_allclose(ex["m"], _pool_loop(src["m"] / 255.0, 2, 2, 2, True), atol=1e-6)
        assert ex["index"] == src["index"]
    with pytest.raises(KeyError, match="'mask'"):
        PooledField(source, "mask", (2, 2, 2))[0]


def test_region_weights_average_one_and_favour_the_region():
    region = np.zeros((2, 3, 4, 4), np.float32)
    region[0, :, :2, :2] = 1.0                                  # a quarter of example 0; example 1 has none
    w = np.asarray(region_weights(region, 9.0))
    assert w.shape == (2, 3, 4, 4, 1)
    np.testing.assert_allclose(w.mean(axis=(1, 2, 3, 4)), 1.0, rtol=1e-6)
    # inside / outside = 1 + weight; the region's share of the loss is (1 + 9) a / (1 + 9 a) with a = 1/4
    np.testing.assert_allclose(w[0, 0, 0, 0, 0] / w[0, 0, 3, 3, 0], 10.0, rtol=1e-6)
    np.testing.assert_allclose(w[0][region[0] > 0].sum() / w[0].sum(), 10 * 0.25 / (1 + 9 * 0.25), rtol=1e-6)
    np.testing.assert_allclose(w[1], 1.0)                        # no region: the plain loss
    np.testing.assert_allclose(np.asarray(region_weights(region, 0.0)), 1.0)


def test_sft_loss_with_weights_is_the_weighted_mean():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x0, eps = jax.random.normal(k[0], (2, 3, 4, 4, 5)), jax.random.normal(k[1], (2, 3, 4, 4, 5))
    region = (jax.random.uniform(k[2], (2, 3, 4, 4)) > 0.7).astype(jnp.float32)
    s = jnp.array([0.3, 0.8])
    v_of = lambda x, t, c: 0.5 * x + 0.01 * t[:, None, None, None, None]
    w = region_weights(region, 4.0)
    loss, m = sft_loss(v_of, x0, eps, None, None, s=s, weights=w)
    # float64 statement
    x0n, en, sn = (np.asarray(a, np.float64) for a in (x0, eps, s))
    x = (1 - sn)[:, None, None, None, None] * x0n + sn[:, None, None, None, None] * en
    err = (0.5 * x + 0.01 * 1000 * sn[:, None, None, None, None] - (en - x0n)) ** 2
    r = np.asarray(region, np.float64)[..., None]
    wn = (1 + 4 * r) / (1 + 4 * r).mean(axis=(1, 2, 3, 4), keepdims=True)
    np.testing.assert_allclose(float(loss), np.mean(wn * err), rtol=1e-5)
    np.testing.assert_allclose(float(m["sft_unweighted"]), np.mean(err), rtol=1e-5)
    plain, _ = sft_loss(v_of, x0, eps, None, None, s=s)
    np.testing.assert_allclose(float(plain), np.mean(err), rtol=1e-5)
