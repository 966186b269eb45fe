"""A text-video embedding space built in the project (issue 19): a dual encoder and a token-level matching
model on VAE latents and text-encoder token embeddings, the stand-ins for PISCES's InternVideo2
(``../shared/ALIGNMENT_METHODS.md`` section 4). The interface they serve, the losses that train them and the
attention hook the semantic reward plugs into are in :mod:`shelllcc.rewards.embeddings`.

Everything here is **ours** (InternVideo2 is a pixel-space ViT with a BERT text tower; its weights are
gated): sizes, pooling, positions and the temperature's initial value are our choices for the embedded
benchmark and are labelled where they are made.

* Visual tokens (:class:`VideoTokenizer`): latents ``[B, T, H, W, C]`` cut into patches of ``patch_size``
  ``(pt, ph, pw)`` (ours: ``(1, 2, 2)``, the DiT's), each flattened and projected to ``dim``, plus a projection
  of Fourier features (``position_frequencies`` octaves) of the token's normalised frame ``t / (T' - 1)`` and
  normalised 2-D position ``((row + 1/2) / h', (col + 1/2) / w')`` in ``[0, 1]``. Tokens are frame-major:
  token ``n`` is frame ``n // (h' w')``. The frame index (``0 .. T' - 1``) and the positions are static
  numpy arrays (:func:`token_grid`), handed to the attention hook as PISCES's ``t_j`` and ``s_j``.
* Text tokens: the text encoder's token embeddings ``[B, L, text_dim]`` (the latent cache's
  ``text_embeddings``, zero past the caption) and their mask, projected to ``dim``. No positions are added:
  the text encoder's outputs carry them already.
* Blocks: pre-norm transformer layers (``x + Attn(LN(x))``, ``x + MLP(LN(x))``), text self-attention with a
  key-padding mask.
* :class:`DualEncoder`: video tokens -> ``video_layers`` blocks -> mean over tokens -> LN -> Linear to
  ``embed_dim`` (512) -> L2-normalised; text tokens -> ``text_layers`` blocks -> mean over real tokens -> LN ->
  Linear -> L2-normalised. Mean pooling rather than a class token is ours. A temperature ``tau``
  (``log_temperature``, ours: initialised at 0.07 as CLIP does, ``1 / tau`` capped at 100) is a parameter;
  ``learn_temperature=False`` keeps it at its initial value (:meth:`DualEncoder.logit_scale` stops its
  gradient).
* :class:`MatchingModel`: video tokens -> ``video_layers`` blocks (the visual tokens); text tokens ->
  ``text_layers`` blocks; then ``cross_layers`` layers, each text self-attention, text-to-visual
  cross-attention (queries: text tokens; keys, values: visual tokens) and an MLP; the positive logit is a
  two-layer head on the mean of the real text tokens (ours). The cross-attention's weights go through an
  optional ``attention_transform`` per layer, where PISCES's transport plan is fused
  (:func:`shelllcc.rewards.embeddings.plan_transform`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# what the hook receives; see shelllcc.rewards.embeddings.AttentionTransform for the contract
AttentionTransform = Callable[..., jax.Array]

_NEG = -1e30          # a masked score: exp underflows to 0 in float32, no NaN from -inf - -inf


@dataclasses.dataclass(frozen=True)
class VideoTextConfig:
    """What both models share: the inputs' sizes and the transformer's width (defaults ours, sized for the
    embedded benchmark: latents ``[3, 16, 16, 16]``, text ``[16, 128]``)."""

    latent_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 128
    dim: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    video_layers: int = 2
    text_layers: int = 2
    position_frequencies: int = 4
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.video_layers < 0 or self.text_layers < 0:
            raise ValueError(f"video_layers / text_layers must be >= 0, got {self.video_layers} / {self.text_layers}")
        if self.position_frequencies < 1:
            raise ValueError(f"position_frequencies must be >= 1, got {self.position_frequencies}")


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig(VideoTextConfig):
    """:class:`VideoTextConfig` plus the shared embedding's width and the temperature (both module doc)."""

    embed_dim: int = 512
    temperature: float = 0.07
    learn_temperature: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class MatchingModelConfig(VideoTextConfig):
    """:class:`VideoTextConfig` plus the number of text-to-visual cross-attention layers."""

    video_layers: int = 1
    text_layers: int = 1
    cross_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.cross_layers < 1:
            raise ValueError(f"cross_layers must be >= 1 (the matcher reads the video through them), got "
                             f"{self.cross_layers}")


