"""The Wan2.1 causal 3D VAE (diffusers ``AutoencoderKLWan``) in Flax NNX, channels-last.

Shapes (default config): video ``[B, T, H, W, 3]`` in ``[-1, 1]`` with ``T = 1 + 4k``;
latents ``[B, T', H/8, W/8, 16]`` with ``T' = 1 + (T - 1) // 4``.

Videos are processed as a stream of temporal chunks, the way the reference model does it: the encoder
sees frame 0 alone, then chunks of 4 frames (each gives one latent frame); the decoder sees one latent
frame at a time (the first gives 1 video frame, each later one gives 4). Every causal convolution reads
the last frames of the previous chunk from a cache that is passed functionally from chunk to chunk; the
equal-size chunks after the first run under one ``jax.lax.scan``, so compile time and activation memory
do not grow with the number of frames. Like the reference, trailing frames that do not fill a chunk of
4 are dropped by ``encode`` (``T = 7`` encodes frames 0..4 only).

Posterior: the encoder gives ``2 z_dim`` channels, ``[mean, logvar]``, with ``logvar`` clamped to
``[-30, 20]``; ``encode`` returns the mean (unnormalised, as diffusers' ``latent_dist.mean``).
Normalised latents, the diffusion model's space: ``(z - latents_mean) / latents_std`` per channel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.models.causal_conv import CausalConv3d, Conv3d, Dtype, Precision
from shelllcc.models.wan_vae_blocks import (
    Cache,
    MidBlock,
    Resample,
    ResidualBlock,
    UpBlock,
    cache_part,
    channel_rms_norm,
)

Array = jax.Array

ENCODE_CHUNK_FRAMES = 4  # frames per encoder chunk after the first frame (fixed by the reference model)
LOGVAR_RANGE = (-30.0, 20.0)

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the VAE (field names follow diffusers, with ``temperal_`` spelled ``temporal_``).

    Encoder widths ``base_dim * [1] + dim_mult``; each level but the last halves H and W, and halves T
    where ``temporal_downsample`` says so. ``attn_scales`` must be empty: no released Wan VAE uses it and
    diffusers' own chunked forward fails when it is not (its attention blocks reject the cache arguments).
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling "
                             f"level), got {self.temporal_downsample}")
        if self.attn_scales:
            raise ValueError(f"attn_scales={self.attn_scales} is not supported (must be empty, as in Wan2.1)")
        if sum(self.temporal_downsample) > 2:
            raise ValueError("at most 2 temporal downsamplings: a chunk of 4 frames must keep at least one frame")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)} and {len(self.latents_std)}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a video of ``num_frames``: ``1 + ((T - 1) // 4) * (4 // temporal_factor)``."""
        return 1 + (num_frames - 1) // ENCODE_CHUNK_FRAMES * (ENCODE_CHUNK_FRAMES // self.temporal_factor)

    def video_frames(self, num_latent_frames: int) -> int:
        """Frames decoded from ``T'`` latent frames: ``1 + (T' - 1) * temporal_factor``."""
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    @classmethod
    def preset(cls, name: str) -> "WanVAEConfig":
        """``wan2.1``: the released VAE. ``tiny``: same topology (8x / 4x compression), small widths."""
        if name not in PRESETS:
            raise ValueError(f"unknown WanVAE preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "wan2.1": WanVAEConfig(),
    "tiny": WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                         latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
}


def config_from_diffusers(config: Mapping[str, Any]) -> WanVAEConfig:
    """``WanVAEConfig`` from an ``AutoencoderKLWan`` ``config.json`` dict (Wan2.1 layout only)."""
    if config.get("is_residual", False):
        raise ValueError("is_residual=True (the Wan2.2 VAE) is not supported; only the Wan2.1 VAE is")
    if config.get("patch_size") is not None:
        raise ValueError(f"patch_size={config['patch_size']} (the Wan2.2 VAE) is not supported")
    defaults = WanVAEConfig()
    z_dim = config.get("z_dim", defaults.z_dim)
    return WanVAEConfig(
        base_dim=config.get("base_dim", defaults.base_dim),
        decoder_base_dim=config.get("decoder_base_dim"),
        z_dim=z_dim,
        dim_mult=tuple(config.get("dim_mult", defaults.dim_mult)),
        num_res_blocks=config.get("num_res_blocks", defaults.num_res_blocks),
        attn_scales=tuple(config.get("attn_scales", defaults.attn_scales)),
        temporal_downsample=tuple(bool(b) for b in config.get("temperal_downsample", defaults.temporal_downsample)),
        in_channels=config.get("in_channels", defaults.in_channels),
        out_channels=config.get("out_channels", defaults.out_channels),
        latents_mean=tuple(float(v) for v in config.get("latents_mean", defaults.latents_mean)),
        latents_std=tuple(float(v) for v in config.get("latents_std", defaults.latents_std)),
    )


