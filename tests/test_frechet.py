"""shelllcc.evaluation.frechet against independent float64 references and its defining properties."""

import numpy as np
import pytest

from shelllcc.evaluation import frechet


def _random_spd(rng, f, rank=None, scale=1.0):
    g = rng.standard_normal((f, rank or f))
    return scale * g @ g.T / (rank or f) + (0.0 if rank else 1e-3) * np.eye(f)


def _sqrtm_denman_beavers(a, iters=60):
    # Denman-Beavers iteration Y <- (Y + Z^-1)/2, Z <- (Z + Y^-1)/2, Y -> A^{1/2}; valid for the
    # non-symmetric S1 S2 since its eigenvalues are real and positive (it is similar to an SPD matrix).
    y, z = a.copy(), np.eye(a.shape[0])
    for _ in range(iters):
        y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
    return y


def _reference_dm(mu1, s1, mu2, s2):
    # The textbook definition with an explicit square root of the non-symmetric product.
    root = _sqrtm_denman_beavers(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, rtol=1e-9, atol=1e-9)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def _reference_eig(mu1, s1, mu2, s2):
    # Tr((S1 S2)^{1/2}) from the eigenvalues of the non-symmetric product (works when singular too).
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.max(np.abs(lam.imag)) < 1e-8 * max(1.0, np.max(np.abs(lam)))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam.real, 0, None))))


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 7), rng.uniform(0.1, 3.0, 7)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so (S1 S2)^{1/2} = Q diag(sqrt(a b)) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    a, b = rng.uniform(0.05, 4.0, 9), rng.uniform(0.05, 4.0, 9)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = rng.standard_normal(9)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("f", [2, 5, 16])
def test_general_spd_matches_references(f):
    rng = np.random.default_rng(f)
    s1, s2 = _random_spd(rng, f), _random_spd(rng, f, scale=2.5)
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    got = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_reference_dm(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(_reference_eig(mu1, s1, mu2, s2), rel=1e-9)


def test_rank_deficient_covariances():
    # Fewer samples than dimensions (the usual case for small evaluation sets) gives singular S.
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 12, rank=5), _random_spd(rng, 12, rank=7)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    got = frechet.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_reference_eig(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)
    assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_identical_zero_symmetric_and_shift():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    y = rng.standard_normal((40, 6)) * 1.7 + 0.3
    assert frechet.frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    dxy = frechet.frechet_distance_from_features(x, y)
    assert dxy > 0
    assert frechet.frechet_distance_from_features(y, x) == pytest.approx(dxy, rel=1e-10)
    # Translating one set by d leaves both covariances alone and adds ||d||^2 when the means agreed.
    d = rng.standard_normal(6)
    x0 = x - x.mean(axis=0)
    assert frechet.frechet_distance_from_features(x0, x0 + d) == pytest.approx(d @ d, rel=1e-10)


def test_gaussian_stats_match_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    mu, sigma = frechet.gaussian_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_large_samples_approach_population_distance():
    # Samples of two Gaussians: the plug-in estimate converges to the population value.
    rng = np.random.default_rng(6)
    s1, s2 = _random_spd(rng, 3), _random_spd(rng, 3, scale=0.5)
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 0.25])
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet.frechet_distance_from_features(a, b) == pytest.approx(
        _reference_eig(mu1, s1, mu2, s2), rel=0.02)


def test_shape_errors():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet.frechet_distance_from_features(rng.standard_normal((5, 3)), rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet.gaussian_stats(rng.standard_normal((1, 3)))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        frechet.gaussian_stats(rng.standard_normal(5))
    with pytest.raises(ValueError, match="covariance must be"):
        frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet.gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))
