"""VideoAlign's rows on the embedded benchmark (issue 17 section 3): their prerequisites and their run configs.

Rows (``embedded_pipeline.catalogue()``; ``method`` of an entry):

* ``flow_dpo``  Flow-DPO (``experiments/flow_dpo.py``) on the pairs the reward model ranked among the base's
                samples (``flow_dpo``: constant beta, ``flow_dpo_t``: beta (1 - t)^2 through its options);
* ``flow_rwr``  Flow-RWR (``experiments/flow_rwr.py``) on every scored sample;
* ``guidance``  no training: the base sampled with reward guidance (``sample.py``'s ``sampler.guidance``),
                from the trained noise-aware reward model (``nrg_reward_model``, VideoAlign's Flow-NRG) or
                from the pipeline's Shell-LCC manifold (``nrg_shell``, ours, training-free).

The DPO and RWR rows start from the base like the Shell-LCC rows and take ``config.reward``'s optimizer, run
length, batch, noise levels and LoRA setting (so rows differ by their objective and data only), run through
the same validation trajectory and checkpoint rule; their data is the base's own samples on the train prompts.

Prerequisites (one pipeline stage, ``videoalign``, placed before ``variants``; under ``WORKDIR/videoalign/``).
A stage rather than a lazy build inside the variants stage (the ``_Evaluators`` pattern) because these are
outputs of their own, minutes long, with settings of their own (``config.videoalign``), which the per-row
markers must name as inputs: a stage with markers per step gives each step a hash, so a changed knob redoes
that step, the steps after it and the rows that read them, and nothing else. It does nothing when no row of
``run_variants`` needs it (a Shell-LCC-only run pays nothing). Its steps, each with ``DONE`` marker:

1. ``pairs``         the preference set (:mod:`shelllcc.data.preferences`, ``videoalign.preferences``: its
                     size, and optionally ``generated_prompts`` of its prompts sampled by the base as extra
                     clips) and its pair latent cache per split (the pipeline's VAE and text encoder);
2. ``reward_model``  ``train_reward_model`` on the pipeline's base (its first blocks), with its evaluation
                     (accuracy with and without ties) on the test pairs;
3. ``scored``        ``score_samples`` of the base on the first ``videoalign.score.prompts`` train prompts,
                     ``clips_per_prompt`` each, scored by that reward model: the DPO pair cache and the RWR cache.

4. ``energy_judge``  ``train_energy_judge`` on the pipeline's base (GT-SVJ, issue 18): positives the real train
                     latents, negatives perturbed ones (and, with ``videoalign.energy_judge.generated``, the
                     scored step's samples of the base at the source's rate 0.3), then its preference head on the
                     step-1 pairs;
5. ``energy_scored`` ``score_samples`` of the base ranked by the energy judge's ``-E`` (the ``gtsvj_dpo`` pairs);
6. ``judges``        the judges table (``judges.md`` / ``judges.json``; :mod:`shelllcc.evaluation.judges`): accuracy
                     with and without ties per dimension on the test pairs of the BTT reward model, the energy
                     judge (``-E``), its preference head and the Shell-LCC distances ``lcc``, ``shell_norm``,
                     ``shell`` as zero-annotation judges (the clip nearer the manifold wins); built whenever step 4 is.
7. ``patch_reward``  ``train_patch_reward`` (HALO's patch reward model as we reconstruct it, issue 18): the
                     reward model of step 2 with a per-patch head, trained on Moving Textures clips degraded inside
                     random patches (:mod:`shelllcc.data.patch_degradations`, the oracle standing in for HALO's
                     GPT-4o), encoded with the pipeline's VAE and text encoder; its evaluation (patch accuracy,
                     Spearman of the mean patch reward with the video reward) goes to the report.

8. ``embeddings``    PISCES's prerequisites (issue 19; :func:`build_embeddings`): ``train_embeddings`` on the
                     pipeline's train latents with its text encoder (the dual encoder, then the matcher on swapped
                     captions; evaluated on the validation clips), then ``train_ot_map`` (the OT map from text to
                     video embeddings and its critic, evaluated on the validation pairs). No labels: captions only.

The guidance row of the reward model needs steps 1-2; the DPO and RWR rows need 1-3; ``nrg_shell`` none;
``gtsvj_reward`` (one-step fine-tuning against ``-E``) needs 1, 4 and 6 (with 2); ``gtsvj_dpo`` 1, 4, 5.
Gran-DPO rows (ours, from HALO's abstract) are ``flow_dpo`` rows with ``dpo.patch_source`` in their options:
``gran_dpo_patch`` (``patch_model``) reads steps 3 and 7, ``gran_dpo_shell`` (``shell``: the pipeline's manifold
per patch, training-free) step 3; their patch is ``patch_reward.patch_tokens`` x the base's patch, their
``delta`` and ``lam`` are ``config.videoalign.gran``'s.
The pairs' marker takes the latent cache's hash as its input, which stands for the VAE and the text encoder
(the cache's own inputs).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

import ml_collections
import numpy as np
from flax import nnx

from experiments import embedded_workdir as workdir
from experiments import (
    flow_dpo,
    flow_rwr,
    reward_sources,
    score_samples,
    stage_markers,
    train_embeddings,
    train_energy_judge,
    train_ot_map,
    train_patch_reward,
    train_reward_model,
)
from experiments.overrides import apply_overrides, parse_overrides
from shelllcc.data import preference_cache
from shelllcc.errors import ConfigError
from shelllcc.evaluation import judges, preference_eval, report
from shelllcc.evaluation.intervals import format_interval
from shelllcc.rewards import energy_judge as ej
from shelllcc.rewards import reward_model as rm

DIR = "videoalign"
STEPS = ("pairs", "reward_model", "scored", "energy_judge", "energy_scored", "judges",
         "patch_reward", "embeddings")
ENERGY_JUDGE = "energy_judge"          # a row's reward: GT-SVJ's energy judge (reward_finetune, flow_dpo)
PISCES = "pisces"                      # a row's reward: PISCES's R_Q + R_S (reward_finetune; step "embeddings")
JUDGE_DISTANCES = ("lcc", "shell_norm", "shell")
PATCH_STEP = "patch_reward"         # HALO's patch reward model (a Gran-DPO row with the learned patch model)
TRAINING_METHODS = ("flow_dpo", "flow_rwr")
GUIDANCE = "guidance"
GRPO = "grpo"                          # online RL rows (experiments/embedded_grpo.py)
METHODS = ("reward_finetune",) + TRAINING_METHODS + (GUIDANCE, GRPO)
# a guidance row's reward: the reward model, a distance to the manifold or the energy judge (GUIDES[-1])
GUIDES = ("reward_model", "lcc", "shell_norm", "shell", "energy_judge")
TIMING_JSON = "timing.json"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        preferences=dict(num_prompts=200, pairs_per_prompt=6, degraded_per_prompt=4, tie_share=1 / 3, seed=0,
                         # the base's samples of the first N preference prompts join their clips (0: none)
                         generated_prompts=0,
                         batch_size=32, shard_size=1024),
        # train_reward_model on the base's first num_blocks blocks
        reward_model=dict(steps=300, batch_size=32, learning_rate=1e-4, num_blocks=2, backbone="full", loss="btt",
                          theta=5.0, t_max=1.0, seed=0, log_every=25, eval_timesteps=(0.0, 0.5), eval_n_boot=1000),
        # score_samples of the base on the train prompts (DPO pairs: best vs worst of K; RWR: every clip)
        score=dict(prompts=128, clips_per_prompt=4, tie_margin=0.0, seed=0, batch_size=16),
        beta=500.0,                  # Flow-DPO's beta (paper: 500 with their unknown reduction; ours: per-element mean)
        temperature=0.1,             # Flow-RWR: softmax(r / temperature) over the batch
        guidance=dict(reward_model_weight=1.0, shell_weight=1.0, energy_judge_weight=1.0, t_max=0.95,
                      dimension_weights=(1.0, 1.0, 1.0)),
        # train_energy_judge on the base (GT-SVJ): a third of its blocks with LoRA rank 8, then a preference head
        energy_judge=dict(steps=300, batch_size=16, learning_rate=1e-3, block_fraction=1 / 3, lora_rank=8,
                          beta=0.2, generated_rate=0.3, strength=0.5,
                          generated=False,     # the scored step's samples of the base as generated negatives
                          preference_steps=200, preference_batch_size=32, preference_learning_rate=1e-3,
                          preference_loss="btt", seed=0, log_every=25),
        # train_patch_reward from the reward model of step 2 (ours; experiments/train_patch_reward.py)
        patch_reward=dict(patch_tokens=(1, 2, 2), backbone="full", steps=300, batch_size=32, learning_rate=1e-4,
                          t_max=0.0, seed=0, log_every=25, num_train=512, num_validation=0, num_test=128,
                          max_patches=4, clean_share=0.25, clip_seed=0, batch_size_encode=32, shard_size=512,
                          eval_n_boot=1000),
        # Gran-DPO rows (ours): the patch term's threshold and weight, the Shell-LCC source's distance
        gran=dict(delta=0.0, lam=1.0, manifold_kind="shell_norm"),
        embeddings=embeddings_defaults(),
    ))


def embeddings_defaults() -> dict:
    """PISCES's step (ours: sizes for latents [3, 16, 16, 16] and text [16, 128]; the map's trunk and optimizer
    are section 4's, its run length and batch ours)."""
    return dict(dim=128, num_heads=4, video_layers=2, text_layers=2, cross_layers=2, patch_size=(1, 2, 2),
                dual_steps=1000, matcher_steps=1000, batch_size=64, learning_rate=3e-4, per_clip=6, seed=0,
                log_every=100,
                ot_map=dict(hidden=(1024, 1024), outer_steps=500, map_updates=10, batch_size=256, learning_rate=1e-4,
                            grad_clip=1.0, seed=0, log_every=50))


