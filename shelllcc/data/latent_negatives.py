"""Negatives for an energy-based video judge: real latent clips made temporally or spatially wrong.

GT-SVJ (``../shared/ALIGNMENT_METHODS.md`` section 2) trains its judge with real clips as positives and,
as negatives, generated clips or real latents perturbed in one of five ways: frame shuffle, frame drop,
noisy segment, patch swap, temporal slice swap. Only those five names and their one-line descriptions
come from the source (a note; no code is reachable): how much each perturbs, how the places are drawn,
and the ``strength`` parametrisation are ours.

Each perturbation is a pure function ``(key, latents, strength) -> latents'`` of ONE latent clip
``[T, H, W, C]`` (channels last, as everywhere in the project), same shape and dtype, jit-able with
``strength`` static (a Python float in [0, 1]: the sizes it sets are array shapes). ``strength = 0`` returns
``latents`` unchanged (as a jax array). Sizes are counts ``n(strength, N)`` of frames or rows out of ``N``::

    n(strength, N) = 0                                               strength = 0
                   = clip(floor(strength N + 1/2), m, N)             strength > 0   (m: the least that perturbs)

so any positive strength perturbs something (ours). Frames are moved whole, by gathers or slice updates,
so everything a perturbation does not touch is bit-identical to the input, in any dtype.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

Perturbation = Callable[[jax.Array, jax.Array, float], jax.Array]

NOISE_STD = 1.0     # ours: the project's latents are normalised per channel (VAE latents_mean/std) to about unit std


def _check(latents, strength, fn: str):
    latents = jnp.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"{fn}: latents must be one clip [T, H, W, C], got shape {jnp.shape(latents)}")
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
        # a traced strength cannot set the static sizes below
        raise ValueError(f"{fn}: strength must be a Python float in [0, 1], got {type(strength).__name__}")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"{fn}: strength must be in [0, 1], got {strength}")
    return latents, strength


def _count(strength: float, n: int, least: int = 1) -> int:
    """``n(strength, N)`` of the module docstring (``least`` capped at ``n``)."""
    if strength == 0.0:
        return 0
    return min(n, max(least, math.floor(strength * n + 0.5)))


def _two_ranges(key, t: int, length: int):
    """Starts ``a < b`` of two disjoint frame ranges ``[a, a + L)``, ``[b, b + L)`` inside ``[0, T)``.

    With ``F = T - 2L`` free frames: ``u1 <= u2`` the sorted pair of two uniform draws from ``{0..F}``,
    ``a = u1``, ``b = u2 + L`` (ours; every disjoint placement has positive probability)."""
    u = jnp.sort(jax.random.randint(key, (2,), 0, t - 2 * length + 1))
    return u[0], u[1] + length


def _need_two_frames(latents, fn: str):
    if latents.shape[0] < 2:
        raise ValueError(f"{fn}: latents need at least 2 frames for two disjoint frame ranges, got T={latents.shape[0]}")


def frame_shuffle(key, latents, strength: float):
    """Permute a random subset of frames; the others stay in place::

        k       = n(strength, T), at least 2              (frames moved)
        i_1..k  = k distinct frames in random order       (the first k of a random permutation of 0..T-1)
        out[i_j] = x[i_{j+1 mod k}],   out[i] = x[i] elsewhere

    The subset is cycled (a uniformly random k-cycle, ours) rather than permuted at random, so every selected
    frame leaves its place: a random permutation could leave some or all of them where they were.
    """
    latents, strength = _check(latents, strength, "frame_shuffle")
    t = latents.shape[0]
    k = _count(strength, t, least=2)
    if k < 2:
        return latents
    sel = jax.random.permutation(key, t)[:k]
    src = jnp.arange(t).at[sel].set(jnp.roll(sel, -1))
    return latents[src]


def frame_drop(key, latents, strength: float):
    """Replace frames by a repeat of the previous frame (a dropped frame, the clip stalls)::

        D       = n(strength, T - 1) random frames among 1..T-1 (frame 0 has no previous frame)
        src[i]  = max{ j <= i : j not in D }               (the last kept frame)
        out[i]  = x[src[i]]

    Consecutive dropped frames give a longer freeze: each dropped frame repeats the *output's* previous frame.
    At strength 1 the clip is its first frame, T times.
    """
    latents, strength = _check(latents, strength, "frame_drop")
    t = latents.shape[0]
    n = _count(strength, t - 1)
    if n == 0:
        return latents
    dropped = 1 + jax.random.permutation(key, t - 1)[:n]
    kept_index = jnp.arange(t).at[dropped].set(0)      # 0 is never dropped, so it marks "repeat"
    return latents[jax.lax.cummax(kept_index)]


def noisy_segment(key, latents, strength: float, noise_std: float = NOISE_STD):
    """Add Gaussian noise over a contiguous frame range::

        L       = n(strength, T)                           (frames noised)
        a       ~ U{0..T-L}
        out[i]  = x[i] + noise_std * N(0, I)               i in [a, a + L)   (drawn and added in float32)
        out[i]  = x[i]                                     elsewhere (bit-identical)

    ``noise_std`` (ours: 1, the latents' own scale) is not scaled by ``strength``; bind it with
    ``functools.partial`` for another level.
    """
    latents, strength = _check(latents, strength, "noisy_segment")
    if not noise_std >= 0:
        raise ValueError(f"noisy_segment: noise_std must be >= 0, got {noise_std}")
    t = latents.shape[0]
    length = _count(strength, t)
    if length == 0:
        return latents
    k_start, k_noise = jax.random.split(key)
    a = jax.random.randint(k_start, (), 0, t - length + 1)
    frames = jnp.arange(t)
    inside = ((frames >= a) & (frames < a + length))[:, None, None, None]
    noise = noise_std * jax.random.normal(k_noise, latents.shape, jnp.float32)
    noised = (latents.astype(jnp.float32) + noise).astype(latents.dtype)
    return jnp.where(inside, noised, latents)


def patch_swap(key, latents, strength: float):
    """Swap a spatial region between two disjoint time segments of equal length::

        L        = n(strength, T // 2),  ph = n(strength, H),  pw = n(strength, W)
        a < b    : two disjoint frame ranges [a, a+L), [b, b+L)   (see _two_ranges)
        h0 ~ U{0..H-ph},  w0 ~ U{0..W-pw}
        R(s)     = [s:s+L, h0:h0+ph, w0:w0+pw, :]
        out[R(a)] = x[R(b)],  out[R(b)] = x[R(a)],  out = x elsewhere

    At strength 1 the region is the whole frame and it is a swap of the two halves' frames (T even).
    """
    latents, strength = _check(latents, strength, "patch_swap")
    if strength == 0.0:
        return latents
    _need_two_frames(latents, "patch_swap")
    t, h, w, c = latents.shape
    length, ph, pw = _count(strength, t // 2), _count(strength, h), _count(strength, w)
    k_t, k_h, k_w = jax.random.split(key, 3)
    a, b = _two_ranges(k_t, t, length)
    h0 = jax.random.randint(k_h, (), 0, h - ph + 1)
    w0 = jax.random.randint(k_w, (), 0, w - pw + 1)
    zero = jnp.zeros((), a.dtype)
    size = (length, ph, pw, c)
    region_a = jax.lax.dynamic_slice(latents, (a, h0, w0, zero), size)
    region_b = jax.lax.dynamic_slice(latents, (b, h0, w0, zero), size)
    out = jax.lax.dynamic_update_slice(latents, region_b, (a, h0, w0, zero))
    return jax.lax.dynamic_update_slice(out, region_a, (b, h0, w0, zero))


def temporal_slice_swap(key, latents, strength: float):
    """Swap two disjoint frame ranges of equal length::

        L      = n(strength, T // 2)
        a < b  : two disjoint frame ranges [a, a+L), [b, b+L)   (see _two_ranges)
        out[a + j] = x[b + j],  out[b + j] = x[a + j]   (0 <= j < L),   out = x elsewhere

    The ranges depend on the key and the shape only, so with the same key it is an involution.
    """
    latents, strength = _check(latents, strength, "temporal_slice_swap")
    if strength == 0.0:
        return latents
    _need_two_frames(latents, "temporal_slice_swap")
    t = latents.shape[0]
    length = _count(strength, t // 2)
    a, b = _two_ranges(key, t, length)
    j = jnp.arange(length)
    src = jnp.arange(t).at[a + j].set(b + j).at[b + j].set(a + j)
    return latents[src]


PERTURBATIONS: dict[str, Perturbation] = {
    "frame_shuffle": frame_shuffle,
    "frame_drop": frame_drop,
    "noisy_segment": noisy_segment,
    "patch_swap": patch_swap,
    "temporal_slice_swap": temporal_slice_swap,
}


def _lookup(name: str) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation name {name!r}; known: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def perturb(key, latents, name: str, strength: float):
    """``PERTURBATIONS[name](key, latents, strength)`` for one clip ``[T, H, W, C]``."""
    return _lookup(name)(key, latents, strength)


def random_negatives(key, latents, strength: float, names=tuple(PERTURBATIONS)):
    """One perturbation per clip of a batch ``latents [B, T, H, W, C]``, chosen uniformly among ``names``.

    ::

        k_choice, k_1..k_B = split(key)
        which_b  ~ U{0..len(names)-1}                      (independent per clip, from k_choice)
        out_b    = PERTURBATIONS[names[which_b]](k_b, x_b, strength)

    Under ``vmap`` the ``lax.switch`` over the perturbations becomes a select: every perturbation is computed
    for every clip and the chosen one kept (cheap next to a judge's forward pass; keeps the shapes static).
    Returns ``(negatives [B, T, H, W, C], which [B] int32)``, ``which`` indexing ``names``. Mixing with
    generated negatives (GT-SVJ: with probability 0.3) is the caller's.
    """
    latents = jnp.asarray(latents)
    if latents.ndim != 5:
        raise ValueError(f"random_negatives: latents must be a batch of clips [B, T, H, W, C], got shape "
                         f"{jnp.shape(latents)}")
    if isinstance(names, str) or len(names) == 0:
        raise ValueError(f"random_negatives: names must be a non-empty sequence of perturbation names, got {names!r}")
    # lax.switch traces every branch here, so each one's checks (strength, frame count) run at once
    fns = [partial(_lookup(name), strength=strength) for name in names]
    b = latents.shape[0]
    k_choice, k_each = jax.random.split(key)
    which = jax.random.randint(k_choice, (b,), 0, len(fns))
    keys = jax.random.split(k_each, b)
    negatives = jax.vmap(lambda i, k, x: jax.lax.switch(i, fns, k, x))(which, keys, latents)
    return negatives, which


__all__ = ["NOISE_STD", "PERTURBATIONS", "frame_drop", "frame_shuffle", "noisy_segment", "patch_swap", "perturb",
           "random_negatives", "temporal_slice_swap"]
