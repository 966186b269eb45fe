"""A CPU-trainable video VAE with the Wan2.1 VAE's latent layout, for the embedded benchmark.

Same interface and latent geometry as :class:`shelllcc.models.wan_vae.WanVAE` (channels last, 8x
spatial and 4x temporal compression, ``T' = 1 + (T - 1) // 4``, causal in time, the first frame coded
alone), but built from space-time patches instead of a convolution pyramid:

* tokenise: latent frame 0 is frame 0 repeated ``tp`` times, latent frame ``k >= 1`` holds frames
  ``tp (k - 1) + 1 .. tp k``; each ``tp x p x p x C`` block is one token (768 values at 4 x 8 x 8 x 3);
* encoder: ``Linear(token -> width)``, ``depth`` residual blocks, ``LayerNorm``, ``Linear(width -> 2 z)``
  giving the posterior mean and log-variance;
* decoder: ``Linear(z -> width)``, ``depth`` blocks, ``LayerNorm``, ``Linear(width -> token)``; latent
  frame 0 decodes to ``tp`` frames of which the last is frame 0;
* a block: ``x + Up(conv3d(Down(LN x)))`` (a 3 x 3 x 3 convolution over latent positions, causal in
  time, at ``conv_width`` channels: neighbouring tokens agree at their borders) then
  ``x + W2 gelu(W1 LN x)``.

Why not the Wan architecture itself: its full-resolution 3D convolutions train at about 0.2 clips/s
on two CPU cores even at 8 base channels, too slow for a 15-minute demonstration; all its compute sits
at pixel resolution, while here every layer runs at latent resolution (64x fewer positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.models.wan_vae import LOGVAR_RANGE, denormalize_latents, normalize_latents

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PatchVAEConfig:
    """Architecture; ``latents_mean``/``latents_std`` are per-channel statistics of encoded training
    data (set after training, as Wan's VAE config carries them), used by :meth:`PatchVAE.normalize`."""

    z_dim: int = 16
    patch: int = 8                  # spatial patch side (spatial compression)
    temporal_patch: int = 4         # frames per latent frame after the first (temporal compression)
    in_channels: int = 3
    width: int = 256
    depth: int = 1
    conv_width: int = 64
    mlp_ratio: float = 1.0
    latents_mean: tuple[float, ...] = (0.0,) * 16
    latents_std: tuple[float, ...] = (1.0,) * 16

    def __post_init__(self):
        object.__setattr__(self, "latents_mean", tuple(float(x) for x in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(x) for x in self.latents_std))
        for field in ("z_dim", "patch", "temporal_patch", "in_channels", "width", "conv_width"):
            if getattr(self, field) < 1:
                raise ValueError(f"PatchVAEConfig.{field} must be positive, got {getattr(self, field)}")
        if self.depth < 0:
            raise ValueError(f"PatchVAEConfig.depth must be >= 0, got {self.depth}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)} and {len(self.latents_std)}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")

    @property
    def spatial_factor(self) -> int:
        return self.patch

    @property
    def temporal_factor(self) -> int:
        return self.temporal_patch

    @property
    def token_dim(self) -> int:
        return self.temporal_patch * self.patch * self.patch * self.in_channels

    def latent_frames(self, num_frames: int) -> int:
        """``1 + (T - 1) // tp``: frames past the last full group are not coded (as in Wan)."""
        return 1 + (num_frames - 1) // self.temporal_patch

    def video_frames(self, num_latent_frames: int) -> int:
        return 1 + (num_latent_frames - 1) * self.temporal_patch


def tokenize(video: Array, cfg: PatchVAEConfig) -> Array:
    """``[B, T, H, W, C] -> [B, T', H/p, W/p, tp p p C]`` (frame 0 repeated to fill latent frame 0)."""
    b, t, h, w, c = video.shape
    tp, p = cfg.temporal_patch, cfg.patch
    n = (t - 1) // tp
    frames = jnp.concatenate([jnp.repeat(video[:, :1], tp, axis=1), video[:, 1:1 + n * tp]], axis=1)
    x = frames.reshape(b, n + 1, tp, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, n + 1, h // p, w // p, cfg.token_dim)


def untokenize(tokens: Array, cfg: PatchVAEConfig) -> Array:
    """Inverse of :func:`tokenize`: ``[B, T', h, w, D] -> [B, 1 + tp (T' - 1), h p, w p, C]``."""
    b, t1, h, w, _ = tokens.shape
    tp, p, c = cfg.temporal_patch, cfg.patch, cfg.in_channels
    x = tokens.reshape(b, t1, h, w, tp, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(b, t1 * tp, h * p, w * p, c)
    return x[:, tp - 1:]   # latent frame 0 carries frame 0 in each of its tp slots; keep the last


def _taps(h: Array) -> Array:
    """``[B, T, H, W, C] -> [B, T, H, W, 27 C]``: each position's 3 x 3 x 3 neighbourhood, causal in time
    (the current and two previous frames), centred in space, zero outside.

    A convolution written as this gather plus one matmul runs several times faster on CPU than XLA's
    convolution (forward and backward) at these small channel counts."""
    t, hh, ww = h.shape[1:4]
    p = jnp.pad(h, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([p[:, a:a + t, b:b + hh, c:c + ww] for a in range(3) for b in range(3) for c in range(3)],
                           axis=-1)


class _Block(nnx.Module):
    def __init__(self, cfg: PatchVAEConfig, *, dtype, rngs: nnx.Rngs):
        w, cw = cfg.width, cfg.conv_width
        hidden = max(1, int(round(w * cfg.mlp_ratio)))
        kw = dict(dtype=dtype, rngs=rngs)
        self.norm_conv = nnx.LayerNorm(w, **kw)
        self.down = nnx.Linear(w, cw, **kw)
        self.conv = nnx.Linear(27 * cw, cw, **kw)      # a 3 x 3 x 3 convolution as one matmul over taps
        self.up = nnx.Linear(cw, w, **kw)
        self.norm_mlp = nnx.LayerNorm(w, **kw)
        self.fc1 = nnx.Linear(w, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, w, **kw)

    def __call__(self, x: Array) -> Array:
        h = self.down(self.norm_conv(x))
        x = x + self.up(jax.nn.gelu(self.conv(_taps(h))))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm_mlp(x))))


class _Stack(nnx.Module):
    def __init__(self, d_in: int, d_out: int, cfg: PatchVAEConfig, *, dtype, rngs: nnx.Rngs):
        self.proj_in = nnx.Linear(d_in, cfg.width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([_Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.width, dtype=dtype, rngs=rngs)
        self.proj_out = nnx.Linear(cfg.width, d_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm(x))


class PatchVAE(nnx.Module):
    """Encoder and decoder; video in ``[-1, 1]``, ``[B, T, H, W, C]``; latents ``[B, T', H/p, W/p, z]``."""

    def __init__(self, config: PatchVAEConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.encoder = _Stack(config.token_dim, 2 * config.z_dim, config, dtype=dtype, rngs=rngs)
        self.decoder = _Stack(config.z_dim, config.token_dim, config, dtype=dtype, rngs=rngs)

    def _check_video(self, video: Array) -> None:
        cfg = self.config
        if video.ndim != 5:
            raise ValueError(f"video must have rank 5 [B, T, H, W, C] (channels last), got shape {video.shape}")
        if video.shape[-1] != cfg.in_channels:
            raise ValueError(f"video has {video.shape[-1]} channels (last axis), expected {cfg.in_channels}; "
                             f"shape {video.shape}")
        if video.shape[1] < 1:
            raise ValueError(f"video has no frames: shape {video.shape}")
        if video.shape[2] % cfg.patch or video.shape[3] % cfg.patch:
            raise ValueError(f"video height and width must be divisible by {cfg.patch}, got "
                             f"{video.shape[2]}x{video.shape[3]}")

    def encode_moments(self, video: Array) -> tuple[Array, Array]:
        """``video`` in [-1, 1] -> ``(mean, logvar)``, each ``[B, T', H/p, W/p, z]``; logvar clamped."""
        self._check_video(video)
        moments = self.encoder(tokenize(video.astype(self.dtype), self.config))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode(self, video: Array) -> Array:
        """Posterior mean (unnormalised)."""
        return self.encode_moments(video)[0]

    def decode(self, latents: Array, *, clamp: bool = True, remat: bool = False) -> Array:
        """``latents [B, T', h, w, z]`` (unnormalised) -> video ``[B, 1 + tp (T' - 1), h p, w p, C]``.

        ``remat`` is accepted for interface parity with :class:`WanVAE` (nothing here needs it).
        """
        del remat
        if latents.ndim != 5 or latents.shape[-1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, T', h, w, {self.config.z_dim}] (channels last), got shape "
                             f"{latents.shape}")
        video = untokenize(self.decoder(latents.astype(self.dtype)), self.config).astype(jnp.float32)
        return jnp.clip(video, -1.0, 1.0) if clamp else video

    def normalize(self, z: Array) -> Array:
        return normalize_latents(z, self.config.latents_mean, self.config.latents_std)

    def denormalize(self, z: Array) -> Array:
        return denormalize_latents(z, self.config.latents_mean, self.config.latents_std)


def with_latent_stats(config: PatchVAEConfig, mean: Sequence[float], std: Sequence[float]) -> PatchVAEConfig:
    return dataclasses.replace(config, latents_mean=tuple(mean), latents_std=tuple(std))


__all__ = ["PatchVAE", "PatchVAEConfig", "tokenize", "untokenize", "with_latent_stats"]
