"""What every benchmark here shares: worker subprocesses, logs, JSONL records, device peaks, timing.

A benchmark makes one :class:`Bench` (its name, date and command line; :meth:`Bench.log` prints and mirrors
to ``OUT_DIR/<name>.log``; :meth:`Bench.record` appends a record with ``bench``, ``date`` and ``command`` to
``--out-jsonl`` and ``OUT_DIR/<name>.jsonl``). Each measured configuration runs in its own subprocess
(:func:`run`), so that one configuration's device memory, compilation caches and allocator state cannot leak
into the next; the worker prints its result with :func:`emit` and the parent reads :attr:`Run.result`.
Inside a worker: :func:`timed`, :func:`jax_peak_gb`, :func:`memory_analysis`, :func:`torch_peak_gb`.

Records go to ``benchmarks/results.jsonl`` unless ``--out-jsonl PATH`` (alias ``--results PATH``) or the
environment variable ``SHELLLCC_BENCH_RESULTS`` names another file: smoke runs should use one of them.
Importing this module puts the repository root on ``sys.path``; it imports neither jax nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESULTS = os.environ.get("SHELLLCC_BENCH_RESULTS") or os.path.join(REPO, "benchmarks", "results.jsonl")
RESULT = "@@RESULT "
GB = 1024.0 ** 3

# NVIDIA datasheet dense peaks of the SXM parts (TFLOP/s; HBM TB/s), for rough floors only. JAX's default
# float32 matmul precision on Hopper is TF32; PyTorch's default is true float32.
DATASHEET = {
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "hbm_tbs": 3.35},
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "hbm_tbs": 4.8},
}


def datasheet(device_kind: str | None) -> dict | None:
    """The :data:`DATASHEET` entry of a device kind (``None`` for PCIe parts and unknown devices)."""
    if not device_kind or "pcie" in device_kind.lower():
        return None
    return next((peaks for name, peaks in DATASHEET.items() if name in device_kind), None)


# ------------------------------------------------------------------------------------------ the parent

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def host_device() -> str:
    """The record's ``device`` of a CPU-bound benchmark."""
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"


def package_version(name: str) -> str | None:
    """From the installed metadata: importing torch or jax only for this is slow."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_output_args(parser, out_dir: bool = True, label: bool = False) -> None:
    """``--out-jsonl`` (alias ``--results``) and, with ``out_dir``, ``--out-dir``; with ``label``, ``--label``."""
    parser.add_argument("--out-jsonl", "--results", default=RESULTS,
                        help="append the JSON records here (default: $SHELLLCC_BENCH_RESULTS or "
                             "benchmarks/results.jsonl)")
    if out_dir:
        parser.add_argument("--out-dir", default=None, help="if given, also write NAME.jsonl and NAME.log here")
    if label:
        parser.add_argument("--label", default="", help="free text stored with every JSON record")


def add_worker_args(parser, workers, timeout: float) -> None:
    """``--worker-timeout`` and the hidden entry point of a worker: ``--_worker WHICH --_data DIR --_result PATH``."""
    parser.add_argument("--worker-timeout", type=float, default=timeout, help="seconds per subprocess")
    parser.add_argument("--_worker", choices=list(workers), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)


class Bench:
    """One invocation of a benchmark: its log and its records."""

    def __init__(self, name: str, out_jsonl: str | None = RESULTS, out_dir: str | None = None, argv=None):
        self.name, self.out_jsonl, self.out_dir = name, out_jsonl, out_dir or None
        self.date = now()
        script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO) if sys.argv[0] else f"benchmarks/{name}.py"
        self.command = "python " + shlex.join([script, *(sys.argv[1:] if argv is None else argv)])
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)

    def path(self, ext: str) -> str | None:
        return os.path.join(self.out_dir, f"{self.name}.{ext}") if self.out_dir else None

    def log(self, msg: str = "") -> None:
        """Print, and with an out dir append to ``NAME.log`` at once (a run cut off still leaves its log)."""
        print(msg, flush=True)
        if self.out_dir:
            with open(self.path("log"), "a") as f:
                f.write(msg + "\n")

    def record(self, **fields) -> dict:
        """Append ``{bench, date, command, **fields}`` to the results file (and ``NAME.jsonl``); returns it."""
        rec = {"bench": self.name, "date": self.date, "command": self.command, **fields}
        for path in filter(None, [self.out_jsonl, self.path("jsonl")]):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def failed(self, what: str, result: "Run", lines: int = 15) -> None:
        """Log that a worker failed, with the last lines of its output."""
        self.log(f"  ! {what} failed ({result.error}); last lines of its output:")
        for ln in result.tail(lines).splitlines():
            self.log("    " + ln)

    def table(self, cols, rows) -> None:
        """Log ``rows`` (dicts) as right-aligned columns; ``cols``: ``(header, key, format spec)``."""
        cells = [[fmt(r.get(key), spec) for _, key, spec in cols] for r in rows]
        widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _, _) in enumerate(cols)]
        self.log("  ".join(name.rjust(w) for (name, _, _), w in zip(cols, widths)))
        self.log("  ".join("-" * w for w in widths))
        for c in cells:
            self.log("  ".join(v.rjust(w) for v, w in zip(c, widths)))


@dataclasses.dataclass
class Run:
    """A finished subprocess: exit code (``None``: killed at its timeout), output, wall time, result."""
    rc: int | None
    output: str
    wall_s: float
    result: dict | None
    expects_result: bool = True

    @property
    def error(self) -> str | None:
        if self.rc is None:
            return "timed out"
        if self.rc:
            return f"rc {self.rc}"
        return None if self.result is not None or not self.expects_result else "no result line"

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


class Worker:
    """A started subprocess (stdout and stderr merged), its output pumped line by line into memory, into
    ``log`` (a path) as it comes, and through ``on_line``."""

    def __init__(self, cmd, env=None, log=None, on_line=None, cwd=REPO):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines, self.t0 = [], time.time()
        self._file = open(log, "w") if log else None
        if self._file:
            shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
            self._file.write("$ " + (shown + " " if shown else "") + shlex.join(map(str, cmd)) + "\n")
            self._file.flush()
        self.proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if self._file:
                    self._file.write(line)
                    self._file.flush()
                if on_line:
                    on_line(line)

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    def wait(self, timeout: float | None = None, expects_result: bool = True) -> Run:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._reader.join(timeout=30)
        if rc is None:
            self.lines.append(f"\n[killed after the {timeout:g}s timeout]\n")
        if self._file:
            if rc is None:
                self._file.write(self.lines[-1])
            self._file.close()
        found = [ln for ln in self.lines if ln.startswith(RESULT)]
        result = json.loads(found[-1][len(RESULT):]) if found else None
        return Run(rc, "".join(self.lines), time.time() - self.t0, result, expects_result)


def run(cmd, timeout: float | None = None, env=None, log=None, on_line=None, expects_result=True) -> Run:
    """Run ``cmd`` to its end (or kill it after ``timeout`` s); see :class:`Worker`."""
    return Worker(cmd, env, log, on_line).wait(timeout, expects_result)


def xla_flags_env(extra: str) -> dict:
    """The ``env`` of a worker whose ``XLA_FLAGS`` are this process's plus ``extra`` (``{}`` when both are empty)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
    return {"XLA_FLAGS": flags} if flags else {}


