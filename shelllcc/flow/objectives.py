"""Generator objectives, as pure, jit-able functions: reward fine-tuning (DESIGN 2.5: ``one_step_from_noise``,
``noised_data``, ``sft_loss``) and VideoAlign's preference and reward-weighted objectives (``flow_dpo_*``,
``flow_rwr_*``, on the per-sample ``velocity_errors``; ``../shared/ALIGNMENT_METHODS.md`` section 1), and our
reconstruction of HALO's Gran-DPO (``gran_dpo_loss``, section 3).

Conventions (see :mod:`shelllcc.flow.rectified`): ``x_s = (1 - s) x0 + s eps``, target
``v = eps - x0``, model timestep ``1000 s``, one-step denoise ``z = x_s - s v``.

* ``velocity_fn(x, timestep, context) -> v`` with ``x`` channels-last ``[B, T, H, W, C]`` (any
  ``[B, ...]`` works), ``timestep`` float ``[B]`` (``1000 s``). The trainable parameters are whatever
  ``velocity_fn`` closes over (or the caller binds), so ``jax.grad`` of a wrapper that builds the
  closure differentiates through every objective here.
* ``reward_fn(z) -> distance`` returns a scalar or a per-example ``[B]`` distance *to minimise*
  (e.g. ``lambda z: manifold_distance(params, z, "shell")``); a ``[B]`` result is averaged.
* Every objective returns ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars with
  the same keys whatever the options, so that the metrics tree is stable under ``jax.jit``.
* Noise levels: ``s=None`` draws them from ``key``; an explicit ``[B]`` (or scalar) ``s`` is used
  as given (tests, or a caller that wants to log/reuse the draw). ``key`` is unused then.
* Each objective evaluates the trained model exactly once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from shelllcc.flow.rectified import add_noise, denoise, flow_matching_loss, model_timestep
from shelllcc.flow.timesteps import uniform_sigmas

VelocityFn = Callable[[jax.Array, jax.Array, object], jax.Array]
RewardFn = Callable[[jax.Array], jax.Array]
SigmaSampler = Callable[[jax.Array, tuple], jax.Array]


def _noise_levels(key, s, batch: int, lo: float, hi: float, sigma_sampler: SigmaSampler | None):
    """Per-example ``s`` of shape ``[B]`` in float32: the given one, else a draw from ``key``."""
    if s is None:
        if sigma_sampler is not None:
            s = sigma_sampler(key, (batch,))
        else:
            s = uniform_sigmas(key, (batch,), lo, hi)
    s = jnp.asarray(s, jnp.float32)
    # a scalar is a valid noise level for the rectified-flow helpers, but the model's timestep
    # input is per example, so expand it here once
    return jnp.broadcast_to(s, (batch,)) if s.ndim == 0 else s


def _reward(reward_fn: RewardFn, z) -> jax.Array:
    # the reward may be per example ([B]); the objective is its batch mean, in float32
    return jnp.mean(jnp.asarray(reward_fn(z), jnp.float32))


def _s_metrics(s) -> dict:
    return {"s_mean": jnp.mean(s), "s_min": jnp.min(s), "s_max": jnp.max(s)}


def _mse(a, b) -> jax.Array:
    # float32 accumulation: a bfloat16 mean over a video latent loses most of its mantissa
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def one_step_from_noise(velocity_fn: VelocityFn, reward_fn: RewardFn, eps, context, key, *,
                        s_lo: float = 0.7, s_hi: float = 1.0, s=None,
                        ref_velocity_fn: VelocityFn | None = None, drift_margin: float = 0.0,
                        drift_weight: float = 1.0):
    """Reference one-step reward objective from pure noise.

    ::

        x      = eps
        s      ~ U[s_lo, s_hi)                      (per example, [B]; or the given ``s``)
        z      = x - s * v_theta(x, 1000 s, c)      (one-step denoise)
        z_ref  = x - s * stop_gradient(v_ref(x, 1000 s, c))
        drift  = mean((z - z_ref)^2)                (over every element of the batch)
        loss   = mean_B reward_fn(z) + drift_weight * relu(drift - drift_margin)

    The anti-drift term is present only with ``ref_velocity_fn`` (a frozen reference model);
    without it ``drift`` and the penalty are reported as 0. It is zero whenever the model's one-step
    output stays within ``drift_margin`` (mean squared) of the reference's, so the reward can move
    the generator freely in that ball but pays linearly for leaving it.

    Returns ``(loss, metrics)`` with metrics ``loss``, ``reward`` (the mean distance),
    ``drift_mse``, ``drift_penalty``, ``s_mean``, ``s_min``, ``s_max``.
    """
    x = eps
    s = _noise_levels(key, s, x.shape[0], s_lo, s_hi, None)
    t = model_timestep(s)
    z = denoise(x, velocity_fn(x, t, context), s)
    reward = _reward(reward_fn, z)
    if ref_velocity_fn is not None:
        # the reference is frozen: no gradient may flow into it (nor through it into shared inputs)
        v_ref = jax.lax.stop_gradient(ref_velocity_fn(x, t, context))
        z_ref = denoise(x, v_ref, s)
        drift = _mse(z, z_ref)
        penalty = drift_weight * jax.nn.relu(drift - drift_margin)
    else:
        drift = jnp.zeros((), jnp.float32)
        penalty = jnp.zeros((), jnp.float32)
    loss = reward + penalty
    metrics = {"loss": loss, "reward": reward, "drift_mse": drift, "drift_penalty": penalty,
               **_s_metrics(s)}
    return loss, metrics


def noised_data(velocity_fn: VelocityFn, reward_fn: RewardFn, x0, eps, context, key, *,
                s_lo: float = 0.7, s_hi: float = 1.0, sft_weight: float = 1.0,
                sigma_sampler: SigmaSampler | None = None, s=None):
    """Noised-data reward objective with a flow-matching (SFT) anchor on the same batch.

    ::

        s     ~ sigma_sampler(key, [B])  or  U[s_lo, s_hi)   (or the given ``s``)
        x     = (1 - s) x0 + s eps
        v     = v_theta(x, 1000 s, c)                        (one forward pass, used twice)
        z     = x - s v
        loss  = mean_B reward_fn(z) + sft_weight * mean((v - (eps - x0))^2)

    Sharing ``v`` between the reward and the flow-matching term is what keeps the cost at one
    model evaluation; it also means both terms see the same noise levels. With ``sft_weight = 0``
    it is the reward of :func:`shelllcc.flow.rectified.denoise` on noised data.

    Returns ``(loss, metrics)`` with metrics ``loss``, ``reward``, ``sft`` (the unweighted
    flow-matching loss), ``s_mean``, ``s_min``, ``s_max``.
    """
    s = _noise_levels(key, s, x0.shape[0], s_lo, s_hi, sigma_sampler)
    x = add_noise(x0, eps, s)
    v = velocity_fn(x, model_timestep(s), context)
    z = denoise(x, v, s)
    reward = _reward(reward_fn, z)
    sft = flow_matching_loss(v, x0, eps)
    loss = reward + sft_weight * sft
    metrics = {"loss": loss, "reward": reward, "sft": sft, **_s_metrics(s)}
    return loss, metrics


def drop_text(key, context, rate: float):
    """Classifier-free-guidance training: each example's context replaced by zeros with probability ``rate``.

    ::

        keep_b ~ Bernoulli(1 - rate)       (per example)
        c'_b   = keep_b * c_b               (zeros: the null prompt the samplers use as negative context)

    ``rate = 0`` returns ``context`` unchanged (no key is consumed).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"text dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return context
    keep = jax.random.bernoulli(key, 1.0 - rate, (context.shape[0],) + (1,) * (context.ndim - 1))
    return jnp.where(keep, context, jnp.zeros_like(context))


