"""The embedded pipeline's evaluation stage: every metric of every model with a 95% interval, plots, report.

Inputs (all from the pipeline's workdir): the test clips (real pixels and cached latents, with attribute
labels), the VAE, the classifier, the manifold, each variant's validation trajectory and picked
checkpoint, and the latents each model sampled for the first ``num_prompts`` test prompts, once per seed
(the same prompts and, per seed, the same noise for every model).

Per clip (:func:`score_clips`): Laplacian variance and high-frequency energy of the luma (above 1/4
Nyquist), radially averaged power spectrum, which attributes the classifier reads as the prompt names
them, the classifier's features, and the manifold distances of the latents. Per model, from the arrays
``[seeds, prompts]`` (:mod:`shelllcc.evaluation.intervals`, a two-way percentile bootstrap):

* ``laplacian_ratio``, ``hf_ratio``: ``mean(model) / mean(base)`` on the same prompts and noise;
* ``content_change``: ``mean |x - base|`` (pixels in [0, 1]);
* ``spectrum_distance``: ``mean_r |log10 P(r) - log10 P_real(r)|`` of the mean spectra, and its change
  against the base's (``spectrum_distance_change``);
* ``frechet_distance``: on the classifier's features, against the real training clips;
* ``attribute_accuracy`` (mean over the six attributes) and ``accuracy_change`` against the base;
* manifold distances ``lcc``, ``shell_norm``, ``shell`` of the sampled latents.

The claim, per Shell-LCC variant, holds only when the interval excludes the null: a detail ratio above 1,
a spectrum distance below the base's, an accuracy change above ``-max_accuracy_drop``; for ``lcc``, detail
ratios below 1. Reference rows: ``real`` (the test clips) and ``real_vae`` (through the VAE: the most
detail any generator here can reach).

Costs per row (:func:`costs`; ``results.json``'s ``costs``, the report's "Cost of each row"): the labels it
used (preference pairs x 3 dimensions for the rows on the reward model, 0 for the Shell-LCC rows and the
control), what it needed before its run (the reward model's training wall time, and the scoring of the
base's samples for DPO / RWR; the manifold's fit for the Shell-LCC rows), its mean wall time per training
step between validations against the control row's (:meth:`embedded_validation.Trajectory.timing`), and
for guidance rows the seconds per sampled clip against the base's (measured back to back, compiled).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import embedded_videoalign as va
from experiments import embedded_workdir as workdir
from experiments import train_vae
from shelllcc.data import moving_textures as mt
from shelllcc.data.latent_cache import open_cache
from shelllcc.evaluation import classifier as clf_lib
from shelllcc.evaluation import detail, frechet, report
from shelllcc.evaluation import intervals as iv
from shelllcc.manifold import io as manifold_io
from shelllcc.rewards.manifold_distance import manifold_distance

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
SHELL_KINDS = ("shell_norm", "shell", "shell_band")
DISTANCE_KINDS = ("lcc", "shell_norm", "shell")
TRAJECTORY_METRICS = ("laplacian_ratio", "hf_ratio", "spectrum_distance", "attribute_accuracy", "acc_shape",
                      "shell_norm")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_prompts=64,              # test prompts sampled from every model (the first N of the test split)
        n_boot=2000,                 # bootstrap resamples per interval
        level=0.95,
        montage_prompts=6,
        comparison_prompts=4,
        comparison_video=True,       # comparison.mp4/.gif (the mp4 needs imageio-ffmpeg's ffmpeg)
        fps=8,
        zoom=4,
        # the claim's null for accuracy: a variant keeps the prompts when its accuracy change against the
        # base stays above -max_accuracy_drop (the whole interval)
        max_accuracy_drop=0.05,
        # the authors' warning sign of noise (reward hacking): hf ratio far above the Laplacian ratio
        noise_gap=0.3,
    ))


# ------------------------------------------------------------------------------------------ inputs

def _source_examples(source, n: int) -> list[dict]:
    idx = list(range(min(n, len(source))))
    return list(source.__getitems__(idx)) if hasattr(source, "__getitems__") else [source[i] for i in idx]


def load_real(builder, split: str, n: int, attributes) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The first ``n`` clips of ``split`` in source order: ``(videos uint8, labels, clip indices)``."""
    ex = _source_examples(builder.as_data_source(split), n)
    videos = np.stack([np.asarray(e["video"]) for e in ex])
    labels = {a: np.asarray([int(e[a]) for e in ex]) for a in attributes}
    return videos, labels, np.asarray([int(e["index"]) for e in ex])


