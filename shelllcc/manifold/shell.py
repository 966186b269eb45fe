"""Isotropic shell around the skeleton (DESIGN 2.2).

In high dimension a local Gaussian's mass lies on a thin shell at distance ~ sigma * sqrt(D) from its
mean, not at the mean. The shell head predicts a per-dimension log-variance at the skeleton point::

    lv_n    = g(zhat_n)                           g: Linear -> ReLU -> Linear
    delta_n = (z_n - zhat_n) / (exp(lv_n) + eps)  (scaled by the variance, as the reference does)

so that ``||delta_n|| == 1`` on the data's shell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shelllcc.manifold.coders import matmul
from shelllcc.manifold.params import ShellParams


def shell_log_variance(shell: ShellParams, zhat: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """``lv = g(zhat) [N, D]``."""
    h = jax.nn.relu(matmul(zhat, shell.w0, compute_dtype) + shell.b0)
    return matmul(h, shell.w1, compute_dtype) + shell.b1


def shell_residual(z: jax.Array, zhat: jax.Array, log_var: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``delta = (z - zhat) / (exp(lv) + eps)``."""
    return (z - zhat) / (jnp.exp(log_var) + eps)


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean norm whose gradient at 0 is 0 rather than NaN."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
