#!/usr/bin/env python
"""GRPO on the Wan2.1-1.3B architecture at reduced clip size: a smoke run with its costs.

Each stage is ``python -m experiments.main --config=configs/wan21_grpo.py:smoke`` (the 1.3B preset's runtime,
LoRA r 32, Flow-GRPO's SDE with 10 steps) at 17 x 240 x 416 (latents 5 x 30 x 52 x 16, ``--latent-shape``),
umT5-sized random prompts (``--text-len`` x 4096), seeded random weights (no Wan checkpoint on the machine),
``--prompts`` prompts x ``--group`` samples per step for ``--steps`` steps:

* ``flow_grpo``      Flow-GRPO, reward: the Shell-LCC distance (shell_norm) to a seeded random manifold of
                     the final latent, KL 0.04 to the zero-adapter reference;
* ``dance_grpo``     DanceGRPO: no KL, best half of each group, 60% of the steps;
* ``reward_model``   Flow-GRPO with the random stand-in latent reward model (the first block of the DiT).

Measured per stage: wall time, the first step's compile + run seconds, the median step time after it, the
GPU's peak memory (``nvidia-smi`` polled with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``; None without a GPU),
the samples drawn (rollouts) and the reward's first and last logged means. A random model's rewards mean
nothing about quality: this checks that GRPO runs at the architecture's size and what one step costs. One
record per stage in ``results.jsonl`` (``--out-jsonl``), the table in ``OUT_DIR/grpo_smoke.log``.

    python benchmarks/grpo_smoke.py --out-dir $OUT/grpo_smoke                                # one GPU
    python benchmarks/grpo_smoke.py --out-dir /tmp/gs --tiny --out-jsonl /tmp/gs.jsonl       # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import harness
from videoalign_smoke import TINY, GpuPeak, device_name, log_times, metrics_of

CONFIG = "configs/wan21_grpo.py:smoke"
TINY_TEXT_DIM = 64                     # TINY's text_dim


def grpo_metrics(workdir: str) -> dict:
    """Samples drawn and the reward's first and last logged means (``metrics.jsonl``)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(x) for x in open(path) if x.strip()]
    rows = [r for r in rows if "reward_mean" in r]
    if not rows:
        return {}
    return {"samples_drawn": int(rows[-1]["samples_drawn"]), "reward_first_last": [rows[0]["reward_mean"],
                                                                                     rows[-1]["reward_mean"]],
            "kl_last": rows[-1]["kl"], "clip_fraction_mean": sum(r["clip_fraction"] for r in rows) / len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_output_args(p)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[5, 30, 52, 16])
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per stage")
    p.add_argument("--sampler-steps", type=int, default=10, help="SDE steps of a rollout")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    p.add_argument("--tiny", action="store_true", help="a 2-layer DiT of width 64 and small latents (CPU check)")
    p.add_argument("--stages", default="flow_grpo,dance_grpo,reward_model")
    args = p.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir or "grpo_smoke")
    bench = harness.Bench("grpo_smoke", args.out_jsonl, out_dir)
    lat = (2, 8, 8, 16) if args.tiny else tuple(args.latent_shape)
    text = (args.text_len, TINY_TEXT_DIM if args.tiny else 4096)
    model = "tiny DiT" if args.tiny else "Wan2.1-1.3B architecture, random weights"
    bench.log(f"grpo_smoke: latents {lat}, text {text}, {model}; {args.prompts} prompts x {args.group} samples, "
              f"{args.sampler_steps} SDE steps, {args.steps} steps; device {device_name()}")
    common = [f"--config.data.random_latent_shape=({','.join(map(str, lat))})",
              f"--config.data.random_text_shape=({text[0]},{text[1]})",
              f"--config.grpo.prompts_per_step={args.prompts}", f"--config.grpo.group_size={args.group}",
              f"--config.grpo.sampling_steps={args.sampler_steps}", f"--config.train.steps={args.steps}",
              "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
              "--config.train.async_checkpoints=False", "--config.mesh.devices=1"]
    half = max(2, args.group // 2)
    stages = {
        "flow_grpo": [],
        "dance_grpo": ["--config.grpo.mode=dance_grpo", "--config.grpo.kl_weight=0.0",
                       f"--config.grpo.best_of_n={half}", "--config.grpo.timestep_fraction=0.6",
                       f"--config.grpo.updates_per_rollout={1 if (args.prompts * half) % 2 else 2}"],
        "reward_model": ["--config.reward.source=reward_model", "--config.reward.reward_model=random"],
    }
    rows = []
    for name in args.stages.split(","):
        workdir = os.path.join(out_dir, name)
        shutil.rmtree(workdir, ignore_errors=True)
        cmd = [sys.executable, "-m", "experiments.main", f"--config={CONFIG}", f"--workdir={workdir}", *common,
               *stages[name], *(TINY if args.tiny else [])]
        t0 = time.time()
        with GpuPeak() as peak:
            run = harness.run(cmd, timeout=args.timeout, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                              log=os.path.join(out_dir, f"{name}.log"), expects_result=False)
        row = {"stage": name, "config": CONFIG, "rc": run.rc, "wall_s": round(time.time() - t0, 1),
               "gpu_peak_gb": None if peak.peak is None else round(peak.peak, 2), **metrics_of(workdir),
               **log_times(run.output), **grpo_metrics(workdir),
               "samples_per_step": args.prompts * args.group}
        if run.error:
            bench.failed(name, run)
        rows.append(row)
        bench.log(f"{name}: " + json.dumps(row))
        bench.record(device=device_name(), latent_shape=list(lat), text=list(text), tiny=args.tiny, steps=args.steps,
                     prompts=args.prompts, group=args.group, sampler_steps=args.sampler_steps, **row)
    bench.log("")
    bench.table([("stage", "stage", ""), ("rc", "rc", ""), ("wall s", "wall_s", ".1f"),
                 ("first step s", "first_step_s", ".1f"), ("step ms", "step_ms", ".1f"),
                 ("samples", "samples_drawn", ""), ("GPU GiB", "gpu_peak_gb", ".2f")], rows)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
