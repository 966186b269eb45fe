"""Building blocks of the Wan2.1 causal video VAE, channels-last (``[B, T, H, W, C]``).

Every block is called on one temporal *chunk* of a video as ``block(x, cache) -> (y, cache')``. ``cache``
is a pytree of the frames its causal convolutions need from earlier chunks; ``None`` marks the first
chunk of a video (zeros as the past, and the first-chunk rules of the temporal resamplers below). The
returned cache has the same structure and shapes for every later chunk of the same size, which is what
lets the VAE ``jax.lax.scan`` over chunks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.models.causal_conv import CausalConv3d, Conv3d, Dtype, FrameConv2d

Array = jax.Array
Cache = Any

_NORM_EPS = 1e-12  # lower bound on the channel norm (the reference normalises with this epsilon)


def cache_part(cache: Cache, key) -> Cache:
    """``cache[key]``, or ``None`` (first chunk) when ``cache`` is ``None``."""
    return None if cache is None else cache[key]


def channel_rms_norm(dim: int, layer_kw: dict) -> "ChannelRMSNorm":
    """A ``ChannelRMSNorm`` with the dtypes of the conv keyword arguments ``layer_kw``."""
    return ChannelRMSNorm(dim, dtype=layer_kw.get("dtype", jnp.float32),
                          param_dtype=layer_kw.get("param_dtype", jnp.float32))


class ChannelRMSNorm(nnx.Module):
    """``y = x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` with the norm over channels (the last axis).

    Equal to an RMS norm with epsilon 0; the norm is taken in float32 whatever the compute dtype.
    """

    def __init__(self, dim: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.scale = math.sqrt(dim)
        self.dtype = dtype
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        # x / max(||x||, eps) written as x * rsqrt(max(||x||^2, eps^2)): same value, finite gradient at x = 0
        y = (xf * jax.lax.rsqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), _NORM_EPS ** 2)))
        y = y.astype(self.dtype)
        return y * (self.scale * self.gamma[...].astype(self.dtype))


class ResidualBlock(nnx.Module):
    """``x -> conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)``; 3x3x3 causal convs.

    ``shortcut`` is a 1x1x1 conv when the channel count changes, else the identity. Dropout of the
    reference is omitted: the VAE is only used in evaluation mode. Cache: ``(past of conv1, past of conv2)``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, **kw):
        self.norm1 = channel_rms_norm(in_dim, kw)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), rngs=rngs, **kw)
        self.norm2 = channel_rms_norm(out_dim, kw)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), rngs=rngs, **kw)
        self.conv_shortcut = Conv3d(in_dim, out_dim, (1, 1, 1), rngs=rngs, **kw) if in_dim != out_dim else None

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h, past1 = self.conv1.step(nnx.silu(self.norm1(x)), cache_part(cache, 0))
        h, past2 = self.conv2.step(nnx.silu(self.norm2(h)), cache_part(cache, 1))
        return h + shortcut.astype(h.dtype), (past1, past2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the ``H*W`` positions of each frame, plus the input.

    ``q, k, v = split(to_qkv(norm(x)))``; ``y = x + proj(softmax(q k^T / sqrt(C)) v)``; logits and softmax
    in float32. No temporal context, so no cache.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, **kw):
        self.norm = channel_rms_norm(dim, kw)
        self.to_qkv = FrameConv2d(dim, 3 * dim, 1, rngs=rngs, **kw)
        self.proj = FrameConv2d(dim, dim, 1, rngs=rngs, **kw)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(b, t, h, w, c)
        return x.astype(out.dtype) + self.proj(out), None


class MidBlock(nnx.Module):
    """``resnets[0] -> attentions[0] -> resnets[1]`` at the lowest resolution. Cache: the two resnets'."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, **kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs, **kw)])

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        x, c0 = self.resnets[0](x, cache_part(cache, 0))
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, cache_part(cache, 1))
        return x, (c0, c1)


def _upsample_nearest_2x(x: Array) -> Array:
    """``[..., H, W, C] -> [..., 2H, 2W, C]`` repeating each pixel (nearest neighbour at scale 2)."""
    *lead, h, w, c = x.shape
    x = jnp.broadcast_to(x[..., :, None, :, None, :], (*lead, h, 2, w, 2, c))
    return x.reshape(*lead, 2 * h, 2 * w, c)


class Resample(nnx.Module):
    """Spatial 2x down/up-sampling, optionally with 2x temporal down/up-sampling.

    ``downsample2d``: zero-pad one row/column at the bottom/right, 3x3 conv with stride 2.
    ``downsample3d``: the same, then (except on the first chunk) a (3,1,1) conv with time stride 2 over
        ``[last frame of the previous chunk, x]``: chunk of ``T`` frames -> ``T/2``; the first chunk passes
        through in time. Cache: the last frame (after the spatial conv).
    ``upsample2d``: nearest 2x, 3x3 conv to ``out_dim`` (default ``dim // 2``).
    ``upsample3d``: first, except on the first chunk, a causal (3,1,1) conv ``dim -> 2 dim`` whose two
        channel halves become two consecutive frames (chunk of ``T`` frames -> ``2T``); then as
        ``upsample2d``. On the first chunk nothing happens in time and the conv's past stays zeros, so
        the second chunk sees zeros, not the first chunk, as its past. Cache: the conv's past.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, rngs: nnx.Rngs, **kw):
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("down"):
            self.resample = FrameConv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, **kw)
        else:
            out_dim = dim // 2 if out_dim is None else out_dim
            self.resample = FrameConv2d(dim, out_dim, 3, rngs=rngs, **kw)
        if mode == "downsample3d":
            self.time_conv = Conv3d(dim, dim, (3, 1, 1), time_stride=2, rngs=rngs, **kw)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs, **kw)
        else:
            self.time_conv = None

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        if self.mode == "upsample3d":
            if cache is None:
                cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), self.time_conv.dtype)
            else:
                y, cache = self.time_conv.step(x, cache)
                b, t, h, w, c2 = y.shape
                # channel block j of frame i becomes frame 2i + j
                x = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
            x = _upsample_nearest_2x(x)
        elif self.mode == "upsample2d":
            x = _upsample_nearest_2x(x)
        x = self.resample(x)
        if self.mode == "downsample3d":
            last = x[:, -1:]
            if cache is not None:
                x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
            cache = last
        return x, cache


class UpBlock(nnx.Module):
    """Decoder stage: ``num_res_blocks + 1`` residual blocks, then an optional ``Resample`` (upsampling)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 rngs: nnx.Rngs, **kw):
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, rngs=rngs, **kw) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = None if upsample_mode is None else Resample(out_dim, upsample_mode, rngs=rngs, **kw)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        caches = []
        for i, resnet in enumerate(self.resnets):
            x, c = resnet(x, cache_part(cache, i))
            caches.append(c)
        if self.upsampler is not None:
            x, c = self.upsampler(x, cache_part(cache, len(self.resnets)))
            caches.append(c)
        return x, tuple(caches)
