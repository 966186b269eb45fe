"""GT-SVJ's energy-based video judge (``../shared/ALIGNMENT_METHODS.md`` section 2): the contrastive loss only.

Sign convention: an energy is low for a real (good) clip and high for a generated or perturbed one, so the
judge's reward is ``-E``. The judge gives one energy per latent frame (an MLP head on the generator's
intermediate features); a clip's energy is their mean (:func:`frame_energies_to_clip`; the reduction is
ours, the source does not state it). Positives are real clips, negatives generated clips or real latents
perturbed (:mod:`shelllcc.data.latent_negatives`).
"""

from __future__ import annotations

import jax.numpy as jnp

GT_SVJ_BETA = 0.2     # GT-SVJ's weight of the energy-magnitude regulariser


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


__all__ = ["GT_SVJ_BETA", "energy_contrastive_loss", "frame_energies_to_clip"]
