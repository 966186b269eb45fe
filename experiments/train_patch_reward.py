"""Experiment ``train_patch_reward``: HALO's patch reward model as we reconstruct it (issue 18 part 2; ours).

The model (:class:`shelllcc.rewards.patch_reward.PatchRewardModel`) is a trained video reward model's backbone
(``patch_reward.reward_model``: a ``train_reward_model`` workdir or its ``model/``; HALO initialises its patch
model from a video reward model) with a fresh head giving one reward per patch of ``patch_reward.patch_tokens``
DiT tokens, trained with the per-patch BCE (:func:`~shelllcc.rewards.patch_reward.patch_bce_loss`) on the labels
of the localised-degradation oracle (:mod:`shelllcc.data.patch_degradations`; HALO's are GPT-4o's). Backbone
``full`` (every weight trained) or ``frozen`` (the head only). Inputs noised to ``t ~ U[0, t_max)``; the default
``t_max = 0`` judges clean latents, which is what Gran-DPO reads. It trains through the one training stack
(``dit_setup.run_training`` with :func:`hooks`).

Data: latent caches per split in ``data.train`` / ``validation`` / ``test`` with the fields ``latents`` (normalised
like the DiT's), ``text_embeddings``, ``patch_labels`` int32 ``[P]`` (1 clean, 0 degraded), ``kinds`` (the
degradation per patch) and ``index``. With ``clips.build`` they are made first (:func:`build_clips`): Moving
Textures clips (``clips.num_*`` per split, each split its own seed) through
:class:`~shelllcc.data.patch_degradations.PatchClips`, encoded with the VAE and text encoder of ``clips.packed``
(or ``clips.vae`` / ``clips.text_encoder``: a ``train_vae`` workdir and a saved text encoder) into
``workdir/clips/<split>``. The patch grid of the labels is the model's (``patch_tokens`` x the DiT's patch, in
latent cells), so the two cannot disagree.

Evaluation (:func:`evaluate`, on ``data.test``), written to ``eval.json``:

* ``patch_accuracy``: the share of test patches with ``(r_p > 0) == y_p``, with a 95% bootstrap interval over
  clips; per true label (``accuracy_clean``, ``accuracy_degraded``) and per degradation kind (the share of that
  kind's patches called degraded), against the majority-label baseline;
* ``consistency`` (HALO's claim that patch and video rewards agree): Spearman's rank correlation over the test
  clips between the mean patch reward ``mean_p r_p`` and the video reward model's ``(VQ + MQ + TA) / 3`` (both on
  clean latents), with a 95% bootstrap interval; beside it each one's Spearman with the oracle's share of clean
  patches (how much of the clip is undegraded), so the agreement can be read against what each model knows.
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

from experiments import config_entry, dit_setup, train_vae
from shelllcc.data import latent_cache, preference_cache, readers
from shelllcc.data import moving_textures as mt
from shelllcc.data import patch_degradations as pd
from shelllcc.errors import ConfigError, InputFileError
from shelllcc.evaluation import intervals
from shelllcc.models import packed, saving
from shelllcc.rewards import patch_reward as pr
from shelllcc.rewards import reward_model as rm

SPLITS = ("train", "validation", "test")
BACKBONES = ("full", "frozen")
EVAL_JSON = "eval.json"
FIELDS = ("latents", "text_embeddings", "patch_labels")


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("train_patch_reward")
    c.model.scan_layers = False
    c.patch_reward = ml_collections.ConfigDict(dict(
        reward_model="",                  # the trained video reward model whose backbone starts the patch model
        patch_tokens=(1, 2, 2),           # DiT tokens per patch (t, h, w); the embedded benchmark: 12 patches
        backbone="full",                  # full | frozen (the head only)
        t_max=0.0,                        # training noise levels t ~ U[0, t_max); 0: clean latents
        seed=0,                           # the head's init
    ))
    c.data = ml_collections.ConfigDict(dict(train="", validation="", test="", batch_size=32, prefetch=2))
    c.clips = ml_collections.ConfigDict(dict(
        build=False,                      # make the clip caches first (module doc)
        num_train=512, num_validation=64, num_test=128,
        max_patches=4,                    # a degraded clip has 1..max_patches degraded patches
        clean_share=0.25,                 # clips left clean
        kinds=tuple(pd.KINDS),
        seed=0, num_frames=9, height=64, width=64, background_texture=True,
        packed="",                        # the encoders' packed folder (its 'vae' and 'text_encoder') ...
        vae="", text_encoder="",          # ... or a train_vae workdir and a saved text encoder
        batch_size=32, shard_size=512,
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, n_boot=1000, seed=0))
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 300, 25, 100
    c.optim.learning_rate = 1e-4
    return c


# ------------------------------------------------------------------------------------------ checks

def check_config(config: ml_collections.ConfigDict) -> None:
    p, cl = config.patch_reward, config.clips
    if p.backbone not in BACKBONES:
        raise ConfigError(f"patch_reward.backbone={p.backbone!r}; expected one of {BACKBONES}")
    if not p.reward_model:
        raise ConfigError("patch_reward.reward_model is empty: the patch model starts from a trained video reward "
                          "model (a train_reward_model workdir or its model/)")
    if len(tuple(p.patch_tokens)) != 3 or min(p.patch_tokens) < 1:
        raise ConfigError(f"patch_reward.patch_tokens={tuple(p.patch_tokens)} must be three positive token counts")
    if not 0.0 <= p.t_max <= 1.0:
        raise ConfigError(f"patch_reward.t_max={p.t_max} must be in [0, 1]")
    if config.lora.rank:
        raise ConfigError(f"lora.rank={config.lora.rank}: train_patch_reward trains the backbone full or frozen")
    if not cl.build and not config.data.train:
        raise ConfigError("data.train is empty: give the train clip cache or set --config.clips.build=True")
    if cl.build:
        for k in ("num_train", "max_patches", "batch_size", "shard_size"):
            if cl[k] < 1:
                raise ConfigError(f"clips.{k}={cl[k]} must be >= 1")
        if not 0.0 <= cl.clean_share < 1.0:
            raise ConfigError(f"clips.clean_share={cl.clean_share} must be in [0, 1)")
        bad = [k for k in cl.kinds if k not in pd.KINDS]
        if bad or not cl.kinds:
            raise ConfigError(f"clips.kinds={tuple(cl.kinds)}; expected a non-empty subset of {pd.KINDS}")


def open_clip_cache(path: str, what: str) -> latent_cache.LatentCache:
    """A clip cache holding the fields this experiment reads (one-line errors naming the key and field)."""
    if not path:
        raise InputFileError(f"{what}: no directory given")
    try:
        cache = latent_cache.open_cache(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputFileError(f"{what}: {e}") from None
    missing = [f for f in FIELDS if f not in (cache.info.get("fields") or {})]
    if missing:
        raise InputFileError(f"{what} {path!r} has no field(s) {missing}; write it with train_patch_reward's "
                             f"clips.build")
    return cache


def _check_data(cache, model: pr.PatchRewardModel, path: str) -> None:
    f = cache.info["fields"]
    shape = tuple(f["latents"]["shape"])
    cfg = model.config
    if shape[-1] != cfg.in_channels or f["text_embeddings"]["shape"][-1] != cfg.text_dim:
        raise ConfigError(f"data.train {path!r}: latents {shape} / text width {f['text_embeddings']['shape'][-1]} do "
                          f"not fit the backbone ({cfg.in_channels} channels, text {cfg.text_dim})")
    try:
        masks = pr.latent_patch_masks(shape[:3], cfg.patch())
    except ValueError as e:
        raise ConfigError(f"patch_reward.patch_tokens={cfg.patch_tokens}: {e}") from None
    if tuple(f["patch_labels"]["shape"]) != (masks.shape[0],):
        raise ConfigError(f"data.train {path!r}: patch_labels {f['patch_labels']['shape']} but patches of "
                          f"{cfg.patch()} cells give {masks.shape[0]} on latents {shape[:3]} (another patch_tokens?)")


# ------------------------------------------------------------------------------------------ the hooks

def _build(config, mesh, rules) -> dit_setup.LoadedModel:
    del mesh, rules
    p = config.patch_reward
    try:
        video = rm.load_reward_model(p.reward_model)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"patch_reward.reward_model={p.reward_model!r}: {e}") from None
    model = pr.PatchRewardModel.from_video_model(video, tuple(p.patch_tokens), rngs=nnx.Rngs(p.seed))
    _check_data(open_clip_cache(config.data.train, "data.train"), model, config.data.train)
    return dit_setup.LoadedModel(model, f"video reward model {p.reward_model}: its {video.config.num_blocks} blocks + "
                                        f"a fresh patch head ({tuple(p.patch_tokens)} tokens per patch)")


def _split(model, config):
    return nnx.split(model, pr.trainable_filter(config.patch_reward.backbone), ...)


class ClipExample:
    """One clip-cache record -> the patch model's training example."""

    def __call__(self, record: dict) -> dict:
        return {"latents": np.asarray(record["latents"], np.float32),
                "context": np.asarray(record["text_embeddings"], np.float32),
                "patch_labels": np.asarray(record["patch_labels"], np.int32)}


