"""A latent, noise-aware reward model with VQ / MQ / TA heads (VideoAlign's design on the Wan DiT; issue 17).

VideoAlign released only its VLM reward model; the latent reward model (paper 4.3, App. C) is unreleased, so
everything here beyond "the first blocks of the generator, trained on noised latents with the same noise and
t for both clips of a pair" is **ours**:

* Backbone: the generator's patch, time and text embeddings and its first ``num_blocks`` blocks, run as the
  generator runs them (timestep ``1000 t``, the prompt through the blocks' cross-attention).
* Readout: three learned query tokens (VQ, MQ, TA) plus the time embedding, one multi-head attention over
  ``[video tokens; text tokens]`` with a mask: the VQ and MQ tokens see the video tokens only, the TA token
  sees both (VideoAlign's "separate tokens"). The video tokens have already met the prompt inside the
  backbone's cross-attention, so the mask separates the readout, not the features; ``pooled=True`` is the
  ablation with one token (all three rewards read from it).
* One shared head ``Dense(D, 3)`` after a LayerNorm; token ``k`` reads output ``k``::

      r_k(x_t, t, y) = head(LN(q_k + Attn(q_k, [h; e_y], mask_k)))[k]      h = blocks_{1..N}(x_t, t, y)

* Noised inputs (:func:`pair_rewards`): ``x_t = (1 - t) z + t eps`` with the same ``eps`` and ``t`` for both
  clips of a pair, so a reward difference cannot come from the noise draw.
* Trainable parts (:func:`trainable_filter`): ``frozen`` (the readout and head only), ``lora`` (adapters on
  the blocks, :mod:`shelllcc.training.lora`, plus the readout and head), ``full``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.models import saving
from shelllcc.models.wan_transformer import (
    Dense,
    KeyStream,
    WanTransformer,
    WanTransformerConfig,
    _layer_norm_f32,
    convert_layout,
    rope_tables,
)
from shelllcc.rewards.preference import bt_loss, btt_loss, regression_loss

DIMENSIONS = ("VQ", "MQ", "TA")
LOSSES = ("btt", "bt", "regression")
HEAD_MODULES = ("queries", "readout_q", "readout_k", "readout_v", "readout_o", "head")
KIND = "latent_reward_model"          # its kind in shelllcc.models.saving (model.json)


@dataclasses.dataclass(frozen=True)
class BackboneConfig(WanTransformerConfig):
    """The generator's architecture (``num_layers``: the generator's, of which the first ``num_blocks`` are
    kept) plus ``num_blocks``: the part every model on the generator's first blocks shares."""

    num_blocks: int = 1

    def generator_config(self) -> WanTransformerConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(WanTransformerConfig)}
        return WanTransformerConfig(**fields)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(BackboneConfig):
    """What ``model.json`` stores for a saved reward model."""

    pooled: bool = False


class GeneratorBackbone(nnx.Module):
    """The generator's patch, time and text embeddings and its first ``num_blocks`` blocks, copied (the model
    trains its own, the generator keeps its weights); :meth:`features` runs them as the generator does.

    A subclass is built from a generator or, when loading a saved one, from its config alone (random weights
    of that shape, replaced by the saved ones): :meth:`_init_backbone` returns the subclass's config.
    """

    def _init_backbone(self, generator, num_blocks, config_cls, rngs: nnx.Rngs, **extra) -> BackboneConfig:
        generator_layers = None
        if isinstance(generator, BackboneConfig):
            num_blocks, generator_layers = generator.num_blocks, generator.num_layers
            # only the kept blocks are built (their shapes do not depend on the generator's depth)
            gcfg = dataclasses.replace(generator.generator_config(), num_layers=num_blocks, scan_layers=False)
            generator = WanTransformer(gcfg, rngs=rngs)
        generator = convert_layout(nnx.clone(generator), scan_layers=False)
        gcfg = generator.config
        if num_blocks is None or not 1 <= num_blocks <= gcfg.num_layers:
            raise ValueError(f"num_blocks must be in 1..{gcfg.num_layers} (the generator's layers), got {num_blocks}")
        fields = {f.name: getattr(gcfg, f.name) for f in dataclasses.fields(WanTransformerConfig)}
        fields["num_layers"] = generator_layers or gcfg.num_layers
        self.num_blocks = int(num_blocks)
        self.patch_embed, self.time_embed = generator.patch_embed, generator.time_embed
        self.time_proj, self.text_embed = generator.time_proj, generator.text_embed
        self.blocks = nnx.List(list(generator.blocks)[:num_blocks])
        return config_cls(**fields, num_blocks=self.num_blocks, **extra)

    def features(self, latents, timestep, context):
        """Video tokens after the backbone ``[B, N, D]``, text tokens ``[B, L, D]``, time embedding ``[B, D]``."""
        cfg = self.config
        b, t, h, w, _ = latents.shape
        grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        x = self.patch_embed(latents)
        temb = self.time_embed(timestep).astype(cfg.dtype)
        time_mod = self.time_proj(jax.nn.silu(temb)).reshape(b, 6, cfg.dim)
        text = self.text_embed(context.astype(cfg.dtype))
        rope = tuple(jnp.asarray(a) for a in rope_tables(grid, cfg.head_dim, cfg.rope_theta))
        for block in self.blocks:
            x = block(x, text, time_mod, rope)
        return x, text, temb


