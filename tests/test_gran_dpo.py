"""Gran-DPO as flow_dpo's mode (dpo.patch_source; our reconstruction of HALO's): its patch rewards (the Shell-LCC
source is region_distances negated, the learned source the patch model's), lambda 0 gives Flow-DPO's loss, and
training lowers both of its terms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import dit_setup, flow_dpo
from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.models.wan_transformer import get_config as wan_config
from shelllcc.rewards import patch_reward as pr
from shelllcc.rewards.manifold_distance import region_distances
from tests.test_flow_methods import SHAPE, TEXT, _metrics, _train_config, base_model_dir, pair_cache  # noqa: F401

PATCH = (1, 2, 2)            # latent cells: SHAPE (2, 4, 4) gives 8 patches


@pytest.fixture(scope="module")
def patch_model_dir(tmp_path_factory):
    model = pr.PatchRewardModel(WanTransformer(wan_config("tiny"), rngs=nnx.Rngs(5)), 1, patch_tokens=(1, 1, 1),
                                rngs=nnx.Rngs(6))
    return saving.save_model(str(tmp_path_factory.mktemp("patch") / "model"), model)


def _gran(c, source, patch_model_dir=""):
    c.dpo.patch_source, c.dpo.patch, c.dpo.delta, c.dpo.lam = source, PATCH, 0.0, 1.0
    if source == "shell":
        c.dpo.manifold, c.dpo.manifold_kind = "random", "shell_norm"
    elif source == "patch_model":
        c.dpo.patch_model = patch_model_dir
    return c


def _inputs(seed=0, b=3):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, *SHAPE)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, *TEXT)), jnp.float32))


def test_shell_source_is_region_distances_negated(pair_cache, base_model_dir):  # noqa: F811
    c = _gran(_train_config(flow_dpo, pair_cache[0], base_model_dir, 1), "shell")
    fn, params, what = flow_dpo.patch_reward_source(c, 16)
    x, ctx = _inputs()
    masks = jnp.asarray(pr.latent_patch_masks(SHAPE[:3], PATCH))
    got = np.asarray(fn(params, x, ctx, masks))
    want = -np.asarray(region_distances(params, x, "shell_norm", masks, patch_size=(1, 1, 1)))
    assert got.shape == (3, 8) and "shell_norm" in what
    np.testing.assert_array_equal(got, want)
    # a patch of the whole grid is the clip's distance
    np.testing.assert_allclose(np.asarray(fn(params, x, ctx, jnp.ones((1, *SHAPE[:3])))),
                               np.asarray(fn(params, x, ctx, masks)).mean(1, keepdims=True), rtol=1e-5)


def test_patch_model_source_is_the_models_rewards(pair_cache, base_model_dir, patch_model_dir):  # noqa: F811
    c = _gran(_train_config(flow_dpo, pair_cache[0], base_model_dir, 1), "patch_model", patch_model_dir)
    fn, state, _ = flow_dpo.patch_reward_source(c, 16)
    x, ctx = _inputs(1)
    model = pr.load_patch_reward_model(patch_model_dir)
    np.testing.assert_array_equal(np.asarray(fn(state, x, ctx, None)), np.asarray(pr.patch_rewards(model, x, ctx)))
    c.dpo.patch = (1, 4, 4)
    with pytest.raises(ConfigError, match=r"dpo.patch=\(1, 4, 4\) but the patch model at dpo.patch_model scores "
                                          r"patches of \(1, 2, 2\)"):
        flow_dpo.patch_reward_source(c, 16)


def _loss(c, params_shift=0.0):
    """The experiment's loss with the LoRA adapters moved off zero (so policy != reference)."""
    mesh, rules = dit_setup.make_mesh(c.mesh), dit_setup.sharding_rules(c)
    loaded = dit_setup.build_model(c.model, mesh, rules)
    graphdef, trainable, frozen_model = dit_setup.split_trainable(loaded.model, c.lora, c.seed)
    params, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen_model)
    loss_fn, extra, _ = flow_dpo.make_loss(c)(dit_setup.Setup(graphdef, params, frozen, mesh, None))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
    moved = jax.tree.unflatten(tree, [x + params_shift * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])
    batch = jax.tree.map(jnp.asarray, next(dit_setup.host_batches(c.data, 0)))
    return jax.jit(lambda k: loss_fn(moved, {"model": frozen, **extra}, batch, k))


