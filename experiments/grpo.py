"""Experiment ``grpo``: online RL of the Wan DiT with Flow-GRPO or DanceGRPO (``../shared/ALIGNMENT_METHODS.md`` s. 5).

One outer step (one call of the jitted step, one optimizer step per ``grpo.updates_per_rollout``)::

    c_1..c_P          P = grpo.prompts_per_step text embeddings from the data section (a latent cache's
                      ``text_embeddings``, or random ones); each repeated G = grpo.group_size times
    rollout           x_1 ~ N(0, I) [P G, ...]; sde_sample under the current parameters (no gradient) on the
                      levels ts = shift_k(linspace(1, 0, n + 1)), n = grpo.sampling_steps, k = grpo.shift:
                      the trajectory x_{t_0} .. x_{t_n} and log p_old(x_{i+1} | x_i) per step
    rewards           R = reward source (``reward.source``) of the final latent x_{t_n} (no decode), [P, G]
    advantages        A = clip((R - mean_G R) / (std_G R + 1e-4), -adv_clip, adv_clip)     (flow.grpo)
    DanceGRPO         best-of-n: per group the n/2 highest and n/2 lowest samples (advantages from the whole
                      group), the rest dropped (``grpo.best_of_n``; 0 keeps the group)
    timesteps         K = max(1, floor(f n)) distinct steps, f = grpo.timestep_fraction (default 1 for
                      Flow-GRPO, 0.6 for DanceGRPO), one draw per outer step shared by the batch (ours)
    update            U = grpo.updates_per_rollout minibatches (rows u, u + U, ...); for each, the gradient of
                      L = mean over the K steps of grpo_objective(log p_theta, log p_old, A, KL) accumulated
                      over the steps in a lax.scan (one step's activations alive at a time), then one update

with, per trained step ``i`` and sample, ``log p_theta`` and ``mu_theta`` recomputed by ``sde.step_log_prob`` from
``(x_i, x_{i+1})`` under the current parameters, and (Flow-GRPO, ``grpo.kl_weight > 0``)
``KL = mean_elements ||mu_theta - mu_ref||^2 / (2 s_t^2 [|dt|])`` against the reference, the starting model:
under LoRA the same network with its adapters zeroed, under full fine-tuning a frozen copy of the starting
weights. ``grpo.kl_with_dt=False`` is the default: upstream omits ``|dt|`` and its published weights
(0.01-0.04) were tuned on that form; ``True`` is the exact KL of the two Gaussian transitions (``flow.grpo.grpo_kl``).
DanceGRPO (``grpo.mode='dance_grpo'``) has no KL: a ``grpo.kl_weight`` other than 0 there is an error.

With ``U = 1`` (the default) the policy that sampled is the policy being updated, so the ratio is 1 (up to
the recomputation's rounding) and PPO's clip never binds; the gradient is then ``-A grad log p``. ``U > 1``
makes the later minibatches off-policy and the clip ``grpo.clip_eps`` act, as in upstream's split of a
rollout batch into several optimizer steps. The learning-rate schedule advances once per outer step (ours).

Where the sampling happens (ours): inside the one jitted train step, before the update, rather than in a
separate jitted program feeding rollouts as batches. The rollout is a pure function of the parameters at the
start of the step and of ``fold_in(rng, step)``, so a checkpoint (parameters, optimizer, step, the prompt
iterator's position) is all that exact resume needs: no rollout buffer lives between steps or in a
checkpoint. It also keeps the sampled batch where it was drawn (sharded over the mesh's batch axes, see
below) with no host round trip, and one compilation covers rollout and update. The cost is that the step's
program holds the sampler's scan and the training scan; a separate program would only pay off with a rollout
reused over several outer steps, which ``U`` covers inside the step. The shared stack
(``dit_setup.run_training``: state, optimizer, checkpoints, resume, SIGTERM, metrics) runs it through a
loss carrying ``make_train_step`` (``dit_setup.step_parts``); the loss itself is the objective of one stored
transition, ``(params, frozen, batch, key) -> (loss, metrics)`` with batch ``x_t, x_next, t, dt, context,
log_prob_old, advantages``.

Sharding: the data section yields P prompts per step, repeated G times on the host (:class:`GroupedBatches`),
so the step's batch is the ``P G`` samples of the rollout, split over the mesh's batch axes like any batch
(``data.batch_size`` is set to ``P G``; ours): G samples of a prompt are drawn on as many devices as the
batch allows, and the group statistics (a reshape to ``[P, G]``) are reduced across them by XLA.

Rewards (``reward.source``, any of ``experiments/reward_sources``'s on the final latent, no decode):
``shell_lcc`` (``-manifold_distance`` of ``reward.manifold``, kind ``reward.kind``), ``reward_model`` (the
latent BTT reward model ``reward.reward_model``, its ``[B, 3]`` dimensions weighted by
``reward.dimension_weights``), ``energy_judge`` (``-E`` of ``reward.energy_judge``); a new source (PISCES)
is one entry of :data:`REWARD_SOURCES`. The latents are the DiT's (normalised by ``data.latent_mean/std``),
the space the project's rewards are fitted in.

Logged per step: ``reward_mean``, ``reward_group_std`` (mean over groups of the within-group std),
``reward_max``, ``clip_fraction``, ``ratio_mean``, ``approx_kl`` (``mean (log r)^2 / 2``), ``kl`` (to the
reference), ``policy_loss``, ``loss``, ``samples_drawn`` (cumulative rollouts, ``step P G``) and the
stack's ``grad_norm``, ``steps_per_s``. Writes what ``sft`` writes (``checkpoints/``, ``metrics.jsonl``,
``model/`` with LoRA merged).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry, dit_setup, reward_sources
from shelllcc import parallel
from shelllcc.errors import ConfigError
from shelllcc.flow import grpo as grpo_lib
from shelllcc.flow import sde
from shelllcc.flow.rectified import model_timestep
from shelllcc.flow.timesteps import shift_sigmas
from shelllcc.training import lora as lora_lib
from shelllcc.training import train_state as ts

MODES = ("flow_grpo", "dance_grpo")
DEFAULT_FRACTION = {"flow_grpo": 1.0, "dance_grpo": grpo_lib.DANCE_TIMESTEP_FRACTION}


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("grpo")
    # ours: LoRA so that the reference is the same network with zero adapters (no second copy of the weights)
    c.lora.rank, c.lora.alpha = 32, 64.0
    c.optim.learning_rate = 1e-4
    c.train.log_every = 1
    c.grpo = dict(
        mode="flow_grpo",            # flow_grpo | dance_grpo
        group_size=8,                # G samples per prompt (upstream: 24; its users: global batch >= 16-32)
        prompts_per_step=2,          # P prompts per outer step; the rollout is P x G samples
        sampling_steps=10,           # SDE steps of a rollout (the section: 10 for training)
        shift=3.0,                   # flow shift of the rollout's levels (ours: Wan's 480p value)
        sde_a=sde.FLOW_GRPO_A,       # Flow-GRPO's s_t = a sqrt(t / (1 - t))
        dance_eta=sde.DANCE_GRPO_ETA,  # DanceGRPO's constant diffusion
        timestep_fraction=0.0,       # share of the steps trained per update; 0: the mode's (1.0 / 0.6)
        best_of_n=0,                 # DanceGRPO: keep the n extremes of each group (0: all G)
        clip_eps=grpo_lib.CLIP_EPS,  # PPO clip (the section: 1e-4)
        adv_clip=grpo_lib.ADV_CLIP,  # advantages clipped to +-5
        kl_weight=0.04,              # Flow-GRPO's beta (0.01-0.04); must be 0 for dance_grpo
        kl_with_dt=False,            # upstream's form (module doc)
        updates_per_rollout=1,       # optimizer updates per rollout (minibatches of it)
    )
    c.reward = dict(
        source="shell_lcc",          # one of REWARD_SOURCES
        manifold="",                 # shell_lcc: a fit_manifold output (or 'random' for smoke runs)
        kind="shell_norm",           # shell_lcc: the distance (lcc | shell_norm | shell)
        reward_model="",             # reward_model: a train_reward_model workdir (or 'random')
        energy_judge="",             # energy_judge: a train_energy_judge workdir (or 'random')
        # pisces: R_Q + R_S of PISCES (a train_embeddings workdir and a train_ot_map workdir)
        pisces=ml_collections.ConfigDict(dict(embeddings="", ot_map="")),
        dimension_weights=(1.0, 1.0, 1.0),   # VQ, MQ, TA of a [B, 3] reward
        seed=0,                      # the 'random' stand-ins' seed
    )
    return c


# ------------------------------------------------------------------------------------------ rewards

def _generator(setup):
    """The starting DiT as a plain model (adapters folded in: zero at the start), for the 'random' stand-ins,
    which copy its first block."""
    return lora_lib.merge_lora(nnx.clone(nnx.merge(setup.graphdef, setup.params, setup.frozen_model)))


REWARD_SOURCES: dict[str, Callable[[Any, Any], reward_sources.RewardSource]] = {
    "shell_lcc": lambda config, setup: reward_sources.shell_lcc_source(
        config.reward.manifold, config.reward.kind, dit_setup.transformer_config(config.model).in_channels,
        key="reward.manifold"),
    "reward_model": lambda config, setup: reward_sources.reward_model_source(
        config.reward.reward_model, _generator(setup), config.reward.seed, key="reward.reward_model"),
    "energy_judge": lambda config, setup: reward_sources.energy_judge_source(
        config.reward.energy_judge, _generator(setup), config.reward.seed, key="reward.energy_judge"),
    "pisces": lambda config, setup: reward_sources.pisces_source(
        config.reward.pisces.embeddings, config.reward.pisces.ot_map, key="reward.pisces"),
}


# ------------------------------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved ``grpo`` section."""
    kind: str
    group: int
    prompts: int
    keep: int                        # samples per group trained on (best-of-n, else G)
    levels: tuple                    # the rollout's levels ts (float64 host values)
    fraction: float
    trained_steps: int               # K
    updates: int                     # U
    use_kl: bool

    @property
    def rollout_size(self) -> int:
        return self.prompts * self.group

    @property
    def train_size(self) -> int:
        return self.prompts * self.keep