# ------------------------------------------------------------------------------------------ which rows need what

def patch_source(entry) -> str:
    """A ``flow_dpo`` row's Gran-DPO patch source (its options' ``dpo.patch_source``; '' for Flow-DPO)."""
    if entry.method != "flow_dpo":
        return ""
    return str(parse_overrides(entry.options, "entry options").get("dpo.patch_source", ""))


def extra_steps(entry) -> tuple[str, ...]:
    """Prerequisite steps a row reads beside :func:`row_step`'s (the learned patch model of a Gran-DPO row)."""
    return ("patch_reward",) if patch_source(entry) == "patch_model" else ()


def _deps(config, step: str) -> tuple[str, ...]:
    if step == "energy_judge":
        return ("pairs",) + (("scored",) if config.videoalign.energy_judge.generated else ())
    return {"pairs": (), "reward_model": ("pairs",), "scored": ("reward_model",), "energy_scored": ("energy_judge",),
            "judges": ("reward_model", "energy_judge"),
            PATCH_STEP: ("reward_model",), "embeddings": ()}[step]


def steps_needed(config) -> tuple[str, ...]:
    """The prerequisite steps the rows of ``run_variants`` need (none for Shell-LCC rows and ``nrg_shell``), in
    ``STEPS`` order: each row's step and what it reads; the judges table whenever the energy judge is built."""
    need: set[str] = set()

    def add(step):
        if step not in need:
            need.add(step)
            for d in _deps(config, step):
                add(d)
    for name in workdir.variant_names(config):
        step = row_step(config.variants[name])
        if step is not None:
            add(step)
        for extra in extra_steps(config.variants[name]):
            add(extra)
    if "energy_judge" in need:
        add("judges")
    return tuple(s for s in STEPS if s in need)


def row_step(entry) -> str | None:
    """The last prerequisite step a row reads (its marker's input), or ``None``."""
    if entry.method in TRAINING_METHODS:
        return "energy_scored" if entry.reward == ENERGY_JUDGE else "scored"
    if entry.method == GUIDANCE and entry.reward == "reward_model":
        return "reward_model"
    if entry.method in ("reward_finetune", GUIDANCE, GRPO) and entry.reward == ENERGY_JUDGE:
        return "energy_judge"
    if entry.method == GRPO and entry.reward == "reward_model":
        return "reward_model"
    if uses_pisces(entry):
        return "embeddings"
    return None


def uses_reward_model(entry) -> bool:
    return row_step(entry) in ("reward_model", "scored")


def uses_energy_judge(entry) -> bool:
    return row_step(entry) in ("energy_judge", "energy_scored")


def uses_pisces(entry) -> bool:
    return entry.method == "reward_finetune" and entry.reward == PISCES