def _batches(config):
    d = config.data
    if d.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by {jax.process_count()} processes")
    cache = open_clip_cache(d.train, "data.train")
    return iter(readers.make_dataset(cache, batch_size=d.batch_size // jax.process_count(), seed=config.seed,
                                     transform=ClipExample()))


def _export(model, config, workdir: str, extra: dict) -> str:
    return saving.save_model(os.path.join(workdir, dit_setup.MODEL_DIR), model,
                             extra={**extra, "patch_reward": config.patch_reward.to_dict()})


def _frozen_sources(config) -> dict:
    p = config.patch_reward
    return {"patch_reward.reward_model": p.reward_model, "patch_reward.patch_tokens": list(p.patch_tokens),
            "patch_reward.seed": p.seed, "patch_reward.backbone": p.backbone}


def _resume_settings(config, model, extra_frozen) -> dict:
    del extra_frozen
    out = {f"model.{k}": v for k, v in saving.architecture(model.config, pr.KIND).items()}
    out["data.batch_size"] = config.data.batch_size
    info = latent_cache.open_cache(config.data.train).info
    out["data.train (its cache)"] = {"num_examples": info.get("num_examples"), "created": info.get("created"),
                                     "source": info.get("source_description")}
    out["patch_reward.t_max"] = config.patch_reward.t_max
    return out