def script_cmd(script: str, *args) -> list[str]:
    """``python <script> args...`` with this interpreter (``script``: a benchmark's ``__file__``)."""
    return [sys.executable, os.path.abspath(script), *map(str, args)]


# ------------------------------------------------------------------------------------------ the worker

def emit(result: dict) -> None:
    """The worker's result, for :attr:`Run.result`."""
    print(RESULT + json.dumps(result), flush=True)


def timed(fn, repeats: int, warmup: int = 0, sync=None) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones. ``sync(out)`` waits
    for a call's work (default ``jax.block_until_ready``; :func:`torch_sync` for PyTorch)."""
    if sync is None:
        import jax
        sync = jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def jax_memory(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (CPU clients may not implement it)
        return {}


def jax_peak_gb(devices, minus_bytes: int = 0) -> float | None:
    """The largest ``peak_bytes_in_use`` of ``devices`` (since the process started: the counter cannot be
    reset) less ``minus_bytes``, in GiB; ``None`` where the backend keeps no statistics (CPU)."""
    peaks = [s["peak_bytes_in_use"] for s in map(jax_memory, devices) if "peak_bytes_in_use" in s]
    return (max(peaks) - minus_bytes) / GB if peaks else None


def memory_analysis(compiled) -> dict:
    """The executable's ``*_size_in_bytes`` as ``*_gb`` (``temp_gb``: its own scratch), ``{}`` if unknown."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if isinstance(m, (list, tuple)):  # some versions return one entry per device
        m = m[0] if m else None
    out = {}
    for name in ("temp", "argument", "output", "alias", "generated_code"):
        v = getattr(m, f"{name}_size_in_bytes", None)
        if v is not None:
            out[f"{name}_gb"] = v / GB
    return out


def torch_sync(device):
    """A ``sync`` for :func:`timed` on a torch device."""
    import torch
    return (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)


def torch_peak_reset(device) -> int:
    """Start a peak-memory window on a CUDA device; returns the bytes allocated now (0 elsewhere)."""
    import torch
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def torch_peak_gb(device, minus_bytes: int = 0) -> float | None:
    import torch
    return (torch.cuda.max_memory_allocated() - minus_bytes) / GB if device.type == "cuda" else None


def torch_device_name(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
