"""Experiment ``encode_cache``: encode one split of a prepared TFDS video dataset into a latent cache.

    python -m experiments.main --config=experiments/encode_cache.py --workdir=cache/train \\
        --config.data.dataset=/data/tfds/shelllcc_video_folder/<config>/1.0.0 \\
        --config.vae.pretrained=Wan2.1-T2V-1.3B-Diffusers/vae --config.text.umt5_cache=text.npz

(``configs/wan21_pipeline.py:encode`` holds the Wan2.1 settings.) The result is what
:func:`shelllcc.data.latent_cache.encode_to_cache` writes (``cache.json`` + ArrayRecord shards) and what
``fit_manifold`` (``data.cache.dir``), ``sft`` / ``reward_finetune`` (``data.cache_dir``) and ``sample``
(``prompts.cache_dir``) read. Run the same command again after a kill: finished shards are kept, the rest
is written (a cache of other settings in the same directory is refused, naming the difference).

Sections:

* ``data``: ``dataset`` (a TFDS builder directory, as ``shelllcc.data.video_folder.build`` prints it, or a
  dataset name found under ``data_dir``), ``split`` (slices such as ``train[:1000]`` work), the clip and
  caption field names, and ``keep_fields``: source fields copied into each record (``("*",)``: every field
  but the clip and the caption; ``()``: none).
* ``vae``: exactly one of ``pretrained`` (a diffusers ``AutoencoderKLWan`` folder, ``.../vae``) and ``dir``
  (a ``WanVAE`` or ``PatchVAE`` saved with :func:`shelllcc.models.saving.save_model`); ``dtype`` is the
  encoder's compute dtype (weights are kept in float32).
* ``text``: exactly one of ``umt5_cache`` (a ``.npz`` written by ``python -m third_party.umt5``; every caption
  of the split must be in it) and ``encoder_dir`` (a small ``TextEncoder`` saved with ``save_model``).
  With ``check_captions`` the split's captions are looked up in the umT5 cache before anything is encoded
  (a pass over the records that skips decoding the clips); missing ones stop the run with a list and a
  ``captions.jsonl`` of the split's distinct captions in the workdir, ready for ``third_party.umt5``.
* ``output``: ``dir`` (empty: the workdir), ``shard_size`` (examples per file, the unit of resumption),
  ``latent_dtype`` (storage dtype, e.g. ``bfloat16``; empty: as the encoder returns them), ``trim_text``.
* ``batch_size``: clips per encoder call (every call has this shape: one compilation).
* ``captions_only``: write ``WORKDIR/captions.jsonl`` (the split's distinct captions, one JSON string per
  line, as ``python -m third_party.umt5 --captions`` reads them) and stop; no encoder is needed.

Writes ``WORKDIR/encode_summary.json`` (the cache's description and this run's timing) at the end. One
process: the encoders run on the default device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile

import jax
import ml_collections
import numpy as np

from experiments import config_entry, sample
from shelllcc.data import latent_cache, readers
from shelllcc.models import saving
from shelllcc.models.wan_vae import ENCODE_CHUNK_FRAMES

CAPTIONS_FILE = "captions.jsonl"
SUMMARY_FILE = "encode_summary.json"
ALL_FIELDS = "*"
LATENT_DTYPES = ("", "float32", "bfloat16", "float16")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "encode_cache"
    c.data = ml_collections.ConfigDict(dict(
        dataset="",                  # TFDS builder directory, or a dataset name under data_dir
        data_dir="",
        split="train",               # TFDS split, slices allowed ("train[:1000]")
        video_key="video",
        caption_key="caption",
        keep_fields=(ALL_FIELDS,),   # source fields copied into the records; ("*",): all but clip and caption
    ))
    c.vae = ml_collections.ConfigDict(dict(
        pretrained="",               # diffusers AutoencoderKLWan folder (.../vae)
        dir="",                      # a WanVAE / PatchVAE saved with shelllcc.models.saving.save_model
        dtype="float32",             # encoder compute dtype (bfloat16 on GPU halves its memory)
    ))
    c.text = ml_collections.ConfigDict(dict(
        umt5_cache="",               # .npz from python -m third_party.umt5
        encoder_dir="",              # a small TextEncoder saved with save_model
        check_captions=True,         # umt5_cache: look every caption up before encoding
    ))
    c.output = ml_collections.ConfigDict(dict(
        dir="",                      # the cache directory; empty: the workdir
        shard_size=256,
        latent_dtype="",             # '' (as encoded) | float32 | bfloat16 | float16
        trim_text=True,              # store text embeddings up to each caption's length only
    ))
    c.batch_size = 4
    c.captions_only = False
    return c


get_config = config_entry.defaults_entry(default_config)


# ------------------------------------------------------------------------------------------ checks

def _one_of(section: ml_collections.ConfigDict, name: str, keys: tuple[str, str], what: tuple[str, str]) -> str:
    """The one key of ``keys`` that is set in ``section``; ``ValueError`` naming both when none or both are."""
    a, b = keys
    if section[a] and section[b]:
        raise ValueError(f"set only one of {name}.{a} ({what[0]}) and {name}.{b} ({what[1]}); both are set: "
                         f"{section[a]!r}, {section[b]!r}")
    if not (section[a] or section[b]):
        raise ValueError(f"encode_cache needs {name}.{a} ({what[0]}) or {name}.{b} ({what[1]}); both are empty")
    return a if section[a] else b


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every setting that can be checked without opening a file; ``ValueError`` naming the key."""
    d, o = config.data, config.output
    if not d.dataset:
        raise ValueError("encode_cache needs --config.data.dataset: a TFDS builder directory (as "
                         "shelllcc.data.video_folder.build prints it) or a dataset name under data.data_dir")
    if not d.split:
        raise ValueError("data.split is empty")
    if config.captions_only:
        return
    _one_of(config.vae, "vae", ("pretrained", "dir"), ("a diffusers vae folder", "a saved WanVAE / PatchVAE"))
    _one_of(config.text, "text", ("umt5_cache", "encoder_dir"), ("a umT5 .npz text cache", "a saved TextEncoder"))
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if o.shard_size < 1:
        raise ValueError(f"output.shard_size must be >= 1, got {o.shard_size}")
    if o.shard_size % config.batch_size:
        print(f"note: output.shard_size={o.shard_size} is not a multiple of batch_size={config.batch_size}: "
              f"each shard's last batch is padded (wasted work)", flush=True)
    if o.latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"output.latent_dtype={o.latent_dtype!r}; expected one of {LATENT_DTYPES}")
    if config.vae.dtype not in LATENT_DTYPES[1:]:
        raise ValueError(f"vae.dtype={config.vae.dtype!r}; expected one of {LATENT_DTYPES[1:]}")
    if config.text.umt5_cache and not os.path.isfile(config.text.umt5_cache):
        raise ValueError(f"text.umt5_cache {config.text.umt5_cache!r} does not exist (write it with "
                         f"python -m third_party.umt5 --captions ... --out {config.text.umt5_cache})")