def sft_loss(velocity_fn: VelocityFn, x0, eps, context, key, *,
             sigma_sampler: SigmaSampler | None = None, s=None, weights=None):
    """Plain rectified-flow matching (the ``sft`` experiment and the no-reward control).

    ::

        s     ~ sigma_sampler(key, [B])  or  U[0, 1)          (or the given ``s``)
        x     = (1 - s) x0 + s eps
        loss  = mean(w * (v_theta(x, 1000 s, c) - (eps - x0))^2)      (w = 1 without ``weights``)

    ``sigma_sampler(key, shape) -> s`` is e.g.
    ``functools.partial(sample_training_sigmas, distribution="logit_normal", shift=3.0)``.
    ``weights``: broadcasts against ``x0`` (e.g. a per-latent region weight ``[B, T, H, W, 1]``); the
    caller normalises it (a mean of 1 keeps the loss on the plain loss's scale).

    Returns ``(loss, metrics)`` with metrics ``loss``, ``sft``, ``s_mean``, ``s_min``, ``s_max``, and
    with ``weights`` also ``sft_unweighted`` (the plain mean, comparable across weightings).
    """
    s = _noise_levels(key, s, x0.shape[0], 0.0, 1.0, sigma_sampler)
    x = add_noise(x0, eps, s)
    v = velocity_fn(x, model_timestep(s), context)
    loss = flow_matching_loss(v, x0, eps, weights)
    metrics = {"loss": loss, "sft": loss, **_s_metrics(s)}
    if weights is not None:
        metrics["sft_unweighted"] = flow_matching_loss(v, x0, eps)
    return loss, metrics


