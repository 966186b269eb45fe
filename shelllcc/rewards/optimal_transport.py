"""PISCES's token-level partial transport prior for a matching model's cross-attention (semantic reward).

``../shared/ALIGNMENT_METHODS.md`` section 4. Per cross-attention layer and head of the video-text matching
model, between text tokens ``i`` (``N``) and visual tokens ``j`` (``M``):

* cost (:func:`pisces_cost`)::

      C_ij = clamp(1 - cos(y_i, x_j), 0, 2) + 0.2 |tau_i - t_j| / T + 0.2 ||pi_i - s_j|| / sqrt(2)
      C    = (C - min C) / max(max C - min C, 1e-6)                        (min-max over the whole matrix)

  ``t_j`` the frame index and ``s_j`` the normalised ``(row, col)`` position of visual token ``j``,
  ``tau_i = sum_j A_ij t_j`` and ``pi_i = sum_j A_ij s_j`` their means under the head's attention row
  ``A_i`` (rows renormalised to sum 1 first), ``T = max_j t_j - min_j t_j`` (at least 1);
* plan (:func:`token_transport_plan`): the KL-relaxed (unbalanced) entropic transport between uniform
  marginals ``a = 1/N``, ``b = 1/M``,  ``min_P <C, P> + eps KL(P | a b^T) + rho KL(P 1 | a) + rho KL(P^T 1 | b)``,
  ``eps = 0.05``, ``rho = eps m / (1 - m)`` with transported mass ``m = 0.9``, solved by log-domain Sinkhorn
  with both scaling updates raised to ``tau = rho / (rho + eps)`` (= ``m``), at most 200 iterations,
  tolerance 1e-3; then each row normalised to sum 1; never differentiated;
* fusion (:func:`fuse_attention`): ``A~ = softmax(log(A + 1e-6) + log(P + 1e-6))`` over the visual tokens.

The solver is ott-jax's unbalanced Sinkhorn (``LinearProblem(geom, tau_a=tau, tau_b=tau)``), whose scaling
iteration is PISCES's (the two are the same map; ``tests/test_optimal_transport.py`` checks the iterates
against a float64 NumPy statement).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

TEMPORAL_WEIGHT = 0.2
SPATIAL_WEIGHT = 0.2
FUSION_EPS = 1e-6
# upstream treats a transported mass this close to 1 as balanced transport (exponent 1)
BALANCED_MASS = 0.999


def relaxation_exponent(epsilon: float, mass: float) -> float:
    """``tau = rho / (rho + eps)`` with ``rho = eps m / (1 - m)``, which simplifies to ``tau = m``; 1 (balanced)
    for ``m >= 0.999`` as upstream."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    if mass >= BALANCED_MASS:
        return 1.0
    rho = epsilon * mass / (1.0 - mass)
    return rho / (rho + epsilon)


def token_transport_plan(cost, epsilon=0.05, mass=0.9, max_iters=200, tol=1e-3):
    """Row-normalised KL-relaxed Sinkhorn plan ``[N, M]`` for a cost ``[N, M]`` (PISCES's partial transport).

    The cost is used as given (PISCES min-max scales it first: :func:`pisces_cost`). Marginals are uniform,
    ``tau = rho / (rho + eps)`` with ``rho = eps m / (1 - m)`` (see the module docstring). Rows are then
    normalised, ``P_ij / max(sum_j P_ij, 1e-8)``, so each text token gets a distribution over visual tokens.

    ``epsilon``, ``mass``, ``max_iters`` and ``tol`` are Python numbers (static under ``jit``). Batched use is
    ``jax.vmap(token_transport_plan)(costs)`` (per head, per layer); the loop then runs until every plan
    has stopped.

    Stopping rule: ott-jax's, checked after every iteration: the 1-norm of the gradient of the dual objective
    (each marginal of the plan minus ``a exp(-f / rho)``, resp. ``b exp(-g / rho)``) below ``tol``. PISCES's
    loop instead stops when the largest change of a log-scaling falls below ``tol``. Both stop at the same
    fixed point; at ``tol = 1e-3`` the two row-normalised plans differ slightly (the test states by how much),
    at a tight ``tol`` they agree to rounding.

    Update order: PISCES updates the text scaling first, ott the column potential first; the cost is
    handed to ott transposed so that the iterates are the same.

    Not differentiated: the cost is cut from the graph before the solver (no tangent ever enters its
    while-loop) and the plan is returned under ``stop_gradient``, as PISCES builds it under ``no_grad``.
    Computed in float32 at least (float64 stays float64).

    The plan's total mass before normalisation is not ``m``: the kernel is ``exp(-C / eps)`` (no ``a b^T``
    factor, as upstream), so on a [0, 1]-scaled cost with entries near 0 the relaxed plan may carry more than
    the balanced plan's 1, and less where transport is dear; only the row-normalised plan is used.
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 2:
        raise ValueError(f"cost must be [N, M] (vmap for batches), got shape {cost.shape}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if int(max_iters) < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    tau = relaxation_exponent(float(epsilon), float(mass))
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    cost_t = jax.lax.stop_gradient(cost.astype(dtype)).T
    geom = geometry.Geometry(cost_matrix=cost_t, epsilon=float(epsilon))
    problem = linear_problem.LinearProblem(geom, tau_a=tau, tau_b=tau)
    # inner_iterations=1: check the stopping rule after every iteration as PISCES does; implicit_diff=None:
    # nothing is differentiated, so the implicit-function machinery would only add work
    solver = sinkhorn.Sinkhorn(threshold=float(tol), max_iterations=int(max_iters), inner_iterations=1,
                               implicit_diff=None)
    plan = solver(problem).matrix.T
    plan = plan / jnp.maximum(jnp.sum(plan, axis=-1, keepdims=True), 1e-8)
    return jax.lax.stop_gradient(plan)


def visual_token_geometry(num_frames: int, height: int, width: int, with_cls: bool = False):
    """Frame index ``[M]`` and normalised position ``[M, 2]`` of visual tokens laid out frame by frame, row-major.

    ``position = (row / (height - 1), col / (width - 1))`` in ``[0, 1]`` (0 for a side of one token).
    ``with_cls``: one leading CLS token at frame ``-1``, position ``(-1, -1)``, as upstream lays out
    InternVideo2's tokens (it also makes ``T = num_frames`` in :func:`pisces_cost`).
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need num_frames, height, width >= 1, got {(num_frames, height, width)}")
    rows = jnp.linspace(0.0, 1.0, height) if height > 1 else jnp.zeros((1,))
    cols = jnp.linspace(0.0, 1.0, width) if width > 1 else jnp.zeros((1,))
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    positions = jnp.tile(grid, (num_frames, 1))
    frames = jnp.repeat(jnp.arange(num_frames, dtype=jnp.float32), height * width)
    if with_cls:
        frames = jnp.concatenate([jnp.full((1,), -1.0), frames])
        positions = jnp.concatenate([jnp.full((1, 2), -1.0), positions])
    return frames, positions


