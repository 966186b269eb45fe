"""Rectified flow in Wan's convention.

With data ``x0``, Gaussian noise ``eps`` and noise level ``s`` in ``[0, 1]``::

    x_s   = (1 - s) * x0 + s * eps          # s = 0: data, s = 1: pure noise
    v     = d x_s / d s = eps - x0          # the velocity the model regresses
    x0    = x_s - s * v                     # one-step denoise ("x0 prediction")
    eps   = x_s + (1 - s) * v

The network is conditioned on the *model timestep* ``1000 * s`` (Wan's ``num_train_timesteps``).

Noise levels are given per example (shape ``[B]``) or as a scalar; they are broadcast over the
trailing (non-batch) dimensions of the latents, so the same functions serve ``[B, T, H, W, C]``
video latents and ``[B, D]`` toy data.
"""

from __future__ import annotations

import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000


def _bcast(s, like):
    """Reshape per-example ``s`` (scalar or ``[B]``) to broadcast against ``like`` ``[B, ...]``."""
    s = jnp.asarray(s, dtype=like.dtype)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"noise level must be a scalar or have shape [B]={like.shape[:1]}, got {s.shape}")
    return s.reshape(s.shape + (1,) * (like.ndim - 1))


def model_timestep(s, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """The model's timestep input for noise level ``s``: ``num_train_timesteps * s`` (float)."""
    return jnp.asarray(s, jnp.float32) * num_train_timesteps


def add_noise(x0, eps, s):
    """``x_s = (1 - s) x0 + s eps`` with ``s`` a scalar or ``[B]``."""
    s = _bcast(s, x0)
    return (1.0 - s) * x0 + s * eps


def velocity_target(x0, eps):
    """The rectified-flow regression target ``v = eps - x0`` (independent of ``s``)."""
    return eps - x0


def denoise(x_s, v, s):
    """One-step estimate of the data from a velocity: ``x0_hat = x_s - s v``."""
    return x_s - _bcast(s, x_s) * v


def noise_from_velocity(x_s, v, s):
    """One-step estimate of the noise from a velocity: ``eps_hat = x_s + (1 - s) v``."""
    return x_s + (1.0 - _bcast(s, x_s)) * v


def velocity_from_x0(x_s, x0_hat, s):
    """Velocity implied by a data estimate: ``v = (x_s - x0_hat) / s`` (requires ``s > 0``)."""
    return (x_s - x0_hat) / _bcast(s, x_s)


def flow_matching_loss(v_pred, x0, eps, weights=None):
    """Flow-matching mean squared error ``mean(w * (v_pred - (eps - x0))^2)``.

    Args:
      v_pred: model output, ``[B, ...]``.
      x0, eps: the data and noise that built the model input, same shape.
      weights: ``None`` (plain MSE over every element), per-example weights ``[B]`` or an array that
        broadcasts against ``v_pred``. The result is the plain mean of the weighted squared errors
        (not normalised by ``sum(w)``), so per-example weights act as loss multipliers, e.g. the
        timestep weightings of SD3-style training.

    The error is accumulated in float32 whatever the model's compute dtype: a bfloat16 mean over a
    video latent loses most of its mantissa.
    """
    err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, eps).astype(jnp.float32))
    if weights is not None:
        w = jnp.asarray(weights, jnp.float32)
        if w.ndim == 1 and err.ndim > 1 and w.shape[0] == err.shape[0]:
            w = w.reshape(w.shape + (1,) * (err.ndim - 1))
        err = err * w
    return jnp.mean(err)
