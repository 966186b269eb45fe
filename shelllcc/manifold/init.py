"""Anchors from data: random patches, k-means++ seeding, Lloyd k-means; and a fresh manifold around them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from shelllcc.manifold import coders
from shelllcc.manifold.params import ManifoldConfig, ManifoldParams, init_params
from shelllcc.manifold.shell import safe_norm

ANCHOR_INITS = ("random", "kmeans++", "kmeans")


def _check_patches(patches: jax.Array, k: int) -> None:
    if patches.ndim != 2:
        raise ValueError(f"patches must be [N, D], got shape {tuple(patches.shape)}")
    if patches.shape[0] < k:
        raise ValueError(f"need at least {k} patches to choose {k} anchors, got {patches.shape[0]}")


def random_anchors(key: jax.Array, patches: jax.Array, k: int) -> jax.Array:
    """``k`` distinct rows of ``patches`` chosen uniformly."""
    _check_patches(patches, k)
    idx = jax.random.choice(key, patches.shape[0], (k,), replace=False)
    return patches[idx]


@functools.partial(jax.jit, static_argnums=2)
def _kmeans_pp(key, x, k):
    n = x.shape[0]
    key, sub = jax.random.split(key)
    first = x[jax.random.randint(sub, (), 0, n)]
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum(jnp.square(x - first), axis=-1)

    def body(i, carry):
        centers, d2, key = carry
        key, sub = jax.random.split(key)
        # Sample proportionally to the squared distance to the nearest chosen center.
        idx = jax.random.categorical(sub, jnp.log(jnp.maximum(d2, 1e-30)))
        c = x[idx]
        return centers.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1)), key

    centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, key))
    return centers


def kmeans_plus_plus(key: jax.Array, patches: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii): each new center drawn with probability ~ d^2."""
    _check_patches(patches, k)
    return _kmeans_pp(key, jnp.asarray(patches, jnp.float32), k)


def nearest_anchor(x: jax.Array, centers: jax.Array, chunk_size: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Index ``[N]`` and squared distance ``[N]`` of each row's nearest center, chunked over rows."""
    n = x.shape[0]
    n_chunks = -(-n // chunk_size)
    xs = jnp.pad(x, ((0, n_chunks * chunk_size - n), (0, 0))).reshape(n_chunks, chunk_size, -1)

    def one(xc):
        d2 = coders.squared_distances(xc, centers)
        return jnp.argmin(d2, axis=-1), jnp.min(d2, axis=-1)

    idx, d2 = jax.lax.map(one, xs)
    return idx.reshape(-1)[:n], d2.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("iters", "chunk_size"))
def _lloyd(x, centers, iters, chunk_size):
    k = centers.shape[0]

    def body(_, centers):
        idx, _ = nearest_anchor(x, centers, chunk_size)
        sums = jax.ops.segment_sum(x, idx, k)
        counts = jax.ops.segment_sum(jnp.ones((x.shape[0],), x.dtype), idx, k)
        # An empty cluster keeps its center rather than collapsing to the origin.
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)

    return jax.lax.fori_loop(0, iters, body, centers)


def kmeans(key: jax.Array, patches: jax.Array, k: int, iters: int = 10, chunk_size: int = 8192) -> jax.Array:
    """Lloyd's k-means from a k-means++ seeding; returns centers ``[k, D]``."""
    x = jnp.asarray(patches, jnp.float32)
    return _lloyd(x, kmeans_plus_plus(key, x, k), iters, chunk_size)


def init_anchors(key: jax.Array, patches: jax.Array, k: int, method: str = "random", kmeans_iters: int = 10
                 ) -> jax.Array:
    if method == "random":
        return random_anchors(key, jnp.asarray(patches, jnp.float32), k)
    if method == "kmeans++":
        return kmeans_plus_plus(key, patches, k)
    if method == "kmeans":
        return kmeans(key, patches, k, kmeans_iters)
    raise ValueError(f"unknown anchor init {method!r}; expected one of {ANCHOR_INITS}")


def init_manifold(key: jax.Array, config: ManifoldConfig, patches: jax.Array, anchor_init: str = "random",
                  kmeans_iters: int = 10) -> ManifoldParams:
    """A fresh manifold whose anchors come from ``patches [N, D]``."""
    patches = jnp.asarray(patches, jnp.float32)
    if patches.ndim != 2 or patches.shape[1] != config.dim:
        raise ValueError(f"patches have shape {tuple(patches.shape)}; config expects [N, dim={config.dim}]")
    k_anchor, k_params = jax.random.split(key)
    anchors = init_anchors(k_anchor, patches, config.num_anchors, anchor_init, kmeans_iters)
    return init_params(k_params, config, anchors)


def calibrate_shell(params: ManifoldParams, patches: jax.Array, bn_eps: float = 1e-5) -> ManifoldParams:
    """Start stage 2 with ``exp(lv) ~ mean ||z - zhat||`` so that ``||delta|| ~ 1`` from the first step."""
    _, zhat = coders.amortized_code(params, jnp.asarray(patches, jnp.float32), eps=bn_eps)
    r = jnp.mean(safe_norm(patches - zhat))
    return params.replace(shell=params.shell.replace(b1=jnp.full_like(params.shell.b1, jnp.log(r + 1e-12))))
