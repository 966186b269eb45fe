"""Channels-last convolutions for causal video models (NDHWC activations, DHWIO kernels).

``Conv3d``         valid in time, zero-padded in space; ``[B, T, H, W, Cin] -> [B, T', H', W', Cout]``.
``CausalConv3d``   a ``Conv3d`` that reads its temporal context from the caller: ``step(x, past)`` prepends
                   the ``kt - 1`` frames seen before ``x`` (zeros at the start of a video) and returns them
                   updated, so a video run chunk by chunk equals the same video run in one piece.
``FrameConv2d``    a 2D convolution applied to every frame independently.

Kernels are stored in ``param_dtype`` and cast to the compute ``dtype`` at call time. A kernel of size 1
everywhere is a per-position matrix product and is computed as one (cheaper than a convolution call).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Dtype = Any
Precision = Any

# PyTorch's default Conv initialisation draws U(-b, b) with b = 1/sqrt(fan_in); only used for fresh models.
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pointwise(x: Array, kernel: Array, precision: Precision) -> Array:
    """``x[..., Cin] @ kernel[Cin, Cout]``."""
    return jnp.einsum("...i,io->...o", x, kernel, precision=precision)


class Conv3d(nnx.Module):
    """3D convolution: no padding in time (callers supply past frames), symmetric zero padding in space.

    Kernel ``[kt, kh, kw, Cin, Cout]``, bias ``[Cout]``. Output frames: ``(T - kt) // time_stride + 1``;
    ``kh // 2`` / ``kw // 2`` zeros on each side keep the spatial size (odd kernels).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int] = (3, 3, 3), *,
                 time_stride: int = 1, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, precision: Precision = None, rngs: nnx.Rngs):
        kt, kh, kw = kernel_size
        self.kernel_size = (kt, kh, kw)
        self.time_stride = time_stride
        self.spatial_padding = (kh // 2, kw // 2)
        self.dtype, self.precision = dtype, precision
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (kt, kh, kw, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.kernel_size == (1, 1, 1) and self.time_stride == 1:
            y = _pointwise(x, kernel[0, 0, 0], self.precision)
        else:
            ph, pw = self.spatial_padding
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(self.time_stride, 1, 1), padding=((0, 0), (ph, ph), (pw, pw)),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv3d):
    """A stride-1 ``Conv3d`` whose output frame ``t`` sees input frames ``t - kt + 1 .. t`` only."""

    @property
    def context_frames(self) -> int:
        return self.kernel_size[0] - 1

    def step(self, x: Array, past: Array | None = None) -> tuple[Array, Array | None]:
        """One chunk of a video: ``x [B, T, H, W, Cin]``, ``past [B, kt-1, H, W, Cin]`` (``None``: zeros).

        Returns ``(y [B, T, H, W, Cout], past')`` where ``past'`` holds the last ``kt - 1`` frames of
        ``concat(past, x)``; ``past'`` is ``None`` for a kernel of one frame (no context needed).
        """
        n = self.context_frames
        if n == 0:
            return self(x), None
        x = x.astype(self.dtype)
        if past is None:  # the video starts here: causal zero padding
            past = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        return self(x), x[:, -n:]


class FrameConv2d(nnx.Module):
    """2D convolution of each frame: ``[..., H, W, Cin] -> [..., H', W', Cout]``.

    Kernel ``[kh, kw, Cin, Cout]``, bias ``[Cout]``; ``padding = ((top, bottom), (left, right))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, precision: Precision = None, rngs: nnx.Rngs):
        k = kernel_size
        self.kernel_size, self.stride = k, stride
        self.padding = ((k // 2, k // 2), (k // 2, k // 2)) if padding is None else tuple(map(tuple, padding))
        self.dtype, self.precision = dtype, precision
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (k, k, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.kernel_size == 1 and self.stride == 1:
            y = _pointwise(x, kernel[0, 0], self.precision)
        else:
            lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
            y = jax.lax.conv_general_dilated(
                x.reshape(-1, h, w, c), kernel, window_strides=(self.stride, self.stride), padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
            y = y.reshape(*lead, *y.shape[1:])
        return y + self.bias[...].astype(self.dtype)
