"""VideoAlign's Flow-DPO, Flow-RWR, offline pair making (score_samples) and reward guidance in the sampler.

Fast: tiny random DiTs on one device, tiny caches in tmp; losses and guided steps against float64 numpy."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import dit_setup, flow_dpo, flow_rwr, sample, score_samples
from shelllcc.data import latent_cache
from shelllcc.errors import ConfigError, UserError
from shelllcc.flow import objectives, samplers
from shelllcc.flow.timesteps import FlowSchedule, linear_sampling_schedule
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.models.wan_transformer import get_config as wan_config

SHAPE = (2, 4, 4, 16)            # latents of the tiny DiT (in_channels 16, patch (1, 2, 2))
TEXT = (6, 32)                   # its text_dim


def _contexts(rng, n):
    ctx = rng.standard_normal((n, *TEXT)).astype(np.float32)
    ctx[:, 4:] = 0.0             # prompts of 4 tokens, zero-padded as the caches store them
    return ctx


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory):
    """8 pairs: smooth winners (a fixed pattern per pair), noisy losers; returns (dir, winners, losers)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 1, 1, 1, 16)).astype(np.float32)
    win = np.broadcast_to(base, (8, *SHAPE)).copy()
    lose = win + rng.standard_normal((8, *SHAPE)).astype(np.float32)
    out = str(tmp_path_factory.mktemp("pairs") / "dpo")
    score_samples.write_latent_cache(out, win, _contexts(rng, 8), [f"p{i}" for i in range(8)],
                                     {"loser_latents": lose, "reward_w": np.ones(8, np.float32),
                                      "reward_l": np.zeros(8, np.float32)}, "test pairs")
    return out, win, lose


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    model = WanTransformer(wan_config("tiny"), rngs=nnx.Rngs(3))
    return saving.save_model(str(tmp_path_factory.mktemp("base") / "model"), model)


def _train_config(module, cache_dir, base_model_dir, steps):
    c = module.default_config()
    c.data.cache_dir = cache_dir
    c.data.batch_size = 8
    c.mesh.devices = 1
    c.model.init_from = base_model_dir
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 1, 1000
    c.train.async_checkpoints = False
    return c


def _metrics(workdir):
    rows = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


# ------------------------------------------------------------------------------------------ pure losses

