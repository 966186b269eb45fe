"""Experiment ``reward_finetune``: the DiT fine-tuned against a frozen Shell-LCC manifold (DESIGN 2.5).

Objectives (``objective.name``):

* ``one_step``: ``x = eps``, ``s ~ U[s_lo, s_hi]``, ``z = x - s v_theta(x, 1000 s, c)``,
  ``loss = w * d(z) + drift_weight * relu(mean((z - z_ref)^2) - drift_margin)``; the anti-drift term
  (``drift_weight > 0``) compares with the frozen starting model (the base without adapters under LoRA,
  a frozen copy of the initial weights under full fine-tuning).
* ``noised_data``: ``x = (1 - s) x0 + s eps`` from the latent cache, ``z = x - s v_theta``,
  ``loss = w * d(z) + sft_weight * flow-matching loss`` (one forward pass).
* ``sft``: flow matching only (the no-reward control, same data, optimizer and steps).

``d`` is ``manifold_distance(manifold, z, reward.kind)`` (lcc | shell_norm | shell | shell_band), run
inside the step under ``jax.shard_map`` over the batch axes; ``w = reward.weight``. The manifold comes
from ``reward.manifold``: the ``manifold/`` directory of a ``fit_manifold`` run (or its workdir), a
reference PyTorch checkpoint (``.pt``/``.pth``), or ``random`` (seeded, for smoke and speed runs only).
It must have been fitted on latents normalised as this run's ``data`` section normalises them.

``reward.kind='energy_judge'``: instead of a distance, ``d(z) = mean over the batch of E(z)``, the energy of GT-SVJ's
judge at ``reward.energy_judge`` (a ``train_energy_judge`` workdir or its ``model/``; frozen, judged at t = 0; its
reward is ``-E``, so lower is better like a distance). Issue 18: GT-SVJ as a reward for one-step fine-tuning.

``reward.kind='pisces'`` (issue 19, PISCES's direct backpropagation; :mod:`shelllcc.rewards.pisces`):
``d(z) = -mean_B (quality_weight R_Q + semantic_weight R_S)`` on the clip and the prompt it was made for
(``R_Q = cos(e_v, T(e_t))``, ``R_S`` the matcher's positive probability with the token transport plan fused into
its cross-attention), the dual encoder and matcher of ``reward.pisces.embeddings`` (a ``train_embeddings``
workdir) and the map of ``reward.pisces.ot_map`` (a ``train_ot_map`` workdir) frozen. PISCES's ``L_consistency``
is, here (ours), the objective's own term: ``objective.drift_weight`` (one_step's anti-drift against the base) or
``objective.sft_weight`` (noised_data's flow matching); section 4 weighs it 1. The models read latents (no VAE
decode); the caption mask is where the context is non-zero. Metrics ``pisces_quality`` / ``pisces_semantic``
are the batch means of ``R_Q`` / ``R_S``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry, dit_setup, sft
from shelllcc import parallel
from shelllcc.errors import ConfigError
from shelllcc.flow import objectives
from shelllcc.manifold import io as manifold_io
from shelllcc.manifold.params import ManifoldConfig, init_params
from shelllcc.rewards import energy_judge as ej
from shelllcc.rewards import manifold_distance, pisces
from shelllcc.rewards.manifold_distance import KINDS
from third_party.shell_lcc_reference import load_manifold as load_reference

OBJECTIVES = ("one_step", "noised_data", "sft")
ENERGY_JUDGE = "energy_judge"
PISCES = "pisces"
REWARD_KINDS = KINDS + (ENERGY_JUDGE, PISCES)   # a manifold distance, a trained judge's energy or PISCES's rewards


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("reward_finetune")
    c.optim.learning_rate = 1e-5
    c.flow = sft.default_config().flow            # the noise levels of the sft objective / term
    c.objective = dict(name="one_step", s_lo=0.7, s_hi=1.0, sft_weight=1.0, drift_weight=0.0, drift_margin=0.0)
    c.reward = dict(
        manifold="",                 # fit_manifold output dir / workdir, a reference .pt, or 'random'
        kind="shell",
        weight=1.0,
        shell_band_target=-1.0,      # tau of shell_band; < 0: the value stored with the manifold
        coder="amortized",           # amortized | analytic
        chunk_size=8192,
        compute_dtype="float32",
        implementation="fused",      # fused (value and gradient in one pass) | remat (plain autodiff, scan)
        kernel="auto",               # auto (Pallas on GPU, XLA elsewhere) | xla | pallas
        random=dict(num_anchors=64, hidden_dim=64, patch_size=(1, 1, 1), seed=0),
        energy_judge="",             # kind=energy_judge: a train_energy_judge workdir (or its model/)
        # kind=pisces (module doc): the embedding models, the OT map, the rewards' weights and the plan's solver
        pisces=dict(embeddings="", ot_map="", quality_weight=1.0, semantic_weight=1.0, epsilon=0.05, mass=0.9,
                    max_iters=200, tol=1e-3),
    )
    return c


def load_reward_manifold(r: ml_collections.ConfigDict, latent_channels: int):
    """``(params, ManifoldConfig, extra)`` for ``reward.manifold``."""
    src = r.manifold
    if not src:
        raise ValueError("reward_finetune needs --config.reward.manifold=DIR (a fit_manifold output), a reference "
                         ".pt checkpoint, or 'random'")
    if src == "random":
        rc = r.random
        dim = latent_channels * int(np.prod(rc.patch_size))
        cfg = ManifoldConfig(dim=dim, num_anchors=rc.num_anchors, hidden_dim=rc.hidden_dim,
                             patch_size=tuple(rc.patch_size))
        key = jax.random.PRNGKey(rc.seed)
        anchors = jax.random.normal(jax.random.fold_in(key, 1), (rc.num_anchors, dim))
        return init_params(key, cfg, anchors), cfg, {"shell_band_target": 1.0}
    if src.endswith((".pt", ".pth")):
        params, cfg = load_reference(src)[:2]
        return params, cfg, {}
    path = os.path.join(src, "manifold") if os.path.isdir(os.path.join(src, "manifold")) else src
    return manifold_io.load_manifold(path)


def _objective_loss(config, setup: dit_setup.Setup, sampler, reward_fn, params, frozen, batch, key):
    """The configured objective (``objective.name``) of the trained model with ``reward_fn(z) -> d``: the one
    dispatch every reward kind shares (a reward reads the real prompt; only the velocity's context is dropped
    for the flow-matching objectives, which keep the base's null-prompt training for guidance)."""
    o = config.objective
    model = nnx.merge(setup.graphdef, params, frozen["model"])
    k_eps, k_s = jax.random.split(key)
    x0, ctx = batch["latents"], batch["context"]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)   # float32 noise whatever the cache dtype
    if o.name == "one_step":
        ref = None
        if o.drift_weight > 0:
            ref_params = jax.tree.map(jnp.zeros_like, params) if config.lora.rank > 0 else frozen["reference"]
            ref = nnx.merge(setup.graphdef, ref_params, frozen["model"])
        return objectives.one_step_from_noise(model, reward_fn, eps, ctx, k_s, s_lo=o.s_lo, s_hi=o.s_hi,
                                              ref_velocity_fn=ref, drift_margin=o.drift_margin,
                                              drift_weight=o.drift_weight)
    ctx = objectives.drop_text(jax.random.fold_in(key, 2), ctx, float(config.flow.text_dropout))
    if o.name == "noised_data":
        return objectives.noised_data(model, reward_fn, x0, eps, ctx, k_s, s_lo=o.s_lo, s_hi=o.s_hi,
                                      sft_weight=o.sft_weight)
    return objectives.sft_loss(model, x0, eps, ctx, k_s, sigma_sampler=sampler)


