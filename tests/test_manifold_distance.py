"""manifold_distance: values against a float64 NumPy re-statement, gradients against finite
differences, invariances (chunk, batch, patch layout), mixed precision, memory bound and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.manifold import patches as patches_lib
from shelllcc.manifold.params import ManifoldConfig, init_params
from shelllcc.rewards import KINDS, manifold_distance, region_distances
from tests import reference_math as ref
from tests.helpers import random_manifold, rel_err

TAU = 1.7


def _target(kind):
    return TAU if kind == "shell_band" else None


def _latents(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_values_match_float64_reference(kind):
    params, _ = random_manifold(1)
    lat = _latents(0, (2, 3, 4, 5, 16))
    got = manifold_distance(params, lat, kind, _target(kind))
    want = ref.distance(ref.to_numpy(params), lat.reshape(-1, 16).astype(np.float64), kind, _target(kind))
    assert got.dtype == jnp.float32
    assert abs(float(got) - want) <= 1e-5 * abs(want) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_flat_and_video_layouts_agree(kind):
    params, _ = random_manifold(2)
    lat = _latents(1, (2, 2, 3, 4, 16))
    a = manifold_distance(params, lat, kind, _target(kind))
    b = manifold_distance(params, lat.reshape(-1, 16), kind, _target(kind))
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 2), (2, 2, 1)])
def test_patching_matches_loop_reference(patch):
    lat = _latents(3, (2, 4, 4, 6, 4))
    got = patches_lib.patchify(jnp.asarray(lat), patch)
    np.testing.assert_array_equal(np.asarray(got), ref.patchify(lat, patch))
    back = patches_lib.unpatchify(got, lat.shape[1:4], patch)
    np.testing.assert_array_equal(np.asarray(back), lat)
    params, _ = random_manifold(4, dim=16)
    want = ref.distance(ref.to_numpy(params), ref.patchify(lat, patch).reshape(-1, 16), "shell")
    got_d = manifold_distance(params, lat, "shell", patch_size=patch)
    assert abs(float(got_d) - want) <= 1e-5 * want


@functools.cache
def _chunked(kind, chunk):
    """Distance and gradient of N = 60 patches at ``chunk_size=chunk``, one compiled program per (kind, chunk)
    (the unchunked reference is computed once per kind, not once per chunk size)."""
    params, _ = random_manifold(5)
    lat = jnp.asarray(_latents(2, (1, 3, 4, 5, 16)))     # N = 60

    def f(x):
        return manifold_distance(params, x, kind, _target(kind), chunk_size=chunk)

    return jax.jit(lambda x: (f(x), jax.grad(f)(x)))(lat)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 59, 60])     # 60 chunks of 1, padded chunks, two chunks, one chunk
def test_chunk_size_invariance(kind, chunk):
    base, g_base = _chunked(kind, 10_000)
    got, g = _chunked(kind, chunk)
    np.testing.assert_allclose(got, base, rtol=2e-6)
    assert rel_err(g, g_base) < 2e-6


@pytest.mark.parametrize("kind", ["lcc", "shell_norm", "shell"])
def test_batch_size_invariance(kind):
    """Each example's distance is unchanged by what it is batched with; the batch value is their mean."""
    params, _ = random_manifold(6)
    lat = _latents(4, (5, 2, 3, 3, 16))
    per = manifold_distance(params, lat, kind, per_example=True, chunk_size=13)
    assert per.shape == (5,)
    singles = [float(manifold_distance(params, lat[i:i + 1], kind)) for i in range(5)]
    np.testing.assert_allclose(per, singles, rtol=2e-6)
    np.testing.assert_allclose(manifold_distance(params, lat[1:4], kind), np.mean(singles[1:4]), rtol=2e-6)
    np.testing.assert_allclose(manifold_distance(params, lat, kind), np.mean(singles), rtol=2e-6)


