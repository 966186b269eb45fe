"""Samplers for the rectified-flow ODE ``dx/ds = v(x, s)``, integrated from ``s = 1`` (noise) to 0.

Both samplers are pure functions of ``(noise, context)``, loop over the steps with ``lax.scan``
(so a 50-step sampler compiles one model call, not 50) and are ``jax.jit``-able. The schedule
(:class:`~shelllcc.flow.timesteps.FlowSchedule`) is a host constant: it is static under ``jit``.

The model enters only as a callable::

    velocity_fn(x[B, ...], timestep[B] float32, context) -> v[B, ...]

with ``timestep = schedule.timesteps[i]`` (``~1000 * sigma_i``), so the samplers do not depend on
the DiT code; ``context`` is any pytree (e.g. umT5 embeddings ``[B, 512, 4096]``).

Classifier-free guidance (Wan / diffusers convention)::

    v = v(x, t, negative_context) + g * (v(x, t, context) - v(x, t, negative_context))

with ``g = guidance_scale``. When ``g`` is the Python number 1 the unconditional pass is skipped
(``negative_context`` may then be ``None``). diffusers' Wan pipeline also skips it for ``g < 1``;
here any other value applies the formula, so ``g = 0`` samples the unconditional model.

Guidance interval (Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models", NeurIPS 2024): with ``guidance_interval = (lo, hi)`` the scale is

    g_i = g   if lo <= sigma_i <= hi,   else 1 (the conditional velocity alone)

per step ``i`` of the schedule, so guidance shapes the layout at high noise and leaves the fine detail of the
last steps to the conditional model. ``None`` guides every step. Both passes still run at every step (the scale
is a per-step array inside the scan); outside the interval the result is ``v_cond`` up to rounding.

Gradient guidance: ``guidance_fn(x0_hat, s) -> g`` with ``x0_hat = x - s v`` the current data
estimate (``[B, ...]``) and ``s`` the noise level (``[B]``). The sampler replaces the estimate by
``x0_hat - g``; for a loss ``L`` to decrease, return ``eta * grad L(x0_hat)``
(:func:`loss_guidance` builds one). In velocity terms this is ``v <- v + g / s`` (``s > 0`` at every
model evaluation), so it acts as a velocity modifier too. The hook runs after CFG and inside the
scan, so it may call jax functions (``jax.grad`` of a reward, a manifold distance, ...).

Velocity guidance: ``velocity_guidance(x, v, s, context) -> v~`` replaces the (CFG-combined) velocity at
the state ``x`` and noise level ``s`` ``[B]`` before anything else uses it (the data estimate, the
``guidance_fn`` hook, the solver step); :func:`reward_guidance` builds VideoAlign's Flow-NRG form
``v~ = v - w s / (1 - s) grad r`` (:func:`shelllcc.flow.guidance.guided_velocity`).

Precision: the state is kept in ``noise.dtype``; pass float32 noise even with a bfloat16 model
(as the Wan pipeline does): model outputs are cast to the state dtype, and the solver coefficients
(computed in float64 on the host) are cast to it too.

Solvers:

* :func:`euler_sample`: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i`` (diffusers'
  ``FlowMatchEulerDiscreteScheduler`` step).
* :func:`unipc_sample`: UniPC (Zhao et al. 2023), the B(h) = e^h - 1 ("bh2") variant, order 2,
  data (x0) prediction, with the corrector after every model evaluation but the first and a
  first-order final step: the configuration of diffusers' ``UniPCMultistepScheduler`` that Wan2.1
  ships (``solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
  disable_corrector=[]``, flow sigmas). See :func:`unipc_coefficients` for the formulas.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from shelllcc.flow.guidance import guided_velocity
from shelllcc.flow.timesteps import FlowSchedule

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
GuidanceFn = Callable[[jax.Array, jax.Array], jax.Array]
VelocityGuidanceFn = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]
# reward_fn(latents [B, ...], timestep [B] (1000 s), context) -> [B], higher is better
RewardFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
REWARD_POINTS = ("noisy", "x0")


# ----------------------------------------------------------------------------------------------
# Model evaluation: CFG and gradient guidance
# ----------------------------------------------------------------------------------------------


def _is_python_one(g) -> bool:
    return isinstance(g, (int, float, np.integer, np.floating)) and float(g) == 1.0


def cfg_velocity(velocity_fn: VelocityFn, x, timestep, context, negative_context=None,
                 guidance_scale=1.0):
    """``v_uncond + g (v_cond - v_uncond)``; a single conditional call when ``g`` is the number 1.

    The output is cast to ``x.dtype`` so that a bfloat16 model does not demote a float32 sampler
    state.
    """
    cond = velocity_fn(x, timestep, context).astype(x.dtype)
    if _is_python_one(guidance_scale):
        return cond
    if negative_context is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a negative_context")
    uncond = velocity_fn(x, timestep, negative_context).astype(x.dtype)
    g = jnp.asarray(guidance_scale, x.dtype)
    return uncond + g * (cond - uncond)


def loss_guidance(loss_fn: Callable[[jax.Array], jax.Array], strength: float = 1.0,
                  time_weight: Optional[Callable[[jax.Array], jax.Array]] = None) -> GuidanceFn:
    """A ``guidance_fn`` that takes a gradient step on ``loss_fn`` at the data estimate.

    ``loss_fn(x0_hat[B, ...]) -> [B]`` (or a scalar) is differentiated without going through the
    model (cheap "x0-space" guidance). The returned hook gives ``strength * w(s) * dL/dx0_hat`` with
    ``w = time_weight`` (default 1), per example, so that the sampler's ``x0_hat - g`` is one
    gradient-descent step on ``L``.
    """

    def total(z):
        return jnp.sum(loss_fn(z))

    grad = jax.grad(total)

    def guidance_fn(x0_hat, s):
        g = grad(x0_hat)
        w = strength if time_weight is None else strength * time_weight(s)
        w = jnp.asarray(w, g.dtype)
        if w.ndim == 1:
            w = w.reshape(w.shape + (1,) * (g.ndim - 1))
        return w * g

    return guidance_fn


def reward_guidance(reward_fn: RewardFn, weight, at: str = "noisy", t_max: float = 1.0) -> VelocityGuidanceFn:
    """A ``velocity_guidance`` hook that steers the velocity up a reward's gradient::

        at="noisy" (Flow-NRG, VideoAlign Eq. 11):  g = grad_x r(x_t, 1000 s, c)            at the noisy state
        at="x0"    (ours, training-free):          g = grad_z r(z, 0, c) at z = x0_hat = x_t - s v
        v~ = v - weight * s / (1 - s) * g          for s <= t_max and s < 1 (v elsewhere)

    ``reward_fn(latents, timestep, context) -> [B]`` (higher is better; a noise-aware reward model gets the
    current timestep ``1000 s``). The ``x0`` form is our choice for rewards that only judge clean latents
    (the Shell-LCC distance, negated): the gradient is taken w.r.t. the data estimate as a free variable, not
    back through the model, and used in place of ``grad_x`` in the same formula. ``weight`` is a scalar (a
    traced one is fine: changing it does not recompile).

    ``t_max`` (ours): the factor ``s / (1 - s)`` has a pole at ``s = 1`` and Wan's schedule starts at
    ``s = 1 - 1e-6`` (a factor of 1e6), so guidance is applied only at ``s <= t_max`` (0.95: factor <= 19);
    1 keeps the formula as printed (every level below 1).
    """
    if at not in REWARD_POINTS:
        raise ValueError(f"unknown reward point {at!r}; expected one of {REWARD_POINTS}")

    def total(z, timestep, context):
        return jnp.sum(reward_fn(z, timestep, context).astype(jnp.float32))

    grad = jax.grad(total)

    def hook(x, v, s, context):
        if at == "noisy":
            g = grad(x, s * 1000.0, context)
        else:
            s_b = s.astype(x.dtype).reshape(s.shape + (1,) * (x.ndim - 1))
            z = lax.stop_gradient(x - s_b * v)
            g = grad(z, jnp.zeros_like(s), context)
        on = (s <= t_max).astype(jnp.float32).reshape(s.shape + (1,) * (v.ndim - 1))
        return guided_velocity(v, g.astype(v.dtype), s, jnp.asarray(weight, jnp.float32) * on)

    return hook


def step_guidance_scales(sigmas, guidance_scale, guidance_interval=None):
    """``guidance_scale`` unchanged without an interval; else the per-step scales ``[n]`` (float32) of the
    module doc's guidance interval, for the ``n`` evaluation levels ``sigmas[:-1]``."""
    if guidance_interval is None:
        return guidance_scale
    lo, hi = (float(v) for v in guidance_interval)
    if not 0.0 <= lo <= hi:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi, got {guidance_interval}")
    sig = np.asarray(sigmas, np.float32)[:-1]
    return np.where((sig >= lo) & (sig <= hi), np.float32(guidance_scale), np.float32(1.0)).astype(np.float32)