def _add_reference(config, setup: dit_setup.Setup, extra_frozen: dict, extra_sh: dict) -> None:
    """A frozen copy of the starting weights, sharded like the trained ones, where the anti-drift term needs
    one (full fine-tuning; under LoRA the reference is the adapters zeroed)."""
    if config.objective.name == "one_step" and config.objective.drift_weight > 0 and not config.lora.rank > 0:
        extra_frozen["reference"] = jax.tree.map(jnp.copy, setup.params)
        extra_sh["reference"] = setup.param_shardings


def make_loss(config: ml_collections.ConfigDict):
    o, r = config.objective, config.reward
    if o.name not in OBJECTIVES:
        raise ValueError(f"unknown objective.name {o.name!r}; expected one of {OBJECTIVES}")
    if r.kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward.kind {r.kind!r}; expected one of {REWARD_KINDS}")
    if r.kind == ENERGY_JUDGE:
        return _energy_judge_loss(config)
    if r.kind == PISCES:
        return _pisces_loss(config)
    sampler = sft.sigma_sampler(config.flow)

    def build(setup: dit_setup.Setup):
        cfg = dit_setup.transformer_config(config.model)
        channels = cfg.in_channels
        manifold, mcfg, extra = load_reward_manifold(r, channels)
        if mcfg.dim != channels * int(np.prod(mcfg.patch_size)):
            raise ValueError(f"the manifold has D={mcfg.dim} with patch {mcfg.patch_size}; the DiT's latents have "
                             f"{channels} channels, so D should be {channels * int(np.prod(mcfg.patch_size))}")
        target = None
        if r.kind == "shell_band":
            target = r.shell_band_target if r.shell_band_target >= 0 else extra.get("shell_band_target")
            if target is None:
                raise ValueError("reward.kind='shell_band' needs reward.shell_band_target (the manifold stores none)")
        print(f"reward: {r.kind} x {r.weight} on a manifold of {mcfg.num_anchors} anchors, D={mcfg.dim}, patch "
              f"{mcfg.patch_size} ({r.manifold}); objective {o.name}", flush=True)
        mesh = setup.mesh
        compute_dtype = jnp.dtype(r.compute_dtype)

        def distance(manifold_params, target, z):
            d = manifold_distance(manifold_params, z.astype(jnp.float32), r.kind, target,
                                  patch_size=mcfg.patch_size, coder=r.coder, chunk_size=r.chunk_size,
                                  compute_dtype=compute_dtype, mesh=mesh, data_axis=parallel.BATCH_AXES,
                                  implementation=r.implementation, kernel=r.kernel,
                                  bn_eps=mcfg.bn_eps, shell_eps=mcfg.shell_eps)
            return r.weight * d

        def loss_fn(params, frozen, batch, key):
            reward_fn = functools.partial(distance, frozen["manifold"], frozen.get("reward_target"))
            return _objective_loss(config, setup, sampler, reward_fn, params, frozen, batch, key)

        rep = parallel.replicated(mesh)
        extra_frozen = {"manifold": manifold}
        extra_sh = {"manifold": jax.tree.map(lambda _: rep, manifold)}
        if target is not None:
            # an input, not a constant of the program: runs that differ only in tau share one compilation
            extra_frozen["reward_target"] = jnp.asarray(target, jnp.float32)
            extra_sh["reward_target"] = rep
        _add_reference(config, setup, extra_frozen, extra_sh)
        return loss_fn, extra_frozen, extra_sh

    return build


