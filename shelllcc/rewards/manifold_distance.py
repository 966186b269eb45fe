"""Manifold distances (DESIGN 2.3); the generator minimises them, the reward is their negative.

With ``zhat_n`` the skeleton point of patch ``z_n`` and ``delta_n`` its shell residual::

    lcc        = mean_n ||z_n - zhat_n||^2
    shell_norm = mean_n ||delta_n||             (the reference implementation's reward)
    shell      = mean_n | ||delta_n|| - 1 |     (distance to the shell surface itself)
    shell_band = | mean_n ||delta_n|| - tau |   (tau: ``target``, taken from a good checkpoint)

``region_distances`` gives the same distances per region of the latent grid (a training-free patch reward).

Two implementations (``implementation``):

* ``fused`` (default): each patch's value and its gradient w.r.t. the patch are computed in one pass
  over the anchors, chunk by chunk of ``chunk_size`` rows (``shelllcc.rewards.fused_values``); the
  backward pass only scales the stored ``[N, D]`` gradients. No ``N x K`` array outlives its chunk,
  and with ``kernel='pallas'`` (the default on a GPU) none is written to device memory at all.
* ``remat``: the chunked ``lax.scan`` whose body is rematerialised (the backward recomputes each
  chunk's forward). Kept as the plain-autodiff reference.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shelllcc.manifold.params import ManifoldParams
from shelllcc.manifold.patches import check_latents, patchify
from shelllcc.manifold.softmax_code_pallas import Blocks
from shelllcc.parallel import mesh_platform
from shelllcc.rewards import fused_values as pv

KINDS = ("lcc", "shell_norm", "shell", "shell_band")
CODERS = ("amortized", "analytic")
IMPLEMENTATIONS = ("fused", "remat")


def _check_options(kind: str, target, coder: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distance kind {kind!r}; expected one of {KINDS}")
    if coder not in CODERS:
        raise ValueError(f"unknown coder {coder!r}; expected one of {CODERS}")
    if kind == "shell_band" and target is None:
        raise ValueError("kind='shell_band' needs target=tau (the mean ||delta|| of a good checkpoint)")
    if kind != "shell_band" and target is not None:
        raise ValueError(f"target is only used by kind='shell_band', not {kind!r}")


def patch_values(params: ManifoldParams, z: jax.Array, kind: str, *, coder: str = "amortized",
                 num_neighbors: int = 5, lam: float = 1e-4, bn_eps: float = 1e-5, shell_eps: float = 1e-6,
                 compute_dtype=jnp.float32) -> jax.Array:
    """Per-patch quantity ``[N]`` whose mean the distance takes.

    ``||z - zhat||^2`` for ``lcc``; ``||delta||`` for ``shell_norm`` and ``shell_band``;
    ``| ||delta|| - 1 |`` for ``shell``.
    """
    _check_options(kind, 0.0 if kind == "shell_band" else None, coder)
    return pv.patch_values(params, z, pv.Options(kind=kind, coder=coder, num_neighbors=num_neighbors, lam=lam,
                                                  bn_eps=bn_eps, shell_eps=shell_eps,
                                                  compute_dtype=str(jnp.dtype(compute_dtype))))


def _segment_sums(values_fn, z: jax.Array, ids: jax.Array, num_segments: int, chunk_size: int) -> jax.Array:
    """``sum`` of ``values_fn(z)`` per segment, over row chunks of ``z`` with rematerialisation."""
    m = z.shape[0]
    if m <= chunk_size:
        return jax.ops.segment_sum(values_fn(z), ids, num_segments)
    n_chunks = -(-m // chunk_size)
    pad = n_chunks * chunk_size - m
    # Padded rows get segment id `num_segments`, which segment_sum drops.
    z = jnp.pad(z, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, (0, pad), constant_values=num_segments)
    zs = z.reshape(n_chunks, chunk_size, z.shape[1])
    idss = ids.reshape(n_chunks, chunk_size)

    @jax.checkpoint
    def chunk(zc, idc):
        return jax.ops.segment_sum(values_fn(zc), idc, num_segments)

    def body(acc, xs):
        return acc + chunk(*xs), None

    # The first chunk seeds the carry, so the carry has the inputs' type, including under shard_map.
    acc, _ = jax.lax.scan(body, chunk(zs[0], idss[0]), (zs[1:], idss[1:]))
    return acc


def _local_sums(latents, sums_fn):
    """Per-example sums ``[B]`` (``sums_fn(rows, ids, num_segments)``) and the patch count per example."""
    if latents.ndim == 2:
        ids = jnp.zeros((latents.shape[0],), jnp.int32)
        return sums_fn(latents, ids, 1), latents.shape[0]
    b, p, d = latents.shape
    ids = jnp.repeat(jnp.arange(b, dtype=jnp.int32), p)
    return sums_fn(latents.reshape(b * p, d), ids, b), p


def manifold_distance(params: ManifoldParams, latents: jax.Array, kind: str, target: float | None = None, *,
                      patch_size: Sequence[int] = (1, 1, 1), coder: str = "amortized", num_neighbors: int = 5,
                      lam: float = 1e-4, chunk_size: int = 8192, compute_dtype=jnp.float32,
                      per_example: bool = False, mesh: Mesh | None = None,
                      data_axis: str | tuple[str, ...] = "data", bn_eps: float = 1e-5,
                      shell_eps: float = 1e-6, implementation: str = "fused", kernel: str = "auto",
                      blocks: Blocks = Blocks()) -> jax.Array:
    """Distance of ``latents`` to the manifold (see the module docstring for each ``kind``).

    Args:
      params: manifold parameters (coder BatchNorm in eval mode).
      latents: channels-last ``[B, T, H, W, C]`` or flat patches ``[N, D]``.
      kind: one of ``lcc``, ``shell_norm``, ``shell``, ``shell_band``.
      target: ``tau`` for ``shell_band``.
      patch_size: ``(pt, ph, pw)`` block flattened into one patch (5-D latents only).
      coder: ``amortized`` (the learned coder) or ``analytic`` (LLC on ``num_neighbors`` nearest
        anchors with ridge ``lam``).
      chunk_size: rows of patches coded at once; bounds the working set at ``chunk_size x K`` (or,
        with the Pallas kernel, ``chunk_size x H``).
      compute_dtype: dtype of matrix-product operands (e.g. ``jnp.bfloat16``); accumulation,
        softmax and norms are float32.
      implementation: ``fused`` (value and per-patch gradient in one pass) or ``remat``.
      kernel: ``fused`` only: ``xla``, ``pallas`` (fused GPU kernels; interpret mode elsewhere) or
        ``auto`` (``pallas`` for the amortized coder on a GPU, else ``xla``; the platform is that of
        ``mesh``'s devices when given, else the default backend's).
      blocks: tile sizes of the Pallas kernels.
      per_example: return ``[B]`` (one distance per example of 5-D latents) instead of a scalar.
      mesh: when given, examples (or rows of flat latents) are split over ``data_axis`` with
        ``jax.shard_map`` and the manifold is replicated; the batch must divide evenly.

    Returns:
      float32 scalar, or ``[B]`` with ``per_example=True``. Differentiable in ``latents`` and ``params``.
    """
    _check_options(kind, target, coder)
    latents = jnp.asarray(latents)
    patch_size = tuple(int(p) for p in patch_size)
    check_latents(latents, params.dim, patch_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    kernel = pv.resolve_kernel(kernel, coder, None if mesh is None else mesh_platform(mesh))
    compute_dtype = jnp.dtype(compute_dtype)
    z_dtype = jnp.float32 if latents.dtype != jnp.float64 else jnp.float64
    latents = latents.astype(z_dtype)

    opts = pv.Options(kind=kind, coder=coder, num_neighbors=num_neighbors, lam=lam, bn_eps=bn_eps,
                      shell_eps=shell_eps, compute_dtype=str(compute_dtype), chunk_size=int(chunk_size),
                      kernel=kernel, blocks=blocks)

    def local_sums(p, x):
        if x.ndim == 5:
            x = patchify(x, patch_size)
        if implementation == "fused":
            def sums_fn(rows, ids, n):
                return jax.ops.segment_sum(pv.patch_values_fused(p, rows, opts), ids, n)
        else:
            def sums_fn(rows, ids, n):
                return _segment_sums(functools.partial(pv.patch_values, p, opts=opts), rows, ids, n, chunk_size)
        return _local_sums(x, sums_fn)

    if mesh is None:
        sums, count = local_sums(params, latents)
        counts = jnp.full(sums.shape, count, sums.dtype)
    else:
        axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
        n_shards = math.prod(mesh.shape[a] for a in axes)
        if latents.shape[0] % n_shards:
            raise ValueError(f"batch dimension {latents.shape[0]} of latents is not divisible by the "
                             f"{n_shards} shards of mesh axis {data_axis!r}")
        spec = P(axes if len(axes) > 1 else axes[0])
        counts_holder = []

        def local(p, x):
            s, c = local_sums(p, x)
            counts_holder.append(c)  # static per-shard patch count, known at trace time
            return s

        # Pallas calls carry no varying-axes types (the check rejects their outputs, and the interpreter
        # its own loops), so that path runs the shard_map unchecked; the specs are the same.
        sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec,
                             check_vma=kernel != "pallas")(params, latents)
        counts = jnp.full(sums.shape, counts_holder[0], sums.dtype)

    if per_example and latents.ndim == 5:
        means = sums / counts
    else:
        means = jnp.sum(sums) / jnp.sum(counts)
    if kind == "shell_band":
        return jnp.abs(means - target)
    return means


def region_distances(params: ManifoldParams, latents: jax.Array, kind: str, region_masks: jax.Array,
                     target: float | None = None, *, patch_size: Sequence[int] = (1, 1, 1), coder: str = "amortized",
                     num_neighbors: int = 5, lam: float = 1e-4, chunk_size: int = 8192,
                     compute_dtype=jnp.float32, bn_eps: float = 1e-5, shell_eps: float = 1e-6) -> jax.Array:
    """The distance of each region of each clip to the manifold, ``[B, R]``: a dense, training-free patch reward
    (negate it), e.g. HALO's patch rewards inside Gran-DPO (``shelllcc.flow.objectives.gran_dpo_loss``).

    ``latents [B, T, H, W, C]``; ``region_masks [R, T, H, W]`` in [0, 1] on the latent grid, the same regions
    for every clip. With ``v_bn`` the per-patch value of :func:`patch_values` (patches of ``patch_size``) and
    ``w_rn`` the mean of mask ``r`` over patch ``n``'s block of the grid (the share of the patch inside)::

        d_br = sum_n w_rn v_bn / sum_n w_rn           lcc, shell_norm, shell
             = | sum_n w_rn v_bn / sum_n w_rn - tau |  shell_band (v = ||delta||)

    so a mask of the whole grid gives ``manifold_distance(..., per_example=True)``. A region that covers no
    patch gets 0 (``gran_dpo_loss`` never selects an empty mask). Values only: the rewards are data, computed
    chunk by chunk of ``chunk_size`` rows (the working set ``chunk_size x K``); no gradient is defined.
    """
    _check_options(kind, target, coder)
    latents = jnp.asarray(latents)
    patch_size = tuple(int(p) for p in patch_size)
    check_latents(latents, params.dim, patch_size)
    region_masks = jnp.asarray(region_masks, jnp.float32)
    if latents.ndim != 5 or region_masks.ndim != 4 or region_masks.shape[1:] != latents.shape[1:4]:
        raise ValueError(f"region_distances: region_masks must be [R, T, H, W] on the latents' grid [B, T, H, W, C], "
                         f"got region_masks {region_masks.shape} and latents {latents.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    opts = pv.Options(kind="shell_norm" if kind == "shell_band" else kind, coder=coder, num_neighbors=num_neighbors,
                      lam=lam, bn_eps=bn_eps, shell_eps=shell_eps, compute_dtype=str(jnp.dtype(compute_dtype)))
    rows = patchify(jax.lax.stop_gradient(latents).astype(jnp.float32), patch_size)        # [B, N, D]
    b, n, d = rows.shape
    flat = rows.reshape(b * n, d)
    n_chunks = -(-flat.shape[0] // chunk_size)
    padded = jnp.pad(flat, ((0, n_chunks * chunk_size - flat.shape[0]), (0, 0)))
    values = jax.lax.map(lambda z: pv.patch_values(params, z, opts), padded.reshape(n_chunks, chunk_size, d))
    values = values.reshape(-1)[:b * n].reshape(b, n)
    # each mask's share of every patch: the mask as a one-channel latent, patchified and averaged over the block
    weights = jnp.mean(patchify(region_masks[..., None], patch_size), axis=-1)               # [R, N]
    total = jnp.sum(weights, axis=1)
    means = jnp.einsum("bn,rn->br", values, weights) / jnp.maximum(total, 1e-12)[None, :]
    out = jnp.abs(means - target) if kind == "shell_band" else means
    return jnp.where(total[None, :] > 0, out, 0.0)
