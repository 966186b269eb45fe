"""Reward guidance of a flow sampler (VideoAlign's Flow-NRG, paper Eq. 11 and App. C).

Convention of :mod:`shelllcc.flow.rectified`: ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``, t = 1 is noise.
"""

from __future__ import annotations

import jax.numpy as jnp


def guided_velocity(v, grad_r, t, weight):
    """The velocity steered up a reward's gradient::

        v~ = v - weight * t / (1 - t) * grad_x r(x_t, y, t)      for t < 1
        v~ = v                                                  at t = 1 (the factor's pole: no guidance)

    ``v``, ``grad_r`` ``[B, ...]``; ``t`` ``[B]`` (or a scalar), broadcast over the latent; ``weight`` a
    scalar (or anything that broadcasts against ``v``). The sampler steps ``x <- x + (t_next - t) v~`` with
    ``t_next < t``, so subtracting ``grad_r`` moves ``x`` along ``+grad_r``: towards higher reward.
    """
    v = jnp.asarray(v)
    t = jnp.asarray(t, jnp.float32)
    t = jnp.broadcast_to(t, (v.shape[0],)) if t.ndim == 0 else t
    t = t.reshape(t.shape + (1,) * (v.ndim - 1))
    below = t < 1.0
    # a safe denominator keeps both where-branches finite, so gradients through t are finite too
    factor = jnp.where(below, t / jnp.where(below, 1.0 - t, 1.0), 0.0)
    out = v.astype(jnp.float32) - jnp.asarray(weight, jnp.float32) * factor * jnp.asarray(grad_r, jnp.float32)
    return out.astype(v.dtype)


__all__ = ["guided_velocity"]
