"""The training loop shared by the experiments: steps, metrics, progress, checkpoints, SIGTERM.

Each experiment builds its own pure step ``(state, batch, rng) -> (state, metrics)`` (jitted, sharded,
state donated), its initial or restored state and a batch iterator; :func:`train` runs it::

    for step in range(start, total):
        stop on SIGTERM (save first)
        state, metrics = step_fn(state, next(batches), rng)    # dispatched, not waited for
        every log_every steps: fetch the buffered metrics once, write means + steps/s + ETA
        every log_every steps: fail (TrainingFailed) if the loss exploded or most steps were skipped
        every checkpoint_every steps: save asynchronously (params, optimizer, step, rng, data state)
        every eval_every steps (and at the last step): on_eval(step, state)   (blocks: it reads the state)
    final save

Metrics stay on the device between log points: the loop keeps the per-step metric dicts (small device
arrays) and fetches them together, so the host never waits on the device in between.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from shelllcc.errors import TrainingFailed
from shelllcc.training import train_state as ts
from shelllcc.training.checkpoints import Checkpointer, Preempted, PreemptionGuard

# metrics that are running values (reported as their latest value, not averaged over the interval);
# samples_drawn: grpo's cumulative rollouts
LATEST_VALUE_METRICS = ("skipped", "learning_rate", "samples_drawn")


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0              # 0: no evaluation during training
    # steps a later phase of the same run takes after total_steps (another train() call, e.g. stage 2
    # of the manifold fit): counted in the ETA, so eta_s is to the end of the run, not of this phase
    later_steps: int = 0
    # a run whose logged loss grows past divergence_factor x max(|first logged loss|, 1) has diverged (0: never)
    divergence_factor: float = 1e6
    # a run that skipped more than this fraction of its steps (non-finite loss or gradient) has failed;
    # judged once min(MIN_STEPS_JUDGED, steps to run) steps ran, and at the end
    max_skipped_fraction: float = 0.5


MIN_STEPS_JUDGED = 20


def _check_health(summary: dict, settings: LoopSettings, first_loss: float | None, done: int, start: int,
                  skipped_at_start: float) -> None:
    """Raise :class:`TrainingFailed` when the run went wrong in a way that exits 0 otherwise: a skipped step
    leaves the parameters as they were, so a run skipping every step "finishes" with its initial state."""
    ran = done - start
    skipped = summary.get("skipped", skipped_at_start) - skipped_at_start
    if ran >= min(MIN_STEPS_JUDGED, settings.total_steps - start) and skipped > settings.max_skipped_fraction * ran:
        raise TrainingFailed(f"{int(skipped)} of the {ran} steps up to step {done} had a non-finite loss or "
                             f"gradient and were skipped; stopped without a final save")
    loss = summary.get("loss")
    if settings.divergence_factor and first_loss is not None and loss is not None and np.isfinite(loss):
        limit = settings.divergence_factor * max(abs(first_loss), 1.0)
        if abs(loss) > limit:
            raise TrainingFailed(f"diverged: loss {loss:.4g} at step {done} (first logged {first_loss:.4g}, limit "
                                 f"{limit:.4g}); lower the learning rate. Stopped without a final save")


def _summarise(fetched: list[dict]) -> dict[str, float]:
    out = {}
    for k in fetched[0]:
        values = np.asarray([np.asarray(m[k], np.float64) for m in fetched])
        out[k] = float(values[-1]) if k in LATEST_VALUE_METRICS else float(np.mean(values))
    return out


def train(step_fn: Callable, state: ts.TrainState, rng: jax.Array, batches: Iterator[Any], *,
          settings: LoopSettings, checkpointer: Checkpointer | None, writer: Any,
          guard: PreemptionGuard | None = None, data_state: Callable[[], Any] | None = None,
          meta: dict | None = None, start_step: int | None = None,
          on_eval: Callable[[int, ts.TrainState], None] | None = None) -> ts.TrainState:
    """Run ``step_fn`` from the state's step to ``settings.total_steps``; returns the final state.

    ``data_state()`` gives the batch iterator's state after the batches consumed so far (saved with
    every checkpoint). On SIGTERM (``guard``) the loop saves a checkpoint at the current step, waits
    for it and raises :class:`Preempted`. A run that diverged or skipped most of its steps raises
    :class:`~shelllcc.errors.TrainingFailed` at a log point, before any final save. ``on_eval(step, state)``
    runs every ``settings.eval_every`` steps and after the last one, with the state after ``step`` updates
    (e.g. validation sampling).
    """
    total = settings.total_steps
    start = int(jax.device_get(state.step)) if start_step is None else start_step

    def save(step: int, force: bool = False) -> None:
        if checkpointer is None:
            return
        checkpointer.save(step, ts.checkpoint_items(state), rng,
                          data_state=data_state() if data_state is not None else None, meta=meta, force=force)

    pending: list[dict] = []
    t_mark, s_mark = time.perf_counter(), start
    skipped_at_start = float(jax.device_get(state.skipped))
    first_loss = None
    for step in range(start, total):
        if guard is not None and guard.should_stop(step):
            save(step, force=True)
            if checkpointer is not None:
                checkpointer.wait_until_finished()
            writer.write_texts(step, {"preempted": f"SIGTERM: saved a checkpoint at step {step}, exiting"})
            writer.flush()
            raise Preempted(f"stopped by SIGTERM at step {step} (checkpoint saved)")
        batch = next(batches)
        state, metrics = step_fn(state, batch, rng)
        pending.append(metrics)
        done = step + 1
        if step == start:
            # the only extra wait of the run: report how long compilation + the first step took
            jax.block_until_ready(metrics)
            writer.write_texts(done, {"first_step": f"compiled and ran the first step in "
                                                    f"{time.perf_counter() - t_mark:.1f}s"})
            t_mark, s_mark = time.perf_counter(), done
            pending = [metrics]
        if done % settings.log_every == 0 or done == total:
            summary = _summarise(jax.device_get(pending))
            pending = []
            now = time.perf_counter()
            if done > s_mark:
                rate = (done - s_mark) / max(now - t_mark, 1e-9)
                summary.update(steps_per_s=rate, eta_s=(total - done + settings.later_steps) / max(rate, 1e-9))
            t_mark, s_mark = now, done
            writer.write_scalars(done, summary)
            _check_health(summary, settings, first_loss, done, start, skipped_at_start)
            if first_loss is None and np.isfinite(summary.get("loss", np.nan)):
                first_loss = summary["loss"]
        if on_eval is not None and settings.eval_every and (done % settings.eval_every == 0 or done == total):
            on_eval(done, state)
        if checkpointer is not None and done % settings.checkpoint_every == 0 and done < total:
            save(done)
    if checkpointer is not None and total > start:
        save(total, force=True)
        checkpointer.wait_until_finished()
    writer.flush()
    return state


__all__ = ["LoopSettings", "train", "LATEST_VALUE_METRICS"]
