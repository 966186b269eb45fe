"""Per-patch manifold quantities, and their gradients computed in the same pass over the anchors.

The per-patch quantity ``v_n = v(z_n)`` (``||z_n - zhat_n||^2`` for ``lcc``, ``||delta_n||`` for
``shell_norm`` / ``shell_band``, ``| ||delta_n|| - 1 |`` for ``shell``) depends on its own patch only,
because the coder runs in eval mode. So for any cotangent ``c [N]`` of the values::

    d(sum_m c_m v_m) / dz_n = c_n * grad v(z_n)

and the gradient of every distance built from the values (sums, means per example) is known once
``G_n = grad v(z_n)`` is. ``patch_values_fused`` computes ``v`` and ``G`` together, chunk by chunk of
rows, while each chunk's coding weights are at hand, and its backward pass is ``c[:, None] * G``:
nothing is recomputed and nothing of size ``chunk x K`` outlives its chunk.

Two kernels compute a chunk:

* ``xla``: ``jax.vjp`` of the plain formulas on the chunk (any backend, either coder);
* ``pallas``: the amortized coder's ``softmax(h W + b) A`` and its backward w.r.t. ``h`` as the fused
  kernels of ``shelllcc.manifold.softmax_code_pallas`` (no ``chunk x K`` array in device memory; on a
  backend other than GPU they run in Pallas's interpret mode, slowly, for testing).

The manifold parameters' cotangent is computed in the backward pass by differentiating the chunked
formulas with rematerialisation (correct, not fast); when the manifold is frozen, as in reward
fine-tuning, nothing uses it and XLA drops that computation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from shelllcc.manifold import coders, softmax_code_pallas
from shelllcc.manifold.params import ManifoldParams
from shelllcc.manifold.shell import safe_norm, shell_log_variance, shell_residual

KERNELS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of the per-patch values (hashable: a ``nondiff_argnums`` argument)."""

    kind: str
    coder: str = "amortized"
    num_neighbors: int = 5
    lam: float = 1e-4
    bn_eps: float = 1e-5
    shell_eps: float = 1e-6
    compute_dtype: str = "float32"
    chunk_size: int = 8192
    kernel: str = "xla"
    blocks: softmax_code_pallas.Blocks = softmax_code_pallas.Blocks()