def _batch(value, x):
    return jnp.full((x.shape[0],), value, jnp.float32)


def _predict(velocity_fn, x, sigma, timestep, context, negative_context, guidance_scale,
             guidance_fn, velocity_guidance=None):
    """Model call at one level; returns ``(v, x0_hat)`` with guidance applied to both."""
    v = cfg_velocity(velocity_fn, x, _batch(timestep, x), context, negative_context, guidance_scale)
    if velocity_guidance is not None:
        v = velocity_guidance(x, v, _batch(sigma, x), context).astype(x.dtype)
    sig = sigma.astype(x.dtype)
    x0 = x - sig * v
    if guidance_fn is not None:
        x0 = x0 - guidance_fn(x0, _batch(sigma, x)).astype(x.dtype)
        # keep v consistent with the guided estimate: v = (x - x0) / s, s > 0 at every evaluation
        v = (x - x0) / sig
    return v, x0


def _check_noise(noise):
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise TypeError(f"noise must be floating point, got {noise.dtype}")
    if noise.ndim < 1:
        raise ValueError("noise needs a leading batch dimension")


# ----------------------------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------------------------


def euler_sample(velocity_fn: VelocityFn, noise, context, schedule: FlowSchedule, *,
                 negative_context=None, guidance_scale=1.0,
                 guidance_fn: Optional[GuidanceFn] = None, return_trajectory: bool = False,
                 remat: bool = False, velocity_guidance: Optional[VelocityGuidanceFn] = None,
                 guidance_interval: Optional[tuple[float, float]] = None):
    """Euler integration of the flow ODE along ``schedule.sigmas``.

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i)``, starting from ``x_0 = noise``.
    Only the first of the per-step sigmas needs to match the noise level of ``noise`` (1 for pure
    noise); starting lower (img2img, SDEdit) is a matter of building ``x_0`` and the schedule.

    Args:
      velocity_fn, context, negative_context, guidance_scale, guidance_fn, velocity_guidance,
        guidance_interval: see the module doc.
      return_trajectory: also return the state before each step, ``[n, B, ...]``.
      remat: ``jax.checkpoint`` each step (memory for backprop through the whole sampler).

    Returns the final sample (and the trajectory).
    """
    _check_noise(noise)
    sig = np.asarray(schedule.sigmas, np.float32)
    # dt in float32 exactly as sigma_{i+1} - sigma_i of the stored float32 levels
    dts = (sig[1:] - sig[:-1]).astype(np.float32)
    per_step = guidance_interval is not None and not _is_python_one(guidance_scale)
    scales = step_guidance_scales(sig, guidance_scale, guidance_interval if per_step else None)
    xs = (jnp.asarray(sig[:-1]), jnp.asarray(dts), jnp.asarray(schedule.timesteps),
          jnp.asarray(scales) if per_step else None)

    def step(x, inp):
        sigma, dt, t, g = inp
        v, _ = _predict(velocity_fn, x, sigma, t, context, negative_context, g if per_step else guidance_scale,
                        guidance_fn, velocity_guidance)
        x_next = x + dt.astype(x.dtype) * v
        return x_next, (x if return_trajectory else None)

    if remat:
        step = jax.checkpoint(step)
    x, traj = lax.scan(step, noise, xs)
    return (x, traj) if return_trajectory else x


