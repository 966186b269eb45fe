"""Manifold-fitting losses (DESIGN 2.1, 2.2). Pure functions of (parameters, patches ``z [N, D]``).

Stage 1 (anchors, coder, scale, shift; coder BatchNorm in training mode)::

    w_n    = softmax(f(z_n)),  zhat_n = s * (w_n @ A) + b
    l_rec  = mean_{n,d} (zhat_n - z_n)^2
    l_loc  = mean_n sum_k w_nk ||z_n - A_k||^2
    l_use  = KL(mean_n w_n || uniform_K) = sum_k p_k log(K p_k),  p = mean_n w_n
    l_b2p  = mean_k min_n ||A_k - z_n||^2         (nearest patch of the batch)
    loss   = l_rec + lambda_locality l_loc + lambda_usage l_use + lambda_basis_to_patch l_b2p

Stage 2 (shell head only; stage-1 parameters frozen, BatchNorm in eval mode)::

    lv_n    = g(zhat_n),  delta_n = (z_n - zhat_n) / (exp(lv_n) + eps)
    l_shell = mean_n (||delta_n|| - 1)^2 + lambda_logvar mean_{n,d} lv_nd^2      (lambda_logvar = 0.01)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from shelllcc.manifold import coders
from shelllcc.manifold.params import ManifoldParams
from shelllcc.manifold.shell import safe_norm, shell_log_variance, shell_residual


@dataclasses.dataclass(frozen=True)
class Stage1Weights:
    locality: float = 0.1
    usage: float = 0.1
    basis_to_patch: float = 0.1


def stage1_loss(params: ManifoldParams, z: jax.Array, weights: Stage1Weights = Stage1Weights(), *,
                bn_eps: float = 1e-5, compute_dtype=jnp.float32):
    """Stage-1 loss of a batch of patches; returns ``(loss, (metrics, batchnorm_batch_stats))``.

    The ``N x K`` distance matrix of the batch is formed (training batches are bounded by the
    config); the ``N x K x D`` difference tensor never is.
    """
    logits, bn_stats = coders.coder_logits(params.coder, params.bn, z, train=True, eps=bn_eps,
                                           compute_dtype=compute_dtype)
    w = jax.nn.softmax(logits, axis=-1)
    zhat = params.scale * coders.matmul(w, params.anchors, compute_dtype) + params.shift
    l_rec = jnp.mean(jnp.square(zhat - z))
    d2 = coders.squared_distances(z, params.anchors, compute_dtype)
    l_loc = jnp.mean(jnp.sum(w * d2, axis=-1))
    usage = jnp.mean(w, axis=0)
    k = usage.shape[0]
    l_use = jnp.sum(usage * (jnp.log(jnp.maximum(usage, 1e-12)) + jnp.log(k)))
    l_b2p = jnp.mean(jnp.min(d2, axis=0))
    loss = l_rec + weights.locality * l_loc + weights.usage * l_use + weights.basis_to_patch * l_b2p
    # Anchors that carry < 1/(10K) of the batch's weight: a sign of collapse.
    dead = jnp.mean((usage < 0.1 / k).astype(jnp.float32))
    metrics = dict(loss=loss, rec=l_rec, locality=l_loc, usage_kl=l_use, basis_to_patch=l_b2p,
                   dead_anchor_frac=dead, lcc=jnp.mean(jnp.sum(jnp.square(zhat - z), axis=-1)))
    return loss, (metrics, bn_stats)


def stage2_loss(params: ManifoldParams, z: jax.Array, *, logvar_weight: float = 0.01, bn_eps: float = 1e-5,
                shell_eps: float = 1e-6, compute_dtype=jnp.float32):
    """Stage-2 shell loss of a batch; returns ``(loss, metrics)``. Differentiate w.r.t. ``params.shell``."""
    _, zhat = coders.amortized_code(params, z, eps=bn_eps, compute_dtype=compute_dtype)
    zhat = jax.lax.stop_gradient(zhat)
    lv = shell_log_variance(params.shell, zhat, compute_dtype)
    norm = safe_norm(shell_residual(z, zhat, lv, shell_eps))
    l_shell = jnp.mean(jnp.square(norm - 1.0))
    l_lv = jnp.mean(jnp.square(lv))
    loss = l_shell + logvar_weight * l_lv
    metrics = dict(loss=loss, shell=l_shell, logvar_sq=l_lv, delta_norm_mean=jnp.mean(norm),
                   delta_norm_std=jnp.std(norm), log_var_mean=jnp.mean(lv))
    return loss, metrics
