"""Encode a clip dataset once into a cache of VAE latents + text embeddings; read it without TensorFlow.

Post-training reads every clip many times, but the VAE encoder and the text encoder are frozen: running
them once and caching their outputs removes both from the training step (and their weights from
accelerator memory). This module writes that cache and reads it back as a random-access source for
:func:`shelllcc.data.readers.make_dataset`::

    from shelllcc.data import latent_cache, readers
    src = readers.open_split(builder_dir, "train")                  # or any list of example dicts
    latent_cache.encode_to_cache(
        src, "/data/cache/train",
        encode_video=latent_cache.vae_video_encoder(vae),
        encode_text=latent_cache.text_encoder_fn(text_encoder, tokenizer),
        batch_size=8, shard_size=1024, keep_fields=("index",))
    cache = latent_cache.open_cache("/data/cache/train")            # LatentCache
    ds = readers.make_dataset(cache, batch_size=32, seed=0)

On-disk layout (directory ``out_dir``):

* ``cache-SSSSS-of-NNNNN.array_record``: shard ``S`` holds source examples
  ``[S * shard_size, min((S + 1) * shard_size, N))`` in order, one record per example, written with
  ``group_size:1`` so that reading one record decodes only that record (what grain's random access wants).
  An ArrayRecord file has a fixed overhead of about 128 KiB (block padding + footer), so choose
  ``shard_size`` to give shards of tens of MB or more (Wan2.1 latents of 81 frames at 480x832 are
  ~8 MB per clip in float32: a few hundred clips per shard).
* ``cache.json``: the description of the cache (format version, number of examples, shard size and
  list, per-field shape/dtype, encoder descriptions, creation info) and the resume progress
  (``finished_shards`` with each shard's record count, byte size and SHA-256; ``complete``).

Record format (version 1): a msgpack map (``msgpack`` is the plain library flax itself depends on;
no pickles, readable from any language) from field name to value, keys sorted so that the bytes are a
pure function of the content. Values are msgpack strings (``str``), binaries (``bytes``), ints, floats,
bools, or a numpy array encoded as the map ``{"__nd__": 1, "dtype": <numpy dtype name, e.g.
"float32" or "bfloat16">, "shape": [...], "data": <C-order little-endian raw bytes>}``. Fields of
every record:

* ``latents``: ``[T', h, w, C]`` as returned by ``encode_video`` (or cast to ``latent_dtype``).
* ``text_embeddings``: ``[length, D]`` -- only the caption's real tokens. Positions at or past
  ``length`` are zero by the convention of both text encoders used here (umT5 as in Wan, and the
  small :class:`~shelllcc.models.text_encoder.TextEncoder`), so storing them would waste up to
  512 x 4096 x 4 bytes per clip for umT5; the reader zero-pads back to ``[L, D]``. The writer checks
  that the dropped positions really are zero and refuses otherwise.
* ``text_length``: int32 scalar; ``caption``: ``str``; ``source_index``: int64 position in the source.
* every ``keep_fields`` entry, as the source gave it (numpy scalars/arrays, bytes, str, ints).

Resumability: each shard is written to ``<name>.tmp`` and renamed into place only once complete, and
``cache.json`` (itself replaced atomically) lists the finished shards. A run that is killed and started
again skips the finished shards and rewrites the unfinished ones from their first example. Batches
never cross a shard boundary (a shard's last batch is padded instead), so every shard is encoded with
exactly the same batches, and so the same numbers and bytes, whether or not the run was interrupted.
Resuming into a cache created with a different source length, shard size, batch size, field
selection or encoder description is refused with an error naming the difference.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import socket
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np

from shelllcc.checksums import sha256_file
from shelllcc.data import text_cache
from shelllcc.errors import InputFileError
from shelllcc.locks import DirectoryLock

FORMAT = "shelllcc_latent_cache"
FORMAT_VERSION = 1
CACHE_JSON = "cache.json"
# group_size:1 -> one record per chunk, so a random read decompresses only its own record.
WRITER_OPTIONS = "group_size:1"
# The fields of cache.json that must match for a run to resume into an existing directory.
_RESUME_KEYS = ("format_version", "num_examples", "shard_size", "batch_size", "num_shards", "keep_fields",
                "video_key", "caption_key", "latent_dtype", "trim_text", "video_encoder", "text_encoder",
                "source_description", "latent_fields")
# what a cache written before a key existed holds for it
_RESUME_DEFAULTS = {"latent_fields": ["latents"]}

VideoEncoder = Callable[[np.ndarray], Any]
TextEncoderFn = Callable[[list], tuple]


# --------------------------------------------------------------------------------------------------
# Record (de)serialisation
# --------------------------------------------------------------------------------------------------

def _dtype_from_name(name: str) -> np.dtype:
    # bfloat16 / float8 are not numpy builtins; ml_dtypes (a jax dependency) registers them.
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))


def _pack_value(value: Any) -> Any:
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.kind in "OUS":
            if arr.ndim == 0:  # a numpy text scalar: store as plain text
                return arr.item()
            raise TypeError(f"text arrays are not supported in cache records (got dtype {arr.dtype}, "
                            f"shape {arr.shape}); store one string per field")
        # '<' byte order: the bytes mean the same on every machine.
        arr = np.asarray(arr, order="C", dtype=arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">"
                                   else arr.dtype)
        return {"__nd__": 1, "dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}
    raise TypeError(f"cannot store a value of type {type(value).__name__} in a cache record: {value!r:.80}")


def _unpack_value(value: Any) -> Any:
    if isinstance(value, dict) and value.get("__nd__") == 1:
        arr = np.frombuffer(value["data"], dtype=_dtype_from_name(value["dtype"])).reshape(tuple(value["shape"]))
        # A 0-d array comes back as a numpy scalar, as TFDS returns scalar features.
        return arr[()] if arr.ndim == 0 else arr
    return value


def serialize_record(example: Mapping[str, Any]) -> bytes:
    """One example (flat dict of arrays / scalars / text) -> record bytes (module doc, format v1)."""
    return msgpack.packb({k: _pack_value(example[k]) for k in sorted(example)}, use_bin_type=True)


def deserialize_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> dict; arrays are read-only views of ``data`` (copy before writing into them)."""
    raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    return {k: _unpack_value(v) for k, v in raw.items()}


