"""The embedded pipeline's evaluation stage: every metric of every variant, plots, montages, report.

Inputs (all from the pipeline's workdir): the test clips (real pixels and their cached latents, with
attribute labels), the VAE, the manifold, and each model's sampled latents for the first
``num_prompts`` test prompts (the same prompts and noise for every model).

Metrics (``shelllcc.evaluation``):

* detail, per model against the base on the same prompts: Laplacian-variance ratio
  ``mean_i lapvar(x_i) / mean_i lapvar(base_i)``, high-frequency energy ratio (luma energy above 1/4
  Nyquist, likewise; the share of energy above it is reported too, as ``hf_fraction``), content change
  ``mean |x - base|`` (pixels in [0, 1]);
* distribution, against real test clips: radially averaged power-spectrum distance
  ``mean_r |log10 P(r) - log10 P_real(r)|``; manifold distances (``lcc`` and ``shell``) per clip in the
  DiT's normalised latent space; Frechet distance on the features of a video classifier trained on
  the real training clips;
* text alignment: accuracy of that classifier's attribute heads on generated clips, against the
  attributes named in their prompts.

Reference rows: ``real`` (the test clips) and ``real_vae`` (the same clips through the VAE: the
detail any generator here can reach at best).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from shelllcc.evaluation import detail

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
SHELL_KINDS = ("shell_norm", "shell", "shell_band")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_prompts=64,              # test prompts sampled from every model (the first N of the test split)
        classifier=dict(steps=300, batch_size=32, learning_rate=2e-3, seed=0),
        distance_kinds=("lcc", "shell"),
        montage_prompts=6,
        comparison_prompts=4,
        fps=8,
        zoom=4,
        # the claim's margins: a detail ratio counts as raised above 1 + eps, lowered below 1 - eps;
        # attribute accuracy counts as kept within max_accuracy_drop of the base's
        ratio_eps=0.02,
        max_accuracy_drop=0.05,
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
    from shelllcc.data.latent_cache import open_cache
    cache = open_cache(cache_dir, latent_dtype=np.float32)
    recs = [cache[i] for i in range(min(n, len(cache)))]
    lat = np.stack([r["latents"] for r in recs]).astype(np.float32)
    lat = (lat - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return lat, np.asarray([int(r["index"]) for r in recs])


def decode_latents(vae, latents: np.ndarray, mean, std, batch_size: int = 16) -> np.ndarray:
    """Normalised latents -> uint8 videos, decoded losslessly on the host's default device."""
    from flax import nnx
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


# ------------------------------------------------------------------------------------------ metrics

def per_clip_detail(videos: np.ndarray) -> dict[str, np.ndarray]:
    return {"laplacian_variance": np.asarray(detail.laplacian_variance(videos), np.float64),
            "hf_energy": np.asarray(detail.high_frequency_energy(videos), np.float64),
            "hf_fraction": np.asarray(detail.high_frequency_fraction(videos), np.float64)}


def mean_spectrum(videos: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.mean(detail.radial_power_spectrum(videos), axis=0), np.float64)


def manifold_distances(manifold, mcfg, latents: np.ndarray, kinds, target) -> dict[str, np.ndarray]:
    from shelllcc.rewards.manifold_distance import manifold_distance
    out = {}
    for kind in kinds:
        fn = jax.jit(lambda z, kind=kind: manifold_distance(
            manifold, z, kind, target if kind == "shell_band" else None, patch_size=mcfg.patch_size,
            per_example=True, bn_eps=mcfg.bn_eps, shell_eps=mcfg.shell_eps))
        out[kind] = np.concatenate([np.asarray(fn(latents[i:i + 32])) for i in range(0, len(latents), 32)])
    return out


