"""The generic train step: loss -> gradients (optionally accumulated over microbatches) -> guarded
update, jitted with in/out shardings and the state donated.

    step = make_train_step(loss_fn, optimizer, schedule, microbatches)     # (state, batch, rng) -> ...
    step = jit_train_step(step, state_shardings, mesh)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from shelllcc import parallel
from shelllcc.training import train_state as ts

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def _split_microbatches(batch: dict, k: int) -> dict:
    # microbatch i takes rows i, i + k, i + 2k, ...: each device's rows stay on that device
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer, schedule, microbatches: int = 1, prepare_batch=None):
    """``(state, batch, rng) -> (state, metrics)`` from ``loss_fn(params, frozen, batch, key) -> (loss, metrics)``.

    The step's key is ``fold_in(rng, state.step)`` (the same on every device and on resume).
    ``microbatches = k > 1`` accumulates gradients over ``k`` slices of the batch in a ``lax.scan``
    (loss, gradient and metrics are their means), then makes one update. ``prepare_batch(batch, frozen)
    -> batch`` runs on the whole global batch before the split: what a loss normalises over the batch
    (Flow-RWR's weights) is then the same with or without microbatches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: ts.TrainState, batch: dict, rng: jax.Array):
        key = jax.random.fold_in(rng, state.step)
        if prepare_batch is not None:
            batch = prepare_batch(batch, state.frozen)
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(state.params, state.frozen, batch, key)
        else:
            micro = _split_microbatches(batch, microbatches)

            def body(xs):
                i, mb = xs
                (l, m), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(key, i))
                return l, m, g

            shapes = jax.eval_shape(lambda: grad_fn(state.params, state.frozen,
                                                    jax.tree.map(lambda x: x[0], micro), key))
            (l_s, m_s), g_s = shapes
            # accumulate in float32 whatever the parameter dtype; cast back after averaging
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (l_s, m_s, g_s))
            (loss, metrics, grads), _ = jax.lax.scan(
                lambda acc, xs: (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, body(xs)), None),
                zeros, (jnp.arange(microbatches), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, (loss, metrics, grads))
            grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, g_s)
        new_state, opt_metrics = ts.apply_gradients(state, grads, loss, optimizer, schedule)
        return new_state, {**metrics, **opt_metrics}

    return step


def jit_train_step(step_fn, state_shardings_tree, mesh):
    """``jax.jit`` with in/out shardings and the state donated; traced and run under ``parallel.set_mesh(mesh)``
    so that layers can constrain activations to the mesh's axes."""
    rep = parallel.replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings_tree, parallel.batch_sharding(mesh), rep),
                     out_shardings=(state_shardings_tree, rep), donate_argnums=0)

    def step(state, batch, rng):
        with parallel.set_mesh(mesh):
            return jitted(state, batch, rng)

    step.jitted = jitted
    return step


def train_state_shardings(params_shardings, opt_shardings, frozen_shardings, mesh) -> ts.TrainState:
    """The ``TrainState`` of shardings: ``opt_shardings`` from ``parallel.optimizer_shardings`` (Adam's
    moments sharded like their parameters), step counters replicated."""
    rep = parallel.replicated(mesh)
    return ts.TrainState(step=rep, skipped=rep, params=params_shardings, opt_state=opt_shardings,
                         frozen=frozen_shardings)


def microbatch_count(batch_size: int, microbatch_size: int, mesh) -> int:
    """Number of sequential microbatches: ``batch / (microbatch_size * batch shards)`` (1 when 0)."""
    shards = parallel.num_batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by the {shards} batch shards of the "
                         f"mesh {dict(mesh.shape)}")
    if not microbatch_size:
        return 1
    per_step = microbatch_size * shards
    if batch_size % per_step:
        raise ValueError(f"data.batch_size={batch_size} is not a multiple of train.microbatch_size="
                         f"{microbatch_size} x {shards} batch shards")
    return batch_size // per_step
