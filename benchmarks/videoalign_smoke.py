#!/usr/bin/env python
"""VideoAlign's methods on the Wan2.1-1.3B architecture at reduced size, end to end: a smoke run with costs.

Every stage is the experiment a user runs (``python -m experiments.main --config=configs/wan21_videoalign.py:ARG``)
with the recipe's model, LoRA and optimizer, at a reduced clip size (``--latent-shape``, default 5 x 30 x 52 x 16
= 17 frames at 240 x 416), few steps and a small batch, on seeded random weights (no Wan checkpoint on the
machine) and random data where the real data would come from the VAE:

1. ``data`` (here, numpy): a pair cache of ``--pairs`` random pairs with random labels
   (``preference_cache.encode_pairs`` with stand-in encoders) and a prompt cache of ``--prompts`` prompts;
2. ``reward_model``: ``train_reward_model`` (the first 8 blocks, LoRA r 64) on the pairs, evaluated on them;
3. ``score``: ``score_samples`` of the base with that reward model: K clips per prompt (``--sampler-steps``
   UniPC steps, CFG 5) -> the Flow-DPO pair cache and the Flow-RWR cache;
4. ``sft`` (control), ``flow_dpo``, ``flow_rwr`` on those caches, same LoRA / optimizer / batch / steps;
5. ``sample`` of the prompts: no guidance, Flow-NRG with the reward model, Shell-LCC guidance (a seeded random
   manifold of the recipe's size).

Measured per stage in the same call: wall time, the first step's compile + run time and the median step time
after it (training stages, from their ``metrics.jsonl``), the sampling time per clip after the first (which
compiles), and the GPU's peak memory
(``nvidia-smi`` polled every 0.2 s with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``; None without a GPU). The
comparisons: each method's step time against ``sft``'s, guided sampling against unguided. Numbers of a random
model mean nothing about quality: this checks that every method runs at the architecture's size and what it
costs. One record per stage in ``results.jsonl`` (``--out-jsonl``), the table in ``OUT_DIR/videoalign_smoke.log``.

    python benchmarks/videoalign_smoke.py --out-dir $OUT/va_smoke                       # one GPU
    python benchmarks/videoalign_smoke.py --out-dir /tmp/vas --tiny --out-jsonl /tmp/vas.jsonl   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import harness
import numpy as np

CONFIG = "configs/wan21_videoalign.py"
# --tiny (a CPU check of the script): a 2-layer DiT of width 64 instead of the 1.3B architecture
TINY = ["--config.model.preset=tiny", "--config.model.dim=64", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.ffn_dim=128", "--config.model.text_dim=64",
        "--config.model.freq_dim=256", "--config.model.attention_impl=", "--config.model.param_dtype=float32",
        "--config.model.dtype=float32"]


class GpuPeak:
    """The largest ``memory.used`` (GiB) of GPU 0 while a worker runs (None without nvidia-smi)."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=5).stdout.strip()
                self.peak = max(self.peak or 0.0, float(out) / 1024.0)
            except (subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def write_data(root: str, pairs: int, prompts: int, latent_shape, text_shape, seed: int = 0) -> dict:
    """The random pair cache and prompt cache (see the module doc); returns their paths."""
    from experiments import score_samples
    from shelllcc.data import preference_cache

    if pairs > 256:
        raise ValueError(f"--pairs {pairs}: at most 256 (a pair's index is stored in one uint8 pixel)")
    rng = np.random.default_rng(seed)
    lat = {i: rng.standard_normal((2, *latent_shape)).astype(np.float32) for i in range(pairs)}
    text = rng.standard_normal((pairs, *text_shape)).astype(np.float32)
    # stand-in encoders: a clip's first pixel holds (pair index, 0 for A / 1 for B), encoded to its latents
    def clip(i, which):
        return np.array([[[[i, which, 0]]]], np.uint8)

    records = [{"video_a": clip(i, 0), "video_b": clip(i, 1), "caption": f"prompt {i}",
                "labels": rng.integers(-1, 2, 3).astype(np.int32), "index": i, "source_a": "random",
                "source_b": "random"} for i in range(pairs)]

    def encode_video(videos):
        return np.stack([lat[int(v[0, 0, 0, 0])][int(v[0, 0, 0, 1])] for v in np.asarray(videos)])

    rows: list = []

    def encode_text(captions):
        idx = [int(c.split()[-1]) for c in captions]
        rows[:] = idx
        return text[idx], np.full(len(idx), text_shape[0], np.int32)

    paths = {"pairs": os.path.join(root, "pairs"), "prompts": os.path.join(root, "prompts")}
    preference_cache.encode_pairs(records, paths["pairs"], encode_video=encode_video, encode_text=encode_text,
                                  batch_size=4, shard_size=64, source_description="random pairs (smoke)",
                                  progress=False)
    score_samples.write_latent_cache(paths["prompts"], rng.standard_normal((prompts, *latent_shape)).astype(np.float32),
                                     text[:prompts], [f"prompt {i}" for i in range(prompts)], {}, "random (smoke)")
    return paths


def device_name() -> str:
    """The GPU's name (nvidia-smi), else the host's description."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"], capture_output=True,
                             text=True).stdout.strip()
        if out:
            return out
    return harness.host_device()


def metrics_of(workdir: str) -> dict:
    """From the run's ``metrics.jsonl`` (``train.log_every`` 1): the first step's compile + run message, the median
    time of the steps after it, and the first and last logged loss."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(x) for x in open(path) if x.strip()]
        rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r]    # one per step after the first
        if rates:
            out["step_ms"] = 1000.0 / float(np.median(rates))
        losses = [r["loss"] for r in rows if "loss" in r]
        if losses:
            out["loss_first_last"] = [losses[0], losses[-1]]
    return out