class LatentRewardModel(GeneratorBackbone):
    """``(latents [B, T, H, W, C], timestep [B] in 0..1000, context [B, L, text_dim]) -> rewards [B, 3]``.

    Built from a generator (its first ``num_blocks`` blocks are copied) or, when loading a saved one, from
    a :class:`RewardModelConfig` alone (random weights of that shape, replaced by the saved ones).
    """

    def __init__(self, generator: WanTransformer | RewardModelConfig, num_blocks: int | None = None, *,
                 pooled: bool = False, rngs: nnx.Rngs):
        if isinstance(generator, RewardModelConfig):
            pooled = generator.pooled
        cfg = self.config = self._init_backbone(generator, num_blocks, RewardModelConfig, rngs, pooled=bool(pooled))
        self.pooled = bool(pooled)
        keys = KeyStream(rngs.params())
        d = cfg.dim
        self.queries = nnx.Param(0.02 * jax.random.normal(keys(), (1 if pooled else 3, d), jnp.float32))
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, keys=keys)
        self.readout_q = Dense(d, d, (None, None), **kw)
        self.readout_k = Dense(d, d, (None, None), **kw)
        self.readout_v = Dense(d, d, (None, None), **kw)
        self.readout_o = Dense(d, d, (None, None), **kw)
        self.head = Dense(d, 3, (None, None), **kw)

    def __call__(self, latents, timestep, context) -> jax.Array:
        video, text, temb = self.features(latents, timestep, context)
        video = _layer_norm_f32(video, self.config.eps)
        text = _layer_norm_f32(text, self.config.eps)
        b, n_video = video.shape[:2]
        tokens = jnp.concatenate([video, text], axis=1).astype(jnp.float32)
        q_tok = self.queries[...][None] + temb.astype(jnp.float32)[:, None, :]            # [B, Q, D]
        heads = self.config.num_heads
        split = lambda x: x.reshape(*x.shape[:-1], heads, -1)
        q, k, v = split(self.readout_q(q_tok)), split(self.readout_k(tokens)), split(self.readout_v(tokens))
        n_q = q_tok.shape[1]
        sees_text = jnp.array([False, False, True]) if n_q == 3 else jnp.array([True])
        is_video = jnp.arange(tokens.shape[1]) < n_video
        mask = is_video[None, :] | sees_text[:, None]                                      # [Q, N + L]
        o = jax.nn.dot_product_attention(q, k, v, mask=jnp.broadcast_to(mask, (b, heads, n_q, tokens.shape[1])))
        out = q_tok + self.readout_o(o.reshape(b, n_q, -1))
        r = self.head(_layer_norm_f32(out, self.config.eps))                                # [B, Q, 3]
        return r[:, 0, :] if n_q == 1 else jnp.diagonal(r, axis1=1, axis2=2)


def trainable_filter(mode: str):
    """The nnx filter of the trained parameters: ``full``, ``frozen`` (readout and head) or ``lora`` (adapters
    too; apply :func:`shelllcc.training.lora.apply_lora` to ``model.blocks`` first)."""
    from shelllcc.training.lora import LoRAParam
    head = nnx.All(nnx.Param, _head_path)
    if mode == "full":
        return nnx.Param
    if mode == "frozen":
        return head
    if mode == "lora":
        return nnx.Any(LoRAParam, head)
    raise ValueError(f"unknown backbone mode {mode!r}; expected full, frozen or lora")


def _head_path(path, _value) -> bool:
    return bool(path) and str(path[0]) in HEAD_MODULES