def resolve_kernel(kernel: str, coder: str, platform: str | None = None) -> str:
    """``auto`` is ``pallas`` for the amortized coder on a GPU, ``xla`` otherwise.

    ``platform``: of the devices the reward is compiled for (a device's ``.platform``); default: the
    default backend. A CPU host compiling for a TPU mesh must pass ``'tpu'``: the Pallas kernels are
    Triton (GPU) kernels, which a TPU cannot run and whose interpret mode is a CPU fallback.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "pallas" and coder != "amortized":
        raise ValueError(f"kernel='pallas' implements the amortized coder only, not coder={coder!r}")
    platform = platform or jax.default_backend()
    if kernel == "pallas" and platform == "tpu":
        raise ValueError("kernel='pallas' is a Triton (GPU) kernel and does not compile for TPU; use 'auto' or 'xla'")
    if kernel == "auto":
        return "pallas" if coder == "amortized" and platform == "gpu" else "xla"
    return kernel


def values_from_skeleton(params: ManifoldParams, z: jax.Array, zhat: jax.Array, opts: Options) -> jax.Array:
    """``v [N]`` from the patches and their skeleton points (see the module docstring)."""
    if opts.kind == "lcc":
        return jnp.sum(jnp.square(z - zhat), axis=-1)
    lv = shell_log_variance(params.shell, zhat, opts.compute_dtype)
    norm = safe_norm(shell_residual(z, zhat, lv, opts.shell_eps))
    return jnp.abs(norm - 1.0) if opts.kind == "shell" else norm


def skeleton(params: ManifoldParams, z: jax.Array, opts: Options) -> jax.Array:
    if opts.coder == "amortized":
        return coders.amortized_code(params, z, eps=opts.bn_eps, compute_dtype=opts.compute_dtype)[1]
    anchors = coders.data_space_anchors(params)
    return coders.analytic_code(anchors, z, num_neighbors=opts.num_neighbors, lam=opts.lam,
                                compute_dtype=opts.compute_dtype)[2]


def patch_values(params: ManifoldParams, z: jax.Array, opts: Options) -> jax.Array:
    """``v [N]`` of patches ``z [N, D]``, all rows at once (plain formulas; autodiff-able)."""
    return values_from_skeleton(params, z, skeleton(params, z, opts), opts)


def _chunk_value_grad_xla(params, z, opts):
    v, vjp = jax.vjp(lambda x: patch_values(params, x, opts), z)
    return v, vjp(jnp.ones_like(v))[0]


def _chunk_value_grad_pallas(params, z, opts):
    cd = jnp.dtype(opts.compute_dtype)
    interpret = jax.default_backend() != "gpu"
    coder = params.coder
    h, hidden_vjp = jax.vjp(
        lambda x: coders.coder_hidden(coder, params.bn, x, eps=opts.bn_eps, compute_dtype=cd), z)
    y, lse = softmax_code_pallas.forward(h, coder.w2, coder.b2, params.anchors, compute_dtype=cd,
                                         blocks=opts.blocks, interpret=interpret)

    def tail(x, y):
        return values_from_skeleton(params, x, params.scale * y + params.shift, opts)

    v, tail_vjp = jax.vjp(tail, z, y)
    gz, gy = tail_vjp(jnp.ones_like(v))
    delta = jnp.sum(gy * y, axis=-1)
    dh = softmax_code_pallas.backward_h(h, coder.w2, coder.b2, params.anchors, gy, lse, delta, compute_dtype=cd,
                                        blocks=opts.blocks, interpret=interpret)
    return v, gz + hidden_vjp(dh.astype(h.dtype))[0]


def _chunked(fn, z: jax.Array, chunk_size: int):
    """Apply row-wise ``fn`` (returning a pytree of ``[rows, ...]``) over row chunks of ``z``."""
    m = z.shape[0]
    if m <= chunk_size:
        return fn(z)
    n_chunks = -(-m // chunk_size)
    pad = n_chunks * chunk_size - m
    zs = jnp.pad(z, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, z.shape[1])
    out = jax.lax.map(fn, zs)
    return jax.tree.map(lambda a: a.reshape((n_chunks * chunk_size,) + a.shape[2:])[:m], out)


def _values(params, z, opts):
    return _chunked(functools.partial(patch_values, params, opts=opts), z, opts.chunk_size)


def _values_remat(params, z, opts):
    return _chunked(jax.checkpoint(functools.partial(patch_values, params, opts=opts)), z, opts.chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(opts: Options, params: ManifoldParams, z: jax.Array) -> jax.Array:
    return _values(params, z, opts)


def _fused_fwd(opts, params, z):
    chunk_fn = _chunk_value_grad_pallas if opts.kernel == "pallas" else _chunk_value_grad_xla
    v, grads = _chunked(functools.partial(chunk_fn, params, opts=opts), z, opts.chunk_size)
    return v, (params, z, grads)


def _fused_bwd(opts, res, ct):
    params, z, grads = res
    # The parameters' cotangent differentiates the chunked formulas again (with rematerialisation);
    # when the manifold is frozen nothing uses it and XLA removes that computation.
    _, vjp = jax.vjp(lambda p: _values_remat(p, z, opts), params)
    return vjp(ct)[0], ct[:, None].astype(grads.dtype) * grads


_fused.defvjp(_fused_fwd, _fused_bwd)


def patch_values_fused(params: ManifoldParams, z: jax.Array, opts: Options) -> jax.Array:
    """``v [N]`` of patches ``z [N, D]``, with the gradient computed in the forward pass.

    ``opts.kernel`` must already be ``xla`` or ``pallas`` (see ``resolve_kernel``). Differentiable
    once (reverse mode) in ``z`` and ``params``.
    """
    if opts.kernel not in ("xla", "pallas"):
        raise ValueError(f"patch_values_fused needs a resolved kernel ('xla' or 'pallas'), got {opts.kernel!r}")
    return _fused(opts, params, z)