def region_weights(region, weight: float):
    """Per-latent loss weights from a region map ``region [B, T, H, W]`` in [0, 1]::

        w = (1 + weight * region) / mean_{T,H,W}(1 + weight * region)      -> [B, T, H, W, 1]

    Each example's weights average 1, so ``weight = 0`` is the plain loss and any weight keeps its
    scale; a region covering a fraction ``a`` of the clip gets ``(1 + weight) a / (1 + weight a)`` of it.
    """
    w = 1.0 + float(weight) * jnp.asarray(region, jnp.float32)
    w = w / jnp.mean(w, axis=tuple(range(1, w.ndim)), keepdims=True)
    return w[..., None]


def flow_dpo_loss(err_theta_w, err_ref_w, err_theta_l, err_ref_l, t, beta, time_dependent: bool = False):
    """Flow-DPO (VideoAlign Eq. 6) from the per-sample velocity errors of a preference pair.

    Each ``err_*`` is ``[B]``: the mean over a latent's elements of ``(v_m(x_t, t, y) - (eps - x0))^2`` for
    the policy (``theta``) or the frozen reference (``ref``) on the winner ``w`` or loser ``l``, with one
    shared ``eps`` and ``t`` per pair (``t`` ``[B]``, t = 1 is noise)::

        beta_t = beta                       (constant: the paper's recommendation)
               = beta (1 - t)^2             (time_dependent: the literal derivation; reward-hacks, paper Table 4)
        z      = (err_theta_w - err_ref_w) - (err_theta_l - err_ref_l)
        loss   = mean_B -log sigmoid(-(beta_t / 2) z)

    The caller stops gradients into the reference errors; this function only combines them.
    """
    f = lambda x: jnp.asarray(x, jnp.float32)
    t = f(t)
    beta_t = f(beta) * jnp.square(1.0 - t) if time_dependent else jnp.broadcast_to(f(beta), t.shape)
    z = (f(err_theta_w) - f(err_ref_w)) - (f(err_theta_l) - f(err_ref_l))
    return -jnp.mean(jax.nn.log_sigmoid(-0.5 * beta_t * z))


def _masked_mean_errors(err_map, patch_masks) -> jax.Array:
    """``[B, P]``: per example, the mean of the per-element errors ``err_map [B, T, H, W(, C)]`` over each mask
    ``patch_masks [P, T, H, W]`` (and every channel)."""
    m = patch_masks.astype(jnp.float32)
    e = err_map if err_map.ndim == 4 else jnp.mean(err_map, axis=tuple(range(4, err_map.ndim)))
    # the channel mean first: a mean over (mask x channels) is the mask-weighted mean of the channel means
    return jnp.einsum("bthw,pthw->bp", e, m) / jnp.maximum(jnp.sum(m, axis=(1, 2, 3)), 1.0)


