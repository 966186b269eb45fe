"""Writing videos to disk: pixel conversion, MP4 (H.264), GIF and side-by-side grids.

Videos are numpy (or jax) arrays ``[T, H, W, C]`` with ``C`` 3 (RGB) or 1 (grey, written as RGB),
either ``uint8`` or floating point in ``[-1, 1]`` (the VAE's output range), which :func:`to_uint8`
maps to ``0..255``::

    write_mp4("out/0000.mp4", video, fps=16)        # video float [-1, 1] or uint8
    write_gif("out/0000.gif", video, fps=8)
    side_by_side = frame_grid([to_uint8(a), to_uint8(b)], ncols=2, pad=4)

MP4 files are H.264 (``libx264``) in ``yuv420p``, the pixel format every browser and player decodes;
it halves the chroma resolution, so frames are padded to an even height and width (module functions
say where). GIFs are written by Pillow through imageio with a 256-colour palette per frame.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

#: H.264 quality for :func:`write_mp4` (x264's constant rate factor: 0 lossless, 51 worst, 23 default).
DEFAULT_CRF = 17


def _as_array(video) -> np.ndarray:
    if isinstance(video, np.ndarray):
        return video
    try:  # jax arrays (and anything else with __array__) come to the host here
        return np.asarray(video)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"expected an array video [T, H, W, C], got {type(video).__name__}") from e


def _check_shape(video: np.ndarray, what: str = "video") -> None:
    if video.ndim != 4 or video.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must be [T, H, W, 3] (RGB) or [T, H, W, 1] (grey), got shape {video.shape}")
    if min(video.shape[:3]) < 1:
        raise ValueError(f"{what} is empty: shape {video.shape}")


def _is_float(dtype: np.dtype) -> bool:
    if np.issubdtype(dtype, np.floating):
        return True
    # bfloat16 / float8 (ml_dtypes) are not numpy floating subtypes
    return dtype.name in ("bfloat16",) or dtype.name.startswith("float8")


def to_uint8(video) -> np.ndarray:
    """``[T, H, W, C]`` video as ``uint8``.

    ``uint8`` input is returned unchanged (no copy); floating point input (float16/32/64, bfloat16) is
    read as ``[-1, 1]`` and mapped by ``round((x + 1) * 127.5)``, values outside the range clipped.
    Raises ``ValueError`` for a shape other than ``[T, H, W, 3]`` / ``[T, H, W, 1]`` or non-finite
    values, ``TypeError`` for any other dtype (integers other than uint8 are ambiguous: 0..255? 0..65535?).
    """
    video = _as_array(video)
    _check_shape(video)
    if video.dtype == np.uint8:
        return video
    if not _is_float(video.dtype):
        raise TypeError(f"video dtype {video.dtype} is not supported: expected uint8 (0..255) or floating point "
                        f"in [-1, 1]; shape {video.shape}")
    x = video.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"video has {int(bad.sum())} non-finite values (NaN/inf) of {x.size}; shape {video.shape}")
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _rgb(video: np.ndarray) -> np.ndarray:
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def pad_to_even(video: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, C]`` with copies of the last row / column to an even height and width (a no-op,
    returning the input, when both are even)."""
    _, h, w, _ = video.shape
    if h % 2 == 0 and w % 2 == 0:
        return video
    return np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _check_fps(fps) -> float:
    fps = float(fps)
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps}")
    return fps


def _makedirs_for(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def write_mp4(path: str, video, fps: float, *, crf: int = DEFAULT_CRF) -> str:
    """Write ``video`` ``[T, H, W, C]`` (uint8, or float in [-1, 1]) as an H.264 MP4 at ``fps``.

    Encoded by ffmpeg (the binary shipped with ``imageio-ffmpeg``) with ``libx264``, pixel format
    ``yuv420p`` and constant rate factor ``crf``. ``yuv420p`` needs an even height and width, so an
    odd-sized video is **padded by one row and/or column repeating its edge pixels** (the file is then
    ``H + H % 2`` by ``W + W % 2``); no resampling happens. Grey video (``C = 1``) is written as RGB.
    The file is written to ``path + ".tmp.mp4"`` and renamed into place, so a crash leaves no
    half-written ``path``. Returns ``path``.
    """
    import imageio_ffmpeg

    frames = pad_to_even(_rgb(to_uint8(video)))
    fps = _check_fps(fps)
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    t, h, w, _ = frames.shape
    _makedirs_for(path)
    tmp = path + ".tmp.mp4"
    gen = imageio_ffmpeg.write_frames(
        tmp, (w, h), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=fps, codec="libx264", quality=None,
        macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-crf", str(int(crf)), "-movflags", "+faststart"])
    try:
        gen.send(None)  # start ffmpeg
        for frame in frames:
            gen.send(np.ascontiguousarray(frame))
    finally:
        gen.close()
    os.replace(tmp, path)
    return path


def write_gif(path: str, video, fps: float) -> str:
    """Write ``video`` ``[T, H, W, C]`` (uint8, or float in [-1, 1]) as an animated GIF that loops forever.

    Each frame is quantised to its own 256-colour palette (Pillow), and GIF frame delays are whole
    centiseconds, so ``fps`` is approximate (``1 / fps`` rounded to 10 ms). Pillow merges consecutive
    identical frames into one longer frame, so a video with repeated frames reads back with fewer frames
    (same duration). Grey video is written as RGB. Returns ``path``.
    """
    import imageio.v3 as iio

    frames = _rgb(to_uint8(video))
    fps = _check_fps(fps)
    _makedirs_for(path)
    tmp = path + ".tmp.gif"
    iio.imwrite(tmp, frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)
    os.replace(tmp, path)
    return path


def frame_grid(videos: Sequence, ncols: int | None = None, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile videos of one shape ``[T, H, W, C]`` into one video, row by row, for side-by-side viewing.

    ``videos``: a sequence of ``uint8`` (or float ``[-1, 1]``, converted by :func:`to_uint8`) videos of
    identical shape. ``ncols``: tiles per row (default: all in one row). ``pad``: pixels of
    ``pad_value`` between neighbouring tiles (not around the border); cells of an incomplete last row
    are filled with ``pad_value``. Returns ``uint8 [T, rows * H + (rows - 1) * pad,
    ncols * W + (ncols - 1) * pad, C]``.
    """
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        raise ValueError(f"frame_grid takes a sequence of videos; got a single array of shape {videos.shape} "
                         f"(wrap it in a list, or pass a [N, T, H, W, C] array)")
    vids = [to_uint8(v) for v in videos]
    if not vids:
        raise ValueError("frame_grid needs at least one video")
    shape = vids[0].shape
    for i, v in enumerate(vids):
        if v.shape != shape:
            raise ValueError(f"frame_grid: video {i} has shape {v.shape}, video 0 has {shape}; all must match")
    n = len(vids)
    ncols = n if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    t, h, w, c = shape
    out = np.full((t, nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, c), pad_value, np.uint8)
    for i, v in enumerate(vids):
        r, col = divmod(i, ncols)
        y, x = r * (h + pad), col * (w + pad)
        out[:, y:y + h, x:x + w] = v
    return out


__all__ = ["to_uint8", "pad_to_even", "write_mp4", "write_gif", "frame_grid", "DEFAULT_CRF"]
