"""The text-video embedding space PISCES's rewards read (``../shared/ALIGNMENT_METHODS.md`` section 4), as an
interface any encoder can stand behind, the losses that train the project's own, and the hook where the
semantic reward's transport plan enters the matcher's cross-attention.

Upstream PISCES reads InternVideo2 (PyTorch, gated weights). The project trains its own on VAE latents
(:mod:`shelllcc.models.video_text`: :class:`~shelllcc.models.video_text.DualEncoder`,
:class:`~shelllcc.models.video_text.MatchingModel`; experiment ``train_embeddings``). At real scale another
encoder stands behind the same two protocols:

* :class:`VideoTextEmbedder` (the quality reward's space): ``embed_video(latents [B, T, H, W, C]) -> [B, 512]``
  and ``embed_text(text_tokens [B, L, D], mask [B, L]) -> [B, 512]``, both unit vectors. ``latents`` are the
  generator's latents, normalised per channel as the DiT reads them (the reward is taken on its samples);
  ``text_tokens`` are the text encoder's token embeddings the DiT reads (umT5 at real scale, the small
  :class:`~shelllcc.models.text_encoder.TextEncoder` here), zero past each caption, with ``mask`` True at its
  real tokens. An encoder that reads pixels (InternVideo2) wraps the VAE decoder before its own input: the
  wrapper, not the caller, decodes.
* :class:`TokenMatcher` (the semantic reward's model): ``visual_tokens(latents) -> (x [B, N, D], frame_index
  [N], positions [N, 2])``, ``text_tokens(text_tokens, mask) -> y [B, L, D]`` and
  ``match_logits(latents, text_tokens, mask, attention_transform=None) -> [B]``, the logit of "this caption
  describes this clip"; ``R_S = sigmoid(match_logits)``.

The attention hook (:data:`AttentionTransform`): each text-to-visual cross-attention layer of the matcher
calls ``attention_transform(attn, text_tokens, visual_tokens, frame_index, positions, *, text_mask, layer)``
and mixes the values with what it returns:

* ``attn`` ``[B, H, L, N]``: the layer's softmax weights, text token ``i`` (rows) over visual token ``j``;
* ``text_tokens`` ``[B, H, L, dh]`` and ``visual_tokens`` ``[B, H, N, dh]``: that layer's per-head queries
  and keys (PISCES's ``y_i`` and ``x_j`` of the cost ``1 - cos(y_i, x_j)``, per head);
* ``frame_index`` int ``[N]`` in ``0 .. T' - 1`` and ``positions`` ``[N, 2]`` in ``[0, 1]``: ``t_j`` and ``s_j``,
  static numpy arrays (the latent grid is static), so ``T' = frame_index.max() + 1`` is a Python int;
* ``text_mask`` bool ``[B, L]``: the caption's real tokens (padding rows are ignored by the pooling after;
  a plan should give them no mass); ``layer``: the cross-attention layer's index.

No hook (``None``) is the identity. PISCES fuses a plan ``P`` (row-normalised, not differentiated) as
``softmax(log(A + 1e-6) + log(P + 1e-6))`` over the visual tokens: :func:`fuse_plan`; :func:`plan_transform`
turns ``plan_fn(cost inputs) -> P`` (e.g. ``shelllcc.rewards.optimal_transport.token_transport_plan`` behind
the cost of section 4) into a hook.

Losses (pure functions of model outputs; formulas in their docstrings): :func:`info_nce_loss` (the dual
encoder, symmetric, temperature ``1 / logit_scale``) and :func:`matching_bce_loss` (the matcher, true
captions against attribute-swapped ones). :func:`retrieval_recall` is the evaluation of the dual encoder.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.models import saving
from shelllcc.models.video_text import DUAL_ENCODER_KIND, MATCHER_KIND, DualEncoder, MatchingModel

EMBED_DIM = 512
FUSE_EPS = 1e-6          # PISCES's: log(A + 1e-6) + log(P + 1e-6)

# (attn [B,H,L,N], text_tokens [B,H,L,dh], visual_tokens [B,H,N,dh], frame_index [N], positions [N,2],
#  *, text_mask [B,L], layer int) -> attn [B,H,L,N]   (module doc)
AttentionTransform = Callable[..., jax.Array]


@runtime_checkable
class VideoTextEmbedder(Protocol):
    """A video-text embedding space: unit vectors of one width for clips and captions (module doc)."""

    def embed_video(self, latents: jax.Array) -> jax.Array: ...

    def embed_text(self, text_tokens: jax.Array, mask: jax.Array) -> jax.Array: ...


@runtime_checkable
class TokenMatcher(Protocol):
    """A matching model with text-to-visual cross-attention and the attention hook (module doc)."""

    def visual_tokens(self, latents: jax.Array) -> tuple[jax.Array, np.ndarray, np.ndarray]: ...

    def text_tokens(self, text_tokens: jax.Array, mask: jax.Array) -> jax.Array: ...

    def match_logits(self, latents: jax.Array, text_tokens: jax.Array, mask: jax.Array,
                     attention_transform: AttentionTransform | None = None) -> jax.Array: ...


def identity_transform(attn, text_tokens, visual_tokens, frame_index, positions, *, text_mask=None, layer=0):
    """The hook that changes nothing (what ``attention_transform=None`` means)."""
    del text_tokens, visual_tokens, frame_index, positions, text_mask, layer
    return attn


def fuse_plan(attn: jax.Array, plan: jax.Array, eps: float = FUSE_EPS) -> jax.Array:
    """PISCES's fusion of a transport plan into attention weights, over the last (visual) axis::

        A' = softmax_j( log(A_ij + eps) + log(P_ij + eps) )

    With a uniform ``P`` (every entry equal) ``A'`` is ``A`` up to ``eps``."""
    return jax.nn.softmax(jnp.log(attn + eps) + jnp.log(plan + eps), axis=-1)