def gran_dpo_loss(err_theta_w, err_ref_w, err_theta_l, err_ref_l, t, patch_masks, patch_rewards_w, patch_rewards_l,
                  *, beta, delta: float, lam: float, time_dependent: bool = False):
    """Gran-DPO (HALO, arXiv 2502.06812) as we reconstruct it from the abstract (``ALIGNMENT_METHODS.md``
    section 3): Flow-DPO on the whole clips plus Flow-DPO on the patches whose patch rewards disagree.

    Inputs (the layout is ours): ``err_*`` the per-element squared velocity errors ``(v_m(x_t, t, y) - (eps -
    x0))^2`` of a pair, ``[B, T, H, W]`` or ``[B, T, H, W, C]`` on the latent grid, policy (``theta``) or frozen
    reference (``ref``), winner ``w`` and loser ``l`` ordered by the *video* reward, one shared ``eps`` and
    ``t`` ``[B]`` per pair; ``patch_masks [P, T, H, W]`` in {0, 1}, the same patches for every clip;
    ``patch_rewards_w``, ``patch_rewards_l`` ``[B, P]`` (e.g. the Shell-LCC per-patch manifold distance,
    negated). With ``e(x)`` the mean over all elements and ``e_p(x)`` the mean over the elements of mask ``M_p``
    (and all channels)::

        L_video  = flow_dpo_loss(e(theta, w), e(ref, w), e(theta, l), e(ref, l), t)
        S        = {(b, p) : |r_w,bp - r_l,bp| > delta  and  M_p not empty}
        (w', l') = (w, l) if r_w,bp >= r_l,bp else (l, w)              (each patch ordered by its own rewards)
        L_bp     = flow_dpo_loss(e_p(theta, w'), e_p(ref, w'), e_p(theta, l'), e_p(ref, l'), t_b)
        L_patch  = mean over S of L_bp         (0 when S is empty)
        L        = L_video + lam * L_patch

    From the source: the two terms, patch-level ordering by patch rewards, the threshold on their difference.
    Ours: Flow-DPO as the patch loss with the clip's ``beta_t``, the errors restricted to a patch as the mean over
    its mask, the mean over the selected (clip, patch) entries of the whole batch (not per clip), empty masks
    never selected. The rewards are data (no gradient); the caller stops gradients into the reference errors.

    Returns ``(loss, metrics)``, metrics with fixed keys: ``loss``, ``video_loss``, ``patch_loss`` (unweighted),
    ``patch_selected`` (the share of (clip, patch) entries in S), ``patch_flipped`` (the share of S ordered
    against the video reward, ``r_l,bp > r_w,bp``; 0 when S is empty).
    """
    for name, value in (("delta", delta), ("lam", lam)):
        if isinstance(value, (int, float)) and not value >= 0:      # a traced one is the caller's to check
            raise ValueError(f"gran_dpo_loss: {name} must be >= 0, got {value}")
    f = lambda x: jnp.asarray(x, jnp.float32)
    e_tw, e_rw, e_tl, e_rl = (f(e) for e in (err_theta_w, err_ref_w, err_theta_l, err_ref_l))
    patch_masks = jnp.asarray(patch_masks)
    if e_tw.ndim not in (4, 5) or patch_masks.ndim != 4 or patch_masks.shape[1:] != e_tw.shape[1:4]:
        raise ValueError(f"gran_dpo_loss: patch_masks must be [P, T, H, W] on the errors' grid [B, T, H, W(, C)], "
                         f"got patch_masks {patch_masks.shape} and errors {e_tw.shape}")
    b, p = e_tw.shape[0], patch_masks.shape[0]
    r_w = jax.lax.stop_gradient(f(patch_rewards_w))
    r_l = jax.lax.stop_gradient(f(patch_rewards_l))
    if r_w.shape != (b, p) or r_l.shape != (b, p):
        raise ValueError(f"gran_dpo_loss: patch rewards must be [B, P] = {(b, p)}, got {r_w.shape} and {r_l.shape}")
    t = f(t)

    clip_mean = lambda e: jnp.mean(e, axis=tuple(range(1, e.ndim)))
    video = flow_dpo_loss(clip_mean(e_tw), clip_mean(e_rw), clip_mean(e_tl), clip_mean(e_rl), t, beta, time_dependent)

    pe_tw, pe_rw, pe_tl, pe_rl = (_masked_mean_errors(e, patch_masks) for e in (e_tw, e_rw, e_tl, e_rl))
    flip = r_l > r_w
    order = lambda a, z: (jnp.where(flip, z, a), jnp.where(flip, a, z))
    (pe_tw, pe_tl), (pe_rw, pe_rl) = order(pe_tw, pe_tl), order(pe_rw, pe_rl)
    # flow_dpo_loss of one entry is that entry's loss: mapped over the (clip, patch) entries it gives each L_bp
    per_patch = jax.vmap(lambda a, r, c, d, tt: flow_dpo_loss(a, r, c, d, tt, beta, time_dependent))(
        *(x.reshape(-1) for x in (pe_tw, pe_rw, pe_tl, pe_rl, jnp.broadcast_to(t[:, None], (b, p)))))
    nonempty = jnp.sum(patch_masks, axis=(1, 2, 3)) > 0
    selected = ((jnp.abs(r_w - r_l) > delta) & nonempty[None, :]).reshape(-1)
    n_sel = jnp.sum(selected.astype(jnp.float32))
    patch = jnp.sum(jnp.where(selected, per_patch, 0.0)) / jnp.maximum(n_sel, 1.0)
    loss = video + lam * patch
    metrics = {"loss": loss, "video_loss": video, "patch_loss": patch, "patch_selected": n_sel / (b * p),
               "patch_flipped": jnp.sum((selected & flip.reshape(-1)).astype(jnp.float32)) / jnp.maximum(n_sel, 1.0)}
    return loss, metrics


