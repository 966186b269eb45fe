"""Synthetic latents on the shells of a Gaussian mixture: data whose geometry is known exactly.

Each point is ``mu_c + r * u`` with ``c`` a mixture component, ``u`` uniform on the unit sphere of
``R^D`` and ``r = sigma * sqrt(D)``: where nearly all the mass of ``N(mu_c, sigma^2 I)`` lies when D
is large (the Gaussian annulus). The manifold of such data is a set of thin shells, and the local
means ``mu_c`` are *off* it.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShellMixture:
    centers: np.ndarray   # [M, D]
    radius: float

    @property
    def dim(self) -> int:
        return self.centers.shape[1]

    def sample(self, rng: np.random.Generator, n: int, radius_factor: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` points at ``radius_factor * radius`` from random centers; returns (points, component)."""
        comp = rng.integers(0, len(self.centers), n)
        u = rng.standard_normal((n, self.dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return (self.centers[comp] + radius_factor * self.radius * u).astype(np.float32), comp

    def nearest_center_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance ``[N]`` from each point to its nearest component mean."""
        d2 = ((points[:, None, :].astype(np.float64) - self.centers[None]) ** 2).sum(-1)
        return np.sqrt(d2.min(axis=1))


def make_shell_mixture(seed: int, dim: int = 16, num_components: int = 8, sigma: float = 0.5,
                       center_scale: float = 3.0) -> ShellMixture:
    """Components with means ``~ N(0, center_scale^2 I)`` and shell radius ``sigma * sqrt(dim)``."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_components, dim)) * center_scale
    return ShellMixture(centers=centers, radius=float(sigma * np.sqrt(dim)))


def synthetic_latent_videos(mixture: ShellMixture, rng: np.random.Generator, num_videos: int,
                            grid: tuple[int, int, int], region: tuple[int, int, int] = (1, 4, 4),
                            radius_factor: float = 1.0) -> np.ndarray:
    """Latent 'videos' ``[B, T, H, W, C]`` (C = mixture dim) whose every position is a shell sample.

    One mixture component is drawn per ``region`` block of positions, so that spatial smoothing
    averages samples of one Gaussian and pulls them toward its mean: the blur a weak generator
    produces, with a known answer.
    """
    t, h, w = grid
    rt, rh, rw = region
    if t % rt or h % rh or w % rw:
        raise ValueError(f"grid {grid} is not divisible by region {region}")
    comp = rng.integers(0, len(mixture.centers), (num_videos, t // rt, h // rh, w // rw))
    comp = comp.repeat(rt, 1).repeat(rh, 2).repeat(rw, 3)
    u = rng.standard_normal((num_videos, t, h, w, mixture.dim))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    return (mixture.centers[comp] + radius_factor * mixture.radius * u).astype(np.float32)
