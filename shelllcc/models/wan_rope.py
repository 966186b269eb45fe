"""3D rotary position embedding of the Wan2.1 transformer.

Each attention head's ``head_dim`` channels are split into three contiguous groups that rotate with
the token's frame, row and column index respectively::

    d_h = d_w = 2 * (head_dim // 6),   d_t = head_dim - d_h - d_w

Inside a group of size ``d`` the channels form ``d / 2`` *adjacent* pairs ``(x[2j], x[2j+1])``
(the interleaved, complex-number convention), pair ``j`` rotating by the angle
``pos * theta ** (-2j / d)``::

    (x1, x2) -> (x1 cos a - x2 sin a,  x1 sin a + x2 cos a)

Tokens are ordered frame-major (``n = (f * H' + h) * W' + w``), as the patch embedding emits them.
The angle tables depend only on static shapes, so they are built on the host in float64 and handed
to XLA as float32 constants (Wan's reference computes them in float64 too).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """``(d_t, d_h, d_w)``: channels of a head given to the frame, row and column positions."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis_angles(positions: int, dim: int, theta: float) -> np.ndarray:
    """``[positions, dim // 2]`` float64 angles ``p * theta ** (-2j / dim)``."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return np.outer(np.arange(positions, dtype=np.float64), inv_freq)


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each float32 ``[F * H * W, head_dim // 2]``, for a token grid ``(F, H, W)``."""
    f, h, w = grid
    d_t, d_h, d_w = rope_split(head_dim)
    a_t = _axis_angles(f, d_t, theta)[:, None, None, :]
    a_h = _axis_angles(h, d_h, theta)[None, :, None, :]
    a_w = _axis_angles(w, d_w, theta)[None, None, :, :]
    shape = (f, h, w)
    angles = np.concatenate([np.broadcast_to(a, shape + a.shape[-1:]) for a in (a_t, a_h, a_w)], axis=-1)
    angles = angles.reshape(f * h * w, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate adjacent channel pairs of ``x [B, N, heads, head_dim]`` by ``cos/sin [N, head_dim // 2]``.

    The rotation is done in float32 and the result cast back to ``x.dtype``.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
