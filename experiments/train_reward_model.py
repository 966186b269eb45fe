"""Experiment ``train_reward_model``: VideoAlign's latent, noise-aware reward model (issue 17 section 2).

The model (:class:`shelllcc.rewards.reward_model.LatentRewardModel`) is the first ``reward_model.num_blocks``
blocks of a DiT with three query tokens (VQ, MQ, TA) or one (``pooled``), trained on preference pairs of
latents with the BTT loss (``reward_model.loss``: ``btt`` | ``bt`` | ``regression``) at noise levels
``t ~ U[0, t_max)``, the same ``t`` and ``eps`` for both clips of a pair. The backbone is ``frozen`` (readout
only), ``lora`` (``lora.rank`` adapters) or ``full``. It trains through the one training stack
(``dit_setup.run_training`` with :func:`hooks`): optimizer, sharded step, checkpoints with exact resume,
SIGTERM, metrics.

Backbone source, the first of: ``reward_model.packed_base`` (a folder of packed models with a MANIFEST, its
``base``, e.g. the shipped ``configs/pretrained/demo``), ``model.pretrained`` (a diffusers folder),
``model.init_from`` (a DiT run's workdir or a saved model); else a random DiT (``model.preset``, ``model.seed``).

Data: pair caches (:mod:`shelllcc.data.preference_cache`) per split in ``data.train`` / ``validation`` /
``test``; with ``pairs.build`` they are made first from the embedded preference set
(:mod:`shelllcc.data.preferences`, ``pairs.num_prompts`` prompts) with the VAE and text encoder of
``pairs.packed`` (or ``pairs.vae`` / ``pairs.text_encoder``, saved model dirs) into ``workdir/pairs/<split>``.

Writes under ``workdir``: ``checkpoints/``, ``metrics.jsonl``, ``model/`` (the reward model, LoRA merged:
:func:`shelllcc.rewards.reward_model.load_reward_model`), and with a test split ``eval.json`` (accuracies with
and without ties, at t = 0 and at ``eval.timesteps``, 95% intervals: :mod:`shelllcc.evaluation.preference_eval`)
and ``eval_hist.png`` (r(A) - r(B) by label at t = 0).
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import ml_collections
from flax import nnx

from experiments import config_entry, dit_setup
from shelllcc.data import latent_cache, preference_cache, readers
from shelllcc.errors import ConfigError
from shelllcc.evaluation import preference_eval
from shelllcc.models import packed, saving
from shelllcc.rewards import reward_model as rm
from shelllcc.training import lora as lora_lib

SPLITS = ("train", "validation", "test")
BACKBONES = ("frozen", "lora", "full")
EVAL_JSON, EVAL_PNG = "eval.json", "eval_hist.png"


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("train_reward_model")
    c.model.scan_layers = False           # the reward model runs its few blocks one by one
    c.reward_model = ml_collections.ConfigDict(dict(
        num_blocks=2,                     # first blocks of the backbone kept
        backbone="full",                  # frozen | lora (with lora.rank) | full
        pooled=False,                     # one query token instead of three (VideoAlign's ablation)
        loss="btt",                       # btt | bt | regression
        theta=5.0,                        # BTT's tie parameter (> 1)
        t_max=1.0,                        # training noise levels t ~ U[0, t_max)
        packed_base="",                   # a folder of packed models (MANIFEST.json) whose 'base' is the backbone
        seed=0,                           # the readout's init
    ))
    c.data = ml_collections.ConfigDict(dict(train="", validation="", test="", batch_size=32, prefetch=2))
    c.pairs = ml_collections.ConfigDict(dict(
        build=False,                      # make the pair caches from the embedded preference set first
        data_dir="",                      # its TFDS folder ('' : workdir/preferences)
        num_prompts=600, pairs_per_prompt=6, degraded_per_prompt=4, tie_share=1 / 3, seed=0,
        num_frames=9, height=64, width=64,
        packed="",                        # the encoders' packed folder (its 'vae' and 'text_encoder') ...
        vae="", text_encoder="",          # ... or saved model directories
        batch_size=64, shard_size=1024,
    ))
    c.eval = ml_collections.ConfigDict(dict(timesteps=(0.0, 0.25, 0.5, 0.75), n_boot=1000, seed=0, batch_size=64))
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 200, 25, 100
    c.optim.learning_rate = 3e-4
    return c


# ------------------------------------------------------------------------------------------ checks

def check_config(config: ml_collections.ConfigDict) -> None:
    r = config.reward_model
    if r.loss not in rm.LOSSES:
        raise ConfigError(f"reward_model.loss={r.loss!r}; expected one of {rm.LOSSES}")
    if r.backbone not in BACKBONES:
        raise ConfigError(f"reward_model.backbone={r.backbone!r}; expected one of {BACKBONES}")
    if r.backbone == "lora" and not config.lora.rank:
        raise ConfigError("reward_model.backbone='lora' needs --config.lora.rank > 0")
    if r.backbone != "lora" and config.lora.rank:
        raise ConfigError(f"lora.rank={config.lora.rank} is set but reward_model.backbone={r.backbone!r}; use 'lora'")
    if not (isinstance(r.num_blocks, int) and r.num_blocks >= 1):
        raise ConfigError(f"reward_model.num_blocks={r.num_blocks!r} must be a positive integer")
    if not r.theta > 1.0:
        raise ConfigError(f"reward_model.theta={r.theta} must be > 1 (BTT's tie probability is 0 at 1)")
    if not 0.0 < r.t_max <= 1.0:
        raise ConfigError(f"reward_model.t_max={r.t_max} must be in (0, 1]")
    if sum(bool(x) for x in (r.packed_base, config.model.pretrained, config.model.init_from)) > 1:
        raise ConfigError("set at most one of reward_model.packed_base, model.pretrained and model.init_from")
    if any(not 0.0 <= t < 1.0 for t in config.eval.timesteps):
        raise ConfigError(f"eval.timesteps={tuple(config.eval.timesteps)} must be in [0, 1)")
    if not config.pairs.build and not config.data.train:
        raise ConfigError("data.train is empty: give the train pair cache or set --config.pairs.build=True")


def _check_data(cache, gcfg, path: str) -> None:
    """The train cache fits the backbone: channels, text width, latent grid divisible by the patch."""
    f = cache.info["fields"]
    shape, text = tuple(f["z_a"]["shape"]), tuple(f["text_embeddings"]["shape"])
    if shape[-1] != gcfg.in_channels:
        raise ConfigError(f"data.train {path!r}: latents have {shape[-1]} channels, the backbone reads {gcfg.in_channels}")
    if text[-1] != gcfg.text_dim:
        raise ConfigError(f"data.train {path!r}: text embeddings have width {text[-1]}, the backbone reads {gcfg.text_dim}")
    if any(s % p for s, p in zip(shape[:3], gcfg.patch_size)):
        raise ConfigError(f"data.train {path!r}: latent grid {shape[:3]} is not divisible by the patch {gcfg.patch_size}")


# ------------------------------------------------------------------------------------------ the hooks

def _build(config, mesh, rules) -> dit_setup.LoadedModel:
    r = config.reward_model
    if r.packed_base:
        generator, entry = packed.unpack_from_manifest(r.packed_base, "base", scan_layers=False)
        source = f"packed base {r.packed_base} ({entry['file']}, SHA-256 verified)"
    else:
        loaded = dit_setup.build_model(config.model, mesh, rules)
        generator, source = loaded.model, loaded.source
    layers = generator.config.num_layers
    if r.num_blocks > layers:
        raise ConfigError(f"reward_model.num_blocks={r.num_blocks} exceeds the backbone's {layers} layers ({source})")
    _check_data(preference_cache.open_pair_cache(config.data.train, "data.train"), generator.config, config.data.train)
    model = rm.LatentRewardModel(generator, r.num_blocks, pooled=r.pooled, rngs=nnx.Rngs(r.seed))
    what = "1 pooled token" if r.pooled else "3 query tokens"
    return dit_setup.LoadedModel(model, f"{source}: its first {r.num_blocks} of {layers} blocks + readout ({what})")


def _split(model, config):
    if config.reward_model.backbone == "lora":
        lora_lib.apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                            rngs=nnx.Rngs(config.seed + 1))
    return nnx.split(model, rm.trainable_filter(config.reward_model.backbone), ...)


def _batches(config):
    d = config.data
    n_proc = jax.process_count()
    if d.batch_size % n_proc:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by {n_proc} processes")
    cache = preference_cache.open_pair_cache(d.train, "data.train")
    ds = readers.make_dataset(cache, batch_size=d.batch_size // n_proc, seed=config.seed,
                              transform=preference_cache.PairExample())
    return iter(ds)


def _export(model, config, workdir: str, extra: dict) -> str:
    if config.reward_model.backbone == "lora":
        lora_lib.merge_lora(model)
    return saving.save_model(os.path.join(workdir, dit_setup.MODEL_DIR), model,
                             extra={**extra, "reward_model": config.reward_model.to_dict()})


def _frozen_sources(config) -> dict:
    m, r = config.model, config.reward_model
    return {"model.pretrained": m.pretrained, "model.init_from": m.init_from, "reward_model.packed_base": r.packed_base,
            "model.seed": m.seed if not (m.pretrained or m.init_from or r.packed_base) else None,
            "reward_model.num_blocks": r.num_blocks, "reward_model.pooled": r.pooled, "reward_model.seed": r.seed,
            "reward_model.backbone": r.backbone, "lora.rank": config.lora.rank, "lora.alpha": config.lora.alpha,
            "lora.targets": list(config.lora.targets)}


def _resume_settings(config, model, extra_frozen) -> dict:
    del extra_frozen
    out = {f"model.{k}": v for k, v in saving.architecture(model.config, rm.KIND).items()}
    out["data.batch_size"] = config.data.batch_size
    info = latent_cache.open_cache(config.data.train).info
    out["data.train (its cache)"] = {"num_examples": info.get("num_examples"), "created": info.get("created"),
                                     "source": info.get("source_description")}
    for k in ("loss", "theta", "t_max"):
        out[f"reward_model.{k}"] = config.reward_model[k]
    return out


def _describe(config) -> str:
    r = config.reward_model
    return {"frozen": "frozen backbone (readout and head trained)",
            "lora": f"LoRA rank {config.lora.rank} (alpha {config.lora.alpha}) on the blocks + readout",
            "full": "every parameter trained"}[r.backbone] + f"; loss {r.loss}"


def hooks() -> dit_setup.ModelHooks:
    return dit_setup.ModelHooks(what="the latent reward model", build=_build, split=_split, batches=_batches,
                                export=_export, frozen_sources=_frozen_sources, resume_settings=_resume_settings,
                                describe=_describe)


def make_loss(config: ml_collections.ConfigDict):
    r = config.reward_model

    def build(setup: dit_setup.Setup):
        inner = rm.make_loss_fn(setup.graphdef, r.loss, float(r.t_max), float(r.theta))

        def loss_fn(params, frozen, batch, key):
            return inner(params, frozen["model"], batch, key)
        return loss_fn, {}, {}

    return build


# ------------------------------------------------------------------------------------------ the pairs

def build_pairs(config, workdir: str) -> dict[str, str]:
    """The embedded preference set (TFDS) and its pair caches per split; returns ``{split: cache dir}``."""
    from shelllcc.data import preferences

    p = config.pairs
    pcfg = preferences.PreferenceConfig(num_frames=p.num_frames, height=p.height, width=p.width,
                                        num_prompts=p.num_prompts, pairs_per_prompt=p.pairs_per_prompt,
                                        degraded_per_prompt=p.degraded_per_prompt, tie_share=p.tie_share, seed=p.seed)
    t0 = time.time()
    builder = preferences.build(p.data_dir or os.path.join(workdir, "preferences"), pcfg)
    print(f"pairs: preference set ready [{time.time() - t0:.0f}s]", flush=True)
    if p.packed:
        vae, _ = packed.unpack_from_manifest(p.packed, "vae")
        text, _ = packed.unpack_from_manifest(p.packed, "text_encoder")
    elif p.vae and p.text_encoder:
        vae, text = saving.load_model(p.vae), saving.load_model(p.text_encoder)
    else:
        raise ConfigError("pairs.build needs the encoders: pairs.packed (a folder with 'vae' and 'text_encoder') "
                          "or both pairs.vae and pairs.text_encoder")
    encode_video = preference_cache.normalised_encoder(vae)
    encode_text = latent_cache.text_encoder_fn(text)
    out = {}
    for split in SPLITS:
        if split not in builder.info.splits:
            print(f"pairs: the preference set has no {split} split", flush=True)
            continue
        out[split] = os.path.join(workdir, "pairs", split)
        t0 = time.time()
        s = preference_cache.encode_pairs(builder.as_data_source(split), out[split], encode_video=encode_video,
                                          encode_text=encode_text, batch_size=p.batch_size, shard_size=p.shard_size,
                                          source_description=f"{builder.info.full_name} {split}", progress=True)
        print(f"pairs: {split}: {s['num_examples']} pairs ({s['report']['bad']} bad, left out) -> {out[split]} "
              f"[{time.time() - t0:.0f}s]", flush=True)
    return out


# ------------------------------------------------------------------------------------------ evaluation

def evaluate(config, workdir: str, model=None) -> dict:
    """``eval.json`` and ``eval_hist.png`` of the exported model on ``data.test`` (eps fitted on ``data.validation``)."""
    e = config.eval
    model = model or rm.load_reward_model(os.path.join(workdir, dit_setup.MODEL_DIR))
    test = preference_cache.read_all(preference_cache.open_pair_cache(config.data.test, "data.test"))
    val = (preference_cache.read_all(preference_cache.open_pair_cache(config.data.validation, "data.validation"))
           if config.data.validation else None)
    report = {"test_cache": config.data.test, "validation_cache": config.data.validation,
              "reward_model": config.reward_model.to_dict(), "steps": config.train.steps, "by_t": {}}
    for t in sorted({0.0, *[float(x) for x in e.timesteps]}):
        t0 = time.time()
        d_test = preference_eval.reward_differences(model, test, t, seed=e.seed, batch_size=e.batch_size)
        d_val = (preference_eval.reward_differences(model, val, t, seed=e.seed + 1, batch_size=e.batch_size)
                 if val is not None else None)
        rep = preference_eval.accuracy_report(test["labels"], d_test, val["labels"] if val is not None else None,
                                              d_val, n_boot=e.n_boot, seed=e.seed)
        report["by_t"][f"{t:g}"] = rep
        print(f"eval t={t:g}: acc without ties {preference_eval.summary_line(rep)} [{time.time() - t0:.0f}s]",
              flush=True)
        print(f"eval t={t:g}: acc with ties (eps on test) {preference_eval.summary_line(rep, 'acc_with_ties')}",
              flush=True)
        if t == 0.0:
            tokens = "pooled" if config.reward_model.pooled else "separate"
            preference_eval.histogram_png(os.path.join(workdir, EVAL_PNG), test["labels"], d_test,
                                          f"r(A) - r(B) on {len(d_test)} test pairs, t = 0 "
                                          f"({config.reward_model.loss}, {tokens} tokens)")
    tmp = os.path.join(workdir, EVAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(workdir, EVAL_JSON))
    return report


def run(config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    if config.pairs.build:
        dirs = build_pairs(config, workdir)
        config = copy.deepcopy(config)
        for split, d in dirs.items():
            if not config.data[split]:
                config.data[split] = d
    print(f"data: train {config.data.train!r}, validation {config.data.validation!r}, test {config.data.test!r}",
          flush=True)
    t1 = time.time()
    state = dit_setup.run_training(config, workdir, make_loss(config), hooks=hooks())
    t2 = time.time()
    report = evaluate(config, workdir) if config.data.test else None
    timing = {"pairs_s": t1 - t0, "train_s": t2 - t1, "eval_s": time.time() - t2}
    print("timing: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()), flush=True)
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump(timing, f)
    return state, report


get_config = config_entry.defaults_entry(default_config)