def claim_checks(results: dict, cfg) -> list[dict]:
    """The issue's claim, item by item, from ``results['models']`` (each a dict of metrics)."""
    m = results["models"]
    base = m["base"]
    eps = cfg.ratio_eps
    checks = []

    def add(what, model, holds, value):
        checks.append({"claim": what, "model": model, "holds": bool(holds), "value": value})

    for name in m:
        if name in SHELL_KINDS:
            r = m[name]
            add("raises high-frequency detail (hf ratio > 1)", name, r["hf_ratio"] > 1 + eps, r["hf_ratio"])
            add("raises Laplacian variance (ratio > 1)", name, r["laplacian_ratio"] > 1 + eps, r["laplacian_ratio"])
            add("moves the power spectrum toward real (distance below the base's)", name,
                r["spectrum_distance"] < base["spectrum_distance"], r["spectrum_distance"])
            add("keeps attribute accuracy (drop <= max_accuracy_drop)", name,
                r["attribute_accuracy"]["mean"] >= base["attribute_accuracy"]["mean"] - cfg.max_accuracy_drop,
                r["attribute_accuracy"]["mean"])
        if name == "lcc":
            r = m[name]
            add("lcc lowers high-frequency detail (hf ratio < 1)", name, r["hf_ratio"] < 1 - eps, r["hf_ratio"])
            add("lcc lowers Laplacian variance (ratio < 1)", name, r["laplacian_ratio"] < 1 - eps, r["laplacian_ratio"])
    return checks


def chance_accuracy(attributes) -> float:
    """Mean over ``attributes`` of ``1 / classes``: the attribute accuracy of guessing."""
    from shelllcc.data import moving_textures as mt
    return float(np.mean([1.0 / len(mt.ATTRIBUTES[a]) for a in attributes]))


def diagnostics(results: dict, cfg) -> list[str]:
    """Plain-language warnings about what the numbers can and cannot show (written into the report)."""
    m = results["models"]
    base = m["base"]
    attrs = [a for a in base["attribute_accuracy"] if a != "mean"]
    chance = chance_accuracy(attrs)
    notes = []
    b_acc = base["attribute_accuracy"]["mean"]
    if b_acc < chance + 0.1:
        notes.append(f"The base model's attribute accuracy ({b_acc:.3f}) is at chance ({chance:.3f}): it has not learned "
                     "to draw the prompts, so the detail ratios compare noise with noise and cannot test the claim. "
                     "Train the base longer (`configs/demo.py:long`).")
    control = m.get("control", {}).get("content_change", 0.0)
    for name, r in m.items():
        if name in ("base", "control"):
            continue
        acc = r["attribute_accuracy"]["mean"]
        if acc < b_acc - cfg.max_accuracy_drop and b_acc >= chance + 0.1:
            notes.append(f"`{name}` lost the prompts' content (attribute accuracy {acc:.3f} against the base's {b_acc:.3f}, "
                         f"content change {r['content_change']:.3f}, control {control:.3f}): the generator lowered the "
                         f"distance by collapsing its samples (reward hacking), so its detail ratios do not measure "
                         "restored texture.")
    return notes


# ------------------------------------------------------------------------------------------ the stage

