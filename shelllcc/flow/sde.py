"""Stochastic samplers with the flow ODE's marginals and their per-step Gaussian log-probabilities (online RL).

``../shared/ALIGNMENT_METHODS.md`` section 5. Conventions (:mod:`shelllcc.flow.rectified`):
``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``, sampling from ``t = 1`` to 0, so a step has
``dt = t_next - t < 0`` exactly as the Euler step of :mod:`shelllcc.flow.samplers`
(``x_next = x + dt v``).

Why these SDEs keep the ODE's marginals. With ``v(x, t) = E[eps - x0 | x_t = x]`` the score is
``grad log p_t(x) = -E[eps | x_t = x] / t = -(x + (1 - t) v) / t`` (because ``eps = x_t + (1 - t) v``). For
any diffusion coefficient ``g_t`` the reverse-time SDE ``dx = [v - g_t^2 / 2 grad log p_t] dt + g_t dW``
(``dt < 0``) has the marginals of ``dx = v dt``; substituting the score::

    mean   = x + [v + g_t^2 / (2 t) (x + (1 - t) v)] dt
    x_next = mean + g_t sqrt(-dt) xi,         xi ~ N(0, I)                     (Euler-Maruyama)

* Flow-GRPO (:func:`flow_grpo_step`): ``g_t = s_t = a sqrt(t / (1 - t))``, ``a = 0.7``.
* DanceGRPO (:func:`dance_grpo_step`): the score from the data estimate ``x0 = x - t v``,
  ``grad log p_t = -(x - (1 - t) x0) / t^2``, and a constant ``g_t = eta = 0.3``; it is the same mean as
  above with ``g_t = eta`` (``x - (1 - t) x0 = t (x + (1 - t) v)``). The section gives only "x0 = x - t v,
  score from x0, eta 0.3"; this reading (constant diffusion eta, reverse SDE of the ODE) is ours.

Each step is a Gaussian transition ``N(mean, std^2 I)`` with ``std = g_t sqrt(-dt)``;
:func:`gaussian_log_prob` is its log-density averaged over the elements of a sample (upstream's reduction).

The pole of ``s_t`` at ``t = 1`` (ours, after upstream's handling): ``s_t`` is evaluated at
``min(t, t_cap)``; :func:`sde_sample` sets ``t_cap`` to the schedule's second level when the first is 1,
so the first step from pure noise uses the next level's ``s`` instead of an infinite one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from shelllcc.flow.rectified import model_timestep

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
FLOW_GRPO_A = 0.7
DANCE_GRPO_ETA = 0.3
KINDS = ("flow_grpo", "dance_grpo")


def _per_sample(value, like):
    """A scalar or ``[B]`` value shaped to broadcast against ``like`` ``[B, ...]``."""
    value = jnp.asarray(value, like.dtype)
    if value.ndim == 0:
        return value
    if value.shape != like.shape[:1]:
        raise ValueError(f"t/dt/std must be a scalar or [B]={like.shape[:1]}, got shape {value.shape}")
    return value.reshape(value.shape + (1,) * (like.ndim - 1))


def _noise(key_or_noise, like):
    """``key_or_noise`` is standard normal noise shaped like ``like``, or a PRNG key to draw it from."""
    arr = key_or_noise
    if hasattr(arr, "dtype") and jnp.issubdtype(arr.dtype, jnp.floating):
        if arr.shape != like.shape:
            raise ValueError(f"noise must have the shape of x_t {like.shape}, got {arr.shape}")
        return jnp.asarray(arr, like.dtype)
    return jax.random.normal(key_or_noise, like.shape, like.dtype)


def flow_grpo_sigma(t, a: float = FLOW_GRPO_A, t_cap=None):
    """``s_t = a sqrt(t / (1 - t))`` with ``t`` replaced by ``min(t, t_cap)`` when ``t_cap`` is given."""
    t = jnp.asarray(t)
    if t_cap is not None:
        t = jnp.minimum(t, t_cap)
    return a * jnp.sqrt(t / (1.0 - t))


def reverse_sde_mean(x_t, v, t, dt, g):
    """``x + [v + g^2 / (2 t) (x + (1 - t) v)] dt`` (``t``, ``dt``, ``g`` scalars or ``[B]``; ``t > 0``)."""
    t_, dt_, g_ = (_per_sample(z, x_t) for z in (t, dt, g))
    return x_t + (v + jnp.square(g_) / (2.0 * t_) * (x_t + (1.0 - t_) * v)) * dt_


def flow_grpo_step(key_or_noise, x_t, v, t, dt, a: float = FLOW_GRPO_A, t_cap=None):
    """One Flow-GRPO SDE step: returns ``(x_next, mean, std)``.

    ::

        s_t    = a sqrt(t / (1 - t))                   (t -> min(t, t_cap) if given)
        mean   = x_t + [v + s_t^2 / (2 t) (x_t + (1 - t) v)] dt
        std    = s_t sqrt(-dt)
        x_next = mean + std xi

    ``x_t``, ``v`` ``[B, ...]``; ``t`` the current level and ``dt = t_next - t`` (negative), scalars or
    ``[B]``; ``key_or_noise`` a PRNG key or the noise ``xi`` itself (shaped like ``x_t``). ``std`` has the
    shape of ``t`` (scalar or ``[B]``). With ``a = 0`` this is the Euler step ``x_t + v dt``.
    """
    x_t = jnp.asarray(x_t)
    if v.shape != x_t.shape:
        raise ValueError(f"v must have the shape of x_t {x_t.shape}, got {v.shape}")
    s = flow_grpo_sigma(jnp.asarray(t, x_t.dtype), a, t_cap)
    mean = reverse_sde_mean(x_t, v, t, dt, s)
    std = s * jnp.sqrt(-jnp.asarray(dt, x_t.dtype))
    return mean + _per_sample(std, x_t) * _noise(key_or_noise, x_t), mean, std


def dance_grpo_step(key_or_noise, x_t, v, t, dt, eta: float = DANCE_GRPO_ETA):
    """One DanceGRPO SDE step (score from the data estimate, constant diffusion ``eta``): ``(x_next, mean, std)``.

    ::

        x0     = x_t - t v
        score  = -(x_t - (1 - t) x0) / t^2
        mean   = x_t + [v - eta^2 / 2 score] dt
        std    = eta sqrt(-dt)
        x_next = mean + std xi

    Arguments as :func:`flow_grpo_step`. The reading of "eta" as the constant diffusion coefficient is ours
    (module docstring).
    """
    x_t = jnp.asarray(x_t)
    if v.shape != x_t.shape:
        raise ValueError(f"v must have the shape of x_t {x_t.shape}, got {v.shape}")
    t_, dt_ = _per_sample(t, x_t), _per_sample(dt, x_t)
    x0 = x_t - t_ * v
    score = -(x_t - (1.0 - t_) * x0) / jnp.square(t_)
    mean = x_t + (v - 0.5 * eta ** 2 * score) * dt_
    std = eta * jnp.sqrt(-jnp.asarray(dt, x_t.dtype))
    return mean + _per_sample(std, x_t) * _noise(key_or_noise, x_t), mean, std


def gaussian_log_prob(x, mean, std):
    """``mean over elements of log N(x; mean, std^2)`` per sample: ``[B]`` for ``x`` ``[B, ...]``.

    ``-(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``, averaged (not summed) over the non-batch
    elements as upstream does, so its scale does not grow with the latent size. ``std`` a scalar or ``[B]``.
    Accumulated in float32 at least.
    """
    x, mean = jnp.asarray(x), jnp.asarray(mean)
    if x.shape != mean.shape or x.ndim < 1:
        raise ValueError(f"x and mean must have one shape [B, ...], got {x.shape} and {mean.shape}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x, mean = x.astype(dtype), mean.astype(dtype)
    std = _per_sample(jnp.asarray(std, dtype), x)
    lp = -jnp.square(x - mean) / (2.0 * jnp.square(std)) - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi)
    return jnp.mean(lp.reshape(lp.shape[0], -1), axis=-1)


def _default_t_cap(ts: np.ndarray):
    # only the first level can be 1; with it, s_t uses the next level (ours, after upstream)
    return float(ts[1]) if ts[0] >= 1.0 and len(ts) > 2 else None


def sde_step(kind: str, key_or_noise, x_t, v, t, dt, *, a: float = FLOW_GRPO_A, eta: float = DANCE_GRPO_ETA,
             t_cap=None):
    """:func:`flow_grpo_step` (``kind="flow_grpo"``) or :func:`dance_grpo_step` (``"dance_grpo"``)."""
    if kind == "flow_grpo":
        return flow_grpo_step(key_or_noise, x_t, v, t, dt, a, t_cap)
    if kind == "dance_grpo":
        return dance_grpo_step(key_or_noise, x_t, v, t, dt, eta)
    raise ValueError(f"unknown SDE kind {kind!r}; expected one of {KINDS}")


def sde_sample(velocity_fn: VelocityFn, x1, ts, key, context=None, *, kind: str = "flow_grpo",
               a: float = FLOW_GRPO_A, eta: float = DANCE_GRPO_ETA, t_cap=None):
    """Sample the SDE along the levels ``ts`` (decreasing, ``ts[0]`` the level of ``x1``, e.g. 1; last often 0).

    ``velocity_fn(x [B, ...], timestep [B] = 1000 t, context) -> v`` as for :mod:`shelllcc.flow.samplers`.
    ``ts`` is a host array (static under ``jit``); the loop is a ``lax.scan`` (one model call compiled).
    ``t_cap`` (Flow-GRPO only) defaults to ``ts[1]`` when ``ts[0] == 1`` (module docstring).

    Returns a dict:
      ``x`` the final sample; ``trajectory`` ``[n + 1, B, ...]`` (``x1`` first); ``log_probs`` ``[n, B]`` of
      each drawn ``x_{i+1}`` under its step's Gaussian (:func:`gaussian_log_prob`); ``means`` ``[n, B, ...]``;
      ``stds`` ``[n]``; ``ts`` ``[n + 1]``. GRPO recomputes a step's log-prob under new parameters from
      ``trajectory[i]``, ``trajectory[i + 1]`` and ``ts`` (:func:`step_log_prob`).
    """
    ts = np.asarray(ts, np.float64)
    if ts.ndim != 1 or len(ts) < 2 or not np.all(np.diff(ts) < 0) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError(f"ts must be strictly decreasing levels in [0, 1] (at least 2), got {ts.tolist()}")
    if ts[-2] <= 0:
        raise ValueError("every level but the last must be positive (the SDE divides by t)")
    if kind == "flow_grpo" and t_cap is None:
        t_cap = _default_t_cap(ts)
    if kind == "flow_grpo" and ts[0] >= 1.0 and t_cap is None:
        raise ValueError("ts starts at 1 with a single step: pass t_cap < 1 (s_t has a pole at t = 1)")
    x1 = jnp.asarray(x1)
    batch = x1.shape[0]
    dtype = x1.dtype
    t_arr = jnp.asarray(ts[:-1], dtype)
    dt_arr = jnp.asarray(ts[1:] - ts[:-1], dtype)
    keys = jax.random.split(key, len(ts) - 1)

    def step(x, inp):
        t, dt, k = inp
        v = velocity_fn(x, jnp.broadcast_to(model_timestep(t), (batch,)), context).astype(dtype)
        x_next, mean, std = sde_step(kind, k, x, v, t, dt, a=a, eta=eta, t_cap=t_cap)
        return x_next, (x_next, mean, std, gaussian_log_prob(x_next, mean, std))

    x, (traj, means, stds, log_probs) = lax.scan(step, x1, (t_arr, dt_arr, keys))
    trajectory = jnp.concatenate([x1[None], traj], axis=0)
    return {"x": x, "trajectory": trajectory, "log_probs": log_probs, "means": means, "stds": stds,
            "ts": jnp.asarray(ts, dtype)}


def step_log_prob(kind: str, x_t, v, x_next, t, dt, *, a: float = FLOW_GRPO_A, eta: float = DANCE_GRPO_ETA,
                  t_cap=None):
    """``(log p(x_next | x_t) [B], mean)`` of one SDE step under the velocity ``v`` (new or reference
    parameters): the quantity GRPO's ratio and KL use for a stored transition."""
    _, mean, std = sde_step(kind, jnp.zeros_like(x_t), x_t, v, t, dt, a=a, eta=eta, t_cap=t_cap)
    return gaussian_log_prob(x_next, mean, std), mean
