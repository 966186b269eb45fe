"""Two-stage manifold fitting as jitted, data-parallel train steps.

Stage 1 trains anchors, coder, scale and shift on the stage-1 loss (BatchNorm running statistics
updated alongside); stage 2 trains the shell head alone. Each step is a pure function
``(state, patches) -> (state, metrics)``; a step whose loss or gradient norm is not finite leaves the
state unchanged and is counted in ``state.skipped``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from shelllcc import parallel
from shelllcc.manifold import coders
from shelllcc.manifold.losses import Stage1Weights, stage1_loss, stage2_loss
from shelllcc.manifold.params import ManifoldConfig, ManifoldParams


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    end_lr_fraction: float = 0.1


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=max(cfg.warmup_steps, 1),
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


@struct.dataclass
class FitState:
    step: jax.Array
    params: ManifoldParams
    opt_state: Any
    skipped: jax.Array


def stage1_trainable(params: ManifoldParams) -> dict:
    return dict(anchors=params.anchors, scale=params.scale, shift=params.shift, coder=params.coder)


def stage2_trainable(params: ManifoldParams) -> Any:
    return params.shell


def _with_stage1(params: ManifoldParams, t: dict) -> ManifoldParams:
    return params.replace(anchors=t["anchors"], scale=t["scale"], shift=t["shift"], coder=t["coder"])


def _with_stage2(params: ManifoldParams, shell) -> ManifoldParams:
    return params.replace(shell=shell)


def init_state(params: ManifoldParams, optimizer: optax.GradientTransformation, stage: int) -> FitState:
    trainable = stage1_trainable(params) if stage == 1 else stage2_trainable(params)
    return FitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable),
                    skipped=jnp.zeros((), jnp.int32))


def _apply(state: FitState, optimizer, trainable, grads, new_params_fn, loss, metrics, extra_params=None):
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    params = new_params_fn(optax.apply_updates(trainable, updates))
    if extra_params is not None:
        params = extra_params(params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = FitState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), skipped=state.skipped + (~ok).astype(jnp.int32))
    return new_state, dict(metrics, grad_norm=gnorm, skipped=new_state.skipped.astype(jnp.float32))


def stage1_step(state: FitState, patches: jax.Array, *, optimizer, weights: Stage1Weights = Stage1Weights(),
                config: ManifoldConfig, compute_dtype=jnp.float32):
    """One stage-1 update on ``patches [N, D]``."""
    trainable = stage1_trainable(state.params)

    def loss_fn(t):
        return stage1_loss(_with_stage1(state.params, t), patches, weights, bn_eps=config.bn_eps,
                           compute_dtype=compute_dtype)

    (loss, (metrics, bn_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    new_bn = coders.update_batchnorm(state.params.bn, bn_stats, config.bn_momentum)
    return _apply(state, optimizer, trainable, grads, functools.partial(_with_stage1, state.params), loss, metrics,
                  extra_params=lambda p: p.replace(bn=new_bn))


def stage2_step(state: FitState, patches: jax.Array, *, optimizer, config: ManifoldConfig,
                logvar_weight: float = 0.01, compute_dtype=jnp.float32):
    """One stage-2 (shell head) update on ``patches [N, D]``."""
    trainable = stage2_trainable(state.params)

    def loss_fn(shell):
        return stage2_loss(_with_stage2(state.params, shell), patches, logvar_weight=logvar_weight,
                           bn_eps=config.bn_eps, shell_eps=config.shell_eps, compute_dtype=compute_dtype)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return _apply(state, optimizer, trainable, grads, functools.partial(_with_stage2, state.params), loss, metrics)


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
