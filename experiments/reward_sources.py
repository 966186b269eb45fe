"""Rewards of latents as ``(apply, params)`` pairs, for sampling with reward guidance (``sample``) and for scoring
samples (``score_samples``).

The protocol (what the VideoAlign methods need from a reward)::

    apply(params, latents [B, T, H, W, C], timestep [B] in 0..1000, context [B, L, D]) -> [B, 3] or [B]

higher is better; ``[B, 3]`` are VideoAlign's dimensions (VQ, MQ, TA), reduced to one number per clip by
:func:`combine` with per-dimension weights. ``params`` is a pytree passed to jitted programs as an argument
(the weights are not baked into them as constants).

Sources:

* ``reward_model``: a trained latent reward model (``shelllcc.rewards.reward_model``: a ``train_reward_model``
  workdir or its ``model/``), loaded through ``load_reward_model(path)`` and scored by ``score(model, latents,
  timestep, context)``; ``random`` instead of a path is a stand-in for smoke runs
  and tests: a :class:`~shelllcc.rewards.reward_model.LatentRewardModel` on the first block of the generator
  being sampled, with a seeded random readout.
* ``energy_judge``: ``-E`` per clip, GT-SVJ's energy judge (``shelllcc.rewards.energy_judge``: a
  ``train_energy_judge`` workdir or its ``model/``) at the given timestep (it reads no prompt).
* ``shell_lcc``: ``-manifold_distance(manifold, latents, kind)`` per clip (ours: the Shell-LCC distance as a
  reward; it judges clean latents, so the timestep and the prompt are ignored).
* ``pisces``: ``w_Q R_Q + w_S R_S`` per clip (:mod:`shelllcc.rewards.pisces`: the quality reward through the OT map
  and the matcher's probability with the token plan fused), from a ``train_embeddings`` workdir and a
  ``train_ot_map`` workdir; clean latents (the timestep is ignored), the context is the prompt (its mask where it is
  non-zero).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from shelllcc.errors import ConfigError
from shelllcc.rewards import energy_judge as ej
from shelllcc.rewards import reward_model as rm

Apply = Callable[[Any, Any, Any, Any], Any]


@dataclasses.dataclass
class RewardSource:
    apply: Apply                     # (params, latents, timestep, context) -> [B, 3] | [B]
    params: Any
    description: str
    noise_aware: bool                # judges noisy latents at their timestep (else clean ones only)


def combine(rewards, dimension_weights: Sequence[float]) -> jnp.ndarray:
    """One reward per clip: ``sum_k w_k r_k`` for ``[B, 3]`` rewards, the rewards themselves for ``[B]``."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim == 1:
        return r
    w = jnp.asarray(dimension_weights, jnp.float32)
    if r.ndim != 2 or r.shape[-1] != w.shape[0]:
        raise ValueError(f"rewards of shape {r.shape} do not match {w.shape[0]} dimension weights")
    return r @ w


def reward_model_source(path: str, generator: nnx.Module | None = None, seed: int = 0,
                        key: str = "reward_model") -> RewardSource:
    """The noise-aware latent reward model at ``path`` (``key`` names the config key in errors)."""
    if not path:
        raise ConfigError(f"{key} is empty: give a trained reward model, or 'random' (a stand-in for smoke runs)")
    if path == "random":
        if generator is None:
            raise ConfigError(f"{key}='random' needs the generator to build the stand-in from")
        model = rm.LatentRewardModel(generator, num_blocks=1, rngs=nnx.Rngs(seed))
        graphdef, state = nnx.split(model)
        return RewardSource(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), state,
                            f"a random stand-in reward model (seed {seed})", True)
    model = rm.load_reward_model(path)
    graphdef, state = nnx.split(model)
    return RewardSource(lambda p, x, t, c: rm.score(nnx.merge(graphdef, p), x, t, c), state,
                        f"reward model {path}", True)


