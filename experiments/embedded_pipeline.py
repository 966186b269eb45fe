"""Experiment ``embedded_pipeline``: the whole method on the embedded benchmark, stage by stage, in one run.

Stages (each in its own directory of ``workdir``; a finished stage leaves ``stages/<stage>.DONE`` recording
a hash of the config settings it read (:data:`STAGE_SETTINGS`) and of the stages it read from
(:data:`STAGE_INPUTS`); a rerun skips a stage whose hash is the same, and redoes one whose settings or
inputs changed, which changes its hash and so redoes everything downstream. Variants and samples have
such markers per (variant, seed), so a changed variant entry redoes that variant alone. An interrupted
stage resumes from its checkpoints if its settings are the same (else it starts over); an interrupted
variant run restarts):

1. ``dataset``       Moving Textures (``data/``): train, validation and test splits, disjoint by seed;
2. ``vae``           the video VAE (``vae/``): installed from ``pretrained.dir`` (checksums verified) or
                     trained here (experiment ``train_vae``); either way its held-out reconstruction is
                     measured here (``vae/reconstruction.json``);
3. ``text_encoder``  the small text encoder (``text_encoder/``): installed, or seeded random weights;
4. ``cache``         latents + text embeddings of the three splits (``latents/{train,validation,test}``);
5. ``base``          the base DiT (``base/``): installed, or flow matching here (experiment ``sft``);
6. ``classifier``    the attribute classifier of the evaluation, trained on the real train clips;
7. ``manifold``      Shell-LCC fitted on the train latents (``manifold/``, experiment ``fit_manifold``);
8. ``videoalign``    the VideoAlign rows' prerequisites, only for the steps the rows of ``run_variants`` need
                     (``videoalign/``; :mod:`experiments.embedded_videoalign`): the preference pairs and
                     their latent cache, the reward model trained on the base, the base's scored samples;
9. ``variants``      for every seed and every entry of ``run_variants``, fine-tuning of a copy of the base
                     (``variants/<name>/seed<k>/``, experiment ``reward_finetune``, ``flow_dpo`` or
                     ``flow_rwr`` by the entry's method) with validation every ``validation.every`` steps
                     (:mod:`experiments.embedded_validation`) and the checkpoint rule applied to the
                     validation rows (``picked/``, ``pick.json``); a guidance row trains nothing: its one
                     validation row is the base sampled with its guidance;
10. ``sample``       the first ``evaluate.num_prompts`` test prompts from the base and every picked
                     checkpoint (a guidance row: the base with its guidance), noise seeded by the seed
                     (``samples/<name>/seed<k>/``);
11. ``evaluate``     metrics with 95% intervals, trajectories, montages, each row's cost and ``report.md``
                     (:mod:`experiments.embedded_evaluation`).

Variants: ``config.variants`` holds one entry per row of the table, ``run_variants`` chooses and orders
them. An entry is a method, an objective, a reward and options::

    method      reward_finetune                        (experiments/reward_finetune.py: the Shell-LCC rows)
                flow_dpo | flow_rwr                    (VideoAlign's offline methods on the reward model's
                                                        ranking of the base's samples; no objective, no reward)
                guidance                               (no training: the base sampled with reward guidance)
    objective   one_step | noised_data | sft           (reward_finetune's objective.name; '' otherwise)
    reward      lcc | shell_norm | shell | shell_band  (reward_finetune; '' with objective sft: the control)
                reward_model | lcc | shell_norm | shell (guidance: the trained reward model, or the distance
                                                        to the pipeline's manifold, training-free)
    tau         shell_band's target: '' (the manifold's stored mean over real patches), a number, or
                'NAME@STEP': the reward logged at STEP of variant NAME's run with the same seed (the
                authors' way: the value of a good plain-reward run early on)
    options     'key=value; key=value' overrides of that variant's config: reward_finetune's, flow_dpo's or
                flow_rwr's (its run length ``train.steps``, its evaluation spacing ``train.eval_every``, its
                objective's weights, ``dpo.time_dependent`` ...) or, for guidance, the sample config's
                (``sampler.guidance.weight`` ...)
    rule        the checkpoint rule of this row ('': ``validation.rule``); 'final' for a variant whose
                point is that it needs no early stopping
    label       what the row is, for the report

Every trained variant starts from ``config.reward`` (shared optimizer, steps, batch, sampler of noise
levels), so rows differ only by what their entry says; VideoAlign's knobs (its data, its reward model, beta,
the temperature, the guidance weights) are in ``config.videoalign``. Later methods add entries, not stages
(the VideoAlign rows added one stage: their prerequisites, shared by several rows).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import (
    config_entry,
    dit_setup,
    embedded_evaluation,
    embedded_grpo,
    embedded_validation,
    fit_manifold,
    flow_dpo,
    flow_rwr,
    grpo,
    reward_finetune,
    sample,
    sft,
    stage_markers,
    train_vae,
)
from experiments import embedded_videoalign as va
from experiments import embedded_workdir as workdir_lib
from experiments.embedded_workdir import (
    ATTRIBUTE_FIELDS,
    DONE,
    SPLITS,
    Paths,
    latent_stats,
    variant_names,
)
from experiments.embedded_workdir import builder as _builder
from experiments.overrides import apply_overrides, parse_overrides
from shelllcc.data import latent_cache, latent_grid, moving_textures
from shelllcc.evaluation import checkpoint_rule
from shelllcc.evaluation import classifier as clf_lib
from shelllcc.evaluation.report import load_metrics
from shelllcc.manifold import io as manifold_io
from shelllcc.models import packed, saving
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig, split_words

OBJECT_MASK = "object_mask"      # the dataset's and the caches' field: the object's coverage (cache: per latent)
STAGES = ("dataset", "vae", "text_encoder", "cache", "base", "classifier", "manifold", "videoalign", "variants",
          "sample", "evaluate")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRETRAINED = os.path.join("configs", "pretrained", "demo")
PRETRAINED_MODELS = ("vae", "text_encoder", "base")
OBJECTIVES = reward_finetune.OBJECTIVES
METHODS = va.METHODS


DIT_STAGES = ("sft", "reward", "sample")


def dit_stage_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The embedded benchmark's DiT stages on their own (``configs/embedded.py:sft|reward|sample``): the
    settings the pipeline starts from before it sizes the model and fills in the paths."""
    arg = arg or "sft"
    if arg not in DIT_STAGES:
        raise ValueError(f"unknown embedded config arg {arg!r}; expected one of {DIT_STAGES}")
    if arg == "sample":
        c = sample.default_config()
    elif arg == "sft":
        c = sft.default_config()
        c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 3e-4, "cosine", 100
        c.optim.end_lr_fraction = 0.1
        c.train.steps = 3000
    else:
        c = reward_finetune.default_config()
        c.optim.learning_rate = 3e-5
        c.train.steps = 300
        c.objective.name, c.objective.s_lo, c.objective.s_hi = "one_step", 0.7, 1.0
        c.reward.kind = "shell"
    c.model.preset = "tiny"
    c.model.dim, c.model.num_layers, c.model.num_heads, c.model.ffn_dim = 128, 4, 4, 256
    c.model.text_dim, c.model.freq_dim = 128, 64
    if arg != "sample":
        c.data.source = "cache"
        c.data.batch_size = 32
        c.train.log_every, c.train.checkpoint_every = 50, 500
    return c