def token_grid(latent_shape, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """``(frame_index int32 [N], positions float32 [N, 2])`` of the visual tokens of latents ``[T, H, W, ...]``:
    frame-major order, positions the patch centres ``(row, col)`` normalised to ``[0, 1]``."""
    t, h, w = (int(s) // int(p) for s, p in zip(latent_shape[:3], patch_size))
    f, r, c = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    positions = np.stack([(r.ravel() + 0.5) / h, (c.ravel() + 0.5) / w], axis=-1).astype(np.float32)
    return f.ravel().astype(np.int32), positions


def _fourier(frame_index: np.ndarray, positions: np.ndarray, octaves: int) -> np.ndarray:
    frames = int(frame_index.max()) + 1
    coords = np.concatenate([(frame_index / max(frames - 1, 1))[:, None], positions], axis=-1)      # [N, 3]
    scaled = coords[:, :, None] * (np.pi * 2.0 ** np.arange(octaves))[None, None, :]               # [N, 3, K]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1).reshape(len(coords), -1).astype(np.float32)


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``x [B, L, D]`` over the positions where ``mask [B, L]`` is True (all when ``None``)."""
    if mask is None:
        return jnp.mean(x, axis=1)
    m = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class VideoTokenizer(nnx.Module):
    """``latents [B, T, H, W, C] -> (tokens [B, N, dim], frame_index [N], positions [N, 2])`` (module doc)."""

    def __init__(self, cfg: VideoTextConfig, *, rngs: nnx.Rngs):
        self.patch_size, self.channels, self.octaves = cfg.patch_size, cfg.latent_channels, cfg.position_frequencies
        self.patch = nnx.Linear(int(np.prod(cfg.patch_size)) * cfg.latent_channels, cfg.dim, rngs=rngs)
        self.position = nnx.Linear(6 * cfg.position_frequencies, cfg.dim, rngs=rngs)

    def __call__(self, latents):
        b, t, h, w, c = latents.shape
        pt, ph, pw = self.patch_size
        if c != self.channels:
            raise ValueError(f"latents have {c} channels, the model reads {self.channels}")
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {(t, h, w)} is not divisible by the patch {self.patch_size}")
        x = latents.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = self.patch(x.reshape(b, -1, pt * ph * pw * c).astype(jnp.float32))
        frame_index, positions = token_grid((t, h, w), self.patch_size)
        pos = self.position(jnp.asarray(_fourier(frame_index, positions, self.octaves)))
        return x + pos[None], frame_index, positions


class Attention(nnx.Module):
    """Multi-head attention with explicit weights, so that a hook can rewrite them before they mix values."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(4))

    def __call__(self, x, context=None, key_mask=None, transform: Callable | None = None):
        """``x [B, Lq, D]`` attends to ``context [B, Lk, D]`` (itself when ``None``); ``key_mask [B, Lk]``;
        ``transform(attn [B, H, Lq, Lk], q [B, H, Lq, dh], k [B, H, Lk, dh]) -> attn``."""
        context = x if context is None else context
        b, lq, d = x.shape
        heads = lambda y: y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d // self.num_heads)
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, _NEG)
        attn = jax.nn.softmax(scores, axis=-1)
        if transform is not None:
            attn = transform(attn, q, k)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, lq, d)
        return self.o(out)