@pytest.mark.parametrize("source", ["shell", "patch_model"])
def test_lambda_zero_is_flow_dpo_and_lambda_adds_the_patch_term(source, pair_cache, base_model_dir,  # noqa: F811
                                                               patch_model_dir):
    def config(**dpo):
        c = _train_config(flow_dpo, pair_cache[0], base_model_dir, 1)
        c.lora.rank, c.lora.alpha, c.dpo.beta = 4, 8.0, 50.0
        if dpo:
            _gran(c, source, patch_model_dir)
            c.dpo.update(dpo)
        return c
    key = jax.random.PRNGKey(3)
    plain, _ = _loss(config(), 0.05)(key)
    zero, m0 = _loss(config(lam=0.0), 0.05)(key)
    full, m1 = _loss(config(lam=2.0), 0.05)(key)
    assert abs(float(plain) - math.log(2)) > 1e-3                # policy != reference: a real test of equality
    # each loss is its own program: float32 reassociation, times beta 50 (5e-6 relative seen)
    np.testing.assert_allclose(float(zero), float(plain), rtol=3e-5)
    np.testing.assert_allclose(float(m1["video_loss"]), float(plain), rtol=3e-5)
    assert float(m1["patch_selected"]) == 1.0                     # delta 0: every patch whose rewards differ
    np.testing.assert_allclose(float(full), float(plain) + 2.0 * float(m1["patch_loss"]), rtol=3e-5)
    assert float(m0["patch_loss"]) == pytest.approx(float(m1["patch_loss"]), rel=3e-5)
    # delta above every reward gap: no patch term
    none, mn = _loss(config(lam=2.0, delta=1e9), 0.05)(key)
    assert float(mn["patch_selected"]) == 0.0 and float(none) == pytest.approx(float(plain), rel=3e-5)


def test_gran_dpo_training_lowers_both_terms(tmp_path, pair_cache, base_model_dir):  # noqa: F811
    c = _gran(_train_config(flow_dpo, pair_cache[0], base_model_dir, 8), "shell")
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.optim.learning_rate, c.dpo.beta = 3e-3, 50.0
    flow_dpo.run(c, str(tmp_path))
    m = _metrics(str(tmp_path))
    # step 1: policy = reference, every term log 2
    np.testing.assert_allclose([m[1]["video_loss"], m[1]["patch_loss"]], [math.log(2)] * 2, atol=1e-6)
    np.testing.assert_allclose(m[1]["loss"], math.log(2) * (1 + (m[1]["patch_selected"] > 0)), atol=1e-6)
    late = [m[s] for s in (6, 7, 8)]
    assert np.mean([r["video_loss"] for r in late]) < math.log(2) - 0.05, [r["video_loss"] for r in m.values()]
    assert np.mean([r["patch_loss"] for r in late]) < math.log(2) - 0.02, [r["patch_loss"] for r in m.values()]


def test_bad_gran_settings_name_the_key(pair_cache, base_model_dir):  # noqa: F811
    c = _train_config(flow_dpo, pair_cache[0], base_model_dir, 1)
    c.dpo.patch_source = "gpt4o"
    with pytest.raises(ConfigError, match="dpo.patch_source='gpt4o'"):
        flow_dpo.check_config(c)
    c.dpo.patch_source = "shell"
    with pytest.raises(ConfigError, match="dpo.patch_source='shell' needs dpo.manifold"):
        flow_dpo.check_config(c)
    c = _gran(_train_config(flow_dpo, pair_cache[0], base_model_dir, 1), "shell")
    c.dpo.lam = -1.0
    with pytest.raises(ConfigError, match="dpo.lam=-1.0"):
        flow_dpo.check_config(c)
    c = _gran(_train_config(flow_dpo, pair_cache[0], base_model_dir, 1), "shell")
    c.dpo.patch = (1, 3, 3)
    with pytest.raises(ConfigError, match=r"dpo.patch: patch \(1, 3, 3\)"):
        _loss(c)(jax.random.PRNGKey(0))
