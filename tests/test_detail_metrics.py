"""shelllcc.evaluation.detail against float64 numpy re-statements, and the properties the benchmark relies on."""

import numpy as np
import pytest

from shelllcc.evaluation import detail


def _video(seed=0, n=2, t=3, h=32, w=40):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, t, h, w, 3)).astype(np.float32)


def _luma64(v):
    v = np.asarray(v, np.float64)
    return 0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]


def _blur(v):
    # 3x3 box blur over (H, W), edge padded
    p = np.pad(v, [(0, 0)] * (v.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")
    h, w = v.shape[-3:-1]
    return sum(p[..., dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)) / 9.0


def test_laplacian_variance_matches_numpy():
    v = _video()
    y = _luma64(v)
    lap = np.zeros_like(y[..., 1:-1, 1:-1])
    for t in range(y.shape[1]):
        for n in range(y.shape[0]):
            f = y[n, t]
            lap[n, t] = f[1:-1, :-2] + f[1:-1, 2:] + f[:-2, 1:-1] + f[2:, 1:-1] - 4 * f[1:-1, 1:-1]
    want = lap.var(axis=(-2, -1)).mean(axis=-1)
    np.testing.assert_allclose(np.asarray(detail.laplacian_variance(v)), want, rtol=1e-5)


def test_high_frequency_fraction_matches_numpy():
    v = _video(1)
    y = _luma64(v)
    y = y - y.mean(axis=(-2, -1), keepdims=True)
    p = np.abs(np.fft.fft2(y)) ** 2
    h, w = y.shape[-2:]
    r = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    want = (p * (r > 0.125)).sum(axis=(-2, -1)) / p.sum(axis=(-2, -1))
    np.testing.assert_allclose(np.asarray(detail.high_frequency_fraction(v)), want.mean(axis=-1), rtol=1e-5)
    energy = (p * (r > 0.125)).sum(axis=(-2, -1)) / (h * w)
    np.testing.assert_allclose(np.asarray(detail.high_frequency_energy(v)), energy.mean(axis=-1), rtol=1e-5)
    # halving the contrast quarters the energy but leaves the fraction alone
    np.testing.assert_allclose(np.asarray(detail.high_frequency_energy(0.5 * v)), energy.mean(axis=-1) / 4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(detail.high_frequency_fraction(0.5 * v)), want.mean(axis=-1), rtol=1e-5)


def test_radial_spectrum_matches_numpy_and_parseval():
    v = _video(2)
    y = _luma64(v)
    y = y - y.mean(axis=(-2, -1), keepdims=True)
    h, w = y.shape[-2:]
    p = np.abs(np.fft.fft2(y)) ** 2 / (h * w)
    r = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    idx = np.floor(r * min(h, w)).astype(int)
    want = np.stack([[[p[n, t][idx == b].mean() for b in range(min(h, w) // 2)] for t in range(y.shape[1])]
                     for n in range(y.shape[0])]).mean(axis=1)
    np.testing.assert_allclose(np.asarray(detail.radial_power_spectrum(v)), want, rtol=1e-4)
    # white noise has a flat spectrum: every bin near the pixel variance
    flat = np.asarray(detail.radial_power_spectrum(_video(3, n=8, t=4)))[..., 1:].mean(axis=0)
    var = _luma64(_video(3, n=8, t=4)).var()
    assert np.all(np.abs(flat / var - 1) < 0.35)


def test_blur_lowers_detail_and_moves_the_spectrum():
    v = _video(4)
    b = _blur(v)
    assert np.all(np.asarray(detail.laplacian_variance(b)) < 0.2 * np.asarray(detail.laplacian_variance(v)))
    assert np.all(np.asarray(detail.high_frequency_fraction(b)) < np.asarray(detail.high_frequency_fraction(v)))
    assert float(detail.spectrum_distance(v, v)) == 0.0
    assert float(detail.spectrum_distance(b, v)) > float(detail.spectrum_distance(_video(5), v)) + 0.1
    assert float(detail.mean_abs_change(v, v)) == 0.0
    np.testing.assert_allclose(float(detail.mean_abs_change(v, b)), np.abs(v.astype(np.float64) - b).mean(), rtol=1e-5)


def test_uint8_and_bad_shapes():
    v = _video(6)
    u = (v * 255).round().astype(np.uint8)
    np.testing.assert_allclose(np.asarray(detail.laplacian_variance(u)),
                               np.asarray(detail.laplacian_variance(u.astype(np.float32) / 255)), rtol=1e-5)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        detail.laplacian_variance(v[..., :2])
    with pytest.raises(ValueError, match="different shapes"):
        detail.mean_abs_change(v, v[:1])
