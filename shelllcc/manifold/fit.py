"""Two-stage manifold fitting on the shared training stack (``shelllcc.training``).

Stage 1 trains anchors, coder, scale and shift on the stage-1 loss (BatchNorm running statistics
updated alongside); stage 2 trains the shell head alone, from a calibrated shell
(:func:`start_stage2`). Each step is a pure function ``(state, patches) -> (state, metrics)`` on the
shared :class:`~shelllcc.training.train_state.TrainState` whose ``params`` are the whole
:class:`ManifoldParams`, and its update is the shared
:func:`~shelllcc.training.train_state.apply_gradients`: a step whose loss or gradient norm is not
finite has its gradient zeroed, leaves parameters, BatchNorm statistics and optimizer state as they
were, and is counted in ``state.skipped``.

The two stages are **two optimizers**, one per stage, each built by the shared
:func:`~shelllcc.training.optimizers.make_optimizer` (global-norm clip, then AdamW on a warmup +
cosine schedule) and applied to its stage's parameter groups only (:func:`restrict`), rather than one
``optax.multi_transform`` over both stages. Why:

* the stages run one after the other, not side by side. Stage 2 starts from a recalibrated shell
  with a fresh optimizer whose schedule (warmup included) counts from stage 2's first step. A single
  ``multi_transform`` would carry both AdamW states through the whole fit and need a gate on the
  step: without one, stage 2's warmup would elapse during stage 1, and stage 1's AdamW would keep
  moving the anchors during stage 2 (with zero gradients Adam still steps by ``m / sqrt(v)``);
* the stages have different losses, hence different jitted steps, anyway, and each stage's config
  section (``stage1`` / ``stage2``) maps to one optimizer config;
* the optimizer state holds the moments of the stage's own parameters only (keyed like
  :func:`trainable`), so a checkpoint's ``opt_state`` is that of the stage it was written in; the
  checkpoint's meta names the stage, which picks the optimizer whose state structure is restored.

Which groups each stage trains (:data:`STAGE_GROUPS`)::

    stage 1: anchors, scale, shift, coder     (+ bn: running statistics, set by the step, not the optimizer)
    stage 2: shell
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from shelllcc import parallel
from shelllcc.manifold import coders
from shelllcc.manifold.init import calibrate_shell
from shelllcc.manifold.losses import Stage1Weights, stage1_loss, stage2_loss
from shelllcc.manifold.params import ManifoldConfig, ManifoldParams
from shelllcc.training import optimizers
from shelllcc.training import train_state as ts

STAGE_GROUPS = {1: ("anchors", "scale", "shift", "coder"), 2: ("shell",)}


@dataclasses.dataclass(frozen=True)
class OptimConfig(optimizers.OptimizerConfig):
    """The shared optimizer config with the manifold fit's defaults: warmup then cosine decay to
    ``end_lr_fraction`` (0.1) of the peak, and decoupled weight decay on every trained parameter
    (``decay_vectors``: anchors ``[K, D]``, ``scale []`` and ``shift [D]`` alike, as the fit always did)."""

    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    end_lr_fraction: float = 0.1
    decay_vectors: bool = True


def stage_optim_config(section: Any) -> OptimConfig:
    """The optimizer of a ``stage1`` / ``stage2`` config section (``steps``, ``learning_rate``,
    ``warmup_steps``, ``weight_decay``, ``grad_clip``); the schedule spans the stage's steps."""
    return OptimConfig(learning_rate=section.learning_rate, warmup_steps=section.warmup_steps,
                       total_steps=max(int(section.steps), 1), weight_decay=section.weight_decay,
                       grad_clip=section.grad_clip)


def make_optimizer(cfg: optimizers.OptimizerConfig) -> optax.GradientTransformation:
    """The shared ``clip -> AdamW(schedule)`` for one stage's parameter groups (see :func:`restrict`)."""
    return optimizers.make_optimizer(cfg)


def trainable(params: ManifoldParams, stage: int) -> dict:
    """The groups stage ``stage`` trains, as a dict ``{group name: subtree}``."""
    return {name: getattr(params, name) for name in STAGE_GROUPS[stage]}