def hooks() -> dit_setup.ModelHooks:
    return dit_setup.ModelHooks(
        what="the patch reward model", build=_build, split=_split, batches=_batches, export=_export,
        frozen_sources=_frozen_sources, resume_settings=_resume_settings,
        describe=lambda config: {"full": "every parameter trained",
                                 "frozen": "backbone frozen (the patch head trained)"}[config.patch_reward.backbone]
        + "; per-patch BCE")


def make_loss(config: ml_collections.ConfigDict):
    def build(setup: dit_setup.Setup):
        inner = pr.make_patch_loss_fn(setup.graphdef, float(config.patch_reward.t_max))

        def loss_fn(params, frozen, batch, key):
            return inner(params, frozen["model"], batch, key)
        return loss_fn, {}, {}

    return build


# ------------------------------------------------------------------------------------------ the clips

def clip_spec(cl, split: str) -> tuple[mt.ClipSpec, int]:
    """The clips' rendering and the split's seed (:func:`moving_textures.split_seed`: splits share no clip)."""
    spec = mt.ClipSpec(num_frames=cl.num_frames, height=cl.height, width=cl.width, seed=cl.seed,
                       background_texture=cl.background_texture)
    return spec, mt.split_seed(cl.seed, split)


def _latent_grid(encode_video, spec: mt.ClipSpec) -> tuple[int, int, int]:
    z = np.asarray(encode_video(np.zeros((1, spec.num_frames, spec.height, spec.width, 3), np.uint8)))
    return tuple(int(x) for x in z.shape[1:4])


def load_encoders(cl):
    """``(encode_video, encode_text)`` from ``clips.packed`` or ``clips.vae`` + ``clips.text_encoder``."""
    if cl.packed:
        vae, _ = packed.unpack_from_manifest(cl.packed, "vae")
        text, _ = packed.unpack_from_manifest(cl.packed, "text_encoder")
    elif cl.vae and cl.text_encoder:
        vae = train_vae.load(cl.vae) if os.path.isdir(os.path.join(cl.vae, dit_setup.MODEL_DIR)) else \
            saving.load_model(cl.vae)
        text = saving.load_model(cl.text_encoder)
    else:
        raise ConfigError("clips.build needs the encoders: clips.packed (a folder with 'vae' and 'text_encoder') or "
                          "both clips.vae and clips.text_encoder")
    return preference_cache.normalised_encoder(vae), latent_cache.text_encoder_fn(text)


