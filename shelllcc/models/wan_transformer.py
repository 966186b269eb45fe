"""Wan2.1 text-to-video diffusion transformer (DiT) in Flax NNX.

Numerically equivalent to diffusers' ``WanTransformer3DModel`` for the T2V checkpoints (1.3B, 14B),
but channels-last::

    velocity[B, T, H, W, C_out] = WanTransformer(cfg)(latents[B, T, H, W, C_in], timestep[B], context[B, L, text_dim])

Forward pass (``P = pt*ph*pw``, ``N = T/pt * H/ph * W/pw`` tokens, ``D = dim``)::

    x     = patchify(latents) @ W_patch + b                     # [B, N, D], (1,2,2) patches
    e     = MLP_silu(sinusoid_256(timestep))                    # [B, D]     time embedding (float32)
    m     = Linear(silu(e)).reshape(B, 6, D)                    # [B, 6, D]  per-block modulation input
    c     = Linear(gelu_tanh(Linear(context)))                  # [B, L, D]
    for each block (its own table S[1, 6, D]):
        sh1, sc1, g1, sh2, sc2, g2 = S + m                      # float32
        x = x + g1 * SelfAttn(LN(x) * (1 + sc1) + sh1)          # RMS-normed q, k; 3D RoPE
        x = x + CrossAttn(LN_affine(x), c)                      # RMS-normed q, k; no RoPE
        x = x + g2 * FFN_gelu_tanh(LN(x) * (1 + sc2) + sh2)
    sh, sc = S_out[1, 2, D] + e                                 # note: e, not m
    y     = (LN(x) * (1 + sc) + sh) @ W_out + b                 # [B, N, P * C_out]
    velocity = unpatchify(y)

``LN`` is a LayerNorm without affine parameters (eps ``cfg.eps``); the LayerNorms, the modulation and
the residual updates with a gate are computed in float32 whatever the compute dtype, as in diffusers.
The time embedder, the modulation tables and the cross-attention LayerNorm keep float32 parameters
whatever ``param_dtype`` (diffusers keeps those modules in float32 too).

Parameters carry logical axis names (see ``LOGICAL_AXES``) as flax's ``out_sharding`` metadata
(``variable.out_sharding``); ``nnx.logical_axis_rules`` + ``nnx.get_partition_spec`` resolve them to mesh
axes (``shelllcc.parallel.sharding_context`` / ``shardings``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from jax.ad_checkpoint import checkpoint_name

from shelllcc.models.wan_rope import apply_rope, rope_tables

# Logical axis names used by the parameters (the mesh rules map them to mesh axes).
EMBED = "embed"            # model dim D
MLP = "mlp"                # FFN hidden
HEADS = "heads"            # attention inner dim (num_heads * head_dim)
TEXT_EMBED = "text_embed"  # text encoder dim
FREQ = "freq"              # sinusoidal timestep features
MODULATION = "modulation"  # the 6 * D time projection
PATCH = "patch"            # P * C_out of the output head
LAYERS = "layers"          # leading axis of the stacked blocks' parameters (scan_layers); no rule maps it
LOGICAL_AXES = (EMBED, MLP, HEADS, TEXT_EMBED, FREQ, MODULATION, PATCH, LAYERS)

# 'flash' is the target platform's fused attention (see resolve_attention_impl); 'tpu_flash' is the Pallas
# TPU flash attention of jax.experimental.pallas.ops.tpu.
ATTENTION_IMPLS = (None, "xla", "cudnn", "tpu_flash", "flash")
TPU_FLASH_BLOCKS = (512, 256, 128)     # the kernel's tile lengths must divide the (padded) sequence lengths


def resolve_attention_impl(impl: str | None, platform: str) -> str | None:
    """The kernel ``impl`` names on ``platform`` (a device's ``.platform``: 'gpu', 'tpu', 'cpu').

    ``'flash'`` is cuDNN's flash attention on a GPU, the Pallas TPU flash attention on a TPU and XLA's
    attention elsewhere. The platform is that of the mesh a step is compiled for, which is not the
    default backend when a CPU host compiles for a TPU topology. A kernel of another platform is an error.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "flash":
        return {"gpu": "cudnn", "tpu": "tpu_flash"}.get(platform, "xla")
    wants = {"cudnn": "gpu", "tpu_flash": "tpu"}.get(impl)
    # a CPU target keeps what was asked (shape-only tracing works; running it fails where it always did)
    if wants is not None and platform in ("gpu", "tpu") and platform != wants:
        raise ValueError(f"attention_impl={impl!r} runs on {wants.upper()} only, but the target devices are "
                         f"{platform!r}; 'flash' picks the platform's fused attention")
    return impl


def _is_tpu_flash_forward(prim, params) -> bool:
    # The kernel's Pallas calls carry no name: its forward under differentiation is the one with three
    # outputs (o and the softmax statistics l, m) and a cost estimate; its backward calls (dk/dv, dq) have
    # neither. The DiT has no other Pallas call.
    return (prim.name == "pallas_call" and params.get("cost_estimate") is not None
            and len(params.get("out_avals", ())) == 3)


def save_attention_forward(prim, *_, **params) -> bool:
    """Remat policy: keep what the fused attention forward returns (cuDNN's, or the Pallas TPU flash
    kernel's): its output and softmax statistics, and recompute everything else.

    The attention backward needs both; saving only the output (``attn_output``) still reruns the whole
    attention forward to get the statistics, the costliest recomputation of the block (about 70% of
    a block's forward FLOPs at 32k tokens). Costs one ``[B, N, D]`` activation per block.
    """
    return prim.name.startswith("dot_product_attention_fwd") or _is_tpu_flash_forward(prim, params)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep the projected q/k/v and the attention output; recompute norms, FFN and the rest
    "attention_saveable": jax.checkpoint_policies.save_only_these_names(
        "attn_query", "attn_key", "attn_value", "attn_output"),
    # keep the fused attention's output and softmax statistics (cuDNN); recompute the rest
    "attention_forward_saveable": save_attention_forward,
}
QK_NORM = "rms_norm_across_heads"


