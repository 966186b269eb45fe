"""Fréchet distance between Gaussian fits of two feature sets (as in FID / FVD), in float64 numpy.

For feature sets ``A`` and ``B`` with means ``mu_a, mu_b`` and covariances ``S_a, S_b``:

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

the squared 2-Wasserstein distance between ``N(mu_a, S_a)`` and ``N(mu_b, S_b)``. ``S_a S_b`` is not
symmetric, so its square root is computed through the similar symmetric matrix
``S_a^{1/2} S_b S_a^{1/2}``: both have the same eigenvalues, hence
``Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) = sum_i sqrt(lambda_i)``, and everything
reduces to ``numpy.linalg.eigh`` of symmetric PSD matrices (no scipy, no complex round-off; tiny
negative eigenvalues from rounding are clipped to 0).

In this project the features come from :func:`shelllcc.evaluation.classifier.features`.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [F], sigma [F, F])`` of ``features [N, F]`` in float64, with the unbiased covariance
    ``sigma = (X - mu)^T (X - mu) / (N - 1)``; needs ``N >= 2``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    """``M^{1/2}`` of a symmetric PSD matrix: ``V diag(sqrt(max(w, 0))) V^T`` from ``eigh``."""
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"{name}: mean must be [F], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: covariance must be [{mu.shape[0]}, {mu.shape[0]}], got shape {sigma.shape}")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^{1/2} S2 S1^{1/2})^{1/2})``, in float64.

    The last term equals ``2 Tr((S1 S2)^{1/2})`` (see the module docstring). Covariances are
    symmetrised first, so tiny asymmetries from accumulation do not matter. The result is clipped at 0
    (it is a squared distance; rounding can push identical statistics to ~-1e-12).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, s1, "first")
    _check_stats(mu2, s2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    cross = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    d2 = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * cross
    return max(d2, 0.0)


def frechet_distance_from_features(a, b) -> float:
    """Fréchet distance between Gaussian fits of feature sets ``a [N, F]`` and ``b [M, F]``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be [N, F]; got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape} vs {b.shape}")
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_from_features"]
