"""The text-embedding cache: precomputed text-encoder outputs looked up by caption.

File (``.npz``, no pickles): ``captions`` (unicode array ``[N]``), ``embeddings`` (``[N, L, D]``;
``L = max_length`` or, with ``trim=True``, the longest caption's length, zero-padded back by the
reader), ``lengths`` (int32 ``[N]``: real tokens per caption, positions beyond are zero),
``max_length`` (int). Written by ``python -m third_party.umt5`` (Wan2.1's umT5) or any encoder that
produces ``[N, max_length, D]`` and lengths; read by :func:`shelllcc.data.latent_cache.precomputed_text`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def write_text_cache(captions: Sequence[str], embeddings, lengths, out_path: str,
                     trim: bool = False, store_dtype: str = "float32") -> str:
    """Write the ``.npz`` cache (module doc); returns the path written.

    ``trim=True`` stores only the first ``max(lengths)`` positions (the rest are zero by
    construction); ``store_dtype="float16"`` halves the file. :func:`read_text_cache` restores
    ``[N, max_length, D]`` float32 either way.
    """
    emb = np.asarray(embeddings)
    lengths = np.asarray(lengths, np.int32)
    captions = np.asarray(list(captions), dtype=np.str_)
    if emb.ndim != 3 or emb.shape[0] != len(captions) or lengths.shape != (len(captions),):
        raise ValueError(f"inconsistent shapes: {len(captions)} captions, embeddings {emb.shape}, "
                         f"lengths {lengths.shape}")
    if store_dtype not in ("float32", "float16"):
        raise ValueError("store_dtype must be float32 or float16")
    max_length = emb.shape[1]
    if trim:
        emb = emb[:, : max(int(lengths.max(initial=0)), 1)]
    if not out_path.endswith(".npz"):
        out_path = out_path + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path[:-4] + ".tmp.npz"
    np.savez(tmp, captions=captions, embeddings=emb.astype(store_dtype), lengths=lengths,
             max_length=np.int64(max_length))
    os.replace(tmp, out_path)  # no half-written cache on interruption
    return out_path


def read_text_cache(path: str):
    """``(captions list[str], embeddings float32 [N, max_length, D], lengths int32 [N])``."""
    with np.load(path, allow_pickle=False) as f:
        captions = [str(c) for c in f["captions"]]
        emb = f["embeddings"].astype(np.float32)
        lengths = f["lengths"].astype(np.int32)
        max_length = int(f["max_length"])
    if emb.shape[1] < max_length:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], max_length - emb.shape[1], emb.shape[2]),
                                            np.float32)], axis=1)
    return captions, emb, lengths


def read_captions(path: str, field: str | None = None) -> list[str]:
    """Captions from ``.txt`` (one per non-empty line) or ``.jsonl`` (a string, or an object with
    ``field``, default the first of ``caption``, ``text``, ``prompt`` present)."""
    caps = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                obj = json.loads(line)
                if isinstance(obj, str):
                    caps.append(obj)
                    continue
                keys = [field] if field else ["caption", "text", "prompt"]
                key = next((k for k in keys if k in obj), None)
                if key is None or not isinstance(obj[key], str):
                    raise ValueError(f"{path}:{lineno}: no string field among {keys}")
                caps.append(obj[key])
            else:
                caps.append(line)
    return caps