@dataclasses.dataclass(frozen=True)
class WanTransformerConfig:
    """Architecture of a Wan2.1 T2V transformer plus the runtime knobs (dtypes, attention, remat).

    ``dim = num_heads * head_dim``. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype
    of the parameters (except the float32-kept ones, see the module docstring).
    ``attention_impl``: ``None`` (jax's default, currently the XLA einsum/softmax path, which
    materialises the [heads, N, N] logits), ``'xla'``, ``'cudnn'`` (flash attention on GPU: bf16/fp16
    compute, head_dim a multiple of 8; its backward needs even sequence lengths), ``'tpu_flash'`` (the
    Pallas TPU flash attention; sequences padded to a multiple of 128, padded keys masked) or ``'flash'``
    (whichever of those the platform has, see :func:`resolve_attention_impl`; resolved at trace time from
    the default backend unless the caller resolved it for its mesh, as ``experiments.dit_setup`` does).
    ``remat_policy``: a key of ``REMAT_POLICIES``, applied per block.
    ``scan_layers``: the blocks' parameters are stacked, one array per parameter with a leading layer
    axis (logical name ``'layers'``, mapped to no mesh axis; built by ``nnx.vmap``), and the blocks run
    as one ``nnx.scan``: XLA compiles one block instead of ``num_layers``. Off: one module per block
    (``blocks.0``, ``blocks.1``, ...), run by a Python loop. Both give the same parameters for a seed
    (stacked = the per-block ones stacked) and the same outputs; saved and packed models always hold the
    per-block layout (``shelllcc.models.saving``), so this is a runtime knob, not part of the architecture.
    """

    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: str = QK_NORM
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat_policy: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        # normalise so that configs compare and hash by value
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for the rotary embedding")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.qk_norm != QK_NORM:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; Wan2.1 uses {QK_NORM!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.dim < self.patch_volume * self.out_channels:
            # The head is Linear(dim -> patch volume x out_channels): its outputs span at most `dim` of a token's
            # directions. A sampler moves the others only by the head's bias, so they keep the initial noise.
            n = self.patch_volume * self.out_channels
            warnings.warn(f"WanTransformerConfig: dim={self.dim} < patch volume x out_channels = {n}: the output "
                          f"head reaches {self.dim} of a token's {n} latent directions; the other {n - self.dim} "
                          "keep the sampler's initial noise in every sample. Use dim >= "
                          f"{n} for a model that is sampled.", stacklevel=3)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


PRESETS = {
    # structurally identical to the real models, small enough for CPU tests
    "tiny": WanTransformerConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=128, text_dim=32, freq_dim=32),
    "wan2.1-t2v-1.3b": WanTransformerConfig(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960),
    "wan2.1-t2v-14b": WanTransformerConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
}


