"""GT-SVJ's energy-based video judge (``../shared/ALIGNMENT_METHODS.md`` section 2): the model, its contrastive loss.

Sign convention: an energy is low for a real (good) clip and high for a generated or perturbed one, so the
judge's reward is ``-E``. The judge gives one energy per latent frame (an MLP head on the generator's
intermediate features); a clip's energy is their mean (:func:`frame_energies_to_clip`; the reduction is
ours, the source does not state it). Positives are real clips, negatives generated clips or real latents
perturbed (:mod:`shelllcc.data.latent_negatives`).

:class:`EnergyJudge` is the generator's embeddings and first ``num_blocks`` blocks (a third of them in the
source, with LoRA rank 8: ``shelllcc.training.lora`` on ``model.blocks``) and an MLP head giving one energy
per latent frame. Ours: the head reads the mean of a latent frame's tokens after the last kept block
(``LN -> Dense(D, hidden) -> gelu -> Dense(hidden, 1)``); the judge has no text input (the source states it
cannot judge text alignment), so the backbone's cross-attention sees a zero prompt of one token; inputs may be
noised like the reward model's (``timestep``), the loss's ``t_max = 0`` judges clean latents.

The source then fits "a regression and a BT head on human pairs" without saying how. Ours: an optional second
head (``preference_head=True``: ``preference_hidden``, ``preference_out``) reads the per-frame features averaged
over frames and gives three rewards (VQ, MQ, TA), trained by :func:`make_preference_loss_fn` (BTT, BT or
regression) with the rest of the judge frozen (``experiments/train_energy_judge.py``); the energy, and so the
reward ``-E`` (:func:`clip_energy`), is untouched by it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.data.latent_negatives import PERTURBATIONS, random_negatives
from shelllcc.models import saving
from shelllcc.models.wan_transformer import Dense, KeyStream, WanTransformer, _layer_norm_f32
from shelllcc.rewards.reward_model import BackboneConfig, GeneratorBackbone, noised, preference_loss

GT_SVJ_BETA = 0.2     # GT-SVJ's weight of the energy-magnitude regulariser
GENERATED_NEGATIVE_RATE = 0.3      # GT-SVJ: the share of negatives that are generated clips
KIND = "energy_judge"              # its kind in shelllcc.models.saving (model.json)


def frame_energies_to_clip(e_frames):
    """Per-clip energies ``[B]`` from per-frame ones ``[B, T]``: ``E(x) = mean_t E_t(x)`` (float32; ours)."""
    e_frames = jnp.asarray(e_frames)
    if e_frames.ndim != 2:
        raise ValueError(f"frame_energies_to_clip: e_frames must be [B, T], got shape {e_frames.shape}")
    return jnp.mean(e_frames.astype(jnp.float32), axis=-1)


def energy_contrastive_loss(e_pos, e_neg, beta: float = GT_SVJ_BETA):
    """GT-SVJ's contrastive energy objective on per-clip energies ``e_pos [N+]`` (real) and ``e_neg [N-]``::

        L = mean(E(x+)) - mean(E(x-)) + beta (mean(E(x+)^2) + mean(E(x-)^2))

    It pushes positives' energies down and negatives' up; the square term bounds them: for scalar energies
    the minimum is at ``E(x+) = -1 / (2 beta)``, ``E(x-) = +1 / (2 beta)`` (``-2.5``, ``+2.5`` at beta 0.2),
    where ``L = -1 / (2 beta)``. The two sets may differ in size (the means are separate), e.g. when
    generated negatives are mixed in. Computed in float32.

    Returns ``(loss, metrics)``, metrics with fixed keys: ``loss``, ``energy_pos``, ``energy_neg`` (means),
    ``regulariser`` (the beta term, weighted), ``pair_accuracy`` (the share of pairs with ``E(x+) < E(x-)``,
    element by element, when ``e_pos`` and ``e_neg`` have one shape: a judge that ranks each positive below
    its own negative; ``nan`` when the shapes differ).
    """
    if isinstance(beta, (int, float)) and not beta > 0:      # a traced one is the caller's to check
        raise ValueError(f"energy_contrastive_loss: beta must be > 0 (at 0 the loss is unbounded below), got {beta}")
    e_pos = jnp.asarray(e_pos).astype(jnp.float32)
    e_neg = jnp.asarray(e_neg).astype(jnp.float32)
    mean_pos, mean_neg = jnp.mean(e_pos), jnp.mean(e_neg)
    reg = beta * (jnp.mean(jnp.square(e_pos)) + jnp.mean(jnp.square(e_neg)))
    loss = mean_pos - mean_neg + reg
    if e_pos.shape == e_neg.shape:
        pair_accuracy = jnp.mean((e_pos < e_neg).astype(jnp.float32))
    else:
        pair_accuracy = jnp.full((), jnp.nan, jnp.float32)
    metrics = {"loss": loss, "energy_pos": mean_pos, "energy_neg": mean_neg, "regulariser": reg,
               "pair_accuracy": pair_accuracy}
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class EnergyJudgeConfig(BackboneConfig):
    """What ``model.json`` stores for a saved energy judge."""

    head_hidden: int = 0            # the MLP head's width; 0: the model's dim
    preference_head: bool = False   # a second head, rewards [B, 3] (VQ, MQ, TA) for pairs (ours)


class EnergyJudge(GeneratorBackbone):
    """``(latents [B, T, H, W, C], timestep [B] in 0..1000) -> energies [B, T']`` (``T'`` latent frames after the
    patch embedding's time stride), built from a generator or, when loading, from an :class:`EnergyJudgeConfig`."""

    def __init__(self, generator: WanTransformer | EnergyJudgeConfig, num_blocks: int | None = None, *,
                 head_hidden: int = 0, preference_head: bool = False, rngs: nnx.Rngs):
        if isinstance(generator, EnergyJudgeConfig):
            head_hidden, preference_head = generator.head_hidden, generator.preference_head
        cfg = self.config = self._init_backbone(generator, num_blocks, EnergyJudgeConfig, rngs,
                                                head_hidden=int(head_hidden), preference_head=bool(preference_head))
        hidden = cfg.head_hidden or cfg.dim
        keys = KeyStream(rngs.params())
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, keys=keys)
        self.energy_hidden = Dense(cfg.dim, hidden, (None, None), **kw)
        self.energy_out = Dense(hidden, 1, (None, None), **kw)
        if cfg.preference_head:
            # drawn after the energy head's keys, so a judge with and without it has the same energy head
            self.preference_hidden = Dense(cfg.dim, hidden, (None, None), **kw)
            self.preference_out = Dense(hidden, 3, (None, None), **kw)

    def frame_features(self, latents, timestep) -> jax.Array:
        """The mean of each latent frame's tokens after the last kept block, ``[B, T', D]`` float32."""
        cfg = self.config
        b, t = latents.shape[:2]
        context = jnp.zeros((b, 1, cfg.text_dim), jnp.float32)                 # no text input
        video, _, _ = self.features(latents, timestep, context)
        frames = t // cfg.patch_size[0]
        return jnp.mean(video.astype(jnp.float32).reshape(b, frames, -1, cfg.dim), axis=2)

    def __call__(self, latents, timestep) -> jax.Array:
        per_frame = self.frame_features(latents, timestep)
        h = jax.nn.gelu(self.energy_hidden(_layer_norm_f32(per_frame, self.config.eps)))
        return self.energy_out(h)[..., 0]

    def preferences(self, latents, timestep) -> jax.Array:
        """Rewards ``[B, 3]`` (VQ, MQ, TA; higher is better) of the preference head (ours: the same per-frame
        features, averaged over frames, through ``LN -> Dense(D, hidden) -> gelu -> Dense(hidden, 3)``; no
        text input, so its TA output can only learn what TA labels share with the clip alone)."""
        if not self.config.preference_head:
            raise ValueError("this energy judge has no preference head (built with preference_head=False)")
        pooled = jnp.mean(self.frame_features(latents, timestep), axis=1)
        h = jax.nn.gelu(self.preference_hidden(_layer_norm_f32(pooled, self.config.eps)))
        return self.preference_out(h)