# ------------------------------------------------------------------------------------------ the source

@dataclasses.dataclass
class Source:
    examples: object                 # random-access TFDS data source (example dicts)
    video_shape: tuple               # [T, H, W, C] of one clip
    fields: tuple                    # every feature name
    description: str                 # recorded in cache.json, compared on resume

    def captions(self, caption_key: str, video_key: str) -> list[str]:
        """Every caption of the split, in order, read without decoding the clips."""
        import tensorflow_datasets as tfds  # heavy; only this path needs it

        light = self.examples
        if dataclasses.is_dataclass(light) and hasattr(light, "decoders"):
            light = dataclasses.replace(light, decoders={video_key: tfds.decode.SkipDecoding()})
        out, n, step = [], len(light), 256
        for lo in range(0, n, step):
            out.extend(_text(e[caption_key]) for e in light.__getitems__(list(range(lo, min(lo + step, n)))))
        return out


def _text(x) -> str:
    # TFDS Text features come back as bytes from a data source (encode_to_cache decodes them the same way)
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x.item()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def open_source(d: ml_collections.ConfigDict) -> Source:
    """The split as a random-access source, its clip shape and a description; errors name the dataset."""

    examples = readers.open_split(d.dataset, d.split, d.data_dir or None)
    info = examples.dataset_info
    features = info.features
    if d.video_key not in features:
        raise ValueError(f"data.video_key={d.video_key!r} is not a feature of {info.full_name} "
                         f"(features: {sorted(features.keys())})")
    if d.caption_key not in features:
        raise ValueError(f"data.caption_key={d.caption_key!r} is not a feature of {info.full_name} "
                         f"(features: {sorted(features.keys())})")
    shape = tuple(features[d.video_key].shape)
    if len(shape) != 4 or None in shape:
        raise ValueError(f"{info.full_name} feature {d.video_key!r} has shape {shape}; expected fixed [T, H, W, 3] "
                         f"clips (a shelllcc.data.video_folder or embedded_benchmark build)")
    if len(examples) == 0:
        raise ValueError(f"split {d.split!r} of {info.full_name} is empty")
    return Source(examples, shape, tuple(features.keys()),
                  f"{info.full_name} split={d.split} ({len(examples)} clips of {shape})")