# ----------------------------------------------------------------------------------------------
# UniPC (bh2, order 2, data prediction)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UniPCCoefficients:
    """Per-step scalars of UniPC-2 (bh2, data prediction), float64 numpy, length ``n`` each.

    With ``m_i`` the data estimate at evaluation ``i`` (at the predicted state ``xt_i``):

    corrector (i >= 1), gives the state ``x_i`` actually carried forward::

        x_i = a_{i-1} x_{i-1} + b_{i-1} m_{i-1} + cc_i (m_{i-2} - m_{i-1}) + dc_i (m_i - m_{i-1})

    predictor, gives the state at which the model is evaluated next::

        xt_{i+1} = a_i x_i + b_i m_i + cp_i (m_{i-1} - m_i)

    ``x_0 = xt_0 = noise``; the result is ``xt_n`` (no model call at the last level).
    """

    a: np.ndarray
    b: np.ndarray
    cp: np.ndarray
    cc: np.ndarray
    dc: np.ndarray
    use_corrector: np.ndarray  # bool
    predictor_order: np.ndarray  # int, for inspection
    corrector_order: np.ndarray  # int, 0 where no corrector


def unipc_coefficients(sigmas) -> UniPCCoefficients:
    """UniPC-2 coefficients for a decreasing flow-sigma schedule ``sigmas[0..n]``.

    In flow parametrisation ``alpha = 1 - sigma`` and the half log-SNR is
    ``lambda = log(alpha / sigma)`` (``+inf`` at ``sigma = 0``). For a step from level ``p`` to
    level ``q`` let ``h = lambda_q - lambda_p`` and ``phi = expm1(-h)`` (``= -1`` when ``q`` is 0).
    The exponential-integrator step for the data-prediction ODE is

        x_q = (sigma_q / sigma_p) x_p - alpha_q phi m_p  -  alpha_q B(h) * (higher-order term)

    with ``B(h) = expm1(-h) = phi`` for the bh2 variant. Higher-order terms use the finite
    difference ``D = (m_r - m_p) / r_k``, ``r_k = (lambda_r - lambda_p) / h``, of the estimate at an
    earlier level ``r``:

    * predictor of order 2: weight ``1/2`` on ``D`` (UniPC's order-2 shortcut);
    * corrector of order 1 (only the new estimate ``m_q`` at the predicted state):
      ``1/2 (m_q - m_p)``;
    * corrector of order 2: ``rho_0 D + rho_1 (m_q - m_p)`` with ``[[1, 1], [r, 1]] rho = beta``,
      ``beta_1 = (phi/(-h) - 1) / B``, ``beta_2 = 2 (phi/h^2 + 1/h - 1/2) / B``
      (the ``phi_k`` recursion ``phi_{k+1} = phi_k / (-h) - 1/(k+1)!``).

    Orders: the predictor is first order at the first step (no history) and at the last step
    (``lower_order_final``: the step onto ``sigma = 0`` would need ``r = 0``), second order
    elsewhere; the corrector at evaluation ``i`` uses the order of the predictor that produced the
    state (``i >= 1``).
    """
    sig = np.asarray(sigmas, np.float64)
    n = sig.shape[0] - 1
    if n < 1:
        raise ValueError("need at least one step")
    if np.any(sig[:-1] <= 0) or np.any(sig >= 1):
        raise ValueError("UniPC needs 0 < sigma_i < 1 at every model evaluation (sigma_n may be 0); "
                         "use wan_sampling_schedule, which starts at 1 - 1e-6")
    alpha = 1.0 - sig
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf where sigma == 0

    pred_order = np.array([1 if (i == 0 or i == n - 1) else 2 for i in range(n)])
    corr_order = np.array([0] + [int(pred_order[i - 1]) for i in range(1, n)])

    def step_terms(p, q):
        """(a, b, phi, alpha_q, h) for the step from level p to level q."""
        h = lam[q] - lam[p]
        phi = np.expm1(-h)  # -1 when lam[q] = inf
        return sig[q] / sig[p], -alpha[q] * phi, phi, alpha[q], h

    a = np.zeros(n)
    b = np.zeros(n)
    cp = np.zeros(n)
    cc = np.zeros(n)
    dc = np.zeros(n)
    for i in range(n):
        a[i], b[i], phi, al, h = step_terms(i, i + 1)
        if pred_order[i] == 2:
            r = (lam[i - 1] - lam[i]) / h
            cp[i] = -al * phi * 0.5 / r
        if i >= 1:
            _, _, phi, al, h = step_terms(i - 1, i)
            bh = phi  # bh2: B(h) = expm1(-h)
            if corr_order[i] == 1:
                dc[i] = -al * bh * 0.5
            else:
                hh = -h
                phi_1 = phi / hh - 1.0
                phi_2 = phi_1 / hh - 0.5
                beta = np.array([phi_1 / bh, 2.0 * phi_2 / bh])
                r = (lam[i - 2] - lam[i - 1]) / h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), beta)
                cc[i] = -al * bh * rho[0] / r
                dc[i] = -al * bh * rho[1]
    return UniPCCoefficients(a=a, b=b, cp=cp, cc=cc, dc=dc,
                             use_corrector=np.arange(n) >= 1,
                             predictor_order=pred_order, corrector_order=corr_order)