def records(config, hashes: dict[str, str]) -> dict[str, dict]:
    """The marker record of every prerequisite step, from the settings and the upstream stages' hashes
    (``base``, ``cache``; no I/O, so a row's record can name its step's hash before the step runs)."""
    v = config.videoalign
    pairs_settings = {"preferences": v.preferences.to_dict(),
                      "clip": stage_markers.settings_of(config, ("benchmark.num_frames", "benchmark.height",
                                                                  "benchmark.width"))}
    pairs_inputs = {"cache": hashes["cache"]}
    if v.preferences.generated_prompts:
        pairs_settings["sampler"] = stage_markers.settings_of(config, ("sample.sampler",))
        pairs_inputs["base"] = hashes["base"]
    out = {"pairs": stage_markers.record(pairs_settings, pairs_inputs)}
    out["reward_model"] = stage_markers.record({"reward_model": v.reward_model.to_dict()},
                                               {"pairs": out["pairs"]["hash"], "base": hashes["base"]})
    out["scored"] = stage_markers.record({"score": v.score.to_dict(),
                                          "sampler": stage_markers.settings_of(config, ("sample.sampler",))},
                                         {"reward_model": out["reward_model"]["hash"], "base": hashes["base"],
                                          "cache": hashes["cache"]})
    ej_inputs = {"pairs": out["pairs"]["hash"], "base": hashes["base"], "cache": hashes["cache"]}
    if v.energy_judge.generated:
        ej_inputs["scored"] = out["scored"]["hash"]
    out["energy_judge"] = stage_markers.record({"energy_judge": v.energy_judge.to_dict()}, ej_inputs)
    out["energy_scored"] = stage_markers.record({"score": v.score.to_dict(),
                                                 "sampler": stage_markers.settings_of(config, ("sample.sampler",))},
                                                {"energy_judge": out["energy_judge"]["hash"], "base": hashes["base"],
                                                 "cache": hashes["cache"]})
    out["judges"] = stage_markers.record({"distances": list(JUDGE_DISTANCES)},
                                         {"reward_model": out["reward_model"]["hash"],
                                          "energy_judge": out["energy_judge"]["hash"],
                                          "manifold": hashes.get("manifold", "")})
    out["patch_reward"] = stage_markers.record(
        {"patch_reward": v.patch_reward.to_dict(),
         "clip": stage_markers.settings_of(config, ("benchmark.num_frames", "benchmark.height", "benchmark.width",
                                                    "benchmark.background_texture"))},
        {"reward_model": out["reward_model"]["hash"], "cache": hashes["cache"]})
    # the cache's hash stands for the VAE (and its latent statistics) and the text encoder
    out["embeddings"] = stage_markers.record({"embeddings": v.embeddings.to_dict()}, {"cache": hashes["cache"]})
    return out


def step_dir(paths, step: str) -> str:
    return os.path.join(paths.root, DIR, step)


def reward_model_dir(paths) -> str:
    return step_dir(paths, "reward_model")


def energy_judge_dir(paths) -> str:
    return step_dir(paths, "energy_judge")


def embeddings_dir(paths) -> str:
    """The ``train_embeddings`` workdir of the embeddings step (``reward.pisces.embeddings``)."""
    return os.path.join(step_dir(paths, "embeddings"), "space")


def ot_map_dir(paths) -> str:
    """The ``train_ot_map`` workdir of the embeddings step (``reward.pisces.ot_map``)."""
    return os.path.join(step_dir(paths, "embeddings"), "ot_map")


# ------------------------------------------------------------------------------------------ configs

