"""Preference pairs (:mod:`shelllcc.data.preferences`, uint8 clips) as a latent cache of pairs.

One record per pair, written by :func:`shelllcc.data.latent_cache.encode_to_cache` (same shards, resume,
checksums, reader), with the fields::

    z_a, z_b          [T', h, w, C] float32   VAE latents of clip A and clip B, **normalised** per channel as
                                              the base DiT's training latents are: (z - mean) / std, with the
                                              VAE's stored statistics (or given ones; written in cache.json's
                                              video_encoder description)
    text_embeddings   [L, D]                  the prompt through the text encoder (zero-padded on read)
    labels            int32 [3]               VQ, MQ, TA in {+1 = A preferred, -1 = B preferred, 0 = tie}
    index, source_a, source_b                 the pair's index in its split and what its clips are

Records are checked before anything is encoded (both clips uint8 of the same shape, a caption, labels in
{+1, -1, 0}); a bad record is left out and counted, with its index and the reason, in ``pairs_report.json``
beside the cache and on stdout: never dropped silently. A source where every record is bad is an error.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from shelllcc.data import latent_cache
from shelllcc.errors import InputFileError

PAIR_FIELDS = ("z_a", "z_b")
REQUIRED_FIELDS = ("z_a", "z_b", "text_embeddings", "labels")
REPORT_JSON = "pairs_report.json"
KEEP_FIELDS = ("labels", "index", "source_a", "source_b")
DIMENSIONS = ("VQ", "MQ", "TA")


def labels_of(example: dict) -> np.ndarray:
    """``int32 [3]`` in {+1, -1, 0}: a ``labels`` field as given, or the TFDS builder's class labels
    ``VQ``/``MQ``/``TA`` (stored as label + 1)."""
    if "labels" in example:
        return np.asarray(example["labels"]).astype(np.int32).reshape(-1)
    return np.array([int(example[d]) - 1 for d in DIMENSIONS], np.int32)


def check_pair(example: dict, shape: tuple | None) -> str:
    """Why ``example`` cannot be encoded ('' when it can); ``shape``: the clips' shape (None: any)."""
    for key in ("video_a", "video_b", "caption"):
        if key not in example:
            return f"no field {key!r}"
    try:
        labels = labels_of(example)
    except (KeyError, TypeError, ValueError) as e:
        return f"no readable labels ({type(e).__name__}: {e})"
    if labels.shape != (3,) or not np.all(np.isin(labels, (-1, 0, 1))):
        return f"labels {labels.tolist()} are not three values in {{+1, -1, 0}}"
    for key in ("video_a", "video_b"):
        v = np.asarray(example[key])
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
            return f"{key} is {v.dtype} {v.shape}, not uint8 [T, H, W, 3]"
        if shape is not None and v.shape != shape:
            return f"{key} has shape {v.shape}, the other clips {shape}"
    return ""


class _GoodPairs:
    """The good records of ``source`` as the examples :func:`latent_cache.encode_to_cache` reads."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def _one(self, ex: dict, i: int) -> dict:
        return {"video_a": np.asarray(ex["video_a"]), "video_b": np.asarray(ex["video_b"]), "caption": ex["caption"],
                "labels": labels_of(ex), "index": np.int64(ex.get("index", i)),
                "source_a": _text(ex.get("source_a", "")), "source_b": _text(ex.get("source_b", ""))}

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        return self._one(self.source[i], i)

    def __getitems__(self, ks: Sequence[int]) -> list:
        idx = [self.indices[k] for k in ks]
        many = getattr(self.source, "__getitems__", None)
        exs = list(many(idx)) if many is not None else [self.source[i] for i in idx]
        return [self._one(ex, i) for ex, i in zip(exs, idx)]


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def scan_pairs(source: Any, progress: bool = True) -> tuple[list[int], dict]:
    """``(good indices, report)``: every record checked by :func:`check_pair` (reads the source once)."""
    good, bad = [], []
    shape = None
    n = len(source)
    for lo in range(0, n, 64):
        idx = list(range(lo, min(lo + 64, n)))
        many = getattr(source, "__getitems__", None)
        for i, ex in zip(idx, list(many(idx)) if many is not None else [source[i] for i in idx]):
            why = check_pair(ex, shape)
            if why:
                bad.append({"index": i, "reason": why})
            else:
                good.append(i)
                shape = shape or tuple(np.shape(ex["video_a"]))
    report = {"records": n, "kept": len(good), "bad": len(bad), "bad_examples": bad[:20], "clip_shape": shape}
    if progress:
        print(f"[preference_cache] {n} pairs checked: {len(good)} kept, {len(bad)} bad"
              + (f" (first: #{bad[0]['index']} {bad[0]['reason']})" if bad else ""), flush=True)
    return good, report


def normalised_encoder(vae: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """``uint8 [B, T, H, W, 3] -> (vae.encode(x) - mean) / std``: the latents as the base DiT was trained on
    them. ``mean``/``std`` default to the VAE's stored per-channel statistics (``latents_mean``/``_std``)."""
    mean = np.asarray(mean if mean is not None else vae.config.latents_mean, np.float32)
    std = np.asarray(std if std is not None else vae.config.latents_std, np.float32)
    if mean.shape != std.shape or mean.ndim != 1:
        raise ValueError(f"latent mean {mean.shape} and std {std.shape} must be two vectors of one length")
    raw = latent_cache.vae_video_encoder(vae)

    def encode(video):
        z = np.asarray(raw(video), np.float32)
        if z.shape[-1] != mean.shape[0]:
            raise ValueError(f"the VAE's latents have {z.shape[-1]} channels, the normalisation {mean.shape[0]}")
        return (z - mean) / std

    encode.description = (f"{raw.description} normalised=(z-mean)/std mean={mean.round(6).tolist()} "
                          f"std={std.round(6).tolist()}")
    return encode


