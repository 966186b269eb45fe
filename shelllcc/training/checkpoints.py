"""Checkpoints of a training run (orbax ``CheckpointManager``) and saving on SIGTERM.

A checkpoint at step ``n`` holds everything needed to continue as if the run had never stopped:

* ``state``: the train state's ``step``, ``params``, ``opt_state`` and ``skipped`` count
  (:func:`shelllcc.training.train_state.checkpoint_items`), as sharded arrays;
* ``rng``: the run's base PRNG key (every step's key is ``fold_in(rng, step)``);
* ``meta``: JSON (step, experiment, anything the experiment adds);
* the data iterator state of every process, as ``data_state/<n>/process_<i>.json`` next to the orbax
  directory. Processes read different shards, so each writes its own; it is written before the orbax
  save starts, so a checkpoint that exists always has its data state.

Saves are asynchronous (the loop continues while arrays are written) and old checkpoints beyond
``max_to_keep`` are deleted. A resume goes through :meth:`Checkpointer.resume_newest`: a checkpoint that
cannot be read (truncated or garbled files) is moved to ``unreadable/<n>`` with the reason, named in one
line, and the next older one is tried, so one damaged save does not stop every later run. Restoring
takes abstract arrays whose ``sharding`` says where each array goes, so a checkpoint written on 8
devices restores on 1 and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

from shelllcc.errors import InputFileError, UserError

DATA_STATE_DIR = "data_state"
UNREADABLE_DIR = "unreadable"
T = TypeVar("T")

# Orbax writes a replicated array "replica-parallel" by default: each of R replicas writes 1/R of it, sliced
# on device by a jitted slice per array, shard and replica. Below a few MB per slice the slicing costs more
# than the parallel write saves (a tiny DiT on 8 CPU devices: 205 slice programs compiled, 10 of the run's
# 28 s); smaller arrays are written whole by one replica, larger ones still in parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 4 << 20


def set_replica_parallel_min_slice_bytes(min_bytes: int) -> bool:
    """Make every orbax save in this process (checkpoints, exported models) split a replicated array across
    its replicas only when each replica's slice has at least ``min_bytes``; False where this orbax has no
    such option (its default, every array split, stays)."""
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store
        from orbax.checkpoint._src.serialization import type_handler_registry

        handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                 min_slice_bytes_for_replica_parallel=int(min_bytes))
        # register_type_handler would log an "overriding" warning to stderr in every process, which
        # breaks the one-line errors of the command line
        type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True,
                                                               ignore_warnings=True)
    except (ImportError, AttributeError, TypeError):
        return False
    return True


set_replica_parallel_min_slice_bytes(REPLICA_PARALLEL_MIN_SLICE_BYTES)


class Checkpointer:
    """``save(step, state_items, rng, data_state, meta)`` / ``restore(step, abstract_items, abstract_rng)``;
    ``meta(step)`` reads a checkpoint's JSON meta without its arrays."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                     enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "orbax"), options=self._options)

    def resume_newest(self, attempt: Callable[[int], T]) -> tuple[int, T] | None:
        """``(step, attempt(step))`` for the newest checkpoint ``attempt`` can read, or None when there is none.

        ``attempt(step)`` reads checkpoint ``step`` (its meta, checks, arrays). A :class:`UserError` from it
        (a refused resume: the config differs) closes this checkpointer and is raised as it is, since an
        older checkpoint differs the same way; any other error counts as an unreadable checkpoint: it is moved aside to
        ``unreadable/<step>`` (with ``reason.txt``; a later save of that step must not be skipped as
        "already saved"), one line names it and the reason, and the next older step is tried. When every
        checkpoint is unreadable an :class:`InputFileError` names the directory.
        """
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, attempt(step)
            except UserError:
                self.close()            # a refused resume ends the run; an older checkpoint differs the same way
                raise
            except Exception as e:           # noqa: BLE001 - orbax raises many kinds for damaged files
                reason = _first_line(e)
                print(f"note: checkpoint {step} in {self.directory} is unreadable ({reason}); moved to "
                      f"{os.path.join(self.directory, UNREADABLE_DIR, str(step))}, trying the one before", flush=True)
                self._quarantine(step, reason)
                skipped.append(step)
        if skipped:
            raise InputFileError(f"no readable checkpoint in {self.directory}: steps {skipped} are unreadable "
                                 f"(moved to {os.path.join(self.directory, UNREADABLE_DIR)}); remove the directory "
                                 "to start over")
        return None

    def _quarantine(self, step: int, reason: str) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        dest = os.path.join(self.directory, UNREADABLE_DIR, str(step))
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.makedirs(dest)
        for src, name in ((os.path.join(self.directory, "orbax", str(step)), "orbax"),
                          (os.path.join(self.directory, DATA_STATE_DIR, str(step)), DATA_STATE_DIR)):
            if os.path.exists(src):
                shutil.move(src, os.path.join(dest, name))
        with open(os.path.join(dest, "reason.txt"), "w") as f:
            f.write(reason + "\n")
        # the manager caches the steps it found; a fresh one sees the directory as it is now
        self._manager = ocp.CheckpointManager(os.path.join(self.directory, "orbax"), options=self._options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _data_path(self, step: int, process: int) -> str:
        return os.path.join(self.directory, DATA_STATE_DIR, str(step), f"process_{process}.json")

    def save(self, step: int, state_items: Any, rng: jax.Array, *, data_state: Any = None,
             meta: dict | None = None, force: bool = False) -> None:
        """Save checkpoint ``step``; a step that is already saved is left as it is.

        A checkpoint at step ``n`` is the run's position after ``n`` updates, and the run resumed from
        it reaches the same state, so a second save at ``n`` (SIGTERM right after resuming from ``n``,
        or the first step of a later phase that starts at ``n``) has nothing to add; orbax would refuse it.
        """
        if step in self._manager.all_steps():
            return
        path = self._data_path(step, jax.process_index())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"data_state": data_state}, f)
        os.replace(path + ".tmp", path)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_items), rng=ocp.args.StandardSave({"key": rng}),
            meta=ocp.args.JsonSave(dict(meta or {}, step=step))), force=force)
        self._prune_data_states()

    def _prune_data_states(self) -> None:
        if jax.process_index() != 0:
            return
        root = os.path.join(self.directory, DATA_STATE_DIR)
        # orbax deletes old steps asynchronously; keep data states of every step it still lists or writes
        keep = {str(s) for s in self._manager.all_steps()}
        latest = self._manager.latest_step()
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if name not in keep and (latest is None or not name.isdigit() or int(name) < latest):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def meta(self, step: int) -> dict:
        """The JSON ``meta`` of checkpoint ``step`` alone: what a caller needs to know before it can build
        the abstract restore target (e.g. which phase of a run, and so which optimizer, the state is of)."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, abstract_items: Any, abstract_rng: Any) -> tuple[Any, jax.Array, Any, dict]:
        """``(state_items, rng, data_state, meta)`` of checkpoint ``step``; arrays placed as the abstract
        targets' shardings say."""
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_items), rng=ocp.args.StandardRestore({"key": abstract_rng}),
            meta=ocp.args.JsonRestore()))
        path = self._data_path(step, jax.process_index())
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {step} in {self.directory!r} has no data iterator state for process "
                                    f"{jax.process_index()} ({path}); was it written with another process count?")
        with open(path) as f:
            data_state = json.load(f)["data_state"]
        return out["state"], out["rng"]["key"], data_state, dict(out["meta"])

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def tree_sha256(tree: Any) -> str:
    """A hash of a pytree's content (paths, dtypes, shapes, values) on this host: a resumed run compares it
    with the one its checkpoint recorded to tell whether a frozen input is the same whatever its path."""
    import numpy as np
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def check_resume_settings(saved: dict | None, current: dict, where: str) -> None:
    """Refuse a resume whose ``current`` settings differ from those its checkpoint ``saved`` (both
    ``{setting: value}``), naming each setting. Settings the checkpoint did not record (an older run's)
    are not compared."""
    from shelllcc.errors import UserError
    if not saved:
        return
    current = json.loads(json.dumps(current))       # tuples as the checkpoint's JSON holds them
    diff = [(k, saved[k], v) for k, v in current.items() if k in saved and saved[k] != v]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
        raise UserError(f"cannot resume from {where}: {shown}. Resume with the settings it was written with, or "
                        "use a new workdir")


class Preempted(Exception):
    """Raised by a training loop after it saved a checkpoint because SIGTERM arrived."""

    exit_code = 128 + signal.SIGTERM


class PreemptionGuard:
    """Turns SIGTERM into a flag the training loop polls between steps.

    With one process the flag is set by a Python signal handler. With several, every process must stop
    at the same step, so the guard installs no handler and asks JAX's distributed runtime instead
    (``multihost_utils.reached_preemption_sync_point``: ``jax.distributed.initialize`` registers a
    SIGTERM notifier and the processes agree on the step). Use as a context manager: the previous
    handler is restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def request(self) -> None:
        """Set the flag as SIGTERM would (tests, or a caller's own stop condition)."""
        self._flag.set()


__all__ = ["Checkpointer", "Preempted", "PreemptionGuard", "DATA_STATE_DIR", "tree_sha256", "check_resume_settings"]
