"""The README's main job in miniature: every stage of the embedded pipeline, end to end, then a rerun."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import demo
from experiments import embedded_evaluation, embedded_pipeline, embedded_validation, stage_markers
from experiments import embedded_videoalign as va
from tests.xla_flags import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "experiments.main", "--config=configs/demo.py:quick", f"--workdir={workdir}",
           f"--config.seeds={SEEDS}", *flags]
    # one CPU device, as the README's command runs (the 8 forced devices of the test process would make
    # every stage compile for an 8-way mesh; sharding has tests of its own)
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, proc.stdout


def test_every_stage_runs_and_reports(quick_run):
    workdir, out = quick_run
    c = demo.get_config("quick")
    names = list(c.run_variants)
    for i, stage in enumerate(embedded_pipeline.STAGES):
        assert f"[stage {i + 1}/{len(embedded_pipeline.STAGES)}: {stage}] finished" in out
        assert os.path.exists(os.path.join(workdir, "stages", f"{stage}.DONE"))
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert list(results["models"]) == ["base", *names] and results["seeds"] == list(SEEDS)
    assert "two-way" in results["interval_method"]
    for name, r in {**results["models"], **results["references"]}.items():
        for key in ("attribute_accuracy", "frechet_distance", "laplacian_variance"):
            iv = r[key]
            assert iv["lo"] <= iv["hi"] and np.isfinite(iv["value"]), (name, key)
        assert 0.0 <= r["attribute_accuracy"]["value"] <= 1.0
    for name in names:
        r = results["models"][name]
        for key in ("laplacian_ratio", "hf_ratio", "accuracy_change", "spectrum_distance_change", "content_change"):
            assert r[key]["lo"] <= r[key]["value"] + 1e-9 or key == "content_change", (name, key)
        assert set(r["picked"]) == {str(s) for s in SEEDS}
    assert {c_["model"] for c_ in results["claim"]} == {"shell_norm", "shell_band"}
    assert results["verdict"]
    report = open(os.path.join(workdir, "report.md")).read()
    for section in ("## Verdict", "Checkpoint rule", "The claim, item by item", "Trajectories and picked checkpoints",
                    "## Cost of each row", "Reward model on"):
        assert section in report
    for name in names:
        assert f"| {name} |" in report, name
    # costs: labels for the rows on the reward model only; step times against the control; guided sampling
    costs = results["costs"]
    assert set(costs) == set(names)
    labels = costs["flow_dpo"]["labels"]
    assert labels > 0 and labels % 3 == 0 and labels == 3 * results["videoalign"]["train_pairs"]
    for name in names:
        e = c.variants[name]
        assert costs[name]["labels"] == (labels if va.uses_reward_model(e) else 0), name
        if e.method == "guidance":
            assert costs[name]["sample_seconds_per_clip"] > 0 and costs[name]["sample_ratio_vs_base"] > 0
            assert costs[name]["reward_model_train_s"] > 0
        else:
            assert costs[name]["train_seconds_per_step"] > 0 and costs[name]["step_ratio_vs_control"] > 0, name
    assert costs["control"]["step_ratio_vs_control"] == pytest.approx(1.0)
    assert costs["shell_norm"]["manifold_fit_s"] > 0 and costs["flow_rwr"]["scoring_s"] > 0
    for png in ("montage.png", "spectra.png", "trajectories.png", "training_curves.png", "distance_shell_norm.png"):
        with Image.open(os.path.join(workdir, png)) as im:
            assert im.size[0] > 100 and im.size[1] > 100, png


def test_cache_holds_the_object_mask_on_the_latent_grid(quick_run):
    from shelllcc.data import latent_cache
    from shelllcc.data.latent_grid import pool_to_latent_grid
    workdir, _ = quick_run
    c = demo.get_config("quick")
    paths = embedded_pipeline.Paths(str(workdir))
    cache = latent_cache.open_cache(paths.train_cache)
    source = embedded_pipeline._builder(c, paths).as_data_source("train")
    for i in (0, len(cache) - 1):
        rec = cache[i]
        ex = source[int(rec["source_index"])]
        assert int(ex["index"]) == int(rec["index"])
        grid = rec["latents"].shape[:3]
        assert rec["object_mask"].shape == grid
        np.testing.assert_allclose(rec["object_mask"], pool_to_latent_grid(ex["object_mask"] / 255.0, grid), atol=1e-6)
        assert 0 < rec["object_mask"].mean() < 0.5        # the object is there, and smaller than the frame
    # the base trained with the object weighted: its loss log carries the unweighted loss beside it
    metrics = [json.loads(line) for line in open(os.path.join(paths.base, "metrics.jsonl"))]
    assert any("sft_unweighted" in m for m in metrics) == bool(c.base.flow.region_weight)


def test_trajectories_and_picks(quick_run):
    workdir, _ = quick_run
    c = demo.get_config("quick")
    paths = embedded_pipeline.Paths(str(workdir))
    for name in c.run_variants:
        for seed in SEEDS:
            d = paths.variant(name, seed)
            rows = embedded_validation.read_trajectory(d)
            if c.variants[name].method == "guidance":
                # no training: the base's row, then the base sampled with the row's guidance
                assert [r["step"] for r in rows] == [0, 0]
                pick = json.load(open(os.path.join(d, embedded_validation.PICK_JSON)))
                assert pick["step"] == 0 and pick["rule"] == "none"
                continue
            # the base's row first, then every validation.every steps up to the last step
            assert [r["step"] for r in rows] == [0] + list(range(c.validation.every, c.reward.train.steps + 1,
                                                                 c.validation.every))
            assert rows[0]["laplacian_ratio"] == 1.0 and rows[0]["hf_ratio"] == 1.0
            pick = json.load(open(os.path.join(d, embedded_validation.PICK_JSON)))
            assert pick["step"] in [r["step"] for r in rows[1:]] and pick["rule"] == c.validation.rule
            assert os.path.exists(os.path.join(d, embedded_validation.PICKED_DIR, "model.json"))
    # shell_band's tau is shell_norm's reward logged at the step its entry names, per seed
    for seed in SEEDS:
        logged = embedded_pipeline.read_logged(os.path.join(paths.variant("shell_norm", seed), "metrics.jsonl"),
                                               "reward", 2)
        run_cfg = json.load(open(os.path.join(paths.variant("shell_band", seed), "config.json")))
        assert run_cfg["reward"]["shell_band_target"] == pytest.approx(logged)


def test_paired_sampling(quick_run):
    # within a seed every model sampled the same prompts from the same noise: only the weights differ
    workdir, _ = quick_run
    paths = embedded_pipeline.Paths(str(workdir))
    for seed in SEEDS:
        models = ["base", *demo.get_config("quick").run_variants]
        prompts = [json.load(open(os.path.join(paths.samples(m, seed), "samples", "prompts.json"))) for m in models]
        assert all(p == prompts[0] for p in prompts) and all(e["seed"] == seed for e in prompts[0])
    a = np.load(os.path.join(paths.samples("base", 0), "samples", "latents.npy"))
    b = np.load(os.path.join(paths.samples("base", 1), "samples", "latents.npy"))
    assert not np.allclose(a, b)            # seeds draw different noise


def test_guidance_row_changes_the_samples_of_the_same_noise(quick_run):
    workdir, _ = quick_run
    paths = embedded_pipeline.Paths(str(workdir))
    for seed in SEEDS:
        base = np.load(os.path.join(paths.samples("base", seed), "samples", "latents.npy"))
        guided = np.load(os.path.join(paths.samples("nrg_reward_model", seed), "samples", "latents.npy"))
        assert np.all(np.isfinite(guided)) and not np.allclose(base, guided, atol=1e-4)
        # ... while its run config names the trained reward model, and it sampled the base's weights
        cfg = json.load(open(os.path.join(paths.variant("nrg_reward_model", seed), "config.json")))
        assert cfg["guidance"]["kind"] == "reward_model"
        assert cfg["guidance"]["reward_model"] == va.reward_model_dir(paths)
    assert os.path.exists(os.path.join(va.reward_model_dir(paths), "model", "model.json"))


def test_dpo_and_rwr_rows_start_from_the_base(quick_run):
    workdir, _ = quick_run
    paths = embedded_pipeline.Paths(str(workdir))
    for seed in SEEDS:
        for name, cache in (("flow_dpo", "dpo_cache"), ("flow_rwr", "rwr_cache")):
            d = paths.variant(name, seed)
            cfg = json.load(open(os.path.join(d, "config.json")))
            assert cfg["model"]["init_from"] == paths.base and cfg["experiment"] == name
            assert cfg["data"]["cache_dir"] == os.path.join(workdir, "videoalign", "scored", cache)
        metrics = [json.loads(line) for line in open(os.path.join(paths.variant("flow_dpo", seed), "metrics.jsonl"))]
        first = next(m for m in metrics if "loss" in m)
        # step 1's metrics are of the starting weights: policy = reference = the base. The two are computed by
        # different programs (trainable and frozen), whose float32 rounding differs; beta 500 multiplies that
        # into the loss (1.1e-5 seen), while a wrong reference moves it by far more than 1e-4
        assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_videoalign_knob_redoes_its_rows_only(quick_run):
    """The markers a changed knob invalidates: the reward model's steps redo it, the scored samples and the
    rows on them; not the pairs, the Shell-LCC rows or the control."""
    workdir, _ = quick_run
    paths = embedded_pipeline.Paths(str(workdir))
    c = demo.get_config("quick")
    c.seeds = SEEDS
    hashes = {}
    for stage in embedded_pipeline.STAGES[:embedded_pipeline.STAGES.index("variants")]:
        hashes[stage] = embedded_pipeline.stage_record(c, stage, hashes)["hash"]
        assert stage_markers.read(paths.stage_marker(stage))["hash"] == hashes[stage], stage

    def stale(config):
        recs = va.records(config, hashes)
        steps = {s for s in va.steps_needed(config)          # the steps the quick rows build
                 if stage_markers.read(os.path.join(va.step_dir(paths, s), "DONE"))["hash"] != recs[s]["hash"]}
        inputs = embedded_pipeline._variant_inputs(hashes)
        rows = {n for n in config.run_variants for s in SEEDS
                if stage_markers.read(os.path.join(paths.variant(n, s), "DONE"))["hash"]
                != embedded_pipeline.variant_record(config, n, s, inputs)["hash"]}
        return steps, rows

    assert stale(c) == (set(), set())                        # what ran is what the config says
    c.videoalign.reward_model.steps = 3
    assert stale(c) == ({"reward_model", "scored"}, {"flow_dpo", "flow_rwr", "nrg_reward_model"})
    c = demo.get_config("quick")
    c.videoalign.beta = 100.0
    assert stale(c) == (set(), {"flow_dpo"})
    c = demo.get_config("quick")
    c.videoalign.preferences.num_prompts = 13
    assert stale(c) == (set(va.steps_needed(c)), {"flow_dpo", "flow_rwr", "nrg_reward_model"})


def test_rerun_skips_finished_stages(quick_run):
    workdir, _ = quick_run
    before = os.path.getmtime(os.path.join(workdir, "results.json"))
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier; skipped") == len(embedded_pipeline.STAGES)
    assert os.path.getmtime(os.path.join(workdir, "results.json")) == before


def test_config_errors(tmp_path):
    def bad(match, **edits):
        c = demo.get_config("quick")
        for k, v in edits.items():
            parent = c
            *head, last = k.split("__")
            for h in head:
                parent = parent[h]
            parent[last] = v
        with pytest.raises((ValueError, KeyError), match=match):
            embedded_pipeline.run(c, str(tmp_path))

    bad("shel", run_variants=("control", "shel"))
    bad("repeats", run_variants=("control", "control"))
    bad("must run before", run_variants=("control", "shell_band", "shell_norm"))
    bad("multiple of reward.train.log_every", variants__shell_band__tau="shell_norm@3")
    bad("no config key 'objective.drift_wait'", variants__shell_norm__options="objective.drift_wait=1.0")
    bad("takes no reward", variants__control__reward="shell")
    bad("stop_after", stop_after="sampling")
    bad("validation.prompts", validation__prompts=100)
    bad("config.variants.flow_dpo.reward='shell'", variants__flow_dpo__reward="shell")
    bad("config.variants.flow_rwr.objective='one_step'", variants__flow_rwr__objective="one_step")
    bad("config.variants.nrg_reward_model.reward='shell_band'", variants__nrg_reward_model__reward="shell_band")
    bad("config.variants.nrg_reward_model.rule='peak'", variants__nrg_reward_model__rule="peak")
    bad("config.variants.flow_dpo.method='dpo'", variants__flow_dpo__method="dpo")
    bad("no config key 'dpo.betta'", variants__flow_dpo__options="dpo.betta=1.0")
    bad("config.videoalign.beta=0.0 must be > 0", videoalign__beta=0.0)
    bad("config.videoalign.temperature=-1.0 must be > 0", videoalign__temperature=-1.0)
    bad("config.videoalign.reward_model: reward_model.loss='hinge'", videoalign__reward_model__loss="hinge")
    bad("config.videoalign.score.clips_per_prompt=1", videoalign__score__clips_per_prompt=1)
    bad("config.videoalign.reward_model.num_blocks=9", videoalign__reward_model__num_blocks=9)
    with pytest.raises(ValueError, match="unknown demo config arg"):
        demo.get_config("fast")


def test_variant_configs_differ_only_where_their_entries_say(tmp_path):
    c = demo.get_config()
    paths = embedded_pipeline.Paths(str(tmp_path))
    os.makedirs(paths.vae)
    with open(os.path.join(paths.vae, "reconstruction.json"), "w") as f:
        json.dump({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, f)
    control = embedded_pipeline.variant_config(c, "control", paths, 3)
    assert control.objective.name == "sft" and control.model.init_from == paths.base and control.seed == 3
    assert control.train.eval_every == c.validation.every
    for name in ("lcc", "shell_norm", "shell", "shell_norm_drift", "shell_norm_sft"):
        v = embedded_pipeline.variant_config(c, name, paths, 3)
        e = c.variants[name]
        assert v.reward.kind == e.reward and v.objective.name == e.objective
        assert v.reward.manifold == paths.manifold and v.data.cache_dir == paths.train_cache
        assert v.optim.learning_rate == control.optim.learning_rate and v.train.steps == control.train.steps
    drift = embedded_pipeline.variant_config(c, "shell_norm_drift", paths, 0)
    assert drift.objective.drift_weight == 10.0 and drift.objective.drift_margin == 0.05
    assert embedded_pipeline.variant_config(c, "shell_norm", paths, 0).objective.drift_weight == 0.0


def _iv(v, lo, hi):
    return {"value": v, "lo": lo, "hi": hi}


def test_claim_checks_need_the_whole_interval():
    c = demo.get_config()

    def model(lap, hf, spec, acc):
        return {"laplacian_ratio": _iv(*lap), "hf_ratio": _iv(*hf), "spectrum_distance_change": _iv(*spec),
                "accuracy_change": _iv(*acc)}
    results = {"models": {
        "base": {},
        "lcc": model((0.8, 0.7, 0.9), (0.85, 0.8, 0.95), (0.1, 0.0, 0.2), (0.0, -0.1, 0.1)),
        "shell_band": model((1.2, 1.1, 1.3), (1.3, 1.1, 1.5), (-0.05, -0.08, -0.01), (-0.01, -0.04, 0.02)),
        # a point estimate above 1 whose interval reaches below it does not count; nor does an accuracy
        # interval reaching past -0.05
        "shell_norm": model((1.1, 0.98, 1.2), (1.2, 1.01, 1.4), (-0.05, -0.1, -0.01), (-0.02, -0.07, 0.03)),
    }}
    checks = {(x["model"], x["claim"].split(" (")[0]): x["holds"] for x in embedded_evaluation.claim_checks(results, c)}
    assert checks[("lcc", "lcc lowers Laplacian variance")] and checks[("lcc", "lcc lowers high-frequency energy")]
    assert all(v for (m, _), v in checks.items() if m == "shell_band")
    assert not checks[("shell_norm", "raises Laplacian variance")]
    assert checks[("shell_norm", "raises high-frequency energy")]
    assert not checks[("shell_norm", "keeps attribute accuracy")]
    results["claim"] = embedded_evaluation.claim_checks(results, c)
    lines = embedded_evaluation.verdict(results, c)
    assert "`shell_band`" in lines[0] and any(line.startswith("`shell_norm` does not") for line in lines)