def velocity_error_maps(velocity_fn: VelocityFn, x0, eps, context, s) -> jax.Array:
    """Per-element flow-matching errors, the shape of ``x0`` (float32)::

        x_s = (1 - s) x0 + s eps,    err = (v(x_s, 1000 s, c) - (eps - x0))^2

    ``s`` is ``[B]`` (or a scalar). Gran-DPO reads them per patch; ``velocity_errors`` is their mean.
    """
    s = _noise_levels(None, s, x0.shape[0], 0.0, 1.0, None)
    x = add_noise(x0, eps, s)
    v = velocity_fn(x, model_timestep(s), context)
    return jnp.square(v.astype(jnp.float32) - (eps - x0).astype(jnp.float32))


def velocity_errors(velocity_fn: VelocityFn, x0, eps, context, s) -> jax.Array:
    """Per-sample flow-matching errors ``[B]`` (float32), shared by Flow-DPO and Flow-RWR::

        x_s    = (1 - s) x0 + s eps
        err_b  = mean over the latent's elements of (v(x_s, 1000 s, c) - (eps - x0))^2

    ``s`` is ``[B]`` (or a scalar). The mean over elements (not the sum) is the reduction: it fixes the
    scale on which Flow-DPO's ``beta`` acts (VideoAlign does not state theirs; see ``flow_dpo_loss``).
    """
    d = velocity_error_maps(velocity_fn, x0, eps, context, s)
    return jnp.mean(d, axis=tuple(range(1, d.ndim)))


def _pair_errors(error_fn, velocity_fn, ref_velocity_fn, x0_w, x0_l, eps, context, s):
    """``(err_theta(w), err_theta(l), err_ref(w), err_ref(l))`` by ``error_fn`` (``velocity_errors`` or
    ``velocity_error_maps``), one ``eps`` and ``s`` per pair; each model runs once on the stacked ``[w; l]``
    batch, the reference's errors under ``stop_gradient``."""
    b = x0_w.shape[0]
    x0 = jnp.concatenate([x0_w, x0_l])
    eps2, s2 = jnp.concatenate([eps, eps]), jnp.concatenate([s, s])
    ctx2 = jax.tree.map(lambda c: jnp.concatenate([c, c]), context)
    err = error_fn(velocity_fn, x0, eps2, ctx2, s2)
    err_ref = jax.lax.stop_gradient(error_fn(ref_velocity_fn, x0, eps2, ctx2, s2))
    return err[:b], err[b:], err_ref[:b], err_ref[b:]


