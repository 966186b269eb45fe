"""Latents stored as ``.npy`` / ``.npz`` files (one array of one or many latents per file).

Until the TFDS latent cache exists this is how real latents (e.g. Wan2.1 VAE posteriors dumped by the
reference scripts, channels-first ``[B, C, T, H, W]``) reach manifold fitting.
"""

from __future__ import annotations

import glob
import os

import numpy as np

LAYOUTS = ("channels_last", "channels_first")


def _as_batch(arr: np.ndarray, path: str, layout: str) -> np.ndarray:
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5:
        raise ValueError(f"{path}: expected a latent [T, H, W, C] / [B, T, H, W, C] (or channels-first), "
                         f"got shape {arr.shape}")
    if layout == "channels_first":
        arr = np.moveaxis(arr, 1, -1)
    return arr


def load_latent_files(pattern: str, layout: str = "channels_last", key: str | None = None
                      ) -> tuple[np.ndarray, dict]:
    """Read every file matching ``pattern``; return ``(latents [B, T, H, W, C] float32, report)``.

    Files that cannot be read, hold no latent of the right rank, hold a NaN or inf anywhere, or whose
    latent shape differs from the most common one are skipped and counted by reason in ``report``
    (``report["skipped_files"]`` names each file); if none is usable it is an error.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown latent layout {layout!r}; expected one of {LAYOUTS}")
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise FileNotFoundError(f"no latent files match {pattern!r}")
    loaded_arrays, skipped = [], {}
    for path in paths:
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                names = list(loaded.keys())
                name = key or (names[0] if len(names) == 1 else "latents")
                if name not in names:
                    raise KeyError(f"no array {name!r} (has {names}); set the npz key")
                loaded = loaded[name]
            arr = _as_batch(np.asarray(loaded, np.float32), path, layout)
        except (OSError, ValueError, KeyError, EOFError) as e:
            reason = type(e).__name__
            skipped.setdefault(reason, []).append(f"{path}: {e}")
            continue
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            # one NaN patch becomes a k-means++ anchor and every step of the fit is then skipped: the
            # whole file goes, since which of its latents to trust is not known
            skipped.setdefault("non_finite", []).append(f"{path}: {bad} non-finite values")
            continue
        loaded_arrays.append((path, arr))
    shapes = [arr.shape[1:] for _, arr in loaded_arrays]
    shape = max(set(shapes), key=shapes.count) if shapes else None
    arrays = []
    for path, arr in loaded_arrays:
        if arr.shape[1:] != shape:
            skipped.setdefault("shape_mismatch", []).append(f"{path}: {arr.shape[1:]} != {shape}")
        else:
            arrays.append(arr)
    report = {"files": len(paths), "used": len(arrays),
              "skipped": {reason: len(v) for reason, v in skipped.items()}, "skipped_files": skipped}
    if not arrays:
        raise ValueError(f"none of the {len(paths)} files matching {pattern!r} held a usable latent: {skipped}")
    return np.concatenate(arrays, axis=0), report