def test_per_example_shell_band():
    params, _ = random_manifold(7)
    lat = _latents(5, (3, 1, 4, 4, 16))
    per = manifold_distance(params, lat, "shell_band", TAU, per_example=True)
    norms = manifold_distance(params, lat, "shell_norm", per_example=True)
    np.testing.assert_allclose(per, np.abs(np.asarray(norms) - TAU), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lcc", "shell_norm", "shell"])
@pytest.mark.parametrize("coder", ["amortized", "analytic"])
def test_gradient_matches_finite_differences(kind, coder):
    with jax.enable_x64(True):
        params, _ = random_manifold(8, num_anchors=16)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x, params)
        lat = jnp.asarray(np.random.default_rng(6).standard_normal((1, 2, 2, 3, 16)))
        f = jax.jit(lambda x: manifold_distance(params, x, kind, coder=coder, num_neighbors=4, lam=1e-2, chunk_size=5))
        g = np.asarray(jax.jit(jax.grad(f))(lat))
        rng = np.random.default_rng(7)
        for _ in range(4):
            v = rng.standard_normal(lat.shape)
            v /= np.linalg.norm(v)
            h = 1e-6
            fd = (float(f(lat + h * v)) - float(f(lat - h * v))) / (2 * h)
            assert abs(fd - float(np.sum(g * v))) <= 1e-6 * max(1.0, abs(fd))


def test_gradient_is_finite_at_zero_residual():
    """A patch exactly on its skeleton point must give a finite gradient (norm at 0)."""
    params, _ = random_manifold(9)
    from shelllcc.manifold.coders import amortized_code
    z = jnp.asarray(_latents(8, (4, 16)))
    _, zhat = amortized_code(params, z)
    g = jax.grad(lambda x: manifold_distance(params, x, "shell"))(zhat)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_compute_close_to_float32(kind):
    """bf16 matmul operands with f32 accumulation: within 2e-2 relative of f32, gradients within 5e-2."""
    params, _ = random_manifold(10, num_anchors=64, hidden_dim=64)
    lat = jnp.asarray(_latents(9, (2, 2, 8, 8, 16)))

    def both(x):     # one compiled program for the four results
        f32 = lambda x: manifold_distance(params, x, kind, _target(kind))
        bf = lambda x, dtype: manifold_distance(params, x, kind, _target(kind), compute_dtype=dtype)
        return f32(x), bf(x, jnp.bfloat16), jax.grad(f32)(x), jax.grad(bf)(x, "bfloat16")

    f32, bf, g32, gbf = jax.jit(both)(lat)
    assert bf.dtype == jnp.float32
    assert abs(float(bf) - float(f32)) <= 2e-2 * abs(float(f32))
    assert rel_err(gbf, g32) < 5e-2


def test_chunking_bounds_memory():
    """Forward + gradient at N = 72,000, K = 1024 never holds the N x K weights (294 MB in f32)."""
    cfg = ManifoldConfig(dim=16, num_anchors=1024, hidden_dim=64)
    params = init_params(jax.random.PRNGKey(0), cfg, jnp.zeros((1024, 16)))
    lat = jax.ShapeDtypeStruct((1, 20, 60, 60, 16), jnp.float32)
    nk_bytes = 72_000 * 1024 * 4

    def temp_bytes(chunk):
        fn = jax.jit(jax.value_and_grad(lambda x: manifold_distance(params, x, "shell", chunk_size=chunk)))
        analysis = fn.lower(lat).compile().memory_analysis()
        return analysis.temp_size_in_bytes

    chunked = temp_bytes(4096)
    assert chunked < nk_bytes / 4, chunked
    # And the unchunked version does hold it: the bound is the chunking's doing.
    assert temp_bytes(72_000) > nk_bytes


def test_analytic_coder_distance_matches_reference():
    params, _ = random_manifold(11)
    z = _latents(10, (20, 16)).astype(np.float64)
    p = ref.to_numpy(params)
    anchors = p["s"] * p["A"] + p["b"]
    want = np.mean([((zi - ref.llc_code(anchors, zi, 5, 1e-3)[2]) ** 2).sum() for zi in z])
    got = manifold_distance(params, z.astype(np.float32), "lcc", coder="analytic", num_neighbors=5, lam=1e-3)
    assert abs(float(got) - want) <= 1e-4 * want


