"""The GRPO rows of the embedded benchmark (issue 19 part 3): entries, run configs, checks and costs.

Rows (``embedded_pipeline.catalogue()``, ``method="grpo"``; ``experiments/grpo.py`` runs them):

* ``grpo_shell``         Flow-GRPO, reward ``-shell_norm`` of the final latent on the pipeline's manifold
                         (training-free: no labels);
* ``grpo_reward_model``  Flow-GRPO, reward the BTT latent reward model of the ``videoalign`` stage (VQ + MQ + TA
                         at t = 0; the row reads its ``reward_model`` step like ``nrg_reward_model``);
* ``dance_grpo_shell``   DanceGRPO with the Shell-LCC reward: no KL, best 4 of each group, 60% of the steps.

An entry's ``reward`` is a Shell-LCC distance (``lcc`` | ``shell_norm`` | ``shell``), ``reward_model`` or
``energy_judge``; its options are ``experiments/grpo.py`` config keys. Like the other trained rows, a GRPO row
starts from the base with ``config.reward``'s optimizer, run length, mesh and model runtime and goes through
the same validation trajectory and checkpoint rule; its own knobs (group size, prompts per step, SDE steps, KL
weight) are ``config.grpo``, its prompts the train cache's text embeddings.

Cost (``embedded_evaluation.costs`` adds :func:`costs`): samples drawn (rollouts: ``steps x P x G``, for the
run and up to the picked checkpoint) and the run's wall time, beside the seconds per training step every
trained row reports. One GRPO step draws ``P G`` clips of ``grpo.sampling_steps`` model calls each before its
update: its step is expected to cost several reward rows' steps.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from experiments import embedded_videoalign as va
from experiments import embedded_workdir as workdir
from experiments import grpo
from experiments.overrides import apply_overrides, parse_overrides
from shelllcc.errors import ConfigError
from shelllcc.rewards.manifold_distance import KINDS

METHOD = va.GRPO
DISTANCES = tuple(k for k in KINDS if k != "shell_band")
REWARDS = DISTANCES + ("reward_model", va.ENERGY_JUDGE)


def default_config() -> ml_collections.ConfigDict:
    """``config.grpo`` of the pipeline: what every GRPO row shares (ours: 4 prompts x 8 samples = 32 rollouts
    per step, DanceGRPO's users' lower bound on the global batch)."""
    return ml_collections.ConfigDict(dict(group_size=8, prompts_per_step=4, sampling_steps=10, shift=3.0,
                                          kl_weight=0.04, kl_with_dt=False, clip_eps=1e-4,
                                          dimension_weights=(1.0, 1.0, 1.0)))


def _entry(reward: str, label: str, options: str = "") -> dict:
    # the keys of embedded_pipeline.entry (not imported: the pipeline imports this module)
    return dict(method=METHOD, objective="", reward=reward, tau="", options=options, rule="", label=label)


def entries() -> dict:
    return dict(
        grpo_shell=_entry("shell_norm", "Flow-GRPO (G samples per prompt, SDE, PPO-clip, KL 0.04) with the shell_norm "
                                        "distance of the final latent as the reward (training-free)"),
        grpo_reward_model=_entry("reward_model", "Flow-GRPO with the BTT latent reward model (VQ + MQ + TA) as "
                                                 "the reward"),
        dance_grpo_shell=_entry("shell_norm", "DanceGRPO (no KL, best 4 of 8, 60% of the steps) with the shell_norm "
                                              "distance as the reward",
                                options="grpo.mode=dance_grpo; grpo.kl_weight=0.0; grpo.best_of_n=4; "
                                        "grpo.timestep_fraction=0.6"))


def row_config(config, name: str, paths, seed: int) -> ml_collections.ConfigDict:
    """The ``grpo`` config of row ``name`` and ``seed``: ``config.reward``'s shared settings, ``config.grpo``,
    the entry's reward and options; with ``paths``, the train cache, the base and the reward's files."""
    e = config.variants[name]
    r = config.reward
    c = grpo.default_config()
    for section in ("mesh", "model", "lora", "optim", "train"):
        c[section] = copy.deepcopy(r[section])
    c.sharding_rules = r.sharding_rules
    workdir.like_base(c.model, config)
    c.seed = int(seed)
    for k in ("prefetch", "latent_dtype"):
        c.data[k] = r.data[k]
    c.data.source = "cache"
    for k, v in config.grpo.items():
        if k == "dimension_weights":
            c.reward.dimension_weights = tuple(v)
        else:
            c.grpo[k] = v
    if e.reward in DISTANCES:
        c.reward.source, c.reward.kind = "shell_lcc", e.reward
    else:
        c.reward.source = e.reward
    c.train.eval_every = config.validation.every
    where = f"config.variants.{name}.options"
    apply_overrides(c, parse_overrides(e.options, where), where)
    if paths is not None:
        mean, std = workdir.latent_stats(paths)
        c.data.cache_dir, c.data.latent_mean, c.data.latent_std = paths.train_cache, mean, std
        c.model.init_from = paths.base
        c.reward.manifold = paths.manifold
        c.reward.reward_model = va.reward_model_dir(paths)
        c.reward.energy_judge = va.energy_judge_dir(paths)
    return c


def check_config(config) -> None:
    """The GRPO rows of ``run_variants``; errors name the key."""
    for name in workdir.variant_names(config):
        e = config.variants[name]
        if e.method != METHOD:
            continue
        where = f"config.variants.{name}"
        if e.reward not in REWARDS:
            raise ConfigError(f"{where}.reward={e.reward!r}; a GRPO row's reward is one of {REWARDS}")
        if e.objective or e.tau:
            raise ConfigError(f"{where}: a GRPO row takes no objective or tau (got {e.objective!r}, {e.tau!r})")
        try:
            grpo.check_config(row_config(config, name, None, 0))
        except ConfigError as err:
            raise ConfigError(f"{where} (with config.grpo): {err}") from None


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def costs(config, paths, name: str, seeds) -> dict:
    """Samples drawn (per step, in the run, up to the picked step; mean over seeds) and the run's wall time."""
    c = row_config(config, name, None, 0)
    s = grpo.settings(c)
    per_step = s.rollout_size
    picks = [_json(os.path.join(paths.variant(name, seed), "pick.json")).get("step") for seed in seeds]
    runs = [_json(os.path.join(paths.variant(name, seed), va.TIMING_JSON)).get("run_s") for seed in seeds]
    picks = [p for p in picks if p is not None]
    runs = [t for t in runs if t is not None]
    return {"samples_per_step": per_step, "samples_drawn": per_step * int(c.train.steps),
            "samples_at_pick": per_step * sum(picks) / len(picks) if picks else None,
            "run_s": sum(runs) / len(runs) if runs else None}