def plan_transform(plan_fn: Callable[..., jax.Array], eps: float = FUSE_EPS) -> AttentionTransform:
    """A hook fusing ``P = plan_fn(attn, text_tokens, visual_tokens, frame_index, positions, text_mask=,
    layer=)`` (``[B, H, L, N]``, rows summing to 1) with :func:`fuse_plan`. The plan is not differentiated
    (``stop_gradient`` on it, as in PISCES); gradients still flow through ``attn``."""

    def transform(attn, text_tokens, visual_tokens, frame_index, positions, *, text_mask=None, layer=0):
        plan = plan_fn(attn, text_tokens, visual_tokens, frame_index, positions, text_mask=text_mask, layer=layer)
        return fuse_plan(attn, jax.lax.stop_gradient(plan), eps)

    return transform


# ------------------------------------------------------------------------------------------ losses

def info_nce_loss(video_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float) -> jax.Array:
    """Symmetric InfoNCE over a batch of ``B`` matched (clip, caption) pairs, row ``b`` of each the same pair::

        S_ab = s <v_a, t_b>                    (s = logit_scale = 1 / temperature; v, t unit vectors)
        L = 1/2 [ -1/B sum_a log softmax_b(S_a.)_a  -  1/B sum_b log softmax_a(S_.b)_b ]

    video -> text and text -> video cross-entropies with the diagonal as the target (CLIP's loss). Every
    other caption of the batch is a negative of a clip, including, rarely, an identical caption of another
    clip (ours: kept, as CLIP keeps them; in Moving Textures two clips of a batch of 32 share all six
    attributes and the template with probability below 1e-4)."""
    logits = logit_scale * (video_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)
    diag = jnp.arange(logits.shape[0])
    v2t = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[diag, diag])
    t2v = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[diag, diag])
    return 0.5 * (v2t + t2v)


def matching_bce_loss(pos_logits: jax.Array, neg_logits: jax.Array) -> jax.Array:
    """Binary cross-entropy of the matcher, positives (clip, its caption) labelled 1 and negatives (the same
    clip, its caption with one attribute swapped) labelled 0, the two halves weighted equally::

        L = 1/2 [ mean_b softplus(-l_pos,b) + mean_b softplus(l_neg,b) ]     (softplus(-l) = -log sigmoid(l))

    One negative per positive (ours: PISCES trains its matcher upstream; swapped-attribute negatives are our
    hard negatives, so the head must read the attribute the caption names, not just a caption's fluency)."""
    pos, neg = pos_logits.astype(jnp.float32), neg_logits.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.softplus(-pos)) + jnp.mean(jax.nn.softplus(neg)))


def retrieval_recall(video_emb, text_emb, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways over ``n`` matched pairs (row ``i`` of each the same clip): ``t2v@k`` the share of
    captions whose clip is among the ``k`` most similar clips, ``v2t@k`` the reverse. The rank of the true
    item counts the items strictly more similar, so ties go in its favour (float similarities of distinct
    clips rarely tie). Chance level: ``k / n``."""
    v = np.asarray(video_emb, np.float64)
    t = np.asarray(text_emb, np.float64)
    sim = t @ v.T                                                       # [caption, clip]
    true = np.diag(sim)
    rank_t2v = np.sum(sim > true[:, None], axis=1)
    rank_v2t = np.sum(sim.T > true[:, None], axis=1)
    out = {}
    for k in ks:
        out[f"t2v@{k}"] = float(np.mean(rank_t2v < k))
        out[f"v2t@{k}"] = float(np.mean(rank_v2t < k))
    return out


# ------------------------------------------------------------------------------------------ saved models

def _load(path: str, kind: str, what: str) -> Any:
    d = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    info = saving.read_model_json(d)
    if info["kind"] != kind:
        raise ValueError(f"{d!r} holds a {info['kind']!r} model, not a {kind} ({what}; train one with "
                         f"train_embeddings)")
    return saving.load_model(d)


def load_dual_encoder(path: str) -> DualEncoder:
    """A saved dual encoder: its directory (``model.json`` of kind ``video_text_dual_encoder``) or a folder
    holding it as ``model/`` (the ``dual/`` stage of a ``train_embeddings`` run)."""
    return _load(path, DUAL_ENCODER_KIND, "the dual encoder")


def load_matcher(path: str) -> MatchingModel:
    """A saved matching model (kind ``video_text_matcher``), as :func:`load_dual_encoder`."""
    return _load(path, MATCHER_KIND, "the matching model")


__all__ = ["EMBED_DIM", "FUSE_EPS", "AttentionTransform", "TokenMatcher", "VideoTextEmbedder", "fuse_plan",
           "identity_transform", "info_nce_loss", "load_dual_encoder", "load_matcher", "matching_bce_loss",
           "plan_transform", "retrieval_recall"]
