"""A patch reward model: one reward per spatio-temporal patch of a latent clip (HALO, arXiv 2502.06812; issue 18).

HALO's abstract says: a patch reward model, distilled from GPT-4o's patch judgements, initialised from a video
reward model, whose rewards Gran-DPO uses with the video rewards. It publishes no code; everything below is
**ours** (``../shared/ALIGNMENT_METHODS.md`` section 3).

* **Grid** (:func:`latent_patch_masks`): a patch is ``patch = (pt, ph, pw)`` latent cells, a whole number of the
  DiT's tokens (``patch_tokens = patch / patch_size``). Latents ``[B, T, H, W, C]`` give ``P = (T / pt)(H / ph)
  (W / pw)`` patches in row-major (t, h, w) order; the model's output is ``[B, P]``. The embedded benchmark's
  patch is ``(1, 8, 8)``: latents ``[3, 16, 16]``, tokens of ``(1, 4, 4)``, 2 x 2 tokens per patch, 12 patches
  (:mod:`shelllcc.data.patch_degradations` says why).
* **Model** (:class:`PatchRewardModel`): the video reward model's backbone (:class:`GeneratorBackbone`: the
  generator's embeddings and first blocks, with the prompt through their cross-attention), its weights
  **copied from a trained video reward model** (:meth:`PatchRewardModel.from_video_model`); a **fresh** head
  (the video model's head reads query tokens after an attention readout, not per-patch features, so nothing
  of it fits a patch)::

      h       = blocks_{1..N}(x_t, t, y)                      video tokens [B, N, D]
      f_p     = mean of h over the tokens of patch p           [B, P, D]
      r_p     = Dense(D, 1)(gelu(Dense(D, D)(LN(f_p + temb))))    one logit per patch

* **Loss** (:func:`patch_bce_loss`): per-patch binary cross-entropy on the degradation oracle's labels ``y`` in
  {1 clean, 0 degraded}, the reward the logit of "clean"::

      L = mean_{b, p} [ -y_bp log sigmoid(r_bp) - (1 - y_bp) log sigmoid(-r_bp) ]

  Ours: HALO's labels are GPT-4o scores; a BCE on localised-degradation labels is the form this oracle fits.
* **Training-free patch reward** (:func:`shell_patch_rewards`): ``-region_distances`` of the Shell-LCC manifold
  on the same masks; where the two papers meet.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shelllcc.models import saving
from shelllcc.models.wan_transformer import Dense, KeyStream, WanTransformer, _layer_norm_f32
from shelllcc.rewards.manifold_distance import region_distances
from shelllcc.rewards.reward_model import BackboneConfig, GeneratorBackbone, LatentRewardModel, noised

KIND = "patch_reward_model"            # its kind in shelllcc.models.saving (model.json)
HEAD_MODULES = ("patch_hidden", "patch_out")
BACKBONE_MODULES = ("patch_embed", "time_embed", "time_proj", "text_embed", "blocks")


def latent_patch_masks(latent: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``float32 [P, T, H, W]`` in {0, 1}: the latent cells of each patch of ``patch = (pt, ph, pw)`` on the latent
    grid ``latent = (T, H, W)``, row-major (t, h, w); the masks partition the grid."""
    latent, patch = tuple(int(x) for x in latent), tuple(int(x) for x in patch)
    if len(latent) != 3 or len(patch) != 3 or min(patch) < 1 or any(a % p for a, p in zip(latent, patch)):
        raise ValueError(f"patch {patch} (latent cells) must tile the latent grid {latent} (T, H, W)")
    g = [a // p for a, p in zip(latent, patch)]
    ids = np.arange(int(np.prod(g))).reshape(g)
    for axis, p in enumerate(patch):
        ids = np.repeat(ids, p, axis=axis)
    return (ids[None] == np.arange(int(np.prod(g)))[:, None, None, None]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PatchRewardConfig(BackboneConfig):
    """What ``model.json`` stores for a saved patch reward model; ``patch_tokens``: DiT tokens per patch (t, h, w)."""

    patch_tokens: tuple = (1, 2, 2)

    def patch(self) -> tuple[int, int, int]:
        """The patch in latent cells: ``patch_tokens * patch_size``."""
        return tuple(int(a) * int(b) for a, b in zip(self.patch_tokens, self.patch_size))


class PatchRewardModel(GeneratorBackbone):
    """``(latents [B, T, H, W, C], timestep [B] in 0..1000, context [B, L, text_dim]) -> patch rewards [B, P]``.

    Built from a generator (its first ``num_blocks`` blocks; a random start, for tests), from a
    :class:`PatchRewardConfig` (loading), or with :meth:`from_video_model` from a trained video reward model."""

    def __init__(self, generator: WanTransformer | PatchRewardConfig, num_blocks: int | None = None, *,
                 patch_tokens: Sequence[int] = (1, 2, 2), rngs: nnx.Rngs):
        if isinstance(generator, PatchRewardConfig):
            patch_tokens = generator.patch_tokens
        patch_tokens = tuple(int(x) for x in patch_tokens)
        if len(patch_tokens) != 3 or min(patch_tokens) < 1:
            raise ValueError(f"patch_tokens={patch_tokens} must be three positive token counts (t, h, w)")
        cfg = self.config = self._init_backbone(generator, num_blocks, PatchRewardConfig, rngs, patch_tokens=patch_tokens)
        keys = KeyStream(rngs.params())
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, keys=keys)
        self.patch_hidden = Dense(cfg.dim, cfg.dim, (None, None), **kw)
        self.patch_out = Dense(cfg.dim, 1, (None, None), **kw)

    @classmethod
    def from_video_model(cls, video: LatentRewardModel, patch_tokens: Sequence[int] = (1, 2, 2), *,
                         rngs: nnx.Rngs) -> "PatchRewardModel":
        """The video reward model's backbone weights (copied) and a fresh patch head seeded by ``rngs``."""
        if not isinstance(video, GeneratorBackbone):
            raise TypeError(f"from_video_model needs a video reward model on the generator's blocks, got "
                            f"{type(video).__name__}")
        fields = {f.name: getattr(video.config, f.name) for f in dataclasses.fields(BackboneConfig)}
        model = cls(PatchRewardConfig(**fields, patch_tokens=tuple(int(x) for x in patch_tokens)), rngs=rngs)
        for name in BACKBONE_MODULES:
            setattr(model, name, nnx.clone(getattr(video, name)))
        return model

    def __call__(self, latents, timestep, context) -> jax.Array:
        cfg = self.config
        b, t, h, w, _ = latents.shape
        pt, ph, pw = cfg.patch()
        if t % pt or h % ph or w % pw:
            raise ValueError(f"PatchRewardModel: latents [B, {t}, {h}, {w}, C] do not tile into patches of {cfg.patch()} "
                             f"latent cells (patch_tokens {cfg.patch_tokens} x the DiT's patch {cfg.patch_size})")
        video, _, temb = self.features(latents, timestep, context)
        gt, gh, gw = t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2]
        kt, kh, kw = cfg.patch_tokens
        x = video.astype(jnp.float32).reshape(b, gt // kt, kt, gh // kh, kh, gw // kw, kw, cfg.dim)
        f = jnp.mean(x, axis=(2, 4, 6)).reshape(b, -1, cfg.dim)                           # [B, P, D]
        f = _layer_norm_f32(f + temb.astype(jnp.float32)[:, None, :], cfg.eps)
        return self.patch_out(jax.nn.gelu(self.patch_hidden(f)))[..., 0]


def trainable_filter(mode: str):
    """``full`` (every parameter) or ``frozen`` (the patch head only: the copied backbone kept)."""
    if mode == "full":
        return nnx.Param
    if mode == "frozen":
        return nnx.All(nnx.Param, lambda path, _v: bool(path) and str(path[0]) in HEAD_MODULES)
    raise ValueError(f"unknown patch reward backbone mode {mode!r}; expected full or frozen")


def patch_bce_loss(rewards, labels, valid=None):
    """Per-patch BCE (ours; module doc) of logits ``rewards [B, P]`` against ``labels [B, P]`` in {1 clean,
    0 degraded}, over the entries where ``valid`` (default all)::

        L = sum_{b,p} v_bp [ -y log sigmoid(r) - (1 - y) log sigmoid(-r) ] / sum v

    Returns ``(loss, metrics)``: ``loss``, ``patch_accuracy`` (``(r > 0) == y``), ``accuracy_clean`` and
    ``accuracy_degraded`` (the same per true label; 0 where a label is absent), ``reward_clean`` and
    ``reward_degraded`` (mean logits; 0 where absent). float32."""
    r = jnp.asarray(rewards, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    if r.shape != y.shape or r.ndim != 2:
        raise ValueError(f"patch_bce_loss: rewards and labels must both be [B, P], got {r.shape} and {y.shape}")
    v = jnp.ones_like(r) if valid is None else jnp.asarray(valid, jnp.float32)
    per = -y * jax.nn.log_sigmoid(r) - (1.0 - y) * jax.nn.log_sigmoid(-r)
    n = jnp.maximum(jnp.sum(v), 1.0)
    right = ((r > 0) == (y > 0.5)).astype(jnp.float32)
    clean, bad = v * y, v * (1.0 - y)
    share = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)  # noqa: E731
    loss = jnp.sum(v * per) / n
    return loss, {"loss": loss, "patch_accuracy": jnp.sum(v * right) / n, "accuracy_clean": share(right, clean),
                  "accuracy_degraded": share(right, bad), "reward_clean": share(r, clean),
                  "reward_degraded": share(r, bad)}


def make_patch_loss_fn(graphdef, t_max: float = 0.0):
    """``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` for ``shelllcc.training.step.make_train_step``.

    ``batch``: ``latents [B, T, H, W, C]`` (normalised), ``context [B, L, text_dim]``, ``patch_labels`` int
    ``[B, P]``. Inputs noised to ``t ~ U[0, t_max)`` (``t_max = 0``: clean, the default; ours: Gran-DPO reads the
    rewards of clean winners and losers) with fresh noise; loss :func:`patch_bce_loss`."""
    def loss_fn(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        z = jnp.asarray(batch["latents"], jnp.float32)
        k_eps, k_t = jax.random.split(key)
        b = z.shape[0]
        t = (jax.random.uniform(k_t, (b,), jnp.float32, 0.0, t_max) if t_max > 0 else jnp.zeros((b,), jnp.float32))
        x = noised(z, jax.random.normal(k_eps, z.shape, jnp.float32), t)
        r = model(x, 1000.0 * t, jnp.asarray(batch["context"], jnp.float32))
        return patch_bce_loss(r, batch["patch_labels"])

    return loss_fn


def patch_rewards(model: PatchRewardModel, latents, context, timestep=0.0) -> jax.Array:
    """Patch rewards ``[B, P]`` of normalised latents (clean by default) under ``context``; pure, jittable with
    the model as an argument (``nnx.jit``)."""
    b = latents.shape[0]
    return model(jnp.asarray(latents, jnp.float32), jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,)),
                 jnp.asarray(context, jnp.float32))


def shell_patch_rewards(params, latents, kind: str, masks, **kw) -> jax.Array:
    """The training-free patch reward ``[B, P]``: ``-region_distances(params, latents, kind, masks, **kw)`` (the
    Shell-LCC distance of each patch to the manifold, negated; ours)."""
    return -region_distances(params, latents, kind, masks, **kw)


saving.register_kind(KIND, PatchRewardModel, PatchRewardConfig,
                     runtime=("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers"))


def load_patch_reward_model(path: str, **runtime) -> PatchRewardModel:
    """A saved patch reward model: its directory (``model.json`` of kind ``patch_reward_model``) or the workdir
    of a ``train_patch_reward`` run (its ``model/``)."""
    d = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    info = saving.read_model_json(d)
    if info["kind"] != KIND:
        raise ValueError(f"{d!r} holds a {info['kind']!r} model, not a {KIND} (train one with train_patch_reward)")
    return saving.load_model(d, **runtime)


__all__ = ["KIND", "PatchRewardConfig", "PatchRewardModel", "latent_patch_masks", "load_patch_reward_model",
           "make_patch_loss_fn", "patch_bce_loss", "patch_rewards", "shell_patch_rewards", "trainable_filter"]