def rollout_levels(steps: int, shift: float) -> np.ndarray:
    """``shift_k(linspace(1, 0, n + 1))``: from pure noise to 0 (float64, decreasing)."""
    return np.asarray(shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift), np.float64)


def settings(config) -> Settings:
    """The ``grpo`` section checked and resolved; errors are one line naming the key."""
    g = config.grpo
    if g.mode not in MODES:
        raise ConfigError(f"grpo.mode={g.mode!r}; expected one of {MODES}")
    if not (isinstance(g.group_size, int) and g.group_size >= 2):
        raise ConfigError(f"grpo.group_size={g.group_size!r} must be an integer >= 2 (advantages need a group)")
    if not (isinstance(g.prompts_per_step, int) and g.prompts_per_step >= 1):
        raise ConfigError(f"grpo.prompts_per_step={g.prompts_per_step!r} must be a positive integer")
    if not (isinstance(g.sampling_steps, int) and g.sampling_steps >= 2):
        raise ConfigError(f"grpo.sampling_steps={g.sampling_steps!r} must be an integer >= 2 (s_t has a pole at "
                          f"t = 1, the first step borrows the second level's)")
    if not float(g.shift) > 0:
        raise ConfigError(f"grpo.shift={g.shift} must be > 0")
    if not float(g.sde_a) > 0 or not float(g.dance_eta) > 0:
        raise ConfigError(f"grpo.sde_a={g.sde_a} and grpo.dance_eta={g.dance_eta} must be > 0")
    fraction = float(g.timestep_fraction) or DEFAULT_FRACTION[g.mode]
    if not 0 < fraction <= 1:
        raise ConfigError(f"grpo.timestep_fraction={g.timestep_fraction} must lie in (0, 1] (0: the mode's default)")
    keep = int(g.best_of_n) or g.group_size
    if g.best_of_n and not 2 <= g.best_of_n <= g.group_size:
        raise ConfigError(f"grpo.best_of_n={g.best_of_n} must lie in [2, grpo.group_size={g.group_size}] (0: all)")
    if g.best_of_n and g.mode != "dance_grpo":
        raise ConfigError(f"grpo.best_of_n={g.best_of_n} is DanceGRPO's selection; set grpo.mode='dance_grpo'")
    if not float(g.clip_eps) > 0 or not float(g.adv_clip) > 0:
        raise ConfigError(f"grpo.clip_eps={g.clip_eps} and grpo.adv_clip={g.adv_clip} must be > 0")
    if not float(g.kl_weight) >= 0:
        raise ConfigError(f"grpo.kl_weight={g.kl_weight} must be >= 0")
    if g.mode == "dance_grpo" and float(g.kl_weight):
        raise ConfigError(f"grpo.kl_weight={g.kl_weight}: DanceGRPO has no KL term; set it to 0")
    if not (isinstance(g.updates_per_rollout, int) and g.updates_per_rollout >= 1):
        raise ConfigError(f"grpo.updates_per_rollout={g.updates_per_rollout!r} must be a positive integer")
    if (g.prompts_per_step * keep) % g.updates_per_rollout:
        raise ConfigError(f"grpo.updates_per_rollout={g.updates_per_rollout} must divide the trained samples "
                          f"grpo.prompts_per_step x {'grpo.best_of_n' if g.best_of_n else 'grpo.group_size'} = "
                          f"{g.prompts_per_step * keep}")
    r = config.reward
    if r.source not in REWARD_SOURCES:
        raise ConfigError(f"reward.source={r.source!r}; expected one of {tuple(REWARD_SOURCES)}")
    if r.source == "reward_model" and len(tuple(r.dimension_weights)) != 3:
        raise ConfigError(f"reward.dimension_weights={tuple(r.dimension_weights)} must be 3 weights (VQ, MQ, TA)")
    if config.train.microbatch_size:
        raise ConfigError(f"train.microbatch_size={config.train.microbatch_size}: grpo accumulates its gradient over "
                          f"the trained timesteps instead (leave it 0)")
    n = g.sampling_steps
    return Settings(kind=g.mode, group=g.group_size, prompts=g.prompts_per_step, keep=keep,
                    levels=tuple(rollout_levels(n, float(g.shift)).tolist()), fraction=fraction,
                    trained_steps=max(1, int(fraction * n)), updates=g.updates_per_rollout,
                    use_kl=g.mode == "flow_grpo" and float(g.kl_weight) > 0)