def _energy_judge_loss(config: ml_collections.ConfigDict):
    """``make_loss`` with the energy judge's mean energy as ``d`` (module doc); the judge's weights are a frozen
    input of the step (their checksum is a resume setting like a manifold's)."""
    o, r = config.objective, config.reward
    if not r.energy_judge:
        raise ConfigError("reward.kind='energy_judge' needs reward.energy_judge (a train_energy_judge workdir)")
    sampler = sft.sigma_sampler(config.flow)

    def build(setup: dit_setup.Setup):
        judge = ej.load_energy_judge(r.energy_judge)
        graphdef, state = nnx.split(judge)
        print(f"reward: -energy x {r.weight} of the energy judge {r.energy_judge} ({judge.config.num_blocks} of "
              f"{judge.config.num_layers} blocks); objective {o.name}", flush=True)

        def loss_fn(params, frozen, batch, key):
            judge_now = nnx.merge(graphdef, frozen["energy_judge"])

            def reward_fn(z):
                return r.weight * jnp.mean(ej.clip_energy(judge_now, z.astype(jnp.float32), 0.0))
            return _objective_loss(config, setup, sampler, reward_fn, params, frozen, batch, key)

        rep = parallel.replicated(setup.mesh)
        judge_state = nnx.to_pure_dict(state)
        extra_frozen = {"energy_judge": judge_state}
        extra_sh = {"energy_judge": jax.tree.map(lambda _: rep, judge_state)}
        _add_reference(config, setup, extra_frozen, extra_sh)
        return loss_fn, extra_frozen, extra_sh

    return build


