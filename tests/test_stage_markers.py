"""Stage markers of the embedded pipeline remember the settings and inputs that made a stage: a rerun with
a change redoes that stage and everything downstream of it, and nothing else (issue 15, item 3)."""

import json
import os
import subprocess
import sys

from configs import demo
from experiments import embedded_pipeline as ep
from experiments import stage_markers
from tests.xla_flags import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hashes(config) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for stage in ep.STAGES:
        hashes[stage] = ep.stage_record(config, stage, hashes)["hash"]
    return hashes


def _redone(edit) -> set[str]:
    before = _hashes(demo.get_config("quick"))
    c = demo.get_config("quick")
    edit(c)
    after = _hashes(c)
    return {s for s in ep.STAGES if before[s] != after[s]}


def test_a_change_redoes_its_stage_and_everything_downstream():
    downstream_of_cache = {"cache", "base", "manifold", "videoalign", "variants", "sample", "evaluate"}
    assert _redone(lambda c: None) == set()
    assert _redone(lambda c: setattr(c.benchmark, "seed", 1)) == set(ep.STAGES) - {"text_encoder"}
    assert _redone(lambda c: setattr(c.vae.train, "steps", 5)) == {"vae"} | downstream_of_cache
    assert _redone(lambda c: setattr(c.text_encoder, "num_layers", 2)) == {"text_encoder"} | downstream_of_cache
    assert _redone(lambda c: setattr(c.base.train, "steps", 8)) == {"base", "videoalign", "variants", "sample",
                                                                     "evaluate"}
    assert _redone(lambda c: setattr(c.manifold.manifold, "num_anchors", 4)) == {"manifold", "variants", "sample",
                                                                                 "evaluate"}
    # the validation scores with the classifier, so the picked checkpoints (and their samples) may change
    assert _redone(lambda c: setattr(c.classifier, "steps", 5)) == {"classifier", "variants", "sample", "evaluate"}
    assert _redone(lambda c: setattr(c.reward.train, "steps", 6)) == {"variants", "sample", "evaluate"}
    # the VideoAlign prerequisites sample the base (its steps have markers of their own: what_redone below)
    assert _redone(lambda c: setattr(c.sample.sampler, "steps", 3)) == {"videoalign", "variants", "sample", "evaluate"}
    assert _redone(lambda c: setattr(c.videoalign, "beta", 100.0)) == {"videoalign", "variants", "sample", "evaluate"}
    assert _redone(lambda c: setattr(c.evaluate, "n_boot", 100)) == {"evaluate"}
    # what acts after the stages (the export) redoes none of them
    assert _redone(lambda c: setattr(c.pretrained, "export_to", "x")) == set()


def test_a_changed_variant_entry_redoes_that_variant_and_what_reads_it():
    def records(c):
        inputs = ep._variant_inputs(_hashes(c))
        return {n: ep.variant_record(c, n, 0, inputs)["hash"] for n in c.run_variants}

    base = records(demo.get_config("quick"))
    c = demo.get_config("quick")
    c.variants.shell_norm.options = "objective.drift_weight=1.0"
    changed = records(c)
    # shell_band's tau is read from shell_norm's log: it is redone with it; the control is not
    assert {n for n in base if base[n] != changed[n]} == {"shell_norm", "shell_band"}
    c = demo.get_config("quick")
    c.variants.control.label = "another label"        # the report's text, not the run
    assert records(c) == base
    # a VideoAlign knob: the rows on the reward model, not the Shell-LCC rows nor the control
    c = demo.get_config("quick")
    c.videoalign.reward_model.steps = 3
    changed = records(c)
    assert {n for n in base if base[n] != changed[n]} == {"flow_dpo", "flow_rwr", "nrg_reward_model"}
    c = demo.get_config("quick")
    c.videoalign.temperature = 1.0
    changed = records(c)
    assert {n for n in base if base[n] != changed[n]} == {"flow_rwr"}


def test_what_changed_names_the_setting():
    old = stage_markers.record({"base": {"train": {"steps": 4}}}, {"cache": "a"})
    new = stage_markers.record({"base": {"train": {"steps": 8}}}, {"cache": "a"})
    assert stage_markers.what_changed(old, new) == "config changed (base.train.steps: 4 -> 8)"
    redone = stage_markers.record({"base": {"train": {"steps": 4}}}, {"cache": "b"})
    assert stage_markers.what_changed(old, redone) == "its inputs changed (cache)"
    assert "no config" in stage_markers.what_changed({}, new)


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "experiments.main", "--config=configs/demo.py:quick", "--config.stop_after=dataset",
           f"--workdir={workdir}", *flags]
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_rerun_with_a_change_redoes_the_stage_and_keeps_a_config_history(tmp_path):
    w = tmp_path / "w"
    assert _main(w).returncode == 0
    proc = _main(w, "--config.benchmark.train_size=32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = f"[stage 1/{len(ep.STAGES)}: dataset]"
    assert f"{head} config changed (benchmark.train_size: 64 -> 32): redoing it" in proc.stdout
    assert json.load(open(w / "stages" / "dataset.DONE"))["settings"]["benchmark"]["train_size"] == 32
    # interrupted under other settings: what it left is not resumed from
    os.rename(w / "stages" / "dataset.DONE", w / "stages" / "dataset.STARTED")
    (w / "data" / "left_by_the_interrupted_run").write_text("")
    proc = _main(w, "--config.benchmark.train_size=48")
    assert f"{head} an unfinished run of it had other settings (config changed (benchmark.train_size: " \
           "32 -> 48)); starting it over" in proc.stdout
    assert not (w / "data" / "left_by_the_interrupted_run").exists()
    assert not (w / "stages" / "dataset.STARTED").exists()
    # a refused run (a check of the pipeline's own) leaves config.json to the run that made the outputs
    proc = _main(w, "--config.run_variants=('control', 'control')")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: config.run_variants")
    assert json.load(open(w / "config.json"))["benchmark"]["train_size"] == 48
    history = [json.load(open(w / "config_history" / n)) for n in sorted(os.listdir(w / "config_history"))]
    assert [h["config"]["benchmark"]["train_size"] for h in history] == [64, 32, 48]
    assert [h["outcome"] for h in history] == ["finished"] * 3
