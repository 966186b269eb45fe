"""Detail and spectrum metrics of videos, as pure jax functions (jit-able; numpy arrays are accepted).

Videos are ``[..., T, H, W, C]`` in any float range (uint8 is converted to [0, 1]); metrics work on the
luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (or the single channel), per frame, then average.

* :func:`laplacian_variance`: ``var(L * Y)`` with the 4-neighbour Laplacian ``L`` on the interior pixels.
* :func:`high_frequency_fraction`: ``sum_{|f| > cutoff} |F(Y - mean Y)|^2 / sum_f |F(Y - mean Y)|^2``, ``|f|`` the
  radial frequency in cycles/pixel (Nyquist 0.5), ``cutoff = fraction * 0.5`` (default 1/4 of Nyquist).
* :func:`high_frequency_energy`: ``sum_{|f| > cutoff} |F(Y - mean Y)|^2 / (H W)``, the mean squared amplitude
  of the luma's content above the cutoff (the fraction's numerator, per pixel); the benchmark's "high-frequency
  energy ratio" is its mean over a model's clips divided by the base's.
* :func:`radial_power_spectrum`: ``P(r) = mean_{|f| in bin r} |F(Y - mean Y)|^2 / (H W)``, bins of width
  ``1 / min(H, W)`` from 0 to Nyquist.
* :func:`spectrum_distance`: ``mean_r |log10 P_a(r) - log10 P_b(r)|`` between two sets' mean spectra.
* :func:`mean_abs_change`: ``mean |a - b|`` (content change).
"""

from __future__ import annotations

import jax.numpy as jnp

_LUMA = (0.299, 0.587, 0.114)


def luma(video) -> jnp.ndarray:
    """``[..., T, H, W, C]`` (C = 1 or 3) -> ``[..., T, H, W]`` float32; uint8 is scaled to [0, 1]."""
    v = jnp.asarray(video)
    if v.ndim < 4 or v.shape[-1] not in (1, 3):
        raise ValueError(f"video must be [..., T, H, W, C] with C = 1 or 3, got shape {v.shape}")
    if v.dtype == jnp.uint8:
        v = v.astype(jnp.float32) / 255.0
    v = v.astype(jnp.float32)
    if v.shape[-1] == 1:
        return v[..., 0]
    return v[..., 0] * _LUMA[0] + v[..., 1] * _LUMA[1] + v[..., 2] * _LUMA[2]


def laplacian_variance(video) -> jnp.ndarray:
    """Mean over frames of ``var(4-neighbour Laplacian of Y)`` on interior pixels; ``[...]``."""
    y = luma(video)
    lap = (y[..., 1:-1, :-2] + y[..., 1:-1, 2:] + y[..., :-2, 1:-1] + y[..., 2:, 1:-1]
           - 4.0 * y[..., 1:-1, 1:-1])
    return jnp.mean(jnp.var(lap, axis=(-2, -1)), axis=-1)


def _power(y) -> jnp.ndarray:
    y = y - jnp.mean(y, axis=(-2, -1), keepdims=True)
    return jnp.abs(jnp.fft.fft2(y)) ** 2


def _radius(h: int, w: int) -> jnp.ndarray:
    fy, fx = jnp.fft.fftfreq(h), jnp.fft.fftfreq(w)
    return jnp.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def high_frequency_fraction(video, fraction: float = 0.25) -> jnp.ndarray:
    """Mean over frames of the share of spectral energy above ``fraction`` x Nyquist; ``[...]``."""
    y = luma(video)
    p = _power(y)
    high = _radius(*y.shape[-2:]) > fraction * 0.5
    frac = jnp.sum(jnp.where(high, p, 0.0), axis=(-2, -1)) / jnp.maximum(jnp.sum(p, axis=(-2, -1)), 1e-20)
    return jnp.mean(frac, axis=-1)


def high_frequency_energy(video, fraction: float = 0.25) -> jnp.ndarray:
    """Mean over frames of the spectral energy above ``fraction`` x Nyquist, per pixel; ``[...]``."""
    y = luma(video)
    h, w = y.shape[-2:]
    high = _radius(h, w) > fraction * 0.5
    return jnp.mean(jnp.sum(jnp.where(high, _power(y), 0.0), axis=(-2, -1)) / (h * w), axis=-1)


def radial_power_spectrum(video) -> jnp.ndarray:
    """Radially averaged power spectrum per video, averaged over frames: ``[..., R]``, ``R = min(H, W) // 2``."""
    y = luma(video)
    h, w = y.shape[-2:]
    n_bins = min(h, w) // 2
    r = _radius(h, w)
    idx = jnp.floor(r * min(h, w)).astype(jnp.int32)         # bin width 1 / min(H, W)
    p = _power(y) / (h * w)
    onehot = (idx[..., None] == jnp.arange(n_bins)).astype(jnp.float32)   # [H, W, R]; corners beyond Nyquist drop
    counts = jnp.maximum(onehot.sum(axis=(0, 1)), 1.0)
    spec = jnp.einsum("...hw,hwr->...r", p, onehot) / counts
    return jnp.mean(spec, axis=-2)


def spectrum_distance(videos_a, videos_b, eps: float = 1e-12) -> jnp.ndarray:
    """``mean_r |log10 Pa(r) - log10 Pb(r)|`` of the two sets' mean radial spectra (``[N, T, H, W, C]`` each)."""
    pa = jnp.mean(radial_power_spectrum(videos_a), axis=0)
    pb = jnp.mean(radial_power_spectrum(videos_b), axis=0)
    return jnp.mean(jnp.abs(jnp.log10(pa + eps) - jnp.log10(pb + eps)))


def mean_abs_change(a, b) -> jnp.ndarray:
    """``mean |a - b|`` over every element, on the [0, 1] scale for uint8 inputs."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos to compare have different shapes {a.shape} and {b.shape}")
    if a.dtype == jnp.uint8:
        a = a.astype(jnp.float32) / 255.0
    if b.dtype == jnp.uint8:
        b = b.astype(jnp.float32) / 255.0
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


__all__ = ["luma", "laplacian_variance", "high_frequency_fraction", "high_frequency_energy", "radial_power_spectrum",
           "spectrum_distance", "mean_abs_change"]
