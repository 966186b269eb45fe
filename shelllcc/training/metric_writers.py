"""clu metric writers without TensorFlow: TensorBoard event files (tensorboardX) + console.

clu's ``metric_writers`` package imports TensorFlow when it is imported, for its ``SummaryWriter``.
This project keeps TensorFlow out of every process (GPU images do not have it, and TFDS is read
through ArrayRecord). So before clu is first imported, :func:`_install` binds the name
``clu.metric_writers.summary_writer.SummaryWriter`` to :class:`TensorBoardWriter`, a clu
``MetricWriter`` that writes the same TensorBoard event files with tensorboardX. The rest of clu
(``MultiWriter``, ``AsyncMultiWriter``, ``LoggingWriter``, ``write_values``) is used as it is.

    from shelllcc.training import metric_writers
    writer = metric_writers.create_writer(workdir)      # console + TensorBoard on process 0
    writer.write_scalars(step, {"loss": 0.1})
    writer.flush()
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Mapping


_SHIM = "clu.metric_writers.summary_writer"


def _install() -> None:
    if _SHIM in sys.modules:
        return
    shim = types.ModuleType(_SHIM)
    shim.__doc__ = "TF-free SummaryWriter installed by shelllcc.training.metric_writers."

    def __getattr__(name):
        # resolved lazily, from its own module: TensorBoardWriter subclasses clu's interface, which
        # clu.metric_writers' __init__ (the module asking for this name) has imported by then
        if name == "SummaryWriter":
            from shelllcc.training.tensorboard_writer import TensorBoardWriter
            return TensorBoardWriter
        raise AttributeError(name)

    shim.__getattr__ = __getattr__
    sys.modules[_SHIM] = shim


_install()

from clu.metric_writers import interface  # noqa: E402  (needs the shim above)
from clu.metric_writers.async_writer import AsyncMultiWriter  # noqa: E402
from clu.metric_writers.multi_writer import MultiWriter  # noqa: E402

from shelllcc.training.tensorboard_writer import TensorBoardWriter  # noqa: E402


class _TextOnlyWriter(interface.MetricWriter):
    """Base of the writers below: they record scalars (and texts), and ignore arrays and hparams."""

    def write_texts(self, step, texts):
        pass

    def write_hparams(self, hparams):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def flush(self):
        pass

    def close(self):
        self.flush()


def _fmt(value: Any) -> str:
    v = float(value)
    return f"{v:.4g}" if v == v else "nan"


class ConsoleWriter(_TextOnlyWriter):
    """One line per ``write_scalars`` call on stdout: ``[prefix] step N | k=v ...`` (keys sorted).

    Scalars whose key is in ``lead`` (progress figures) are printed first, in that order.
    """

    def __init__(self, prefix: str = "train", lead: tuple[str, ...] = ("steps_per_s", "eta_s"),
                 total_steps: int | None = None):
        super().__init__()
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


class JsonlWriter(_TextOnlyWriter):
    """Scalars appended to a JSON-lines file, one ``{"step": n, **scalars}`` object per call: the
    easy format for plots and tests (TensorBoard event files need a protobuf reader)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        import json
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


def create_writer(workdir: str, *, prefix: str = "train", tensorboard: bool = True, console: bool = True,
                  asynchronous: bool = True, process_index: int | None = None,
                  total_steps: int | None = None) -> interface.MetricWriter:
    """Console + TensorBoard (``workdir/tensorboard``) + ``workdir/metrics.jsonl`` on process 0; a writer
    that drops everything on the others (every process runs the same loop and calls the writer, only one should write).

    ``asynchronous``: writes happen in a background thread (clu ``AsyncMultiWriter``), so a slow disk
    never stalls the training loop; ``flush()`` waits for them.
    """
    if process_index is None:
        import jax
        process_index = jax.process_index()
    writers: list[interface.MetricWriter] = []
    if process_index == 0:
        if console:
            writers.append(ConsoleWriter(prefix, total_steps=total_steps))
        if tensorboard:
            writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
    return AsyncMultiWriter(writers) if asynchronous else MultiWriter(writers)


__all__ = ["TensorBoardWriter", "ConsoleWriter", "JsonlWriter", "create_writer", "MultiWriter", "AsyncMultiWriter"]