def test_flow_rwr_loss_matches_numpy():
    rng = np.random.default_rng(1)
    err, r = rng.uniform(0, 2, 7), rng.standard_normal(7)
    for temp in (0.3, 1.0, 5.0):
        w = np.exp(r / temp - np.max(r / temp))
        want = np.sum(w / w.sum() * err)
        np.testing.assert_allclose(float(objectives.flow_rwr_loss(err, r, temp)), want, rtol=1e-6)
    # equal rewards: the plain mean error (the normalisation keeps the flow-matching scale)
    np.testing.assert_allclose(float(objectives.flow_rwr_loss(err, np.full(7, 3.0), 0.1)), err.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        objectives.flow_rwr_loss(err, r, 0.0)


@pytest.mark.parametrize("time_dependent", [False, True])
def test_flow_dpo_objective_matches_numpy(time_dependent):
    """Linear toy velocities v_m(x) = a_m x + b_m: the objective's loss and accuracy against float64 numpy."""
    rng = np.random.default_rng(2)
    xw, xl, eps = (rng.standard_normal((5, 3, 4)) for _ in range(3))
    s = rng.uniform(0.05, 0.95, 5)
    (a, b), (ar, br) = (1.1, 0.2), (0.9, -0.1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pol = lambda x, t, c: a * x + b  # noqa: E731
    ref = lambda x, t, c: ar * x + br  # noqa: E731
    loss, m = objectives.flow_dpo_objective(pol, ref, f32(xw), f32(xl), f32(eps), f32(np.zeros((5, 1))), None,
                                            beta=50.0, time_dependent=time_dependent, s=f32(s))

    def err(aa, bb, x0):
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps
        return np.mean((aa * xs + bb - (eps - x0)) ** 2, axis=(1, 2))
    z = (err(a, b, xw) - err(ar, br, xw)) - (err(a, b, xl) - err(ar, br, xl))
    beta_t = 50.0 * (1 - s) ** 2 if time_dependent else 50.0
    want = np.mean(np.log1p(np.exp(0.5 * beta_t * z)))            # -log sigmoid(-beta_t z / 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(z < 0), atol=1e-7)
    # policy = reference: z = 0, loss log 2
    loss0, m0 = objectives.flow_dpo_objective(pol, pol, f32(xw), f32(xl), f32(eps), f32(np.zeros((5, 1))), None,
                                              beta=500.0, s=f32(s))
    np.testing.assert_allclose(float(loss0), math.log(2), rtol=1e-6)
    assert float(m0["accuracy"]) == 0.0


# ------------------------------------------------------------------------------------------ data option

def test_extra_fields_missing_field_is_one_line_error(pair_cache):
    d = dit_setup.data_section()
    d.cache_dir, d.batch_size, d.extra_fields = pair_cache[0], 4, ("loser_latents", "reward")
    with pytest.raises(ConfigError) as e:
        dit_setup.host_batches(d, 0)
    assert "data.extra_fields" in str(e.value) and "'reward'" in str(e.value) and "\n" not in str(e.value)
    d.extra_fields = ("context",)
    with pytest.raises(ConfigError, match="data.extra_fields"):
        dit_setup.host_batches(d, 0)


def test_random_source_extra_fields_leave_the_other_entries_and_match_the_abstract_batch():
    # smoke and speed runs of Flow-DPO / Flow-RWR at real size need no files: the random source draws the
    # extra fields after latents and text, so the same seed gives the same latents and text with or without them
    d = dit_setup.data_section()
    d.source, d.batch_size, d.random_latent_shape, d.random_text_shape = "random", 4, SHAPE, TEXT
    plain = next(dit_setup.host_batches(d, 3))
    d.extra_fields = ("loser_latents", "reward")
    batch = next(dit_setup.host_batches(d, 3))
    np.testing.assert_array_equal(batch["latents"], plain["latents"])
    np.testing.assert_array_equal(batch["context"], plain["context"])
    assert batch["loser_latents"].shape == batch["latents"].shape and batch["reward"].shape == (4,)
    assert not np.allclose(batch["loser_latents"], batch["latents"])
    cfg = flow_rwr.default_config()
    cfg.data.source, cfg.data.batch_size, cfg.data.extra_fields = "random", 4, ("loser_latents", "reward")
    ab = dit_setup.abstract_step(cfg, flow_rwr.make_loss(cfg), devices=jax.devices()[:1], latent_shape=SHAPE,
                                 text_shape=TEXT)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in ab.batch.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch.items()}
    d.extra_fields = ("context",)
    with pytest.raises(ConfigError, match="data.extra_fields"):
        dit_setup.host_batches(d, 0)


def test_extra_fields_are_normalised_like_latents(pair_cache):
    cache_dir, win, lose = pair_cache
    d = dit_setup.data_section()
    d.cache_dir, d.batch_size, d.extra_fields = cache_dir, 8, ("loser_latents", "reward_w")
    mean, std = np.linspace(-1, 1, 16), np.linspace(0.5, 2, 16)
    d.latent_mean, d.latent_std = tuple(mean), tuple(std)
    batch = next(dit_setup.host_batches(d, 0))
    order = [int(np.argmin(np.abs((batch["latents"][k] * std + mean) - win).sum(axis=(1, 2, 3, 4))))
             for k in range(8)]
    np.testing.assert_allclose(batch["latents"], (win[order] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch["loser_latents"], (lose[order] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch["reward_w"], np.ones(8, np.float32))
    # data.in_memory: the very same batches (fields, normalisation, order) gathered from memory
    streaming = dit_setup.host_batches(d, 0)
    d.in_memory = True
    in_memory = dit_setup.host_batches(d, 0)
    for _ in range(3):
        want, got = next(streaming), next(in_memory)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    d.in_memory = False
    # the abstract step's batch has the same entries
    cfg = flow_dpo.default_config()
    cfg.data.cache_dir, cfg.data.batch_size, cfg.lora.rank = cache_dir, 8, 2
    cfg.data.extra_fields = ("loser_latents", "reward_w")
    ab = dit_setup.abstract_step(cfg, flow_dpo.make_loss(cfg), devices=jax.devices()[:1], latent_shape=SHAPE,
                                 text_shape=TEXT)
    assert {k: v.shape for k, v in ab.batch.items()} == {k: v.shape for k, v in batch.items()}
    cfg.lora.rank = 0                      # full fine-tuning: the abstract frozen copy of the starting weights
    ab = dit_setup.abstract_step(cfg, flow_dpo.make_loss(cfg), devices=jax.devices()[:1], latent_shape=SHAPE,
                                 text_shape=TEXT)
    assert jax.tree.structure(ab.state.frozen["reference"]) == jax.tree.structure(ab.state.params)


# ------------------------------------------------------------------------------------------ the experiments

def test_flow_dpo_starts_at_log2_and_learns_the_pairs(tmp_path, pair_cache, base_model_dir):
    c = _train_config(flow_dpo, pair_cache[0], base_model_dir, steps=8)
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.optim.learning_rate = 3e-3
    c.dpo.beta = 50.0
    flow_dpo.run(c, str(tmp_path))
    m = _metrics(str(tmp_path))
    # step 1's metrics are of the starting weights: policy = reference (adapters zeroed)
    np.testing.assert_allclose(m[1]["loss"], math.log(2), atol=1e-6)
    assert m[1]["accuracy"] == 0.0
    np.testing.assert_allclose(m[1]["err_theta_w"], m[1]["err_ref_w"], rtol=1e-6)
    late = [m[s] for s in (6, 7, 8)]
    assert np.mean([r["loss"] for r in late]) < math.log(2) - 0.05, [r["loss"] for r in m.values()]
    assert np.mean([r["accuracy"] for r in late]) > 0.7, [r["accuracy"] for r in m.values()]
    # another beta is another objective: resuming this run with it is refused, the setting named with its values
    c.train.steps, c.dpo.beta = 9, 100.0
    with pytest.raises(UserError, match=r"dpo\.beta: checkpoint 50\.0, now 100\.0"):
        flow_dpo.run(c, str(tmp_path))


def _loss_at_start(module, c):
    """``(loss(batch, key), batch, model)``: the experiment's loss at the starting weights, forward only (no
    backward pass to compile), one batch of its data, and the starting model."""
    mesh, rules = dit_setup.make_mesh(c.mesh), dit_setup.sharding_rules(c)
    loaded = dit_setup.build_model(c.model, mesh, rules)
    graphdef, trainable, frozen_model = dit_setup.split_trainable(loaded.model, c.lora, c.seed)
    params, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen_model)
    loss_fn, extra, _ = module.make_loss(c)(dit_setup.Setup(graphdef, params, frozen, mesh, None))
    batch = jax.tree.map(jnp.asarray, next(dit_setup.host_batches(c.data, 0)))
    loss = jax.jit(lambda b, k: loss_fn(params, {"model": frozen, **extra}, b, k))
    return loss, batch, nnx.merge(graphdef, params, frozen)


def test_flow_dpo_full_fine_tuning_reference_is_the_start(pair_cache, base_model_dir):
    c = _train_config(flow_dpo, pair_cache[0], base_model_dir, steps=1)
    c.lora.rank = 0
    loss_fn, batch, _ = _loss_at_start(flow_dpo, c)
    loss, m = loss_fn(batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(loss), math.log(2), atol=1e-6)
    assert float(m["accuracy"]) == 0.0 and float(m["err_theta_l"]) > float(m["err_theta_w"])


def test_flow_rwr_loss_of_the_experiment(tmp_path, base_model_dir):
    """The experiment's loss against float64 numpy of softmax(r / T)-weighted per-clip errors, the errors
    recomputed from the same noise draws (sft's key split and sigma sampler); equal rewards: the plain mean."""
    rng = np.random.default_rng(3)
    lat = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    cache = str(tmp_path / "rwr")
    score_samples.write_latent_cache(cache, lat, _contexts(rng, 8), ["x"] * 8,
                                     {"reward": rng.standard_normal(8).astype(np.float32)}, "test rwr")
    c = _train_config(flow_rwr, cache, base_model_dir, steps=1)
    c.rwr.temperature = 0.5
    loss_fn, batch, model = _loss_at_start(flow_rwr, c)
    key = jax.random.PRNGKey(7)
    loss, m = loss_fn(batch, key)
    k_eps, k_s = jax.random.split(key)
    eps = jax.random.normal(k_eps, batch["latents"].shape, jnp.float32)
    s = flow_rwr.sft.sigma_sampler(c.flow)(k_s, (8,))
    err = np.asarray(objectives.velocity_errors(model, batch["latents"], eps, batch["context"], s), np.float64)
    r = np.asarray(batch["reward"], np.float64) / 0.5
    w = np.exp(r - r.max())
    np.testing.assert_allclose(float(loss), np.sum(w / w.sum() * err), rtol=1e-5)
    np.testing.assert_allclose(float(m["sft"]), err.mean(), rtol=1e-5)
    # in microbatches (rows i, i + 2, ... as the step splits them) with the weights of the whole batch
    # (the step's prepare_batch), the mean of the microbatches' losses is the whole batch's loss
    ws = np.asarray(objectives.flow_rwr_weights(batch["reward"], 0.5))
    np.testing.assert_allclose(ws, 8 * w / w.sum(), rtol=1e-5)
    halves = [objectives.flow_rwr_objective(model, batch["latents"][j::2], eps[j::2], batch["context"][j::2],
                                            batch["reward"][j::2], None, temperature=0.5, s=s[j::2],
                                            weights=ws[j::2])[0] for j in (0, 1)]
    np.testing.assert_allclose(np.mean(halves), np.sum(w / w.sum() * err), rtol=1e-5)
    loss, m = loss_fn({**batch, "reward": jnp.full((8,), 0.3)}, key)
    np.testing.assert_allclose(float(loss), err.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["ess"]), 1.0, rtol=1e-6)
    c.rwr.temperature = -1.0
    with pytest.raises(ConfigError, match="rwr.temperature"):
        flow_rwr.check_config(c)


def test_score_samples_pairs_best_against_worst(tmp_path, pair_cache, base_model_dir):
    c = score_samples.default_config()
    c.model.init_from = base_model_dir
    c.mesh.devices = 1
    c.prompts.cache_dir, c.prompts.count = pair_cache[0], 4
    c.sampler.solver, c.sampler.steps, c.sampler.batch_size = "euler", 2, 6
    c.score.reward, c.score.reward_model, c.score.clips_per_prompt = "reward_model", "random", 3
    c.score.tie_margin = 1e-9
    out = score_samples.run(c, str(tmp_path))
    r = out["rewards"].reshape(4, 3)
    dpo = latent_cache.open_cache(str(tmp_path / score_samples.DPO_DIR))
    rwr = latent_cache.open_cache(str(tmp_path / score_samples.RWR_DIR))
    assert len(dpo) + len(out["ties"]) == 4 and len(rwr) == 12
    for ex in dpo:
        i = int(ex["prompt"])
        assert ex["reward_w"] >= ex["reward_l"] + 1e-9
        np.testing.assert_allclose([ex["reward_w"], ex["reward_l"]], [r[i].max(), r[i].min()], rtol=1e-6)
        np.testing.assert_array_equal(ex["latents"], out["latents"][int(ex["clip_w"])])
        np.testing.assert_array_equal(ex["loser_latents"], out["latents"][int(ex["clip_l"])])
    # the stored rewards against an independent call of the same stand-in reward model: mean of VQ, MQ, TA at t=0
    from shelllcc.rewards.reward_model import LatentRewardModel
    generator = saving.load_model(base_model_dir)
    rm = LatentRewardModel(generator, num_blocks=1, rngs=nnx.Rngs(c.seed))
    rows = [rwr[k] for k in range(12)]
    lat = np.stack([e["latents"] for e in rows])
    ctx = np.stack([e["text_embeddings"] for e in rows])
    want = np.asarray(rm(jnp.asarray(lat), jnp.zeros(12), jnp.asarray(ctx))).mean(axis=1)
    np.testing.assert_allclose([e["reward"] for e in rows], want, rtol=1e-4, atol=1e-5)
    assert len({int(e["clip"]) for e in rows}) == 12


# ------------------------------------------------------------------------------------------ guidance

def _toy_velocity(x, t, c):
    return 0.8 * x + 0.1 * jnp.tanh(x) + 0.05


def _quadratic_reward(center):
    return lambda x, t, c: -jnp.sum(jnp.square(x - center), axis=tuple(range(1, x.ndim)))


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_zero_weight_guidance_gives_the_unguided_samples(solver):
    noise = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5))
    sched = linear_sampling_schedule(6, s_max=0.999)
    hook = samplers.reward_guidance(_quadratic_reward(0.5), 0.0, "noisy", t_max=1.0)
    plain = samplers.sample(_toy_velocity, noise, None, sched, solver=solver)
    guided = samplers.sample(_toy_velocity, noise, None, sched, solver=solver, velocity_guidance=hook)
    # float32: equal up to rounding; XLA may fuse the guided program's multiply-adds differently (one ulp seen on CI)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(guided), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("at", ["noisy", "x0"])
