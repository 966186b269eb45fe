"""Latents <-> patches.

A latent is channels-last ``[B, T, H, W, C]``. A patch is the ``(pt, ph, pw)`` block of latent
positions flattened in ``(pt, ph, pw, C)`` order, so ``D = pt * ph * pw * C``; with the default
``(1, 1, 1)`` a patch is one position's C-vector.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def patch_dim(channels: int, patch_size: tuple[int, int, int]) -> int:
    return channels * math.prod(patch_size)


def check_latents(latents: jax.Array, dim: int, patch_size: tuple[int, int, int] = (1, 1, 1)) -> None:
    """Raise ``ValueError`` if ``latents`` cannot be cut into ``dim``-sized patches."""
    if latents.ndim == 2:
        if latents.shape[1] != dim:
            raise ValueError(f"flat latents have D={latents.shape[1]} per row but the manifold expects D={dim}")
        return
    if latents.ndim != 5:
        raise ValueError(
            f"latents must be channels-last [B, T, H, W, C] or flat [N, D]; got shape {tuple(latents.shape)}")
    pt, ph, pw = patch_size
    _, t, h, w, c = latents.shape
    if patch_dim(c, patch_size) != dim:
        hint = ""
        if latents.shape[1] * math.prod(patch_size) == dim:
            hint = " (the latents look channels-first [B, C, T, H, W]; move channels last)"
        raise ValueError(
            f"latents have C={c} channels; with patch_size={tuple(patch_size)} that gives D="
            f"{patch_dim(c, patch_size)}, but the manifold expects D={dim}{hint}")
    if t % pt or h % ph or w % pw:
        raise ValueError(
            f"latent grid (T, H, W)=({t}, {h}, {w}) is not divisible by patch_size={tuple(patch_size)}")


def patchify(latents: jax.Array, patch_size: tuple[int, int, int] = (1, 1, 1)) -> jax.Array:
    """``[B, T, H, W, C] -> [B, P, D]`` with ``P`` patches per example."""
    b, t, h, w, c = latents.shape
    pt, ph, pw = patch_size
    x = latents.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(patches: jax.Array, grid: tuple[int, int, int], patch_size: tuple[int, int, int] = (1, 1, 1)
               ) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, P, D] -> [B, T, H, W, C]`` for latent grid ``(T, H, W)``."""
    b = patches.shape[0]
    t, h, w = grid
    pt, ph, pw = patch_size
    c = patches.shape[-1] // (pt * ph * pw)
    x = patches.reshape(b, t // pt, h // ph, w // pw, pt, ph, pw, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, t, h, w, c)


def to_patches(latents: jax.Array, dim: int, patch_size: tuple[int, int, int] = (1, 1, 1)) -> jax.Array:
    """Validated ``[B, T, H, W, C]`` or ``[N, D]`` -> ``[B, P, D]`` (a flat input is one example)."""
    latents = jnp.asarray(latents)
    check_latents(latents, dim, patch_size)
    if latents.ndim == 2:
        return latents[None]
    return patchify(latents, patch_size)
