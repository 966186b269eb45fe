"""A small text encoder (Flax NNX) for the embedded benchmark, a stand-in for Wan's umT5-XXL.

Interface, as Wan's text embeddings: ``[B, L, text_dim]`` with every position at or past a
caption's token count set to zero (the Wan pipeline trims umT5's output to the true length and
zero-pads to 512). The DiT's cross-attention thus sees the same kind of context from either.

* :class:`WordTokenizer`: word level over a fixed vocabulary. Lower-cases, splits into runs of
  word characters and single punctuation marks, maps out-of-vocabulary words to ``<unk>``, appends
  ``<eos>`` (as T5 does, so an empty caption still has one token) and truncates/pads to ``max_len``.
  Ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then the vocabulary in order.
* :class:`TextEncoder`: token embedding + learned absolute positions, ``num_layers`` pre-norm
  transformer encoder layers (``x + Attn(LN(x))``, ``x + MLP(LN(x))``, key-padding mask), a final
  LayerNorm and a linear projection to ``text_dim``; positions past the length are zeroed.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, EOS)
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"A red, Car!" -> ["a", "red", ",", "car", "!"]``."""
    return _WORD_RE.findall(text.lower())


def vocab_from_captions(captions: Iterable[str], min_count: int = 1,
                        max_size: int | None = None) -> tuple[str, ...]:
    """Vocabulary of the words in ``captions``: most frequent first, ties alphabetical (deterministic)."""
    counts = collections.Counter()
    for i, c in enumerate(captions):
        _check_str(c, i)
        counts.update(split_words(c))
    words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return tuple(words[:max_size] if max_size is not None else words)


def _check_str(text, index=None):
    if not isinstance(text, str):
        where = "" if index is None else f" at index {index}"
        raise TypeError(f"captions must be str, got {type(text).__name__}{where}: {text!r:.80}")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (see the module doc for the rules).

    ``tokenizer(texts) -> (ids int32 [B, max_len], mask bool [B, max_len])`` as numpy arrays: a
    host-side step, before anything is traced.
    """

    def __init__(self, vocab: Sequence[str], max_len: int, append_eos: bool = True):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        for i, w in enumerate(words):
            _check_str(w, i)
            if w != w.lower() or split_words(w) != [w]:
                raise ValueError(f"vocabulary entry {w!r} is not a single lower-case token")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate entries")
        self.tokens = SPECIAL_TOKENS + tuple(words)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.max_len = int(max_len)
        self.append_eos = bool(append_eos)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, truncated to ``max_len`` (``<eos>`` kept as the last id), unpadded."""
        _check_str(text)
        ids = [self.index.get(w, UNK_ID) for w in split_words(text)]
        if self.append_eos:
            ids = ids[: self.max_len - 1] + [EOS_ID]
        return ids[: self.max_len]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids if int(i) != PAD_ID]

    def __call__(self, texts: str | Sequence[str]):
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple, np.ndarray)):
            raise TypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
        ids = np.full((len(texts), self.max_len), PAD_ID, np.int32)
        lengths = np.zeros((len(texts),), np.int32)
        for b, t in enumerate(texts):
            _check_str(t, b)
            row = self.encode(t)
            ids[b, : len(row)] = row
            lengths[b] = len(row)
        # every caption is a prefix of real tokens followed by padding
        mask = np.arange(self.max_len)[None, :] < lengths[:, None]
        return ids, mask


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Configuration of the small text encoder.

    Attributes:
      vocab: the words (special tokens are prepended by the tokenizer).
      max_len: tokens per caption ``L`` (including ``<eos>``); the output is ``[B, L, text_dim]``.
      dim, num_layers, num_heads, mlp_ratio: transformer width, depth, heads, MLP expansion.
      text_dim: output feature size (the DiT's ``text_dim``; 4096 for Wan's umT5-XXL).
      dtype: compute dtype (parameters are float32).
    """

    vocab: tuple[str, ...]
    max_len: int = 32
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 128
    append_eos: bool = True
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + sum(w not in SPECIAL_TOKENS for w in self.vocab)

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.vocab, self.max_len, self.append_eos)


class EncoderLayer(nnx.Module):
    """Pre-norm transformer encoder layer with a key-padding mask."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d, dt, eps = cfg.dim, cfg.dtype, cfg.layer_norm_eps
        hidden = int(round(cfg.mlp_ratio * d))
        self.num_heads = cfg.num_heads
        self.norm1 = nnx.LayerNorm(d, epsilon=eps, dtype=dt, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, dtype=dt, rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dt, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=eps, dtype=dt, rngs=rngs)
        self.fc1 = nnx.Linear(d, hidden, dtype=dt, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, dtype=dt, rngs=rngs)

    def __call__(self, x, mask):
        b, l, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (t.reshape(b, l, h, d // h) for t in (q, k, v))
        # mask [B, 1, 1, L]: every query attends to the caption's real tokens only, so padding
        # never leaks into the valid positions
        att = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = x + self.proj(att.reshape(b, l, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nnx.Module):
    """``(ids [B, L], mask [B, L]) -> [B, L, text_dim]``, zero where ``mask`` is False.

    ``L <= config.max_len`` (positions ``0..L-1`` of the learned table are used).
    """

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = config.dtype
        self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=dt, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.max_len, config.dim)))
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(config.dim, epsilon=config.layer_norm_eps, dtype=dt, rngs=rngs)
        self.out = nnx.Linear(config.dim, config.text_dim, dtype=dt, rngs=rngs)

    def __call__(self, ids, mask):
        ids = jnp.asarray(ids)
        mask = jnp.asarray(mask, bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")
        l = ids.shape[1]
        if l > self.config.max_len:
            raise ValueError(f"sequence length {l} exceeds max_len {self.config.max_len}")
        x = self.embed(ids) + self.pos[...][:l].astype(self.config.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        y = self.out(self.norm(x))
        return jnp.where(mask[..., None], y, jnp.zeros((), y.dtype))

    def encode(self, texts: str | Sequence[str]):
        """Tokenize (host) and encode: ``(embeddings [B, L, text_dim], lengths [B])``."""
        ids, mask = self.config.tokenizer()(texts)
        return self(ids, mask), mask.sum(axis=1).astype(np.int32)