def test_guided_euler_step_matches_numpy(at):
    x = np.random.default_rng(4).standard_normal((2, 3, 4))
    center, w, s0, s1 = 0.3, 0.7, 0.6, 0.45
    sched = FlowSchedule.from_sigmas([s0, s1])
    hook = samplers.reward_guidance(_quadratic_reward(center), w, at, t_max=1.0)
    got = jax.jit(lambda x: samplers.euler_sample(_toy_velocity, x, None, sched, velocity_guidance=hook))(
        jnp.asarray(x, jnp.float32))
    v = 0.8 * x + 0.1 * np.tanh(x) + 0.05
    z = x if at == "noisy" else x - s0 * v
    grad = -2.0 * (z - center)                                      # grad of -||z - c||^2
    v_tilde = v - w * s0 / (1 - s0) * grad
    np.testing.assert_allclose(np.asarray(got), x + (s1 - s0) * v_tilde, rtol=1e-5, atol=1e-6)
    # above t_max no guidance: the plain Euler step
    off = samplers.reward_guidance(_quadratic_reward(center), w, at, t_max=0.5)
    got = samplers.euler_sample(_toy_velocity, jnp.asarray(x, jnp.float32), None, sched, velocity_guidance=off)
    np.testing.assert_allclose(np.asarray(got), x + (s1 - s0) * v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_guidance_raises_the_reward(solver):
    noise = jax.random.normal(jax.random.PRNGKey(1), (16, 2, 5))
    sched = linear_sampling_schedule(8, s_max=0.999)
    reward = _quadratic_reward(1.5)
    plain = samplers.sample(_toy_velocity, noise, None, sched, solver=solver)
    for at in ("noisy", "x0"):
        hook = samplers.reward_guidance(reward, 0.05, at, t_max=0.95)      # the pole at s = 0.999 skipped
        guided = samplers.sample(_toy_velocity, noise, None, sched, solver=solver, velocity_guidance=hook)
        assert float(jnp.mean(reward(guided, None, None))) > float(jnp.mean(reward(plain, None, None))) + 0.5


@pytest.mark.parametrize("kind", ["shell_lcc", "reward_model", "energy_judge"])
def test_sample_guidance_on_the_tiny_dit(kind):
    """The sample experiment's guided LatentSampler raises its reward on average; weight 0 changes nothing."""
    model = WanTransformer(wan_config("tiny"), rngs=nnx.Rngs(5))
    mesh = dit_setup.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, devices=1, slices=1)))
    g = sample.default_config().sampler.guidance
    g.kind, g.reward_model, g.manifold, g.energy_judge, g.weight = kind, "random", "random", "random", 0.0
    ctx = _contexts(np.random.default_rng(6), 4)

    guide = sample.build_guidance(g, model)

    def run(weight):
        # one guidance spec for every weight: the weight is an argument of the compiled sampler
        w = None if weight is None else dataclasses.replace(guide, weight=weight)
        s = sample.LatentSampler(model, mesh, latent_shape=SHAPE, solver="euler", steps=4, batch_size=4,
                                 reward_guidance=w)
        return s.sample([0, 1, 2, 3], ctx)

    score = jax.jit(lambda x: sample.reward_sources.combine(
        guide.spec.apply(guide.params, x, jnp.zeros(4), jnp.asarray(ctx)), (1.0, 1.0, 1.0)))
    plain = run(None)
    np.testing.assert_array_equal(np.asarray(run(0.0)), np.asarray(plain))
    weight = 0.02 if kind == "shell_lcc" else 2.0
    gain = float(jnp.mean(score(run(weight))) - jnp.mean(score(plain)))
    assert gain > 0, gain