def entry(objective: str, reward: str = "", label: str = "", tau: str = "", options: str = "", rule: str = "",
          method: str = "reward_finetune") -> dict:
    return dict(method=method, objective=objective, reward=reward, tau=tau, options=options, rule=rule, label=label)


def catalogue() -> ml_collections.ConfigDict:
    """Every variant the benchmark knows (``run_variants`` picks from these)."""
    return ml_collections.ConfigDict(dict(
        control=entry("sft", label="continued flow matching, no reward (same data, steps and optimizer)"),
        lcc=entry("one_step", "lcc", label="distance to the LCC skeleton: expected to blur"),
        shell_norm=entry("one_step", "shell_norm", label="the authors' reward, mean ||delta||"),
        shell_band=entry("one_step", "shell_band", tau="shell_norm@10",
                         label="the authors' band |mean ||delta|| - tau|, tau = shell_norm's logged reward early on"),
        shell=entry("one_step", "shell", label="the project's distance to the shell, mean | ||delta|| - 1 |"),
        # beyond the authors (issue 13 section 3): keep the model on the prompts while the reward acts, so
        # that no early stop is needed: a flow-matching term on real clips of the same batch, an anti-drift
        # term against the base, or the band at the real data's mean ||delta||
        shell_sft=entry("noised_data", "shell", options="objective.sft_weight=1.0",
                        label="shell on noised real latents + flow matching on the same batch"),
        shell_drift=entry("one_step", "shell", options="objective.drift_weight=10.0; objective.drift_margin=0.05",
                          label="shell + anti-drift relu(mse(z, z_ref) - 0.05) x 10 against the base"),
        # the band at the real patches' mean ||delta||: run twice as long and judged at its last step
        shell_band_data=entry("one_step", "shell_band", options="train.steps=200; train.eval_every=20", rule="final",
                              label="the band at tau = mean ||delta|| of the real training patches, 200 steps, "
                                    "no early stopping (the final checkpoint)"),
        shell_norm_sft=entry("noised_data", "shell_norm", options="objective.sft_weight=1.0",
                             label="shell_norm on noised real latents + flow matching on the same batch"),
        shell_norm_drift=entry("one_step", "shell_norm",
                               options="objective.drift_weight=10.0; objective.drift_margin=0.05",
                               label="shell_norm + anti-drift relu(mse(z, z_ref) - 0.05) x 10 against the base"),
        # VideoAlign (issue 17 section 3; experiments/embedded_videoalign.py): on the reward model trained on
        # the preference pairs, from the same base, with the same optimizer, steps and checkpoint rule
        flow_dpo=entry("", method="flow_dpo",
                       label="Flow-DPO, constant beta, on the reward model's best-vs-worst of the base's samples"),
        flow_dpo_t=entry("", method="flow_dpo", options="dpo.time_dependent=True",
                         label="Flow-DPO, beta (1 - t)^2 (the literal derivation; reward-hacks in the paper)"),
        flow_rwr=entry("", method="flow_rwr",
                       label="Flow-RWR, softmax(r / T)-weighted flow matching on the base's scored samples"),
        nrg_reward_model=entry("", "reward_model", method="guidance",
                               label="Flow-NRG: the base guided by the noise-aware reward model (no training)"),
        nrg_shell=entry("", "shell_norm", method="guidance",
                        label="the base guided by the shell_norm distance of x0_hat (ours, training-free)"),
        **gtsvj_entries(),
        **pisces_entries(),
        # HALO (issue 18 part 2): Gran-DPO as we reconstruct it from the abstract (ours), Flow-DPO's pairs plus
        # per-patch Flow-DPO terms; the patch rewards from the learned patch model or the Shell-LCC distance
        gran_dpo_patch=entry("", method="flow_dpo", options="dpo.patch_source=patch_model",
                             label="Gran-DPO (ours, from HALO's abstract): Flow-DPO + per-patch Flow-DPO ordered by "
                                   "the learned patch reward model"),
        gran_dpo_shell=entry("", method="flow_dpo", options="dpo.patch_source=shell",
                             label="Gran-DPO (ours) with the Shell-LCC per-patch distance as a training-free patch "
                                   "reward"),
        # online RL (issue 19 part 3; experiments/embedded_grpo.py): Flow-GRPO and DanceGRPO
        **embedded_grpo.entries(),
    ))


def gtsvj_entries() -> dict:
    """GT-SVJ's energy judge as a reward (issue 18; experiments/embedded_videoalign.py's energy_judge step)."""
    return dict(
        gtsvj_reward=entry("one_step", va.ENERGY_JUDGE,
                           label="GT-SVJ: one-step reward fine-tuning against the energy judge's -E"),
        gtsvj_dpo=entry("", va.ENERGY_JUDGE, method="flow_dpo",
                        label="GT-SVJ: Flow-DPO on the base's best-vs-worst samples by the energy judge's -E"),
        nrg_energy_judge=entry("", va.ENERGY_JUDGE, method="guidance",
                               label="the base guided by the energy judge's -E of x0_hat (no training; the use in "
                                     "guidance is ours)"))