def check_config(config) -> None:
    settings(config)


def with_batch(config) -> ml_collections.ConfigDict:
    """``config`` with ``data.batch_size = P G`` (the rollout, what the step's batch holds; ours)."""
    s = settings(config)
    c = copy.deepcopy(config)
    c.data.batch_size = s.rollout_size
    return c


# ------------------------------------------------------------------------------------------ prompts

class GroupedBatches:
    """The data section's iterator read ``P`` examples at a time, each row repeated ``G`` times (rows
    ``p G .. p G + G - 1`` are prompt ``p``'s group); its state is the inner iterator's (exact resume)."""

    def __init__(self, inner, group: int):
        self.inner, self.group = inner, group

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = next(self.inner)
        return {"latents": np.repeat(np.asarray(b["latents"]), self.group, axis=0),
                "context": np.repeat(np.asarray(b["context"]), self.group, axis=0)}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state) -> None:
        self.inner.set_state(state)


def prompt_batches(config) -> GroupedBatches:
    s = settings(config)
    d = copy.deepcopy(config.data)
    d.batch_size = s.prompts
    return GroupedBatches(dit_setup.host_batches(d, config.seed), s.group)


def hooks() -> dit_setup.ModelHooks:
    return dataclasses.replace(dit_setup.dit_hooks(), batches=prompt_batches)