def resolve_keep_fields(keep: tuple, source: Source, d: ml_collections.ConfigDict) -> tuple[str, ...]:
    keep = tuple(str(k) for k in keep)
    if keep == (ALL_FIELDS,):
        return tuple(f for f in source.fields if f not in (d.video_key, d.caption_key))
    if ALL_FIELDS in keep:
        raise ValueError(f"data.keep_fields: {ALL_FIELDS!r} (all fields) cannot be combined with names, got {keep}")
    missing = [f for f in keep if f not in source.fields]
    if missing:
        raise ValueError(f"data.keep_fields names {missing}, which the dataset does not have "
                         f"(features: {sorted(source.fields)})")
    return keep


def write_captions(path: str, captions: list[str]) -> int:
    """The distinct ``captions`` (first-seen order) as ``.jsonl`` JSON strings; returns their count."""
    distinct = list(dict.fromkeys(captions))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for c in distinct:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(distinct)


# ------------------------------------------------------------------------------------------ the encoders

def planned_vae_config(v: ml_collections.ConfigDict):
    """The VAE's architecture, read without loading weights (``ValueError`` for a wrong folder)."""
    return sample.planned_vae_config(v)


def check_video(shape: tuple, vae_cfg) -> tuple[int, ...]:
    """The latent shape ``[T', h, w, C]`` of a clip of ``shape``; ``ValueError`` when the VAE cannot take it."""
    t, h, w, c = shape
    f = vae_cfg.spatial_factor
    if c != vae_cfg.in_channels:
        raise ValueError(f"the clips have {c} channels, the VAE takes {vae_cfg.in_channels}")
    if h % f or w % f:
        raise ValueError(f"the clips are {h}x{w}; the VAE needs height and width divisible by {f}")
    tf = getattr(vae_cfg, "temporal_patch", ENCODE_CHUNK_FRAMES)
    if (t - 1) % tf:
        print(f"note: clips of {t} frames: the VAE codes 1 + {tf}k frames, the last {(t - 1) % tf} are dropped",
              flush=True)
    return (vae_cfg.latent_frames(t), h // f, w // f, vae_cfg.z_dim)


def load_vae(v: ml_collections.ConfigDict):
    """``(vae, description)`` of the ``vae`` section (a diffusers checkpoint or a saved model)."""
    return sample.load_vae(v), (f"diffusers {v.pretrained}" if v.pretrained else f"saved {v.dir}")


def umt5_cache_info(path: str) -> tuple[list[str], tuple[int, int]]:
    """``(captions, (max_length, D))`` of a umT5 ``.npz`` text cache, without reading its embeddings."""

    with np.load(path, allow_pickle=False) as f:
        captions = [str(c) for c in f["captions"]]
        max_length = int(f["max_length"])
        fmt = np.lib.format
        with zipfile.ZipFile(path) as z, z.open("embeddings.npy") as member:
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(
                fmt.read_magic(member))
            shape = read_header(member)[0] if read_header else f["embeddings"].shape
    return captions, (max_length, int(shape[2]))


def text_encoder(t: ml_collections.ConfigDict):
    """``(shape (L, D), known captions or None, make)`` for the ``text`` section, where ``make()`` loads the
    encoder and returns ``(encode_text, description)``. Nothing heavy happens before ``make()``."""

    if t.umt5_cache:
        captions, shape = umt5_cache_info(t.umt5_cache)
        return shape, set(captions), lambda: (latent_cache.precomputed_text(t.umt5_cache),
                                              f"umT5 cache {t.umt5_cache} ({len(captions)} captions)")
    try:
        info = saving.read_model_json(t.encoder_dir)
    except FileNotFoundError:
        raise ValueError(f"text.encoder_dir {t.encoder_dir!r} is not a saved model (no {saving.MODEL_JSON})") from None
    if info["kind"] != "text_encoder":
        raise ValueError(f"text.encoder_dir {t.encoder_dir!r} holds a {info['kind']!r} model, not a text_encoder")
    cfg = saving.config_from_architecture("text_encoder", info["architecture"])
    return (cfg.max_len, cfg.text_dim), None, lambda: (latent_cache.text_encoder_fn(saving.load_model(t.encoder_dir)),
                                                       f"TextEncoder {t.encoder_dir}")


def check_captions(source: Source, d: ml_collections.ConfigDict, known: set, umt5_cache: str, workdir: str) -> None:
    """``ValueError`` listing the split's captions missing from the umT5 cache (and writing them all to
    ``WORKDIR/captions.jsonl`` for ``third_party.umt5``)."""
    t0 = time.time()
    captions = source.captions(d.caption_key, d.video_key)
    missing = list(dict.fromkeys(c for c in captions if c not in known))
    if missing:
        path = os.path.join(workdir, CAPTIONS_FILE)
        k = write_captions(path, captions)
        shown = "; ".join(repr(c[:80]) for c in missing[:5])
        raise ValueError(f"{len(missing)} of the {k} distinct captions of split {d.split!r} are not in "
                         f"text.umt5_cache {umt5_cache!r} (e.g. {shown}). All {k} are in {path}; make the cache with "
                         f"python -m third_party.umt5 --model Wan2.1-T2V-1.3B-Diffusers --captions {path} "
                         f"--out {umt5_cache}")
    print(f"encode_cache: the {len(captions)} captions are all in the umT5 cache (checked in "
          f"{time.time() - t0:.1f}s)", flush=True)


# ------------------------------------------------------------------------------------------ the run

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Encode ``data.split`` into ``output.dir`` (module doc); returns the summary written to
    ``WORKDIR/encode_summary.json`` (or, with ``captions_only``, ``{"captions_file", "num_captions"}``)."""

    t_start = time.time()
    check_config(config)
    d, o = config.data, config.output
    os.makedirs(workdir, exist_ok=True)
    out_dir = os.path.abspath(o.dir or workdir)
    source = open_source(d)
    n = len(source.examples)
    print(f"encode_cache: {source.description}", flush=True)

    if config.captions_only:
        path = os.path.join(workdir, CAPTIONS_FILE)
        k = write_captions(path, source.captions(d.caption_key, d.video_key))
        print(f"encode_cache: {k} distinct captions of {n} clips -> {path}\n"
              f"next: python -m third_party.umt5 --model Wan2.1-T2V-1.3B-Diffusers --captions {path} --out text.npz",
              flush=True)
        return {"captions_file": path, "num_captions": k}

    keep = resolve_keep_fields(d.keep_fields, source, d)
    vae_cfg = planned_vae_config(config.vae)
    latent_shape = check_video(source.video_shape, vae_cfg)
    text_shape, known, make_text = text_encoder(config.text)
    if known is not None and config.text.check_captions:
        check_captions(source, d, known, config.text.umt5_cache, workdir)

    print(f"encode_cache: loading the encoders (VAE {config.vae.pretrained or config.vae.dir}, compute "
          f"{config.vae.dtype}) ...", flush=True)
    t0 = time.time()
    vae, vae_desc = load_vae(config.vae)
    encode_video = latent_cache.vae_video_encoder(vae)
    encode_text, text_desc = make_text()
    t_load = time.time() - t0
    print(f"encode_cache: {n} clips {source.video_shape} -> latents {latent_shape} "
          f"({o.latent_dtype or 'as encoded'}), text {text_shape} from {text_desc}; batch {config.batch_size}, "
          f"{-(-n // o.shard_size)} shards of {o.shard_size} -> {out_dir}; keep {list(keep)} "
          f"(encoders loaded in {t_load:.1f}s)", flush=True)

    summary = latent_cache.encode_to_cache(
        source.examples, out_dir, encode_video=encode_video, encode_text=encode_text,
        batch_size=int(config.batch_size), shard_size=int(o.shard_size), keep_fields=keep,
        video_key=d.video_key, caption_key=d.caption_key, latent_dtype=o.latent_dtype or None,
        trim_text=bool(o.trim_text), source_description=source.description, progress=True)

    cache = latent_cache.open_cache(out_dir)
    fields = cache.info["fields"]
    summary = dict(summary, source=source.description, vae=vae_desc, text=text_desc, keep_fields=list(keep),
                   latents=fields["latents"], text_embeddings=fields["text_embeddings"],
                   load_s=t_load, total_s=time.time() - t_start)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    lat = fields["latents"]
    print(f"encode_cache: done. {n} clips in {summary['num_shards']} shards at {out_dir} "
          f"({summary['bytes'] / 2 ** 20:.1f} MiB): latents {tuple(lat['shape'])} {lat['dtype']}, text "
          f"{tuple(fields['text_embeddings']['shape'])}; {summary['clips_encoded']} clips encoded "
          f"({summary['shards_written']} shards written, {summary['shards_skipped']} reused) in "
          f"{summary['seconds']:.1f}s, {summary['clips_per_s']:.2f} clips/s", flush=True)
    print(f"encode_cache: read it with --config.data.cache.dir={out_dir} (fit_manifold), "
          f"--config.data.cache_dir={out_dir} (sft, reward_finetune) or --config.prompts.cache_dir={out_dir} (sample)",
          flush=True)
    return summary