def reward_model_config(config, paths, splits: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """``train_reward_model``'s config: the base's first blocks, the pair caches of step 1."""
    v = config.videoalign.reward_model
    c = train_reward_model.default_config()
    workdir.like_base(c.model, config)
    c.model.scan_layers = False
    c.seed = int(v.seed)
    r = c.reward_model
    r.num_blocks, r.backbone, r.loss, r.theta, r.t_max, r.seed = (int(v.num_blocks), v.backbone, v.loss,
                                                                 float(v.theta), float(v.t_max), int(v.seed))
    c.data.batch_size = int(v.batch_size)
    c.optim.learning_rate = float(v.learning_rate)
    c.train.steps, c.train.log_every = int(v.steps), int(v.log_every)
    c.train.checkpoint_every, c.train.async_checkpoints = max(int(v.steps), 1), False
    c.eval.timesteps, c.eval.n_boot = tuple(float(t) for t in v.eval_timesteps), int(v.eval_n_boot)
    c.mesh = copy.deepcopy(config.reward.mesh)
    c.data.train = "(the pairs step's train cache)"      # placeholder for check_config
    if paths is not None:
        c.model.init_from = paths.base
        splits = splits or {}
        for s in train_reward_model.SPLITS:
            c.data[s] = splits.get(s, "")
    return c


def energy_judge_config(config, paths, splits: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """``train_energy_judge``'s config: the base's blocks, the real train latents, the step-1 pair caches."""
    v = config.videoalign.energy_judge
    c = train_energy_judge.default_config()
    workdir.like_base(c.model, config)
    c.model.scan_layers = False
    c.seed = c.energy.seed = int(v.seed)
    c.energy.block_fraction, c.energy.beta = float(v.block_fraction), float(v.beta)
    c.energy.generated_rate, c.energy.strength = float(v.generated_rate), float(v.strength)
    c.lora.rank = int(v.lora_rank)
    c.data.batch_size, c.optim.learning_rate = int(v.batch_size), float(v.learning_rate)
    c.train.steps, c.train.log_every = int(v.steps), int(v.log_every)
    c.train.checkpoint_every, c.train.async_checkpoints = max(int(v.steps), 1), False
    p = c.preference
    p.steps, p.batch_size, p.learning_rate = int(v.preference_steps), int(v.preference_batch_size), \
        float(v.preference_learning_rate)
    p.loss = v.preference_loss
    c.mesh = copy.deepcopy(config.reward.mesh)
    c.data.cache_dir = "(the pipeline's train latents)"      # placeholder for check_config
    if paths is not None:
        c.model.init_from = paths.base
        c.data.cache_dir = paths.train_cache
        c.data.latent_mean, c.data.latent_std = workdir.latent_stats(paths)
        c.eval.cache_dir = paths.cache("validation")
        if v.generated:
            c.data.generated_dir = os.path.join(step_dir(paths, "scored"), score_samples.RWR_DIR)
        splits = splits or {}
        p.train, p.validation, p.test = (splits.get(s, "") for s in train_reward_model.SPLITS)
    return c


def row_config(config, name: str, paths, seed: int) -> ml_collections.ConfigDict:
    """The flow_dpo / flow_rwr config of row ``name`` and ``seed``: ``config.reward``'s shared settings, the
    method's knobs from ``config.videoalign``, the entry's options; with ``paths``, the scored caches."""
    e = config.variants[name]
    module = flow_dpo if e.method == "flow_dpo" else flow_rwr
    r = config.reward
    c = module.default_config()
    for section in ("mesh", "model", "lora", "optim", "train"):
        c[section] = copy.deepcopy(r[section])
    c.sharding_rules = r.sharding_rules
    workdir.like_base(c.model, config)
    c.seed = int(seed)
    for k in ("batch_size", "prefetch", "latent_dtype"):
        c.data[k] = r.data[k]
    c.data.source = "cache"
    for k in c.flow:
        if k in r.flow:
            c.flow[k] = r.flow[k]
    if e.method == "flow_dpo":
        c.dpo.beta = float(config.videoalign.beta)
    else:
        c.rwr.temperature = float(config.videoalign.temperature)
    c.train.eval_every = config.validation.every
    where = f"config.variants.{name}.options"
    apply_overrides(c, parse_overrides(e.options, where), where)
    if e.method == "flow_dpo" and c.dpo.patch_source:
        _gran_settings(config, c, paths)
    if paths is not None:
        sub = score_samples.DPO_DIR if e.method == "flow_dpo" else score_samples.RWR_DIR
        c.data.cache_dir = os.path.join(step_dir(paths, row_step(e)), sub)
        c.data.latent_mean, c.data.latent_std = (), ()        # score_samples stores normalised latents
        c.model.init_from = paths.base
    return c


def _gran_settings(config, c, paths) -> None:
    """A Gran-DPO row's patch (the patch model's: ``patch_tokens`` x the base's patch), ``delta``, ``lam`` and its
    patch rewards' source: the patch_reward step's model or the pipeline's manifold."""
    g = config.videoalign.gran
    c.dpo.patch = tuple(int(a) * int(b) for a, b in zip(config.videoalign.patch_reward.patch_tokens,
                                                         config.base.model.patch_size))
    c.dpo.delta, c.dpo.lam, c.dpo.manifold_kind = float(g.delta), float(g.lam), g.manifold_kind
    if c.dpo.patch_source == "patch_model":
        c.dpo.patch_model = step_dir(paths, "patch_reward") if paths is not None else "(the patch_reward step's output)"
    elif c.dpo.patch_source == "shell":
        c.dpo.manifold = paths.manifold if paths is not None else "(the manifold stage's output)"


def patch_reward_config(config, paths) -> ml_collections.ConfigDict:
    """``train_patch_reward``'s config: the reward model of step 2, clips of the benchmark's size."""
    v, b = config.videoalign.patch_reward, config.benchmark
    c = train_patch_reward.default_config()
    c.seed = int(v.seed)
    c.mesh = copy.deepcopy(config.reward.mesh)
    p = c.patch_reward
    p.reward_model = reward_model_dir(paths) if paths is not None else "(the reward_model step's output)"
    p.patch_tokens, p.backbone, p.t_max, p.seed = tuple(v.patch_tokens), v.backbone, float(v.t_max), int(v.seed)
    c.data.batch_size, c.optim.learning_rate = int(v.batch_size), float(v.learning_rate)
    c.train.steps, c.train.log_every = int(v.steps), int(v.log_every)
    c.train.checkpoint_every, c.train.async_checkpoints = max(int(v.steps), 1), False
    cl = c.clips
    cl.build = True
    cl.num_train, cl.num_validation, cl.num_test = int(v.num_train), int(v.num_validation), int(v.num_test)
    cl.max_patches, cl.clean_share, cl.seed = int(v.max_patches), float(v.clean_share), int(v.clip_seed)
    cl.num_frames, cl.height, cl.width, cl.background_texture = b.num_frames, b.height, b.width, b.background_texture
    cl.batch_size, cl.shard_size = int(v.batch_size_encode), int(v.shard_size)
    c.eval.n_boot = int(v.eval_n_boot)
    return c


def build_patch_reward(config, paths, out: str) -> None:
    """Step 4: the clip caches through the pipeline's VAE and text encoder, then train_patch_reward."""
    from experiments import train_vae
    from shelllcc.data import latent_cache, preference_cache
    from shelllcc.models import saving
    c = patch_reward_config(config, paths)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=1))
    encoders = (preference_cache.normalised_encoder(train_vae.load(paths.vae)),
                latent_cache.text_encoder_fn(saving.load_model(paths.text_encoder)))
    train_patch_reward.run(c, out, encoders=encoders)


def embeddings_config(config, paths) -> ml_collections.ConfigDict:
    """``train_embeddings``'s config: the pipeline's train latents (the base's normalisation) with its text encoder
    for the swapped captions, the validation latents for the evaluation."""
    v = config.videoalign.embeddings
    c = train_embeddings.default_config()
    c.seed = int(v.seed)
    c.mesh = copy.deepcopy(config.reward.mesh)
    for section in train_embeddings.STAGES:
        s = c[section]
        s.dim, s.num_heads, s.patch_size, s.seed = int(v.dim), int(v.num_heads), tuple(v.patch_size), int(v.seed)
        s.video_layers, s.text_layers = int(v.video_layers), int(v.text_layers)
    c.matcher.cross_layers = int(v.cross_layers)
    c.dual.steps, c.matcher.steps = int(v.dual_steps), int(v.matcher_steps)
    c.negatives.per_clip, c.negatives.seed = int(v.per_clip), int(v.seed)
    c.data.batch_size, c.optim.learning_rate = int(v.batch_size), float(v.learning_rate)
    c.train.log_every = int(v.log_every)
    c.train.checkpoint_every = max(int(v.dual_steps), int(v.matcher_steps), 1)
    c.train.async_checkpoints = False
    c.data.train = "(the pipeline's train latents)"          # placeholders for check_config
    c.negatives.text_encoder = "(the pipeline's text encoder)"
    if paths is not None:
        c.data.train, c.data.test = paths.train_cache, paths.cache("validation")
        c.data.latent_mean, c.data.latent_std = workdir.latent_stats(paths)
        c.negatives.text_encoder = paths.text_encoder
    return c