def flow_dpo_objective(velocity_fn: VelocityFn, ref_velocity_fn: VelocityFn, x0_w, x0_l, eps, context, key, *,
                       beta: float, time_dependent: bool = False, sigma_sampler: SigmaSampler | None = None, s=None):
    """Flow-DPO on a batch of preference pairs (winner ``x0_w``, loser ``x0_l``, both ``[B, ...]``).

    ::

        s ~ sigma_sampler(key, [B])  (or the given s); one eps [B, ...] and one s per pair, for w and l alike
        err_m(x) = velocity_errors(v_m, x, eps, c, s)         m in {theta, ref}, x in {w, l}
        z        = (err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))
        loss     = flow_dpo_loss(...) = mean_B -log sigmoid(-(beta_t / 2) z)

    Each model runs once on the stacked ``[w; l]`` batch (``2B`` rows). The reference is frozen: its errors
    are under ``stop_gradient``. With policy = reference, ``z = 0`` and the loss is ``log 2``.

    Returns ``(loss, metrics)``: ``loss``, ``accuracy`` (the implicit reward accuracy: the share of pairs with
    ``z < 0``, i.e. the policy lowered the winner's error relative to the reference more than the loser's),
    ``margin`` (mean of ``-z``), ``err_theta_w``, ``err_theta_l``, ``err_ref_w``, ``err_ref_l`` (means),
    ``s_mean``, ``s_min``, ``s_max``.
    """
    s = _noise_levels(key, s, x0_w.shape[0], 0.0, 1.0, sigma_sampler)
    e_tw, e_tl, e_rw, e_rl = _pair_errors(velocity_errors, velocity_fn, ref_velocity_fn, x0_w, x0_l, eps, context, s)
    loss = flow_dpo_loss(e_tw, e_rw, e_tl, e_rl, s, beta, time_dependent)
    z = (e_tw - e_rw) - (e_tl - e_rl)
    metrics = {"loss": loss, "accuracy": jnp.mean((z < 0).astype(jnp.float32)), "margin": -jnp.mean(z),
               "err_theta_w": jnp.mean(e_tw), "err_theta_l": jnp.mean(e_tl), "err_ref_w": jnp.mean(e_rw),
               "err_ref_l": jnp.mean(e_rl), **_s_metrics(s)}
    return loss, metrics


def gran_dpo_objective(velocity_fn: VelocityFn, ref_velocity_fn: VelocityFn, x0_w, x0_l, eps, context, key,
                       patch_masks, patch_rewards_w, patch_rewards_l, *, beta: float, delta: float, lam: float,
                       time_dependent: bool = False, sigma_sampler: SigmaSampler | None = None, s=None):
    """Gran-DPO (our reconstruction, see ``gran_dpo_loss``) on a batch of preference pairs ``[B, T, H, W, C]``,
    winner ``x0_w`` and loser ``x0_l`` ordered by the video reward, with patch rewards ``[B, P]`` on the
    patches ``patch_masks [P, T, H, W]``::

        s, eps as flow_dpo_objective (one per pair)
        err_m(x) = velocity_error_maps(v_m, x, eps, c, s)      m in {theta, ref}, x in {w, l}
        loss     = gran_dpo_loss(err_theta(w), err_ref(w), err_theta(l), err_ref(l), s, masks, r_w, r_l)

    Each model runs once on the stacked ``[w; l]`` batch; the reference's errors are under ``stop_gradient``.
    With ``lam = 0`` it is ``flow_dpo_objective``'s loss; with policy = reference every term is ``log 2``.
    Returns ``(loss, metrics)``: ``gran_dpo_loss``'s metrics and ``s_mean``, ``s_min``, ``s_max``.
    """
    s = _noise_levels(key, s, x0_w.shape[0], 0.0, 1.0, sigma_sampler)
    e_tw, e_tl, e_rw, e_rl = _pair_errors(velocity_error_maps, velocity_fn, ref_velocity_fn, x0_w, x0_l, eps, context, s)
    loss, metrics = gran_dpo_loss(e_tw, e_rw, e_tl, e_rl, s, patch_masks, patch_rewards_w, patch_rewards_l,
                                  beta=beta, delta=delta, lam=lam, time_dependent=time_dependent)
    return loss, {**metrics, **_s_metrics(s)}


