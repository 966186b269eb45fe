"""The HALO rows of the embedded benchmark (issue 18; ours): the catalogue's Gran-DPO rows, the patch_reward
prerequisite step (what needs it, its marker, its config), the rows' run configs and markers, and the patch
reward table of the report. Quick-sized: configs and files only (the experiments have their own end-to-end
tests: test_train_patch_reward, test_gran_dpo)."""

import json
import os

import numpy as np
import pytest

from configs import demo
from experiments import embedded_evaluation as ee
from experiments import embedded_pipeline as ep
from experiments import embedded_videoalign as va
from experiments import flow_dpo, train_patch_reward
from experiments.embedded_workdir import Paths

ROWS = ("gran_dpo_patch", "gran_dpo_shell")


def _config(rows=ROWS):
    c = demo.get_config("quick")
    c.run_variants = ("control",) + tuple(rows)
    return c


def _hashes():
    return {k: f"hash-{k}" for k in ep.STAGE_INPUTS}


def test_catalogue_rows_say_ours_and_pass_the_checks():
    cat = ep.catalogue()
    for name in ROWS:
        assert cat[name].method == "flow_dpo" and "ours" in cat[name].label
    ep.check_config(_config())
    assert va.steps_needed(_config()) == ("pairs", "reward_model", "scored", va.PATCH_STEP)   # + the patch model
    assert va.steps_needed(_config(("gran_dpo_shell",))) == ("pairs", "reward_model", "scored")
    assert va.patch_source(cat.gran_dpo_patch) == "patch_model" and va.extra_steps(cat.gran_dpo_shell) == ()
    c = _config()
    c.videoalign.patch_reward.num_train = 0                 # named before any work
    with pytest.raises(ValueError, match=r"config.videoalign.patch_reward: clips.num_train=0 must be >= 1"):
        ep.check_config(c)
    c = _config()
    c.videoalign.gran.lam = -1.0
    with pytest.raises(ValueError, match=r"dpo.lam=-1.0"):
        ep.check_config(c)


def test_row_configs_read_the_step_and_the_manifold(tmp_path):
    c, paths = _config(), Paths(str(tmp_path))
    learned = va.row_config(c, "gran_dpo_patch", paths, 0)
    assert learned.dpo.patch_source == "patch_model" and learned.dpo.patch == (1, 8, 8)
    assert learned.dpo.patch_model == va.step_dir(paths, "patch_reward")
    assert (learned.dpo.delta, learned.dpo.lam) == (c.videoalign.gran.delta, c.videoalign.gran.lam)
    assert learned.data.cache_dir == os.path.join(va.step_dir(paths, "scored"), "dpo_cache")
    shell = va.row_config(c, "gran_dpo_shell", paths, 0)
    assert shell.dpo.patch_source == "shell" and shell.dpo.manifold == paths.manifold
    assert shell.dpo.manifold_kind == c.videoalign.gran.manifold_kind
    for cfg in (learned, shell):
        flow_dpo.check_config(cfg)
    # the learned row's marker names the patch model's step, the Shell-LCC row's does not
    rec_l = ep.variant_record(c, "gran_dpo_patch", 0, ep._variant_inputs(_hashes()))
    rec_s = ep.variant_record(c, "gran_dpo_shell", 0, ep._variant_inputs(_hashes()))
    assert {"videoalign scored", "videoalign patch_reward"} <= set(rec_l["inputs"])
    assert "videoalign scored" in rec_s["inputs"] and "videoalign patch_reward" not in rec_s["inputs"]
    # a patch-reward knob changes the learned row's record only
    c2 = _config()
    c2.videoalign.patch_reward.steps += 1
    assert ep.variant_record(c2, "gran_dpo_patch", 0, ep._variant_inputs(_hashes()))["hash"] != rec_l["hash"]
    assert ep.variant_record(c2, "gran_dpo_shell", 0, ep._variant_inputs(_hashes()))["hash"] == rec_s["hash"]


def test_patch_reward_step_config(tmp_path):
    c, paths = _config(), Paths(str(tmp_path))
    pc = va.patch_reward_config(c, paths)
    train_patch_reward.check_config(pc)
    assert pc.patch_reward.reward_model == va.reward_model_dir(paths) and pc.clips.build
    assert (pc.clips.num_frames, pc.clips.height, pc.clips.width) == (c.benchmark.num_frames, c.benchmark.height,
                                                                     c.benchmark.width)
    assert tuple(pc.patch_reward.patch_tokens) == tuple(c.videoalign.patch_reward.patch_tokens)


def test_report_table_and_costs_of_the_patch_step(tmp_path):
    c, paths = _config(), Paths(str(tmp_path))
    out = va.step_dir(paths, "patch_reward")
    os.makedirs(out)
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 12)) > 0.2).astype(np.int32)
    kinds = np.where(labels == 0, "blur", "").astype(object)
    r = rng.standard_normal((40, 12)) + 2 * (labels - 0.5)
    rep = train_patch_reward.patch_report(r, rng.standard_normal(40), labels, kinds, n_boot=100)
    rep["patch_cells"] = [1, 8, 8]
    json.dump(rep, open(os.path.join(out, train_patch_reward.EVAL_JSON), "w"))
    json.dump({"clips_s": 3.0, "train_s": 12.0, "eval_s": 1.0}, open(os.path.join(out, "timing.json"), "w"))
    open(os.path.join(out, "config.json"), "w").write(va.patch_reward_config(c, paths).to_json_best_effort())
    pre = va.prerequisite_costs(paths)
    assert pre["patch_reward_train_s"] == 12.0 and pre["patch_labels"] == c.videoalign.patch_reward.num_train * 12
    notes = ee.cost_notes({"videoalign": pre}, c)
    assert "Patch reward model (ours" in notes and "Spearman(mean patch reward, video reward" in notes
    assert f"{rep['patch_accuracy']['value']:.3f}" in notes and "degraded patches found: blur" in notes
    costs = ee.costs(c, paths, ROWS, (0,))
    assert costs["gran_dpo_patch"]["labels"] == pre["patch_labels"] and costs["gran_dpo_shell"]["labels"] in (0, None)
    assert "patch reward model 12s" in ee.cost_table(costs)