def ot_map_config(config, paths) -> ml_collections.ConfigDict:
    """``train_ot_map``'s config: the embeddings step's dual encoder on the same latents."""
    v = config.videoalign.embeddings.ot_map
    c = train_ot_map.default_config()
    c.map.hidden = tuple(v.hidden)
    for k in ("outer_steps", "map_updates", "batch_size", "learning_rate", "grad_clip", "seed", "log_every"):
        c.train[k] = v[k]
    c.embeddings, c.data.train = "(the embeddings step's dual encoder)", "(the pipeline's train latents)"
    if paths is not None:
        c.embeddings = embeddings_dir(paths)
        c.data.train, c.data.test = paths.train_cache, paths.cache("validation")
        c.data.latent_mean, c.data.latent_std = workdir.latent_stats(paths)
    return c


def build_embeddings(config, paths, out: str) -> None:
    """The embeddings step (module doc, 8): train_embeddings, then train_ot_map; ``timing.json`` of both."""
    t0 = time.time()
    c = embeddings_config(config, paths)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=1))
    train_embeddings.run(c, embeddings_dir(paths))
    t1 = time.time()
    train_ot_map.run(ot_map_config(config, paths), ot_map_dir(paths))
    _write_timing(out, {"embeddings_s": t1 - t0, "ot_map_s": time.time() - t1})


def pisces_paths(reward: ml_collections.ConfigDict, entry, paths) -> None:
    """A PISCES row's ``reward.pisces`` inputs: the embeddings step's outputs."""
    if uses_pisces(entry):
        reward.pisces.embeddings, reward.pisces.ot_map = embeddings_dir(paths), ot_map_dir(paths)


def check_embeddings(config) -> None:
    """The embeddings step's knobs (by their own names), then the two experiments' own checks; errors name the key."""
    v = config.videoalign.embeddings
    where = "config.videoalign.embeddings"
    for sec, keys in (("", ("dual_steps", "matcher_steps", "batch_size", "per_clip", "cross_layers", "log_every")),
                      ("ot_map.", ("outer_steps", "map_updates", "batch_size", "log_every"))):
        s = v.ot_map if sec else v
        for k in keys:
            if not (isinstance(s[k], int) and s[k] >= 1):
                raise ConfigError(f"{where}.{sec}{k}={s[k]!r} must be an integer >= 1")
    for sec, s in (("", v), ("ot_map.", v.ot_map)):
        if not s.learning_rate > 0:
            raise ConfigError(f"{where}.{sec}learning_rate={s.learning_rate} must be > 0")
    for name, check, c in (("train_embeddings", train_embeddings.check_config, embeddings_config(config, None)),
                           ("train_ot_map", train_ot_map.check_config, ot_map_config(config, None))):
        try:
            check(c)
        except ConfigError as err:
            raise ConfigError(f"{where} (as {name}'s config): {err}") from None


def guidance_section(config, name: str, paths) -> ml_collections.ConfigDict:
    """The sampler of guidance row ``name``: ``config.sample.sampler`` with its ``guidance`` filled in, then
    the entry's options (keys of the sample config, e.g. ``sampler.guidance.weight=2``)."""
    e = config.variants[name]
    g = config.videoalign.guidance
    c = copy.deepcopy(config.sample)
    s = c.sampler.guidance
    s.t_max, s.dimension_weights = float(g.t_max), tuple(g.dimension_weights)
    if e.reward == "reward_model":
        s.kind, s.weight = "reward_model", float(g.reward_model_weight)
        s.reward_model = reward_model_dir(paths) if paths is not None else "(the reward_model step's output)"
    elif e.reward == ENERGY_JUDGE:
        s.kind, s.weight = "energy_judge", float(g.energy_judge_weight)
        s.energy_judge = energy_judge_dir(paths) if paths is not None else "(the energy_judge step's output)"
    else:
        s.kind, s.weight, s.manifold_kind = "shell_lcc", float(g.shell_weight), e.reward
        s.manifold = paths.manifold if paths is not None else "(the manifold stage's output)"
    where = f"config.variants.{name}.options"
    apply_overrides(c, parse_overrides(e.options, where), where)
    return c.sampler


def check_config(config) -> None:
    """The entries of the VideoAlign rows and the knobs their prerequisites read; errors name the key."""
    methods = {config.variants[n].method for n in workdir.variant_names(config)}
    if "flow_dpo" in methods and not float(config.videoalign.beta) > 0:
        raise ValueError(f"config.videoalign.beta={config.videoalign.beta} must be > 0")
    if "flow_rwr" in methods and not float(config.videoalign.temperature) > 0:
        raise ValueError(f"config.videoalign.temperature={config.videoalign.temperature} must be > 0")
    for name in workdir.variant_names(config):
        e = config.variants[name]
        where = f"config.variants.{name}"
        if e.method in ("reward_finetune", GRPO):      # GRPO: embedded_grpo.check_config
            continue
        if e.objective:
            raise ValueError(f"{where}.objective={e.objective!r}: method {e.method!r} takes no objective (leave it '')")
        if e.tau:
            raise ValueError(f"{where}.tau={e.tau!r}: only reward_finetune's shell_band reads tau")
        if e.method in TRAINING_METHODS:
            if e.reward not in ("", ENERGY_JUDGE):
                raise ValueError(f"{where}.reward={e.reward!r}: {e.method} reads the reward model's scores ('') "
                                 f"or the energy judge's ({ENERGY_JUDGE!r})")
            c = row_config(config, name, None, 0)
            (flow_dpo if e.method == "flow_dpo" else flow_rwr).check_config(c)
        else:
            if e.reward not in GUIDES:
                raise ValueError(f"{where}.reward={e.reward!r}; a guidance row's reward is one of {GUIDES}")
            if e.rule:
                raise ValueError(f"{where}.rule={e.rule!r}: a guidance row trains nothing, no checkpoint to pick")
            from experiments import sample
            sample.check_guidance(guidance_section(config, name, None).guidance)
    need = steps_needed(config)
    if "embeddings" in need:
        check_embeddings(config)
    if not set(need) - {"embeddings"}:
        return
    v = config.videoalign
    p = v.preferences
    for k in ("num_prompts", "pairs_per_prompt", "batch_size", "shard_size"):
        if p[k] < 1:
            raise ValueError(f"config.videoalign.preferences.{k}={p[k]} must be >= 1")
    if not 0 <= p.generated_prompts <= p.num_prompts:
        raise ValueError(f"config.videoalign.preferences.generated_prompts={p.generated_prompts} must be in "
                         f"[0, num_prompts={p.num_prompts}]")
    if v.reward_model.steps < 1:
        raise ValueError(f"config.videoalign.reward_model.steps={v.reward_model.steps} must be >= 1")
    if v.reward_model.eval_n_boot < 100:
        raise ValueError(f"config.videoalign.reward_model.eval_n_boot={v.reward_model.eval_n_boot} must be >= 100 "
                         "(a 95% interval)")
    try:
        train_reward_model.check_config(reward_model_config(config, None))
    except ValueError as err:
        raise ValueError(f"config.videoalign.reward_model: {err}") from None
    if config.videoalign.reward_model.num_blocks > config.base.model.num_layers:
        raise ValueError(f"config.videoalign.reward_model.num_blocks={v.reward_model.num_blocks} exceeds the base's "
                         f"{config.base.model.num_layers} layers")
    if "energy_judge" in need:
        try:
            train_energy_judge.check_config(energy_judge_config(config, None))
        except ValueError as err:
            raise ValueError(f"config.videoalign.energy_judge: {err}") from None
    if "patch_reward" in need:
        try:
            train_patch_reward.check_config(patch_reward_config(config, None))
        except ValueError as err:
            raise ValueError(f"config.videoalign.patch_reward: {err}") from None
    if "scored" in need or "energy_scored" in need:
        s = v.score
        if s.clips_per_prompt < 2:
            raise ValueError(f"config.videoalign.score.clips_per_prompt={s.clips_per_prompt} must be >= 2 (a pair)")
        if not 1 <= s.prompts <= config.benchmark.train_size:
            raise ValueError(f"config.videoalign.score.prompts={s.prompts} must be in [1, benchmark.train_size="
                             f"{config.benchmark.train_size}]")


