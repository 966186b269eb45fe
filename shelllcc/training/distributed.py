"""Multi-process start-up: ``jax.distributed.initialize()`` when the environment describes several processes.

Detected environments (one process per host or per GPU):

* explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
  optionally ``JAX_LOCAL_DEVICE_IDS`` (comma separated), e.g. for a hand-launched multi-GPU host;
* Slurm (``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) and multi-host Cloud TPU
  (``TPU_WORKER_HOSTNAMES`` naming several hosts): JAX detects the arguments itself.

Must run before any JAX computation (``experiments.main`` calls it first).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

MODES = ("auto", "on", "off")


def detect(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process environment ``env`` describes (``explicit``, ``slurm``, ``mpi``, ``tpu``), or None."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu"
    return None


def explicit_arguments(env: Mapping[str, str]) -> dict:
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
    if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three "
                         f"(and JAX_LOCAL_DEVICE_IDS to pin each process to its GPUs)")
    args = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]))
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        args["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    return args


def maybe_initialize(mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
    """Initialise JAX's distributed runtime if ``mode`` is ``on``, or ``auto`` and :func:`detect` finds
    a multi-process environment. Returns whether it was initialised."""
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {MODES}")
    env = os.environ if env is None else env
    kind = detect(env)
    if mode == "off" or (mode == "auto" and kind is None):
        return False
    jax.distributed.initialize(**(explicit_arguments(env) if kind == "explicit" else {}))
    print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()} ({kind or 'auto-detected'}), "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    return True


__all__ = ["detect", "maybe_initialize", "MODES"]