def unipc_sample(velocity_fn: VelocityFn, noise, context, schedule: FlowSchedule, *,
                 negative_context=None, guidance_scale=1.0,
                 guidance_fn: Optional[GuidanceFn] = None, return_trajectory: bool = False,
                 remat: bool = False, velocity_guidance: Optional[VelocityGuidanceFn] = None,
                 guidance_interval: Optional[tuple[float, float]] = None):
    """UniPC-2 (bh2, data prediction) sampler; ``n`` model evaluations for ``schedule.num_steps = n``.

    Reproduces diffusers' ``UniPCMultistepScheduler`` as configured for Wan2.1 (see the module doc
    and :func:`unipc_coefficients`). Arguments as :func:`euler_sample`; the trajectory holds the
    states at which the model was evaluated.
    """
    _check_noise(noise)
    co = unipc_coefficients(schedule.sigmas)
    dt = noise.dtype
    sig = np.asarray(schedule.sigmas, np.float32)
    xs = dict(
        sigma=jnp.asarray(sig[:-1]), t=jnp.asarray(schedule.timesteps),
        a_prev=jnp.asarray(np.concatenate([[0.0], co.a[:-1]]), dt),
        b_prev=jnp.asarray(np.concatenate([[0.0], co.b[:-1]]), dt),
        cc=jnp.asarray(co.cc, dt), dc=jnp.asarray(co.dc, dt),
        a=jnp.asarray(co.a, dt), b=jnp.asarray(co.b, dt), cp=jnp.asarray(co.cp, dt),
        corr=jnp.asarray(co.use_corrector),
    )
    per_step = guidance_interval is not None and not _is_python_one(guidance_scale)
    if per_step:
        xs["g"] = jnp.asarray(step_guidance_scales(sig, guidance_scale, guidance_interval))

    def step(carry, c):
        # x_pred: state to evaluate; x_prev: corrected state one step back; m1, m2: data
        # estimates one and two evaluations back (zeros before they exist; their weights are 0)
        x_pred, x_prev, m1, m2 = carry
        _, m0 = _predict(velocity_fn, x_pred, c["sigma"], c["t"], context, negative_context,
                         c["g"] if per_step else guidance_scale, guidance_fn, velocity_guidance)
        corrected = c["a_prev"] * x_prev + c["b_prev"] * m1 + c["cc"] * (m2 - m1) + c["dc"] * (m0 - m1)
        x = jnp.where(c["corr"], corrected, x_pred)
        x_next = c["a"] * x + c["b"] * m0 + c["cp"] * (m1 - m0)
        return (x_next, x, m0, m1), (x_pred if return_trajectory else None)

    if remat:
        step = jax.checkpoint(step)
    zeros = jnp.zeros_like(noise)
    (x, _, _, _), traj = lax.scan(step, (noise, zeros, zeros, zeros), xs)
    return (x, traj) if return_trajectory else x


SOLVERS = {"euler": euler_sample, "unipc": unipc_sample}


def sample(velocity_fn: VelocityFn, noise, context, schedule: FlowSchedule, *,
           solver: str = "unipc", **kwargs):
    """Dispatch to :func:`unipc_sample` (default, Wan's solver) or :func:`euler_sample`."""
    try:
        fn = SOLVERS[solver]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}") from None
    return fn(velocity_fn, noise, context, schedule, **kwargs)