saving.register_kind(KIND, EnergyJudge, EnergyJudgeConfig,
                     runtime=("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers"))


def make_energy_loss_fn(graphdef, *, beta: float = GT_SVJ_BETA, strength: float = 0.5,
                        perturbations=tuple(PERTURBATIONS), generated_rate: float = GENERATED_NEGATIVE_RATE,
                        t_max: float = 0.0):
    """``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` for ``shelllcc.training.step.make_train_step``.

    ``batch``: ``latents`` real clips ``[B, T, H, W, C]`` (positives), optionally ``generated`` ``[B, ...]``
    (the generator's samples). Per clip one negative: its generated twin with probability ``generated_rate``
    (where ``generated`` is given), else the clip perturbed by one of ``perturbations`` at ``strength``
    (:func:`shelllcc.data.latent_negatives.random_negatives`). A positive and its negative share one ``t ~
    U[0, t_max)`` (0: clean) and one ``eps``; one forward pass over ``[positives; negatives]``::

        loss = energy_contrastive_loss(E(x+), E(x-), beta)        E(x) = mean over latent frames of E_t(x)

    Metrics: the loss's, and ``generated_share`` (the share of negatives that are generated clips).
    """
    def loss_fn(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        k_neg, k_gen, k_eps, k_t = jax.random.split(key, 4)
        pos = jnp.asarray(batch["latents"], jnp.float32)
        neg, _ = random_negatives(k_neg, pos, strength, perturbations)
        b = pos.shape[0]
        use_generated = jnp.zeros((b,), bool)
        if "generated" in batch:
            use_generated = jax.random.bernoulli(k_gen, generated_rate, (b,))
            gen = jnp.asarray(batch["generated"], jnp.float32)
            neg = jnp.where(use_generated.reshape((b,) + (1,) * (pos.ndim - 1)), gen, neg)
        eps = jax.random.normal(k_eps, pos.shape, jnp.float32)
        t = jax.random.uniform(k_t, (b,), jnp.float32, 0.0, t_max) if t_max > 0 else jnp.zeros((b,), jnp.float32)
        x = jnp.concatenate([noised(pos, eps, t), noised(neg, eps, t)])
        e = frame_energies_to_clip(model(x, 1000.0 * jnp.concatenate([t, t])))
        loss, metrics = energy_contrastive_loss(e[:b], e[b:], beta)
        return loss, {**metrics, "generated_share": jnp.mean(use_generated.astype(jnp.float32))}

    return loss_fn


def make_preference_loss_fn(graphdef, kind: str = "btt", t_max: float = 0.0, theta: float = 5.0):
    """``loss_fn(params, frozen, batch, key) -> (loss, metrics)``: the preference head on pairs (``batch``: ``z_a``,
    ``z_b`` ``[B, ...]``, ``labels`` int ``[B, 3]``; a ``context`` is ignored: the judge reads no text).

    ``r = judge.preferences(x)`` ``[B, 3]``; per pair one ``t ~ U[0, t_max)`` (0: clean) and one ``eps``, shared by
    its two clips; ``loss = preference_loss(kind, r(A), r(B), labels, theta)`` (BTT with ties, BT without,
    or regression: :func:`shelllcc.rewards.reward_model.preference_loss`). Metrics: ``loss``,
    ``acc_without_ties`` (the share of decided labels whose sign the head gets right).
    """
    preference_loss(kind, jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3), jnp.int32))   # validates kind

    def loss_fn(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        k_eps, k_t = jax.random.split(key)
        z_a, z_b = jnp.asarray(batch["z_a"], jnp.float32), jnp.asarray(batch["z_b"], jnp.float32)
        b = z_a.shape[0]
        eps = jax.random.normal(k_eps, z_a.shape, jnp.float32)
        t = jax.random.uniform(k_t, (b,), jnp.float32, 0.0, t_max) if t_max > 0 else jnp.zeros((b,), jnp.float32)
        r = model.preferences(jnp.concatenate([noised(z_a, eps, t), noised(z_b, eps, t)]),
                              1000.0 * jnp.concatenate([t, t]))
        labels = batch["labels"]
        loss = preference_loss(kind, r[:b], r[b:], labels, theta)
        decided = (labels == 1) | (labels == -1)
        right = decided & (jnp.sign(r[:b] - r[b:]) == labels)
        return loss, {"loss": loss, "acc_without_ties": jnp.sum(right) / jnp.maximum(jnp.sum(decided), 1)}

    return loss_fn


def load_energy_judge(path: str, **runtime) -> EnergyJudge:
    """A saved energy judge: ``path`` is its directory (``model.json`` of kind ``energy_judge``) or the workdir
    of a ``train_energy_judge`` run (its ``model/``). ``runtime``: dtypes, attention kernel."""
    import os
    d = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    info = saving.read_model_json(d)
    if info["kind"] != KIND:
        raise ValueError(f"{d!r} holds a {info['kind']!r} model, not an {KIND} (train one with train_energy_judge)")
    return saving.load_model(d, **runtime)


def clip_energy(judge: EnergyJudge, latents, timestep=0.0) -> jax.Array:
    """Per-clip energies ``[B]`` (lower: more real) of normalised latents at ``timestep`` (``[B]`` or a scalar in
    0..1000). Pure in ``latents`` (differentiable: the judge's reward ``-E`` guides and fine-tunes)."""
    b = latents.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
    return frame_energies_to_clip(judge(jnp.asarray(latents, jnp.float32), t))


__all__ = ["GENERATED_NEGATIVE_RATE", "GT_SVJ_BETA", "KIND", "EnergyJudge", "EnergyJudgeConfig", "clip_energy",
           "energy_contrastive_loss", "frame_energies_to_clip", "load_energy_judge", "make_energy_loss_fn",
           "make_preference_loss_fn"]