def noised(z, eps, t):
    """``(1 - t) z + t eps`` with ``t`` ``[B]`` broadcast over the latent."""
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (z.ndim - 1))
    return (1.0 - t) * z + t * eps


def pair_rewards(model, z_a, z_b, eps, t, context):
    """Rewards ``[B, 3]`` of both clips of each pair, noised with the same ``eps`` and ``t`` (one forward pass)."""
    x = jnp.concatenate([noised(z_a, eps, t), noised(z_b, eps, t)], axis=0)
    timestep = 1000.0 * jnp.concatenate([t, t]).astype(jnp.float32)
    r = model(x, timestep, jnp.concatenate([context, context], axis=0))
    return r[: z_a.shape[0]], r[z_a.shape[0]:]


def preference_loss(kind: str, r_a, r_b, labels, theta: float = 5.0):
    """``btt`` (:func:`btt_loss`, theta 5), ``bt`` (ties dropped) or ``regression`` over ``[B, 3]``."""
    if kind == "btt":
        return btt_loss(r_a, r_b, labels, theta)
    if kind == "bt":
        return bt_loss(r_a, r_b, labels)
    if kind == "regression":
        return regression_loss(r_a, r_b, labels)
    raise ValueError(f"unknown reward-model loss {kind!r}; expected one of {LOSSES}")


def make_loss_fn(graphdef, kind: str = "btt", t_max: float = 1.0, theta: float = 5.0):
    """``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` for :func:`shelllcc.training.step.make_train_step`.

    ``batch``: ``z_a``, ``z_b`` latents ``[B, ...]``, ``context`` ``[B, L, text_dim]``, ``labels`` int ``[B, 3]``.
    Per pair one ``t ~ U[0, t_max)`` and one ``eps ~ N(0, I)``, shared by its two clips. ``frozen`` is the
    non-trained rest of the model (``nnx.split(model, trainable_filter(mode), ...)``).
    """
    preference_loss(kind, jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3), jnp.int32))   # validates kind

    def loss_fn(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        k_eps, k_t = jax.random.split(key)
        z_a = jnp.asarray(batch["z_a"], jnp.float32)
        eps = jax.random.normal(k_eps, z_a.shape, jnp.float32)
        t = jax.random.uniform(k_t, (z_a.shape[0],), jnp.float32, 0.0, t_max)
        r_a, r_b = pair_rewards(model, z_a, jnp.asarray(batch["z_b"], jnp.float32), eps, t, batch["context"])
        loss = preference_loss(kind, r_a, r_b, batch["labels"], theta)
        decided = (batch["labels"] == 1) | (batch["labels"] == -1)
        right = decided & (jnp.sign(r_a - r_b) == batch["labels"])
        metrics = {"loss": loss, "acc_without_ties": jnp.sum(right) / jnp.maximum(jnp.sum(decided), 1)}
        return loss, metrics

    return loss_fn


saving.register_kind(KIND, LatentRewardModel, RewardModelConfig,
                     runtime=("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers"))


def load_reward_model(path: str, **runtime) -> LatentRewardModel:
    """A saved reward model: ``path`` is its directory (``model.json`` of kind ``latent_reward_model``) or
    the workdir of a ``train_reward_model`` run (its ``model/``). ``runtime``: dtypes, attention kernel."""
    import os
    d = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    info = saving.read_model_json(d)
    if info["kind"] != KIND:
        raise ValueError(f"{d!r} holds a {info['kind']!r} model, not a {KIND} (train one with train_reward_model)")
    return saving.load_model(d, **runtime)


def score(model: LatentRewardModel, latents, timestep, context) -> jax.Array:
    """Rewards ``[B, 3]`` (VQ, MQ, TA) of normalised latents ``[B, T, H, W, C]`` noised to ``timestep`` (``[B]`` or a
    scalar in 0..1000, Wan's scale: ``1000 t``) under ``context`` ``[B, L, text_dim]``. Pure: differentiable in
    ``latents`` (guidance) and jittable with the model as an argument (``nnx.jit``)."""
    b = latents.shape[0]
    return model(jnp.asarray(latents, jnp.float32), jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,)),
                 jnp.asarray(context, jnp.float32))


__all__ = ["DIMENSIONS", "KIND", "LOSSES", "BackboneConfig", "GeneratorBackbone", "LatentRewardModel",
           "RewardModelConfig", "load_reward_model",
           "make_loss_fn", "noised", "pair_rewards", "preference_loss", "score", "trainable_filter"]
