"""Compile time of the Wan2.1 ``reward_finetune`` training step on the CPU, blocks scanned or not (issue 14).

    python benchmarks/compile_bench.py --models 1.3b            # scan_layers on and off
    python benchmarks/compile_bench.py --models 1.3b,14b --stop lower

Builds the step of ``configs/wan21_reward.py:{1.3b,14b}-lora`` abstractly, as ``dit_setup.run_training``
does (DiT from ``nnx.eval_shape``, LoRA split, shardings, the reward of a random manifold of the
``wan21_manifold`` size, ``make_train_step`` + ``jit_train_step``) on a 1-device mesh, with batch 1 and small
latents (default 21 x 30 x 52, a 120 x 208 clip of 81 frames; text 512 x 4096), and times
``jitted.trace(...)``, ``.lower()`` and ``.compile()`` for the host CPU, wall-clock and CPU seconds of the
process (``*_cpu_s``, all threads; the steadier figure on a shared machine). Nothing of the model is allocated.
Two settings differ from the GPU recipe: attention is ``xla`` (cuDNN cannot be traced without cuDNN) and,
with it, the recipe's remat policy for cuDNN saves nothing more than full remat.

Each measurement runs in a fresh subprocess (no compilation cache, peak memory of its own). One record per
run is appended to ``benchmarks/results.jsonl`` (``--no-record``: print only). On a checkout without
``WanTransformerConfig.scan_layers`` (before issue 14) the only variant is the per-block loop, ``off``.
``--stop lower`` skips ``.compile()`` (for a model whose compilation does not fit the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results.jsonl")
MODELS = {"1.3b": "1.3b-lora", "14b": "14b-lora"}


def _has_scan_layers() -> bool:
    from shelllcc.models.wan_transformer import WanTransformerConfig
    return "scan_layers" in {f.name for f in dataclasses.fields(WanTransformerConfig)}


def _config(model: str, scan: str, latent, text):
    from configs import wan21_pipeline, wan21_reward
    c = wan21_reward.get_config(MODELS[model])
    man = wan21_pipeline.manifold_config()
    c.model.attention_impl = "xla"                 # cuDNN attention cannot be traced on a CPU
    if scan != "-":
        c.model.scan_layers = scan == "on"
    c.mesh.devices = 1
    c.data.batch_size, c.train.microbatch_size = 1, 0
    c.data.source, c.data.random_latent_shape, c.data.random_text_shape = "random", tuple(latent), tuple(text)
    c.reward.manifold = "random"
    c.reward.random.num_anchors, c.reward.random.hidden_dim = man.manifold.num_anchors, man.manifold.hidden_dim
    c.reward.random.patch_size = tuple(man.manifold.patch_size)
    return c


def measure(model: str, scan: str, latent, text, stop: str) -> dict:
    """Build, trace, lower and (unless ``stop == 'lower'``) compile one step; seconds per stage."""
    import jax

    from experiments import dit_setup, reward_finetune
    from shelllcc import parallel

    t = {}
    t0 = time.perf_counter()
    c = _config(model, scan, latent, text)
    # the run's own step, from eval_shape (dit_setup.abstract_step); a "before" measurement of a commit
    # older than it takes this script from commit d5b1e07, which built the step by hand
    built = dit_setup.abstract_step(c, reward_finetune.make_loss(c), jax.devices()[:1], tuple(latent), tuple(text))
    step, state, batch, rng, mesh, cfg = built.step, built.state, built.batch, built.rng, built.mesh, built.model_config
    t["build_s"] = time.perf_counter() - t0
    with parallel.set_mesh(mesh):
        t0, c0 = time.perf_counter(), time.process_time()
        traced = step.jitted.trace(state, batch, rng)
        t["trace_s"], t["trace_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = traced.lower()
        t["lower_s"], t["lower_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        if stop != "lower":
            t0, c0 = time.perf_counter(), time.process_time()
            lowered.compile()
            t["compile_s"], t["compile_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    n_frozen = built.frozen_params
    return dict(model=model, scan_layers=scan, remat_policy=cfg.remat_policy, dtype=str(cfg.dtype),
                param_dtype=str(cfg.param_dtype), attention_impl=cfg.attention_impl, lora_rank=c.lora.rank,
                frozen_params=int(n_frozen), **{k: round(v, 2) for k, v in t.items()})


def _device() -> str:
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1.3b", help="comma-separated: 1.3b, 14b")
    p.add_argument("--scan", default="on,off", help="scan_layers settings to time: on, off (both by default)")
    p.add_argument("--latent", default="21,30,52", help="latent T,H,W (16 channels)")
    p.add_argument("--text", default="512,4096", help="text context L,D")
    p.add_argument("--stop", default="compile", choices=("compile", "lower"))
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    p.add_argument("--_one", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    latent = (*map(int, args.latent.split(",")), 16)
    text = tuple(map(int, args.text.split(",")))

    if args._one:                                   # the worker: one measurement, JSON on the last line
        model, scan = args._one.split(":")
        out = measure(model, scan, latent, text, args.stop)
        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(json.dumps(out), flush=True)
        return

    sys.path.insert(0, ROOT)
    scans = [s.strip() for s in args.scan.split(",")] if _has_scan_layers() else ["-"]
    rows = []
    for model in [m.strip() for m in args.models.split(",")]:
        for scan in scans:
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", f"{model}:{scan}", "--latent", args.latent,
                   "--text", args.text, "--stop", args.stop]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
            if proc.returncode != 0:
                row = dict(model=model, scan_layers=scan, error=(proc.stderr or proc.stdout).strip()[-2000:],
                           returncode=proc.returncode)
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {"bench": "compile_bench", "date": datetime.date.today().isoformat(), "device": _device(),
              "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
              "commit": commit, "command": "python benchmarks/compile_bench.py " + " ".join(argv or sys.argv[1:]),
              "latent": list(latent), "text": list(text), "batch": 1, "rows": rows}
    if not args.no_record:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
