"""Experiment ``flow_rwr``: Flow-RWR (VideoAlign, Liu et al. 2025, Eq. 9), reward-weighted flow matching.

Data: a latent cache with ``latents``, ``text_embeddings`` and a per-clip ``reward`` (what
``experiments/score_samples.py`` writes for RWR), read with ``data.extra_fields=("reward",)``. The step
minimises (``objectives.flow_rwr_objective``)::

    s ~ flow.sigma_distribution (shifted by flow.shift),  x_s = (1 - s) x0 + s eps
    err_i = mean over the latent's elements of (v_theta(x_s, 1000 s, c) - (eps - x0))^2
    w     = softmax(r / rwr.temperature)   over the batch
    loss  = sum_i w_i err_i

The paper's weight is ``exp(r / beta)`` with beta unspecified; the temperature knob is that beta, and the
normalisation over the batch (the softmax) is ours: it keeps the loss on the flow-matching loss's scale and
independent of the rewards' offset. The batch is the step's whole global batch, also with
``train.microbatch_size``: the step computes the weights before it splits the batch (``loss_fn.prepare_batch``),
so that one example per pass does not make every weight 1. Resuming with another ``rwr.temperature`` is
refused, naming it. ``flow.text_dropout`` keeps the
null-prompt training of the base as in ``sft``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments import config_entry, dit_setup, sft
from shelllcc import parallel
from shelllcc.errors import ConfigError
from shelllcc.flow import objectives

REWARD_FIELD = "reward"
WEIGHT_ENTRY = "rwr_weight"       # the batch entry the step adds: B softmax(r / T) over the global batch


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("flow_rwr")
    c.optim.learning_rate = 1e-5
    c.data.extra_fields = (REWARD_FIELD,)
    f = sft.default_config().flow
    c.flow = dict(sigma_distribution=f.sigma_distribution, sigma_mean=f.sigma_mean, sigma_std=f.sigma_std,
                  shift=f.shift, text_dropout=0.0)
    c.rwr = dict(temperature=1.0)
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    if not float(config.rwr.temperature) > 0:
        raise ConfigError(f"rwr.temperature must be > 0, got {config.rwr.temperature}")
    if REWARD_FIELD not in tuple(config.data.extra_fields):
        raise ConfigError(f"data.extra_fields={tuple(config.data.extra_fields)} must hold {REWARD_FIELD!r}: Flow-RWR "
                          f"weights each clip by its reward (a score_samples RWR cache)")
    sft.check_flow(config.flow)


def make_loss(config: ml_collections.ConfigDict):
    check_config(config)
    sampler = sft.sigma_sampler(config.flow)
    temperature, dropout = float(config.rwr.temperature), float(config.flow.text_dropout)
    print(f"flow_rwr: weights softmax(reward / {temperature}) over the batch", flush=True)

    def build(setup: dit_setup.Setup):
        def loss_fn(params, frozen, batch, key):
            model = nnx.merge(setup.graphdef, params, frozen["model"])
            k_eps, k_s = jax.random.split(key)
            x0 = batch["latents"]
            eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
            context = objectives.drop_text(jax.random.fold_in(key, 2), batch["context"], dropout)
            return objectives.flow_rwr_objective(model, x0, eps, context, batch[REWARD_FIELD], k_s,
                                                 temperature=frozen["rwr_temperature"], sigma_sampler=sampler,
                                                 weights=batch.get(WEIGHT_ENTRY))

        def prepare_batch(batch, frozen):
            # the weights over the whole global batch, before the step splits it into microbatches: else
            # each microbatch would normalise alone (one example per pass: every weight 1, plain flow matching)
            return {**batch, WEIGHT_ENTRY: objectives.flow_rwr_weights(batch[REWARD_FIELD], frozen["rwr_temperature"])}

        loss_fn.prepare_batch = prepare_batch
        # an input, not a constant: temperatures share one compilation, and dit_setup.resume_settings
        # records its hash, so a resume with another temperature is refused
        return (loss_fn, {"rwr_temperature": jnp.asarray(temperature, jnp.float32)},
                {"rwr_temperature": parallel.replicated(setup.mesh)})

    return build


def run(config: ml_collections.ConfigDict, workdir: str, on_eval=None):
    return dit_setup.run_training(config, workdir, make_loss(config), on_eval=on_eval)


get_config = config_entry.defaults_entry(default_config)
