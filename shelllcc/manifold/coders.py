"""Anchor coders: map a patch ``z [D]`` to a skeleton point ``zhat`` on the anchors' hull.

Amortized LCC (DESIGN 2.1)::

    w_n    = softmax(f(z_n))                 f: Linear -> BatchNorm -> ReLU -> Linear -> ReLU -> Linear
    zhat_n = s * (w_n @ A) + b

Analytic locality-constrained linear coding (DESIGN 2.4), on the data-space anchors
``E = s * A + b`` (so that ``w @ E == s * (w @ A) + b`` whenever ``sum(w) == 1``)::

    B = k nearest rows of E to z
    c = argmin ||z - c B||^2 + lam ||c||^2  s.t. sum(c) = 1
      = normalise(solve((B - z)(B - z)^T + lam I, 1))
    zhat = c B

Matrix products run in ``compute_dtype`` with float32 accumulation; softmax, normalisation and
everything after the products stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shelllcc.manifold.params import BatchNormStats, CoderParams, ManifoldParams


def matmul(x: jax.Array, w: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """``x @ w`` with operands cast to ``compute_dtype``, accumulated and returned in float32.

    Operands already wider than ``compute_dtype`` (float64 under ``jax.enable_x64``) keep their
    precision, so float64 checks of the maths stay float64 throughout.
    """
    wide = jnp.promote_types(x.dtype, w.dtype)
    if jnp.finfo(wide).bits > 32:
        return jnp.matmul(x, w, preferred_element_type=wide)
    return jnp.matmul(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)


def fold_batchnorm(coder: CoderParams, bn: BatchNormStats, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """First layer with eval-mode BatchNorm folded in: ``bn(z W0 + b0) == z W + c``."""
    a = coder.bn_scale * jax.lax.rsqrt(bn.var + eps)
    return coder.w0 * a, (coder.b0 - bn.mean) * a + coder.bn_bias


def coder_logits(coder: CoderParams, bn: BatchNormStats, z: jax.Array, *, train: bool = False,
                 eps: float = 1e-5, compute_dtype=jnp.float32):
    """Logits ``f(z) [N, K]``.

    ``train=False`` normalises with the running statistics (PyTorch eval mode) and returns the logits.
    ``train=True`` normalises with this batch's statistics (biased variance, as PyTorch does in its
    forward) and returns ``(logits, (batch_mean, batch_var_unbiased))`` for the running update.
    """
    if not train:
        return matmul(coder_hidden(coder, bn, z, eps=eps, compute_dtype=compute_dtype), coder.w2,
                      compute_dtype) + coder.b2
    h = matmul(z, coder.w0, compute_dtype) + coder.b0
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    h = (h - mean) * jax.lax.rsqrt(var + eps) * coder.bn_scale + coder.bn_bias
    n = h.shape[0]
    stats = (mean, var * (n / max(n - 1, 1)))
    h = jax.nn.relu(h)
    h = jax.nn.relu(matmul(h, coder.w1, compute_dtype) + coder.b1)
    return matmul(h, coder.w2, compute_dtype) + coder.b2, stats


def coder_hidden(coder: CoderParams, bn: BatchNormStats, z: jax.Array, *, eps: float = 1e-5,
                 compute_dtype=jnp.float32) -> jax.Array:
    """Eval-mode last hidden layer ``[N, H]`` of the coder (the logits are ``hidden @ w2 + b2``)."""
    w0, b0 = fold_batchnorm(coder, bn, eps)
    h = jax.nn.relu(matmul(z, w0, compute_dtype) + b0)
    return jax.nn.relu(matmul(h, coder.w1, compute_dtype) + coder.b1)


def update_batchnorm(bn: BatchNormStats, batch_stats, momentum: float = 0.1) -> BatchNormStats:
    """PyTorch's running update: ``r <- (1 - m) r + m * batch`` (unbiased variance)."""
    mean, var = batch_stats
    return BatchNormStats(mean=(1 - momentum) * bn.mean + momentum * jax.lax.stop_gradient(mean),
                          var=(1 - momentum) * bn.var + momentum * jax.lax.stop_gradient(var),
                          count=bn.count + 1)


def amortized_code(params: ManifoldParams, z: jax.Array, *, eps: float = 1e-5, compute_dtype=jnp.float32
                   ) -> tuple[jax.Array, jax.Array]:
    """Eval-mode coding of ``z [N, D]``: returns ``(weights [N, K], zhat [N, D])``."""
    logits = coder_logits(params.coder, params.bn, z, eps=eps, compute_dtype=compute_dtype)
    w = jax.nn.softmax(logits, axis=-1)
    zhat = params.scale * matmul(w, params.anchors, compute_dtype) + params.shift
    return w, zhat


def squared_distances(z: jax.Array, anchors: jax.Array, compute_dtype=jnp.float32) -> jax.Array:
    """``||z_n - A_k||^2 [N, K]`` as ``||z||^2 + ||A||^2 - 2 z.A``, clamped at 0 (no N x K x D tensor)."""
    zz = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    aa = jnp.sum(jnp.square(anchors), axis=-1)
    return jnp.maximum(zz + aa - 2.0 * matmul(z, anchors.T, compute_dtype), 0.0)


def data_space_anchors(params: ManifoldParams) -> jax.Array:
    """``E = s * A + b``: the anchors in latent coordinates."""
    return params.scale * params.anchors + params.shift


def analytic_code(anchors: jax.Array, z: jax.Array, *, num_neighbors: int = 5, lam: float = 1e-4,
                  compute_dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Locality-constrained linear coding of ``z [N, D]`` on ``anchors [K, D]``.

    Returns ``(indices [N, k], coefficients [N, k], zhat [N, D])`` with ``sum(coefficients) == 1``.
    Differentiable in ``z`` and ``anchors`` (the neighbour choice is piecewise constant).
    """
    k_total = anchors.shape[0]
    if not 1 <= num_neighbors <= k_total:
        raise ValueError(f"num_neighbors={num_neighbors} must be in [1, number of anchors={k_total}]")
    d2 = squared_distances(z, anchors, compute_dtype)
    _, idx = jax.lax.top_k(-d2, num_neighbors)
    b = anchors[idx]                                   # [N, k, D]
    diff = b - z[:, None, :]
    gram = jnp.einsum("nkd,njd->nkj", diff, diff)
    gram = gram + lam * jnp.eye(num_neighbors, dtype=gram.dtype)
    c = jnp.linalg.solve(gram, jnp.ones(gram.shape[:2] + (1,), gram.dtype))[..., 0]
    c = c / jnp.sum(c, axis=-1, keepdims=True)
    zhat = jnp.einsum("nk,nkd->nd", c, b)
    return idx, c, zhat