def restrict(optimizer: optax.GradientTransformation, stage: int) -> optax.GradientTransformation:
    """``optimizer`` applied to the stage's groups of a :class:`ManifoldParams` tree, zero update elsewhere.

    Its state is ``optimizer``'s state of :func:`trainable` (the stage's groups as a dict), so it holds
    moments of the trained parameters only; clipping sees the stage's gradients only.
    """
    def init(params):
        return optimizer.init(trainable(params, stage))

    def update(updates, state, params=None):
        sub, state = optimizer.update(trainable(updates, stage), state,
                                      None if params is None else trainable(params, stage))
        return jax.tree.map(jnp.zeros_like, updates).replace(**sub), state

    return optax.GradientTransformation(init, update)


def init_state(params: ManifoldParams, optimizer: optax.GradientTransformation, stage: int) -> ts.TrainState:
    """A fresh train state (step 0) for stage ``stage`` with ``optimizer`` on that stage's groups."""
    return ts.create(params, restrict(optimizer, stage))


def _full_grads(params: ManifoldParams, grads: dict) -> ManifoldParams:
    # zero gradient for the groups the stage does not train, so the shared update sees one tree
    return jax.tree.map(jnp.zeros_like, params).replace(**grads)


def stage1_step(state: ts.TrainState, patches: jax.Array, *, optimizer, weights: Stage1Weights = Stage1Weights(),
                config: ManifoldConfig, compute_dtype=jnp.float32, schedule=None):
    """One stage-1 update on ``patches [N, D]``; the BatchNorm running statistics move with it
    (and stay when the update is skipped). ``schedule(state.step)`` is reported as ``learning_rate``."""
    params = state.params

    def loss_fn(t):
        return stage1_loss(params.replace(**t), patches, weights, bn_eps=config.bn_eps, compute_dtype=compute_dtype)

    (loss, (metrics, bn_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable(params, 1))
    new, opt_metrics = ts.apply_gradients(state, _full_grads(params, grads), loss, restrict(optimizer, 1), schedule)
    ok = new.skipped == state.skipped
    bn = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                      coders.update_batchnorm(params.bn, bn_stats, config.bn_momentum), params.bn)
    return new.replace(params=new.params.replace(bn=bn)), {**metrics, **opt_metrics, "stage": jnp.float32(1)}


def stage2_step(state: ts.TrainState, patches: jax.Array, *, optimizer, config: ManifoldConfig,
                logvar_weight: float = 0.01, compute_dtype=jnp.float32, schedule=None):
    """One stage-2 (shell head) update on ``patches [N, D]``."""
    params = state.params

    def loss_fn(t):
        return stage2_loss(params.replace(**t), patches, logvar_weight=logvar_weight, bn_eps=config.bn_eps,
                           shell_eps=config.shell_eps, compute_dtype=compute_dtype)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable(params, 2))
    new, opt_metrics = ts.apply_gradients(state, _full_grads(params, grads), loss, restrict(optimizer, 2), schedule)
    return new, {**metrics, **opt_metrics, "stage": jnp.float32(2)}


def start_stage2(state: ts.TrainState, optimizer: optax.GradientTransformation, patches: np.ndarray,
                 config: ManifoldConfig, mesh: Mesh | None = None) -> ts.TrainState:
    """The state stage 2 starts from: the final stage-1 manifold with its shell calibrated on
    ``patches`` (:func:`~shelllcc.manifold.init.calibrate_shell`) and a fresh stage-2 optimizer state.

    ``step`` and ``skipped`` carry on (they count the whole fit). Computed on the host copy of the
    parameters, then replicated over ``mesh``, so it is the same on any mesh.
    """
    params = calibrate_shell(jax.device_get(state.params), patches, config.bn_eps)
    new = ts.TrainState(step=jnp.asarray(jax.device_get(state.step)), params=params,
                        opt_state=restrict(optimizer, 2).init(params),
                        skipped=jnp.asarray(jax.device_get(state.skipped)), frozen=None)
    return parallel.replicate_tree(new, mesh) if mesh is not None else new


def jit_step(step_fn: Callable, mesh: Mesh | None) -> Callable:
    """``jax.jit`` a step: state replicated and donated, patches split over the mesh's batch axes.

    Under the mesh the batch statistics of BatchNorm and every mean in the losses are global, so
    the sharded step computes the same function as the single-device one.
    """
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    rep = parallel.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep),
                   donate_argnums=0)
