"""Experiment ``train_embeddings``: the text-video embedding space PISCES's rewards read (issue 19 part 1;
``../shared/ALIGNMENT_METHODS.md`` section 4), trained in the project on a latent cache of real clips in place of
InternVideo2. Models, losses and the interface: :mod:`shelllcc.models.video_text`,
:mod:`shelllcc.rewards.embeddings`. Everything about how they are trained is **ours**.

Two stages, each through the one training stack (``dit_setup.run_training`` with its own
:class:`~experiments.dit_setup.ModelHooks`: sharded step, checkpoints with exact resume, SIGTERM, metrics), each
in its own folder with a ``DONE`` marker of its settings:

1. ``dual/``: the :class:`~shelllcc.models.video_text.DualEncoder` (section ``dual``) with the symmetric InfoNCE
   loss (:func:`~shelllcc.rewards.embeddings.info_nce_loss`) over the global batch (``data.batch_size`` clips
   with their captions: the other captions of the batch are the negatives, so microbatches are refused);
   temperature learnt from ``dual.temperature`` or fixed there (``dual.learn_temperature``).
2. ``matcher/``: the :class:`~shelllcc.models.video_text.MatchingModel` (section ``matcher``) with
   :func:`~shelllcc.rewards.embeddings.matching_bce_loss`: per clip its caption (positive) and one of its
   ``negatives.per_clip`` swapped captions (:mod:`shelllcc.data.swapped_captions`: one attribute replaced,
   re-rendered with the clip's template), drawn per step from the step's key.

``dual.steps`` / ``matcher.steps`` set each stage's length (``train.steps`` is not read); the rest of ``train`` and
``optim`` is shared.

Data: ``data.train`` (and ``data.test`` for the evaluation) are latent caches of Moving Textures clips holding
``latents``, ``text_embeddings``, ``caption``, ``source_index`` and the attribute label fields (``shape`` ...
``speed``), as the embedded pipeline's cache stage writes them (``workdir/latents/<split>``). Latents are
normalised with ``data.latent_mean`` / ``latent_std`` (empty: as stored): give the base's statistics, so that
the generator's normalised samples land in the same space. The swapped captions' text embeddings come from
``negatives.text_cache`` (a :mod:`shelllcc.data.text_cache` ``.npz`` holding every caption needed) or, when it is
empty, are computed once by the text encoder that wrote the cache (``negatives.text_encoder``, a saved model
directory, e.g. the pipeline's ``workdir/text_encoder``) into ``workdir/negatives.npz``.

Writes under ``workdir``: ``dual/`` and ``matcher/`` (``checkpoints/``, ``metrics.jsonl``, ``model/``, ``DONE``),
``negatives.npz``, and with ``data.test`` ``eval.json``: text->video and video->text recall@1 and @5 of the dual
encoder on the held-out clips (with chance ``k / n``), and the matcher's accuracy on the held-out clips' true
caption against each of six swapped ones (one per attribute): the share of clips whose true caption scores
higher (``ranked``), and the share of captions classified right at probability 0.5 (``classified``).
Load the models with :func:`shelllcc.rewards.embeddings.load_dual_encoder` / ``load_matcher`` (``workdir/dual``,
``workdir/matcher``).
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry, dit_setup, stage_markers
from shelllcc import parallel
from shelllcc.data import latent_cache, readers, text_cache
from shelllcc.data import swapped_captions as sc
from shelllcc.errors import ConfigError, InputFileError
from shelllcc.models import saving
from shelllcc.models import video_text as vt
from shelllcc.rewards import embeddings as emb

STAGES = ("dual", "matcher")
DONE = "DONE"
EVAL_JSON = "eval.json"
NEGATIVES_NPZ = "negatives.npz"
_ARCH = ("dim", "num_heads", "mlp_ratio", "video_layers", "text_layers", "patch_size", "position_frequencies")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "train_embeddings"
    c.seed = 0
    c.mesh = dit_setup.mesh_section()
    c.sharding_rules = parallel.DEFAULT_RULES
    c.data = ml_collections.ConfigDict(dict(
        train="", test="",               # latent caches (module doc); no test: no evaluation
        batch_size=64, prefetch=2,
        latent_mean=(), latent_std=(),   # per-channel normalisation (the base's statistics)
        in_memory=True,                  # gather batches from memory (the caches are small); False: stream
    ))
    # sizes ours, for latents [3, 16, 16, 16] and text [16, 128]; the output width 512 is InternVideo2's
    c.dual = ml_collections.ConfigDict(dict(
        dim=128, num_heads=4, mlp_ratio=4.0, video_layers=2, text_layers=2, patch_size=(1, 2, 2),
        position_frequencies=4, embed_dim=emb.EMBED_DIM,
        temperature=0.07,                # initial (or fixed) temperature: CLIP's
        learn_temperature=True,
        steps=1000,
        seed=0,                          # the init
    ))
    c.matcher = ml_collections.ConfigDict(dict(
        dim=128, num_heads=4, mlp_ratio=4.0, video_layers=1, text_layers=1, cross_layers=2, patch_size=(1, 2, 2),
        position_frequencies=4, steps=1000, seed=0,
    ))
    c.negatives = ml_collections.ConfigDict(dict(
        per_clip=6,                      # swapped captions per training clip (one drawn per step)
        seed=0,                          # which values replace the clip's (the test's use seed + 1)
        text_encoder="",                 # the saved text encoder that wrote the caches' text embeddings ...
        text_cache="",                   # ... or an .npz of every swapped caption's embeddings
    ))
    c.eval = ml_collections.ConfigDict(dict(clips=0, batch_size=64))   # clips: the first N of data.test (0: all)
    c.train = dit_setup.train_section(1000)
    c.train.log_every, c.train.checkpoint_every = 50, 500
    c.optim = dit_setup.optim_section(3e-4)
    return c


# ------------------------------------------------------------------------------------------ checks

def check_config(config: ml_collections.ConfigDict) -> None:
    if not config.data.train:
        raise ConfigError("data.train is empty: give a latent cache of Moving Textures clips (module doc)")
    for section in STAGES:
        s = config[section]
        if len(tuple(s.patch_size)) != 3 or min(tuple(s.patch_size)) < 1:
            raise ConfigError(f"{section}.patch_size={tuple(s.patch_size)} must be three positive integers")
        if s.dim % s.num_heads:
            raise ConfigError(f"{section}.dim={s.dim} is not divisible by {section}.num_heads={s.num_heads}")
        for k in ("video_layers", "text_layers"):
            if not (isinstance(s[k], int) and s[k] >= 0):
                raise ConfigError(f"{section}.{k}={s[k]!r} must be an integer >= 0")
    if not config.dual.temperature > 0:
        raise ConfigError(f"dual.temperature={config.dual.temperature} must be > 0")
    if not config.dual.embed_dim >= 1:
        raise ConfigError(f"dual.embed_dim={config.dual.embed_dim} must be >= 1")
    if not (isinstance(config.matcher.cross_layers, int) and config.matcher.cross_layers >= 1):
        raise ConfigError(f"matcher.cross_layers={config.matcher.cross_layers!r} must be an integer >= 1")
    n = config.negatives
    if not (isinstance(n.per_clip, int) and n.per_clip >= 1):
        raise ConfigError(f"negatives.per_clip={n.per_clip!r} must be an integer >= 1")
    if not (n.text_encoder or n.text_cache):
        raise ConfigError("negatives.text_encoder and negatives.text_cache are both empty: the swapped captions "
                          "need the text encoder that wrote the cache (a saved model directory) or their embeddings")
    if n.text_encoder and n.text_cache:
        raise ConfigError("set one of negatives.text_encoder and negatives.text_cache, not both")
    if len(config.data.latent_mean) != len(config.data.latent_std):
        raise ConfigError(f"data.latent_mean has {len(config.data.latent_mean)} entries, data.latent_std "
                          f"{len(config.data.latent_std)}")
    if config.train.microbatch_size:
        raise ConfigError(f"train.microbatch_size={config.train.microbatch_size}: InfoNCE's negatives are the whole "
                          "batch, microbatches would change the loss; use 0")


def _open(path: str, key: str) -> latent_cache.LatentCache:
    try:
        cache = latent_cache.open_cache(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key} {path!r}: {err}") from None
    fields = cache.info["fields"]
    missing = [f for f in ("latents", "text_embeddings", "caption", "source_index") + sc.ATTRIBUTE_NAMES
               if f not in fields]
    if missing:
        raise ConfigError(f"{key} {path!r} has no field(s) {missing} (fields: {sorted(fields)}); the swapped captions "
                          f"need the attribute labels the embedded pipeline's cache keeps")
    return cache


def _model_config(config, section: str, cache) -> vt.VideoTextConfig:
    s, f = config[section], cache.info["fields"]
    lat, text = tuple(f["latents"]["shape"]), tuple(f["text_embeddings"]["shape"])
    if len(config.data.latent_mean) not in (0, lat[-1]):
        raise ConfigError(f"data.latent_mean has {len(config.data.latent_mean)} entries; data.train latents have "
                          f"{lat[-1]} channels")
    if any(a % p for a, p in zip(lat[:3], s.patch_size)):
        raise ConfigError(f"{section}.patch_size={tuple(s.patch_size)} does not divide the latent grid {lat[:3]} of "
                          f"data.train")
    common = {k: (tuple(s[k]) if k == "patch_size" else s[k]) for k in _ARCH}
    common.update(latent_channels=lat[-1], text_dim=text[-1])
    if section == "dual":
        return vt.DualEncoderConfig(**common, embed_dim=s.embed_dim, temperature=float(s.temperature),
                                    learn_temperature=bool(s.learn_temperature))
    return vt.MatchingModelConfig(**common, cross_layers=s.cross_layers)


# ------------------------------------------------------------------------------------------ negatives

def _needed_captions(cache, per_clip: int, seed: int) -> list[str]:
    out = []
    for lo in range(0, len(cache), 256):
        for rec in cache.__getitems__(list(range(lo, min(lo + 256, len(cache))))):
            out += [c for _, c in sc.negatives(rec, per_clip, seed)]
    return out


def negative_table(config, workdir: str) -> str:
    """The ``.npz`` of every swapped caption's text embeddings (train: ``negatives.per_clip`` per clip; test: one
    per attribute): ``negatives.text_cache``, checked, or computed into ``workdir/negatives.npz``."""
    n = config.negatives
    needed = _needed_captions(_open(config.data.train, "data.train"), n.per_clip, n.seed)
    if config.data.test:
        needed += _needed_captions(_open(config.data.test, "data.test"), len(sc.ATTRIBUTE_NAMES), n.seed + 1)
    needed = sorted(set(needed))
    if n.text_cache:
        try:
            have = set(text_cache.read_text_cache(n.text_cache)[0])
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(f"negatives.text_cache {n.text_cache!r}: {err}") from None
        missing = [c for c in needed if c not in have]
        if missing:
            raise ConfigError(f"negatives.text_cache {n.text_cache!r} lacks {len(missing)} of the {len(needed)} swapped "
                              f"captions, e.g. {missing[0]!r}; compute it with negatives.text_encoder instead")
        return n.text_cache
    out = os.path.join(workdir, NEGATIVES_NPZ)
    try:
        encoder = saving.load_model(n.text_encoder)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"negatives.text_encoder {n.text_encoder!r}: {err}") from None
    if saving.model_kind(encoder) != "text_encoder":
        raise ConfigError(f"negatives.text_encoder {n.text_encoder!r} holds a {saving.model_kind(encoder)!r}, not a "
                          f"text encoder")
    encode = latent_cache.text_encoder_fn(encoder)
    t0 = time.time()
    embs, lengths = [], []
    for lo in range(0, len(needed), 256):
        e, ln = encode(needed[lo: lo + 256])
        embs.append(np.asarray(e, np.float32))
        lengths.append(np.asarray(ln))
    text_cache.write_text_cache(needed, np.concatenate(embs), np.concatenate(lengths), out, trim=True)
    print(f"negatives: {len(needed)} swapped captions encoded by {n.text_encoder} -> {out} [{time.time() - t0:.0f}s]",
          flush=True)
    return out


class _Examples:
    """A cache record -> the step's example: normalised latents, the caption's tokens and mask, and the
    record's ``per_clip`` swapped captions' tokens and masks (``neg_text [K, L, D]``, ``neg_mask [K, L]``,
    ``neg_attribute [K]``: the index of the attribute swapped)."""

    def __init__(self, table_path: str, mean, std, per_clip: int, seed: int, text_len: int):
        captions, embs, lengths = text_cache.read_text_cache(table_path)
        if embs.shape[1] != text_len:
            raise ConfigError(f"negatives: the swapped captions' embeddings have length {embs.shape[1]}, the cache's "
                              f"text embeddings {text_len}")
        self.rows = {c: i for i, c in enumerate(captions)}
        self.embs, self.lengths = embs, lengths
        self.mean = np.asarray(mean, np.float32) if len(mean) else None
        self.std = np.asarray(std, np.float32) if len(std) else None
        self.per_clip, self.seed = per_clip, seed

    def __call__(self, rec: dict) -> dict:
        z = np.asarray(rec["latents"], np.float32)
        if self.mean is not None:
            z = (z - self.mean) / self.std
        text = np.asarray(rec["text_embeddings"], np.float32)
        mask = np.arange(text.shape[0]) < int(rec["text_length"])
        neg = sc.negatives(rec, self.per_clip, self.seed)
        rows = [self.rows[c] for _, c in neg]
        neg_mask = np.arange(text.shape[0])[None, :] < self.lengths[rows][:, None]
        return {"latents": z, "text": text, "text_mask": mask, "neg_text": self.embs[rows], "neg_mask": neg_mask,
                "neg_attribute": np.asarray([sc.ATTRIBUTE_NAMES.index(a) for a, _ in neg], np.int32)}


# ------------------------------------------------------------------------------------------ the hooks

def _stage_config(config, stage: str, table: str) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.unlock()
    c.stage, c.negatives_table = stage, table
    c.train.steps = config[stage].steps
    c.lock()
    return c


def _build(config, mesh, rules) -> dit_setup.LoadedModel:
    del mesh, rules          # small models: replicated on every device, the batch split over the data axis
    stage = config.stage
    cfg = _model_config(config, stage, _open(config.data.train, "data.train"))
    cls = vt.DualEncoder if stage == "dual" else vt.MatchingModel
    model = cls(cfg, rngs=nnx.Rngs(config[stage].seed))
    return dit_setup.LoadedModel(model, f"a new {cls.__name__} (seed {config[stage].seed})")


def _batches(config):
    d = config.data
    n_proc = jax.process_count()
    if d.batch_size % n_proc:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by {n_proc} processes")
    cache = _open(d.train, "data.train")
    text_len = tuple(cache.info["fields"]["text_embeddings"]["shape"])[0]
    transform = _Examples(config.negatives_table, d.latent_mean, d.latent_std, config.negatives.per_clip,
                          config.negatives.seed, text_len)
    if d.in_memory:
        return readers.InMemoryBatches(cache, batch_size=d.batch_size // n_proc, seed=config.seed, transform=transform,
                                       name=d.train)
    return iter(readers.make_dataset(cache, batch_size=d.batch_size // n_proc, seed=config.seed, transform=transform))


def _export(model, config, workdir: str, extra: dict) -> str:
    return saving.save_model(os.path.join(workdir, dit_setup.MODEL_DIR), model,
                             extra={**extra, config.stage: config[config.stage].to_dict(),
                                    "data": config.data.to_dict(), "negatives": config.negatives.to_dict()})


def _cache_identity(path: str) -> dict:
    info = latent_cache.open_cache(path).info
    return {"num_examples": info.get("num_examples"), "created": info.get("created"),
            "source": info.get("source_description")}


def _resume_settings(config, model, extra_frozen) -> dict:
    del extra_frozen
    kind = saving.model_kind(model)
    out = {f"model.{k}": v for k, v in saving.architecture(model.config, kind).items()}
    out["data.batch_size"] = config.data.batch_size
    out["data.train (its cache)"] = _cache_identity(config.data.train)
    out["data.latent_mean"], out["data.latent_std"] = list(config.data.latent_mean), list(config.data.latent_std)
    out["negatives.per_clip"], out["negatives.seed"] = config.negatives.per_clip, config.negatives.seed
    return out


def hooks(stage: str) -> dit_setup.ModelHooks:
    what = {"dual": "the dual encoder", "matcher": "the matching model"}[stage]
    loss = {"dual": "symmetric InfoNCE", "matcher": "BCE, true vs attribute-swapped captions"}[stage]
    return dit_setup.ModelHooks(
        what=what, build=_build, split=lambda model, config: nnx.split(model, nnx.Param, ...), batches=_batches,
        export=_export, frozen_sources=lambda config: {}, resume_settings=_resume_settings,
        describe=lambda config: f"every parameter trained; {loss}")


def make_loss(config: ml_collections.ConfigDict):
    stage = config.stage

    def build(setup: dit_setup.Setup):
        graphdef = setup.graphdef

        def dual_loss(params, frozen, batch, key):
            del key
            model = nnx.merge(graphdef, params, frozen["model"])
            v = model.embed_video(batch["latents"])
            t = model.embed_text(batch["text"], batch["text_mask"])
            scale = model.logit_scale()
            loss = emb.info_nce_loss(v, t, scale)
            sim = t @ v.T
            acc = jnp.mean(jnp.argmax(sim, axis=1) == jnp.arange(sim.shape[0]))
            return loss, {"loss": loss, "t2v_batch_acc": acc, "logit_scale": scale}

        def matcher_loss(params, frozen, batch, key):
            model = nnx.merge(graphdef, params, frozen["model"])
            b, k = batch["neg_attribute"].shape
            j = jax.random.randint(key, (b,), 0, k)
            rows = jnp.arange(b)
            pos = model(batch["latents"], batch["text"], batch["text_mask"])
            neg = model(batch["latents"], batch["neg_text"][rows, j], batch["neg_mask"][rows, j])
            loss = emb.matching_bce_loss(pos, neg)
            return loss, {"loss": loss, "ranked_acc": jnp.mean(pos > neg),
                          "classified_acc": 0.5 * (jnp.mean(pos > 0) + jnp.mean(neg < 0))}

        return (dual_loss if stage == "dual" else matcher_loss), {}, {}

    return build


# ------------------------------------------------------------------------------------------ evaluation

def _read_test(config, table: str) -> dict:
    cache = _open(config.data.test, "data.test")
    n = len(cache) if not config.eval.clips else min(config.eval.clips, len(cache))
    text_len = tuple(cache.info["fields"]["text_embeddings"]["shape"])[0]
    transform = _Examples(table, config.data.latent_mean, config.data.latent_std, len(sc.ATTRIBUTE_NAMES),
                          config.negatives.seed + 1, text_len)
    return readers.stack_examples([transform(r) for r in cache.__getitems__(list(range(n)))])


def _batched(fn, *arrays, batch_size: int):
    outs = [np.asarray(fn(*(a[lo: lo + batch_size] for a in arrays))) for lo in range(0, len(arrays[0]), batch_size)]
    return np.concatenate(outs)


def evaluate(config, workdir: str, table: str) -> dict:
    """``eval.json`` (module doc) of the exported models on ``data.test``."""
    test = _read_test(config, table)
    n, bs = len(test["latents"]), config.eval.batch_size
    report: dict = {"test_cache": config.data.test, "clips": n}
    dual = emb.load_dual_encoder(os.path.join(workdir, "dual"))
    gd, st = nnx.split(dual)
    video = jax.jit(lambda s, z: nnx.merge(gd, s).embed_video(z))
    text = jax.jit(lambda s, t, m: nnx.merge(gd, s).embed_text(t, m))
    v = _batched(lambda z: video(st, z), test["latents"], batch_size=bs)
    t = _batched(lambda a, m: text(st, a, m), test["text"], test["text_mask"], batch_size=bs)
    recall = emb.retrieval_recall(v, t, ks=(1, 5))
    report["retrieval"] = {**recall, "chance@1": 1 / n, "chance@5": min(5 / n, 1.0),
                           "temperature": float(1.0 / dual.logit_scale())}
    print("eval: retrieval on " + f"{n} held-out clips: " + ", ".join(f"{k} {x:.3f}" for k, x in recall.items())
          + f" (chance @1 {1 / n:.3f}, @5 {min(5 / n, 1):.3f})", flush=True)
    matcher = emb.load_matcher(os.path.join(workdir, "matcher"))
    gm, sm = nnx.split(matcher)
    logits = jax.jit(lambda s, z, a, m: nnx.merge(gm, s)(z, a, m))
    pos = _batched(lambda z, a, m: logits(sm, z, a, m), test["latents"], test["text"], test["text_mask"], batch_size=bs)
    by_attr = {}
    for k, name in enumerate(sc.ATTRIBUTE_NAMES):
        assert np.all(test["neg_attribute"][:, k] == k)
        neg = _batched(lambda z, a, m: logits(sm, z, a, m), test["latents"], test["neg_text"][:, k],
                       test["neg_mask"][:, k], batch_size=bs)
        by_attr[name] = {"ranked": float(np.mean(pos > neg)),
                         "classified": float(0.5 * (np.mean(pos > 0) + np.mean(neg < 0)))}
    report["matcher"] = {"by_attribute": by_attr, "true_caption_positive": float(np.mean(pos > 0)),
                         "ranked_mean": float(np.mean([a["ranked"] for a in by_attr.values()])), "chance": 0.5}
    print("eval: matcher, true caption above the swapped one: " + ", ".join(
        f"{a} {x['ranked']:.2f}" for a, x in by_attr.items()) + " (chance 0.50)", flush=True)
    tmp = os.path.join(workdir, EVAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(workdir, EVAL_JSON))
    return report


# ------------------------------------------------------------------------------------------ the run

def _run_stage(stage: str, config, workdir: str, table: str):
    out = os.path.join(workdir, stage)
    c = _stage_config(config, stage, table)
    keys = (stage, "data", "negatives", "train", "optim", "seed", "mesh")
    rec = stage_markers.record(stage_markers.settings_of(c, keys), {})
    marker = os.path.join(out, DONE)
    old = stage_markers.read(marker)
    if old is not None and old.get("hash") == rec["hash"]:
        print(f"stage {stage}: done earlier; skipped", flush=True)
        return None
    if old is not None:
        raise ConfigError(f"stage {stage} in {out} was finished with other settings "
                          f"({stage_markers.what_changed(old, rec)}); use a new workdir")
    os.makedirs(out, exist_ok=True)
    print(f"--- stage {stage} ---", flush=True)
    state = dit_setup.run_training(c, out, make_loss(c), hooks=hooks(stage))
    stage_markers.write(marker, rec)
    return state


def run(config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    train = _open(config.data.train, "data.train")
    for stage in STAGES:           # both models fit the cache before any work (not after the first stage)
        _model_config(config, stage, train)
    if config.data.test:
        _open(config.data.test, "data.test")
    os.makedirs(workdir, exist_ok=True)
    timing, t0 = {}, time.time()
    try:
        table = negative_table(config, workdir)
    except KeyError as err:
        raise InputFileError(f"negatives: {err}") from None
    timing["negatives_s"] = time.time() - t0
    state = None
    for stage in STAGES:
        t0 = time.time()
        state = _run_stage(stage, config, workdir, table) or state
        timing[f"{stage}_s"] = time.time() - t0
    t0 = time.time()
    report = evaluate(config, workdir, table) if config.data.test else None
    timing["eval_s"] = time.time() - t0
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump(timing, f)
    return state, report


get_config = config_entry.defaults_entry(default_config)
