"""A clu ``MetricWriter`` writing TensorBoard event files with tensorboardX (no TensorFlow).

Imported by :mod:`shelllcc.training.metric_writers`, which also installs it as clu's ``SummaryWriter``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from clu.metric_writers import interface


class TensorBoardWriter(interface.MetricWriter):
    """TensorBoard event files under ``logdir`` (scalars, images, text, hparams), via tensorboardX."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter as _TBX

        super().__init__()
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._writer = _TBX(logdir=logdir, flush_secs=30)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
        for key, value in values.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            arr = np.asarray(value)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4:
                raise ValueError(f"image {key!r} must be [H, W, C] or [N, H, W, C], got shape {arr.shape}")
            self._writer.add_images(key, arr, global_step=step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        for key, value in videos.items():
            arr = np.asarray(value)   # [N, T, H, W, C]
            if arr.ndim != 5:
                raise ValueError(f"video {key!r} must be [N, T, H, W, C], got shape {arr.shape}")
            self._writer.add_video(key, np.transpose(arr, (0, 1, 4, 2, 3)), global_step=step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for key, value in audios.items():
            self._writer.add_audio(key, np.asarray(value), global_step=step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self._writer.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in sorted(flat.items())), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()