def flow_rwr_loss(errors, rewards, temperature: float):
    """Flow-RWR (VideoAlign Eq. 9) with the weights normalised over the batch::

        w_i  = softmax_i(r_i / temperature)                  (over the batch; sum_i w_i = 1)
        loss = sum_i w_i err_i                               err_i: per-sample mean squared velocity error

    The paper writes ``E[exp(r / beta) ||v - v_theta||^2]`` and leaves beta unspecified; normalising the
    exponential weights over the batch (a softmax) is ours: it keeps the loss on the scale of the plain
    flow-matching loss (equal rewards give ``mean_i err_i``) whatever the rewards' offset. The weights are
    data (no gradient flows into the rewards). ``errors``, ``rewards``: ``[B]``.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:     # a traced one is the caller's to check
        raise ValueError(f"the Flow-RWR temperature must be > 0, got {temperature}")
    r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    w = jax.nn.softmax(r / jnp.asarray(temperature, jnp.float32))
    return jnp.sum(w * jnp.asarray(errors, jnp.float32))


def flow_rwr_weights(rewards, temperature) -> jax.Array:
    """Flow-RWR's weights scaled to mean 1 over the batch: ``B softmax(r / temperature)`` ``[B]`` (no gradient).

    With these, ``mean_i(w_i err_i)`` is :func:`flow_rwr_loss`; computed on the whole batch before a microbatch
    split, the mean of the microbatches' means is still the whole batch's softmax-weighted loss."""
    r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    return r.shape[0] * jax.nn.softmax(r / jnp.asarray(temperature, jnp.float32))


def flow_rwr_objective(velocity_fn: VelocityFn, x0, eps, context, rewards, key, *, temperature: float,
                       sigma_sampler: SigmaSampler | None = None, s=None, weights=None):
    """Flow-RWR on a batch: ``s`` as in :func:`sft_loss`, ``err = velocity_errors(...)``, the loss
    :func:`flow_rwr_loss`, or ``mean(weights * err)`` with ``weights`` from :func:`flow_rwr_weights` of the
    whole batch when this batch is a microbatch of it. Returns ``(loss, metrics)``: ``loss``, ``sft`` (the
    unweighted mean error), ``weight_max`` (the largest softmax weight of this batch's rows), ``ess`` (the
    effective sample size ``1 / sum p^2`` as a share of the batch, ``p`` the softmax weights: 1 with equal
    weights; of this batch's weights), ``reward_mean``, ``s_mean``, ``s_min``, ``s_max``."""
    s = _noise_levels(key, s, x0.shape[0], 0.0, 1.0, sigma_sampler)
    err = velocity_errors(velocity_fn, x0, eps, context, s)
    if weights is None:
        loss = flow_rwr_loss(err, rewards, temperature)
        weights = flow_rwr_weights(rewards, temperature)
    else:
        loss = jnp.mean(jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32)) * err)
    p = weights / jnp.sum(weights)
    metrics = {"loss": loss, "sft": jnp.mean(err), "weight_max": jnp.max(weights) / weights.shape[0],
               "ess": 1.0 / (jnp.sum(jnp.square(p)) * x0.shape[0]),
               "reward_mean": jnp.mean(jnp.asarray(rewards, jnp.float32)), **_s_metrics(s)}
    return loss, metrics


__all__ = ["flow_dpo_loss", "flow_dpo_objective", "gran_dpo_loss", "gran_dpo_objective", "velocity_error_maps",
           "flow_rwr_loss", "flow_rwr_objective", "flow_rwr_weights", "velocity_errors", "one_step_from_noise",
           "noised_data", "sft_loss", "region_weights", "drop_text"]
