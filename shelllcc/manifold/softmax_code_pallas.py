"""Fused GPU kernels (Pallas on Triton) for the amortized coder's last layer and anchor sum.

With ``h [N, H]`` the coder's last hidden layer, ``W [H, K]``, ``b [K]`` its output layer and
``A [K, D]`` the anchors::

    s_nk  = h_n . W_k + b_k
    lse_n = log sum_k exp(s_nk)
    y_n   = sum_k exp(s_nk - lse_n) A_k                         (forward)

and, for a cotangent ``g [N, D]`` of ``y`` and ``delta_n = g_n . y_n``::

    dh_n  = sum_k exp(s_nk - lse_n) (g_n . A_k - delta_n) W_k    (backward, w.r.t. h only)

This is single-head attention with queries ``h``, keys ``W^T``, values ``A`` and a bias: each
program takes ``block_n`` rows and walks over the K anchors in blocks of ``block_k``, keeping a
running maximum and sum (forward) or recomputing the probabilities from the saved ``lse``
(backward), so no ``N x K`` array is ever written to device memory. The backward recomputes
``s`` (one extra ``N x H x K`` product) instead of storing it.

Operands are cast to ``compute_dtype`` (bf16 or f32; f32 dots run as TF32 on the GPU's matrix
units); every dot accumulates in f32 and the softmax is f32. ``interpret=True`` runs the same
kernels on any backend (used by the CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Bias of padded anchors: exp(-1e30 - max) == 0 without producing inf - inf.
_PAD_BIAS = -1e30


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes and Triton launch parameters of the two kernels."""

    # Defaults: the fastest tiles of benchmarks/softmax_code_bench.py on an H200 at H = 512, K = 4096
    # (benchmarks/RESULTS.md); larger tiles exceed the shared memory there.
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 1
    bwd_block_n: int = 64
    bwd_block_k: int = 128
    bwd_num_warps: int = 4
    bwd_num_stages: int = 3
    # "fused": the kernel accumulates dh itself; "ds": it writes ds [N, K] (compute dtype) and dh = ds W^T
    # is an ordinary matrix product (N x K bytes of traffic, a GEMM library's efficiency for that product)
    backward: str = "ds"

    def __post_init__(self):
        if self.backward not in ("fused", "ds"):
            raise ValueError(f"Blocks.backward={self.backward!r}; expected 'fused' or 'ds'")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _dot_nt(a, b):
    """``a @ b.T`` accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(h_ref, wt_ref, b_ref, a_ref, y_ref, lse_ref, *, block_k: int):
    h = h_ref[...]
    n_rows = h.shape[0]
    d = a_ref.shape[1]

    def body(i, carry):
        acc, m, l = carry
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        s = _dot_nt(h, wt_ref[ks, :]) + b_ref[ks][None, :]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot_nn(p.astype(a_ref.dtype), a_ref[ks, :])
        return acc, m_new, l

    init = (jnp.zeros((n_rows, d), jnp.float32), jnp.full((n_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((n_rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, wt_ref.shape[0] // block_k, body, init)
    y_ref[...] = acc / l[:, None]
    lse_ref[...] = m + jnp.log(l)


def _backward_kernel(h_ref, wt_ref, b_ref, a_ref, g_ref, lse_ref, delta_ref, dh_ref, *, block_k: int):
    h = h_ref[...]
    g = g_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def body(i, dh):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        wt = wt_ref[ks, :]
        p = jnp.exp(_dot_nt(h, wt) + b_ref[ks][None, :] - lse[:, None])
        ds = p * (_dot_nt(g, a_ref[ks, :]) - delta[:, None])
        return dh + _dot_nn(ds.astype(wt.dtype), wt)

    dh = jax.lax.fori_loop(0, wt_ref.shape[0] // block_k, body,
                           jnp.zeros(dh_ref.shape, jnp.float32))
    dh_ref[...] = dh


def _ds_kernel(h_ref, wt_ref, b_ref, a_ref, g_ref, lse_ref, delta_ref, ds_ref, *, block_k: int):
    ks = pl.ds(pl.multiple_of(pl.program_id(1) * block_k, block_k), block_k)
    p = jnp.exp(_dot_nt(h_ref[...], wt_ref[ks, :]) + b_ref[ks][None, :] - lse_ref[...][:, None])
    ds = p * (_dot_nt(g_ref[...], a_ref[ks, :]) - delta_ref[...][:, None])
    ds_ref[...] = ds.astype(ds_ref.dtype)


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad_operands(h, w, b, anchors, compute_dtype, block_n: int, block_k: int):
    """Cast and pad to whole tiles: rows of ``h`` to ``block_n``, anchors to ``block_k``, H and D to 16."""
    n, hid = h.shape
    k, d = anchors.shape
    n_p, k_p, h_p, d_p = _round_up(n, block_n), _round_up(k, block_k), _round_up(hid, 16), _round_up(d, 16)
    h = jnp.pad(h.astype(compute_dtype), ((0, n_p - n), (0, h_p - hid)))
    wt = jnp.pad(w.T.astype(compute_dtype), ((0, k_p - k), (0, h_p - hid)))
    b = jnp.pad(b.astype(jnp.float32), (0, k_p - k), constant_values=_PAD_BIAS)
    a = jnp.pad(anchors.astype(compute_dtype), ((0, k_p - k), (0, d_p - d)))
    return h, wt, b, a


def _out_struct(shape, dtype, like):
    """``ShapeDtypeStruct`` varying over the same manual mesh axes as ``like``.

    Inside ``jax.shard_map`` (with its default ``check_vma=True``) a Pallas output must say how it
    varies across the mesh; the rows of every output come from the rows of ``h``.
    """
    mat = getattr(jax.typeof(like), "mat", None)
    if mat is not None:
        try:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        except TypeError:   # a JAX without that argument has no such check either
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


def check_shapes(h, w, b, anchors) -> None:
    n, hid = h.shape
    if w.shape != (hid, anchors.shape[0]) or b.shape != (anchors.shape[0],):
        raise ValueError(f"softmax coding needs h [N, H], W [H, K], b [K], anchors [K, D]; got h {h.shape}, "
                         f"W {w.shape}, b {b.shape}, anchors {anchors.shape}")


@functools.partial(jax.jit, static_argnames=("compute_dtype", "blocks", "interpret"))
def forward(h, w, b, anchors, *, compute_dtype=jnp.bfloat16, blocks: Blocks = Blocks(), interpret: bool = False):
    """``(y [N, D], lse [N])`` of the module docstring, both float32."""
    check_shapes(h, w, b, anchors)
    n, d = h.shape[0], anchors.shape[1]
    hp, wt, bp, a = _pad_operands(h, w, b, anchors, jnp.dtype(compute_dtype), blocks.block_n, blocks.block_k)
    n_p, h_p = hp.shape
    k_p, d_p = a.shape
    y, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_k=blocks.block_k),
        grid=(n_p // blocks.block_n,),
        in_specs=[pl.BlockSpec((blocks.block_n, h_p), lambda i: (i, 0)),
                  pl.BlockSpec((k_p, h_p), lambda i: (0, 0)),
                  pl.BlockSpec((k_p,), lambda i: (0,)),
                  pl.BlockSpec((k_p, d_p), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((blocks.block_n, d_p), lambda i: (i, 0)),
                   pl.BlockSpec((blocks.block_n,), lambda i: (i,))],
        out_shape=[_out_struct((n_p, d_p), jnp.float32, hp), _out_struct((n_p,), jnp.float32, hp)],
        compiler_params=None if interpret else _compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name="softmax_code_forward",
    )(hp, wt, bp, a)
    return y[:n, :d], lse[:n]


@functools.partial(jax.jit, static_argnames=("compute_dtype", "blocks", "interpret"))
def backward_h(h, w, b, anchors, g, lse, delta, *, compute_dtype=jnp.bfloat16, blocks: Blocks = Blocks(),
               interpret: bool = False):
    """``dh [N, H]`` (float32) for cotangent ``g [N, D]`` of ``y``, with ``delta = sum(g * y, -1)``."""
    check_shapes(h, w, b, anchors)
    n, hid = h.shape
    d = anchors.shape[1]
    cd = jnp.dtype(compute_dtype)
    bn, bk = blocks.bwd_block_n, blocks.bwd_block_k
    hp, wt, bp, a = _pad_operands(h, w, b, anchors, cd, bn, bk)
    n_p, h_p = hp.shape
    k_p, d_p = a.shape
    gp = jnp.pad(g.astype(cd), ((0, n_p - n), (0, d_p - d)))
    lsep = jnp.pad(lse.astype(jnp.float32), (0, n_p - n))
    deltap = jnp.pad(delta.astype(jnp.float32), (0, n_p - n))
    if blocks.backward == "ds":
        ds = pl.pallas_call(
            functools.partial(_ds_kernel, block_k=bk),
            grid=(n_p // bn, k_p // bk),
            in_specs=[pl.BlockSpec((bn, h_p), lambda i, j: (i, 0)),
                      pl.BlockSpec((k_p, h_p), lambda i, j: (0, 0)),
                      pl.BlockSpec((k_p,), lambda i, j: (0,)),
                      pl.BlockSpec((k_p, d_p), lambda i, j: (0, 0)),
                      pl.BlockSpec((bn, d_p), lambda i, j: (i, 0)),
                      pl.BlockSpec((bn,), lambda i, j: (i,)),
                      pl.BlockSpec((bn,), lambda i, j: (i,))],
            out_specs=pl.BlockSpec((bn, bk), lambda i, j: (i, j)),
            out_shape=_out_struct((n_p, k_p), cd, hp),
            compiler_params=None if interpret else _compiler_params(blocks.bwd_num_warps, blocks.bwd_num_stages),
            interpret=interpret,
            name="softmax_code_backward_ds",
        )(hp, wt, bp, a, gp, lsep, deltap)
        dh = jnp.matmul(ds, wt, preferred_element_type=jnp.float32)
        return dh[:n, :hid]
    dh = pl.pallas_call(
        functools.partial(_backward_kernel, block_k=bk),
        grid=(n_p // bn,),
        in_specs=[pl.BlockSpec((bn, h_p), lambda i: (i, 0)),
                  pl.BlockSpec((k_p, h_p), lambda i: (0, 0)),
                  pl.BlockSpec((k_p,), lambda i: (0,)),
                  pl.BlockSpec((k_p, d_p), lambda i: (0, 0)),
                  pl.BlockSpec((bn, d_p), lambda i: (i, 0)),
                  pl.BlockSpec((bn,), lambda i: (i,)),
                  pl.BlockSpec((bn,), lambda i: (i,))],
        out_specs=pl.BlockSpec((bn, h_p), lambda i: (i, 0)),
        out_shape=_out_struct((n_p, h_p), jnp.float32, hp),
        compiler_params=None if interpret else _compiler_params(blocks.bwd_num_warps, blocks.bwd_num_stages),
        interpret=interpret,
        name="softmax_code_backward_h",
    )(hp, wt, bp, a, gp, lsep, deltap)
    return dh[:n, :hid]