def get_config(name: str, **overrides) -> WanTransformerConfig:
    """A preset (``tiny``, ``wan2.1-t2v-1.3b``, ``wan2.1-t2v-14b``) with optional field overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown Wan transformer preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[key], **overrides)


# ----------------------------------------------------------------------------------------------
# parameters and small layers
# ----------------------------------------------------------------------------------------------

def born_sharded() -> bool:
    """Whether parameters created now are sharded as they are born: under a mesh (``jax.set_mesh``) and
    flax's logical axis rules (``nnx.logical_axis_rules``), e.g. ``shelllcc.parallel.sharding_context``,
    flax constrains each new parameter to the sharding its logical names resolve to. Elsewhere (no mesh,
    single-device tests, host-side inits) the names are only metadata, resolved when shardings are asked for.
    """
    return not jax.sharding.get_abstract_mesh().empty and bool(get_logical_axis_rules())


class KeyStream:
    """Fresh PRNG keys ``fold_in(key, start + i)``, i = 1, 2, ... counted in Python.

    Used instead of drawing from ``nnx.Rngs`` per parameter: each ``nnx.Rngs`` draw updates a counter
    Variable, and under ``nnx.eval_shape`` every such update costs time proportional to the trace so
    far (jax builds an error message with the tracer's provenance), which made abstract construction
    quadratic in depth (13 s for the 1.3B model). One draw per model keeps it linear. ``start`` may be
    traced (under ``nnx.vmap`` each stacked block starts where its per-block twin would).
    """

    def __init__(self, key: jax.Array, start: Any = 0):
        self.key, self.start, self.count = key, start, 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.start + self.count)


def _param(keys: KeyStream, init, shape, dtype, axes) -> nnx.Param:
    # the logical names go to flax's ``out_sharding`` metadata (nnx.get_partition_spec reads them)
    return nnx.Param(init(keys(), shape, dtype), out_sharding=tuple(axes), eager_sharding=born_sharded())


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` in ``dtype``; ``kernel [in, out]`` named ``axes``, ``bias`` after the output axis.

    (Not ``nnx.Linear``: that one draws its key from ``nnx.Rngs``, see ``KeyStream``.)
    """

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, dtype, param_dtype, keys: KeyStream):
        self.dtype = dtype
        self.kernel = _param(keys, nnx.initializers.lecun_normal(), (in_features, out_features), param_dtype, axes)
        self.bias = _param(keys, nnx.initializers.zeros_init(), (out_features,), param_dtype, (axes[1],))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # one 2-D GEMM over all leading axes: XLA:CPU runs the kernel gradient of a batched
        # [B, N, D] x [D, F] product several times slower than the same product flattened
        # (2.2x on the whole DiT step of the embedded benchmark); the numbers are the same
        lead = x.shape[:-1]
        y = x.astype(self.dtype).reshape(-1, x.shape[-1]) @ self.kernel[...].astype(self.dtype)
        return (y + self.bias[...].astype(self.dtype)).reshape(*lead, y.shape[-1])


