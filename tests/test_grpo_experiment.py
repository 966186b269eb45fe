"""experiments/grpo.py on a tiny DiT with random prompts: the reward rises, the first update is on-policy
(ratio 1, KL 0), resume is exact, DanceGRPO runs without KL and with best-of-n, the project's rewards plug
in, and bad settings are one-line errors naming the key."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import grpo, reward_sources
from shelllcc.errors import ConfigError
from shelllcc.models import saving

# a reward whose optimum is known (ours, for the test): the mean of the final latent, raised by shifting
# the DiT's output; a source of the registry like the project's, plugged in as a future one would be
MEAN_LATENT = "test_mean_latent"


@pytest.fixture(autouse=True)
def mean_latent_source(monkeypatch):
    monkeypatch.setitem(grpo.REWARD_SOURCES, MEAN_LATENT, lambda config, setup: reward_sources.RewardSource(
        lambda p, x, t, c: p * jnp.mean(x, axis=(1, 2, 3, 4)), jnp.ones((), jnp.float32), "mean latent", False))


def tiny(steps: int, **grpo_settings):
    c = grpo.default_config()
    c.data.source = "random"
    c.data.random_latent_shape, c.data.random_text_shape = (1, 8, 8, 16), (4, 32)
    c.mesh.devices = 4                    # the rollout of 8 samples split over 4 devices
    c.grpo.group_size, c.grpo.prompts_per_step, c.grpo.sampling_steps = 4, 2, 4
    for k, v in grpo_settings.items():
        c.grpo[k] = v
    c.reward.source = MEAN_LATENT
    c.train.steps, c.train.checkpoint_every, c.train.async_checkpoints = steps, 100, False
    c.optim.learning_rate = 3e-3
    return c


def metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]


def test_reward_rises_from_an_on_policy_first_step(tmp_path):
    """Full fine-tuning, KL to a frozen copy: step 1's ratio is 1 and its KL 0; the mean reward rises."""
    c = tiny(8)
    c.lora.rank = 0
    grpo.run(c, str(tmp_path))
    m = metrics(str(tmp_path))
    first = m[0]
    assert first["kl"] == 0.0 and first["kl_term"] == 0.0
    assert abs(first["ratio_mean"] - 1.0) < 1e-6 and first["clip_fraction"] == 0.0 and first["approx_kl"] < 1e-10
    assert [r["samples_drawn"] for r in m] == [8.0 * (i + 1) for i in range(8)]
    assert m[-1]["kl"] > 0                      # the policy left the reference
    early = np.mean([r["reward_mean"] for r in m[:2]])
    late = np.mean([r["reward_mean"] for r in m[-2:]])
    assert late > early + 0.1, (early, late)


def test_resume_is_exact(tmp_path):
    """Two steps, then two more from the checkpoint = four steps at once (LoRA; reference: zeroed adapters)."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    os.makedirs(straight), os.makedirs(split)
    grpo.run(tiny(4), straight)
    grpo.run(tiny(2), split)
    first = metrics(split)
    assert first[0]["kl"] == 0.0 and abs(first[0]["ratio_mean"] - 1.0) < 1e-6
    grpo.run(tiny(4), split)
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "loss", "kl", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-12), (ra["step"], k)
    pa = saving.load_model(os.path.join(straight, "model"))
    pb = saving.load_model(os.path.join(split, "model"))
    for x, y in zip(jax.tree.leaves(nnx.state(pa)), jax.tree.leaves(nnx.state(pb))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_dance_grpo_best_of_n_without_kl_and_a_project_reward(tmp_path):
    """DanceGRPO: no KL (reported 0), best 2 of each group of 4, half the steps, two updates per rollout
    (the second off-policy: its ratio moves); the reward is the random stand-in reward model."""
    c = tiny(2, mode="dance_grpo", kl_weight=0.0, best_of_n=2, timestep_fraction=0.5, updates_per_rollout=2)
    c.reward.source, c.reward.reward_model = "reward_model", "random"
    s = grpo.settings(c)
    assert (s.kind, s.keep, s.trained_steps, s.train_size, s.use_kl) == ("dance_grpo", 2, 2, 4, False)
    grpo.run(c, str(tmp_path))
    m = metrics(str(tmp_path))
    assert all(r["kl"] == 0.0 and r["kl_term"] == 0.0 for r in m)
    assert all(np.isfinite(r["loss"]) for r in m) and m[-1]["samples_drawn"] == 16.0
    # the second update of a rollout sees parameters the first changed
    assert m[-1]["approx_kl"] > 1e-12


def test_shell_lcc_source_builds():
    """The project's Shell-LCC distance behind the registry (no run: its apply on latents)."""
    c = tiny(1)
    c.reward.source, c.reward.manifold = "shell_lcc", "random"
    src = grpo.REWARD_SOURCES["shell_lcc"](c, None)
    x = jnp.ones((3, 1, 8, 8, 16))
    assert src.apply(src.params, x, jnp.zeros(3), None).shape == (3,)


@pytest.mark.parametrize("key,value,match", [
    ("grpo.mode", "ppo", "grpo.mode"),
    ("grpo.group_size", 1, "grpo.group_size"),
    ("grpo.sampling_steps", 1, "grpo.sampling_steps"),
    ("grpo.timestep_fraction", 1.5, "grpo.timestep_fraction"),
    ("grpo.best_of_n", 3, "grpo.best_of_n"),            # flow_grpo has no best-of-n
    ("grpo.clip_eps", 0.0, "grpo.clip_eps"),
    ("grpo.kl_weight", -1.0, "grpo.kl_weight"),
    ("grpo.updates_per_rollout", 3, "grpo.updates_per_rollout"),
    ("reward.source", "clip_score", "reward.source"),
    ("train.microbatch_size", 1, "train.microbatch_size"),
])
def test_bad_settings_name_the_key(key, value, match):
    c = tiny(1)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match) as e:
        grpo.check_config(c)
    assert "\n" not in str(e.value)


def test_dance_refuses_a_kl_and_best_of_n_bounds():
    c = tiny(1, mode="dance_grpo")          # kl_weight keeps Flow-GRPO's 0.04
    with pytest.raises(ConfigError, match="grpo.kl_weight.*no KL"):
        grpo.check_config(c)
    c.grpo.kl_weight, c.grpo.best_of_n = 0.0, 5
    with pytest.raises(ConfigError, match=r"grpo.best_of_n=5 must lie in \[2, grpo.group_size=4\]"):
        grpo.check_config(c)
    c.reward.source, c.reward.manifold = "shell_lcc", ""
    c.grpo.best_of_n = 0
    with pytest.raises(ConfigError, match="reward.manifold"):
        grpo.REWARD_SOURCES["shell_lcc"](c, None)
    c.reward.source = "pisces"          # PISCES's rewards plug in like the others; their paths are named
    grpo.check_config(c)
    with pytest.raises(ConfigError, match="reward.pisces.embeddings"):
        grpo.REWARD_SOURCES["pisces"](c, None)


def test_rollout_levels_and_the_derived_batch():
    ts = grpo.rollout_levels(10, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0) and len(ts) == 11
    c = grpo.with_batch(tiny(1))
    assert c.data.batch_size == 8
    s = grpo.settings(tiny(1, mode="dance_grpo", kl_weight=0.0))
    assert s.fraction == 0.6 and s.trained_steps == 2          # floor(0.6 x 4)
