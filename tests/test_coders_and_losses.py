"""Coders, anchor initialisation and fitting losses against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.manifold import coders
from shelllcc.manifold import init as init_lib
from shelllcc.manifold.losses import Stage1Weights, stage1_loss, stage2_loss
from tests import reference_math as ref
from tests.helpers import random_manifold, rel_err


def test_eval_coder_and_skeleton_match_reference():
    params, _ = random_manifold(0)
    z = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    w, zhat = coders.amortized_code(params, jnp.asarray(z))
    p = ref.to_numpy(params)
    assert rel_err(w, ref.coder_weights(p, z.astype(np.float64))) < 1e-5
    assert rel_err(zhat, ref.skeleton(p, z.astype(np.float64))) < 1e-5
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def test_squared_distances_clamped_and_exact():
    rng = np.random.default_rng(1)
    z, a = rng.standard_normal((30, 16)), rng.standard_normal((20, 16))
    a[3] = z[5]                                           # an exact hit must give 0, not a small negative
    d2 = np.asarray(coders.squared_distances(jnp.asarray(z, jnp.float32), jnp.asarray(a, jnp.float32)))
    want = ((z[:, None] - a[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d2, want, rtol=1e-4, atol=1e-4)
    assert d2.min() >= 0.0


@pytest.mark.parametrize("k,lam", [(1, 1e-3), (3, 1e-4), (5, 1e-2), (8, 1.0)])
def test_analytic_coder_matches_numpy_least_squares(k, lam):
    rng = np.random.default_rng(k)
    anchors = rng.standard_normal((40, 16))
    z = rng.standard_normal((25, 16))
    with jax.enable_x64(True):
        idx, c, zhat = coders.analytic_code(jnp.asarray(anchors), jnp.asarray(z), num_neighbors=k, lam=lam)
        idx, c, zhat = map(np.asarray, (idx, c, zhat))
    for n in range(len(z)):
        r_idx, r_c, r_zhat = ref.llc_code(anchors, z[n], k, lam)
        np.testing.assert_array_equal(np.sort(idx[n]), np.sort(r_idx))
        order = np.argsort(idx[n])
        np.testing.assert_allclose(c[n][order], r_c[np.argsort(r_idx)], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(zhat[n], r_zhat, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-12)


def test_analytic_coder_reconstructs_points_in_anchor_hull():
    """A convex combination of its k nearest anchors is reproduced (up to the ridge's pull)."""
    rng = np.random.default_rng(3)
    anchors = rng.standard_normal((10, 16)).astype(np.float32)
    z = 0.6 * anchors[2] + 0.4 * anchors[7]
    _, c, zhat = coders.analytic_code(jnp.asarray(anchors), jnp.asarray(z[None]), num_neighbors=2, lam=1e-6)
    np.testing.assert_allclose(np.asarray(zhat[0]), z, atol=1e-4)


def test_analytic_coder_rejects_bad_k():
    with pytest.raises(ValueError, match="num_neighbors=11"):
        coders.analytic_code(jnp.zeros((10, 4)), jnp.zeros((2, 4)), num_neighbors=11)


def test_stage1_loss_terms_match_reference():
    params, _ = random_manifold(4)
    z = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    loss, (metrics, (bmean, bvar)) = stage1_loss(params, jnp.asarray(z), Stage1Weights(0.3, 0.2, 0.1))
    want = ref.stage1_terms(ref.to_numpy(params), z.astype(np.float64))
    for key, value in want.items():
        assert abs(float(metrics[key]) - value) <= 2e-5 * abs(value) + 1e-6, key
    total = want["rec"] + 0.3 * want["locality"] + 0.2 * want["usage_kl"] + 0.1 * want["basis_to_patch"]
    assert abs(float(loss) - total) <= 2e-5 * total
    h = z.astype(np.float64) @ ref.to_numpy(params)["w0"] + ref.to_numpy(params)["b0"]
    np.testing.assert_allclose(bmean, h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bvar, h.var(0, ddof=1), rtol=1e-4)   # running stats take the unbiased variance


def test_stage2_loss_matches_reference_and_ignores_stage1_params():
    params, _ = random_manifold(5)
    z = jnp.asarray(np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32))
    loss, _ = stage2_loss(params, z, logvar_weight=0.01)
    want = ref.stage2_loss(ref.to_numpy(params), np.asarray(z, np.float64))
    assert abs(float(loss) - want) <= 1e-5 * want
    parts = dict(anchors=params.anchors, coder=params.coder, scale=params.scale, shift=params.shift,
                 shell=params.shell)
    grads = jax.grad(lambda t: stage2_loss(params.replace(**t), z)[0])(parts)
    for leaf in jax.tree.leaves({k: v for k, v in grads.items() if k != "shell"}):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert float(jnp.abs(grads["shell"].w1).max()) > 0.0


def test_update_batchnorm_is_pytorch_momentum_rule():
    params, _ = random_manifold(6)
    m, v = jnp.ones(24), 3 * jnp.ones(24)
    new = coders.update_batchnorm(params.bn, (m, v), momentum=0.1)
    np.testing.assert_allclose(new.mean, 0.9 * np.asarray(params.bn.mean) + 0.1, rtol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 * np.asarray(params.bn.var) + 0.3, rtol=1e-6)
    assert int(new.count) == int(params.bn.count) + 1


def test_random_and_kmeanspp_anchors_are_distinct_data_rows():
    x = np.random.default_rng(7).standard_normal((500, 8)).astype(np.float32)
    for method in ("random", "kmeans++"):
        a = np.asarray(init_lib.init_anchors(jax.random.PRNGKey(0), x, 20, method))
        rows = {tuple(r) for r in x}
        assert all(tuple(r) in rows for r in a), method
        assert len({tuple(r) for r in a}) == 20, method


def test_kmeans_improves_inertia_and_finds_separated_clusters():
    rng = np.random.default_rng(8)
    centers = rng.standard_normal((6, 8)) * 10
    x = (centers[rng.integers(0, 6, 3000)] + rng.standard_normal((3000, 8)) * 0.3).astype(np.float32)

    def inertia(a):
        return float(np.mean(np.asarray(init_lib.nearest_anchor(jnp.asarray(x), jnp.asarray(a))[1])))

    rand = init_lib.init_anchors(jax.random.PRNGKey(1), x, 6, "random")
    km = init_lib.init_anchors(jax.random.PRNGKey(1), x, 6, "kmeans", kmeans_iters=20)
    assert inertia(km) <= inertia(rand)
    # Each true center has a k-means center within a few noise standard deviations.
    d = np.sqrt(((centers[:, None] - np.asarray(km)[None]) ** 2).sum(-1)).min(1)
    assert d.max() < 0.5
    # Chunked assignment equals the brute-force one.
    idx, _ = init_lib.nearest_anchor(jnp.asarray(x), km, chunk_size=128)
    brute = ((x[:, None] - np.asarray(km)[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(np.asarray(idx), brute)


def test_init_rejects_too_few_patches():
    with pytest.raises(ValueError, match="need at least 20 patches"):
        init_lib.init_anchors(jax.random.PRNGKey(0), np.zeros((10, 4), np.float32), 20, "random")
    with pytest.raises(ValueError, match="unknown anchor init 'pca'"):
        init_lib.init_anchors(jax.random.PRNGKey(0), np.zeros((30, 4), np.float32), 20, "pca")