def _layer_norm_f32(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """``(x - mean) / sqrt(var + eps)`` over the last axis, in float32 (biased variance)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, computed in float32, cast back."""

    def __init__(self, dim: int, eps: float, *, param_dtype, keys: KeyStream):
        self.eps = eps
        self.scale = _param(keys, nnx.initializers.ones_init(), (dim,), param_dtype, (None,))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with elementwise scale and bias (float32 parameters); returns float32."""

    def __init__(self, dim: int, eps: float, *, keys: KeyStream):
        self.eps = eps
        self.scale = _param(keys, nnx.initializers.ones_init(), (dim,), jnp.float32, (None,))
        self.bias = _param(keys, nnx.initializers.zeros_init(), (dim,), jnp.float32, (None,))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return _layer_norm_f32(x, self.eps) * self.scale[...] + self.bias[...]


class PatchEmbed3D(nnx.Module):
    """Non-overlapping 3D patches -> tokens: a Conv3d with stride = kernel = patch, done as a matmul.

    ``latents [B, T, H, W, C]`` -> ``[B, N, D]``, tokens frame-major; kernel ``[pt, ph, pw, C, D]``
    (the Conv3d layout of flax), so a patch is flattened in ``(pt, ph, pw, C)`` order.
    """

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        self.patch_size = cfg.patch_size
        self.dtype = cfg.dtype
        fan_in_init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = _param(keys, fan_in_init, (*cfg.patch_size, cfg.in_channels, cfg.dim), cfg.param_dtype,
                             (None, None, None, None, EMBED))
        self.bias = _param(keys, nnx.initializers.zeros_init(), (cfg.dim,), cfg.param_dtype, (EMBED,))

    def __call__(self, latents: jnp.ndarray) -> jnp.ndarray:
        b, t, h, w, c = latents.shape
        pt, ph, pw = self.patch_size
        x = latents.astype(self.dtype).reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)
        kernel = self.kernel[...].astype(self.dtype).reshape(-1, self.kernel.shape[-1])
        y = x.reshape(-1, x.shape[-1]) @ kernel + self.bias[...].astype(self.dtype)    # 2-D: see Dense
        return y.reshape(b, -1, y.shape[-1])


def unpatchify(tokens: jnp.ndarray, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> jnp.ndarray:
    """Inverse of the patch layout: ``[B, N, pt*ph*pw*C]`` (``C`` fastest) -> ``[B, T, H, W, C]``."""
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, h * ph, w * pw, -1)


def timestep_sinusoid(timestep: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """``[cos(t * f_k), sin(t * f_k)]``, ``f_k = max_period ** (-k / (dim/2))``, k < dim/2; float32 ``[B, dim]``."""
    half = dim // 2
    freqs = np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))
    angles = timestep.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """``e = W2 silu(W1 sinusoid(t) + b1) + b2``: ``[B] -> [B, D]``, float32 parameters and compute."""

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        self.freq_dim = cfg.freq_dim
        f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, keys=keys)
        self.linear_1 = Dense(cfg.freq_dim, cfg.dim, (FREQ, EMBED), **f32)
        self.linear_2 = Dense(cfg.dim, cfg.dim, (EMBED, None), **f32)

    def __call__(self, timestep: jnp.ndarray) -> jnp.ndarray:
        return self.linear_2(jax.nn.silu(self.linear_1(timestep_sinusoid(timestep, self.freq_dim))))


class TextEmbedder(nnx.Module):
    """``c = W2 gelu_tanh(W1 context + b1) + b2``: ``[B, L, text_dim] -> [B, L, D]``."""

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, keys=keys)
        self.linear_1 = Dense(cfg.text_dim, cfg.dim, (TEXT_EMBED, EMBED), **kw)
        self.linear_2 = Dense(cfg.dim, cfg.dim, (EMBED, None), **kw)

    def __call__(self, context: jnp.ndarray) -> jnp.ndarray:
        return self.linear_2(jax.nn.gelu(self.linear_1(context), approximate=True))


def _batch_split(x: jnp.ndarray) -> jnp.ndarray:
    """Constrain ``x`` to be split over the batch axes ('data', 'fsdp') of the mesh in context, if any.

    cuDNN attention's partitioner needs q, k and v sharded alike; without a constraint, FSDP lets XLA
    choose differently for q (from the video tokens) and k/v (from the text), and compilation fails.
    XLA's attention needs it too: under FSDP the partitioner otherwise follows the weights' 'fsdp'-sharded
    model dim and every device computes the whole global batch's [B, H, N, M] logits (issue 21:
    ``benchmarks/dp_memory.py``, temp per device 2.9x at fsdp 4 on CPU).
    A no-op outside ``jax.set_mesh`` or when the batch does not divide over those axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _tile(length: int) -> int:
    return next(b for b in TPU_FLASH_BLOCKS if length % b == 0)


def _tpu_flash_local(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    n, m, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    quantum = TPU_FLASH_BLOCKS[-1]
    nq, nk = -(-n // quantum) * quantum, -(-m // quantum) * quantum
    # [B, N, H, D] -> the kernel's [B, H, N, D]; 81 x 480 x 832 gives 32760 tokens, no multiple of a tile
    pad = lambda x, to: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, to - x.shape[1]), (0, 0)))  # noqa: E731
    qt, kt, vt = pad(q, nq), pad(k, nk), pad(v, nk)
    segments = None
    if nk != m:
        # padded keys get a segment no query has; padded query rows see the real keys and are dropped
        b = q.shape[0]
        segments = fa.SegmentIds(q=jnp.ones((b, nq), jnp.int32),
                                 kv=jnp.broadcast_to((jnp.arange(nk) < m).astype(jnp.int32), (b, nk)))
    bq, bk = _tile(nq), _tile(nk)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                           block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    o = fa.flash_attention(qt, kt, vt, segment_ids=segments, sm_scale=1.0 / math.sqrt(head_dim), block_sizes=blocks)
    return o[:, :, :n].transpose(0, 2, 1, 3)