def pisces_entries() -> dict:
    """PISCES by direct backpropagation (issue 19; experiments/embedded_videoalign.py's embeddings step):
    ``L = L_consistency - R_Q - R_S`` with weights 1 and LoRA (section 4); L_consistency the anti-drift term against
    the base (ours), at margin 0."""
    return dict(
        pisces=entry("one_step", va.PISCES, options="objective.drift_weight=1.0; lora.rank=8",
                     label="PISCES (backprop): one-step fine-tuning against R_Q + R_S (OT map, token-plan matcher), "
                           "+ anti-drift x 1 against the base (ours for L_consistency), LoRA rank 8"))


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "embedded_pipeline"
    c.seed = 0
    c.stop_after = ""                # run the stages up to and including this one ('' : all)
    c.fast_cpu_compile = True        # experiments.main.FAST_CPU_COMPILE (CPU only; no effect on a GPU)
    # programs that take at least this long to compile go to the on-disk cache (workdir/jax_cache, or
    # $JAX_COMPILATION_CACHE_DIR when set): the variants and seeds build the same programs again and again
    c.compile_cache_min_seconds = 1.0
    # 9 frames (3 latent frames). The textured background stays: on a flat one the latents have no spread
    # around the skeleton, the shell's premise fails there (seen in an earlier run of this pipeline)
    c.benchmark = dict(num_frames=9, height=64, width=64, train_size=1024, validation_size=64, test_size=128,
                       seed=0, background_texture=True)
    # VAE, text encoder and base DiT made by configs/demo.py:pretrain on a GPU and shipped in the repository
    # (checksums in its MANIFEST.json); '' trains all three here (configs/demo.py:from_scratch)
    # export_to (configs/demo.py:pretrain): after the stages, check the base on the validation prompts at
    # each guidance scale of guidance_grid and on the test prompts with check_seeds, then pack the three
    # models with a manifest into this directory (relative: inside the workdir)
    # install: which of the three come from dir (the others are trained here), e.g. ('vae', 'text_encoder')
    # to train a new base on the shipped VAE and text encoder
    c.pretrained = dict(dir=DEFAULT_PRETRAINED, install=PRETRAINED_MODELS, export_to="",
                        guidance_grid=(1.0, 2.0, 4.0, 6.0), check_seeds=(0, 1, 2))
    c.vae = train_vae.default_config()
    c.vae.train.steps, c.vae.train.log_every = 400, 50
    # 4x spatial compression (latents [3, 16, 16, 16]): at 8x the 64 x 64 frames keep 8 x 8 latents and a
    # small VAE loses the shapes; whole 9-frame clips in 32 x 32 crops
    c.vae.model.patch, c.vae.model.depth = 4, 2
    c.vae.data.crop_frames, c.vae.data.crop_size, c.vae.data.batch_size = 0, 32, 16
    c.vae.loss.kl = 1e-4
    c.text_encoder = dict(max_len=16, dim=128, num_layers=2, num_heads=4, seed=0)
    c.cache = dict(batch_size=16, shard_size=256)
    c.base = dit_stage_config("sft")
    c.base.train.steps, c.base.data.batch_size, c.base.optim.warmup_steps = 1000, 16, 50
    c.base.optim.learning_rate = 1e-3
    c.base.flow.text_dropout = 0.1   # classifier-free guidance needs the unconditional model too
    c.base.data.weight_field = OBJECT_MASK   # for flow.region_weight (the object against the textured background)
    # 4 x 4 latent positions per token: 48 tokens per clip. Width 256 = the 4 x 4 x 16 latent values of a token,
    # so the output head spans them all (at 192 a quarter of every sample kept the initial noise, RESULTS.md)
    c.base.model.patch_size = (1, 4, 4)
    c.base.model.dim, c.base.model.num_layers, c.base.model.num_heads, c.base.model.ffn_dim = 256, 5, 4, 768
    c.classifier = dict(steps=300, batch_size=32, learning_rate=2e-3, seed=0)
    c.manifold = fit_manifold.default_config()
    c.manifold.data.source = "cache"
    c.manifold.data.test_fraction = 0.1
    c.manifold.manifold.num_anchors, c.manifold.manifold.hidden_dim = 64, 128
    c.manifold.stage1.locality = 1.0                # the authors' weight (0.1 before; see the report)
    c.reward = dit_stage_config("reward")        # what every variant starts from
    c.reward.flow.text_dropout = c.base.flow.text_dropout
    # the authors: AdamW lr 1e-5 at width 1536 (Wan2.1-1.3B), effective batch 8, clip 1.0. Scaled to width 256
    # (x sqrt(1536/256) = 2.4e-5 keeps Adam's relative update per weight; muP gives 6e-5) the lr was 5e-5, and
    # every reward lost the prompts before its first validation on the full-rank base; at their 1e-5 unscaled,
    # `shell` keeps them for 35 steps (a rule fixed before that check, validation only: RESULTS.md)
    c.reward.optim.learning_rate = 1e-5
    c.reward.optim.weight_decay = 0.01              # torch AdamW's default, as in the authors' runs
    c.reward.train.steps, c.reward.data.batch_size = 100, 8
    c.reward.train.log_every, c.reward.train.checkpoint_every = 5, 10_000
    c.variants = catalogue()
    c.run_variants = ("control", "lcc", "shell_norm", "shell_band", "shell", "shell_band_data")
    c.seeds = (0,)                   # fine-tuning and sampling seeds (each variant runs once per seed)
    c.validation = embedded_validation.default_config()
    c.sample = dit_stage_config("sample")
    c.sample.output.mp4 = c.sample.output.gif = False   # the evaluation decodes the latents losslessly
    c.sample.sampler.steps, c.sample.sampler.guidance_scale, c.sample.sampler.batch_size = 10, 3.0, 32
    c.evaluate = embedded_evaluation.default_config()
    c.videoalign = va.default_config()
    c.grpo = embedded_grpo.default_config()      # the GRPO rows' shared knobs
    return c


# ------------------------------------------------------------------------------------------ paths

def pretrained_dir(config) -> str:
    d = config.pretrained.dir
    return "" if not d else (d if os.path.isabs(d) else os.path.join(REPO, d))


def installs(config, name: str) -> bool:
    """Whether model ``name`` is installed from ``pretrained.dir`` rather than trained in this run."""
    return bool(pretrained_dir(config)) and name in tuple(config.pretrained.install)


# ------------------------------------------------------------------------------------------ variants