# ----------------------------------------------------------------------------------------- latent scaling

def normalize_latents(z: Array, latents_mean: Sequence[float] | Array, latents_std: Sequence[float] | Array) -> Array:
    """VAE latents -> diffusion latents: ``(z - mean) / std`` over the channel (last) axis."""
    mean, std = jnp.asarray(latents_mean, z.dtype), jnp.asarray(latents_std, z.dtype)
    return (z - mean) / std


def denormalize_latents(z: Array, latents_mean: Sequence[float] | Array, latents_std: Sequence[float] | Array) -> Array:
    """Diffusion latents -> VAE latents: ``z * std + mean``.

    The diffusers Wan pipeline writes this as ``z / (1 / std) + mean`` before ``vae.decode``.
    """
    mean, std = jnp.asarray(latents_mean, z.dtype), jnp.asarray(latents_std, z.dtype)
    return z * std + mean


# ------------------------------------------------------------------------------------- encoder / decoder

class Encoder3d(nnx.Module):
    """Video chunk ``[B, T, H, W, Cin]`` -> ``[B, T'', H/8, W/8, 2 z_dim]`` (moments before ``quant_conv``).

    ``down_blocks`` is a flat list of residual blocks and resamplers, numbered as in the reference.
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, **kw):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], rngs=rngs, **kw)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, rngs=rngs, **kw))
                in_dim = out_dim
            if level < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode, rngs=rngs, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs, **kw)
        self.norm_out = channel_rms_norm(dims[-1], kw)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, rngs=rngs, **kw)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        new = {}
        x, new["conv_in"] = self.conv_in.step(x, cache_part(cache, "conv_in"))
        down, old_down = [], cache_part(cache, "down_blocks")
        for i, block in enumerate(self.down_blocks):
            x, c = block(x, cache_part(old_down, i))
            down.append(c)
        new["down_blocks"] = tuple(down)
        x, new["mid_block"] = self.mid_block(x, cache_part(cache, "mid_block"))
        x, new["conv_out"] = self.conv_out.step(nnx.silu(self.norm_out(x)), cache_part(cache, "conv_out"))
        return x, new


class Decoder3d(nnx.Module):
    """Latent chunk ``[B, T', h, w, z_dim]`` -> video ``[B, T, 8h, 8w, Cout]`` (before clamping).

    Widths ``decoder_base_dim * [dim_mult[-1]] + reversed(dim_mult)``; every stage but the first takes
    half the width of the previous stage's output, because the reference upsamplers halve the width.
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, **kw):
        base = cfg.base_dim if cfg.decoder_base_dim is None else cfg.decoder_base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], rngs=rngs, **kw)
        self.mid_block = MidBlock(dims[0], rngs=rngs, **kw)
        stages = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2
            mode = None
            if level < len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
            stages.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, rngs=rngs, **kw))
        self.up_blocks = nnx.List(stages)
        self.norm_out = channel_rms_norm(dims[-1], kw)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, rngs=rngs, **kw)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        new = {}
        x, new["conv_in"] = self.conv_in.step(x, cache_part(cache, "conv_in"))
        x, new["mid_block"] = self.mid_block(x, cache_part(cache, "mid_block"))
        ups, old_ups = [], cache_part(cache, "up_blocks")
        for i, stage in enumerate(self.up_blocks):
            x, c = stage(x, cache_part(old_ups, i))
            ups.append(c)
        new["up_blocks"] = tuple(ups)
        x, new["conv_out"] = self.conv_out.step(nnx.silu(self.norm_out(x)), cache_part(cache, "conv_out"))
        return x, new


