"""Metric writers without TensorFlow: console, ``metrics.jsonl`` and TensorBoard event files (tensorboardX).

The project's loops call ``write_scalars`` / ``write_texts`` / ``flush`` / ``close`` only, so the writers are
the project's own few classes rather than clu's ``metric_writers``, whose package imports TensorFlow for
its ``SummaryWriter`` (GPU images have no TensorFlow, and the data is read through ArrayRecord)::

    from shelllcc.training import metric_writers
    writer = metric_writers.create_writer(workdir)      # console + TensorBoard + jsonl on process 0
    writer.write_scalars(step, {"loss": 0.1})
    writer.flush()
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


class MetricWriter:
    """What a loop writes: scalars every few steps, texts on events. Writers ignore what they cannot show."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch: its ``writer`` module imports torch when it is
    installed (2-4 s and a few hundred MB per process) only to accept torch tensors, and the project writes
    numbers and NumPy arrays. A process that already imported torch keeps it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None         # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files under ``logdir`` (scalars, texts, images, histograms), via tensorboardX."""

    def __init__(self, logdir: str):
        SummaryWriter = _summary_writer_class()
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def write_scalars(self, step, scalars):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_texts(self, step, texts):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_images(self, step, images):
        for key, value in images.items():
            arr = np.asarray(value)
            arr = arr[None] if arr.ndim == 3 else arr
            if arr.ndim != 4:
                raise ValueError(f"image {key!r} must be [H, W, C] or [N, H, W, C], got shape {arr.shape}")
            self._writer.add_images(key, arr, global_step=step, dataformats="NHWC")

    def write_histograms(self, step, arrays):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter(MetricWriter):
    """Every call goes to each writer in turn."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_texts(self, step, texts):
        for w in self.writers:
            w.write_texts(step, texts)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def write_histograms(self, step, arrays):
        for w in self.writers:
            w.write_histograms(step, arrays)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


class AsyncWriter(MetricWriter):
    """Writes in one background thread, in call order, so a slow disk never stalls the training loop.

    Values are copied to host numbers first (a device array would otherwise be read, and kept alive, by
    the thread). ``flush`` waits for the pending writes and raises the first error one of them hit.
    """

    def __init__(self, writer: MetricWriter):
        self.writer = writer
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metric_writer")
        self._pending: list[concurrent.futures.Future] = []

    def _submit(self, fn, *args):
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._pool.submit(fn, *args))

    def write_scalars(self, step, scalars):
        self._submit(self.writer.write_scalars, int(step), {k: float(v) for k, v in scalars.items()})

    def write_texts(self, step, texts):
        self._submit(self.writer.write_texts, int(step), dict(texts))

    def write_images(self, step, images):
        self._submit(self.writer.write_images, int(step), {k: np.asarray(v) for k, v in images.items()})

    def write_histograms(self, step, arrays):
        self._submit(self.writer.write_histograms, int(step), {k: np.asarray(v) for k, v in arrays.items()})

    def flush(self):
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        self.writer.flush()

    def close(self):
        self.flush()
        self._pool.shutdown(wait=True)
        self.writer.close()


def _fmt(value: Any) -> str:
    v = float(value)
    return f"{v:.4g}" if v == v else "nan"


class ConsoleWriter(MetricWriter):
    """One line per ``write_scalars`` call on stdout: ``[prefix] step N | k=v ...`` (keys sorted).

    Scalars whose key is in ``lead`` (progress figures) are printed first, in that order.
    """

    def __init__(self, prefix: str = "train", lead: tuple[str, ...] = ("steps_per_s", "eta_s"),
                 total_steps: int | None = None):
        self.prefix, self.lead, self.total = prefix, lead, total_steps

    def _step(self, step: int) -> str:
        return f"step {step}/{self.total}" if self.total else f"step {step}"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        head = [f"{k}={_fmt(scalars[k])}" for k in self.lead if k in scalars]
        rest = [f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()) if k not in self.lead]
        print(f"[{self.prefix}] {self._step(step)} " + " ".join(head) + (" | " if head else "") + " ".join(rest),
              flush=True)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            print(f"[{self.prefix}] {self._step(step)} {key}: {value}", flush=True)

    def flush(self):
        sys.stdout.flush()


class JsonlWriter(MetricWriter):
    """Scalars appended to a JSON-lines file, one ``{"step": n, **scalars}`` object per call: the
    easy format for plots and tests (TensorBoard event files need a protobuf reader)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


def create_writer(workdir: str, *, prefix: str = "train", tensorboard: bool = True, console: bool = True,
                  asynchronous: bool = True, process_index: int | None = None,
                  total_steps: int | None = None) -> MetricWriter:
    """Console + TensorBoard (``workdir/tensorboard``) + ``workdir/metrics.jsonl`` on process 0; a writer
    that drops everything on the others (every process runs the same loop and calls the writer, only one should write).

    ``asynchronous``: writes happen in a background thread (:class:`AsyncWriter`), so a slow disk never
    stalls the training loop; ``flush()`` waits for them.
    """
    if process_index is None:
        import jax
        process_index = jax.process_index()
    writers: list[MetricWriter] = []
    if process_index == 0:
        if console:
            writers.append(ConsoleWriter(prefix, total_steps=total_steps))
        if tensorboard:
            writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
    return AsyncWriter(MultiWriter(writers)) if asynchronous else MultiWriter(writers)


__all__ = ["MetricWriter", "TensorBoardWriter", "ConsoleWriter", "JsonlWriter", "MultiWriter", "AsyncWriter",
           "create_writer"]