def pisces_cost(text_tokens, visual_tokens, attn, frame_index, positions, *, num_frames=None,
                temporal_weight: float = TEMPORAL_WEIGHT, spatial_weight: float = SPATIAL_WEIGHT):
    """PISCES's min-max scaled token cost ``[N, M]`` (formula in the module docstring).

    Args:
      text_tokens: ``[N, D]`` text-side features ``y_i`` (the head's queries upstream).
      visual_tokens: ``[M, D]`` visual features ``x_j`` (the head's keys).
      attn: ``[N, M]`` the head's attention probabilities ``A``; rows are renormalised to sum 1 (upstream).
      frame_index: ``[M]`` frame ``t_j`` of each visual token (float or int; a CLS token may use -1).
      positions: ``[M, 2]`` normalised positions ``s_j`` (:func:`visual_token_geometry`).
      num_frames: ``T``; default ``max t - min t`` (at least 1), upstream's choice.

    Cosines use ``y / max(||y||, 1e-12)`` (the usual normalisation guard); non-finite entries after scaling
    become 1 (upstream), so a degenerate input gives a flat cost rather than NaN plans. Differentiable, but
    PISCES only feeds it to the (non-differentiated) plan.
    """
    y = jnp.asarray(text_tokens, jnp.float32)
    x = jnp.asarray(visual_tokens, jnp.float32)
    a = jnp.asarray(attn, jnp.float32)
    t = jnp.asarray(frame_index, jnp.float32)
    s = jnp.asarray(positions, jnp.float32)
    if y.ndim != 2 or x.ndim != 2 or y.shape[1] != x.shape[1]:
        raise ValueError(f"text_tokens [N, D] and visual_tokens [M, D] needed, got {y.shape} and {x.shape}")
    n, m = y.shape[0], x.shape[0]
    if a.shape != (n, m):
        raise ValueError(f"attn must be [N, M] = {(n, m)}, got {a.shape}")
    if t.shape != (m,):
        raise ValueError(f"frame_index must be [M] = {(m,)}, got {t.shape}")
    if s.shape != (m, 2):
        raise ValueError(f"positions must be [M, 2] = {(m, 2)}, got {s.shape}")
    a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-6)
    yn = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    semantic = jnp.clip(1.0 - yn @ xn.T, 0.0, 2.0)
    span = jnp.maximum(jnp.max(t) - jnp.min(t), 1.0) if num_frames is None else jnp.asarray(num_frames, jnp.float32)
    tau = a @ t
    temporal = jnp.abs(tau[:, None] - t[None, :]) / span
    pi = a @ s
    # sqrt of a sum with a zero at coinciding points has an infinite derivative; the guard keeps
    # gradients of this (otherwise differentiable) cost finite
    d2 = jnp.sum(jnp.square(pi[:, None, :] - s[None, :, :]), axis=-1)
    spatial = jnp.where(d2 > 0, jnp.sqrt(jnp.where(d2 > 0, d2, 1.0)), 0.0) / math.sqrt(2.0)
    cost = semantic + temporal_weight * temporal + spatial_weight * spatial
    lo, hi = jnp.min(cost), jnp.max(cost)
    cost = (cost - lo) / jnp.maximum(hi - lo, 1e-6)
    return jnp.where(jnp.isfinite(cost), cost, 1.0)


def fuse_attention(attn, plan, eps: float = FUSION_EPS):
    """``softmax(log(A + 1e-6) + log(P + 1e-6))`` over the last axis; ``P`` under ``stop_gradient``.

    ``attn`` ``[..., N, M]`` and ``plan`` broadcastable to it (e.g. per head ``[H, N, M]``). Gradients flow
    through ``A`` only. (Upstream clamps at 1e-6 instead of adding it; the two differ only where an entry
    is below about 1e-6, by at most ``log 2`` in its logit.)
    """
    attn = jnp.asarray(attn)
    plan = jax.lax.stop_gradient(jnp.asarray(plan))
    try:
        jnp.broadcast_shapes(plan.shape, attn.shape)
    except ValueError:
        raise ValueError(f"plan shape {plan.shape} does not broadcast to attn shape {attn.shape}") from None
    dtype = jnp.promote_types(attn.dtype, jnp.float32)
    logits = jnp.log(attn.astype(dtype) + eps) + jnp.log(plan.astype(dtype) + eps)
    return jax.nn.softmax(logits, axis=-1).astype(attn.dtype)