# ------------------------------------------------------------------------------------------ the step

def make_loss(config: ml_collections.ConfigDict):
    """``dit_setup`` ``make_loss``: the objective of one stored transition, carrying the rollout-and-update step."""
    s = settings(config)
    g = config.grpo
    a, eta = float(g.sde_a), float(g.dance_eta)
    kl_weight, with_dt = float(g.kl_weight) if s.use_kl else 0.0, bool(g.kl_with_dt)
    clip_eps, adv_clip = float(g.clip_eps), float(g.adv_clip)
    lora = config.lora.rank > 0
    levels = np.asarray(s.levels, np.float64)
    t_cap = sde._default_t_cap(levels) if s.kind == "flow_grpo" else None
    t_arr = jnp.asarray(levels[:-1], jnp.float32)
    dt_arr = jnp.asarray(levels[1:] - levels[:-1], jnp.float32)
    n_steps = len(levels) - 1
    dim_w = tuple(float(w) for w in config.reward.dimension_weights)
    print(f"grpo: {s.kind}, {s.prompts} prompts x {s.group} samples per step"
          + (f", best {s.keep} of each group" if s.keep < s.group else "")
          + f"; {n_steps} SDE steps (shift {g.shift}), {s.trained_steps} trained per update, {s.updates} update(s) "
            f"per rollout; clip {clip_eps}, KL "
          + (f"{kl_weight} ({'with' if with_dt else 'without'} dt) to the starting model "
             f"({'adapters zeroed' if lora else 'a frozen copy'})" if s.use_kl else "off"), flush=True)

    def build(setup: dit_setup.Setup):
        source = REWARD_SOURCES[config.reward.source](config, setup)
        print(f"grpo: reward {source.description}", flush=True)
        reward_value = nnx.to_pure_dict(source.params) if isinstance(source.params, nnx.State) else source.params
        mesh = setup.mesh
        batch_sh = parallel.batch_sharding(mesh)

        def velocity(params, frozen, x, timestep, ctx):
            model = nnx.merge(setup.graphdef, params, frozen["model"])
            return model(x, timestep, ctx).astype(x.dtype)

        def reference_params(params, frozen):
            # LoRA: zero adapters are the base exactly (the delta is B A); full: the frozen copy
            return jax.tree.map(jnp.zeros_like, params) if lora else frozen["reference"]

        def loss_fn(params, frozen, batch, key):
            """Objective of one stored transition per sample (``grpo_objective``, module doc)."""
            del key
            x, x_next, t, dt, ctx = batch["x_t"], batch["x_next"], batch["t"], batch["dt"], batch["context"]
            # the model timestep as the sampler computed it: the recomputed log-prob of the sampling
            # parameters is then the sampled one (ratio 1 at the first update)
            v = velocity(params, frozen, x, model_timestep(t), ctx)
            logp, mean = sde.step_log_prob(s.kind, x, v, x_next, t, dt, a=a, eta=eta, t_cap=t_cap)
            kl = None
            if s.use_kl:
                v_ref = jax.lax.stop_gradient(velocity(reference_params(params, frozen), frozen, x, model_timestep(t), ctx))
                _, mean_ref = sde.step_log_prob(s.kind, x, v_ref, x_next, t, dt, a=a, eta=eta, t_cap=t_cap)
                kl = grpo_lib.grpo_kl(mean, mean_ref, sde.flow_grpo_sigma(t, a, t_cap), dt, with_dt)
            return grpo_lib.grpo_objective(logp, batch["log_prob_old"], batch["advantages"], kl=kl,
                                           kl_weight=kl_weight, clip_eps=clip_eps)

        def rollout(params, frozen, batch, key):
            """Samples, rewards and advantages of one outer step (no gradient)."""
            params = jax.lax.stop_gradient(params)
            k_noise, k_sde, k_steps = jax.random.split(key, 3)
            ctx = batch["context"]
            b = ctx.shape[0]
            # float32 rollouts whatever the cache dtype: the log-probs compare values at 1e-4 (the clip)
            x1 = jax.lax.with_sharding_constraint(
                jax.random.normal(k_noise, batch["latents"].shape, jnp.float32), batch_sh)
            out = sde.sde_sample(lambda x, tt, c: velocity(params, frozen, x, tt, c), x1, levels, k_sde, ctx,
                                 kind=s.kind, a=a, eta=eta, t_cap=t_cap)
            r = reward_sources.combine(source.apply(frozen["reward"], out["x"], jnp.zeros((b,), jnp.float32), ctx),
                                       dim_w)
            r = jax.lax.stop_gradient(r).reshape(s.prompts, s.group)
            adv = grpo_lib.group_advantages(r, clip=adv_clip)
            traj, logp_old = out["trajectory"], out["log_probs"]           # [n + 1, B, ...], [n, B]
            if s.keep < s.group:
                rows = (jnp.arange(s.prompts)[:, None] * s.group + grpo_lib.best_of_n_indices(r, s.keep)).reshape(-1)
                traj, logp_old, ctx = traj[:, rows], logp_old[:, rows], ctx[rows]
                adv = adv.reshape(-1)[rows]
            steps = grpo_lib.select_timesteps(k_steps, n_steps, s.fraction)
            metrics = {"reward_mean": jnp.mean(r), "reward_group_std": jnp.mean(jnp.std(r, axis=1)),
                       "reward_max": jnp.max(r), "advantage_abs": jnp.mean(jnp.abs(adv))}
            return dict(trajectory=traj, log_probs=logp_old, context=ctx, advantages=adv.reshape(-1),
                        steps=steps), metrics

        def make_train_step(optimizer, schedule, microbatches: int):
            if microbatches != 1:
                raise ConfigError("train.microbatch_size must be 0 for grpo (it accumulates over timesteps)")
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

            def update_grads(params, frozen, roll, rows, key):
                """Mean loss, metrics and gradient over the trained steps for the samples ``rows``."""
                traj = roll["trajectory"][:, rows]
                logp_old, ctx, adv = roll["log_probs"][:, rows], roll["context"][rows], roll["advantages"][rows]
                nb = ctx.shape[0]

                def one(i):
                    tr = {"x_t": traj[i], "x_next": traj[i + 1], "t": jnp.broadcast_to(t_arr[i], (nb,)),
                          "dt": jnp.broadcast_to(dt_arr[i], (nb,)), "context": ctx, "log_prob_old": logp_old[i],
                          "advantages": adv}
                    return grad_fn(params, frozen, tr, jax.random.fold_in(key, i))

                shapes = jax.eval_shape(one, roll["steps"][0])
                zeros = jax.tree.map(lambda z: jnp.zeros(z.shape, jnp.float32), shapes)
                total, _ = jax.lax.scan(
                    lambda acc, i: (jax.tree.map(lambda u, w: u + w.astype(jnp.float32), acc, one(i)), None),
                    zeros, roll["steps"])
                (loss, metrics), grads = jax.tree.map(lambda z: z / roll["steps"].shape[0], total)
                grads = jax.tree.map(lambda gr, z: gr.astype(z.dtype), grads, shapes[1])
                return loss, metrics, grads

            def step(state: ts.TrainState, batch: dict, rng):
                key = jax.random.fold_in(rng, state.step)
                k_roll, k_train = jax.random.split(key)
                roll, roll_metrics = rollout(state.params, state.frozen, batch, k_roll)
                perm = jnp.arange(s.train_size).reshape(s.train_size // s.updates, s.updates).T   # rows u, u + U, ...

                def inner(st, u):
                    loss, metrics, grads = update_grads(st.params, state.frozen, roll, perm[u],
                                                        jax.random.fold_in(k_train, u))
                    # the schedule advances once per outer step: every inner update sees the outer step
                    new, opt_metrics = ts.apply_gradients(st.replace(step=state.step), grads, loss, optimizer,
                                                          schedule)
                    return new, {**metrics, **opt_metrics}

                # the frozen weights stay out of the loop's carry (read from the closure)
                new, metrics = jax.lax.scan(inner, state.replace(frozen=None), jnp.arange(s.updates))
                new = new.replace(frozen=state.frozen)
                metrics = {k: (v[-1] if k in ("skipped", "learning_rate") else jnp.mean(v, axis=0))
                           for k, v in metrics.items()}
                samples = (state.step + 1).astype(jnp.float32) * s.rollout_size
                return new, {**metrics, **roll_metrics, "samples_drawn": samples}

            return step

        loss_fn.make_train_step = make_train_step
        rep = parallel.replicated(mesh)
        extra = {"reward": reward_value}
        extra_sh = {"reward": jax.tree.map(lambda _: rep, reward_value)}
        if s.use_kl and not lora:
            # a frozen copy of the starting weights, sharded like the trained ones (abstract stays abstract)
            cp = lambda z: jnp.copy(z) if isinstance(z, jax.Array) else z  # noqa: E731
            extra["reference"], extra_sh["reference"] = jax.tree.map(cp, setup.params), setup.param_shardings
        return loss_fn, extra, extra_sh

    return build


def run(config: ml_collections.ConfigDict, workdir: str, on_eval=None):
    """Train; ``on_eval(step, model)`` every ``train.eval_every`` steps (see ``dit_setup.run_training``)."""
    config = with_batch(config)
    return dit_setup.run_training(config, workdir, make_loss(config), on_eval=on_eval, hooks=hooks())


get_config = config_entry.defaults_entry(default_config)
