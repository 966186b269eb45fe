"""Pixel-space maps brought onto a VAE's latent grid (e.g. an object mask as a loss weight per latent).

A video VAE compresses ``[T, H, W]`` to ``[t, h, w]`` by a spatial factor ``H / h`` and a temporal
factor ``r``, either causally (Wan's VAE and the project's ``PatchVAE``: the first frame is coded alone,
then ``r`` frames per latent frame, ``T = 1 + r (t - 1)``) or in plain groups (``T = r t``). A latent
cell covers exactly the pixels of its block and frames, so the map it sees is their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pool_to_latent_grid(values: np.ndarray, grid: Sequence[int], causal: bool = True) -> np.ndarray:
    """Mean of ``values [..., T, H, W]`` over each latent cell of ``grid = (t, h, w)`` -> ``[..., t, h, w]``.

    ``out[..., k, i, j] = mean(values[..., frames(k), i*sh:(i+1)*sh, j*sw:(j+1)*sw])`` with
    ``sh = H / h``, ``sw = W / w`` and ``frames(k)``: with ``causal``, ``{0}`` for ``k = 0`` and
    ``1 + r (k-1) .. r k`` after it (``T = 1 + r (t - 1)``); else ``r k .. r (k+1) - 1`` (``T = r t``).
    float32. (Nine frames on three latent frames fit both layouts, so the layout is an argument.)
    """
    x = np.asarray(values, np.float32)
    if x.ndim < 3 or len(grid) != 3:
        raise ValueError(f"pool_to_latent_grid: values [..., T, H, W] and grid (t, h, w), got {x.shape} and {grid}")
    (T, H, W), (t, h, w) = x.shape[-3:], tuple(int(g) for g in grid)
    if min(t, h, w) < 1 or H % h or W % w:
        raise ValueError(f"pool_to_latent_grid: a map of {H} x {W} pixels does not divide into a {h} x {w} grid")
    lead = x.shape[:-3]
    x = x.reshape(*lead, T, h, H // h, w, W // w).mean(axis=(-3, -1))          # [..., T, h, w]
    if causal:
        if t == 1 and T == 1:
            return x
        if t < 2 or (T - 1) % (t - 1) or T == 1:
            raise ValueError(f"pool_to_latent_grid: {T} frames are not a causal layout 1 + r (t - 1) of {t} latent frames")
        r = (T - 1) // (t - 1)
        rest = x[..., 1:, :, :].reshape(*lead, t - 1, r, h, w).mean(axis=-3)
        return np.concatenate([x[..., :1, :, :], rest], axis=-3)
    if T % t:
        raise ValueError(f"pool_to_latent_grid: {T} frames do not divide into {t} latent frames")
    return x.reshape(*lead, t, T // t, h, w).mean(axis=-3)


class PooledField:
    """A random-access source (``__len__``, ``__getitem__``, ``__getitems__``) whose ``field`` (``[T, H, W]``,
    uint8 read as ``/ 255``, or float) is replaced by :func:`pool_to_latent_grid` of it on ``grid``: e.g. the
    embedded benchmark's ``object_mask`` made a per-latent map before the latent cache keeps it."""

    def __init__(self, source, field: str, grid: Sequence[int], causal: bool = True):
        self.source, self.field, self.grid, self.causal = source, field, tuple(int(g) for g in grid), causal

    def __len__(self) -> int:
        return len(self.source)

    def _pool(self, ex: dict) -> dict:
        if self.field not in ex:
            raise KeyError(f"PooledField: the source's examples have no field {self.field!r} (fields: {sorted(ex)})")
        v = np.asarray(ex[self.field])
        v = v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v
        return {**ex, self.field: pool_to_latent_grid(v, self.grid, self.causal)}

    def __getitem__(self, i: int) -> dict:
        return self._pool(self.source[i])

    def __getitems__(self, indices: Sequence[int]) -> list:
        get = getattr(self.source, "__getitems__", None)
        items = get(indices) if get is not None else [self.source[i] for i in indices]
        return [self._pool(ex) for ex in items]


__all__ = ["pool_to_latent_grid", "PooledField"]