def build_clips(config, workdir: str, patch: tuple[int, int, int], encode_video=None, encode_text=None,
                progress: bool = True) -> dict[str, str]:
    """The patch-labelled clip caches per split under ``workdir/clips``; ``patch`` in latent cells (the model's).
    ``encode_video`` / ``encode_text`` default to :func:`load_encoders`. Returns ``{split: cache dir}``."""
    cl = config.clips
    if encode_video is None or encode_text is None:
        encode_video, encode_text = load_encoders(cl)
    out = {}
    for split in SPLITS:
        n = int(cl[f"num_{split}"])
        if n < 1:
            continue
        spec, seed = clip_spec(cl, split)
        latent = _latent_grid(encode_video, spec)
        try:
            src = pd.PatchClips(spec, seed, n, latent, patch, max_patches=int(cl.max_patches),
                                clean_share=float(cl.clean_share), kinds=tuple(cl.kinds))
        except ValueError as e:
            raise ConfigError(f"patch_reward.patch_tokens / clips: {e}") from None
        out[split] = os.path.join(workdir, "clips", split)
        t0 = time.time()
        s = latent_cache.encode_to_cache(src, out[split], encode_video=encode_video, encode_text=encode_text,
                                         batch_size=int(cl.batch_size), shard_size=int(cl.shard_size),
                                         keep_fields=("index", "patch_labels", "kinds"),
                                         source_description=f"patch clips {split} seed {seed} n {n} patch {patch} "
                                                            f"max {cl.max_patches} clean {cl.clean_share} "
                                                            f"kinds {tuple(cl.kinds)}", progress=False)
        if progress:
            print(f"clips: {split}: {s['num_examples']} clips, latents {latent}, {src.masks.shape[0]} patches "
                  f"-> {out[split]} [{time.time() - t0:.0f}s]", flush=True)
    return out


def model_patch(config) -> tuple[int, int, int]:
    """The patch in latent cells: ``patch_tokens`` x the video reward model's DiT patch (read from its model.json)."""
    d = config.patch_reward.reward_model
    d = os.path.join(d, dit_setup.MODEL_DIR) if os.path.isdir(os.path.join(d, dit_setup.MODEL_DIR)) else d
    try:
        arch = saving.read_model_json(d)["architecture"]
    except FileNotFoundError as e:
        raise ConfigError(f"patch_reward.reward_model={config.patch_reward.reward_model!r}: {e}") from None
    return tuple(int(a) * int(b) for a, b in zip(config.patch_reward.patch_tokens, arch["patch_size"]))


# ------------------------------------------------------------------------------------------ evaluation

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def spearman(a, b) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (nan if either is constant)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / den) if den > 0 else float("nan")