def run_chunked(step, first: Array, rest: Array | None, *, remat: bool = False) -> Array:
    """Stream chunks through ``step(chunk, cache) -> (out, cache)``, concatenating outputs along time.

    ``first [B, T0, ...]`` starts the stream (``cache=None``); ``rest [N, B, Tc, ...]`` are equal chunks,
    scanned with the cache as carry. Returns ``[B, T0_out + N * Tc_out, ...]``. ``remat`` recomputes each
    chunk's activations in the backward pass instead of storing them (memory for gradients ~ one chunk).
    """
    out, cache = step(first, None)
    if rest is None or rest.shape[0] == 0:
        return out

    def body(carry, chunk):
        y, carry = step(chunk, carry)
        return carry, y

    if remat:
        body = jax.checkpoint(body)
    _, ys = jax.lax.scan(body, cache, rest)
    ys = jnp.moveaxis(ys, 0, 1)  # [B, N, Tc_out, ...]
    ys = ys.reshape(ys.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([out, ys.astype(out.dtype)], axis=1)


# ------------------------------------------------------------------------------------------------- VAE

class WanVAE(nnx.Module):
    """Encoder, ``quant_conv``, ``post_quant_conv`` and decoder of the Wan2.1 VAE.

    ``dtype``: compute dtype of activations (e.g. ``jnp.bfloat16``); norms and attention softmax run in
    float32 regardless. ``param_dtype``: storage dtype of the weights (cast to ``dtype`` when used).
    ``precision``: passed to every convolution / matmul (e.g. ``"highest"`` for float32 parity on GPU/TPU).
    """

    def __init__(self, config: WanVAEConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 precision: Precision = None, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        z = config.z_dim
        self.encoder = Encoder3d(config, rngs=rngs, **kw)
        self.quant_conv = Conv3d(2 * z, 2 * z, (1, 1, 1), rngs=rngs, **kw)
        self.post_quant_conv = Conv3d(z, z, (1, 1, 1), rngs=rngs, **kw)
        self.decoder = Decoder3d(config, rngs=rngs, **kw)

    # ---- input checks (shapes are static, so these also run under jit)
    def _check_video(self, video: Array) -> None:
        cfg = self.config
        if video.ndim != 5:
            raise ValueError(f"video must have rank 5 [B, T, H, W, C] (channels last), got shape {video.shape}")
        b, t, h, w, c = video.shape
        if c != cfg.in_channels:
            raise ValueError(f"video has {c} channels (last axis), expected {cfg.in_channels}; "
                             f"layout is [B, T, H, W, C], shape {video.shape}")
        if t < 1:
            raise ValueError(f"video has no frames: shape {video.shape}")
        f = cfg.spatial_factor
        if h % f or w % f:
            raise ValueError(f"video height and width must be divisible by {f}, got {h}x{w}")

    def _check_latents(self, latents: Array) -> None:
        if latents.ndim != 5:
            raise ValueError(f"latents must have rank 5 [B, T', h, w, C] (channels last), got shape {latents.shape}")
        if latents.shape[-1] != self.config.z_dim:
            raise ValueError(f"latents have {latents.shape[-1]} channels (last axis), expected "
                             f"z_dim={self.config.z_dim}; shape {latents.shape}")
        if latents.shape[1] < 1:
            raise ValueError(f"latents have no frames: shape {latents.shape}")

    # ---- encoding
    def encode_moments(self, video: Array) -> tuple[Array, Array]:
        """``video [B, T, H, W, Cin]`` in [-1, 1] -> ``(mean, logvar)``, each ``[B, T', H/8, W/8, z_dim]``.

        ``T' = config.latent_frames(T)``; frames past the last full chunk of 4 are ignored, as in diffusers.
        ``logvar`` is clamped to ``[-30, 20]``.
        """
        self._check_video(video)
        b, t, h, w, c = video.shape
        n = (t - 1) // ENCODE_CHUNK_FRAMES
        video = video.astype(self.dtype)
        rest = video[:, 1:1 + n * ENCODE_CHUNK_FRAMES].reshape(b, n, ENCODE_CHUNK_FRAMES, h, w, c)
        moments = run_chunked(self.encoder, video[:, :1], jnp.moveaxis(rest, 1, 0))
        moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode(self, video: Array) -> Array:
        """Posterior mean ``[B, T', H/8, W/8, z_dim]`` (unnormalised; diffusers ``latent_dist.mean``)."""
        return self.encode_moments(video)[0]

    def encode_sample(self, video: Array, key: Array) -> Array:
        """A posterior sample ``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn with ``key``."""
        mean, logvar = self.encode_moments(video)
        return sample_posterior(mean, logvar, key)

    # ---- decoding
    def decode(self, latents: Array, *, clamp: bool = True, remat: bool = False) -> Array:
        """``latents [B, T', h, w, z_dim]`` (unnormalised) -> video ``[B, 1 + 4 (T'-1), 8h, 8w, Cout]``.

        ``clamp``: clip to [-1, 1] as diffusers does (its gradient is zero where the clip is active).
        ``remat``: rematerialise each latent frame's activations in the backward pass (less memory).
        Differentiable in ``latents``.
        """
        self._check_latents(latents)
        x = self.post_quant_conv(latents.astype(self.dtype))
        rest = jnp.moveaxis(x[:, 1:], 1, 0)[:, :, None]  # [T'-1, B, 1, h, w, C]
        video = run_chunked(self.decoder, x[:, :1], rest, remat=remat)
        return jnp.clip(video, -1.0, 1.0) if clamp else video

    # ---- latent scaling with this VAE's statistics
    def normalize(self, z: Array) -> Array:
        return normalize_latents(z, self.config.latents_mean, self.config.latents_std)

    def denormalize(self, z: Array) -> Array:
        return denormalize_latents(z, self.config.latents_mean, self.config.latents_std)


def sample_posterior(mean: Array, logvar: Array, key: Array) -> Array:
    """``mean + exp(0.5 logvar) * eps`` with ``eps ~ N(0, I)`` of ``mean``'s shape and dtype."""
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps
