"""Streaming reader for diffusers-format model folders (``config.json`` + safetensors, single or sharded).

Tensors are memory-mapped straight from the files (bf16 through ``ml_dtypes``), one shard open at a
time, so converting a 14B checkpoint never holds two copies of it in host memory. Needs neither
torch nor the ``safetensors`` package: the format is an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}}`` and the raw data.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {folder} is not a diffusers model folder")
    with open(path) as f:
        return json.load(f)


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a folder: from its ``*.safetensors.index.json`` if any, else the single file."""
    for name in WEIGHT_NAMES:
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
            return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return [path]
    raise FileNotFoundError(f"no safetensors weights in {folder} (looked for {', '.join(WEIGHT_NAMES)} "
                            "and their .index.json)")


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_tensors(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of the folder; arrays are read-only memory maps."""
    for path in weight_files(folder):
        header, offset = read_header(path)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            arr = mm[offset + start: offset + end].view(dtype).reshape(info["shape"])
            yield name, arr
        del mm


def tensor_names(folder: str) -> list[str]:
    return [name for path in weight_files(folder) for name in read_header(path)[0]]
