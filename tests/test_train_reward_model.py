"""train_reward_model: pair caches against the TFDS records, the experiment end to end with exact resume and an
exported model read back, the evaluation against a count by hand, and bad inputs as one-line errors."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from experiments import train_reward_model as trm
from shelllcc.data import preference_cache as pc
from shelllcc.data import preferences as pf
from shelllcc.errors import ConfigError, InputFileError
from shelllcc.evaluation import preference_eval as pe
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer, get_config
from shelllcc.rewards import reward_model as rm
from tests.helpers import write_tiny_latent_cache
from tests.test_reward_model import context_of, encode

TEXT_LEN = 12


def encode_text(captions):
    """The test's text encoder: fixed word vectors, zero past the caption's length (what trim_text checks)."""
    captions = list(captions)
    return context_of(captions, TEXT_LEN), np.array([min(len(c.split()), TEXT_LEN) for c in captions], np.int32)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    builder = pf.build(str(root / "prefs"), pf.PreferenceConfig(num_frames=5, height=32, width=32, num_prompts=12,
                                                                pairs_per_prompt=3), verbose=False)
    dirs = {}
    for split in builder.info.splits:
        dirs[split] = str(root / "pairs" / split)
        s = pc.encode_pairs(builder.as_data_source(split), dirs[split], encode_video=encode, encode_text=encode_text,
                            batch_size=4, shard_size=8, progress=False)
        assert s["report"]["bad"] == 0
    # a saved tiny DiT as the backbone (loading it is quicker than a random init's compile)
    gen = WanTransformer(get_config("tiny", text_dim=16, num_layers=2), rngs=nnx.Rngs(3))
    dirs["backbone"] = saving.save_model(str(root / "backbone"), gen)
    return builder, dirs, root


def test_pair_cache_holds_the_tfds_pairs(prefs):
    builder, dirs, _ = prefs
    for split in builder.info.splits:
        d = dirs[split]
        src = builder.as_data_source(split)
        got = pc.read_all(pc.open_pair_cache(d))
        assert len(got["labels"]) == len(src)
        for i in range(len(src)):
            ex = src[i]
            assert got["index"][i] == ex["index"]
            np.testing.assert_array_equal(got["labels"][i], pf.labels_of(ex))
            np.testing.assert_allclose(got["z_a"][i], encode(ex["video_a"][None])[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got["z_b"][i], encode(ex["video_b"][None])[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got["context"][i], encode_text([ex["caption"].decode()])[0][0], atol=1e-7)


def test_bad_pairs_are_counted_not_dropped_silently(prefs, tmp_path):
    builder, _, _ = prefs
    src = [dict(builder.as_data_source("train")[i]) for i in range(4)]
    src[1] = {**src[1], "VQ": 7}                                          # label 6: not in {+1, -1, 0}
    src[2] = {**src[2], "video_b": src[2]["video_b"][:, :16]}            # another clip shape
    s = pc.encode_pairs(src, str(tmp_path / "c"), encode_video=encode, encode_text=encode_text, batch_size=2,
                        shard_size=4, progress=False)
    assert (s["num_examples"], s["report"]["bad"]) == (2, 2)
    report = json.load(open(tmp_path / "c" / pc.REPORT_JSON))
    assert [b["index"] for b in report["bad_examples"]] == [1, 2]
    assert "labels" in report["bad_examples"][0]["reason"] and "video_b" in report["bad_examples"][1]["reason"]
    np.testing.assert_array_equal(pc.read_all(pc.open_pair_cache(str(tmp_path / "c")))["index"],
                                  [src[0]["index"], src[3]["index"]])


def _config(dirs, steps, test=True):
    c = trm.default_config()
    c.model.init_from = dirs["backbone"]
    c.mesh.devices = 1                       # one device: the step compiles faster (sharding has its own tests)
    c.reward_model.num_blocks = 1
    c.data.train, c.data.validation = dirs["train"], dirs.get("validation", "")
    c.data.test = dirs["test"] if test else ""
    c.data.batch_size = 4
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = steps, 1, 2, False
    c.optim.learning_rate = 1e-3
    c.eval.n_boot, c.eval.timesteps = 100, (0.5,)
    return c


def test_runs_resumes_exactly_exports_and_evaluates(prefs, tmp_path):
    _, dirs, _ = prefs
    straight, report = trm.run(_config(dirs, 4), str(tmp_path / "a"))
    # a run stopped after step 2: the straight run's checkpoints without step 4 (one run less to pay for)
    for part in ("orbax", "data_state"):
        shutil.copytree(tmp_path / "a" / "checkpoints" / part, tmp_path / "b" / "checkpoints" / part,
                        ignore=lambda d, names: ["4"] if os.path.basename(d) == part else [])
    resumed, _ = trm.run(_config(dirs, 4, test=False), str(tmp_path / "b"))
    want, got = straight.params, resumed.params                         # pure dicts
    for (path, a), b in zip(_flat(want), [x for _, x in _flat(got)]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=path)

    # the exported model holds the trained weights and scores pairs as they were evaluated
    model = rm.load_reward_model(str(tmp_path / "a"))
    exported = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (path, a), b in zip(_flat(want), [x for _, x in _flat(exported)]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0, err_msg=path)
    test = pc.read_all(pc.open_pair_cache(dirs["test"]))
    score = nnx.jit(rm.score)
    d = np.asarray(score(model, test["z_a"], 0.0, test["context"]) - score(model, test["z_b"], 0.0, test["context"]))
    h = test["labels"]
    by_hand = [np.sum((h[:, k] * d[:, k] > 0) & (h[:, k] != 0)) / np.sum(h[:, k] != 0) for k in range(3)]
    saved = json.load(open(tmp_path / "a" / trm.EVAL_JSON))["by_t"]["0"]
    for k, name in enumerate(pe.DIMENSIONS):
        assert saved["acc_without_ties"][name]["value"] == pytest.approx(by_hand[k], abs=1e-9)
        assert saved["acc_without_ties"][name]["lo"] <= by_hand[k] <= saved["acc_without_ties"][name]["hi"]
    assert set(saved) >= {"acc_with_ties", "acc_at_val_eps", "tie_separation"}
    assert set(report["by_t"]) == {"0", "0.5"} and os.path.getsize(tmp_path / "a" / trm.EVAL_PNG) > 1000


def _flat(tree):
    import jax
    return sorted(((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]),
                  key=lambda kv: kv[0])


def test_saved_reward_model_scores_identically(tmp_path):
    gen = WanTransformer(get_config("tiny", text_dim=16, num_layers=2), rngs=nnx.Rngs(0))
    model = rm.LatentRewardModel(gen, 2, pooled=True, rngs=nnx.Rngs(1))
    saving.save_model(str(tmp_path / "m"), model)
    back = rm.load_reward_model(str(tmp_path / "m"))
    assert (back.config.num_blocks, back.config.pooled, back.config.num_layers) == (2, True, 2)
    z = np.random.default_rng(0).normal(size=(3, 2, 4, 4, 16)).astype(np.float32)
    c = np.random.default_rng(1).normal(size=(3, 5, 16)).astype(np.float32)
    score = nnx.jit(rm.score)
    np.testing.assert_array_equal(np.asarray(score(model, z, 300.0, c)), np.asarray(score(back, z, 300.0, c)))


def test_bad_inputs_name_the_key(prefs, tmp_path):
    _, dirs, _ = prefs
    c = _config(dirs, 2)
    c.data.train = write_tiny_latent_cache(str(tmp_path / "plain"), n=4, size=16)     # latents, no z_a / z_b
    with pytest.raises(InputFileError, match=r"data.train .*no field\(s\) \['z_a', 'z_b'"):
        trm.run(c, str(tmp_path / "w1"))
    c = _config(dirs, 2)
    c.reward_model.num_blocks = 3
    with pytest.raises(ConfigError, match="reward_model.num_blocks=3 exceeds the backbone's 2 layers"):
        trm.run(c, str(tmp_path / "w2"))
    c = _config(dirs, 2)
    c.reward_model.loss = "hinge"
    with pytest.raises(ConfigError, match="reward_model.loss='hinge'"):
        trm.run(c, str(tmp_path / "w3"))
    with pytest.raises(InputFileError, match="data.test: no latent cache"):
        pc.open_pair_cache(str(tmp_path / "nothing"), "data.test")