def test_videoalign_configs_pass_their_checks():
    from configs import videoalign
    from experiments import main as main_lib
    from experiments.config_checks import check_config
    for arg in videoalign.ARGS:
        c = videoalign.get_config(arg)
        assert c.experiment in main_lib.EXPERIMENTS
        check_config(c)
        module = {"flow_dpo": flow_dpo, "flow_rwr": flow_rwr, "score_samples": score_samples}.get(c.experiment)
        if module is not None:
            module.check_config(c)
    assert videoalign.get_config("flow_dpo_t").dpo.time_dependent and not videoalign.get_config("flow_dpo").dpo.time_dependent
    assert videoalign.get_config("flow_dpo").dpo.beta == 500.0 and videoalign.get_config("flow_dpo").lora.rank > 0


def test_make_pairs_skips_ties_within_the_margin():
    r = np.array([[0.1, 0.5, 0.3], [0.2, 0.2, 0.2], [1.0, 0.95, 0.99], [-1.0, 2.0, 0.0]])
    pairs, ties = score_samples.make_pairs(r, margin=0.1)
    assert pairs == [(0, 1, 0), (3, 1, 0)]
    assert [t["prompt"] for t in ties] == [1, 2]
    ctx = np.zeros((2, 5, 3), np.float32)
    ctx[0, :2], ctx[1, 3] = 1.0, 1.0                 # a zero token inside the prompt counts towards its length
    np.testing.assert_array_equal(score_samples.text_lengths(ctx), [2, 4])


