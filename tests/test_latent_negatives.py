"""The five latent perturbations of GT-SVJ's negatives (shelllcc.data.latent_negatives): each checked by what it
must do to a clip of distinct random frames, not by restating its code."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.data import latent_negatives as ln

T, H, W, C = 8, 6, 5, 3
NAMES = tuple(ln.PERTURBATIONS)


def _clip(seed=0, shape=(T, H, W, C), dtype=np.float32):
    # Gaussian frames: all distinct, and every element differs from every other (almost surely)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _frames(x) -> list:
    """The multiset of a clip's frames, as sorted byte strings."""
    return sorted(f.tobytes() for f in np.asarray(x))


def _n(strength, n, least=1):
    # n(strength, N) of the module docstring, written out again
    return 0 if strength == 0 else min(n, max(least, int(math.floor(strength * n + 0.5))))


def _changed_frames(x, y) -> np.ndarray:
    return np.flatnonzero(np.any(np.asarray(x) != np.asarray(y), axis=(1, 2, 3)))


def _is_range(idx, length) -> bool:
    return len(idx) == length and (length == 0 or idx[-1] - idx[0] == length - 1)


@pytest.mark.parametrize("strength,moved", [(0.1, 2), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_frame_shuffle_permutes_a_subset(strength, moved):
    x = _clip()
    for seed in range(3):
        y = ln.frame_shuffle(jax.random.PRNGKey(seed), x, strength)
        assert _frames(y) == _frames(x)                        # a permutation of the frames
        assert len(_changed_frames(x, y)) == moved            # exactly the selected frames moved, the rest in place


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_frame_drop_repeats_the_previous_frame(strength):
    x = _clip(1)
    xs, inputs = np.asarray(x), set(_frames(x))
    for seed in range(3):
        y = np.asarray(ln.frame_drop(jax.random.PRNGKey(seed), x, strength))
        assert np.array_equal(y[0], xs[0])
        for i in range(1, T):
            assert np.array_equal(y[i], xs[i]) or np.array_equal(y[i], y[i - 1]), i
        assert set(_frames(y)) <= inputs
        assert len(_changed_frames(x, y)) == _n(strength, T - 1)
    # strength 1: every frame after the first dropped, the clip stalls on frame 0
    if strength == 1.0:
        assert np.array_equal(y, np.broadcast_to(xs[:1], xs.shape))


@pytest.mark.parametrize("strength", [0.25, 0.5])
def test_noisy_segment_noises_one_frame_range(strength):
    t, std = 16, 0.5
    x = _clip(2, (t, 16, 16, 8))
    for seed in range(2):
        y = ln.noisy_segment(jax.random.PRNGKey(seed), x, strength, noise_std=std)
        changed = _changed_frames(x, y)
        assert _is_range(changed, _n(strength, t)), changed
        outside = np.setdiff1d(np.arange(t), changed)
        assert np.array_equal(np.asarray(y)[outside], np.asarray(x)[outside])
        d = (np.asarray(y, np.float64) - np.asarray(x, np.float64))[changed]
        assert abs(d.std() / std - 1) < 0.03 and abs(d.mean()) < 0.03 * std     # >= 8k samples: ~0.8% sd


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_patch_swap_exchanges_one_region_between_two_segments(strength):
    x = _clip(3)
    xs = np.asarray(x)
    length, ph, pw = _n(strength, T // 2), _n(strength, H), _n(strength, W)
    for seed in range(4):
        y = np.asarray(ln.patch_swap(jax.random.PRNGKey(seed), x, strength))
        diff = np.any(y != xs, axis=-1)                                           # [T, H, W]
        frames, rows, cols = (np.flatnonzero(np.any(diff, axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
        assert _is_range(rows, ph) and _is_range(cols, pw)
        # the change is exactly a box: (two segments) x rows x cols, nothing outside it
        box = np.zeros_like(diff)
        box[np.ix_(frames, rows, cols)] = True
        assert np.array_equal(diff, box)
        seg_a, seg_b = frames[:length], frames[length:]
        assert _is_range(seg_a, length) and _is_range(seg_b, length)
        region = np.ix_(rows, cols)
        for i, j in zip(seg_a, seg_b):
            assert np.array_equal(y[i][region], xs[j][region]) and np.array_equal(y[j][region], xs[i][region])


@pytest.mark.parametrize("strength", [0.2, 0.5, 1.0])
def test_temporal_slice_swap_is_an_involution_keeping_the_frames(strength):
    x = _clip(4)
    length = _n(strength, T // 2)
    for seed in range(4):
        key = jax.random.PRNGKey(seed)
        y = ln.temporal_slice_swap(key, x, strength)
        assert _frames(y) == _frames(x)
        changed = _changed_frames(x, y)
        seg_a, seg_b = changed[:length], changed[length:]
        assert _is_range(seg_a, length) and _is_range(seg_b, length)
        assert np.array_equal(np.asarray(y)[seg_a], np.asarray(x)[seg_b])
        assert np.array_equal(np.asarray(ln.temporal_slice_swap(key, y, strength)), np.asarray(x))


def test_strength_zero_is_the_identity_and_any_positive_strength_perturbs():
    x = _clip(5)
    for name in NAMES:
        for seed in range(2):
            key = jax.random.PRNGKey(seed)
            assert np.array_equal(np.asarray(ln.perturb(key, x, name, 0.0)), np.asarray(x)), name
            assert len(_changed_frames(x, ln.perturb(key, x, name, 0.01))) > 0, name


def test_deterministic_under_a_key_and_varies_with_it():
    x = _clip(6)
    for name in NAMES:
        a, b = (ln.perturb(jax.random.PRNGKey(7), x, name, 0.5) for _ in range(2))
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
        others = [np.asarray(ln.perturb(jax.random.PRNGKey(k), x, name, 0.5)) for k in range(8, 12)]
        assert any(not np.array_equal(o, np.asarray(a)) for o in others), name


def test_jit_float32_and_bfloat16():
    """Under jit: the eager result in float32 (exactly but for the noise's rounding); in bfloat16 the same frames
    move (the moves are exact), and the noisy segment matches the float32 one to bfloat16 precision."""
    x32 = _clip(8)
    x16 = x32.astype(jnp.bfloat16)
    key = jax.random.PRNGKey(3)
    for name, fn in ln.PERTURBATIONS.items():
        jitted = jax.jit(fn, static_argnums=2)
        y32, y16 = jitted(key, x32, 0.5), jitted(key, x16, 0.5)
        assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16 and y16.shape == x16.shape
        # the normal draw may round differently once fused: the noise to float32 precision, the moves exactly
        np.testing.assert_allclose(np.asarray(y32), np.asarray(fn(key, x32, 0.5)), rtol=1e-5, atol=1e-6)
        y32_as16 = np.asarray(y32.astype(jnp.bfloat16), np.float32)
        if name == "noisy_segment":
            np.testing.assert_allclose(np.asarray(y16, np.float32), y32_as16, rtol=2e-2, atol=2e-2)
            unchanged = np.setdiff1d(np.arange(T), _changed_frames(x32, y32))
            assert np.array_equal(np.asarray(y16)[unchanged], np.asarray(x16)[unchanged])
        else:
            np.testing.assert_array_equal(np.asarray(y32), np.asarray(fn(key, x32, 0.5)))
            np.testing.assert_array_equal(np.asarray(y16, np.float32), y32_as16)


def test_random_negatives_picks_one_perturbation_per_clip():
    x = jnp.stack([_clip(10 + i) for i in range(12)])
    names = ("frame_shuffle", "noisy_segment")
    fn = jax.jit(partial(ln.random_negatives, strength=0.5, names=names))
    y, which = fn(jax.random.PRNGKey(0), x)
    assert y.shape == x.shape and y.dtype == x.dtype and which.shape == (12,)
    assert set(np.asarray(which).tolist()) == {0, 1}                   # both used on 12 clips (fixed key)
    for b in range(12):
        if which[b] == 0:        # a shuffle: the same frames, 4 of them moved
            assert _frames(y[b]) == _frames(x[b]) and len(_changed_frames(x[b], y[b])) == 4
        else:                    # a noisy segment: 4 contiguous frames replaced by new ones
            assert _is_range(_changed_frames(x[b], y[b]), 4) and not set(_frames(y[b])) <= set(_frames(x[b]))
    # every name, a typed key, strength 0: the batch unchanged
    y0, _ = ln.random_negatives(jax.random.key(1), x, 0.0)
    assert np.array_equal(np.asarray(y0), np.asarray(x))


def test_bad_inputs_name_the_argument():
    x, key = _clip(), jax.random.PRNGKey(0)
    for name in NAMES:
        with pytest.raises(ValueError, match="latents must be one clip"):
            ln.perturb(key, x[0], name, 0.5)
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
                ln.perturb(key, x, name, bad)
        with pytest.raises(ValueError, match="strength must be a Python float"):
            ln.perturb(key, x, name, jnp.asarray(0.5))
    with pytest.raises(ValueError, match="unknown perturbation name 'reverse'"):
        ln.perturb(key, x, "reverse", 0.5)
    for name in ("patch_swap", "temporal_slice_swap"):
        with pytest.raises(ValueError, match="latents need at least 2 frames"):
            ln.perturb(key, x[:1], name, 0.5)
    with pytest.raises(ValueError, match="latents must be a batch of clips"):
        ln.random_negatives(key, x, 0.5)
    with pytest.raises(ValueError, match="names must be a non-empty sequence"):
        ln.random_negatives(key, x[None], 0.5, names="frame_drop")
    with pytest.raises(ValueError, match="noise_std"):
        ln.noisy_segment(key, x, 0.5, noise_std=-1.0)
