"""train_energy_judge: trained on a tiny cache the exported judge ranks held-out real clips below their perturbed
twins; both stages resume exactly; the judges' accuracies against a count by hand; bad configs as one-line errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import train_energy_judge as tej
from shelllcc.data import latent_cache
from shelllcc.errors import ConfigError
from shelllcc.evaluation import judges
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer, get_config
from shelllcc.rewards import energy_judge as ej
from tests.test_energy_judge import _real_clips
from tests.test_train_reward_model import prefs  # noqa: F401  (the pair caches and a saved 2-layer DiT)


def write_latents(out_dir: str, latents: np.ndarray) -> str:
    """A latent cache holding ``latents`` as they are: each record's "video" carries its index, the test's
    encoder looks the latents up by it."""
    n = len(latents)
    source = [{"video": np.array([[[[i // 256, i % 256, 0]]]], np.uint8), "caption": f"clip {i}",
               "index": np.int64(i)} for i in range(n)]

    def encode_video(video):
        idx = video[:, 0, 0, 0, 0].astype(np.int64) * 256 + video[:, 0, 0, 0, 1]
        return latents[idx]

    def encode_text(captions):
        return np.zeros((len(captions), 2, 16), np.float32), np.ones((len(captions),), np.int32)

    encode_video.description, encode_text.description = "the test's latents", "zeros"
    latent_cache.encode_to_cache(source, out_dir, encode_video=encode_video, encode_text=encode_text, batch_size=8,
                                 shard_size=64, progress=False)
    return out_dir


def _static_clips(seed, n):
    """Stand-ins for a generator's clips: real-looking frames that do not move (what a weak generator gets wrong)."""
    still = _real_clips(seed, n)[:, 1:2]
    noise = 0.05 * np.random.default_rng(seed + 100).standard_normal((n, 4, 4, 4, 16))
    return (np.repeat(still, 4, axis=1) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, prefs):  # noqa: F811
    root = tmp_path_factory.mktemp("ej")
    _, dirs, _ = prefs
    gen = WanTransformer(get_config("tiny", text_dim=16, num_layers=3), rngs=nnx.Rngs(3))
    return {"backbone": saving.save_model(str(root / "backbone"), gen),
            "real": write_latents(str(root / "real"), _real_clips(1, 256)),
            "held_out": write_latents(str(root / "held_out"), _real_clips(2, 64)),
            "generated": write_latents(str(root / "generated"), _static_clips(3, 64)),
            "pairs": dirs}


def _config(c_, energy_steps=300, pref_steps=100):
    c = tej.default_config()
    c.model.init_from = c_["backbone"]
    c.mesh.devices = 1
    c.data.cache_dir, c.data.generated_dir = c_["real"], c_["generated"]
    c.energy.perturbations, c.energy.strength = ("noisy_segment",), 0.5
    c.preference.train, c.preference.test = c_["pairs"]["train"], c_["pairs"]["test"]
    c.preference.steps, c.preference.batch_size = pref_steps, 4
    c.eval.cache_dir = c_["held_out"]
    # checkpoints every 50 steps in both stages (c.train is shared): a few saves, each resumed from below
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = energy_steps, 10, 50, False
    c.optim.learning_rate = 1e-2
    return c


def _flat(tree):
    return sorted(((jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]),
                  key=lambda kv: kv[0])


def _params(workdir):
    return _flat(nnx.to_pure_dict(nnx.state(ej.load_energy_judge(str(workdir)), nnx.Param)))


def _copy_checkpoints(src, dst, stage, drop: str):
    for part in ("orbax", "data_state"):
        shutil.copytree(src / stage / "checkpoints" / part, dst / stage / "checkpoints" / part,
                        ignore=lambda d, names: [drop] if os.path.basename(d) == part else [])


