"""PISCES's two rewards (``../shared/ALIGNMENT_METHODS.md`` section 4) on the project's text-video embedding space
(:mod:`shelllcc.rewards.embeddings`), and the neural OT map the quality reward reads.

**Quality reward** (:func:`quality_reward`)::

    R_Q(z, c) = cos(e_v, T(e_t)),      e_v = embed_video(z),  e_t = embed_text(c)         (per clip, [B])

``T`` a neural optimal-transport map from the text embeddings to the video embeddings (:class:`TransportMap`:
MLP ``D - 1024 - 1024 - D`` with LayerNorms, ``D = 512``), trained against a critic ``f`` of the same trunk with a
scalar output (:class:`Critic`). Per outer step, ``map_updates = 10`` updates of ``T`` on :func:`map_loss` and one
of ``f`` on :func:`critic_loss`::

    L_T = mse(T(x), x) - mean_b f(T(x_b)),     mse(a, x) = 1/(B D) sum_b ||a_b - x_b||^2      (x: text batch)
    L_f = mean_b f(T(x_b)) - mean_b f(y_b)                                                     (y: video batch)

(a max-min problem ``max_f min_T E[c(x, T(x)) - f(T(x))] + E[f(y)]`` with the quadratic cost: at its saddle
point ``T`` pushes the text distribution onto the video one at least cost, ``f`` the Kantorovich potential).
Adam at ``1e-4`` with cosine decay and global-norm clipping at 1.0, one optimizer per network (section 4).
``T`` is unpaired OT: ``L_T`` and ``L_f`` never read which caption belongs to which clip; the pairing survives only
through the cost (a map that stays near the identity where it can). :func:`train_transport_map` runs the loop
(whole outer steps jitted, the 10 map updates a ``lax.scan``).

Why not ott-jax's neural OT (``ott.neural`` of 0.6.0, read from the installed source): ``W2NeuralDual`` learns
Kantorovich potentials (ICNNs or a gradient network with a fitted conjugate, the map being ``grad f``), not an
unconstrained map against a critic; ``ExpectileNeuralDual`` regularises the dual with an expectile loss;
``MongeGapEstimator`` fits a map by ``fitting_loss + lambda * monge_gap`` (Sinkhorn between a batch and its
image) with no critic. None is PISCES's alternating ``T`` / ``f`` max-min with an MLP map, and all three are Linen
modules on ``TrainState``s where this project is Flax NNX; so the loop is written here with optax, from the
formulas above. (ott's Sinkhorn is used where it fits: the semantic reward's token plan,
:mod:`shelllcc.rewards.optimal_transport`.)

**Semantic reward** (:func:`semantic_reward`)::

    R_S(z, c) = sigmoid(match_logit(z, c | every cross-attention A -> softmax(log(A + 1e-6) + log(P + 1e-6))))

``P`` per layer, clip and head the row-normalised KL-relaxed Sinkhorn plan
(:func:`~shelllcc.rewards.optimal_transport.token_transport_plan`, ``eps 0.05``, mass ``0.9``, 200 iterations, tol
1e-3) of PISCES's cost (:func:`~shelllcc.rewards.optimal_transport.pisces_cost`) built from that head's queries
(text tokens), keys (visual tokens), attention, frame index and positions; the plan is not differentiated (the
hook of :func:`~shelllcc.rewards.embeddings.plan_transform`). Choices of ours where the source does not say:

* padding tokens (ours): the cost is computed as if each padding row were the caption's first real token (so the
  min-max scaling sees the real rows only), then padding rows get the cost :data:`PAD_COST`; under the
  KL-relaxed marginals a row that dear carries no mass (``~exp(-(1 - m) PAD_COST / eps)``), so padding takes no
  part in the transport and its attention is left as it was (its plan row is flat after normalisation);
* ``T`` of the temporal term (ours): the number of latent frames ``T' = max t_j + 1`` (upstream's span with its
  CLS token at frame -1 is the same number).

**Direct backpropagation** (section 4: ``L = L_consistency - R_Q - R_S``, weights 1, LoRA): ``reward_finetune``'s
``reward.kind='pisces'`` (``d = -(w_Q R_Q + w_S R_S)`` averaged over the batch). ``L_consistency`` is not defined
by the section; ours: the one-step objective's anti-drift term against the frozen base (``drift_weight * relu(
mse(z, z_ref) - drift_margin)``, the base's one-step output for the same noise and prompt) or, with the
``noised_data`` objective, its flow-matching term on real clips. Both keep the generator consistent with what it
was (upstream's consistency-distilled student has its own consistency loss; the embedded DiT is no such model).
The embedding models here read latents, so no VAE decode sits between the generator and the rewards; a
pixel-space embedder would wrap the decoder (the :class:`~shelllcc.rewards.embeddings.VideoTextEmbedder`
contract).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shelllcc.models import saving
from shelllcc.rewards import embeddings as emb
from shelllcc.rewards import optimal_transport as ot

MAP_KIND = "pisces_transport_map"
CRITIC_KIND = "pisces_critic"
PAD_COST = 50.0          # ours: a padding row's cost, far above the [0, 1] of real rows (module doc)
COS_EPS = 1e-8


# ------------------------------------------------------------------------------------------ the networks

@dataclasses.dataclass(frozen=True)
class TransportMapConfig:
    """``dim`` the embedding width (512, InternVideo2's and :data:`~shelllcc.rewards.embeddings.EMBED_DIM`),
    ``hidden`` the trunk's widths (section 4: ``(1024, 1024)``). Activation GELU and LayerNorm after each hidden
    Linear (``Linear -> LN -> GELU``) are ours (the section says "with LayerNorms")."""

    dim: int = emb.EMBED_DIM
    hidden: tuple[int, ...] = (1024, 1024)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"need dim >= 1 and hidden widths >= 1, got dim={self.dim}, hidden={self.hidden}")


CriticConfig = TransportMapConfig


def _at_least_f32(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class _Trunk(nnx.Module):
    def __init__(self, cfg: TransportMapConfig, *, rngs: nnx.Rngs):
        widths = (cfg.dim,) + cfg.hidden
        self.linears = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.norms = nnx.List([nnx.LayerNorm(b, epsilon=cfg.layer_norm_eps, rngs=rngs) for b in widths[1:]])

    def __call__(self, x):
        for lin, norm in zip(self.linears, self.norms):
            x = jax.nn.gelu(norm(lin(x)))
        return x


class TransportMap(nnx.Module):
    """``T: R^D -> R^D``, the trunk then ``Linear(hidden[-1], D)`` (section 4). No output normalisation (ours: the
    reward is a cosine, and ``L_T``'s cost compares ``T(x)`` with ``x`` as they are)."""

    def __init__(self, config: TransportMapConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.trunk = _Trunk(config, rngs=rngs)
        self.out = nnx.Linear(config.hidden[-1], config.dim, rngs=rngs)

    def __call__(self, x):
        return self.out(self.trunk(_at_least_f32(x)))


class Critic(nnx.Module):
    """``f: R^D -> R``, the same trunk then ``Linear(hidden[-1], 1)``; returns ``[B]``."""

    def __init__(self, config: TransportMapConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.trunk = _Trunk(config, rngs=rngs)
        self.out = nnx.Linear(config.hidden[-1], 1, rngs=rngs)

    def __call__(self, y):
        return self.out(self.trunk(_at_least_f32(y)))[..., 0]


saving.register_kind(MAP_KIND, TransportMap, TransportMapConfig)
saving.register_kind(CRITIC_KIND, Critic, CriticConfig)


def load_transport_map(path: str) -> TransportMap:
    """A saved map: its directory (``model.json`` of kind ``pisces_transport_map``) or a ``train_ot_map`` workdir
    holding it as ``model/``."""
    d = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    info = saving.read_model_json(d)
    if info["kind"] != MAP_KIND:
        raise ValueError(f"{d!r} holds a {info['kind']!r} model, not a {MAP_KIND} (train one with train_ot_map)")
    return saving.load_model(d)


# ------------------------------------------------------------------------------------------ losses (pure)

def map_loss_from_values(x, tx, f_tx):
    """``L_T = mse(T(x), x) - mean f(T(x))`` from ``x [B, D]``, ``tx = T(x) [B, D]`` and ``f_tx = f(T(x)) [B]``;
    ``mse`` the mean over every element (``1/(B D) sum ||T(x_b) - x_b||^2``)."""
    x, tx, f_tx = (_at_least_f32(a) for a in (x, tx, f_tx))
    return jnp.mean(jnp.square(tx - x)) - jnp.mean(f_tx)


def critic_loss_from_values(f_tx, f_y):
    """``L_f = mean f(T(x)) - mean f(y)`` (``f`` learns to score video embeddings above mapped text ones)."""
    return jnp.mean(f_tx) - jnp.mean(f_y)


def map_loss(tmap: TransportMap, critic: Critic, x):
    """``(L_T, metrics)`` for a text batch ``x [B, D]``; the critic is a constant here (only ``T`` is updated)."""
    tx = tmap(x)
    f_tx = critic(tx)
    loss = map_loss_from_values(x, tx, f_tx)
    return loss, {"map_loss": loss, "map_cost": jnp.mean(jnp.square(tx - x)), "f_tx": jnp.mean(f_tx)}


def critic_loss(tmap: TransportMap, critic: Critic, x, y):
    """``(L_f, metrics)`` for a text batch ``x`` and a video batch ``y``; ``T(x)`` enters as a constant."""
    tx = jax.lax.stop_gradient(tmap(x))
    f_tx, f_y = critic(tx), critic(y)
    loss = critic_loss_from_values(f_tx, f_y)
    return loss, {"critic_loss": loss, "f_y": jnp.mean(f_y)}


# ------------------------------------------------------------------------------------------ the training loop

@dataclasses.dataclass(frozen=True)
class OTTrainConfig:
    """Section 4's loop: ``outer_steps`` of (``map_updates`` = 10 updates of T, one of f); Adam ``learning_rate``
    1e-4 with cosine decay to 0 over each network's own number of updates (ours: the section names a cosine
    schedule, not its length or floor), global-norm clip 1.0; ``batch_size`` embeddings per update (ours)."""

    outer_steps: int = 500
    map_updates: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        for k in ("outer_steps", "map_updates", "batch_size", "log_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")


def _optimizer(lr: float, clip: float, updates: int):
    schedule = optax.cosine_decay_schedule(lr, max(int(updates), 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))


def make_outer_step(graph_t, graph_f, tx_opt, f_opt, x_all, y_all, cfg: OTTrainConfig):
    """``step(state, key) -> (state, metrics)``, one outer step on the embeddings ``x_all [N, D]`` (text) and
    ``y_all [M, D]`` (video): ``map_updates`` map updates (a scan, each on its own random text batch), then one
    critic update on a fresh text batch and an independent video batch. ``state = (params_T, params_f, opt_T,
    opt_f)``, pure pytrees; batches are drawn with replacement (ours)."""
    x_all, y_all = jnp.asarray(x_all, jnp.float32), jnp.asarray(y_all, jnp.float32)
    b = int(cfg.batch_size)

    def draw(key, data):
        return data[jax.random.randint(key, (b,), 0, data.shape[0])]

    def t_update(carry, key):
        pt, pf, ot_, of = carry
        critic = nnx.merge(graph_f, pf)

        def loss(p):
            return map_loss(nnx.merge(graph_t, p), critic, draw(key, x_all))
        (_, m), g = jax.value_and_grad(loss, has_aux=True)(pt)
        upd, ot_ = tx_opt.update(g, ot_, pt)
        return (optax.apply_updates(pt, upd), pf, ot_, of), m

    def step(state, key):
        k_t, k_x, k_y = jax.random.split(key, 3)
        state, mt = jax.lax.scan(t_update, state, jax.random.split(k_t, cfg.map_updates))
        pt, pf, ot_, of = state
        tmap = nnx.merge(graph_t, pt)

        def loss(p):
            return critic_loss(tmap, nnx.merge(graph_f, p), draw(k_x, x_all), draw(k_y, y_all))
        (_, mf), g = jax.value_and_grad(loss, has_aux=True)(pf)
        upd, of = f_opt.update(g, of, pf)
        metrics = {**jax.tree.map(lambda a: a[-1], mt), **mf}
        return (pt, optax.apply_updates(pf, upd), ot_, of), metrics

    return step


def train_transport_map(x, y, map_config: TransportMapConfig, train: OTTrainConfig,
                        log: Callable[[int, dict], None] | None = None) -> tuple[TransportMap, Critic, list[dict]]:
    """Train ``T`` (text -> video) and ``f`` on text embeddings ``x [N, D]`` and video embeddings ``y [M, D]``
    (module doc); returns the trained networks and the logged metrics (every ``log_every`` outer steps and the
    last). Deterministic given ``train.seed``; no checkpoints (a run takes seconds to minutes: rerun it)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != map_config.dim or y.shape[1] != map_config.dim:
        raise ValueError(f"text and video embeddings must be [N, {map_config.dim}], got {x.shape} and {y.shape}")
    rngs = nnx.Rngs(train.seed)
    tmap, critic = TransportMap(map_config, rngs=rngs), Critic(map_config, rngs=rngs)
    graph_t, pt = nnx.split(tmap)
    graph_f, pf = nnx.split(critic)
    tx_opt = _optimizer(train.learning_rate, train.grad_clip, train.outer_steps * train.map_updates)
    f_opt = _optimizer(train.learning_rate, train.grad_clip, train.outer_steps)
    state = (pt, pf, tx_opt.init(pt), f_opt.init(pf))
    step = jax.jit(make_outer_step(graph_t, graph_f, tx_opt, f_opt, x, y, train))
    key = jax.random.PRNGKey(train.seed)
    history = []
    for i in range(train.outer_steps):
        state, m = step(state, jax.random.fold_in(key, i))
        if (i + 1) % train.log_every == 0 or i + 1 == train.outer_steps:
            row = {"step": i + 1, **{k: float(v) for k, v in m.items()}}
            history.append(row)
            if log is not None:
                log(i + 1, row)
    return nnx.merge(graph_t, state[0]), nnx.merge(graph_f, state[1]), history


# ------------------------------------------------------------------------------------------ rewards

def cosine(a, b):
    """Row-wise ``<a, b> / (max(||a||, 1e-8) max(||b||, 1e-8))``."""
    a, b = _at_least_f32(a), _at_least_f32(b)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), COS_EPS)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), COS_EPS)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def quality_reward(embedder: emb.VideoTextEmbedder, tmap: TransportMap, latents, text_tokens, mask):
    """``R_Q = cos(e_v, T(e_t))`` per clip, ``[B]`` (module doc). Differentiable in ``latents``; the text side is
    a constant of the generator (a prompt), so its branch is cut from the graph."""
    e_v = embedder.embed_video(latents)
    e_t = jax.lax.stop_gradient(tmap(embedder.embed_text(text_tokens, mask)))
    return cosine(e_v, e_t)


def pisces_plan_fn(epsilon: float = 0.05, mass: float = 0.9, max_iters: int = 200, tol: float = 1e-3):
    """``plan_fn`` for :func:`~shelllcc.rewards.embeddings.plan_transform`: per clip and head the row-normalised
    partial-transport plan ``[B, H, L, N]`` of PISCES's cost on the layer's queries and keys (padding: module doc).
    Everything it reads is cut from the graph first (the plan is a constant; PISCES builds it under no_grad)."""
    ot.relaxation_exponent(float(epsilon), float(mass))          # a bad mass fails here, not inside a trace

    def plan_fn(attn, text_tokens, visual_tokens, frame_index, positions, *, text_mask=None, layer=0):
        del layer
        attn, q, k = (jax.lax.stop_gradient(a) for a in (attn, text_tokens, visual_tokens))
        b, _, length, _ = attn.shape
        mask = jnp.ones((b, length), bool) if text_mask is None else jnp.asarray(text_mask, bool)
        first = jnp.argmax(mask, axis=-1)                                    # the first real token (0 if none)
        rows = jnp.where(mask, jnp.arange(length)[None, :], first[:, None])  # [B, L]
        q_rows = jnp.take_along_axis(q, rows[:, None, :, None], axis=2)
        a_rows = jnp.take_along_axis(attn, rows[:, None, :, None], axis=2)
        frames = np.asarray(frame_index)
        num_frames = int(frames.max()) + 1

        def cost_one(y, x, a):
            return ot.pisces_cost(y, x, a, frames, positions, num_frames=num_frames)
        cost = jax.vmap(jax.vmap(cost_one))(q_rows, k, a_rows)              # [B, H, L, N]
        cost = jnp.where(mask[:, None, :, None], cost, PAD_COST)

        def plan_one(c):
            return ot.token_transport_plan(c, epsilon, mass, max_iters, tol)
        return jax.vmap(jax.vmap(plan_one))(cost)

    return plan_fn


def semantic_reward(matcher: emb.TokenMatcher, latents, text_tokens, mask, epsilon: float = 0.05, mass: float = 0.9,
                    max_iters: int = 200, tol: float = 1e-3, plan_fn: Callable[..., Any] | None = None):
    """``R_S = sigmoid(match_logit)`` with PISCES's plan fused into every cross-attention layer, ``[B]`` (module
    doc). ``plan_fn`` replaces the Sinkhorn plan (same contract as :func:`pisces_plan_fn`'s), e.g. in tests."""
    plan_fn = plan_fn or pisces_plan_fn(epsilon, mass, max_iters, tol)
    logits = matcher.match_logits(latents, text_tokens, mask, attention_transform=emb.plan_transform(plan_fn))
    return jax.nn.sigmoid(logits.astype(jnp.float32))


def text_mask_from_context(context):
    """The caption mask ``[B, L]`` of the DiT's context ``[B, L, D]``: True where a token is not all zeros (the
    caches store the text encoder's embeddings zero past each caption)."""
    return jnp.any(jnp.asarray(context) != 0, axis=-1)


@dataclasses.dataclass(frozen=True)
class PiscesModels:
    """The three frozen models both rewards read, split for jitted programs (``params`` a pure dict)."""

    graphs: tuple
    params: dict
    description: str

    def merge(self, params=None):
        p = self.params if params is None else params
        return tuple(nnx.merge(g, p[k]) for g, k in zip(self.graphs, ("dual", "matcher", "map")))


def load_models(embeddings: str, ot_map: str) -> PiscesModels:
    """The dual encoder and matcher of a ``train_embeddings`` workdir (``dual/``, ``matcher/``) and the map of a
    ``train_ot_map`` workdir (or its ``model/``); the map must be as wide as the dual encoder's embedding."""
    dual = emb.load_dual_encoder(os.path.join(embeddings, "dual"))
    matcher = emb.load_matcher(os.path.join(embeddings, "matcher"))
    tmap = load_transport_map(ot_map)
    if tmap.config.dim != dual.config.embed_dim:
        raise ValueError(f"the OT map {ot_map!r} is {tmap.config.dim} wide, the dual encoder's embedding "
                         f"{dual.config.embed_dim}")
    graphs, params = [], {}
    for k, m in (("dual", dual), ("matcher", matcher), ("map", tmap)):
        g, s = nnx.split(m)
        graphs.append(g)
        params[k] = nnx.to_pure_dict(s)
    return PiscesModels(tuple(graphs), params, f"PISCES on the embeddings {embeddings} and the OT map {ot_map}")


def pisces_rewards(params, graphs, latents, context, *, quality_weight: float = 1.0, semantic_weight: float = 1.0,
                   epsilon: float = 0.05, mass: float = 0.9, max_iters: int = 200, tol: float = 1e-3):
    """``(w_Q R_Q + w_S R_S [B], R_Q [B], R_S [B])`` of latents and the DiT's context (its mask from the zeros)."""
    dual, matcher, tmap = (nnx.merge(g, params[k]) for g, k in zip(graphs, ("dual", "matcher", "map")))
    mask = text_mask_from_context(context)
    text = jnp.asarray(context, jnp.float32)
    rq = quality_reward(dual, tmap, latents, text, mask)
    rs = semantic_reward(matcher, latents, text, mask, epsilon, mass, max_iters, tol)
    return quality_weight * rq + semantic_weight * rs, rq, rs


__all__ = ["CRITIC_KIND", "MAP_KIND", "PAD_COST", "Critic", "CriticConfig", "OTTrainConfig", "PiscesModels",
           "TransportMap", "TransportMapConfig", "cosine", "critic_loss", "critic_loss_from_values", "load_models",
           "load_transport_map", "make_outer_step", "map_loss", "map_loss_from_values", "pisces_plan_fn",
           "pisces_rewards", "quality_reward", "semantic_reward", "text_mask_from_context", "train_transport_map"]

