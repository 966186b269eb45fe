"""Experiment ``train_ot_map``: PISCES's neural OT map ``T`` from text to video embeddings and its critic ``f``
(issue 19 part 2; ``../shared/ALIGNMENT_METHODS.md`` section 4; model, losses and loop in
:mod:`shelllcc.rewards.pisces`), on the paired embeddings of real clips by a trained dual encoder.

Inputs: ``embeddings``, a ``train_embeddings`` workdir (its ``dual/``) or a saved dual encoder; ``data.train``
(and ``data.test``, the evaluation's held-out clips) latent caches with ``latents``, ``text_embeddings`` and
``text_length``, latents normalised with ``data.latent_mean`` / ``latent_std`` as the dual encoder was trained
(the base's statistics in the embedded pipeline). Every clip gives a text embedding ``e_t`` (its caption) and a
video embedding ``e_v``; ``T`` and ``f`` train on the two sets (section 4's loop: ``train.outer_steps`` x
(``train.map_updates`` updates of ``T``, one of ``f``), Adam with cosine decay and clipping).

No checkpoints and no resume (ours): the whole loop takes minutes at most (measured: about 0.6 s per outer step of
the 512-1024-1024-512 pair at batch 256 on two shared CPU cores, so 500 steps in about 5 minutes; a GPU was not
timed); an interrupted run is rerun from the start.

Writes under ``workdir``: ``model/`` (the map, kind ``pisces_transport_map``: what ``reward.pisces.ot_map`` reads),
``critic/`` (kind ``pisces_critic``), ``metrics.jsonl`` (the losses every ``train.log_every`` outer steps),
``timing.json`` (``embed_s``, ``train_s``) and, with ``data.test``, ``eval.json`` on the held-out pairs:

* ``matched_mapped``: mean ``cos(e_v,i, T(e_t,i))`` (the quality reward of real clips with their captions);
* ``matched_raw``: mean ``cos(e_v,i, e_t,i)`` (the dual encoder's own similarity, no map);
* ``mismatched_mapped`` / ``mismatched_raw``: the same with each clip against the next clip's caption (``i + 1``
  mod ``n``, ours), the baseline a caption-blind map would reach;
* ``retrieval_mapped`` / ``retrieval_raw``: text->video and video->text recall@1 and @5 with ``T(e_t)`` or ``e_t``;
* ``train_matched_mapped``: ``matched_mapped`` on the train pairs (the fit).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry
from shelllcc.data import latent_cache
from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.rewards import embeddings as emb
from shelllcc.rewards import pisces

EVAL_JSON = "eval.json"
TIMING_JSON = "timing.json"
MODEL_DIR, CRITIC_DIR = "model", "critic"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "train_ot_map"
    c.embeddings = ""                  # a train_embeddings workdir (its dual/) or a saved dual encoder
    c.data = ml_collections.ConfigDict(dict(train="", test="", latent_mean=(), latent_std=(), batch_size=64,
                                            clips=0))     # clips: the first N of data.train (0: all)
    c.map = ml_collections.ConfigDict(dict(hidden=(1024, 1024), layer_norm_eps=1e-5))     # section 4's trunk
    d = pisces.OTTrainConfig()
    c.train = ml_collections.ConfigDict(dict(outer_steps=d.outer_steps, map_updates=d.map_updates,
                                             batch_size=d.batch_size, learning_rate=d.learning_rate,
                                             grad_clip=d.grad_clip, seed=d.seed, log_every=d.log_every))
    return c


def check_config(config) -> None:
    if not config.embeddings:
        raise ConfigError("embeddings is empty: give a train_embeddings workdir (or a saved dual encoder)")
    if not config.data.train:
        raise ConfigError("data.train is empty: give a latent cache of clips with their captions' text embeddings")
    t = config.train
    for k in ("outer_steps", "map_updates", "batch_size", "log_every"):
        if not (isinstance(t[k], int) and t[k] >= 1):
            raise ConfigError(f"train.{k}={t[k]!r} must be an integer >= 1")
    if not t.learning_rate > 0:
        raise ConfigError(f"train.learning_rate={t.learning_rate} must be > 0")
    if not t.grad_clip > 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be > 0")
    if not config.map.hidden or min(config.map.hidden) < 1:
        raise ConfigError(f"map.hidden={tuple(config.map.hidden)} must be one or more positive widths")
    if len(config.data.latent_mean) != len(config.data.latent_std):
        raise ConfigError(f"data.latent_mean has {len(config.data.latent_mean)} entries, data.latent_std "
                          f"{len(config.data.latent_std)}")
    if not (isinstance(config.data.batch_size, int) and config.data.batch_size >= 1):
        raise ConfigError(f"data.batch_size={config.data.batch_size!r} must be an integer >= 1")


def load_dual(path: str):
    d = os.path.join(path, "dual") if os.path.isdir(os.path.join(path, "dual")) else path
    try:
        return emb.load_dual_encoder(d)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"embeddings {path!r}: {err}") from None


def embed_cache(dual, path: str, key: str, mean, std, batch_size: int, clips: int = 0) -> tuple[np.ndarray, ...]:
    """``(e_v [n, D], e_t [n, D])`` of the clips of the latent cache at ``path`` (``key`` names it in errors)."""
    try:
        cache = latent_cache.open_cache(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key} {path!r}: {err}") from None
    f = cache.info["fields"]
    lat, text = tuple(f["latents"]["shape"]), tuple(f["text_embeddings"]["shape"])
    cfg = dual.config
    if lat[-1] != cfg.latent_channels or text[-1] != cfg.text_dim:
        raise ConfigError(f"{key} {path!r}: latents with {lat[-1]} channels and text of width {text[-1]}; the dual "
                          f"encoder reads {cfg.latent_channels} and {cfg.text_dim}")
    if len(mean) not in (0, lat[-1]):
        raise ConfigError(f"data.latent_mean has {len(mean)} entries; {key} latents have {lat[-1]} channels")
    n = len(cache) if not clips else min(int(clips), len(cache))
    m = np.asarray(mean, np.float32) if len(mean) else 0.0
    s = np.asarray(std, np.float32) if len(std) else 1.0
    graph, state = nnx.split(dual)
    video = jax.jit(lambda st, z: nnx.merge(graph, st).embed_video(z))
    textf = jax.jit(lambda st, t, k: nnx.merge(graph, st).embed_text(t, k))
    vs, ts = [], []
    for lo in range(0, n, batch_size):
        recs = cache.__getitems__(list(range(lo, min(lo + batch_size, n))))
        z = (np.stack([np.asarray(r["latents"], np.float32) for r in recs]) - m) / s
        t = np.stack([np.asarray(r["text_embeddings"], np.float32) for r in recs])
        k = np.arange(t.shape[1])[None, :] < np.asarray([int(r["text_length"]) for r in recs])[:, None]
        vs.append(np.asarray(video(state, z)))
        ts.append(np.asarray(textf(state, t, k)))
    return np.concatenate(vs), np.concatenate(ts)


def evaluate(tmap, e_v: np.ndarray, e_t: np.ndarray) -> dict:
    """The held-out measures of the module doc on paired embeddings (row ``i`` of each the same clip)."""
    mapped = np.asarray(jax.jit(tmap)(jnp.asarray(e_t)))
    other = np.roll(np.arange(len(e_v)), -1)

    def cos(a, b):
        return float(np.mean(np.asarray(pisces.cosine(a, b))))
    unit = mapped / np.maximum(np.linalg.norm(mapped, axis=1, keepdims=True), 1e-8)
    return {"pairs": int(len(e_v)),
            "matched_mapped": cos(e_v, mapped), "matched_raw": cos(e_v, e_t),
            "mismatched_mapped": cos(e_v, mapped[other]), "mismatched_raw": cos(e_v, e_t[other]),
            "retrieval_mapped": emb.retrieval_recall(e_v, unit), "retrieval_raw": emb.retrieval_recall(e_v, e_t)}


def run(config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    dual = load_dual(config.embeddings)
    d = config.data
    os.makedirs(workdir, exist_ok=True)
    timing, t0 = {}, time.time()
    e_v, e_t = embed_cache(dual, d.train, "data.train", d.latent_mean, d.latent_std, d.batch_size, d.clips)
    test = (embed_cache(dual, d.test, "data.test", d.latent_mean, d.latent_std, d.batch_size) if d.test else None)
    timing["embed_s"] = time.time() - t0
    try:
        map_cfg = pisces.TransportMapConfig(dim=dual.config.embed_dim, hidden=tuple(config.map.hidden),
                                            layer_norm_eps=float(config.map.layer_norm_eps))
        train_cfg = pisces.OTTrainConfig(**config.train.to_dict())
    except ValueError as err:
        raise ConfigError(f"train / map: {err}") from None
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with open(metrics_path, "w") as f:
        def log(step, row):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"train_ot_map step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"),
                  flush=True)
        t0 = time.time()
        tmap, critic, _ = pisces.train_transport_map(e_t, e_v, map_cfg, train_cfg, log=log)
        timing["train_s"] = time.time() - t0
    extra = {"embeddings": config.embeddings, "data": d.to_dict(), "train": config.train.to_dict()}
    saving.save_model(os.path.join(workdir, MODEL_DIR), tmap, extra=extra)
    saving.save_model(os.path.join(workdir, CRITIC_DIR), critic, extra=extra)
    report = None
    if test is not None:
        report = evaluate(tmap, *test)
        report["train_matched_mapped"] = evaluate(tmap, e_v, e_t)["matched_mapped"]
        print(f"train_ot_map eval on {report['pairs']} held-out pairs: cos(e_v, T(e_t)) {report['matched_mapped']:.3f}"
              f", raw cos(e_v, e_t) {report['matched_raw']:.3f}, mismatched {report['mismatched_mapped']:.3f}",
              flush=True)
        tmp = os.path.join(workdir, EVAL_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, os.path.join(workdir, EVAL_JSON))
    with open(os.path.join(workdir, TIMING_JSON), "w") as f:
        json.dump({k: round(v, 2) for k, v in timing.items()}, f)
    return tmap, report


get_config = config_entry.defaults_entry(default_config)