def tpu_flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention of ``[B, N, H, D]`` queries over ``[B, M, H, D]`` keys/values by the Pallas TPU
    flash kernel (no ``[H, N, M]`` logits in memory), run per batch shard of the mesh in context.

    A Pallas call has no SPMD partitioning rule: left to the partitioner it is replicated (every
    chip gathers the whole batch), so it runs in a ``shard_map`` over the batch axes when they divide it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if size == 1 or q.shape[0] % size:
        return _tpu_flash_local(q, k, v)
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(_tpu_flash_local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


class Attention(nnx.Module):
    """Multi-head attention with q/k RMS-normed over the whole inner dim (all heads at once).

    ``q = rms(x W_q)``, ``k = rms(s W_k)``, ``v = s W_v`` with ``s = x`` (self) or the text (cross);
    RoPE on q and k when given; ``softmax(q k^T / sqrt(head_dim)) v`` per head; output ``W_o``.
    """

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, keys=keys)
        self.query = Dense(cfg.dim, cfg.dim, (EMBED, HEADS), **kw)
        self.key = Dense(cfg.dim, cfg.dim, (EMBED, HEADS), **kw)
        self.value = Dense(cfg.dim, cfg.dim, (EMBED, HEADS), **kw)
        self.out = Dense(cfg.dim, cfg.dim, (HEADS, EMBED), **kw)
        self.query_norm = RMSNorm(cfg.dim, cfg.eps, param_dtype=cfg.param_dtype, keys=keys)
        self.key_norm = RMSNorm(cfg.dim, cfg.eps, param_dtype=cfg.param_dtype, keys=keys)

    def _split_heads(self, x: jnp.ndarray) -> jnp.ndarray:
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None,
                 rope: tuple[jnp.ndarray, jnp.ndarray] | None = None) -> jnp.ndarray:
        source = x if context is None else context
        q = self._split_heads(self.query_norm(self.query(x)))
        k = self._split_heads(self.key_norm(self.key(source)))
        v = self._split_heads(self.value(source))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        impl = resolve_attention_impl(self.impl, jax.default_backend()) if self.impl == "flash" else self.impl
        if impl != "tpu_flash":      # the Pallas kernel runs in its own shard_map over the batch axes
            q, k, v = _batch_split(q), _batch_split(k), _batch_split(v)
        q, k, v = checkpoint_name(q, "attn_query"), checkpoint_name(k, "attn_key"), checkpoint_name(v, "attn_value")
        if impl == "tpu_flash":
            o = tpu_flash_attention(q, k, v)
        else:
            o = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        o = checkpoint_name(o, "attn_output")
        return self.out(o.reshape(*o.shape[:-2], -1))


