"""Experiment ``flow_dpo``: Flow-DPO (VideoAlign, Liu et al. 2025, Eq. 6) of the Wan DiT on offline preference pairs.

Data: a latent cache with ``latents`` (the winner), ``loser_latents`` and ``text_embeddings`` (what
``experiments/score_samples.py`` writes), read with ``data.extra_fields=("loser_latents",)``; both clips of a
pair are normalised alike (``data.latent_mean/std``). The step minimises (``objectives.flow_dpo_objective``)::

    s ~ flow.sigma_distribution (shifted by flow.shift), one s and one eps per pair, shared by w and l
    err_m(x) = mean over the latent's elements of (v_m(x_s, 1000 s, c) - (eps - x))^2     m in {theta, ref}
    z        = (err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))
    loss     = mean -log sigmoid(-(beta_s / 2) z),   beta_s = dpo.beta (constant) or dpo.beta (1 - s)^2
                                                                                  (dpo.time_dependent)

``dpo.beta`` defaults to the paper's 500; the paper does not say how the errors are reduced, ours is the
per-sample mean over latent elements (sweep beta in {100, 500, 2000} with it). The reference is the starting
model: under LoRA (``lora.rank > 0``, the paper's setting: r 64, alpha 128) the same network with its adapters
zeroed, under full fine-tuning a frozen copy of the starting weights. At step 0 policy = reference, so the
logged loss is ``log 2`` and the implicit reward accuracy (``accuracy``: the share of pairs with ``z < 0``) 0.

Resuming with another ``dpo.beta`` or ``dpo.time_dependent`` is refused (naming the frozen input
``dpo_settings``, which holds both). Writes what ``sft`` writes (``checkpoints/``, ``metrics.jsonl``,
``model/`` with LoRA merged, ...).
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

LOSER_FIELD = "loser_latents"


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("flow_dpo")
    # paper Table 10 (video): LoRA r 64, alpha 128, Adam 5e-6, beta 500
    c.lora.rank, c.lora.alpha = 64, 128.0
    c.optim.learning_rate = 5e-6
    c.data.extra_fields = (LOSER_FIELD,)
    f = sft.default_config().flow
    c.flow = dict(sigma_distribution=f.sigma_distribution, sigma_mean=f.sigma_mean, sigma_std=f.sigma_std,
                  shift=f.shift)
    c.dpo = dict(beta=500.0, time_dependent=False)
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """The method's own settings, before any work (``experiments.main`` calls it first)."""
    if not float(config.dpo.beta) > 0:
        raise ConfigError(f"dpo.beta must be > 0, got {config.dpo.beta}")
    if LOSER_FIELD not in tuple(config.data.extra_fields):
        raise ConfigError(f"data.extra_fields={tuple(config.data.extra_fields)} must hold {LOSER_FIELD!r}: Flow-DPO "
                          f"reads pairs (a score_samples DPO cache)")
    sft.check_flow(config.flow)


def make_loss(config: ml_collections.ConfigDict):
    check_config(config)
    sampler = sft.sigma_sampler(config.flow)
    beta, time_dependent = float(config.dpo.beta), bool(config.dpo.time_dependent)
    lora = config.lora.rank > 0
    print(f"flow_dpo: beta {beta}{' (1 - s)^2' if time_dependent else ' (constant)'}; reference: the starting "
          f"model ({'adapters zeroed' if lora else 'a frozen copy of its weights'})", flush=True)

    def build(setup: dit_setup.Setup):
        def loss_fn(params, frozen, batch, key):
            model = nnx.merge(setup.graphdef, params, frozen["model"])
            beta_in = frozen["dpo_settings"][0]                       # an input: betas share one compilation
            # LoRA: zero adapters are the base model exactly (the delta is B A); full: the frozen copy
            ref_params = jax.tree.map(jnp.zeros_like, params) if lora else frozen["reference"]
            ref = nnx.merge(setup.graphdef, ref_params, frozen["model"])
            k_eps, k_s = jax.random.split(key)
            x0_w = batch["latents"]
            eps = jax.random.normal(k_eps, x0_w.shape, jnp.float32)   # float32 noise whatever the cache dtype
            return objectives.flow_dpo_objective(model, ref, x0_w, batch[LOSER_FIELD], eps, batch["context"], k_s,
                                                 beta=beta_in, time_dependent=time_dependent, sigma_sampler=sampler)

        # the settings as a frozen input: dit_setup.resume_settings records its hash, so a resume with
        # another beta or beta schedule is refused instead of continuing another objective
        rep = parallel.replicated(setup.mesh)
        extra = {"dpo_settings": jnp.asarray([beta, float(time_dependent)], jnp.float32)}
        extra_sh = {"dpo_settings": rep}
        if not lora:
            # a frozen copy of the starting weights, sharded like the trained ones (abstract_step's abstract
            # parameters stay abstract)
            copy = lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x  # noqa: E731
            extra["reference"], extra_sh["reference"] = jax.tree.map(copy, setup.params), setup.param_shardings
        return loss_fn, extra, extra_sh

    return build


def run(config: ml_collections.ConfigDict, workdir: str, on_eval=None):
    return dit_setup.run_training(config, workdir, make_loss(config), on_eval=on_eval)


get_config = config_entry.defaults_entry(default_config)