def check_config(config) -> None:
    """Every variant entry and the run's settings, before any stage runs; errors name the key."""
    if config.stop_after and config.stop_after not in STAGES:
        raise ValueError(f"config.stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
    bad = [m for m in config.pretrained.install if m not in PRETRAINED_MODELS]
    if bad:
        raise ValueError(f"config.pretrained.install names {bad}; expected a subset of {PRETRAINED_MODELS}")
    names = variant_names(config)
    if not names:
        raise ValueError("config.run_variants is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"config.run_variants repeats a name: {list(names)}")
    unknown = [n for n in names if n not in config.variants]
    if unknown:
        raise ValueError(f"config.run_variants names {unknown}, which config.variants does not define; it has "
                         f"{sorted(config.variants)}")
    for i, name in enumerate(names):
        e = config.variants[name]
        where = f"config.variants.{name}"
        if e.method not in METHODS:
            raise ValueError(f"{where}.method={e.method!r}; expected one of {METHODS}")
        if e.method != "reward_finetune":
            variant_config(config, name, None, 0)    # options: every key must exist
            continue                                 # the rest: va.check_config below
        if e.objective not in OBJECTIVES:
            raise ValueError(f"{where}.objective={e.objective!r}; expected one of {OBJECTIVES}")
        if e.objective == "sft" and e.reward:
            raise ValueError(f"{where}: objective 'sft' takes no reward (got reward={e.reward!r})")
        if e.objective != "sft" and e.reward not in reward_finetune.REWARD_KINDS:
            raise ValueError(f"{where}.reward={e.reward!r}; expected one of {reward_finetune.REWARD_KINDS}")
        if e.rule and e.rule not in checkpoint_rule.RULES:
            raise ValueError(f"{where}.rule={e.rule!r}; expected '' or one of {checkpoint_rule.RULES}")
        if e.tau and e.reward != "shell_band":
            raise ValueError(f"{where}.tau is set but the reward is {e.reward!r}, not shell_band")
        if "@" in e.tau:
            source, step = e.tau.split("@", 1)
            if source not in names[:i]:
                raise ValueError(f"{where}.tau={e.tau!r}: variant {source!r} must run before {name!r} "
                                 f"(run_variants: {list(names)})")
            if not step.isdigit() or int(step) % config.reward.train.log_every:
                raise ValueError(f"{where}.tau={e.tau!r}: the step must be a multiple of reward.train.log_every "
                                 f"({config.reward.train.log_every}), where the reward is logged")
        elif e.tau:
            try:
                float(e.tau)
            except ValueError:
                raise ValueError(f"{where}.tau={e.tau!r} is neither a number nor 'VARIANT@STEP'") from None
        variant_config(config, name, None, 0)        # options: every key must exist
    va.check_config(config)
    embedded_grpo.check_config(config)
    seeds = tuple(config.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds must be distinct and non-empty, got {seeds}")
    embedded_validation.check_config(config.validation)
    if config.validation.prompts > config.benchmark.validation_size:
        raise ValueError(f"validation.prompts={config.validation.prompts} exceeds benchmark.validation_size="
                         f"{config.benchmark.validation_size}")
    if config.evaluate.num_prompts > config.benchmark.test_size:
        raise ValueError(f"evaluate.num_prompts={config.evaluate.num_prompts} exceeds benchmark.test_size="
                         f"{config.benchmark.test_size}")


def read_logged(metrics_path: str, key: str, step: int) -> float:
    """The value of ``key`` logged at ``step`` in a run's ``metrics.jsonl``."""
    if not os.path.exists(metrics_path):
        raise ValueError(f"{metrics_path} does not exist: the run it belongs to has not run")
    for r in load_metrics(metrics_path):
        if int(r.get("step", -1)) == step and key in r:
            return float(r[key])
    raise ValueError(f"{metrics_path} has no {key!r} logged at step {step}")


def resolve_tau(config, name: str, paths: Paths | None, seed: int) -> float | None:
    """shell_band's tau of variant ``name`` (``None``: the manifold's stored value)."""
    tau = config.variants[name].tau
    if not tau:
        return None
    if "@" not in tau:
        return float(tau)
    source, step = tau.split("@", 1)
    if paths is None:
        return None
    return read_logged(os.path.join(paths.variant(source, seed), "metrics.jsonl"), "reward", int(step))


def variant_config(config, name: str, paths: Paths | None, seed: int) -> ml_collections.ConfigDict:
    """The run config of variant ``name`` and ``seed``: for reward_finetune ``config.reward`` with the entry
    applied; for flow_dpo / flow_rwr their config on ``config.reward``'s shared settings
    (:func:`embedded_videoalign.row_config`); for guidance the sampler section it samples with."""
    e = config.variants[name]
    if e.method in va.TRAINING_METHODS:
        return va.row_config(config, name, paths, seed)
    if e.method == va.GRPO:
        return embedded_grpo.row_config(config, name, paths, seed)
    if e.method == va.GUIDANCE:
        return va.guidance_section(config, name, paths)
    c = copy.deepcopy(config.reward)
    _like_base(c.model, config)
    c.seed = int(seed)
    c.objective.name = e.objective
    if e.reward:
        c.reward.kind = e.reward
    c.train.eval_every = config.validation.every
    where = f"config.variants.{name}.options"
    apply_overrides(c, parse_overrides(e.options, where), where)
    if paths is not None:
        mean, std = latent_stats(paths)
        c.data.cache_dir, c.data.latent_mean, c.data.latent_std = paths.train_cache, mean, std
        c.model.init_from = paths.base
        c.reward.manifold = paths.manifold
        if e.reward == va.ENERGY_JUDGE:
            c.reward.energy_judge = va.energy_judge_dir(paths)
        va.pisces_paths(c.reward, e, paths)
        tau = resolve_tau(config, name, paths, seed)
        if tau is not None:
            c.reward.shell_band_target = tau
    return c


# ------------------------------------------------------------------------------------------ stages

def stage_dataset(config, paths: Paths) -> None:
    _builder(config, paths, verbose=True)


def _pretrained(config, name: str):
    """``(model, manifest entry)`` of ``name`` from ``pretrained.dir``, checked against this benchmark."""
    d = pretrained_dir(config)
    if not os.path.isdir(d):
        raise ValueError(f"pretrained.dir {d!r} does not exist (set --config.pretrained.dir='' to train every "
                         "model here)")
    manifest = packed.read_manifest(d)
    made_for = manifest.get("provenance", {}).get("benchmark", {})
    b = config.benchmark
    for k in ("num_frames", "height", "width", "seed", "background_texture"):
        if k in made_for and made_for[k] != b[k]:
            raise ValueError(f"the pretrained models in {d!r} were trained on benchmark.{k}={made_for[k]!r}, this "
                             f"run has {b[k]!r}; use --config.pretrained.dir='' to train them for this benchmark")
    model, e = packed.unpack_from_manifest(d, name)
    print(f"{name}: {e['file']} ({e['bytes'] / 1e6:.1f} MB, SHA-256 verified) from {d}", flush=True)
    return model, e


def stage_vae(config, paths: Paths) -> None:
    os.makedirs(paths.vae, exist_ok=True)
    builder = _builder(config, paths)
    if installs(config, "vae"):
        vae, e = _pretrained(config, "vae")
        print("vae: installed (config.vae's training settings are not used)", flush=True)
        saving.save_model(os.path.join(paths.vae, train_vae.MODEL_DIR), vae, extra={"installed_from": e})
    else:
        c = copy.deepcopy(config.vae)
        c.data.dataset = builder.data_dir
        c.data.eval_clips = 0          # measured below, the same way for a trained and an installed VAE
        train_vae.run(c, paths.vae)
        vae = train_vae.load(paths.vae)
    test = train_vae._videos(builder.as_data_source("test"), config.vae.data.eval_clips or 64)
    _, recon = train_vae.encode_decode(vae, test)
    report = {"latents_mean": list(vae.config.latents_mean), "latents_std": list(vae.config.latents_std),
              **train_vae.reconstruction_report(test, recon)}
    with open(os.path.join(paths.vae, train_vae.RECONSTRUCTION_JSON), "w") as f:
        json.dump(report, f, indent=1)
    print(f"vae: held-out reconstruction of {report['clips']} test clips: PSNR {report['psnr_db']:.2f} dB, "
          f"Laplacian ratio {report['laplacian_ratio']:.3f}", flush=True)


def stage_text_encoder(config, paths: Paths) -> None:
    if installs(config, "text_encoder"):
        enc, e = _pretrained(config, "text_encoder")
        saving.save_model(paths.text_encoder, enc, extra={"installed_from": e})
        return
    t = config.text_encoder
    # the tokenizer's units: hyphenated directions ("down-left") are three tokens
    vocab = tuple(sorted({w for word in moving_textures.VOCABULARY for w in split_words(word)}))
    cfg = TextEncoderConfig(vocab=vocab, max_len=t.max_len, dim=t.dim, num_layers=t.num_layers,
                            num_heads=t.num_heads, text_dim=config.base.model.text_dim)
    longest = max(len(split_words(moving_textures.caption(a, v))) for a, v in _caption_probe())
    if longest + 1 > t.max_len:
        raise ValueError(f"text_encoder.max_len={t.max_len} is shorter than the longest caption ({longest} tokens + eos)")
    saving.save_model(paths.text_encoder, TextEncoder(cfg, rngs=nnx.Rngs(t.seed)),
                      extra={"note": "seeded random weights; closed vocabulary of the embedded benchmark"})
    print(f"text encoder: {len(cfg.vocab)} words, {t.num_layers} layers of width {t.dim}, output "
          f"[{t.max_len}, {cfg.text_dim}] (seeded random weights) -> {paths.text_encoder}", flush=True)


def _caption_probe():
    # the longest value of every attribute, in every caption template
    longest = {k: max(v, key=len) for k, v in moving_textures.ATTRIBUTES.items()}
    return [(longest, v) for v in range(len(moving_textures.CAPTION_TEMPLATES))]


def stage_cache(config, paths: Paths) -> None:
    builder = _builder(config, paths)
    vae = train_vae.load(paths.vae)
    encode_video = latent_cache.vae_video_encoder(vae)
    encode_text = latent_cache.text_encoder_fn(saving.load_model(paths.text_encoder))
    # the object mask rides along on the latent grid: a loss may weigh the object apart from the background
    vcfg, frames = vae.config, config.benchmark.num_frames
    grid = (vcfg.latent_frames(frames), config.benchmark.height // vcfg.spatial_factor,
            config.benchmark.width // vcfg.spatial_factor)
    for split in SPLITS:
        if split == "validation" and not config.benchmark.validation_size:
            continue
        source = latent_grid.PooledField(builder.as_data_source(split), OBJECT_MASK, grid, causal=True)
        latent_cache.encode_to_cache(source, paths.cache(split), encode_video=encode_video,
                                     encode_text=encode_text, batch_size=config.cache.batch_size,
                                     shard_size=config.cache.shard_size,
                                     keep_fields=("index", OBJECT_MASK) + ATTRIBUTE_FIELDS,
                                     source_description=f"{builder.info.full_name} {split}")


def stage_base(config, paths: Paths) -> None:
    os.makedirs(paths.base, exist_ok=True)
    if installs(config, "base"):
        dit, e = _pretrained(config, "base")
        text_dim = latent_cache.open_cache(paths.train_cache).info["fields"]["text_embeddings"]["shape"][-1]
        if dit.config.text_dim != text_dim:
            raise ValueError(f"the pretrained base reads text of dimension {dit.config.text_dim}; the cache's text "
                             f"embeddings have {text_dim}")
        saving.save_model(os.path.join(paths.base, "model"), dit, extra={"installed_from": e})
        return
    c = copy.deepcopy(config.base)
    mean, std = latent_stats(paths)
    c.data.cache_dir, c.data.latent_mean, c.data.latent_std = paths.train_cache, mean, std
    sft.run(c, paths.base)


def load_real(builder, split: str, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The first ``n`` clips of ``split`` in source order: ``(videos uint8, labels)``."""
    videos, labels, _ = embedded_evaluation.load_real(builder, split, n, ATTRIBUTE_FIELDS)
    return videos, labels


def stage_classifier(config, paths: Paths) -> None:
    c = config.classifier
    videos, labels = load_real(_builder(config, paths), "train", config.benchmark.train_size)
    ccfg = clf_lib.ClassifierConfig(steps=c.steps, batch_size=c.batch_size, learning_rate=c.learning_rate)
    model, _ = clf_lib.train_classifier(videos, labels, config=ccfg, seed=c.seed)
    clf_lib.save_classifier(paths.classifier, model)
    test, test_labels = load_real(_builder(config, paths), "test", config.benchmark.test_size)
    acc = clf_lib.accuracy(clf_lib.predict(model, test), test_labels)
    with open(os.path.join(paths.classifier, "real_test_accuracy.json"), "w") as f:
        json.dump(acc, f, indent=1)
    print(f"classifier: accuracy on the real test clips {acc['mean']:.3f} ("
          + ", ".join(f"{a} {v:.2f}" for a, v in acc.items() if a != "mean") + ")", flush=True)


def stage_manifold(config, paths: Paths) -> None:
    c = copy.deepcopy(config.manifold)
    mean, std = latent_stats(paths)
    c.data.source = "cache"
    c.data.cache.dir, c.data.cache.latent_mean, c.data.cache.latent_std = paths.train_cache, mean, std
    os.makedirs(paths.manifold, exist_ok=True)
    fit_manifold.run(c, paths.manifold)


class _Evaluators:
    """One validation :class:`~experiments.embedded_validation.Evaluator` per seed, built on first use."""

    def __init__(self, config, paths: Paths):
        self.config, self.paths = config, paths
        self._shared = None
        self._by_seed: dict[int, tuple] = {}

    def _build_shared(self):
        config, paths = self.config, self.paths
        n = config.validation.prompts
        cache = latent_cache.open_cache(paths.cache("validation"), latent_dtype=np.float32)
        recs = cache.__getitems__(list(range(n)))
        contexts = np.stack([np.asarray(r["text_embeddings"], np.float32) for r in recs])
        labels = {a: np.asarray([int(r[a]) for r in recs]) for a in ATTRIBUTE_FIELDS}
        real, real_labels = load_real(_builder(config, paths), "validation", n)
        if any(not np.array_equal(real_labels[a], labels[a]) for a in ATTRIBUTE_FIELDS):
            raise ValueError(f"the validation cache {paths.cache('validation')!r} does not hold the validation split "
                             "in source order (remove it and stages/cache.DONE to rebuild it)")
        mean, std = latent_stats(paths)
        mesh = dit_setup.make_mesh(config.sample.mesh)
        vae = train_vae.load(paths.vae)
        decoder = sample.LatentDecoder(vae, mesh, mean, std)
        manifold = None
        if os.path.exists(os.path.join(paths.manifold, "manifold")):
            params, mcfg, extra = manifold_io.load_manifold(os.path.join(paths.manifold, "manifold"))
            manifold = (params, mcfg, extra.get("shell_band_target"))
        base = dit_setup.build_model(sample_config(config, paths, paths.base).model, mesh,
                                     dit_setup.sharding_rules(config.sample)).model
        self._shared = dict(contexts=contexts, labels=labels, real=real, mesh=mesh, decoder=decoder,
                            classifier=clf_lib.load_classifier(paths.classifier),
                            manifold=manifold, base=base,
                            shape=tuple(cache.info["fields"]["latents"]["shape"]))

    def get(self, seed: int):
        """``(evaluator, base_row)`` of ``seed``."""
        if seed not in self._by_seed:
            if self._shared is None:
                self._build_shared()
            s = self._shared
            ev = embedded_validation.Evaluator(
                base_model=s["base"], mesh=s["mesh"], contexts=s["contexts"], labels=s["labels"],
                real_videos=s["real"], latent_shape=s["shape"], sampler_cfg=self.config.sample.sampler, seed=seed,
                decoder=s["decoder"], classifier=s["classifier"], manifold=s["manifold"])
            row = ev.set_reference(s["base"])
            print(f"validation reference (base, seed {seed}): attribute accuracy {row['attribute_accuracy']:.3f} on "
                  f"{len(s['contexts'])} validation prompts [{row['seconds']:.1f}s]", flush=True)
            self._by_seed[seed] = (ev, row)
        return self._by_seed[seed]

    def guided(self, seed: int, sampler_cfg) -> tuple:
        """``(evaluator, base_row)`` of ``seed`` that samples with ``sampler_cfg.guidance`` (a guidance row); its
        reference is the unguided base's (same prompts and noise), so its ratios are against the base."""
        plain, row = self.get(seed)
        s = self._shared
        guide = sample.build_guidance(sampler_cfg.guidance, s["base"], seed)
        ev = embedded_validation.Evaluator(
            base_model=s["base"], mesh=s["mesh"], contexts=s["contexts"], labels=s["labels"],
            real_videos=s["real"], latent_shape=s["shape"], sampler_cfg=sampler_cfg, seed=seed,
            decoder=s["decoder"], classifier=s["classifier"], manifold=s["manifold"], reward_guidance=guide)
        ev.reference = plain.reference
        return ev, plain, row


def variant_record(config, name: str, seed: int, inputs: dict[str, str]) -> dict:
    """The marker record of variant ``name`` with ``seed``: what its run reads (its reward_finetune config as
    its entry makes it, the validation and its sampler) and ``inputs``, the upstream stages' hashes; a tau
    read from another variant's log takes that variant's hash as an input too."""
    e = config.variants[name]
    settings = {"entry": {k: v for k, v in e.items() if k != "label"},        # the label is the report's only
                "run": variant_config(config, name, None, seed).to_dict(),
                "validation": stage_markers.settings_of(config, ("validation", "sample.sampler"))}
    inputs = dict(inputs)
    step = va.row_step(e)
    if step is not None:                     # the VideoAlign prerequisite it reads (only these rows)
        inputs[f"videoalign {step}"] = va.records(config, inputs)[step]["hash"]
    for extra in va.extra_steps(e):          # a Gran-DPO row's learned patch model
        inputs[f"videoalign {extra}"] = va.records(config, inputs)[extra]["hash"]
    if "@" in e.tau:
        source = e.tau.split("@", 1)[0]
        inputs[f"variant {source}"] = variant_record(config, source, seed, inputs)["hash"]
    return stage_markers.record(settings, inputs)


def run_variant(config, paths: Paths, name: str, seed: int, evaluators: _Evaluators, rec: dict) -> dict:
    """Fine-tune variant ``name`` with ``seed`` (validation every few steps), pick and export its checkpoint."""
    out = paths.variant(name, seed)
    marker = os.path.join(out, DONE)
    old = stage_markers.read(marker)
    if old is not None and old.get("hash") == rec["hash"]:
        return json.load(open(os.path.join(out, embedded_validation.PICK_JSON)))
    if old is not None:
        print(f"variant {name} seed {seed}: {stage_markers.what_changed(old, rec)}; running it again", flush=True)
        shutil.rmtree(out)
    elif os.path.exists(out):
        print(f"variant {name} seed {seed}: an unfinished run is in {out}; starting it again", flush=True)
        shutil.rmtree(out)
    os.makedirs(out)
    c = variant_config(config, name, paths, seed)
    method = config.variants[name].method
    if method == va.GUIDANCE:
        return _run_guidance_row(config, paths, name, seed, evaluators, rec, c)
    if method == "reward_finetune" and c.reward.kind == "shell_band" and c.objective.name != "sft":
        tau = c.reward.shell_band_target
        print(f"variant {name} seed {seed}: shell_band tau = "
              + (f"{tau:.4f} ({config.variants[name].tau})" if tau >= 0 else "the manifold's stored value"), flush=True)
    evaluator, base_row = evaluators.get(seed)
    vcfg = copy.deepcopy(config.validation)
    if config.variants[name].rule:
        vcfg.rule = config.variants[name].rule
    traj = embedded_validation.Trajectory(out, evaluator, base_row, vcfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=1))
    t0 = time.time()
    {"reward_finetune": reward_finetune.run, "flow_dpo": flow_dpo.run, "flow_rwr": flow_rwr.run,
     "grpo": grpo.run}[method](
        c, out, on_eval=traj)
    timing = {"run_s": round(time.time() - t0, 2), **traj.timing()}
    with open(os.path.join(out, va.TIMING_JSON), "w") as f:
        json.dump(timing, f, indent=1)
    choice = traj.export(saving.load_model(os.path.join(out, "model")))
    step_s = timing.get("train_seconds_per_step")
    print(f"variant {name} seed {seed}: picked step {choice['step']} ({choice['reason']}); "
          + (f"{step_s:.3f}s per training step (between validations)" if step_s is not None else
             "too few validations to time a training step"), flush=True)
    stage_markers.write(marker, rec)
    return choice


def _run_guidance_row(config, paths: Paths, name: str, seed: int, evaluators: _Evaluators, rec: dict,
                      sampler_cfg) -> dict:
    """A guidance row: no training; its validation row is the base sampled with the row's guidance, scored
    against the unguided base on the same prompts and noise; both samplings are timed again once compiled
    (seconds per clip, the row's sampling cost beside the base's under the same load)."""
    out = paths.variant(name, seed)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(sampler_cfg.to_json_best_effort(indent=1))
    evaluator, plain, base_row = evaluators.guided(seed, sampler_cfg)
    s = evaluators._shared
    traj = embedded_validation.Trajectory(out, evaluator, base_row, config.validation)
    traj(0, s["base"])
    timing = {"sample_seconds_per_clip": evaluator.timed_sampling(s["base"]),
              "base_sample_seconds_per_clip": plain.timed_sampling(s["base"]), "clips": evaluator.n}
    with open(os.path.join(out, va.TIMING_JSON), "w") as f:
        json.dump(timing, f, indent=1)
    choice = traj.export_fixed(0, "guidance: no training, the base sampled with the row's guidance")
    print(f"variant {name} seed {seed}: guided sampling {timing['sample_seconds_per_clip']:.3f}s per clip, base "
          f"{timing['base_sample_seconds_per_clip']:.3f}s (compiled, {evaluator.n} validation prompts)", flush=True)
    stage_markers.write(os.path.join(out, DONE), rec)
    return choice


def _variant_inputs(hashes: dict[str, str]) -> dict[str, str]:
    return {k: hashes[k] for k in STAGE_INPUTS["variants"]}


def stage_variants(config, paths: Paths, hashes: dict[str, str]) -> None:
    inputs = _variant_inputs(hashes)
    evaluators = _Evaluators(config, paths)
    names = variant_names(config)
    total = len(names) * len(config.seeds)
    k = 0
    for seed in config.seeds:
        for name in names:
            k += 1
            rec = variant_record(config, name, seed, inputs)
            old = stage_markers.read(os.path.join(paths.variant(name, seed), DONE))
            done = old is not None and old.get("hash") == rec["hash"]
            print(f"--- variant {k}/{total}: {name}, seed {seed}" + (" (done earlier)" if done else "") + " ---",
                  flush=True)
            run_variant(config, paths, name, seed, evaluators, rec)


ARCHITECTURE_KEYS, RUNTIME_KEYS = workdir_lib.ARCHITECTURE_KEYS, workdir_lib.RUNTIME_KEYS
_like_base = workdir_lib.like_base


def sample_config(config, paths: Paths, model_dir: str, seed: int = 0, name: str = "") -> ml_collections.ConfigDict:
    """The sample config of ``model_dir`` on the test prompts; ``name``: a guidance row, whose sampler (with its
    guidance) replaces ``config.sample.sampler``."""
    c = copy.deepcopy(config.sample)
    if name and config.variants[name].method == va.GUIDANCE:
        c.sampler = variant_config(config, name, paths, seed)
    _like_base(c.model, config)
    mean, std = latent_stats(paths)
    c.seed = int(seed)
    c.model.init_from = model_dir
    c.prompts.source, c.prompts.cache_dir, c.prompts.count = "cache", paths.test_cache, config.evaluate.num_prompts
    c.latents.latent_mean, c.latents.latent_std = mean, std
    c.vae.dir = os.path.join(paths.vae, train_vae.MODEL_DIR)
    return c


def model_dirs(config, paths: Paths, seed: int) -> dict[str, str]:
    """``{model: weights to sample}`` for ``seed``: the base and every variant's picked checkpoint."""
    out = {"base": paths.base}
    for name in variant_names(config):
        out[name] = (paths.base if config.variants[name].method == va.GUIDANCE else
                     os.path.join(paths.variant(name, seed), embedded_validation.PICKED_DIR))
    return out


def sample_record(config, name: str, seed: int, hashes: dict[str, str]) -> dict:
    """The marker record of the test samples of model ``name`` (the base or a variant) with ``seed``;
    ``hashes``: the upstream stages' hashes."""
    settings = stage_markers.settings_of(config, ("sample", "evaluate.num_prompts"))
    settings["seed"] = int(seed)
    model = hashes["base"] if name == "base" else variant_record(config, name, seed, _variant_inputs(hashes))["hash"]
    return stage_markers.record(settings, {"cache": hashes["cache"], "vae": hashes["vae"], "model": model})


def stage_sample(config, paths: Paths, hashes: dict[str, str]) -> None:
    for seed in config.seeds:
        for name, model_dir in model_dirs(config, paths, seed).items():
            out = paths.samples(name, seed)
            rec = sample_record(config, name, seed, hashes)
            old = stage_markers.read(os.path.join(out, DONE))
            if old is not None and old.get("hash") == rec["hash"]:
                continue
            if old is not None:
                print(f"samples of {name}, seed {seed}: {stage_markers.what_changed(old, rec)}; sampling again",
                      flush=True)
            if os.path.exists(out):
                shutil.rmtree(out)
            print(f"--- samples of {name}, seed {seed} ---", flush=True)
            sample.run(sample_config(config, paths, model_dir, seed, "" if name == "base" else name), out)
            stage_markers.write(os.path.join(out, DONE), rec)


def stage_videoalign(config, paths: Paths, hashes: dict[str, str]) -> None:
    va.run_stage(config, paths, hashes, sample_config)


def stage_evaluate(config, paths: Paths) -> None:
    embedded_evaluation.run(config, paths)


def base_check(config, paths: Paths) -> dict:
    """The base's attribute accuracy on the validation prompts at every ``pretrained.guidance_grid`` scale,
    and on the test prompts at the best of them with every ``pretrained.check_seeds`` seed."""
    out = {"validation": {}, "test": {}}
    for g in config.pretrained.guidance_grid:
        c = copy.deepcopy(config)
        c.sample.sampler.guidance_scale = float(g)
        row = _Evaluators(c, paths).get(0)[1]
        out["validation"][str(float(g))] = {k: v for k, v in row.items() if k.startswith("acc") or k == "attribute_accuracy"}
    best = max(out["validation"], key=lambda g: out["validation"][g]["attribute_accuracy"])
    out["best_guidance"] = float(best)
    builder = _builder(config, paths)
    n = config.evaluate.num_prompts
    _, labels, _ = embedded_evaluation.load_real(builder, "test", n, ATTRIBUTE_FIELDS)
    classifier = clf_lib.load_classifier(paths.classifier)
    mean, std = latent_stats(paths)
    vae = train_vae.load(paths.vae)
    for seed in config.pretrained.check_seeds:
        c = sample_config(config, paths, paths.base, seed)
        c.sampler.guidance_scale = float(best)
        lat = sample.run(c, os.path.join(paths.base, "check", f"seed{seed}"))["latents"]
        acc = clf_lib.accuracy(clf_lib.predict(classifier, embedded_evaluation.decode_latents(vae, lat, mean, std)), labels)
        out["test"][str(seed)] = acc
    with open(os.path.join(paths.base, "base_check.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("base check: validation accuracy by guidance scale "
          + ", ".join(f"{g}: {r['attribute_accuracy']:.3f}" for g, r in out["validation"].items())
          + f"; test accuracy at {best} by seed "
          + ", ".join(f"{s}: {r['mean']:.3f}" for s, r in out["test"].items()), flush=True)
    return out


def export_pretrained(config, paths: Paths) -> str:
    """Pack the VAE, the text encoder and the base into ``pretrained.export_to`` with a manifest."""
    out = config.pretrained.export_to
    out = out if os.path.isabs(out) else os.path.join(paths.root, out)
    os.makedirs(out, exist_ok=True)
    check = base_check(config, paths)
    files = {}
    for name, src in (("vae", os.path.join(paths.vae, train_vae.MODEL_DIR)), ("text_encoder", paths.text_encoder),
                      ("base", os.path.join(paths.base, "model"))):
        files[name] = {"file": f"{name}.npz", "kind": saving.read_model_json(src)["kind"],
                       "sha256": packed.pack_model(os.path.join(out, f"{name}.npz"), saving.load_model(src))}
    provenance = {
        "made_by": "configs/demo.py:pretrain (experiments/embedded_pipeline.py, export_pretrained)",
        "command": " ".join(sys.argv), "commit": os.environ.get("SHELLLCC_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
        "benchmark": dict(config.benchmark), "config": json.loads(config.to_json_best_effort()),
        "vae_reconstruction": {k: v for k, v in json.load(open(os.path.join(
            paths.vae, train_vae.RECONSTRUCTION_JSON))).items() if k not in ("latents_mean", "latents_std")},
        "base_check": check,
        "note": "parameters stored as float16 and read back as float32; the numbers above were measured with the "
                "float32 weights before packing",
    }
    path = packed.write_manifest(out, files, provenance)
    total = sum(os.path.getsize(os.path.join(out, e["file"])) for e in files.values())
    print(f"packed {', '.join(files)} into {out} ({total / 1e6:.1f} MB); manifest {path}", flush=True)
    return out


RUNNERS = {"dataset": stage_dataset, "vae": stage_vae, "text_encoder": stage_text_encoder, "cache": stage_cache,
           "base": stage_base, "classifier": stage_classifier, "manifold": stage_manifold,
           "videoalign": stage_videoalign, "variants": stage_variants, "sample": stage_sample, "evaluate": stage_evaluate}
# the stages that keep markers of their own per (variant or model, seed) and take the upstream hashes
PER_ITEM_STAGES = ("videoalign", "variants", "sample")

# What each stage reads: config settings (a section or a dotted key) and the stages whose outputs it opens.
# A stage's hash covers both, so a change reaches everything downstream through STAGE_INPUTS. Of
# ``pretrained`` only ``dir`` and ``install`` decide what is installed (``export_to``, ``guidance_grid`` and
# ``check_seeds`` act after the stages), and the installed file's checksum stands for its content.
_INSTALL = ("pretrained.dir", "pretrained.install")
STAGE_SETTINGS = {
    "dataset": ("benchmark",),
    "vae": ("benchmark", "vae") + _INSTALL,
    "text_encoder": ("text_encoder", "base.model.text_dim") + _INSTALL,   # the encoder's output width
    "cache": ("cache",),
    "base": ("base",) + _INSTALL,
    "classifier": ("classifier",),
    "manifold": ("manifold",),
    # its steps have markers of their own: a rerun of the stage redoes only the steps whose settings changed
    "videoalign": ("videoalign", "variants", "run_variants", "sample.sampler"),
    "variants": ("reward", "variants", "validation", "seeds", "run_variants", "sample.sampler", "videoalign"),
    "sample": ("sample", "evaluate.num_prompts", "seeds", "run_variants", "videoalign.guidance"),
    "evaluate": ("evaluate", "variants", "run_variants", "seeds", "validation", "videoalign"),
}
STAGE_INPUTS = {
    "dataset": (), "vae": ("dataset",), "text_encoder": (), "cache": ("dataset", "vae", "text_encoder"),
    "base": ("cache",), "classifier": ("dataset",), "manifold": ("cache", "vae"),
    "videoalign": ("base", "cache"),
    # the validation decodes with the VAE and scores with the classifier
    # (a VideoAlign row's marker names the prerequisite step it reads: variant_record)
    "variants": ("base", "manifold", "classifier", "cache", "vae"),
    "sample": ("variants", "base", "cache", "vae"),
    "evaluate": ("sample", "variants", "classifier", "dataset", "vae"),
}
# what a stage leaves under the workdir: removed before a stale stage is redone, so that nothing of the
# old settings is resumed from or mixed in (the per-item stages clean each item themselves)
STAGE_OUTPUTS = {"dataset": ("data",), "vae": ("vae",), "text_encoder": ("text_encoder",), "cache": ("latents",),
                 "base": ("base",), "classifier": ("classifier",), "manifold": ("manifold",)}


def _installed_checksums(config, stage: str) -> dict:
    model = {"vae": "vae", "text_encoder": "text_encoder", "base": "base"}.get(stage)
    if model is None or not installs(config, model):
        return {}
    try:
        entry_ = packed.read_manifest(pretrained_dir(config))["files"][model]
    except (ValueError, KeyError, OSError):
        return {}           # the stage itself says what is wrong with the directory
    return {f"pretrained.{model}.sha256": entry_.get("sha256")}


def stage_record(config, stage: str, hashes: dict[str, str]) -> dict:
    settings = stage_markers.settings_of(config, STAGE_SETTINGS[stage])
    settings.update(_installed_checksums(config, stage))
    return stage_markers.record(settings, {k: hashes[k] for k in STAGE_INPUTS[stage]})


def _remove_outputs(paths: Paths, stage: str) -> None:
    for name in STAGE_OUTPUTS.get(stage, ()):
        shutil.rmtree(os.path.join(paths.root, name), ignore_errors=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or finish) every stage; returns ``{stage: seconds}`` of the stages run now."""
    check_config(config)
    if jax.process_count() > 1:
        raise ValueError("embedded_pipeline runs in one process (its stages are small); run the stages' "
                         "experiments separately for multi-process training")
    paths = Paths(os.path.abspath(workdir))
    os.makedirs(os.path.dirname(paths.stage_marker("x")), exist_ok=True)
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(paths.root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(config.compile_cache_min_seconds))
    stages = STAGES[:STAGES.index(config.stop_after) + 1] if config.stop_after else STAGES
    timings_path = os.path.join(paths.root, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    t_run = time.time()
    hashes: dict[str, str] = {}
    for i, stage in enumerate(stages):
        marker = paths.stage_marker(stage)
        started = marker[:-len(DONE)] + stage_markers.STARTED_SUFFIX
        head = f"[stage {i + 1}/{len(STAGES)}: {stage}]"
        rec = stage_record(config, stage, hashes)
        hashes[stage] = rec["hash"]
        old = stage_markers.read(marker)
        if old is not None and old.get("hash") == rec["hash"]:
            print(f"{head} done earlier; skipped", flush=True)
            continue
        if old is not None:
            print(f"{head} {stage_markers.what_changed(old, rec)}: redoing it", flush=True)
            os.remove(marker)
            _remove_outputs(paths, stage)
        else:
            interrupted = stage_markers.read(started)
            if interrupted is not None and interrupted.get("hash") != rec["hash"]:
                print(f"{head} an unfinished run of it had other settings ("
                      f"{stage_markers.what_changed(interrupted, rec)}); starting it over", flush=True)
                _remove_outputs(paths, stage)
        stage_markers.write(started, rec)
        print(f"\n{head} starting ({time.time() - t_run:.0f}s into this run)", flush=True)
        t0 = time.time()
        if stage in PER_ITEM_STAGES:
            RUNNERS[stage](config, paths, dict(hashes))
        else:
            RUNNERS[stage](config, paths)
        timings[stage] = round(time.time() - t0, 1)
        stage_markers.write(marker, rec)
        os.remove(started)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
        print(f"{head} finished in {timings[stage]:.0f}s", flush=True)
    if config.pretrained.export_to and "classifier" in stages:     # the base check needs the classifier
        export_pretrained(config, paths)
    total = time.time() - t_run
    print(f"\nembedded_pipeline: {len(stages)} stages in {total:.0f}s this run; per stage (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    if "evaluate" in stages:
        print(f"report: {os.path.join(paths.root, 'report.md')}", flush=True)
    return timings


get_config = config_entry.defaults_entry(default_config)