def run(config: ml_collections.ConfigDict, paths) -> dict:
    from experiments import embedded_pipeline as pipeline
    from experiments import train_vae
    from shelllcc.data import embedded_benchmark
    from shelllcc.evaluation import classifier as clf_lib
    from shelllcc.evaluation import frechet, report
    from shelllcc.manifold import io as manifold_io

    cfg = config.evaluate
    t0 = time.time()
    attrs = pipeline.ATTRIBUTE_FIELDS
    builder = embedded_benchmark.build(paths.data, pipeline.benchmark_config(config.benchmark), verbose=False)
    mean, std = pipeline.latent_stats(paths)
    vae = train_vae.load(paths.vae)
    n = cfg.num_prompts

    real_test, test_labels, test_index = load_real(builder, "test", config.benchmark.test_size, attrs)
    real_lat, idx = load_test_latents(paths.test_cache, config.benchmark.test_size, mean, std)
    # prompts are the cache's first records; their clips must be the source's first examples
    if not np.array_equal(idx, test_index):
        raise ValueError(f"the test cache {paths.test_cache!r} does not hold the test split's clips in source order; "
                         "cannot pair prompts with real clips (rebuild it: remove latents/ and stages/cache.DONE)")
    real_vae = decode_latents(vae, real_lat, mean, std)
    prompt_labels = {a: v[:n] for a, v in test_labels.items()}

    samples, latents = {}, {}
    for name, _ in pipeline.model_dirs(config, paths).items():
        path = os.path.join(paths.samples(name), "samples", "latents.npy")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no sampled latents for {name!r} at {path}; run the sample stage")
        latents[name] = np.load(path)
        if len(latents[name]) != n:
            raise ValueError(f"{path} holds {len(latents[name])} samples, evaluate.num_prompts is {n}")
        samples[name] = decode_latents(vae, latents[name], mean, std)
    print(f"evaluate: decoded {len(samples)} models x {n} prompts; real test clips {real_test.shape}", flush=True)

    # the classifier (and the Frechet feature space) learn from real training clips only
    real_train, train_labels, _ = load_real(builder, "train", config.benchmark.train_size, attrs)
    ccfg = clf_lib.ClassifierConfig(steps=cfg.classifier.steps, batch_size=cfg.classifier.batch_size,
                                    learning_rate=cfg.classifier.learning_rate)
    classifier, _ = clf_lib.train_classifier(real_train, train_labels, config=ccfg, seed=cfg.classifier.seed)
    feats_train = clf_lib.features(classifier, real_train)

    manifold, mcfg, extra = manifold_io.load_manifold(os.path.join(paths.manifold, "manifold"))
    kinds = tuple(cfg.distance_kinds)
    target = extra.get("shell_band_target")
    spectra = {"real": mean_spectrum(real_test), "real_vae": mean_spectrum(real_vae)}
    distances = {"real": manifold_distances(manifold, mcfg, real_lat, kinds, target)}

    def describe(videos, labels, reference=None):
        d = per_clip_detail(videos)
        pred = clf_lib.predict(classifier, videos)
        out = {
            "laplacian_variance": float(d["laplacian_variance"].mean()),
            "hf_energy": float(d["hf_energy"].mean()),
            "hf_fraction": float(d["hf_fraction"].mean()),
            "spectrum_distance": float(np.mean(np.abs(np.log10(np.maximum(mean_spectrum(videos), 1e-20))
                                                      - np.log10(np.maximum(spectra["real"], 1e-20))))),
            "frechet_distance": float(frechet.frechet_distance_from_features(
                clf_lib.features(classifier, videos), feats_train)),
            "attribute_accuracy": clf_lib.accuracy(pred, labels),
        }
        if reference is not None:
            out["laplacian_ratio"] = out["laplacian_variance"] / max(reference["laplacian_variance"], 1e-20)
            out["hf_ratio"] = out["hf_energy"] / max(reference["hf_energy"], 1e-20)
        return out

    results = {"num_prompts": n, "references": {}, "models": {}}
    results["references"]["real"] = describe(real_test[:n], prompt_labels)
    results["references"]["real_vae"] = describe(real_vae[:n], prompt_labels)
    base = describe(samples["base"], prompt_labels)
    base.update(laplacian_ratio=1.0, hf_ratio=1.0)
    for name, videos in samples.items():
        r = base if name == "base" else describe(videos, prompt_labels, base)
        r["content_change"] = float(np.mean(np.abs(videos.astype(np.float64) - samples["base"]) / 255.0))
        dist = manifold_distances(manifold, mcfg, latents[name], kinds, target)
        distances[name] = dist
        r["manifold_distance"] = {k: float(v.mean()) for k, v in dist.items()}
        spectra[name] = mean_spectrum(videos)
        results["models"][name] = r
    for ref in ("real",):
        results["references"][ref]["manifold_distance"] = {k: float(v[:n].mean()) for k, v in distances[ref].items()}
    results["claim"] = claim_checks(results, cfg)
    results["diagnostics"] = diagnostics(results, cfg)
    results["vae_reconstruction"] = json.load(open(os.path.join(paths.vae, train_vae.RECONSTRUCTION_JSON)))
    results["vae_reconstruction"].pop("latents_mean", None)
    results["vae_reconstruction"].pop("latents_std", None)

    root = paths.root
    with open(os.path.join(root, RESULTS_JSON), "w") as f:
        json.dump(results, f, indent=1)

    # pictures
    k = min(cfg.montage_prompts, n)
    rows = {"real": real_test[:k], "real_vae": real_vae[:k], **{name: v[:k] for name, v in samples.items()}}
    report.montage_png(os.path.join(root, "montage.png"), rows, title="test prompts: real, VAE reconstruction, base, variants")
    c = min(cfg.comparison_prompts, n)
    report.comparison_video(os.path.join(root, "comparison"), {name: v[:c] for name, v in samples.items()},
                            fps=cfg.fps)
    runs = {name: os.path.join(paths.variant(name), "metrics.jsonl") for name in config.variants}
    report.training_curves_png(os.path.join(root, "training_curves.png"), runs, title="reward fine-tuning")
    report.training_curves_png(os.path.join(root, "base_training_curve.png"),
                               {"base": os.path.join(paths.base, "metrics.jsonl")}, ["loss"], title="base DiT (flow matching)")
    for kind in kinds:
        report.histograms_png(os.path.join(root, f"distance_{kind}.png"),
                              {name: d[kind] for name, d in distances.items()},
                              xlabel=f"{kind} distance per clip", title=f"manifold distance ({kind})")
    freqs = np.arange(len(spectra["real"])) / min(real_test.shape[2:4])
    report.spectra_png(os.path.join(root, "spectra.png"), spectra, freqs)
    write_report(os.path.join(root, REPORT_MD), results, config)
    print(f"evaluate: done in {time.time() - t0:.0f}s -> {os.path.join(root, REPORT_MD)}", flush=True)
    return results