class TestBadInput:
    def test_wrong_channel_count(self, manifold=None):
        params, _ = random_manifold(0)
        with pytest.raises(ValueError, match=r"C=8 channels.*expects D=16"):
            manifold_distance(params, np.zeros((1, 2, 2, 2, 8), np.float32), "lcc")

    def test_channels_first_hint(self):
        params, _ = random_manifold(0)
        with pytest.raises(ValueError, match="channels-first"):
            manifold_distance(params, np.zeros((1, 16, 3, 4, 5), np.float32), "lcc")

    def test_flat_wrong_dim(self):
        params, _ = random_manifold(0)
        with pytest.raises(ValueError, match="D=12 per row"):
            manifold_distance(params, np.zeros((10, 12), np.float32), "lcc")

    def test_bad_rank(self):
        params, _ = random_manifold(0)
        with pytest.raises(ValueError, match=r"\[B, T, H, W, C\]"):
            manifold_distance(params, np.zeros((3, 4, 16), np.float32), "lcc")

    def test_grid_not_divisible_by_patch(self):
        params, _ = random_manifold(0, dim=16)
        with pytest.raises(ValueError, match="not divisible by patch_size"):
            manifold_distance(params, np.zeros((1, 2, 3, 4, 4), np.float32), "lcc", patch_size=(1, 2, 2))

    def test_kind_and_target(self):
        params, _ = random_manifold(0)
        lat = np.zeros((4, 16), np.float32)
        with pytest.raises(ValueError, match="unknown distance kind 'shel'"):
            manifold_distance(params, lat, "shel")
        with pytest.raises(ValueError, match="needs target"):
            manifold_distance(params, lat, "shell_band")
        with pytest.raises(ValueError, match="only used by kind='shell_band'"):
            manifold_distance(params, lat, "shell", target=1.0)


def _ref_patch_values(p, rows, kind):
    """Per-patch values of float64 rows ``[N, D]``: ||z - zhat||^2, ||delta|| or | ||delta|| - 1 |."""
    zhat = ref.skeleton(p, rows)
    if kind == "lcc":
        return ((rows - zhat) ** 2).sum(-1)
    norm = np.linalg.norm(ref.delta(p, rows, zhat)[0], axis=-1)
    return np.abs(norm - 1) if kind == "shell" else norm


@pytest.mark.parametrize("kind", KINDS)
def test_region_distances_match_a_float64_loop(kind):
    """Per clip and region: the mask-share-weighted mean of the per-patch values (float64 loop over the
    patches' blocks), the whole grid = manifold_distance per example, an empty region 0, any chunk size."""
    params, _ = random_manifold(5, dim=8)
    patch = (1, 2, 2)
    lat = _latents(6, (2, 2, 4, 6, 2))                         # 2 x 3 patches of 2 x 2 per frame, D = 8
    masks = np.zeros((4, 2, 4, 6), np.float32)
    masks[0] = 1.0                                             # the whole grid
    masks[1, 0, :2, :2] = 1.0                                  # exactly one patch
    masks[2, :, 1:3, 1:4] = 1.0                                # parts of several patches (shares 1/4, 1/2)
    got = np.asarray(region_distances(params, lat, kind, masks, _target(kind), patch_size=patch,
                                                        chunk_size=5))
    pn = ref.to_numpy(params)
    rows = ref.patchify(lat, patch).reshape(2, -1, 8).astype(np.float64)       # [B, N, D] in (t, h, w) order
    want = np.zeros((2, 4))
    for b in range(2):
        v = _ref_patch_values(pn, rows[b], kind)
        for r in range(4):
            w = np.array([masks[r, t, i:i + 2, j:j + 2].mean() for t in range(2) for i in (0, 2) for j in (0, 2, 4)])
            if w.sum() > 0:
                m = (w * v).sum() / w.sum()
                want[b, r] = abs(m - TAU) if kind == "shell_band" else m
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert got[0, 3] == got[1, 3] == 0.0
    whole = manifold_distance(params, lat, kind, _target(kind), patch_size=patch, per_example=True)
    np.testing.assert_allclose(got[:, 0], np.asarray(whole), rtol=1e-5)
    with pytest.raises(ValueError, match=r"region_masks must be \[R, T, H, W\]"):
        region_distances(params, lat, kind, masks[:, :, :2], _target(kind), patch_size=patch)
