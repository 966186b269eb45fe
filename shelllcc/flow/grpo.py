"""Flow-GRPO and DanceGRPO losses as pure functions (``../shared/ALIGNMENT_METHODS.md`` section 5).

The rollouts come from :func:`shelllcc.flow.sde.sde_sample` (trajectory, per-step log-probs under the
sampling ("old") parameters); training recomputes a stored step's log-prob and mean under the current
parameters (:func:`shelllcc.flow.sde.step_log_prob`) and, for Flow-GRPO, under the frozen reference.

Shapes: ``P`` prompts, ``G`` samples per prompt (group), ``B = P G`` samples, ``K`` trained timesteps.

Flow-GRPO::

    A_pg    = clip((R_pg - mean_g R_p.) / (std_g R_p. + 1e-4), -5, 5)          (group_advantages)
    r       = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))        (per sample, per step)
    L_clip  = mean max(-A r, -A clip(r, 1 - e, 1 + e)),   e = 1e-4              (grpo_policy_loss)
    L_kl    = mean ||mu_theta - mu_ref||^2 / (2 s_t^2 [|dt|])                   (grpo_kl, mean over elements)
    L       = L_clip + beta L_kl,   beta 0.01-0.04                              (grpo_objective)

DanceGRPO: the same clipped objective without the KL (``beta = 0``), trained on a random 60% of the
timesteps of each rollout (:func:`select_timesteps`) and on the best-of-n subset of each group
(:func:`best_of_n_indices`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADV_CLIP = 5.0
CLIP_EPS = 1e-4
STD_GUARD = 1e-4
DANCE_TIMESTEP_FRACTION = 0.6


def group_advantages(rewards, clip: float = ADV_CLIP, std_guard: float = STD_GUARD):
    """``clip((R - mean_G R) / (std_G R + std_guard), -clip, clip)`` per group: ``[P, G]`` -> ``[P, G]``.

    ``std_G`` is the population standard deviation of the group (ddof 0) and ``std_guard`` keeps a group
    of equal rewards at advantage 0 rather than 0/0; both choices are ours (the section says
    ``(R - mean_G) / std``). Float32 at least; not differentiated (rewards are data).
    """
    r = jnp.asarray(rewards)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G] with G >= 2, got shape {r.shape}")
    r = jax.lax.stop_gradient(r.astype(jnp.promote_types(r.dtype, jnp.float32)))
    mean = jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True)
    return jnp.clip((r - mean) / (std + std_guard), -clip, clip)


def _match_advantages(advantages, like):
    a = jnp.asarray(advantages, like.dtype)
    if a.shape == like.shape:
        return a
    if a.ndim == 1 and like.ndim >= 1 and a.shape[0] == like.shape[0]:
        return a.reshape(a.shape + (1,) * (like.ndim - 1))
    raise ValueError(f"advantages must be [B] or {like.shape}, got shape {a.shape}")


def grpo_policy_loss(log_prob_new, log_prob_old, advantages, clip_eps: float = CLIP_EPS):
    """PPO-clip loss and its diagnostics: ``(loss, metrics)``.

    ::

        r    = exp(log_prob_new - log_prob_old)
        loss = mean max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps))

    ``log_prob_*`` ``[B]`` or ``[B, K]`` (one per trained step); ``advantages`` ``[B]`` (broadcast over the
    steps) or the log-probs' shape. ``log_prob_old`` and the advantages are data (stop_gradient). Metrics:
    ``policy_loss``, ``ratio_mean``, ``clip_fraction`` (share of entries with ``|r - 1| > clip_eps``),
    ``approx_kl`` (``mean (log r)^2 / 2``, the usual estimate of KL(old | new)).
    """
    new = jnp.asarray(log_prob_new)
    new = new.astype(jnp.promote_types(new.dtype, jnp.float32))
    old = jax.lax.stop_gradient(jnp.asarray(log_prob_old, new.dtype))
    if old.shape != new.shape:
        raise ValueError(f"log_prob_old must have the shape of log_prob_new {new.shape}, got {old.shape}")
    adv = jax.lax.stop_gradient(_match_advantages(advantages, new))
    log_ratio = new - old
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.mean(jnp.maximum(unclipped, clipped))
    metrics = {
        "policy_loss": loss,
        "ratio_mean": jnp.mean(ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(new.dtype)),
        "approx_kl": 0.5 * jnp.mean(jnp.square(log_ratio)),
    }
    return loss, metrics


def grpo_kl(mean_theta, mean_ref, std, dt, with_dt: bool = False):
    """Per-sample KL penalty to the reference policy, ``[B]``.

    ::

        with_dt=True:   mean_elements (mu_theta - mu_ref)^2 / (2 s_t^2 |dt|)
        with_dt=False:  mean_elements (mu_theta - mu_ref)^2 / (2 s_t^2)           (default, upstream)

    ``std`` is the SDE's diffusion coefficient ``s_t`` (:func:`shelllcc.flow.sde.flow_grpo_sigma`), not the
    step's ``s_t sqrt(|dt|)``; ``std``, ``dt`` scalars or ``[B]``; ``mean_ref`` is frozen (stop_gradient).

    ``with_dt=True`` is the exact KL between the two Gaussian transitions ``N(mu, s_t^2 |dt| I)`` (per
    element); summed over steps it tends to the path-space KL as the steps shrink. Upstream omits ``|dt|``,
    which scales the penalty by ``|dt|`` per step (for 10 uniform steps a factor 0.1). The default follows
    upstream because the published weights (0.01-0.04) were tuned with that form; ``with_dt=True`` with the
    weight multiplied by ``|dt|`` gives the same penalty on a uniform schedule (ours).
    """
    mt = jnp.asarray(mean_theta)
    mt = mt.astype(jnp.promote_types(mt.dtype, jnp.float32))
    mr = jax.lax.stop_gradient(jnp.asarray(mean_ref, mt.dtype))
    if mt.shape != mr.shape or mt.ndim < 1:
        raise ValueError(f"mean_theta and mean_ref must have one shape [B, ...], got {mt.shape} and {mr.shape}")
    sq = jnp.mean(jnp.square(mt - mr).reshape(mt.shape[0], -1), axis=-1)
    var = jnp.square(jnp.asarray(std, mt.dtype))
    if with_dt:
        var = var * jnp.abs(jnp.asarray(dt, mt.dtype))
    if var.ndim not in (0, 1) or (var.ndim == 1 and var.shape[0] != mt.shape[0]):
        raise ValueError(f"std/dt must be scalars or [B]={mt.shape[:1]}, got std shape {jnp.shape(std)}")
    return sq / (2.0 * var)


def grpo_objective(log_prob_new, log_prob_old, advantages, *, kl=None, kl_weight: float = 0.0,
                   clip_eps: float = CLIP_EPS):
    """``L = L_clip + kl_weight * mean(kl)`` with named terms: ``(loss, metrics)``.

    ``kl``: per-sample (and per-step) KL values from :func:`grpo_kl` (``[B]`` or ``[B, K]``), or ``None``
    (DanceGRPO; the KL term is then reported as 0). Metrics: ``loss``, ``policy_loss``, ``kl``
    (the unweighted mean), ``kl_term`` (weighted), and the diagnostics of :func:`grpo_policy_loss`; the same
    keys whatever the options, so the metrics tree is stable under ``jit``.
    """
    policy, metrics = grpo_policy_loss(log_prob_new, log_prob_old, advantages, clip_eps)
    if kl is None:
        if kl_weight:
            raise ValueError(f"kl_weight={kl_weight} needs kl values (grpo_kl)")
        kl_mean = jnp.zeros((), policy.dtype)
    else:
        kl_mean = jnp.mean(jnp.asarray(kl, policy.dtype))
    kl_term = kl_weight * kl_mean
    loss = policy + kl_term
    return loss, {**metrics, "loss": loss, "kl": kl_mean, "kl_term": kl_term}


def select_timesteps(key, num_steps: int, fraction: float, num_samples: int | None = None):
    """Indices of the sampling steps to train on: ``k = max(1, floor(fraction * num_steps))`` distinct steps.

    ``num_samples=None``: one draw ``[k]`` shared by the batch; else an independent draw per sample
    ``[num_samples, k]`` (ours: DanceGRPO's "random 60% of timesteps per update" does not say whether the
    draw is shared). ``fraction = 1`` gives every step (in a random order). Sorted ascending.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    k = max(1, int(fraction * num_steps))

    def one(kk):
        return jnp.sort(jax.random.permutation(kk, num_steps)[:k])

    if num_samples is None:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, num_samples))