# ------------------------------------------------------------------------------------------ the stage

def _done(out: str, rec: dict, what: str) -> bool:
    old = stage_markers.read(os.path.join(out, workdir.DONE))
    if old is not None and old.get("hash") == rec["hash"]:
        print(f"videoalign {what}: done earlier; skipped", flush=True)
        return True
    if old is not None:
        print(f"videoalign {what}: {stage_markers.what_changed(old, rec)}; redoing it", flush=True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    return False


def _write_timing(out: str, seconds: dict) -> None:
    with open(os.path.join(out, TIMING_JSON), "w") as f:
        json.dump({k: round(float(v), 2) for k, v in seconds.items()}, f, indent=1)


def preference_config(config, generated=None):
    from shelllcc.data import preferences
    p, b = config.videoalign.preferences, config.benchmark
    kw = {} if generated is None else {"generated": generated}
    return preferences.PreferenceConfig(num_frames=b.num_frames, height=b.height, width=b.width,
                                        num_prompts=p.num_prompts, pairs_per_prompt=p.pairs_per_prompt,
                                        degraded_per_prompt=p.degraded_per_prompt, tie_share=p.tie_share, seed=p.seed,
                                        **kw)


def preference_captions(config, n: int) -> list[str]:
    """The captions of the first ``n`` prompts of the preference set, in its order (its prompt walk, without
    rendering a clip): what the base samples when ``generated_prompts`` is set."""
    from shelllcc.data import moving_textures as mt
    from shelllcc.data import preferences
    p = config.videoalign.preferences
    base = mt.split_seed(p.seed, "train")
    seen, captions, index = set(), [], 0
    while len(captions) < n:
        ex_rng = mt.clip_rng(base, index)
        index += 1
        attrs = mt.sample_attributes(ex_rng)
        key = preferences.attribute_key(attrs)
        if key in seen:
            continue
        seen.add(key)
        captions.append(mt.caption(attrs, int(ex_rng.integers(len(mt.CAPTION_TEMPLATES)))))
    return captions


def _generated_source(config, paths, sample_config_fn, out: str):
    """The base's samples of the first ``generated_prompts`` preference prompts, as a GeneratedSource."""
    from experiments import embedded_evaluation, sample, train_vae
    from shelllcc.data import preferences
    n = int(config.videoalign.preferences.generated_prompts)
    gen = os.path.join(out, "generated")
    os.makedirs(gen, exist_ok=True)
    prompt_file = os.path.join(gen, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(preference_captions(config, n)) + "\n")
    c = sample_config_fn(config, paths, paths.base, 0)
    c.prompts.source, c.prompts.file, c.prompts.text_encoder, c.prompts.count = "file", prompt_file, \
        paths.text_encoder, n
    print(f"videoalign pairs: the base samples {n} preference prompts (their clips join the pairs)", flush=True)
    sample.run(c, gen)
    vae = train_vae.load(paths.vae)
    mean, std = workdir.latent_stats(paths)
    return preferences.GeneratedSource(directories=(gen,),
                                       decode=lambda lat: embedded_evaluation.decode_latents(vae, lat, mean, std))


def build_pairs(config, paths, out: str, sample_config_fn) -> dict:
    from experiments import train_vae
    from shelllcc.data import latent_cache, preference_cache, preferences
    from shelllcc.models import saving
    p = config.videoalign.preferences
    t0 = time.time()
    generated = _generated_source(config, paths, sample_config_fn, out) if p.generated_prompts else None
    builder = preferences.build(os.path.join(out, "preferences"), preference_config(config, generated))
    encode_video = preference_cache.normalised_encoder(train_vae.load(paths.vae))
    encode_text = latent_cache.text_encoder_fn(saving.load_model(paths.text_encoder))
    splits, counts = {}, {}
    for split in train_reward_model.SPLITS:
        if split not in builder.info.splits:
            print(f"videoalign pairs: the preference set has no {split} split (too few prompts)", flush=True)
            continue
        d = os.path.join(out, "cache", split)
        s = preference_cache.encode_pairs(builder.as_data_source(split), d, encode_video=encode_video,
                                          encode_text=encode_text, batch_size=p.batch_size, shard_size=p.shard_size,
                                          source_description=f"{builder.info.full_name} {split}", progress=False)
        splits[split], counts[split] = d, int(s["num_examples"])
    if "train" not in splits:
        raise ValueError("config.videoalign.preferences: the preference set has no train pairs; raise num_prompts")
    info = {"splits": splits, "pairs": counts, "labels_per_pair": 3, "seconds": round(time.time() - t0, 2),
            "generated_prompts": int(p.generated_prompts)}
    with open(os.path.join(out, "pairs.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"videoalign pairs: {counts} pairs (x 3 labels) [{info['seconds']:.0f}s]", flush=True)
    return info


def read_pairs(paths) -> dict:
    with open(os.path.join(step_dir(paths, "pairs"), "pairs.json")) as f:
        return json.load(f)


def score_config(config, paths) -> ml_collections.ConfigDict:
    s = config.videoalign.score
    mean, std = workdir.latent_stats(paths)
    c = score_samples.default_config()
    c.seed = int(s.seed)
    workdir.like_base(c.model, config)
    c.model.init_from = paths.base
    c.mesh = copy.deepcopy(config.sample.mesh)
    c.prompts.source, c.prompts.cache_dir, c.prompts.count = "cache", paths.train_cache, int(s.prompts)
    c.latents.latent_mean, c.latents.latent_std = mean, std
    for k in config.sample.sampler:
        if k != "guidance":
            c.sampler[k] = config.sample.sampler[k]
    c.score.reward, c.score.reward_model = "reward_model", reward_model_dir(paths)
    c.score.clips_per_prompt, c.score.tie_margin = int(s.clips_per_prompt), float(s.tie_margin)
    c.score.batch_size = int(s.batch_size)
    return c


def run_stage(config, paths, hashes: dict[str, str], sample_config_fn) -> None:
    """Build the prerequisite steps the rows need (module doc); each is skipped when its marker matches."""
    need = steps_needed(config)
    if not need:
        print("videoalign: no row of run_variants needs the reward model: nothing to build", flush=True)
        return
    recs = records(config, hashes)
    pairs = None
    for i, step in enumerate(need):
        out = step_dir(paths, step)
        what = f"{i + 1}/{len(need)} {step}"
        if _done(out, recs[step], what):
            continue
        print(f"--- videoalign {what} ---", flush=True)
        t0 = time.time()
        if step == "pairs":
            build_pairs(config, paths, out, sample_config_fn)
        elif step == "reward_model":
            pairs = pairs or read_pairs(paths)
            c = reward_model_config(config, paths, pairs["splits"])
            with open(os.path.join(out, "config.json"), "w") as f:
                f.write(c.to_json_best_effort(indent=1))
            train_reward_model.run(c, out)
        elif step == "patch_reward":
            build_patch_reward(config, paths, out)
        elif step == "embeddings":
            build_embeddings(config, paths, out)
        elif step == "scored":
            score_samples.run(score_config(config, paths), out)
            _write_timing(out, {"seconds": time.time() - t0})
        elif step == "energy_judge":
            pairs = pairs or read_pairs(paths)
            c = energy_judge_config(config, paths, pairs["splits"])
            with open(os.path.join(out, "config.json"), "w") as f:
                f.write(c.to_json_best_effort(indent=1))
            train_energy_judge.run(c, out)
        elif step == "energy_scored":
            c = score_config(config, paths)
            c.score.reward, c.score.energy_judge = ENERGY_JUDGE, energy_judge_dir(paths)
            score_samples.run(c, out)
            _write_timing(out, {"seconds": time.time() - t0})
        else:
            pairs = pairs or read_pairs(paths)
            build_judges(config, paths, pairs["splits"], out)
        print(f"videoalign {what}: finished in {time.time() - t0:.0f}s", flush=True)
        stage_markers.write(os.path.join(out, workdir.DONE), recs[step])


def build_judges(config, paths, splits: dict[str, str], out: str) -> dict:
    """The judges table on the test pairs (validation when there is no test split): module doc, step 6."""
    split = "test" if "test" in splits else "validation"
    if split not in splits:
        raise ValueError("config.videoalign.preferences: no test or validation pairs for the judges table; raise "
                         "num_prompts")
    pairs = preference_cache.read_all(preference_cache.open_pair_cache(splits[split], f"videoalign {split} pairs"))
    bs = int(config.videoalign.score.batch_size)
    found = {"reward_model": {"diffs": preference_eval.reward_differences(rm.load_reward_model(reward_model_dir(paths)),
                                                                          pairs, 0.0, batch_size=bs),
                              "description": f"the latent reward model ({config.videoalign.reward_model.loss}) on "
                                             "the train pairs, r(A) - r(B) at t = 0"}}
    judge = ej.load_energy_judge(energy_judge_dir(paths))
    graphdef, state = nnx.split(judge)
    found["energy_judge"] = {"diffs": judges.source_differences(
        lambda p, z: -ej.clip_energy(nnx.merge(graphdef, p), z, 0.0), state, pairs["z_a"], pairs["z_b"], bs),
        "description": "GT-SVJ's energy judge, -(E(A) - E(B)): real vs perturbed clips, no pair labels"}
    if judge.config.preference_head:
        found["energy_judge_head"] = {"diffs": judges.source_differences(
            lambda p, z: nnx.merge(graphdef, p).preferences(z, np.zeros((z.shape[0],), np.float32)), state,
            pairs["z_a"], pairs["z_b"], bs), "description": "the energy judge's preference head (ours) on the pairs"}
    for kind in JUDGE_DISTANCES:
        src = reward_sources.shell_lcc_source(paths.manifold, kind, pairs["z_a"].shape[-1], key="the manifold")
        found[kind] = {"diffs": judges.source_differences(lambda p, z, a=src.apply: a(p, z, None, None), src.params,
                                                          pairs["z_a"], pairs["z_b"], bs),
                       "description": f"-{kind} distance to the Shell-LCC manifold: the nearer clip wins (no labels)"}
    table = judges.judges_table(found, pairs["labels"], n_boot=int(config.videoalign.reward_model.eval_n_boot))
    table["split"] = split
    judges.write_table(out, table)
    print("videoalign judges:\n" + judges.table_markdown(table), flush=True)
    return table


# ------------------------------------------------------------------------------------------ costs

def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def prerequisite_costs(paths) -> dict:
    """Labels and seconds of the prerequisites that exist: ``{"train_pairs", "labels", "reward_model_train_s",
    "scoring_s", "reward_model_eval"}`` (missing ones left out)."""
    out = {}
    pairs = _json(os.path.join(step_dir(paths, "pairs"), "pairs.json"))
    if pairs:
        out["train_pairs"] = pairs["pairs"].get("train", 0)
        out["labels"] = out["train_pairs"] * pairs.get("labels_per_pair", 3)
        out["pairs_s"] = pairs.get("seconds")
    t = _json(os.path.join(reward_model_dir(paths), "timing.json"))
    if t:
        out["reward_model_train_s"] = round(float(t["train_s"]), 1)
    ev = _json(os.path.join(reward_model_dir(paths), train_reward_model.EVAL_JSON))
    if ev:
        out["reward_model_eval"] = ev.get("by_t", {})
    s = _json(os.path.join(step_dir(paths, "scored"), TIMING_JSON))
    if s:
        out["scoring_s"] = s["seconds"]
    summ = _json(os.path.join(step_dir(paths, "scored"), score_samples.SUMMARY))
    if summ:
        out["scored"] = {k: summ.get(k) for k in ("prompts", "clips", "pairs")}
    t = _json(os.path.join(energy_judge_dir(paths), "timing.json"))
    if t:
        out["energy_judge_train_s"] = round(float(t.get("energy_s", 0.0) + t.get("preference_s", 0.0)), 1)
    s = _json(os.path.join(step_dir(paths, "energy_scored"), TIMING_JSON))
    if s:
        out["energy_scoring_s"] = s["seconds"]
    table = _json(os.path.join(step_dir(paths, "judges"), judges.TABLE_JSON))
    if table:
        out["judges"] = table

    pt = _json(os.path.join(step_dir(paths, "patch_reward"), "timing.json"))
    if pt:
        out["patch_reward_train_s"] = round(float(pt["train_s"]), 1)
        out["patch_clips_s"] = round(float(pt["clips_s"]), 1)
    pe = _json(os.path.join(step_dir(paths, "patch_reward"), train_patch_reward.EVAL_JSON))
    if pe:
        out["patch_reward_eval"] = pe
        out["patch_labels"] = int(_patch_train_clips(paths)) * int(pe.get("patches_per_clip", 0))
    out.update(pisces_prerequisite_costs(paths))
    return out


def pisces_prerequisite_costs(paths) -> dict:
    """The embeddings step's seconds and evaluations: ``embeddings_train_s`` (train_embeddings: negatives, the two
    models, their evaluation), ``ot_map_train_s`` (train_ot_map: embedding the clips, the loop), ``embeddings_eval``
    and ``ot_map_eval`` (their ``eval.json``); none when the step did not run."""
    t = _json(os.path.join(step_dir(paths, "embeddings"), TIMING_JSON))
    if not t:
        return {}
    return {"embeddings_train_s": round(float(t["embeddings_s"]), 1), "ot_map_train_s": round(float(t["ot_map_s"]), 1),
            "embeddings_eval": _json(os.path.join(embeddings_dir(paths), "eval.json")),
            "ot_map_eval": _json(os.path.join(ot_map_dir(paths), "eval.json"))}


def pisces_notes(pre: dict) -> str:
    """The embedding space's and the OT map's own measures for the report; '' when the step did not run."""
    ev, om = pre.get("embeddings_eval") or {}, pre.get("ot_map_eval") or {}
    if not ev and not om:
        return ""
    parts = []
    if ev:
        r = ev.get("retrieval", {})
        parts.append(f"PISCES's embedding space (ours, on latents) on {ev.get('clips')} validation clips: text->video "
                     f"recall@1 {r.get('t2v@1', float('nan')):.3f} (chance {r.get('chance@1', float('nan')):.3f}), "
                     f"matcher's true caption above a swapped one {ev.get('matcher', {}).get('ranked_mean', float('nan')):.3f}"
                     " (chance 0.5)")
    if om:
        parts.append(f"OT map on {om.get('pairs')} validation pairs: cos(e_v, T(e_t)) {om['matched_mapped']:.3f} against "
                     f"raw cos(e_v, e_t) {om['matched_raw']:.3f} and a mismatched caption {om['mismatched_mapped']:.3f}")
    return "; ".join(parts) + ". Labels: none (captions only)."


def _patch_train_clips(paths) -> int:
    """The patch_reward step's number of train clips (its config.json)."""
    c = _json(os.path.join(step_dir(paths, "patch_reward"), "config.json"))
    return int(c.get("clips", {}).get("num_train", 0))


def patch_reward_notes(pre: dict) -> str:
    """The patch reward model's table for the report (beside the reward model's accuracy): patch accuracy and
    HALO's consistency, 95% bootstrap intervals over the held-out clips; '' when the step did not run."""
    ev = pre.get("patch_reward_eval")
    if not ev:
        return ""
    fmt = lambda i: format_interval(i) if i.get("lo") == i.get("lo") else f"{i['value']:.3f}"  # noqa: E731
    c = ev["consistency"]
    rows = [{"what": "patch accuracy, (r_p > 0) == label", "value": fmt(ev["patch_accuracy"]),
             "ref": f"majority label {ev['majority_baseline']:.3f}"},
            {"what": "accuracy on clean / degraded patches", "value": f"{ev['accuracy_clean']:.3f} / "
             f"{ev['accuracy_degraded']:.3f}" if ev.get("accuracy_degraded") is not None else "", "ref": ""},
            {"what": "Spearman(mean patch reward, video reward (VQ+MQ+TA)/3)",
             "value": fmt(c["spearman_mean_patch_vs_video"]), "ref": "HALO's consistency claim"},
            {"what": "Spearman(mean patch reward, clean share of the clip)",
             "value": fmt(c["spearman_mean_patch_vs_clean_share"]), "ref": "the oracle's clip-level truth"},
            {"what": "Spearman(video reward, clean share of the clip)",
             "value": fmt(c["spearman_video_vs_clean_share"]), "ref": "what the video model knows of it"}]
    for k, v in ev.get("degraded_found_by_kind", {}).items():
        rows.append({"what": f"degraded patches found: {k}", "value": f"{v['found']:.3f}", "ref": f"{v['patches']} patches"})
    head = (f"Patch reward model (ours, HALO's reconstructed; patches of {ev.get('patch_cells')} latent cells, "
            f"{ev['patches_per_clip']} per clip) on {ev['clips']} held-out clips with localised degradations, 95% "
            f"intervals by a bootstrap over clips:")
    return head + "\n\n" + report.markdown_table(rows, [("what", "measure", None), ("value", "value", None),
                                                         ("ref", "against", None)])


__all__ = ["default_config", "steps_needed", "row_step", "extra_steps", "patch_source", "records", "row_config",
           "guidance_section", "reward_model_config", "patch_reward_config", "check_config", "run_stage",
           "prerequisite_costs", "patch_reward_notes", "METHODS", "TRAINING_METHODS", "GUIDANCE", "GUIDES",
           "ENERGY_JUDGE", "energy_judge_config", "build_judges", "uses_energy_judge", "PISCES", "uses_pisces",
           "embeddings_config", "ot_map_config", "build_embeddings", "embeddings_dir", "ot_map_dir", "pisces_paths",
           "pisces_prerequisite_costs", "pisces_notes"]