def log_times(output: str) -> dict:
    """From a stage's output: the first train step's compile + run seconds (``first_step_s``); for sampling, the
    first batch's seconds (compilation included) and the median seconds per batch of one clip after it."""
    out = {}
    m = re.search(r"compiled and ran the first step in ([0-9.]+)s", output)
    if m:
        out["first_step_s"] = float(m.group(1))
    batches = [float(x) for x in re.findall(r"^batch \d+/\d+: .* sampled in ([0-9.]+)s", output, re.M)]
    if batches:
        out["first_batch_s"] = batches[0]
        if len(batches) > 1:
            out["clip_s"] = float(np.median(batches[1:]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_output_args(p)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[5, 30, 52, 16])
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--clips-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="training steps per method")
    p.add_argument("--batch", type=int, default=4, help="global batch of the training stages (microbatches of 1)")
    p.add_argument("--sampler-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    p.add_argument("--tiny", action="store_true", help="a 2-layer DiT of width 64 (CPU check of the script)")
    p.add_argument("--stages", default="reward_model,score,sft,flow_dpo,flow_rwr,sample,nrg,shell")
    args = p.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir or "videoalign_smoke")
    bench = harness.Bench("videoalign_smoke", args.out_jsonl, out_dir)
    text_dim = 64 if args.tiny else 4096
    lat = tuple(args.latent_shape)
    model = "tiny DiT" if args.tiny else "Wan2.1-1.3B architecture, random weights"
    bench.log(f"videoalign_smoke: latents {lat}, text ({args.text_len}, {text_dim}), {model}; "
              f"{args.steps} steps of batch {args.batch}; device {device_name()}")
    t0 = time.time()
    data = write_data(os.path.join(out_dir, "data"), args.pairs, args.prompts, lat, (args.text_len, text_dim))
    bench.log(f"data: {args.pairs} random pairs, {args.prompts} prompts [{time.time() - t0:.0f}s]")

    w = {k: os.path.join(out_dir, k) for k in ("reward_model", "score", "sft", "flow_dpo", "flow_rwr", "sample", "nrg",
                                               "shell")}
    train = [f"--config.data.batch_size={args.batch}", "--config.train.microbatch_size=1",
             f"--config.train.steps={args.steps}", "--config.train.log_every=1",
             "--config.train.checkpoint_every=100000", "--config.train.async_checkpoints=False"]
    sampling = ["--config.prompts.source=cache", f"--config.prompts.cache_dir={data['prompts']}",
                f"--config.prompts.count={args.prompts}", f"--config.latents.shape=({','.join(map(str, lat))})",
                f"--config.sampler.steps={args.sampler_steps}", "--config.sampler.batch_size=1"]
    no_video = ["--config.output.mp4=False", "--config.output.gif=False"]
    shell = ["--config.sampler.guidance.kind=shell_lcc", "--config.sampler.guidance.manifold=random",
             "--config.sampler.guidance.manifold_kind=shell_norm"]
    stages = {
        "reward_model": ("reward_model", train + [f"--config.data.train={data['pairs']}",
                                                  f"--config.data.validation={data['pairs']}",
                                                  f"--config.data.test={data['pairs']}", "--config.eval.timesteps=(0.5,)",
                                                  "--config.eval.n_boot=100", "--config.eval.batch_size=2"]),
        "score": ("score", sampling + [f"--config.score.reward_model={w['reward_model']}",
                                       f"--config.score.clips_per_prompt={args.clips_per_prompt}",
                                       "--config.score.batch_size=2"]),
        "sft": ("sft", train + [f"--config.data.cache_dir={w['score']}/rwr_cache"]),
        "flow_dpo": ("flow_dpo", train + [f"--config.data.cache_dir={w['score']}/dpo_cache"]),
        "flow_rwr": ("flow_rwr", train + [f"--config.data.cache_dir={w['score']}/rwr_cache"]),
        "sample": ("guided", sampling + no_video + ["--config.sampler.guidance.kind=none"]),
        "nrg": ("guided", sampling + no_video + [f"--config.sampler.guidance.reward_model={w['reward_model']}"]),
        "shell": ("guided", sampling + no_video + shell),
    }
    rows = []
    for name in args.stages.split(","):
        arg, flags = stages[name]
        extra = TINY if args.tiny else []
        if args.tiny and name == "reward_model":
            extra = extra + ["--config.reward_model.num_blocks=1"]
        if name in ("flow_dpo",):       # the DPO cache holds one pair per prompt
            flags = [f for f in flags if not f.startswith("--config.data.batch_size")] + [
                f"--config.data.batch_size={min(args.batch, args.prompts)}"]
        shutil.rmtree(w[name], ignore_errors=True)
        cmd = [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:{arg}", f"--workdir={w[name]}", *flags,
               *extra]
        with GpuPeak() as peak:
            run = harness.run(cmd, timeout=args.timeout, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                              log=os.path.join(out_dir, f"{name}.log"), expects_result=False)
        row = {"stage": name, "config": f"{CONFIG}:{arg}", "rc": run.rc, "wall_s": round(run.wall_s, 1),
               "gpu_peak_gb": None if peak.peak is None else round(peak.peak, 2), **metrics_of(w[name]),
               **log_times(run.output)}
        if name in ("sample", "nrg", "shell", "score"):
            n = args.prompts * (args.clips_per_prompt if name == "score" else 1)
            row["clips"] = n
        if run.error:
            bench.failed(name, run)
        by = {r["stage"]: r for r in rows}
        if by.get("sft", {}).get("step_ms") and row.get("step_ms"):
            row["step_vs_sft"] = round(row["step_ms"] / by["sft"]["step_ms"], 3)
        if name in ("nrg", "shell") and row.get("clip_s") and by.get("sample", {}).get("clip_s"):
            row["clip_vs_unguided"] = round(row["clip_s"] / by["sample"]["clip_s"], 3)
        rows.append(row)
        bench.log(f"{name}: " + json.dumps(row))
        # at once: a run cut short keeps what it measured
        bench.record(device=device_name(), latent_shape=list(lat), text_len=args.text_len, tiny=args.tiny,
                     steps=args.steps, batch=args.batch, sampler_steps=args.sampler_steps, **row)
    bench.log("")
    bench.table([("stage", "stage", ""), ("rc", "rc", ""), ("wall s", "wall_s", ".1f"),
                 ("first step s", "first_step_s", ".1f"), ("step ms", "step_ms", ".1f"),
                 ("x sft", "step_vs_sft", ".2f"), ("s / clip", "clip_s", ".2f"), ("x unguided", "clip_vs_unguided", ".2f"),
                 ("GPU GiB", "gpu_peak_gb", ".2f")], rows)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