def best_of_n_indices(rewards, n_keep: int):
    """DanceGRPO's best-of-n selection: per group, the ``n_keep // 2`` highest- and ``n_keep - n_keep // 2``
    lowest-reward samples, ``[P, n_keep]`` indices into ``G`` (highest first, then lowest ascending).

    Which samples "best-of-n" keeps is ours: the extremes of each group carry the largest advantages (the
    advantages are computed on the whole group before selecting). Ties break by index (``argsort`` is
    stable).
    """
    r = jnp.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [P, G], got shape {r.shape}")
    g = r.shape[1]
    if not 2 <= n_keep <= g:
        raise ValueError(f"n_keep must lie in [2, G={g}], got {n_keep}")
    order = jnp.argsort(-r, axis=1, stable=True)
    top = n_keep // 2
    bottom = n_keep - top
    return jnp.concatenate([order[:, :top], order[:, g - bottom:][:, ::-1]], axis=1)


def gather_groups(x, indices):
    """``x`` ``[P, G, ...]`` -> ``[P, n, ...]`` at per-group ``indices`` ``[P, n]`` (e.g. best-of-n)."""
    x = jnp.asarray(x)
    if indices.ndim != 2 or x.ndim < 2 or x.shape[0] != indices.shape[0]:
        raise ValueError(f"x must be [P, G, ...] and indices [P, n], got {x.shape} and {indices.shape}")
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