class FeedForward(nnx.Module):
    """``W2 gelu_tanh(W1 x + b1) + b2``."""

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, keys=keys)
        self.up = Dense(cfg.dim, cfg.ffn_dim, (EMBED, MLP), **kw)
        self.down = Dense(cfg.ffn_dim, cfg.dim, (MLP, EMBED), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class WanBlock(nnx.Module):
    """One DiT block: modulated self-attention, cross-attention to the text, modulated FFN.

    ``modulation_table [1, 6, D]`` (float32) is added to the time projection ``m [B, 6, D]`` and
    split into (shift, scale, gate) for the self-attention and for the FFN.
    """

    def __init__(self, cfg: WanTransformerConfig, *, keys: KeyStream):
        self.eps = cfg.eps
        self.dtype = cfg.dtype
        self.modulation_table = _param(keys, nnx.initializers.normal(cfg.dim ** -0.5), (1, 6, cfg.dim),
                                       jnp.float32, (None, None, EMBED))
        self.self_attn = Attention(cfg, keys=keys)
        self.cross_norm = AffineLayerNorm(cfg.dim, cfg.eps, keys=keys) if cfg.cross_attn_norm else None
        self.cross_attn = Attention(cfg, keys=keys)
        self.ffn = FeedForward(cfg, keys=keys)

    def _modulate(self, x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
        return (_layer_norm_f32(x, self.eps) * (1.0 + scale) + shift).astype(self.dtype)

    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, time_mod: jnp.ndarray,
                 rope: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
        mod = self.modulation_table[...] + time_mod.astype(jnp.float32)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = jnp.split(mod, 6, axis=1)  # each [B, 1, D]

        attn = self.self_attn(self._modulate(x, shift_sa, scale_sa), rope=rope)
        x = (x.astype(jnp.float32) + attn * gate_sa).astype(self.dtype)

        normed = self.cross_norm(x).astype(self.dtype) if self.cross_norm is not None else x
        x = x + self.cross_attn(normed, context=context)

        ff = self.ffn(self._modulate(x, shift_ff, scale_ff))
        return (x.astype(jnp.float32) + ff.astype(jnp.float32) * gate_ff).astype(self.dtype)


def _run_block(block: WanBlock, x, context, time_mod, rope_cos, rope_sin):
    return block(x, context, time_mod, (rope_cos, rope_sin))


def _stacked_blocks(cfg: WanTransformerConfig, keys: KeyStream) -> WanBlock:
    """``cfg.num_layers`` blocks as one ``WanBlock`` whose parameters have a leading ``'layers'`` axis.

    Built by ``nnx.vmap`` over the layer index; block ``i`` draws the keys its per-block twin draws from
    ``keys`` (``KeyStream`` with a per-layer start), so the stacked parameters equal the per-block ones
    stacked, whatever the layout (``nnx.split_rngs`` would split the key instead and change them).
    """
    probe = KeyStream(keys.key)
    nnx.eval_shape(lambda: WanBlock(cfg, keys=probe))          # how many keys one block draws
    per_block, first = probe.count, keys.count
    keys.count += per_block * cfg.num_layers
    starts = first + per_block * jnp.arange(cfg.num_layers, dtype=jnp.uint32)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(start):
        return WanBlock(cfg, keys=KeyStream(keys.key, start))

    blocks = make(starts)
    # the leading axis gets its logical name (nnx.vmap adds it; set here where a flax version does not)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Variable):
            names = variable.get_metadata().get("out_sharding")
            if names is not None and len(names) == variable.ndim - 1:
                variable.set_metadata(out_sharding=(LAYERS, *names))
    return blocks


def stacked_layout(params: dict) -> bool:
    """Whether ``params`` (a pure dict of a ``WanTransformer``'s parameters) holds the stacked blocks."""
    blocks = params.get("blocks", {})
    return bool(blocks) and not all(isinstance(k, int) or str(k).isdigit() for k in blocks)


def stack_blocks(params: dict, stack=None) -> dict:
    """Per-block parameters (``{'blocks': {0: tree, 1: tree, ...}, ...}``; keys ints or digit strings, as
    orbax and packed files give them) -> the ``scan_layers`` layout (``{'blocks': tree}``, each leaf the
    blocks' leaves stacked on a new leading axis). ``stack(path, leaves) -> array`` does the stacking
    (default ``np.stack`` / ``jnp.stack``), e.g. onto a sharding. Other entries are kept as they are."""
    blocks = params["blocks"]
    ordered = [blocks[k] for k in sorted(blocks, key=int)]
    if [int(k) for k in sorted(blocks, key=int)] != list(range(len(ordered))):
        raise ValueError(f"per-block parameters need blocks 0..{len(ordered) - 1}, got {sorted(blocks, key=int)}")

    def default(_, leaves):
        return np.stack(leaves) if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack(leaves)

    stack = stack or default
    stacked = jax.tree_util.tree_map_with_path(lambda path, *leaves: stack(path, leaves), *ordered)
    return {**params, "blocks": stacked}


def unstack_blocks(params: dict) -> dict:
    """The ``scan_layers`` layout -> per-block parameters (``{'blocks': {0: tree, 1: tree, ...}}``)."""
    blocks = params["blocks"]
    n = {x.shape[0] for x in jax.tree.leaves(blocks)}
    if len(n) != 1:
        raise ValueError(f"stacked blocks with different leading (layer) sizes {sorted(n)}")
    return {**params, "blocks": {i: jax.tree.map(lambda x: x[i], blocks) for i in range(n.pop())}}


def convert_layout(model: "WanTransformer", scan_layers: bool) -> "WanTransformer":
    """``model`` with its blocks stacked (``scan_layers=True``) or one module per block, same values;
    ``model`` itself when it has that layout already. For plain models (no LoRA adapters)."""
    if model.config.scan_layers == scan_layers:
        return model
    cfg = dataclasses.replace(model.config, scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.replace_by_pure_dict(state, stack_blocks(params) if scan_layers else unstack_blocks(params))
    return nnx.merge(graphdef, state)


class WanTransformer(nnx.Module):
    """The Wan2.1 T2V transformer; see the module docstring for the forward pass."""

    def __init__(self, config: WanTransformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        keys = KeyStream(rngs.params())
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, keys=keys)
        self.patch_embed = PatchEmbed3D(cfg, keys=keys)
        self.time_embed = TimestepEmbedder(cfg, keys=keys)
        self.time_proj = Dense(cfg.dim, 6 * cfg.dim, (EMBED, MODULATION), **kw)
        self.text_embed = TextEmbedder(cfg, keys=keys)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, keys)
        else:
            self.blocks = nnx.List([WanBlock(cfg, keys=keys) for _ in range(cfg.num_layers)])
        self.head_modulation_table = _param(keys, nnx.initializers.normal(cfg.dim ** -0.5), (1, 2, cfg.dim),
                                            jnp.float32, (None, None, EMBED))
        self.proj_out = Dense(cfg.dim, cfg.patch_volume * cfg.out_channels, (EMBED, PATCH), **kw)

    def _run_blocks(self, x, context, time_mod, rope_cos, rope_sin):
        cfg = self.config
        run = _run_block
        if cfg.remat_policy != "none":
            # graph_updates=False: as for the scan below (a block's variables may belong to an outer trace)
            run = nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat_policy], graph_updates=False)
        if not cfg.scan_layers:
            for block in self.blocks:
                x = run(block, x, context, time_mod, rope_cos, rope_sin)
            return x

        # graph_updates=False: the blocks only flow in (nothing to send back), and their variables may
        # belong to an outer trace (a model merged inside jax.grad from closed-over state)
        @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, None), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: LAYERS}, graph_updates=False)
        def scan(block, h, context, time_mod, rope_cos, rope_sin):
            return run(block, h, context, time_mod, rope_cos, rope_sin)

        return scan(self.blocks, x, context, time_mod, rope_cos, rope_sin)

    def _check_inputs(self, latents, timestep, context) -> tuple[int, int, int]:
        cfg = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be channels-last [B, T, H, W, C], got shape {latents.shape}")
        b, t, h, w, c = latents.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels (last axis) but the model expects "
                             f"in_channels={cfg.in_channels}; latents are channels-last [B, T, H, W, C]")
        bad = [f"{axis}={n} (patch {p})" for axis, n, p in zip("THW", (t, h, w), cfg.patch_size) if n % p]
        if bad:
            raise ValueError(f"latent T/H/W must be divisible by patch_size {cfg.patch_size}: {', '.join(bad)}")
        grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim={cfg.text_dim}], got shape {context.shape}")
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} != latent batch {b}")
        if timestep.shape not in ((b,), ()):
            raise ValueError(f"timestep must be [B={b}] (or a scalar), got shape {timestep.shape}")
        return grid

    def __call__(self, latents: jnp.ndarray, timestep: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """``latents [B, T, H, W, C_in]``, ``timestep [B]`` (0..1000), ``context [B, L, text_dim]``
        -> velocity ``[B, T, H, W, C_out]`` in the compute dtype."""
        cfg = self.config
        timestep = jnp.asarray(timestep)
        grid = self._check_inputs(latents, timestep, context)
        timestep = jnp.broadcast_to(timestep.astype(jnp.float32), latents.shape[:1])

        x = self.patch_embed(latents)
        temb = self.time_embed(timestep).astype(cfg.dtype)                                     # [B, D]
        time_mod = self.time_proj(jax.nn.silu(temb)).reshape(temb.shape[0], 6, cfg.dim)        # [B, 6, D]
        context = self.text_embed(context.astype(cfg.dtype))
        rope_cos, rope_sin = (jnp.asarray(a) for a in rope_tables(grid, cfg.head_dim, cfg.rope_theta))

        x = self._run_blocks(x, context, time_mod, rope_cos, rope_sin)

        shift, scale = jnp.split(self.head_modulation_table[...] + temb.astype(jnp.float32)[:, None, :], 2, axis=1)
        x = (_layer_norm_f32(x, cfg.eps) * (1.0 + scale) + shift).astype(cfg.dtype)
        return unpatchify(self.proj_out(x), grid, cfg.patch_size)