def write_report(path: str, results: dict, config) -> str:
    from shelllcc.evaluation import report
    rows = []
    for name, r in {**results["references"], **results["models"]}.items():
        acc = r["attribute_accuracy"]
        rows.append({"model": name, **{k: r.get(k) for k in ("laplacian_ratio", "hf_ratio", "content_change",
                                                              "spectrum_distance", "frechet_distance")},
                     "lcc": r.get("manifold_distance", {}).get("lcc"),
                     "shell": r.get("manifold_distance", {}).get("shell"),
                     "acc": acc["mean"], **{f"acc_{a}": acc.get(a) for a in ("shape", "colour", "texture", "direction")}})
    cols = [("model", "model", None), ("laplacian_ratio", "Laplacian ratio", ".3f"), ("hf_ratio", "hf ratio", ".3f"),
            ("content_change", "change", ".4f"), ("spectrum_distance", "spectrum dist.", ".3f"),
            ("frechet_distance", "Frechet", ".2f"), ("lcc", "lcc", ".3f"), ("shell", "shell", ".3f"),
            ("acc", "attr. acc.", ".3f"), ("acc_shape", "shape", ".2f"), ("acc_colour", "colour", ".2f"),
            ("acc_texture", "texture", ".2f"), ("acc_direction", "direction", ".2f")]
    table = report.markdown_table(rows, cols)
    claim = report.markdown_table(results["claim"], [("model", "model", None), ("claim", "claim", None),
                                                     ("value", "value", ".3f"),
                                                     ("holds", "holds", lambda h: "yes" if h else "**no**")])
    v = results["vae_reconstruction"]
    vae = (f"VAE on {v.get('clips', 0)} held-out clips: L1 {v.get('l1', float('nan')):.4f}, PSNR "
           f"{v.get('psnr_db', float('nan')):.2f} dB, Laplacian ratio {v.get('laplacian_ratio', float('nan')):.3f}, "
           f"hf ratio {v.get('hf_ratio', float('nan')):.3f} (reconstruction over real).")
    sections = [
        ("Setup", f"{results['num_prompts']} test prompts, the same noise for every model. Ratios and content "
                  f"change are against the base model's clips for the same prompts; `real` is the test clips, "
                  f"`real_vae` the same clips through the VAE. Variants: {', '.join(config.variants)}.\n\n{vae}"),
        ("Metrics", table),
        ("The claim, item by item", claim),
        ("Reading the numbers", "\n".join(f"- {n}" for n in results.get("diagnostics", []))
         or "- No warnings: the base draws the prompts and no variant lost them."),
        ("Pictures", "![montage](montage.png)\n\n![spectra](spectra.png)\n\n![training](training_curves.png)\n\n"
                     + "\n\n".join(f"![{k}](distance_{k}.png)" for k in config.evaluate.distance_kinds)
                     + "\n\nSide by side: `comparison.mp4`, `comparison.gif`."),
    ]
    return report.write_report(path, sections, title="Embedded benchmark: Shell-LCC reward fine-tuning")