def check_pisces(p: ml_collections.ConfigDict, where: str = "reward.pisces") -> None:
    """The ``reward.pisces`` values (``where`` names the section in errors)."""
    if not p.embeddings:
        raise ConfigError(f"{where}.embeddings is empty: give a train_embeddings workdir (its dual/ and matcher/)")
    if not p.ot_map:
        raise ConfigError(f"{where}.ot_map is empty: give a train_ot_map workdir (or its model/)")
    if not p.epsilon > 0:
        raise ConfigError(f"{where}.epsilon={p.epsilon} must be > 0")
    if not 0 < p.mass <= 1:
        raise ConfigError(f"{where}.mass={p.mass} must be in (0, 1]")
    if not (isinstance(p.max_iters, int) and p.max_iters >= 1):
        raise ConfigError(f"{where}.max_iters={p.max_iters!r} must be an integer >= 1")
    if not p.tol > 0:
        raise ConfigError(f"{where}.tol={p.tol} must be > 0")
    if p.quality_weight < 0 or p.semantic_weight < 0 or p.quality_weight + p.semantic_weight == 0:
        raise ConfigError(f"{where}.quality_weight={p.quality_weight} and semantic_weight={p.semantic_weight} must be "
                          ">= 0 and not both 0")


def _pisces_loss(config: ml_collections.ConfigDict):
    """``make_loss`` with ``d = -mean(w_Q R_Q + w_S R_S)`` (module doc); the three models' weights are frozen
    inputs of the step (checksummed as resume settings)."""
    o, r = config.objective, config.reward
    p = r.pisces
    check_pisces(p)
    sampler = sft.sigma_sampler(config.flow)

    def build(setup: dit_setup.Setup):
        try:
            models = pisces.load_models(p.embeddings, p.ot_map)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"reward.pisces: {err}") from None
        print(f"reward: -(R_Q x {p.quality_weight} + R_S x {p.semantic_weight}) x {r.weight}, {models.description}; "
              f"objective {o.name}", flush=True)
        solver = dict(epsilon=float(p.epsilon), mass=float(p.mass), max_iters=int(p.max_iters), tol=float(p.tol))

        def loss_fn(params, frozen, batch, key):
            ctx = batch["context"]
            parts = {}

            def reward_fn(z):
                total, rq, rs = pisces.pisces_rewards(frozen["pisces"], models.graphs, z.astype(jnp.float32), ctx,
                                                      quality_weight=float(p.quality_weight),
                                                      semantic_weight=float(p.semantic_weight), **solver)
                # the objective reports the mean of d only; the two rewards go to the metrics beside it
                parts["pisces_quality"] = jax.lax.stop_gradient(jnp.mean(rq))
                parts["pisces_semantic"] = jax.lax.stop_gradient(jnp.mean(rs))
                return -r.weight * total
            loss, metrics = _objective_loss(config, setup, sampler, reward_fn, params, frozen, batch, key)
            return loss, {**metrics, **parts}

        rep = parallel.replicated(setup.mesh)
        extra_frozen = {"pisces": models.params}
        extra_sh = {"pisces": jax.tree.map(lambda _: rep, models.params)}
        _add_reference(config, setup, extra_frozen, extra_sh)
        return loss_fn, extra_frozen, extra_sh

    return build


def run(config: ml_collections.ConfigDict, workdir: str, on_eval=None):
    """Train; ``on_eval(step, model)`` every ``train.eval_every`` steps (see ``dit_setup.run_training``)."""
    return dit_setup.run_training(config, workdir, make_loss(config), on_eval=on_eval)


get_config = config_entry.defaults_entry(default_config)
