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

**Gran-DPO** (``dpo.patch_source`` set): our reconstruction of HALO's Gran-DPO from its abstract
(arXiv 2502.06812; ``../shared/ALIGNMENT_METHODS.md`` section 3; the loss is
:func:`shelllcc.flow.objectives.gran_dpo_loss`, every choice there ours): the Flow-DPO term above plus, for each
patch of ``dpo.patch`` latent cells whose patch rewards of winner and loser differ by more than ``dpo.delta``,
Flow-DPO on the errors restricted to the patch's latent mask (the pair ordered by the patch rewards), weighted
by ``dpo.lam``. The patch rewards of both clips are computed on the clean latents inside the step (no gradient):

* ``patch_model``: the learned patch reward model at ``dpo.patch_model`` (``experiments/train_patch_reward.py``;
  its patch must be ``dpo.patch``);
* ``shell``: training-free, ``-region_distances`` of the Shell-LCC manifold ``dpo.manifold`` (kind
  ``dpo.manifold_kind``) on the same masks (ours: where the two papers meet).

At ``dpo.lam = 0`` the loss is Flow-DPO's.

Resuming with another ``dpo.beta`` or ``dpo.time_dependent`` (or another Gran-DPO setting) is refused (naming the frozen input
``dpo_settings``, which holds both). Writes what ``sft`` writes (``checkpoints/``, ``metrics.jsonl``,
``model/`` with LoRA merged, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments import config_entry, dit_setup, sft
from experiments.reward_finetune import load_reward_manifold
from shelllcc import parallel
from shelllcc.errors import ConfigError
from shelllcc.flow import objectives
from shelllcc.rewards import patch_reward
from shelllcc.rewards.manifold_distance import KINDS

LOSER_FIELD = "loser_latents"
PATCH_SOURCES = ("", "patch_model", "shell")      # '': plain Flow-DPO; else Gran-DPO with these patch rewards


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("flow_dpo")
    # paper Table 10 (video): LoRA r 64, alpha 128, Adam 5e-6, beta 500
    c.lora.rank, c.lora.alpha = 64, 128.0
    c.optim.learning_rate = 5e-6
    c.data.extra_fields = (LOSER_FIELD,)
    f = sft.default_config().flow
    c.flow = dict(sigma_distribution=f.sigma_distribution, sigma_mean=f.sigma_mean, sigma_std=f.sigma_std,
                  shift=f.shift)
    c.dpo = dict(beta=500.0, time_dependent=False,
                 # Gran-DPO (ours, from HALO's abstract; module doc): the patch rewards' source, '' for Flow-DPO
                 patch_source="", patch_model="", manifold="", manifold_kind="shell_norm",
                 patch=(1, 8, 8),        # latent cells per patch (the embedded benchmark: 12 patches)
                 delta=0.0, lam=1.0)
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """The method's own settings, before any work (``experiments.main`` calls it first)."""
    if not float(config.dpo.beta) > 0:
        raise ConfigError(f"dpo.beta must be > 0, got {config.dpo.beta}")
    if LOSER_FIELD not in tuple(config.data.extra_fields):
        raise ConfigError(f"data.extra_fields={tuple(config.data.extra_fields)} must hold {LOSER_FIELD!r}: Flow-DPO "
                          f"reads pairs (a score_samples DPO cache)")
    sft.check_flow(config.flow)
    d = config.dpo
    if d.patch_source not in PATCH_SOURCES:
        raise ConfigError(f"dpo.patch_source={d.patch_source!r}; expected one of {PATCH_SOURCES}")
    if d.patch_source:
        if not (float(d.delta) >= 0 and float(d.lam) >= 0):
            raise ConfigError(f"dpo.delta={d.delta} and dpo.lam={d.lam} must be >= 0")
        if len(tuple(d.patch)) != 3 or min(d.patch) < 1:
            raise ConfigError(f"dpo.patch={tuple(d.patch)} must be three positive latent-cell counts (t, h, w)")
        if d.patch_source == "patch_model" and not d.patch_model:
            raise ConfigError("dpo.patch_source='patch_model' needs dpo.patch_model (a train_patch_reward output)")
        if d.patch_source == "shell":
            if not d.manifold:
                raise ConfigError("dpo.patch_source='shell' needs dpo.manifold (a fit_manifold output, or 'random')")
            if d.manifold_kind not in KINDS or d.manifold_kind == "shell_band":
                raise ConfigError(f"dpo.manifold_kind={d.manifold_kind!r}; expected one of "
                                  f"{tuple(k for k in KINDS if k != 'shell_band')}")


def patch_reward_source(config, latent_channels: int):
    """Gran-DPO's patch rewards: ``(fn(value, latents [B, T, H, W, C], context, masks [P, T, H, W]) -> [B, P],
    value, description)``; ``value`` is the frozen input (the patch model's state or the manifold's params)."""
    d = config.dpo
    if d.patch_source == "patch_model":
        try:
            model = patch_reward.load_patch_reward_model(d.patch_model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"dpo.patch_model={d.patch_model!r}: {e}") from None
        if model.config.patch() != tuple(int(x) for x in d.patch):
            raise ConfigError(f"dpo.patch={tuple(d.patch)} but the patch model at dpo.patch_model scores patches of "
                              f"{model.config.patch()} latent cells")
        graphdef, state = nnx.split(model)

        def fn(value, x, ctx, masks):
            del masks                       # the model's own grid, checked equal to the masks' above
            return patch_reward.patch_rewards(nnx.merge(graphdef, value), x, ctx)
        return fn, nnx.to_pure_dict(state), f"the patch reward model {d.patch_model}"
    r = ml_collections.ConfigDict(dict(manifold=d.manifold, random=dict(num_anchors=64, hidden_dim=64,
                                                                        patch_size=(1, 1, 1), seed=0)))
    params, mcfg, _ = load_reward_manifold(r, latent_channels)

    def fn(value, x, ctx, masks):
        del ctx
        return patch_reward.shell_patch_rewards(value, x.astype(jnp.float32), d.manifold_kind, masks,
                                      patch_size=mcfg.patch_size, bn_eps=mcfg.bn_eps, shell_eps=mcfg.shell_eps)
    return fn, params, f"-{d.manifold_kind} per patch on the manifold {d.manifold}"


def make_loss(config: ml_collections.ConfigDict):
    check_config(config)
    sampler = sft.sigma_sampler(config.flow)
    beta, time_dependent = float(config.dpo.beta), bool(config.dpo.time_dependent)
    lora = config.lora.rank > 0
    gran = bool(config.dpo.patch_source)
    delta, lam, patch = float(config.dpo.delta), float(config.dpo.lam), tuple(int(x) for x in config.dpo.patch)
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
            if not gran:
                return objectives.flow_dpo_objective(model, ref, x0_w, batch[LOSER_FIELD], eps, batch["context"], k_s,
                                                     beta=beta_in, time_dependent=time_dependent, sigma_sampler=sampler)
            x0_l = batch[LOSER_FIELD]
            try:
                masks = jnp.asarray(patch_reward.latent_patch_masks(x0_w.shape[1:4], patch))
            except ValueError as e:
                raise ConfigError(f"dpo.patch: {e}") from None
            b = x0_w.shape[0]
            # both clips in one call; the rewards are data (gran_dpo_loss stops their gradient too)
            r = jax.lax.stop_gradient(patch_fn(frozen["gran_patch_rewards"], jnp.concatenate([x0_w, x0_l]),
                                               jnp.concatenate([batch["context"]] * 2), masks))
            return objectives.gran_dpo_objective(model, ref, x0_w, x0_l, eps, batch["context"], k_s, masks, r[:b],
                                                 r[b:], beta=beta_in, delta=frozen["dpo_settings"][2],
                                                 lam=frozen["dpo_settings"][3], time_dependent=time_dependent,
                                                 sigma_sampler=sampler)

        # the settings as a frozen input: dit_setup.resume_settings records its hash, so a resume with
        # another beta or beta schedule is refused instead of continuing another objective
        rep = parallel.replicated(setup.mesh)
        settings = [beta, float(time_dependent)] + ([delta, lam] if gran else [])   # Flow-DPO's as before
        extra = {"dpo_settings": jnp.asarray(settings, jnp.float32)}
        extra_sh = {"dpo_settings": rep}
        if gran:
            channels = dit_setup.transformer_config(config.model).in_channels
            patch_fn, value, what = patch_reward_source(config, channels)
            extra["gran_patch_rewards"] = value
            extra_sh["gran_patch_rewards"] = jax.tree.map(lambda _: rep, value)
            print(f"flow_dpo: Gran-DPO (ours, from HALO's abstract): patch rewards {what}; patches of {patch} latent "
                  f"cells, delta {delta}, lambda {lam}", flush=True)
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