def test_prepare_batch_runs_on_the_whole_batch_before_the_microbatch_split():
    """make_train_step's prepare_batch: batch-normalised weights give the same loss and update with 1 or 4
    microbatches (a per-microbatch softmax would not)."""
    import optax

    from shelllcc.training import train_state as ts
    from shelllcc.training.step import make_train_step

    rng = np.random.default_rng(0)
    x, r = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32)

    def loss_fn(params, frozen, batch, key):
        err = jnp.sum(jnp.square(batch["x"] @ params["w"] - 1.0), axis=-1)
        loss = jnp.mean(batch["weight"] * err)
        return loss, {"loss": loss}

    def prepare(batch, frozen):
        return {**batch, "weight": objectives.flow_rwr_weights(batch["r"], 0.5)}

    opt = optax.sgd(0.1)
    params = {"w": jnp.ones((3, 2), jnp.float32)}
    out = {k: jax.jit(make_train_step(loss_fn, opt, lambda s: 0.1, k, prepare))(
        ts.create(params, opt), {"x": x, "r": r}, jax.random.PRNGKey(0)) for k in (1, 4)}
    np.testing.assert_allclose(out[4][1]["loss"], out[1][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[4][0].params["w"], out[1][0].params["w"], rtol=1e-6)
    p = np.exp(np.asarray(r, np.float64) / 0.5)
    err = np.sum((np.asarray(x, np.float64) @ np.ones((3, 2)) - 1.0) ** 2, axis=-1)
    np.testing.assert_allclose(out[4][1]["loss"], np.sum(p / p.sum() * err), rtol=1e-5)