def test_trains_ranks_held_out_real_below_perturbed_and_resumes_exactly(caches, tmp_path):
    _, report = tej.run(_config(caches), str(tmp_path / "a"))
    a = tmp_path / "a"
    # the property: held-out real clips (not trained on) below their noised twins
    held = report["held_out"]
    assert held["clips"] == 64
    assert held["by_perturbation"]["noisy_segment"]["real_below"] > 0.9, held
    assert held["energy_real"] < held["by_perturbation"]["noisy_segment"]["energy"]
    # the exported judge is the preference stage's; its energy is the energy stage's exactly (frozen there)
    final, energy_only = ej.load_energy_judge(str(a)), ej.load_energy_judge(str(a / "energy"))
    assert final.config.preference_head and final.config.num_blocks == 1 and final.config.num_layers == 3
    z = _real_clips(4, 4)
    e = nnx.jit(lambda m, x: ej.clip_energy(m, x))
    np.testing.assert_array_equal(np.asarray(e(final, z)), np.asarray(e(energy_only, z)))
    assert not np.allclose(np.asarray(nnx.state(final, nnx.Param)["preference_out"]["kernel"][...]),
                           np.asarray(nnx.state(energy_only, nnx.Param)["preference_out"]["kernel"][...]))
    # generated negatives were drawn at about the source's rate
    rows = [json.loads(line) for line in open(a / "energy" / "metrics.jsonl")]
    shares = [r["generated_share"] for r in rows if "generated_share" in r]
    assert shares and 0.1 < np.mean(shares) < 0.5, shares
    # the judges table on the test pairs: -E and the preference head, by dimension
    table = json.load(open(a / tej.EVAL_JSON))["judges"]
    assert set(table["judges"]) == {"energy_judge", "energy_judge_head"}
    for j in table["judges"].values():
        assert all(0.0 <= j[d]["acc_with_ties"] <= 1.0 for d in (*judges.DIMENSIONS, "overall"))

    # exact resume: the energy stage stopped after step 250 (and no preference stage yet) ...
    _copy_checkpoints(a, tmp_path / "b", "energy", "300")
    tej.run(_config(caches), str(tmp_path / "b"))
    # ... and the preference stage stopped after step 50, the energy stage finished
    shutil.copytree(a / "energy", tmp_path / "c" / "energy")
    _copy_checkpoints(a, tmp_path / "c", "preference", "100")
    tej.run(_config(caches), str(tmp_path / "c"))
    want = _params(a)
    for other in ("b", "c"):
        got = _params(tmp_path / other)
        assert [p for p, _ in got] == [p for p, _ in want]
        for (path, x), (_, y) in zip(want, got):
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=f"{other}: {path}")


def _by_hand(h, m):
    """VideoAlign's acc(eps) by counting, every candidate eps tried (eps = -1 for without ties)."""
    def acc(eps):
        c = d = th = tm = thm = 0
        for hi, mi in zip(h, m):
            model_tie = abs(mi) <= eps
            if hi == 0 and model_tie:
                thm += 1
            elif hi == 0:
                th += 1
            elif model_tie:
                tm += 1
            elif hi * mi > 0:
                c += 1
            else:
                d += 1
        return (c + thm) / (c + d + th + tm + thm), c / max(c + d + tm, 1)
    return max(acc(abs(x))[0] for x in m), acc(-1.0)[1]


def test_judge_accuracies_against_a_count_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(40, 3), p=[0.35, 0.3, 0.35])
    per_dim = np.round(rng.normal(size=(40, 3)) + 0.8 * labels, 1)      # rounded: equal |m| and m = 0 occur
    one = per_dim[:, 0]
    for diffs in (per_dim, one):
        got = judges.judge_accuracies(labels, diffs)
        full = diffs if diffs.ndim == 2 else np.repeat(diffs[:, None], 3, axis=1)
        for k, d in enumerate(judges.DIMENSIONS):
            with_ties, without = _by_hand(labels[:, k], full[:, k])
            assert got[d]["acc_with_ties"] == pytest.approx(with_ties, abs=1e-12)
            assert got[d]["acc_without_ties"] == pytest.approx(without, abs=1e-12)
            for m in judges.METRICS:        # a 95% interval around the value, narrower than [0, 1] at 40 pairs
                lo, hi = got[d]["interval"][m]
                assert lo <= got[d][m] <= hi and 0 < hi - lo < 0.6
        assert got["overall"]["acc_with_ties"] == pytest.approx(np.mean([got[d]["acc_with_ties"]
                                                                         for d in judges.DIMENSIONS]))
    # a distance as a zero-annotation judge: the nearer clip (smaller d) wins, so diffs = -(d_A - d_B)
    d_a, d_b = rng.random(40), rng.random(40)
    score = lambda p, z: -z[:, 0]          # noqa: E731
    diffs = judges.source_differences(score, None, d_a[:, None], d_b[:, None], batch_size=7)
    np.testing.assert_allclose(diffs, -(d_a - d_b), atol=1e-6)      # float32 inside the jitted score
    table = judges.judges_table({"lcc": {"diffs": diffs, "description": "nearer wins"}}, labels)
    md_path = judges.write_table(str(tmp_path), table)[1]
    assert "| lcc |" in open(md_path).read()
    with pytest.raises(ValueError, match=r"diffs must be \[N\] or \[N, 3\]"):
        judges.judge_accuracies(labels, np.zeros((40, 2)))