def energy_judge_source(path: str, generator: nnx.Module | None = None, seed: int = 0,
                        key: str = "energy_judge") -> RewardSource:
    """``-E`` per clip of the energy judge at ``path`` (``key`` names the config key in errors); ``random``
    instead of a path is a stand-in for smoke runs and tests: an energy judge on the first block of the
    generator being sampled, with a seeded random head."""
    if not path:
        raise ConfigError(f"{key} is empty: give a train_energy_judge workdir (or 'random' for smoke runs)")
    if path == "random":
        if generator is None:
            raise ConfigError(f"{key}='random' needs the generator to build the stand-in from")
        judge, what = ej.EnergyJudge(generator, 1, rngs=nnx.Rngs(seed)), f"a random stand-in energy judge (seed {seed})"
    else:
        judge, what = ej.load_energy_judge(path), f"the energy judge {path}"
    graphdef, state = nnx.split(judge)
    return RewardSource(lambda p, x, t, c: -ej.clip_energy(nnx.merge(graphdef, p), x, t), state,
                        f"-energy of {what}", False)


def shell_lcc_source(manifold: str, kind: str, latent_channels: int, key: str = "manifold") -> RewardSource:
    """``-manifold_distance`` per clip for the manifold at ``manifold`` (a ``fit_manifold`` output or workdir,
    a reference ``.pt``, or ``random``)."""
    from experiments.reward_finetune import load_reward_manifold
    from shelllcc.rewards import manifold_distance
    from shelllcc.rewards.manifold_distance import KINDS
    if kind not in KINDS or kind == "shell_band":
        raise ConfigError(f"{key} kind {kind!r}: expected one of {tuple(k for k in KINDS if k != 'shell_band')}")
    if not manifold:
        raise ConfigError(f"{key} is empty: give a fit_manifold output directory (or 'random' for smoke runs)")
    r = ml_collections.ConfigDict(dict(manifold=manifold, random=dict(num_anchors=64, hidden_dim=64,
                                                                      patch_size=(1, 1, 1), seed=0)))
    params, mcfg, _ = load_reward_manifold(r, latent_channels)
    if mcfg.dim != latent_channels * int(np.prod(mcfg.patch_size)):
        raise ConfigError(f"{key} {manifold!r} has D={mcfg.dim} with patch {mcfg.patch_size}; the latents have "
                          f"{latent_channels} channels")

    def apply(p, x, t, c):
        return -manifold_distance(p, x.astype(jnp.float32), kind, patch_size=mcfg.patch_size, per_example=True,
                                  bn_eps=mcfg.bn_eps, shell_eps=mcfg.shell_eps)
    return RewardSource(apply, params, f"-{kind} distance to manifold {manifold}", False)


def pisces_source(embeddings: str, ot_map: str, *, quality_weight: float = 1.0, semantic_weight: float = 1.0,
                  epsilon: float = 0.05, mass: float = 0.9, max_iters: int = 200, tol: float = 1e-3,
                  key: str = "pisces") -> RewardSource:
    """``R_Q + R_S`` per clip (weighted) of PISCES's rewards (module doc); ``key`` names the config section in
    errors (its ``embeddings`` and ``ot_map``)."""
    from shelllcc.rewards import pisces
    if not embeddings:
        raise ConfigError(f"{key}.embeddings is empty: give a train_embeddings workdir")
    if not ot_map:
        raise ConfigError(f"{key}.ot_map is empty: give a train_ot_map workdir")
    try:
        models = pisces.load_models(embeddings, ot_map)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    graphs = models.graphs

    def apply(p, x, t, c):
        del t
        return pisces.pisces_rewards(p, graphs, x, c, quality_weight=quality_weight, semantic_weight=semantic_weight,
                                     epsilon=epsilon, mass=mass, max_iters=max_iters, tol=tol)[0]
    return RewardSource(apply, models.params, models.description, False)


__all__ = ["RewardSource", "combine", "energy_judge_source", "pisces_source", "reward_model_source",
           "shell_lcc_source"]