def load_test_latents(cache_dir: str, n: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Normalised latents ``[n, ...]`` and source indices of the first ``n`` test cache records."""
    cache = open_cache(cache_dir, latent_dtype=np.float32)
    recs = [cache[i] for i in range(min(n, len(cache)))]
    lat = np.stack([r["latents"] for r in recs]).astype(np.float32)
    lat = (lat - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return lat, np.asarray([int(r["index"]) for r in recs])


def decode_latents(vae, latents: np.ndarray, mean, std, batch_size: int = 16) -> np.ndarray:
    """Normalised latents -> uint8 videos, decoded losslessly on the host's default device."""
    graphdef, state = nnx.split(vae)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    @jax.jit
    def run(state, z):
        y = nnx.merge(graphdef, state).decode(z * std + mean)
        return jnp.clip(jnp.round((y + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    out = []
    for i in range(0, len(latents), batch_size):
        chunk = latents[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(run(state, chunk))[:batch_size - pad])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ per clip

def per_clip_detail(videos: np.ndarray) -> dict[str, np.ndarray]:
    return {"laplacian_variance": np.asarray(detail.laplacian_variance(videos), np.float64),
            "hf_energy": np.asarray(detail.high_frequency_energy(videos), np.float64),
            "hf_fraction": np.asarray(detail.high_frequency_fraction(videos), np.float64)}


def mean_spectrum(videos: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.mean(detail.radial_power_spectrum(videos), axis=0), np.float64)


def spectrum_distance_of(spectra: np.ndarray, real_mean: np.ndarray) -> float:
    """``mean_r |log10 mean(spectra)(r) - log10 real_mean(r)|`` over the bins both have power in."""
    s = np.asarray(spectra, np.float64).reshape(-1, np.shape(spectra)[-1]).mean(0)
    return float(np.mean(np.abs(np.log10(np.maximum(s, 1e-20)) - np.log10(np.maximum(real_mean, 1e-20)))))


def score_clips(videos: np.ndarray, labels: dict[str, np.ndarray], classifier) -> dict:
    """Per-clip values of ``videos`` uint8 ``[n, T, H, W, 3]``: detail (``laplacian_variance``,
    ``hf_energy``, ``hf_fraction``), ``spectra [n, R]`` (each clip's radial power spectrum, frames
    averaged), ``correct`` (attribute -> bool ``[n]``: the classifier reads the prompt's value) and the
    classifier's ``features [n, F]``."""
    out = per_clip_detail(videos)
    out["spectra"] = np.asarray(detail.radial_power_spectrum(videos), np.float64)
    pred = clf_lib.predict(classifier, videos)
    out["correct"] = {a: np.asarray(pred[a]) == np.asarray(labels[a]) for a in pred}
    out["features"] = np.asarray(clf_lib.features(classifier, videos), np.float64)
    return out


def manifold_distances(manifold, mcfg, latents: np.ndarray, kinds, target) -> dict[str, np.ndarray]:
    out = {}
    for kind in kinds:
        fn = jax.jit(lambda z, kind=kind: manifold_distance(
            manifold, z, kind, target if kind == "shell_band" else None, patch_size=mcfg.patch_size,
            per_example=True, bn_eps=mcfg.bn_eps, shell_eps=mcfg.shell_eps))
        out[kind] = np.concatenate([np.asarray(fn(latents[i:i + 32])) for i in range(0, len(latents), 32)])
    return out


# ------------------------------------------------------------------------------------------ intervals

def model_arrays(scores: list[dict], base: list[dict] | None, videos: list[np.ndarray],
                 base_videos: list[np.ndarray] | None, distances: list[dict]) -> dict[str, np.ndarray]:
    """The ``[seeds, prompts, ...]`` arrays of one model (and its base, paired, under ``base_*`` keys)."""
    stack = lambda key, src: np.stack([s[key] for s in src])   # noqa: E731
    a = {k: stack(k, scores) for k in ("laplacian_variance", "hf_energy", "spectra", "features")}
    a["accuracy"] = np.stack([np.mean([c for c in s["correct"].values()], axis=0) for s in scores])
    for attr in scores[0]["correct"]:
        a[f"acc_{attr}"] = np.stack([s["correct"][attr].astype(np.float64) for s in scores])
    for k in distances[0]:
        a[f"d_{k}"] = np.stack([d[k] for d in distances])
    if base is not None:
        for k in ("laplacian_variance", "hf_energy", "spectra"):
            a[f"base_{k}"] = stack(k, base)
        a["base_accuracy"] = np.stack([np.mean([c for c in s["correct"].values()], axis=0) for s in base])
        a["change"] = np.stack([np.mean(np.abs(v.astype(np.float64) - b) / 255.0, axis=(1, 2, 3, 4))
                                for v, b in zip(videos, base_videos)])
    return a


def model_intervals(a: dict[str, np.ndarray], real_spectrum: np.ndarray, feats_train: np.ndarray, cfg,
                    seed: int = 0) -> dict:
    """Every metric of one model, each ``{value, lo, hi, ...}`` (module docstring)."""
    kw = dict(n_boot=cfg.n_boot, level=cfg.level, seed=seed)
    boot = lambda stat, keys, **k: iv.bootstrap({x: a[x] for x in keys}, stat, **{**kw, **k})  # noqa: E731
    mu_t, sig_t = frechet.gaussian_stats(feats_train)
    out = {
        "laplacian_variance": boot(iv.mean_of("laplacian_variance"), ["laplacian_variance"]),
        "spectrum_distance": boot(lambda d: spectrum_distance_of(d["spectra"], real_spectrum), ["spectra"]),
        "frechet_distance": iv.jackknife({"features": a["features"]}, lambda d: frechet.frechet_distance(
            *frechet.gaussian_stats(d["features"].reshape(-1, d["features"].shape[-1])), mu_t, sig_t),
            level=cfg.level),
        "attribute_accuracy": boot(iv.mean_of("accuracy"), ["accuracy"]),
        "accuracy": {k[4:]: boot(iv.mean_of(k), [k]) for k in a if k.startswith("acc_")},
        "manifold_distance": {k[2:]: boot(iv.mean_of(k), [k]) for k in a if k.startswith("d_")},
    }
    if "base_laplacian_variance" in a:
        out["laplacian_ratio"] = boot(iv.ratio_of_means("laplacian_variance", "base_laplacian_variance"),
                                      ["laplacian_variance", "base_laplacian_variance"])
        out["hf_ratio"] = boot(iv.ratio_of_means("hf_energy", "base_hf_energy"), ["hf_energy", "base_hf_energy"])
        out["content_change"] = boot(iv.mean_of("change"), ["change"])
        out["spectrum_distance_change"] = boot(
            lambda d: spectrum_distance_of(d["spectra"], real_spectrum)
            - spectrum_distance_of(d["base_spectra"], real_spectrum), ["spectra", "base_spectra"])
        out["accuracy_change"] = boot(iv.difference_of_means("accuracy", "base_accuracy"),
                                      ["accuracy", "base_accuracy"])
    return out


# ------------------------------------------------------------------------------------------ the claim

def _reward(config, name: str) -> str:
    return config.variants[name].reward if name in config.variants else ""


def claim_checks(results: dict, config) -> list[dict]:
    """The claim, item by item, each holding only when its interval excludes the null."""
    cfg = config.evaluate
    checks = []

    def add(model, what, interval, null, side):
        checks.append({"model": model, "claim": what, "value": interval["value"], "lo": interval["lo"],
                       "hi": interval["hi"], "null": null, "holds": iv.excludes(interval, null, side)})

    for name, r in results["models"].items():
        kind = _reward(config, name)
        if kind in SHELL_KINDS:
            add(name, "raises Laplacian variance (ratio > 1)", r["laplacian_ratio"], 1.0, "above")
            add(name, "raises high-frequency energy (ratio > 1)", r["hf_ratio"], 1.0, "above")
            add(name, "moves the power spectrum toward the real clips' (distance change < 0)",
                r["spectrum_distance_change"], 0.0, "below")
            add(name, f"keeps attribute accuracy (change > -{cfg.max_accuracy_drop})", r["accuracy_change"],
                -cfg.max_accuracy_drop, "above")
        elif kind == "lcc":
            add(name, "lcc lowers Laplacian variance (ratio < 1)", r["laplacian_ratio"], 1.0, "below")
            add(name, "lcc lowers high-frequency energy (ratio < 1)", r["hf_ratio"], 1.0, "below")
    return checks


def verdict(results: dict, config) -> list[str]:
    """Plain sentences: which variants show the claim, which do not and why."""
    checks = results["claim"]
    by_model: dict[str, list[dict]] = {}
    for c in checks:
        by_model.setdefault(c["model"], []).append(c)
    shows = [m for m, cs in by_model.items() if _reward(config, m) in SHELL_KINDS and all(c["holds"] for c in cs)]
    lines = []
    if shows:
        lines.append("The claim holds (every interval excludes the null) for: " + ", ".join(f"`{m}`" for m in shows)
                     + ": more detail than the base, a spectrum nearer the real clips', the prompts kept.")
    else:
        lines.append("No Shell-LCC variant shows the whole claim (more detail, a spectrum nearer the real clips', "
                     "the prompts kept) with intervals that exclude the null.")
    for m, cs in by_model.items():
        if m in shows:
            continue
        failed = [c["claim"] for c in cs if not c["holds"]]
        if failed:
            lines.append(f"`{m}` does not; not established: " + "; ".join(failed) + ".")
        elif _reward(config, m) == "lcc":
            lines.append(f"`{m}` blurs, as the paper predicts for the skeleton distance: both detail ratios are "
                         "below 1.")
    return lines


def chance_accuracy(attributes) -> float:
    """Mean over ``attributes`` of ``1 / classes``: the attribute accuracy of guessing."""
    return float(np.mean([1.0 / len(mt.ATTRIBUTES[a]) for a in attributes]))


def diagnostics(results: dict, config) -> list[str]:
    """Plain-language warnings about what the numbers can and cannot show (written into the report)."""
    cfg = config.evaluate
    m = results["models"]
    base = m["base"]
    attrs = list(base["accuracy"])
    chance = chance_accuracy(attrs)
    notes = []
    b_acc = base["attribute_accuracy"]["value"]
    if b_acc < chance + 0.1:
        notes.append(f"The base model's attribute accuracy ({b_acc:.3f}) is near chance ({chance:.3f}): it does not "
                     "draw the prompts, so the detail ratios compare noise with noise and cannot test the claim.")
    for name, r in m.items():
        if name == "base":
            continue
        gap = r["hf_ratio"]["value"] - r["laplacian_ratio"]["value"]
        if gap > cfg.noise_gap:
            notes.append(f"`{name}`: the hf ratio ({r['hf_ratio']['value']:.2f}) is far above the Laplacian ratio "
                         f"({r['laplacian_ratio']['value']:.2f}), the authors' sign of added noise rather than detail.")
        if r["accuracy_change"]["hi"] < -cfg.max_accuracy_drop:
            notes.append(f"`{name}` lost the prompts even at its picked checkpoint (accuracy change "
                         f"{iv.format_interval(r['accuracy_change'])}): it collapsed before the first validation "
                         "step, so its detail ratios do not measure restored texture.")
    return notes


# ------------------------------------------------------------------------------------------ costs

def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def costs(config, paths, names, seeds) -> dict:
    """Per row (module doc): labels, prerequisite seconds, seconds per training step (and against the
    control's), seconds per sampled clip for guidance rows (and against the base's)."""
    pre = va.prerequisite_costs(paths)
    stage_s = _read_json(os.path.join(paths.root, "timings.json"))
    out = {}
    for name in names:
        e = config.variants[name]
        t = [_read_json(os.path.join(paths.variant(name, s), va.TIMING_JSON)) for s in seeds]
        row = {"method": e.method, "labels": 0}
        if va.uses_reward_model(e):
            row["labels"] = pre.get("labels")
            row["train_pairs"] = pre.get("train_pairs")
            row["reward_model_train_s"] = pre.get("reward_model_train_s")
            if e.method in va.TRAINING_METHODS:
                row["scoring_s"] = pre.get("scoring_s")
            if va.extra_steps(e):                   # Gran-DPO with the learned patch model: its labels and training
                row["labels"] = (row["labels"] or 0) + (pre.get("patch_labels") or 0)
                row["patch_reward_train_s"] = pre.get("patch_reward_train_s")
        elif va.uses_energy_judge(e):                   # GT-SVJ's rows: no pair labels in -E
            row["energy_judge_train_s"] = pre.get("energy_judge_train_s")
            if e.method in va.TRAINING_METHODS:
                row["scoring_s"] = pre.get("energy_scoring_s")
        elif va.uses_pisces(e):                         # PISCES: captions only, no labels
            row["embeddings_train_s"] = pre.get("embeddings_train_s")
            row["ot_map_train_s"] = pre.get("ot_map_train_s")
        elif e.reward:                                  # a distance to the manifold: the Shell-LCC rows
            row["manifold_fit_s"] = stage_s.get("manifold")
        if e.method == va.GUIDANCE:
            row["sample_seconds_per_clip"] = _mean(x.get("sample_seconds_per_clip") for x in t)
            row["base_sample_seconds_per_clip"] = _mean(x.get("base_sample_seconds_per_clip") for x in t)
            if row["sample_seconds_per_clip"] and row["base_sample_seconds_per_clip"]:
                row["sample_ratio_vs_base"] = row["sample_seconds_per_clip"] / row["base_sample_seconds_per_clip"]
        else:
            row["train_seconds_per_step"] = _mean(x.get("train_seconds_per_step") for x in t)
        if e.method == va.GRPO:                         # online RL: the clips it drew and the run's wall time
            from experiments import embedded_grpo
            row.update(embedded_grpo.costs(config, paths, name, seeds))
        out[name] = row
    control = out.get("control", {}).get("train_seconds_per_step")
    for name, row in out.items():
        if control and row.get("train_seconds_per_step"):
            row["step_ratio_vs_control"] = row["train_seconds_per_step"] / control
    return out


def cost_notes(results: dict, config) -> str:
    """What the cost columns measure, and the reward model's own accuracy where it was trained."""
    lines = ["*Labels used*: preference pairs the reward model trained on x 3 dimensions (VQ, MQ, TA), plus, for "
             "Gran-DPO with the learned patch model, its training clips x patches (the degradation oracle's patch "
             "labels); the Shell-LCC rows (and Gran-DPO's Shell-LCC patch rewards) and the control use none. "
             "*Built before the run*: wall time of the shared prerequisites (the "
             "reward model's training; the scoring of the base's samples for DPO / RWR; the manifold's fit for the "
             "Shell-LCC rows), once per pipeline run whatever the number of rows and seeds. *s / training step*: "
             "between validations, compilation and validation excluded, mean over seeds; *x control*: against the "
             "control row's. *s / sampled clip*: guidance rows, validation prompts, compiled, the base's measured "
             "right after (*x base*). *Samples drawn*: GRPO rows, the clips sampled with the SDE during the run "
             "(steps x prompts x group size), and the run's wall time (rollouts, updates and validations)."]
    pre = results.get("videoalign", {})
    ev = pre.get("reward_model_eval", {})
    if ev:
        from shelllcc.evaluation import preference_eval
        for t, rep_ in ev.items():
            line = (f"Reward model on {rep_['pairs']} held-out test pairs at t = {t}: accuracy without ties "
                    f"{preference_eval.summary_line(rep_)}; with ties (eps fitted on the test pairs, optimistic) "
                    f"{preference_eval.summary_line(rep_, 'acc_with_ties')}")
            if "acc_at_val_eps" in rep_:
                line += f"; with ties at the validation split's eps {preference_eval.summary_line(rep_, 'acc_at_val_eps')}"
            lines.append(line + ".")
    if pre.get("judges"):
        from shelllcc.evaluation import judges
        lines.append("Judges of the preference test pairs (accuracy with ties, eps fitted on the pairs; the Shell-LCC "
                     "distances and the energy judge's -E use no pair labels):\n\n"
                     + judges.table_markdown(pre["judges"]) + "\n\n"
                     + judges.table_markdown(pre["judges"], "acc_without_ties"))
    patch = va.patch_reward_notes(pre)
    if patch:
        lines.append(patch)
    pisces_line = va.pisces_notes(pre)
    if pisces_line:
        lines.append(pisces_line)
    if "scored" in pre and pre["scored"]:
        sc = pre["scored"]
        lines.append(f"Scored samples of the base: {sc.get('prompts')} train prompts, {sc.get('clips')} clips, "
                     f"{sc.get('pairs')} DPO pairs (best vs worst per prompt).")
    return "\n\n".join(lines)


def cost_table(c: dict) -> str:
    def sec(x, fmt=".1f"):
        return "" if x is None else f"{x:{fmt}}"
    rows = []
    for name, r in c.items():
        before = []
        if r.get("reward_model_train_s") is not None:
            before.append(f"reward model {r['reward_model_train_s']:.0f}s")
        if r.get("energy_judge_train_s") is not None:
            before.append(f"energy judge {r['energy_judge_train_s']:.0f}s")
        if r.get("scoring_s") is not None:
            before.append(f"scoring {r['scoring_s']:.0f}s")
        if r.get("patch_reward_train_s") is not None:
            before.append(f"patch reward model {r['patch_reward_train_s']:.0f}s")
        if r.get("manifold_fit_s") is not None:
            before.append(f"manifold fit {r['manifold_fit_s']:.0f}s")
        if r.get("embeddings_train_s") is not None:
            before.append(f"embeddings {r['embeddings_train_s']:.0f}s + OT map {r['ot_map_train_s']:.0f}s")
        rows.append({"model": name, "method": r["method"], "labels": "" if r["labels"] is None else str(r["labels"]),
                     "before": ", ".join(before) or "none",
                     "step": sec(r.get("train_seconds_per_step"), ".3f"),
                     "step_ratio": sec(r.get("step_ratio_vs_control"), ".2f"),
                     "clip": sec(r.get("sample_seconds_per_clip"), ".3f"),
                     "clip_ratio": sec(r.get("sample_ratio_vs_base"), ".2f"),
                     "drawn": "" if r.get("samples_drawn") is None else
                     f"{r['samples_drawn']} ({sec(r.get('run_s'), '.0f')}s)"})
    return report.markdown_table(rows, [
        ("model", "model", None), ("method", "method", None), ("labels", "labels used", None),
        ("before", "built before the run (wall time)", None), ("step", "s / training step", None),
        ("step_ratio", "x control", None), ("clip", "s / sampled clip", None), ("clip_ratio", "x base", None),
        ("drawn", "samples drawn (run time)", None)])


# ------------------------------------------------------------------------------------------ the stage

def run(config: ml_collections.ConfigDict, paths) -> dict:

    cfg = config.evaluate
    t0 = time.time()
    attrs = workdir.ATTRIBUTE_FIELDS
    builder = workdir.builder(config, paths)
    mean, std = workdir.latent_stats(paths)
    vae = train_vae.load(paths.vae)
    n = cfg.num_prompts
    seeds = tuple(config.seeds)
    names = ("base",) + workdir.variant_names(config)

    real_test, test_labels, test_index = load_real(builder, "test", n, attrs)
    real_lat, idx = load_test_latents(paths.test_cache, n, mean, std)
    if not np.array_equal(idx, test_index):
        raise ValueError(f"the test cache {paths.test_cache!r} does not hold the test split's clips in source order; "
                         "cannot pair prompts with real clips (rebuild it: remove latents/ and stages/cache.DONE)")
    real_vae = decode_latents(vae, real_lat, mean, std)
    classifier = clf_lib.load_classifier(paths.classifier)
    real_train, _, _ = load_real(builder, "train", config.benchmark.train_size, attrs)
    feats_train = np.asarray(clf_lib.features(classifier, real_train), np.float64)
    manifold, mcfg, extra = manifold_io.load_manifold(os.path.join(paths.manifold, "manifold"))
    target = extra.get("shell_band_target")
    real_spectrum = mean_spectrum(real_test)

    videos = {m: [] for m in names}
    scores = {m: [] for m in names}
    dists = {m: [] for m in names}
    for seed in seeds:
        for m in names:
            path = os.path.join(paths.samples(m, seed), "samples", "latents.npy")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no sampled latents for {m!r} seed {seed} at {path}; run the sample stage")
            lat = np.load(path)
            if len(lat) != n:
                raise ValueError(f"{path} holds {len(lat)} samples, evaluate.num_prompts is {n}")
            v = decode_latents(vae, lat, mean, std)
            videos[m].append(v)
            scores[m].append(score_clips(v, test_labels, classifier))
            dists[m].append(manifold_distances(manifold, mcfg, lat, DISTANCE_KINDS, target))
    print(f"evaluate: decoded and scored {len(names)} models x {len(seeds)} seed(s) x {n} prompts "
          f"({time.time() - t0:.0f}s)", flush=True)

    results = {"num_prompts": n, "seeds": list(seeds), "references": {}, "models": {},
               "interval_method": None, "checkpoint_rule": dict(config.validation)}
    for ref, v, lat in (("real", real_test, real_lat), ("real_vae", real_vae, None)):
        s = score_clips(v, test_labels, classifier)
        d = [manifold_distances(manifold, mcfg, lat, DISTANCE_KINDS, target)] if lat is not None else [{}]
        results["references"][ref] = model_intervals(model_arrays([s], None, [v], None, d), real_spectrum,
                                                     feats_train, cfg)
    results["references"]["real"].pop("spectrum_distance")     # the reference itself: 0 by definition
    for m in names:
        base = None if m == "base" else scores["base"]
        a = model_arrays(scores[m], base, videos[m], None if m == "base" else videos["base"], dists[m])
        results["models"][m] = model_intervals(a, real_spectrum, feats_train, cfg)
    results["interval_method"] = (f"{results['models']['base']['attribute_accuracy']['method']} with "
                                  f"{cfg.n_boot} resamples, {cfg.level:.0%} intervals; the Frechet distance: "
                                  "leave-one-prompt-out jackknife (a resample's repeated clips bias it)")

    runs, picks = {}, {}
    for m in names[1:]:
        runs[m], picks[m] = {}, {}
        for seed in seeds:
            d = paths.variant(m, seed)
            runs[m][seed] = workdir.read_trajectory(d)
            picks[m][seed] = json.load(open(os.path.join(d, workdir.PICK_JSON)))
        results["models"][m]["picked"] = {str(s): {k: p[k] for k in ("step", "collapse_step", "reason")}
                                          for s, p in picks[m].items()}
    results["claim"] = claim_checks(results, config)
    results["verdict"] = verdict(results, config)
    results["diagnostics"] = diagnostics(results, config)
    results["costs"] = costs(config, paths, names[1:], seeds)
    pre = va.prerequisite_costs(paths)
    if pre:
        results["videoalign"] = pre
    results["vae_reconstruction"] = {k: v for k, v in json.load(open(os.path.join(
        paths.vae, train_vae.RECONSTRUCTION_JSON))).items() if k not in ("latents_mean", "latents_std")}
    results["classifier_real_test_accuracy"] = json.load(open(os.path.join(paths.classifier,
                                                                           "real_test_accuracy.json")))
    root = paths.root
    with open(os.path.join(root, RESULTS_JSON), "w") as f:
        json.dump(results, f, indent=1)

    # pictures (the first seed's samples)
    k = min(cfg.montage_prompts, n)
    rows = {"real": real_test[:k], "real_vae": real_vae[:k], **{m: videos[m][0][:k] for m in names}}
    report.montage_png(os.path.join(root, "montage.png"), rows,
                       title=f"test prompts: real, VAE reconstruction, base, variants at their picked checkpoints "
                             f"(seed {seeds[0]})")
    c = min(cfg.comparison_prompts, n)
    if cfg.comparison_video:
        report.comparison_video(os.path.join(root, "comparison"), {m: videos[m][0][:c] for m in names}, fps=cfg.fps)
    base_acc = float(np.mean([r[0]["attribute_accuracy"] for by in runs.values() for r in by.values()]))
    report.trajectories_png(os.path.join(root, "trajectories.png"), runs, TRAJECTORY_METRICS,
                            picks={m: {s: p["step"] for s, p in by.items()} for m, by in picks.items()},
                            references={"laplacian_ratio": 1.0, "hf_ratio": 1.0,
                                        "attribute_accuracy": base_acc - config.validation.max_accuracy_drop},
                            title="validation during fine-tuning (star: the picked checkpoint)")
    curves = {m: os.path.join(paths.variant(m, seeds[0]), "metrics.jsonl") for m in names[1:]}
    report.training_curves_png(os.path.join(root, "training_curves.png"),
                               {m: p for m, p in curves.items() if os.path.exists(p)},
                               ["loss", "reward", "grad_norm"], title=f"reward fine-tuning (seed {seeds[0]})")
    base_curve = os.path.join(paths.base, "metrics.jsonl")
    if os.path.exists(base_curve):
        report.training_curves_png(os.path.join(root, "base_training_curve.png"), {"base": base_curve}, ["loss"],
                                   title="base DiT (flow matching)")
    for kind in DISTANCE_KINDS:
        report.histograms_png(os.path.join(root, f"distance_{kind}.png"),
                              {"real": manifold_distances(manifold, mcfg, real_lat, (kind,), target)[kind],
                               **{m: dists[m][0][kind] for m in names}},
                              xlabel=f"{kind} distance per clip", title=f"manifold distance ({kind})")
    spectra = {"real": real_spectrum, "real_vae": mean_spectrum(real_vae),
               **{m: scores[m][0]["spectra"].mean(0) for m in names}}
    freqs = np.arange(len(real_spectrum)) / min(real_test.shape[2:4])
    report.spectra_png(os.path.join(root, "spectra.png"), spectra, freqs)
    write_report(os.path.join(root, REPORT_MD), results, config, runs, picks)
    print(f"evaluate: done in {time.time() - t0:.0f}s -> {os.path.join(root, REPORT_MD)}", flush=True)
    return results


def detail_window(rows: list[dict], base_accuracy: float, max_accuracy_drop: float) -> int:
    """The last step of the run of evaluations, from the first on, whose validation Laplacian ratio is above 1
    with the accuracy within ``max_accuracy_drop`` of the base's (0: none): how long a reward keeps its gain."""
    last = 0
    for r in rows:
        if r["step"] == 0:
            continue
        if r["laplacian_ratio"] > 1.0 and r["attribute_accuracy"] >= base_accuracy - max_accuracy_drop:
            last = r["step"]
        else:
            break
    return last


def _iv(x, fmt=".3f"):
    return None if x is None else iv.format_interval(x, fmt)


def write_report(path: str, results: dict, config, runs: dict, picks: dict) -> str:
    seeds = results["seeds"]
    rows = []
    for name, r in {**results["references"], **results["models"]}.items():
        rows.append({"model": name, **{k: _iv(r.get(k)) for k in ("laplacian_ratio", "hf_ratio",
                                                                  "spectrum_distance", "attribute_accuracy",
                                                                  "accuracy_change")},
                     "change": _iv(r.get("content_change"), ".4f"), "frechet": _iv(r.get("frechet_distance"), ".1f"),
                     "shell_norm": _iv(r["manifold_distance"].get("shell_norm")),
                     "picked": ", ".join(str(p["step"]) for p in r["picked"].values()) if "picked" in r else None})
    cols = [("model", "model", None), ("picked", "picked step", None), ("laplacian_ratio", "Laplacian ratio", None),
            ("hf_ratio", "hf ratio", None), ("change", "change", None),
            ("spectrum_distance", "spectrum dist.", None), ("frechet", "Frechet", None),
            ("shell_norm", "shell_norm dist.", None), ("attribute_accuracy", "attr. acc.", None),
            ("accuracy_change", "acc. change", None)]
    attrs = list(results["models"]["base"]["accuracy"])
    acc_rows = [{"model": name, **{a: _iv(r["accuracy"][a], ".2f") for a in attrs}}
                for name, r in {**results["references"], **results["models"]}.items()]
    claim = report.markdown_table(results["claim"], [
        ("model", "model", None), ("claim", "claim", None), ("value", "value", ".3f"),
        ("lo", "95% lo", ".3f"), ("hi", "95% hi", ".3f"), ("null", "null", ".2f"),
        ("holds", "holds", lambda h: "yes" if h else "**no**")])
    traj_rows = []
    drop = config.validation.max_accuracy_drop
    for name, by_seed in picks.items():
        for seed, p in by_seed.items():
            rows_ = runs[name][seed]
            traj_rows.append({"model": name, "seed": seed, "picked": p["step"], "collapse": p["collapse_step"],
                              "window": detail_window(rows_, rows_[0]["attribute_accuracy"], drop),
                              "steps": rows_[-1]["step"], "reason": p["reason"],
                              "val_lap": p["validation"]["laplacian_ratio"],
                              "val_acc": p["validation"]["attribute_accuracy"]})
    v = results["vae_reconstruction"]
    vcfg = config.validation
    setup = (
        f"{results['num_prompts']} test prompts x {len(seeds)} seed(s) {seeds} of fine-tuning and sampling; per seed "
        f"the same noise for every model. Sampler: {config.sample.sampler.solver} x {config.sample.sampler.steps} "
        f"steps, shift {config.sample.sampler.shift}, guidance {config.sample.sampler.guidance_scale}. Variants: "
        + "; ".join(f"`{n}` ({config.variants[n].label})" for n in workdir.variant_names(config))
        + f". Fine-tuning: {config.reward.train.steps} steps, batch {config.reward.data.batch_size}, AdamW lr "
          f"{config.reward.optim.learning_rate:g}, weight decay {config.reward.optim.weight_decay:g}.\n\n"
        f"**Checkpoint rule (fixed before the runs, validation only):** every {vcfg.every} steps the model samples "
        f"{vcfg.prompts} validation prompts (a split disjoint from the test prompts); a run has collapsed at the first "
        f"of {vcfg.patience} consecutive evaluations whose attribute accuracy is more than {vcfg.max_accuracy_drop} "
        f"below the base's; the picked checkpoint is the `{vcfg.rule}` one"
        + (f" (highest validation {vcfg.score} before the collapse)" if vcfg.rule == "peak" else "")
        + "".join(f"; `{n}` is judged by its own rule, `{config.variants[n].rule}`" for n in workdir.variant_names(config)
                  if config.variants[n].rule) + ".\n\n"
        f"**Intervals:** {results['interval_method']}. A claim holds only when its whole interval excludes the null.\n\n"
        f"VAE on {v.get('clips', 0)} held-out clips: PSNR {v.get('psnr_db', float('nan')):.2f} dB, Laplacian ratio "
        f"{v.get('laplacian_ratio', float('nan')):.3f}. Classifier on the real test clips: accuracy "
        f"{results['classifier_real_test_accuracy']['mean']:.3f}.")
    sections = [
        ("Verdict", "\n".join(f"- {line}" for line in results["verdict"])),
        ("Setup", setup),
        ("Metrics (value [95% interval])", report.markdown_table(rows, cols)),
        ("Attribute accuracy per attribute", report.markdown_table(acc_rows, [("model", "model", None)]
                                                                   + [(a, a, None) for a in attrs])),
        ("The claim, item by item", claim),
        ("Cost of each row", cost_table(results["costs"]) + "\n\n" + cost_notes(results, config)),
        ("Trajectories and picked checkpoints",
         "![trajectories](trajectories.png)\n\n" + report.markdown_table(traj_rows, [
             ("model", "model", None), ("seed", "seed", None), ("steps", "steps run", None),
             ("picked", "picked step", None), ("collapse", "collapse step", None),
             ("window", "detail window", None), ("val_lap", "val. Laplacian ratio", ".3f"),
             ("val_acc", "val. accuracy", ".3f"), ("reason", "why", None)])
         + "\n\n*Detail window*: the last step of the unbroken run of evaluations, from the first, with a validation "
           "Laplacian ratio above 1 and the accuracy kept (0: the reward never added detail); how long a reward can "
           "be used before it has to be stopped."),
        ("Reading the numbers", "\n".join(f"- {n}" for n in results.get("diagnostics", []))
         or "- No warnings: the base draws the prompts and no picked checkpoint lost them."),
        ("Pictures", "![montage](montage.png)\n\n![spectra](spectra.png)\n\n![training](training_curves.png)\n\n"
                     + "\n\n".join(f"![{k}](distance_{k}.png)" for k in DISTANCE_KINDS)
                     + ("\n\nSide by side: `comparison.mp4`, `comparison.gif`." if config.evaluate.comparison_video
                        else "")),
    ]
    return report.write_report(path, sections, title="Embedded benchmark: Shell-LCC reward fine-tuning")