class _MLP(nnx.Module):
    def __init__(self, cfg: VideoTextConfig, *, rngs: nnx.Rngs):
        hidden = int(round(cfg.mlp_ratio * cfg.dim))
        self.fc1, self.fc2 = nnx.Linear(cfg.dim, hidden, rngs=rngs), nnx.Linear(hidden, cfg.dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm self-attention layer (key-padding mask optional)."""

    def __init__(self, cfg: VideoTextConfig, *, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.norm1, self.norm2 = nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs), nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs)
        self.attn, self.mlp = Attention(cfg.dim, cfg.num_heads, rngs=rngs), _MLP(cfg, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.norm1(x), key_mask=mask)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nnx.Module):
    """Text self-attention, text-to-visual cross-attention (its weights through ``transform``), MLP; pre-norm."""

    def __init__(self, cfg: VideoTextConfig, *, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.norm1, self.norm2, self.norm3 = (nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs) for _ in range(3))
        self.self_attn = Attention(cfg.dim, cfg.num_heads, rngs=rngs)
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, rngs=rngs)
        self.mlp = _MLP(cfg, rngs=rngs)

    def __call__(self, text, mask, visual, transform=None):
        text = text + self.self_attn(self.norm1(text), key_mask=mask)
        text = text + self.cross_attn(self.norm2(text), visual, transform=transform)
        return text + self.mlp(self.norm3(text))


def _check_text(text_tokens, mask, text_dim: int):
    if text_tokens.ndim != 3 or text_tokens.shape[-1] != text_dim:
        raise ValueError(f"text tokens must be [B, L, {text_dim}], got {tuple(text_tokens.shape)}")
    if mask is None:
        raise ValueError("a text mask [B, L] is required (True at the caption's real tokens)")
    if tuple(mask.shape) != tuple(text_tokens.shape[:2]):
        raise ValueError(f"text mask {tuple(mask.shape)} does not match text tokens {tuple(text_tokens.shape[:2])}")
    return jnp.asarray(text_tokens, jnp.float32), jnp.asarray(mask, bool)


def _l2_normalise(x):
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class DualEncoder(nnx.Module):
    """Video latents and text tokens to unit vectors of one ``embed_dim`` space (module doc); implements
    :class:`shelllcc.rewards.embeddings.VideoTextEmbedder`."""

    def __init__(self, config: DualEncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        eps = cfg.layer_norm_eps
        self.video_in = VideoTokenizer(cfg, rngs=rngs)
        self.video_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.video_layers)])
        self.video_norm = nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs)
        self.video_proj = nnx.Linear(cfg.dim, cfg.embed_dim, rngs=rngs)
        self.text_in = nnx.Linear(cfg.text_dim, cfg.dim, rngs=rngs)
        self.text_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.text_layers)])
        self.text_norm = nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs)
        self.text_proj = nnx.Linear(cfg.dim, cfg.embed_dim, rngs=rngs)
        self.log_temperature = nnx.Param(jnp.log(jnp.asarray(cfg.temperature, jnp.float32)))

    def embed_video(self, latents) -> jax.Array:
        """Normalised latents ``[B, T, H, W, C]`` -> unit vectors ``[B, embed_dim]``."""
        x, _, _ = self.video_in(jnp.asarray(latents, jnp.float32))
        for block in self.video_blocks:
            x = block(x)
        return _l2_normalise(self.video_proj(self.video_norm(masked_mean(x, None))))

    def embed_text(self, text_tokens, mask) -> jax.Array:
        """Text-encoder token embeddings ``[B, L, text_dim]`` and mask ``[B, L]`` -> unit vectors ``[B, embed_dim]``."""
        x, mask = _check_text(text_tokens, mask, self.config.text_dim)
        x = self.text_in(x)
        for block in self.text_blocks:
            x = block(x, mask)
        return _l2_normalise(self.text_proj(self.text_norm(masked_mean(x, mask))))

    def logit_scale(self) -> jax.Array:
        """``1 / tau``, capped at 100 (CLIP's cap, ours here); no gradient unless ``learn_temperature``."""
        log_t = self.log_temperature[...]
        if not self.config.learn_temperature:
            log_t = jax.lax.stop_gradient(log_t)
        return jnp.minimum(jnp.exp(-log_t), 100.0)

    def __call__(self, latents, text_tokens, mask):
        return self.embed_video(latents), self.embed_text(text_tokens, mask)


class MatchingModel(nnx.Module):
    """Text tokens cross-attending to visual tokens, a positive logit per (clip, caption) (module doc);
    implements :class:`shelllcc.rewards.embeddings.TokenMatcher`."""

    def __init__(self, config: MatchingModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        eps = cfg.layer_norm_eps
        self.video_in = VideoTokenizer(cfg, rngs=rngs)
        self.video_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.video_layers)])
        self.video_norm = nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs)
        self.text_in = nnx.Linear(cfg.text_dim, cfg.dim, rngs=rngs)
        self.text_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.text_layers)])
        self.cross_blocks = nnx.List([CrossBlock(cfg, rngs=rngs) for _ in range(cfg.cross_layers)])
        self.head_norm = nnx.LayerNorm(cfg.dim, epsilon=eps, rngs=rngs)
        self.head_hidden = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.head_out = nnx.Linear(cfg.dim, 1, rngs=rngs)

    def visual_tokens(self, latents) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """``(tokens [B, N, dim], frame_index int [N], positions [N, 2] in [0, 1])`` of normalised latents."""
        x, frame_index, positions = self.video_in(jnp.asarray(latents, jnp.float32))
        for block in self.video_blocks:
            x = block(x)
        return self.video_norm(x), frame_index, positions

    def text_tokens(self, text_tokens, mask) -> jax.Array:
        """The text tokens ``[B, L, dim]`` that enter the cross-attention (before the first layer)."""
        x, mask = _check_text(text_tokens, mask, self.config.text_dim)
        x = self.text_in(x)
        for block in self.text_blocks:
            x = block(x, mask)
        return x

    def match_logits(self, latents, text_tokens, mask, attention_transform: AttentionTransform | None = None
                     ) -> jax.Array:
        """The positive logit ``[B]`` of each clip with its caption; ``attention_transform`` rewrites every
        cross-attention layer's weights (contract: :class:`shelllcc.rewards.embeddings.AttentionTransform`)."""
        visual, frame_index, positions = self.visual_tokens(latents)
        _, mask = _check_text(text_tokens, mask, self.config.text_dim)
        x = self.text_tokens(text_tokens, mask)
        for layer, block in enumerate(self.cross_blocks):
            transform = None
            if attention_transform is not None:
                def transform(attn, q, k, layer=layer):
                    return attention_transform(attn, q, k, frame_index, positions, text_mask=mask, layer=layer)
            x = block(x, mask, visual, transform)
        h = jax.nn.gelu(self.head_hidden(self.head_norm(masked_mean(x, mask))))
        return self.head_out(h)[:, 0]

    def __call__(self, latents, text_tokens, mask, attention_transform: AttentionTransform | None = None):
        return self.match_logits(latents, text_tokens, mask, attention_transform)


DUAL_ENCODER_KIND = "video_text_dual_encoder"
MATCHER_KIND = "video_text_matcher"

__all__ = ["DUAL_ENCODER_KIND", "MATCHER_KIND", "Attention", "Block", "CrossBlock", "DualEncoder", "DualEncoderConfig",
           "MatchingModel", "MatchingModelConfig", "VideoTextConfig", "VideoTokenizer", "masked_mean", "token_grid"]