def read_clips(cache) -> dict[str, np.ndarray]:
    recs = cache.__getitems__(list(range(len(cache))))
    ex = ClipExample()
    out = {k: np.stack([ex(r)[k] for r in recs]) for k in ("latents", "context", "patch_labels")}
    out["kinds"] = np.array([[k for k in _text(r.get("kinds", "")).split(",")] for r in recs], dtype=object)
    return out


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def score_clips(patch_model, video_model, clips: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(patch rewards [N, P], video rewards [N])`` on clean latents; the video reward ``(VQ + MQ + TA) / 3``."""
    patch_fn = nnx.jit(pr.patch_rewards)
    video_fn = nnx.jit(lambda m, z, c: jnp.mean(rm.score(m, z, 0.0, c), axis=-1))
    n = len(clips["latents"])
    rp, rv = [], []
    for lo in range(0, n, batch_size):
        z, c = clips["latents"][lo:lo + batch_size], clips["context"][lo:lo + batch_size]
        pad = batch_size - len(z)                   # one shape: one compilation
        zp = np.concatenate([z, np.repeat(z[-1:], pad, 0)]) if pad else z
        cp = np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c
        rp.append(np.asarray(patch_fn(patch_model, zp, cp))[:len(z)])
        rv.append(np.asarray(video_fn(video_model, zp, cp))[:len(z)])
    return np.concatenate(rp), np.concatenate(rv)


def patch_report(r_patch, r_video, labels, kinds, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The evaluation's numbers (module doc) from patch rewards ``[N, P]``, video rewards ``[N]``, labels ``[N, P]``
    and kinds ``[N, P]`` (strings, '' clean); intervals by a bootstrap over clips."""
    r_patch, labels = np.asarray(r_patch, np.float64), np.asarray(labels)
    right = ((r_patch > 0) == (labels == 1)).astype(np.float64)
    n = len(labels)
    boot = lambda data, stat: intervals.bootstrap({k: v[None] for k, v in data.items()}, stat,  # noqa: E731
                                                  n_boot=n_boot, seed=seed)
    clean_share = labels.mean(axis=1)
    mean_patch = r_patch.mean(axis=1)
    out = {"clips": int(n), "patches_per_clip": int(labels.shape[1]), "degraded_share": float(1 - labels.mean()),
           "majority_baseline": float(max(labels.mean(), 1 - labels.mean())),
           "patch_accuracy": boot({"right": right}, intervals.mean_of("right")),
           "accuracy_clean": float(right[labels == 1].mean()) if (labels == 1).any() else None,
           "accuracy_degraded": float(right[labels == 0].mean()) if (labels == 0).any() else None,
           "degraded_found_by_kind": {}}
    kinds = np.asarray(kinds, dtype=object)
    for k in pd.KINDS:
        hit = kinds == k
        if hit.any():
            out["degraded_found_by_kind"][k] = {"patches": int(hit.sum()), "found": float(right[hit].mean())}
    data = {"mean_patch": mean_patch, "video": np.asarray(r_video, np.float64), "clean_share": clean_share}

    def rank_corr(a, b):
        value = spearman(data[a], data[b])
        if not np.isfinite(value):          # a constant side (e.g. every test clip clean): no interval to give
            return {"value": value, "lo": value, "hi": value, "note": "a constant side: undefined"}
        try:
            return boot(data, lambda d: spearman(d[a], d[b]))
        except ValueError as e:          # resamples of few distinct clips can be constant
            return {"value": value, "lo": float("nan"), "hi": float("nan"), "note": str(e)}

    out["consistency"] = {"spearman_mean_patch_vs_video": rank_corr("mean_patch", "video"),
                          "spearman_mean_patch_vs_clean_share": rank_corr("mean_patch", "clean_share"),
                          "spearman_video_vs_clean_share": rank_corr("video", "clean_share")}
    return out


def evaluate(config, workdir: str, model=None) -> dict:
    """``eval.json`` of the exported model on ``data.test`` (module doc)."""
    e = config.eval
    model = model or pr.load_patch_reward_model(os.path.join(workdir, dit_setup.MODEL_DIR))
    video = rm.load_reward_model(config.patch_reward.reward_model)
    clips = read_clips(open_clip_cache(config.data.test, "data.test"))
    t0 = time.time()
    r_patch, r_video = score_clips(model, video, clips, int(e.batch_size))
    rep = patch_report(r_patch, r_video, clips["patch_labels"], clips["kinds"], n_boot=int(e.n_boot), seed=int(e.seed))
    rep.update({"test_cache": config.data.test, "reward_model": config.patch_reward.reward_model,
                "patch_reward": config.patch_reward.to_dict(), "steps": config.train.steps,
                "patch_cells": list(model.config.patch())})
    a, c = rep["patch_accuracy"], rep["consistency"]["spearman_mean_patch_vs_video"]
    print(f"eval: patch accuracy {intervals.format_interval(a)} (majority {rep['majority_baseline']:.3f}); "
          f"Spearman(mean patch, video) {intervals.format_interval(c)} on {rep['clips']} clips "
          f"[{time.time() - t0:.0f}s]", flush=True)
    tmp = os.path.join(workdir, EVAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(tmp, os.path.join(workdir, EVAL_JSON))
    return rep


def run(config: ml_collections.ConfigDict, workdir: str, encoders=None):
    """Build the clip caches (``clips.build``; ``encoders``: ``(encode_video, encode_text)`` to use instead of
    ``clips.packed`` / ``vae``), train, export, evaluate on ``data.test``."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    if config.clips.build:
        dirs = build_clips(config, workdir, model_patch(config), *(encoders or (None, None)))
        config = copy.deepcopy(config)
        for split, d in dirs.items():
            if not config.data[split]:
                config.data[split] = d
    t1 = time.time()
    state = dit_setup.run_training(config, workdir, make_loss(config), hooks=hooks())
    t2 = time.time()
    report = evaluate(config, workdir) if config.data.test else None
    timing = {"clips_s": t1 - t0, "train_s": t2 - t1, "eval_s": time.time() - t2}
    print("timing: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()), flush=True)
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump(timing, f)
    return state, report


get_config = config_entry.defaults_entry(default_config)