def encode_pairs(source: Any, out_dir: str, *, encode_video, encode_text, batch_size: int = 32,
                 shard_size: int = 1024, source_description: str = "", progress: bool = True) -> dict:
    """Encode the preference pairs of ``source`` (records with ``video_a``, ``video_b``, ``caption``, labels)
    into a pair cache at ``out_dir`` (module docstring); resumable like any latent cache. ``encode_video``:
    e.g. :func:`normalised_encoder`; ``encode_text``: :func:`latent_cache.text_encoder_fn`. Returns the
    cache summary with the check's ``report`` (also written to ``out_dir/pairs_report.json``)."""
    good, report = scan_pairs(source, progress)
    if not good:
        raise InputFileError(f"{source_description or 'the preference source'}: none of its {report['records']} "
                             f"pairs can be encoded (first: {report['bad_examples'][:1]})")
    summary = latent_cache.encode_to_cache(
        _GoodPairs(source, good), out_dir, encode_video=encode_video, encode_text=encode_text,
        batch_size=batch_size, shard_size=shard_size, keep_fields=KEEP_FIELDS, video_key=("video_a", "video_b"),
        latent_fields=PAIR_FIELDS, source_description=source_description, progress=progress)
    with open(os.path.join(out_dir, REPORT_JSON), "w") as f:
        json.dump(report, f, indent=1)
    return {**summary, "report": report}


def open_pair_cache(path: str, what: str = "pair cache") -> latent_cache.LatentCache:
    """A pair cache, checked to hold the fields a reward model reads (one-line errors naming the dir and field)."""
    if not path:
        raise InputFileError(f"{what}: no directory given")
    try:
        cache = latent_cache.open_cache(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputFileError(f"{what}: {e}") from None
    fields = cache.info.get("fields") or {}
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise InputFileError(f"{what} {path!r} has no field(s) {missing} (fields: {sorted(fields)}); write it "
                             f"with shelllcc.data.preference_cache.encode_pairs")
    if fields["z_a"]["shape"] != fields["z_b"]["shape"]:
        raise InputFileError(f"{what} {path!r}: z_a {fields['z_a']['shape']} and z_b {fields['z_b']['shape']} differ")
    if list(fields["labels"]["shape"]) != [3]:
        raise InputFileError(f"{what} {path!r}: labels have shape {fields['labels']['shape']}, expected [3]")
    return cache


class PairExample:
    """One pair-cache record -> the reward model's training example (``z_a``, ``z_b``, ``context``, ``labels``)."""

    def __call__(self, record: dict) -> dict:
        return {"z_a": np.asarray(record["z_a"], np.float32), "z_b": np.asarray(record["z_b"], np.float32),
                "context": np.asarray(record["text_embeddings"], np.float32),
                "labels": np.asarray(record["labels"], np.int32)}


def read_all(cache: latent_cache.LatentCache, batch: int = 256) -> dict[str, np.ndarray]:
    """Every record of a pair cache stacked: ``z_a``, ``z_b``, ``context``, ``labels``, ``index``."""
    out: dict[str, list] = {"z_a": [], "z_b": [], "context": [], "labels": [], "index": []}
    to_example = PairExample()
    for lo in range(0, len(cache), batch):
        for r in cache.__getitems__(list(range(lo, min(lo + batch, len(cache))))):
            ex = to_example(r)
            for k in ("z_a", "z_b", "context", "labels"):
                out[k].append(ex[k])
            out["index"].append(int(r["index"]))
    return {k: np.stack(v) for k, v in out.items()}


__all__ = ["PAIR_FIELDS", "PairExample", "REQUIRED_FIELDS", "check_pair", "encode_pairs", "labels_of",
           "normalised_encoder", "open_pair_cache", "read_all", "scan_pairs"]
