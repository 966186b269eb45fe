"""One-file model archives with a checksum: the form in which the repository ships pretrained models.

A *packed* model is one ``.npz`` file: every parameter under ``params/<dotted path>`` (stored in
``float16`` by default, half the bytes of float32; the loader casts back to the model's parameter
dtype) and, under ``model.json``, the kind and architecture that :mod:`shelllcc.models.saving` stores.
A *manifest* (``MANIFEST.json`` beside the files) lists each file's SHA-256 and size and how the files
were made (command, config, commit, device, date)::

    sha = pack_model("assets/base.npz", model)                     # -> hex digest
    write_manifest("assets", {"base": {"file": "base.npz", "sha256": sha, "kind": ...}}, provenance={...})
    model = unpack_model("assets/base.npz", expected_sha256=sha)   # ValueError if the bytes differ

Every failure names the file: a missing file, a size or checksum that differs from the manifest (a
corrupt or truncated download, a file replaced by another), an archive that does not open, and
parameters whose names or shapes do not match the stored architecture.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shelllcc.checksums import sha256_file
from shelllcc.models import saving
from shelllcc.models.wan_transformer import convert_layout

MANIFEST = "MANIFEST.json"
_PREFIX = "params/"
_META = "model.json"


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _flat(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[_name(path)] = np.asarray(leaf)
    return out


def pack_model(path: str, model: nnx.Module, *, dtype: str = "float16", extra: dict | None = None) -> str:
    """Write ``model``'s parameters and architecture to the one file ``path``; returns its SHA-256.

    ``dtype``: storage dtype of floating parameters (``float16`` | ``float32``). Written to a temporary
    name and renamed, so an interrupted write never leaves a file under ``path``.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"pack dtype must be 'float16' or 'float32', got {dtype!r}")
    kind = saving.model_kind(model)
    params = _flat(saving.disk_params(kind, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    big = {k: float(np.max(np.abs(v))) for k, v in params.items()
           if dtype == "float16" and np.issubdtype(v.dtype, np.floating) and v.size and np.max(np.abs(v)) > 6e4}
    if big:
        raise ValueError(f"parameters exceed float16's range (|x| > 6e4): {big}; pack with dtype='float32'")
    arrays = {_PREFIX + k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in params.items()}
    meta = {"kind": kind, "architecture": saving.architecture(model.config, kind), "extra": extra or {},
            "stored_dtype": dtype}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return sha256_file(path)


def _read(path: str, expected_sha256: str | None, expected_bytes: int | None) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise ValueError(f"packed model {path!r} does not exist")
    size = os.path.getsize(path)
    if expected_bytes is not None and size != expected_bytes:
        raise ValueError(f"packed model {path!r} has {size} bytes, its manifest says {expected_bytes}: the file is "
                         "truncated or replaced; restore it (git checkout -- it) or rebuild it")
    if expected_sha256 is not None:
        got = sha256_file(path)
        if got != expected_sha256:
            raise ValueError(f"packed model {path!r} has SHA-256 {got[:16]}..., its manifest says "
                             f"{expected_sha256[:16]}...: the file is corrupt or not the one the manifest describes")
    try:
        with open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"packed model {path!r} cannot be read as an .npz archive: {e}") from None
    if _META not in arrays:
        raise ValueError(f"packed model {path!r} has no {_META} entry (not written by pack_model)")
    meta = json.loads(arrays.pop(_META).tobytes().decode())
    params = {k[len(_PREFIX):]: v for k, v in arrays.items() if k.startswith(_PREFIX)}
    return meta, params


def read_meta(path: str) -> dict:
    """The kind, architecture and extra info stored in a packed model (no checksum check)."""
    return _read(path, None, None)[0]


def unpack_model(path: str, *, expected_sha256: str | None = None, expected_bytes: int | None = None,
                 **runtime) -> nnx.Module:
    """The model stored in ``path``, parameters cast to the model's parameter dtype (float32 by default).

    ``expected_sha256`` / ``expected_bytes`` (from the manifest) are checked before anything is read;
    ``runtime``: the runtime knobs :func:`shelllcc.models.saving.load_model` accepts. A DiT's blocks are
    stored one per entry (``params/blocks.0....``); with ``scan_layers`` they are stacked after reading.
    """
    meta, params = _read(path, expected_sha256, expected_bytes)
    kind = meta["kind"]
    config = saving.config_from_architecture(kind, meta["architecture"], **runtime)
    stacked = kind == "wan_transformer" and config.scan_layers
    if stacked:                  # read into the per-block layout the file holds, then stack
        config = dataclasses.replace(config, scan_layers=False)
    abstract = saving.abstract_model(kind, config, dtype=runtime.get("dtype"), param_dtype=runtime.get("param_dtype"))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    target = _flat(jax.tree.map(lambda a: np.zeros((), a.dtype), state.to_pure_dict()))
    shapes = {k: v.shape for k, v in _flat(jax.tree.map(lambda a: np.zeros(a.shape, np.int8),
                                                        state.to_pure_dict())).items()}
    missing, unknown = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or unknown:
        raise ValueError(f"packed model {path!r} does not match its {kind} architecture: missing parameters "
                         f"{missing[:5]}, unknown parameters {unknown[:5]}")
    wrong = {k: (params[k].shape, s) for k, s in shapes.items() if params[k].shape != s}
    if wrong:
        raise ValueError(f"packed model {path!r}: parameter shapes differ from the architecture's (stored, "
                         f"expected): {dict(list(wrong.items())[:5])}")

    def fill(kp, leaf):
        name = _name(kp)
        return jnp.asarray(params[name].astype(target[name].dtype))

    filled = jax.tree_util.tree_map_with_path(fill, state.to_pure_dict())
    state.replace_by_pure_dict(filled)
    model = nnx.merge(graphdef, state, rest)
    return convert_layout(model, scan_layers=True) if stacked else model


def write_manifest(directory: str, files: dict[str, dict], provenance: dict) -> str:
    """``directory/MANIFEST.json`` with ``files`` (name -> {file, sha256, bytes, ...}) and ``provenance``."""
    for name, entry in files.items():
        path = os.path.join(directory, entry["file"])
        entry.setdefault("sha256", sha256_file(path))
        entry.setdefault("bytes", os.path.getsize(path))
    out = os.path.join(directory, MANIFEST)
    with open(out, "w") as f:
        json.dump({"files": files, "provenance": provenance}, f, indent=1)
    return out


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"no {MANIFEST} in {directory!r}: not a directory of packed models")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if "files" not in manifest:
        raise ValueError(f"{path} has no 'files' entry")
    return manifest


def unpack_from_manifest(directory: str, name: str, **runtime) -> tuple[nnx.Module, dict]:
    """``(model, manifest entry)`` of ``name`` in ``directory/MANIFEST.json``, checksum verified."""
    manifest = read_manifest(directory)
    if name not in manifest["files"]:
        raise ValueError(f"{os.path.join(directory, MANIFEST)} lists no model {name!r}; it has "
                         f"{sorted(manifest['files'])}")
    entry = manifest["files"][name]
    model = unpack_model(os.path.join(directory, entry["file"]), expected_sha256=entry["sha256"],
                         expected_bytes=entry.get("bytes"), **runtime)
    return model, entry


__all__ = ["pack_model", "unpack_model", "read_meta", "sha256_file", "write_manifest", "read_manifest",
           "unpack_from_manifest", "MANIFEST"]
