"""The README's main job in miniature: every stage of the embedded pipeline, end to end, then a rerun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import demo
from experiments import embedded_evaluation, embedded_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *flags):
    cmd = [sys.executable, "-m", "experiments.main", "--config=configs/demo.py:quick", f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir, proc.stdout


def test_every_stage_runs_and_reports(quick_run):
    workdir, out = quick_run
    for i, stage in enumerate(embedded_pipeline.STAGES):
        assert f"[stage {i + 1}/{len(embedded_pipeline.STAGES)}: {stage}] finished" in out
        assert os.path.exists(os.path.join(workdir, "stages", f"{stage}.DONE"))
    results = json.load(open(os.path.join(workdir, "results.json")))
    models = results["models"]
    assert list(models) == ["base", *embedded_pipeline.VARIANTS]
    for name, r in {**models, **results["references"]}.items():
        for key in ("laplacian_variance", "hf_energy", "hf_fraction", "spectrum_distance", "frechet_distance"):
            assert np.isfinite(r[key]), (name, key)
        acc = r["attribute_accuracy"]
        assert set(acc) >= {"shape", "colour", "texture", "direction", "mean"}
        assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert models["base"]["laplacian_ratio"] == 1.0 and models["base"]["content_change"] == 0.0
    for name in embedded_pipeline.VARIANTS:
        r = models[name]
        assert r["laplacian_ratio"] == pytest.approx(r["laplacian_variance"] / models["base"]["laplacian_variance"])
        assert set(r["manifold_distance"]) == {"lcc", "shell"}
    kinds = {c["model"] for c in results["claim"]}
    assert kinds == {"lcc", "shell_norm", "shell", "shell_band"}
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| shell_band |" in report and "The claim, item by item" in report
    for png in ("montage.png", "spectra.png", "training_curves.png", "base_training_curve.png",
                "distance_lcc.png", "distance_shell.png"):
        with Image.open(os.path.join(workdir, png)) as im:
            assert im.size[0] > 100 and im.size[1] > 100, png
    for media in ("comparison.mp4", "comparison.gif"):
        assert os.path.getsize(os.path.join(workdir, media)) > 1000
    # every model sampled the same prompts with the same noise: the samples differ only by the weights
    lat = {n: np.load(os.path.join(workdir, "samples", n, "samples", "latents.npy")) for n in models}
    assert all(v.shape == lat["base"].shape for v in lat.values())
    prompts = {n: json.load(open(os.path.join(workdir, "samples", n, "samples", "prompts.json"))) for n in models}
    assert all(p == prompts["base"] for p in prompts.values())


def test_rerun_skips_finished_stages(quick_run):
    workdir, _ = quick_run
    before = os.path.getmtime(os.path.join(workdir, "results.json"))
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier; skipped") == len(embedded_pipeline.STAGES)
    assert os.path.getmtime(os.path.join(workdir, "results.json")) == before


def test_config_errors(tmp_path):
    c = demo.get_config("quick")
    c.variants = ("control", "shel")
    with pytest.raises(ValueError, match="shel"):
        embedded_pipeline.run(c, str(tmp_path))
    c = demo.get_config("quick")
    c.stop_after = "sampling"
    with pytest.raises(ValueError, match="stop_after"):
        embedded_pipeline.run(c, str(tmp_path))
    with pytest.raises(ValueError, match="unknown demo config arg"):
        demo.get_config("fast")


def test_variant_configs_differ_only_where_they_should(tmp_path):
    c = demo.get_config("quick")
    paths = embedded_pipeline.Paths(str(tmp_path))
    os.makedirs(paths.vae)
    with open(os.path.join(paths.vae, "reconstruction.json"), "w") as f:
        json.dump({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, f)
    control = embedded_pipeline.variant_config(c, "control", paths)
    assert control.objective.name == "sft" and control.model.init_from == paths.base
    for kind in ("lcc", "shell_norm", "shell", "shell_band"):
        v = embedded_pipeline.variant_config(c, kind, paths)
        assert v.reward.kind == kind and v.objective.name == c.reward.objective.name
        assert v.reward.manifold == paths.manifold and v.data.cache_dir == paths.train_cache
        assert v.optim.learning_rate == control.optim.learning_rate and v.train.steps == control.train.steps


def test_claim_checks():
    cfg = embedded_evaluation.default_config()

    def model(hf, lap, spec, acc):
        return {"hf_ratio": hf, "laplacian_ratio": lap, "spectrum_distance": spec, "attribute_accuracy": {"mean": acc}}
    results = {"models": {"base": model(1.0, 1.0, 0.5, 0.8), "lcc": model(0.9, 0.8, 0.6, 0.8),
                          "shell": model(1.2, 1.3, 0.4, 0.78), "shell_norm": model(1.01, 0.9, 0.6, 0.6)}}
    checks = {(c["model"], c["claim"].split(" (")[0]): c["holds"] for c in embedded_evaluation.claim_checks(results, cfg)}
    assert checks[("lcc", "lcc lowers high-frequency detail")] and checks[("lcc", "lcc lowers Laplacian variance")]
    assert checks[("shell", "raises high-frequency detail")] and checks[("shell", "raises Laplacian variance")]
    assert checks[("shell", "moves the power spectrum toward real")] and checks[("shell", "keeps attribute accuracy")]
    # within ratio_eps of 1 is not "raised"; an accuracy drop beyond the margin is flagged
    assert not checks[("shell_norm", "raises high-frequency detail")]
    assert not checks[("shell_norm", "keeps attribute accuracy")]


def test_diagnostics_flag_an_untrained_base_and_collapsed_variants():
    cfg = embedded_evaluation.default_config()
    attrs = ("shape", "colour", "texture", "scale", "direction", "speed")
    chance = embedded_evaluation.chance_accuracy(attrs)
    assert chance == pytest.approx(np.mean([1 / 6, 1 / 8, 1 / 4, 1 / 2, 1 / 8, 1 / 2]))

    def model(acc, change=0.0):
        return {"attribute_accuracy": {**{a: acc for a in attrs}, "mean": acc}, "content_change": change}
    untrained = {"models": {"base": model(chance), "control": model(chance, 0.01), "shell": model(chance, 0.2)}}
    notes = embedded_evaluation.diagnostics(untrained, cfg)
    assert len(notes) == 1 and "at chance" in notes[0]
    trained = {"models": {"base": model(0.6), "control": model(0.6, 0.01), "shell": model(0.3, 0.2),
                          "shell_band": model(0.59, 0.05)}}
    notes = embedded_evaluation.diagnostics(trained, cfg)
    assert len(notes) == 1 and notes[0].startswith("`shell` lost the prompts' content")
