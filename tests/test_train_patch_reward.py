"""train_patch_reward: the clip caches against their source, the experiment end to end (trained from a saved video
reward model, exported, evaluated) with its report against a count by hand, Spearman against scipy, bad inputs."""

import json

import numpy as np
import pytest
from flax import nnx

from experiments import train_patch_reward as tpr
from experiments.config_checks import check_config as generic_checks
from shelllcc.data import moving_textures as mt
from shelllcc.data import patch_degradations as pd
from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer, get_config
from shelllcc.rewards import patch_reward as pr
from shelllcc.rewards import reward_model as rm
from tests.test_reward_model import encode
from tests.test_train_reward_model import encode_text


def _config(root, steps=300):
    c = tpr.default_config()
    c.mesh.devices = 1
    c.patch_reward.reward_model = str(root / "video")
    c.patch_reward.patch_tokens = (1, 2, 2)                  # the tiny DiT's (1, 2, 2) patch: cells (1, 4, 4)
    c.clips.build = True
    # 3 frames of 32 x 32; the stand-in encoder keeps every frame (4x in space): latents [3, 8, 8], 12 patches
    c.clips.num_frames, c.clips.height, c.clips.width = 3, 32, 32
    c.clips.num_train, c.clips.num_validation, c.clips.num_test = 256, 0, 48
    c.clips.max_patches, c.clips.clean_share = 6, 0.1
    c.clips.kinds = ("noise", "colour_shift")
    c.clips.batch_size, c.clips.shard_size = 16, 64
    c.data.batch_size = 16
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = steps, 20, steps, False
    c.optim.learning_rate = 1e-3
    c.eval.n_boot, c.eval.batch_size = 200, 16
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch")
    gen = WanTransformer(get_config("tiny", text_dim=16, num_layers=2, scan_layers=False), rngs=nnx.Rngs(3))
    saving.save_model(str(root / "video"), rm.LatentRewardModel(gen, 1, rngs=nnx.Rngs(4)))
    c = _config(root)
    _, report = tpr.run(c, str(root / "w"), encoders=(encode, encode_text))
    return root, c, report


def test_clip_cache_holds_the_labelled_clips(trained):
    root, c, _ = trained
    cache = tpr.open_clip_cache(str(root / "w" / "clips" / "test"), "data.test")
    spec, seed = tpr.clip_spec(c.clips, "test")
    src = pd.PatchClips(spec, seed, 48, (3, 8, 8), (1, 4, 4), max_patches=6, clean_share=0.1,
                        kinds=("noise", "colour_shift"))
    got = tpr.read_clips(cache)
    assert got["latents"].shape == (48, 3, 8, 8, 16) and got["patch_labels"].shape == (48, 12)
    for i in (0, 7, 31):
        ex = src[i]
        np.testing.assert_array_equal(got["patch_labels"][i], ex["patch_labels"])
        assert ",".join(got["kinds"][i]) == ex["kinds"]
        np.testing.assert_allclose(got["latents"][i], encode(ex["video"][None])[0], rtol=1e-6, atol=1e-6)
    assert 0.05 < 1 - got["patch_labels"].mean() < 0.4


def test_trained_patch_model_beats_the_majority_and_its_report_is_right(trained):
    root, c, report = trained
    saved = json.load(open(root / "w" / tpr.EVAL_JSON))
    assert saved["patch_accuracy"]["value"] == pytest.approx(report["patch_accuracy"]["value"])
    # by hand from the exported model on the test clips
    model = pr.load_patch_reward_model(str(root / "w"))
    clips = tpr.read_clips(tpr.open_clip_cache(c.data.test or str(root / "w" / "clips" / "test"), "data.test"))
    r = np.asarray(nnx.jit(pr.patch_rewards)(model, clips["latents"], clips["context"]))
    y = clips["patch_labels"]
    acc = np.mean((r > 0) == (y == 1))
    assert saved["patch_accuracy"]["value"] == pytest.approx(acc, abs=1e-6)
    assert saved["patch_accuracy"]["lo"] <= acc <= saved["patch_accuracy"]["hi"]
    assert saved["majority_baseline"] == pytest.approx(max(y.mean(), 1 - y.mean()))
    # learnt: noise and colour casts in 16 x 16 pixel patches, 60 steps of a one-block model
    assert acc > saved["majority_baseline"] + 0.05, saved
    video = rm.load_reward_model(str(root / "video"))
    import jax.numpy as jnp
    rv = np.asarray(nnx.jit(lambda m, z, ctx: jnp.mean(rm.score(m, z, 0.0, ctx), -1))(video, clips["latents"],
                                                                                   clips["context"]))
    cons = saved["consistency"]["spearman_mean_patch_vs_video"]
    assert cons["value"] == pytest.approx(tpr.spearman(r.mean(1), rv), abs=1e-6)
    assert set(saved["degraded_found_by_kind"]) == {"noise", "colour_shift"}
    # the patch model knows where the clip was degraded: its mean reward follows the clean share
    assert saved["consistency"]["spearman_mean_patch_vs_clean_share"]["value"] > 0.3


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.standard_normal(40)
    assert tpr.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(tpr.spearman(np.ones(5), np.arange(5)))


def test_bad_inputs_name_the_key(trained, tmp_path):
    root, _, _ = trained
    generic_checks(tpr.default_config(), "train_patch_reward")
    c = _config(root)
    c.patch_reward.reward_model = ""
    with pytest.raises(ConfigError, match="patch_reward.reward_model is empty"):
        tpr.run(c, str(tmp_path / "a"))
    c = _config(root)
    c.clips.build, c.data.train = False, str(root / "w" / "clips" / "train")
    c.patch_reward.patch_tokens = (1, 4, 4)              # another grid than the cache's labels
    with pytest.raises(ConfigError, match=r"patch_labels \[12\] but patches of \(1, 8, 8\) cells give 3"):
        tpr.run(c, str(tmp_path / "b"))
    c = _config(root)
    c.clips.kinds = ("blur", "smear")
    with pytest.raises(ConfigError, match=r"clips.kinds=\('blur', 'smear'\)"):
        tpr.run(c, str(tmp_path / "c"))
    assert mt.ClipSpec   # the module's clips are Moving Textures'
