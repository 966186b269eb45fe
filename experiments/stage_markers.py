"""Markers of finished work that remember what made it: a hash of the config settings a piece of work
read and of the hashes of the work it read from.

A stage of the embedded pipeline (or one variant's run) is done only if its marker exists *and* records
the hash this run would give it. A marker of another hash means the settings or an input changed since:
the work is stale and is redone, and everything that read it is redone after it because their hashes
include its hash. ``STARTED`` markers carry the same hash so an interrupted piece of work is resumed only
by a run with the same settings (resuming a half-trained base with another learning rate would mix two
runs into one model).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

import ml_collections

DONE_SUFFIX = "DONE"
STARTED_SUFFIX = "STARTED"
MAX_SHOWN = 3        # changed settings named in the one-line note


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


def settings_of(config, keys: Iterable[str]) -> dict:
    """``{dotted key: value}`` of ``config`` for each key (a section or one setting)."""
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        out[key] = _plain(node)
    return out


def stage_hash(settings: Mapping, inputs: Mapping[str, str]) -> str:
    text = json.dumps({"settings": _plain(settings), "inputs": dict(sorted(inputs.items()))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(settings: Mapping, inputs: Mapping[str, str]) -> dict:
    return {"hash": stage_hash(settings, inputs), "settings": _plain(settings), "inputs": dict(inputs)}


def write(path: str, rec: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(path + ".tmp", path)


def read(path: str) -> dict | None:
    """The marker's record; ``{}`` for a marker that records nothing (an empty file from before markers
    held hashes, or a damaged one); ``None`` when there is none."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) and "hash" in rec else {}


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: tree}


def what_changed(old: Mapping, new: Mapping) -> str:
    """Why ``old`` (a marker's record) is not ``new``: the changed settings with their values, else the
    inputs that were redone, in a few words."""
    if not old:
        return "its marker records no config (written before markers held hashes)"
    a, b = _flat(old.get("settings", {})), _flat(new["settings"])
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:MAX_SHOWN])
        more = f" and {len(changed) - MAX_SHOWN} more" if len(changed) > MAX_SHOWN else ""
        return f"config changed ({shown}{more})"
    inputs = [k for k in sorted(set(old.get("inputs", {})) | set(new["inputs"]))
              if old.get("inputs", {}).get(k) != new["inputs"].get(k)]
    if inputs:
        return f"its inputs changed ({', '.join(inputs)})"
    return "its marker's hash differs"


__all__ = ["settings_of", "stage_hash", "record", "write", "read", "what_changed", "DONE_SUFFIX", "STARTED_SUFFIX"]