def test_bad_config_names_the_key(caches, tmp_path):
    cases = [("energy.beta", 0.0, "energy.beta=0.0"),
             ("energy.perturbations", ("frame_melt",), "energy.perturbations=('frame_melt',)"),
             ("energy.generated_rate", 1.5, "energy.generated_rate=1.5"),
             ("preference.loss", "hinge", "preference.loss='hinge'"),
             ("energy.num_blocks", 4, "energy.num_blocks=4 exceeds the base's 3 layers"),
             ("data.generated_dir", str(tmp_path / "none"), "data.generated_dir")]
    for key, value, msg in cases:
        c = _config(caches, energy_steps=2)
        section, name = key.split(".")
        c[section][name] = value
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            tej.run(c, str(tmp_path / key))
    c = _config(caches)
    c.data.cache_dir = ""
    with pytest.raises(ConfigError, match="data.cache_dir is empty"):
        tej.check_config(c)


def test_energy_judge_as_one_step_reward_lowers_the_energy(caches, tmp_path):
    from experiments import reward_finetune
    base = saving.load_model(caches["backbone"])
    judge = ej.EnergyJudge(base, 1, rngs=nnx.Rngs(5))
    c = reward_finetune.default_config()
    c.model.init_from, c.mesh.devices = caches["backbone"], 1
    c.data.cache_dir, c.data.batch_size = caches["real"], 8
    c.reward.kind, c.reward.energy_judge = "energy_judge", saving.save_model(str(tmp_path / "judge"), judge)
    c.lora.rank = 4
    c.optim.learning_rate = 1e-2
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = 12, 1, 12, False
    os.makedirs(tmp_path / "rf")
    reward_finetune.run(c, str(tmp_path / "rf"))
    rows = [json.loads(line) for line in open(tmp_path / "rf" / "metrics.jsonl")]
    reward = [r["reward"] for r in rows if "reward" in r]
    assert len(reward) == 12 and np.mean(reward[-3:]) < np.mean(reward[:3]), reward
    c.reward.energy_judge = ""
    with pytest.raises(ConfigError, match="reward.energy_judge"):
        reward_finetune.run(c, str(tmp_path / "rf2"))


def test_embedded_rows_and_the_judges_step(caches, tmp_path):
    """The GT-SVJ rows' prerequisites and run configs, and the judges step on tiny saved judges."""
    import types

    from experiments import embedded_pipeline as ep
    from experiments import embedded_videoalign as va
    from shelllcc.data import preference_cache as pc
    from shelllcc.rewards import reward_model as rm
    c = ep.default_config()
    c.run_variants = ("gtsvj_reward",)
    assert va.steps_needed(c) == ("pairs", "reward_model", "energy_judge", "judges")
    c.run_variants = ("gtsvj_dpo", "flow_rwr")
    assert va.steps_needed(c) == STEPS_ALL
    ep.check_config(c)
    paths = ep.Paths(str(tmp_path / "w"))
    rec = ep.variant_record(c, "gtsvj_dpo", 0, {k: "h" for k in ("base", "manifold", "classifier", "cache", "vae")})
    assert "videoalign energy_scored" in rec["inputs"]
    assert va.row_config(c, "gtsvj_dpo", paths, 0).data.cache_dir.endswith("energy_scored/dpo_cache")
    c.run_variants = ("gtsvj_reward",)
    os.makedirs(paths.vae)
    with open(os.path.join(paths.vae, "reconstruction.json"), "w") as f:
        json.dump({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, f)
    r = ep.variant_config(c, "gtsvj_reward", paths, 0).reward
    assert (r.kind, r.energy_judge) == ("energy_judge", va.energy_judge_dir(paths))
    c.videoalign.energy_judge.beta = 0.0
    with pytest.raises(ValueError, match="config.videoalign.energy_judge: energy.beta=0.0"):
        ep.check_config(c)

    # the judges step: tiny saved models under the step dirs, a random manifold, the test pairs
    base = saving.load_model(caches["backbone"])
    root = tmp_path / "judges"
    fake = types.SimpleNamespace(root=str(root), manifold="random")
    saving.save_model(os.path.join(va.reward_model_dir(fake), "model"), rm.LatentRewardModel(base, 1, rngs=nnx.Rngs(0)))
    saving.save_model(os.path.join(va.energy_judge_dir(fake), "model"),
                      ej.EnergyJudge(base, 1, preference_head=True, rngs=nnx.Rngs(1)))
    splits = {s: caches["pairs"][s] for s in ("train", "test")}
    table = va.build_judges(ep.default_config(), fake, splits, str(root / "out"))
    assert set(table["judges"]) == {"reward_model", "energy_judge", "energy_judge_head", "lcc", "shell_norm", "shell"}
    labels = pc.read_all(pc.open_pair_cache(splits["test"]))["labels"]
    assert table["pairs"] == len(labels)
    md = open(root / "out" / judges.TABLE_MD).read()
    assert "| shell_norm |" in md and "acc without ties" in md
    assert json.load(open(root / "out" / judges.TABLE_JSON))["split"] == "test"


STEPS_ALL = ("pairs", "reward_model", "scored", "energy_judge", "energy_scored", "judges")