# --------------------------------------------------------------------------------------------------
# Encoder helpers
# --------------------------------------------------------------------------------------------------

def module_digest(module: Any) -> str:
    """SHA-256 (first 16 hex digits) of an NNX module's state: identifies the weights in a description.

    Two runs with different weights must not share a cache; a digest of the weights catches that where
    a name would not.
    """
    import jax
    from flax import nnx

    h = hashlib.sha256()
    flat = nnx.to_flat_state(nnx.state(module))
    for path, leaf in sorted(((tuple(str(p) for p in path), v) for path, v in flat), key=lambda t: t[0]):
        arr = np.asarray(jax.device_get(leaf.get_value() if hasattr(leaf, "get_value") else leaf.value))
        h.update("/".join(path).encode())
        h.update(f"{arr.dtype.name}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def vae_video_encoder(vae: Any, dtype: Any = None) -> VideoEncoder:
    """``uint8 [B, T, H, W, 3] -> latents [B, T', h, w, C]`` with a jitted ``vae.encode``.

    Pixels map to ``[-1, 1]`` as ``x / 127.5 - 1`` (the Wan pipelines' convention), computed in
    ``dtype`` (default: the VAE's compute dtype) on the device, so only uint8 crosses the host link.
    The weights are passed to the jitted function as arguments, not closed over, so they are not
    baked into the compiled program as constants. The returned function carries a ``description``
    (config, dtype, weight digest) that :func:`encode_to_cache` records and checks on resume.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    dtype = jnp.dtype(dtype or vae.dtype)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def _encode(state, video):
        model = nnx.merge(graphdef, state)
        x = video.astype(dtype) / jnp.asarray(127.5, dtype) - jnp.asarray(1.0, dtype)
        return model.encode(x)

    def encode(video: np.ndarray):
        video = np.asarray(video)
        if video.dtype != np.uint8:
            raise TypeError(f"vae_video_encoder expects uint8 video, got {video.dtype}")
        return _encode(state, video)

    encode.description = (f"{type(vae).__name__}.encode(mean) config={vae.config!r} compute_dtype={dtype.name} "
                          f"input=uint8/127.5-1 weights_sha256={module_digest(vae)}")
    return encode


def text_encoder_fn(encoder: Any, tokenizer: Any = None) -> TextEncoderFn:
    """``captions -> (embeddings [B, L, D], lengths int32 [B])`` with the small text encoder, jitted.

    ``tokenizer`` defaults to the encoder config's own; tokenizing runs on the host.
    """
    import jax
    from flax import nnx

    tokenizer = tokenizer or encoder.config.tokenizer()
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def _forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    def encode(captions: Sequence[str]):
        ids, mask = tokenizer(list(captions))
        return _forward(state, ids, mask), mask.sum(axis=1).astype(np.int32)

    cfg = encoder.config
    encode.description = (f"TextEncoder dim={cfg.dim} layers={cfg.num_layers} heads={cfg.num_heads} "
                          f"text_dim={cfg.text_dim} max_len={tokenizer.max_len} "
                          f"vocab_sha256={hashlib.sha256(' '.join(tokenizer.tokens).encode()).hexdigest()[:16]} "
                          f"weights_sha256={module_digest(encoder)}")
    return encode


def precomputed_text(npz_path: str) -> TextEncoderFn:
    """Text embeddings looked up by caption in a cache of :mod:`shelllcc.data.text_cache` (e.g. umT5's).

    Captions must match the cache's entries exactly (the strings the cache was computed from); a
    missing one raises ``KeyError`` naming it, so a stale cache cannot silently give wrong context.
    """
    captions, emb, lengths = text_cache.read_text_cache(npz_path)
    where = {c: i for i, c in enumerate(captions)}
    with open(npz_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]

    def encode(batch_captions: Sequence[str]):
        rows = []
        for c in batch_captions:
            if c not in where:
                raise KeyError(f"caption {c!r} is not in the precomputed text cache {npz_path!r} "
                               f"({len(where)} captions); recompute it with python -m third_party.umt5")
            rows.append(where[c])
        return emb[rows], lengths[rows]

    encode.description = (f"precomputed umT5 {os.path.basename(npz_path)} [N={len(captions)}, "
                          f"{emb.shape[1]}, {emb.shape[2]}] sha256={digest}")
    return encode


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def shard_name(shard: int, num_shards: int) -> str:
    return f"cache-{shard:05d}-of-{num_shards:05d}.array_record"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers and a resumed run see either the old or the new file, never half


def _read_cache_json(json_path: str) -> dict:
    try:
        with open(json_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{json_path}: not readable as JSON ({e}); the cache description is damaged: "
                             f"encode the cache again into a new directory") from e


def _as_text(x: Any) -> str:
    if isinstance(x, bytes):  # TFDS Text features decode to bytes in the data-source API
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return _as_text(x.item())
    if not isinstance(x, str):
        raise TypeError(f"caption must be str or bytes, got {type(x).__name__}")
    return x


def _read_examples(source: Any, indices: Sequence[int]) -> list:
    # TFDS / array_record sources read a batch of keys in parallel through __getitems__.
    many = getattr(source, "__getitems__", None)
    return list(many(list(indices))) if many is not None else [source[i] for i in indices]


def _describe(arr: np.ndarray) -> dict:
    return {"shape": list(arr.shape), "dtype": arr.dtype.name}


def encode_to_cache(
    source: Any,
    out_dir: str,
    *,
    encode_video: VideoEncoder,
    encode_text: TextEncoderFn,
    batch_size: int,
    shard_size: int,
    keep_fields: Sequence[str] = ("index",),
    video_key: str | Sequence[str] = "video",
    caption_key: str = "caption",
    latent_dtype: Any = None,
    trim_text: bool = True,
    video_encoder_description: str | None = None,
    text_encoder_description: str | None = None,
    source_description: str = "",
    progress: bool = True,
    latent_fields: Sequence[str] = ("latents",),
) -> dict:
    """Encode every example of ``source`` into a latent cache in ``out_dir`` (module doc); resumable.

    Args:
      source: random-access sequence of example dicts (``__len__``, ``__getitem__``; ``__getitems__``
        used when present), e.g. ``readers.open_split(...)`` or a list.
      out_dir: cache directory (created). If it holds a cache of the same description, finished shards
        are kept and the rest written; a complete cache is left as is.
      encode_video: ``uint8 [B, T, H, W, 3] -> latents [B, T', h, w, C]`` (numpy or jax array), e.g.
        :func:`vae_video_encoder`. Always called with exactly ``batch_size`` clips, so a jitted
        function compiles once.
      encode_text: ``list[str] (len batch_size) -> (embeddings [B, L, D], lengths [B])``, e.g.
        :func:`text_encoder_fn` or :func:`precomputed_text`.
      batch_size: clips per encoder call. A shard's last batch is padded (with copies of its last clip,
        whose outputs are dropped) so batches never span shards; make ``shard_size`` a multiple of
        ``batch_size`` to avoid wasted work.
      shard_size: examples per output file (the unit of resumption).
      keep_fields: source fields copied into each record unchanged (e.g. ``"index"``, labels).
      video_key, caption_key: names of the clip and caption fields in the source. ``video_key`` may be a
        tuple of several clip fields (e.g. the two clips of a preference pair), each encoded with
        ``encode_video`` and stored under the matching entry of ``latent_fields``.
      latent_fields: the record fields of the latents, one per ``video_key`` (default ``("latents",)``;
        a pair cache: ``("z_a", "z_b")``). ``latent_dtype`` and the reader's conversion apply to each.
      latent_dtype: storage dtype of the latents (e.g. ``"bfloat16"`` halves the cache); ``None``
        stores what ``encode_video`` returns.
      trim_text: store text embeddings only up to each caption's length (module doc).
      video_encoder_description, text_encoder_description: strings identifying the encoders (model,
        weights, dtype); default to the callables' ``description`` attribute (set by the helpers here),
        else their qualified name. Recorded in ``cache.json`` and compared when resuming.
      source_description: free text identifying the source (dataset name/version/split); compared on
        resume too.
      progress: print progress (clips/s) and a summary to stderr.

    Returns:
      A summary dict: ``out_dir``, ``num_examples``, ``num_shards``, ``shards_written``,
      ``shards_skipped``, ``clips_encoded``, ``seconds``, ``clips_per_s``, ``bytes``.

    Raises:
      shelllcc.locks.DirectoryLocked: another live process is encoding into ``out_dir``.
    """
    n = len(source)
    if n == 0:
        raise ValueError("source is empty")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}")
    keep_fields = tuple(keep_fields)
    video_keys = (video_key,) if isinstance(video_key, str) else tuple(video_key)
    latent_fields = tuple(latent_fields)
    if len(video_keys) != len(latent_fields) or len(set(latent_fields)) != len(latent_fields):
        raise ValueError(f"video_key {video_keys} and latent_fields {latent_fields} must pair up one to one")
    reserved = {"text_embeddings", "text_length", "caption", "source_index", *latent_fields}
    if reserved & set(keep_fields):
        raise ValueError(f"keep_fields may not include the reserved names {sorted(reserved & set(keep_fields))}")
    num_shards = -(-n // shard_size)
    if latent_dtype is not None:  # normalise to a dtype name ("bfloat16", "float32", ...)
        latent_dtype = _dtype_from_name(latent_dtype if isinstance(latent_dtype, str)
                                        else np.dtype(latent_dtype).name).name
    video_desc = video_encoder_description or getattr(encode_video, "description", None) or \
        getattr(encode_video, "__qualname__", type(encode_video).__name__)
    text_desc = text_encoder_description or getattr(encode_text, "description", None) or \
        getattr(encode_text, "__qualname__", type(encode_text).__name__)

    os.makedirs(out_dir, exist_ok=True)
    # two encoders on one directory would write the same shards and record each other's as finished
    with DirectoryLock(out_dir, what="latent cache"):
        return _encode_locked(source, out_dir, n=n, num_shards=num_shards, encode_video=encode_video,
                              encode_text=encode_text, batch_size=batch_size, shard_size=shard_size,
                              keep_fields=keep_fields, video_key=video_keys, caption_key=caption_key,
                              latent_fields=latent_fields,
                              latent_dtype=latent_dtype, trim_text=trim_text, video_desc=video_desc,
                              text_desc=text_desc, source_description=source_description, progress=progress)


def _encode_locked(source, out_dir, *, n, num_shards, encode_video, encode_text, batch_size, shard_size, keep_fields,
                   video_key, caption_key, latent_fields, latent_dtype, trim_text, video_desc, text_desc, source_description,
                   progress) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    json_path = os.path.join(out_dir, CACHE_JSON)
    spec = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "num_examples": n, "shard_size": shard_size,
        "batch_size": batch_size, "num_shards": num_shards, "keep_fields": list(keep_fields),
        # one clip field: stored as a string, as caches of before several fields
        "video_key": video_key[0] if len(video_key) == 1 else list(video_key), "caption_key": caption_key,
        "latent_dtype": latent_dtype,
        "trim_text": bool(trim_text), "video_encoder": video_desc, "text_encoder": text_desc,
        "source_description": source_description, "latent_fields": list(latent_fields),
    }
    if os.path.exists(json_path):
        info = _read_cache_json(json_path)
        diffs = [f"{k}: cache has {info.get(k, _RESUME_DEFAULTS.get(k))!r}, this run {spec[k]!r}" for k in _RESUME_KEYS
                 if info.get(k, _RESUME_DEFAULTS.get(k)) != spec[k]]
        if diffs:
            raise ValueError(f"cannot resume into {out_dir!r}: it holds a cache made with different settings "
                             f"({'; '.join(diffs)}). Use another directory or delete this one.")
    else:
        info = dict(spec, shards=[shard_name(s, num_shards) for s in range(num_shards)], fields=None,
                    finished_shards={}, complete=False, writer_options=WRITER_OPTIONS,
                    created={"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "host": socket.gethostname(), "python": platform.python_version(),
                             "command": " ".join(sys.argv)})
        _write_json_atomic(json_path, info)

    # A shard counts as finished only if cache.json says so *and* the file is there with its size.
    finished = {}
    for name, meta in info["finished_shards"].items():
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and os.path.getsize(path) == meta["bytes"]:
            finished[name] = meta
    info["finished_shards"] = finished
    todo = [s for s in range(num_shards) if shard_name(s, num_shards) not in finished]

    t0 = time.time()
    last_print = t0
    clips_done = 0
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def batches_of(shard):
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, n)
        return [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]

    plan = [(s, idx) for s in todo for idx in batches_of(s)]
    # Read (and decode) the next batch of the source in a thread while this one is encoded.
    pending = pool.submit(_read_examples, source, plan[0][1]) if plan else None
    writer = tmp_path = None
    current = None
    try:
        for k, (shard, idx) in enumerate(plan):
            examples = pending.result()
            pending = pool.submit(_read_examples, source, plan[k + 1][1]) if k + 1 < len(plan) else None
            if shard != current:
                name = shard_name(shard, num_shards)
                tmp_path = os.path.join(out_dir, name + ".tmp")
                # A .tmp left by a killed run is partial by definition: start the shard over.
                if os.path.exists(tmp_path):
                    os.remove(tmp_path)
                writer = ArrayRecordWriter(tmp_path, WRITER_OPTIONS)
                current, shard_records = shard, 0

            real = len(examples)
            padded = examples + [examples[-1]] * (batch_size - real)
            captions = [_as_text(e[caption_key]) for e in padded]
            encoded = {}
            for key, field in zip(video_key, latent_fields):
                lat = np.asarray(encode_video(np.stack([np.asarray(e[key]) for e in padded])))[:real]
                encoded[field] = lat.astype(_dtype_from_name(latent_dtype)) if latent_dtype is not None else lat
            emb, lengths = encode_text(captions)
            emb, lengths = np.asarray(emb)[:real], np.asarray(lengths).astype(np.int32)[:real]
            if any(v.shape[0] != real for v in encoded.values()) or emb.shape[0] != real or lengths.shape != (real,):
                raise ValueError(f"encoders returned inconsistent batch sizes: latents "
                                 f"{[v.shape for v in encoded.values()]}, text embeddings {emb.shape}, lengths {lengths.shape}")

            for j in range(real):
                ln = int(lengths[j])
                text = emb[j]
                if trim_text:
                    if np.any(text[ln:]):
                        raise ValueError(f"text embedding of example {idx[j]} ({captions[j]!r:.60}) is non-zero "
                                         f"past its length {ln}; cannot trim it (pass trim_text=False)")
                    text = text[:ln]
                record = {**{f: v[j] for f, v in encoded.items()}, "text_embeddings": text,
                          "text_length": np.int32(ln), "caption": captions[j], "source_index": np.int64(idx[j])}
                for field in keep_fields:
                    if field not in examples[j]:
                        raise KeyError(f"keep_fields: example {idx[j]} has no field {field!r} "
                                       f"(has {sorted(examples[j])})")
                    record[field] = examples[j][field]
                writer.write(serialize_record(record))
                shard_records += 1

            if info["fields"] is None:
                info["fields"] = {**{f: _describe(v[0]) for f, v in encoded.items()},
                                  "text_embeddings": {"shape": list(emb.shape[1:]), "dtype": emb.dtype.name},
                                  "text_length": {"shape": [], "dtype": "int32"},
                                  "caption": {"shape": [], "dtype": "str"},
                                  "source_index": {"shape": [], "dtype": "int64"},
                                  **{f: _describe_field(examples[0][f]) for f in keep_fields}}
            clips_done += real

            shard_end = k + 1 == len(plan) or plan[k + 1][0] != shard
            if shard_end:
                writer.close()
                writer = None
                name = shard_name(shard, num_shards)
                final = os.path.join(out_dir, name)
                os.replace(tmp_path, final)  # the shard appears complete or not at all
                info["finished_shards"][name] = {"records": shard_records, "bytes": os.path.getsize(final),
                                                 "sha256": sha256_file(final)}
                _write_json_atomic(json_path, info)

            now = time.time()
            if progress and (shard_end or now - last_print > 10):
                last_print = now
                rate = clips_done / max(now - t0, 1e-9)
                done_total = sum(m["records"] for m in info["finished_shards"].values())
                print(f"[latent_cache] shard {shard + 1}/{num_shards}: {done_total}/{n} clips in finished "
                      f"shards, {rate:.2f} clips/s", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()  # leaves the .tmp behind; the next run deletes and redoes it
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)

    total = sum(m["records"] for m in info["finished_shards"].values())
    if total != n or len(info["finished_shards"]) != num_shards:
        raise RuntimeError(f"internal error: {total} records in {len(info['finished_shards'])} shards, "
                           f"expected {n} in {num_shards}")
    if not info["complete"]:
        info["complete"] = True
        info["completed"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_json_atomic(json_path, info)
    seconds = time.time() - t0
    summary = {"out_dir": out_dir, "num_examples": n, "num_shards": num_shards, "shards_written": len(todo),
               "shards_skipped": num_shards - len(todo), "clips_encoded": clips_done, "seconds": seconds,
               "clips_per_s": clips_done / seconds if clips_done else 0.0,
               "bytes": sum(m["bytes"] for m in info["finished_shards"].values())}
    if progress:
        print(f"[latent_cache] done: {n} clips in {num_shards} shards at {out_dir} "
              f"({summary['bytes'] / 2**20:.1f} MiB); encoded {clips_done} clips in {seconds:.1f}s "
              f"({summary['clips_per_s']:.2f} clips/s), {summary['shards_skipped']} shards reused",
              file=sys.stderr, flush=True)
    return summary


def _describe_field(value: Any) -> dict:
    if isinstance(value, (str, bytes)):
        return {"shape": [], "dtype": type(value).__name__}
    if isinstance(value, (bool, int, float)):
        return {"shape": [], "dtype": type(value).__name__}
    return _describe(np.asarray(value))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

class LatentCache:
    """Random-access view of a finished cache: ``cache[i]`` is example ``i`` of the source as a dict.

    Fields: ``latents`` (as stored; ``float32`` unless a ``latent_dtype`` was chosen, or converted with
    ``latent_dtype=`` here), ``text_embeddings`` ``[L, D]`` zero-padded back to full length,
    ``text_length``, ``caption`` (``str``), ``source_index`` and the kept fields. Arrays are fresh,
    writable numpy arrays. Works as the ``source`` of :func:`shelllcc.data.readers.make_dataset`;
    ``__getitems__`` reads a batch's records in parallel.
    """

    def __init__(self, out_dir: str, info: dict, latent_dtype: Any = None):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.out_dir = out_dir
        self.info = info
        self._paths = [os.path.join(out_dir, name) for name in info["shards"]]
        self._records = ArrayRecordDataSource(self._paths)
        self._text_shape = tuple(info["fields"]["text_embeddings"]["shape"])
        self._text_dtype = _dtype_from_name(info["fields"]["text_embeddings"]["dtype"])
        self._latent_dtype = None if latent_dtype is None else np.dtype(latent_dtype)
        if len(self._records) != info["num_examples"]:
            raise ValueError(f"cache {out_dir!r}: shards hold {len(self._records)} records, cache.json says "
                             f"{info['num_examples']}")

    def __len__(self) -> int:
        return self.info["num_examples"]

    def _decode(self, data: bytes) -> dict:
        ex = deserialize_record(data)
        emb = ex["text_embeddings"]
        full = np.zeros(self._text_shape, self._text_dtype)
        full[: emb.shape[0]] = emb
        ex["text_embeddings"] = full
        for field in self.info.get("latent_fields", ("latents",)):
            lat = ex[field]
            ex[field] = lat.astype(self._latent_dtype) if self._latent_dtype is not None else lat.copy()
        return ex

    def _check(self, i: Any) -> int:
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a cache of {n} examples")
        return i % n

    def _shard_of(self, i: int) -> str:
        end = 0
        for path in self._paths:
            end += self.info["finished_shards"][os.path.basename(path)]["records"]
            if i < end:
                return path
        return self._paths[-1]

    def _unreadable(self, indices: Sequence[int], e: Exception) -> InputFileError:
        # the reader's own message (e.g. "Corrupted Riegeli/records file") names neither shard nor cache
        shards = sorted({self._shard_of(i) for i in indices})
        return InputFileError(f"latent cache {self.out_dir!r}: record(s) {list(indices)[:8]} in shard "
                              f"{', '.join(shards)} cannot be read ({type(e).__name__}: {e}); the shard is damaged: "
                              f"check it with open_cache(dir, verify=True) and encode the cache again")

    def __getitem__(self, i: int) -> dict:
        i = self._check(i)
        try:
            return self._decode(self._records[i])
        except Exception as e:
            raise self._unreadable([i], e) from e

    def __getitems__(self, indices: Sequence[int]) -> list:
        indices = [self._check(i) for i in indices]
        try:
            return [self._decode(r) for r in self._records.__getitems__(indices)]
        except Exception as e:
            raise self._unreadable(indices, e) from e

    def __repr__(self) -> str:
        return f"LatentCache({self.out_dir!r}, {len(self)} examples, {len(self._paths)} shards)"


def open_cache(out_dir: str, *, latent_dtype: Any = None, verify: bool = False) -> LatentCache:
    """Open a complete cache written by :func:`encode_to_cache` for reading.

    ``latent_dtype`` converts latents on read (e.g. ``np.float32`` for a bfloat16 cache).
    ``verify=True`` re-hashes every shard against ``cache.json`` (reads the whole cache).
    Raises ``FileNotFoundError`` for a missing cache or shard and ``ValueError`` for an incomplete or
    foreign one, each naming the directory.
    """
    json_path = os.path.join(out_dir, CACHE_JSON)
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"no latent cache at {out_dir!r} (missing {CACHE_JSON})")
    info = _read_cache_json(json_path)
    if info.get("format") != FORMAT:
        raise ValueError(f"{json_path!r} is not a {FORMAT} description")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cache {out_dir!r} has format version {info.get('format_version')}; this code reads "
                         f"version {FORMAT_VERSION}")
    if not info.get("complete"):
        raise ValueError(f"latent cache {out_dir!r} is incomplete ({len(info.get('finished_shards', {}))} of "
                         f"{info.get('num_shards')} shards finished); rerun encode_to_cache with the same "
                         f"settings to resume it")
    for name in info["shards"]:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"latent cache {out_dir!r} is missing shard {name}")
        meta = info["finished_shards"][name]
        if os.path.getsize(path) != meta["bytes"]:
            raise ValueError(f"latent cache {out_dir!r}: shard {name} has {os.path.getsize(path)} bytes, "
                             f"cache.json says {meta['bytes']}")
        if verify and sha256_file(path) != meta["sha256"]:
            raise ValueError(f"latent cache {out_dir!r}: shard {name} fails its SHA-256 check")
    return LatentCache(out_dir, info, latent_dtype=latent_dtype)


__all__ = ["FORMAT_VERSION", "LatentCache", "deserialize_record", "encode_to_cache", "module_digest",
           "open_cache", "precomputed_text", "serialize_record", "shard_name", "text_encoder_fn",
           "vae_video_encoder"]
