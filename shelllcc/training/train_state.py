"""The train state every experiment's step maps to its successor, and the guarded optimizer update."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """``step``: updates attempted (int32); ``params``: the trained parameters (nested dicts);
    ``opt_state``: optax state of ``params``; ``skipped``: updates skipped because the loss or the
    gradient was not finite (int32); ``frozen``: everything the step reads but never changes
    (base weights under LoRA, a reference model, the manifold).

    ``frozen`` is not written to checkpoints (see :func:`checkpoint_items`): it is rebuilt from its
    source on resume, so a 14B base under LoRA is never copied into every checkpoint.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array
    frozen: Any = None


def create(params: Any, optimizer: optax.GradientTransformation, frozen: Any = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      skipped=jnp.zeros((), jnp.int32), frozen=frozen)


def checkpoint_items(state: TrainState) -> dict:
    """What a checkpoint holds of the state: all of it but ``frozen``."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "skipped": state.skipped}


def from_checkpoint_items(items: dict, frozen: Any = None) -> TrainState:
    return TrainState(step=items["step"], params=items["params"], opt_state=items["opt_state"],
                      skipped=items["skipped"], frozen=frozen)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array] | None = None) -> tuple[TrainState, dict]:
    """One optimizer update, skipped when the loss or the gradient is not finite.

    ::

        ok      = isfinite(loss) and isfinite(||g||_2)
        params' = params + update(g)   if ok else params      (likewise the optimizer state)
        skipped' = skipped + (not ok);  step' = step + 1

    Returns the new state and metrics ``grad_norm`` (before clipping), ``skipped`` (running count),
    ``update_norm`` and, with ``schedule``, ``learning_rate``.
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # zeroed before the optimizer sees them: the update is discarded anyway, and this keeps every
    # intermediate finite (no NaN reaches a debug-nans check or the selected-away branch)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, opt_state = optimizer.update(safe, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"grad_norm": grad_norm, "skipped": new.skipped.astype(jnp.float32),
               "update_norm": jnp.where(ok, optax.tree.norm(updates), 0.0)}
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new, metrics


__all__ = ["TrainState", "create", "apply_gradients", "checkpoint_items", "from_checkpoint_items"]
