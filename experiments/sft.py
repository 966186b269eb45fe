"""Experiment ``sft``: rectified-flow training / fine-tuning of the Wan DiT on a latent cache.

The step (``shelllcc.training.step.make_train_step`` around :func:`loss_fn`) minimises
``mean(w (v_theta(x_s, 1000 s, c) - (eps - x0))^2)`` (``w = 1`` unless ``flow.region_weight``) with
``x_s = (1 - s) x0 + s eps`` and ``s`` drawn from ``flow.sigma_distribution`` (then shifted by
``flow.shift``). Full fine-tuning or LoRA.

Writes under ``workdir``: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``parameters.txt`` and
``model/`` (the final DiT, LoRA merged; ``--config.model.init_from=WORKDIR`` of a later run loads it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments import config_entry, dit_setup
from shelllcc.errors import ConfigError
from shelllcc.flow.objectives import drop_text, region_weights, sft_loss
from shelllcc.flow.timesteps import sample_training_sigmas


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("sft")
    c.optim.learning_rate = 1e-4
    # text_dropout: the share of examples trained with the null (all-zero) prompt, so that the model
    # also predicts the unconditional velocity that classifier-free guidance needs
    # region_weight: with data.weight_field (a [0, 1] map on the latent grid, e.g. the embedded
    # benchmark's object mask), latents in the region weigh 1 + region_weight times the others
    # (objectives.region_weights), so that a small object is not drowned by a large textured background
    c.flow = dict(sigma_distribution="logit_normal", sigma_mean=0.0, sigma_std=1.0, shift=1.0, text_dropout=0.0,
                  region_weight=0.0)
    return c


def sigma_sampler(flow: ml_collections.ConfigDict):
    return functools.partial(sample_training_sigmas, distribution=flow.sigma_distribution, mean=flow.sigma_mean,
                             std=flow.sigma_std, shift=flow.shift)


def check_flow(flow: ml_collections.ConfigDict) -> None:
    """The ``flow`` section's noise levels (and text dropout, where the section has it): the library's own
    checks, re-said with the config key the user has to change."""
    keys = f"flow.sigma_distribution={flow.sigma_distribution!r}"
    try:
        sample_training_sigmas(jax.random.PRNGKey(0), (1,), flow.sigma_distribution)
        if "text_dropout" in flow:
            keys += f", flow.text_dropout={flow.text_dropout}"
            drop_text(jax.random.PRNGKey(0), jnp.zeros((1, 1)), float(flow.text_dropout))
    except ValueError as e:
        raise ConfigError(f"{keys}: {e}") from None


def make_loss(config: ml_collections.ConfigDict):
    sampler = sigma_sampler(config.flow)
    check_flow(config.flow)
    dropout = float(config.flow.text_dropout)
    region_weight = float(config.flow.get("region_weight", 0.0))
    if region_weight < 0:
        raise ConfigError(f"flow.region_weight must be >= 0, got {region_weight}")
    if region_weight and not config.data.get("weight_field", ""):
        raise ConfigError(f"flow.region_weight={region_weight} needs data.weight_field (a region map in the cache)")

    def build(setup: dit_setup.Setup):
        def loss_fn(params, frozen, batch, key):
            model = nnx.merge(setup.graphdef, params, frozen["model"])
            k_eps, k_s = jax.random.split(key)
            x0 = batch["latents"]
            eps = jax.random.normal(k_eps, x0.shape, jnp.float32)   # float32 noise whatever the cache dtype
            context = drop_text(jax.random.fold_in(key, 2), batch["context"], dropout)
            weights = region_weights(batch["weight_map"], region_weight) if region_weight else None
            return sft_loss(model, x0, eps, context, k_s, sigma_sampler=sampler, weights=weights)
        return loss_fn, {}, {}

    return build


def run(config: ml_collections.ConfigDict, workdir: str):
    return dit_setup.run_training(config, workdir, make_loss(config))


get_config = config_entry.defaults_entry(default_config)
