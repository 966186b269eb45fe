"""Multi-device smoke run of ``reward_finetune``: data parallel with LoRA, FSDP with full fine-tuning and
microbatches, one process per device through ``jax.distributed``, and resume from a checkpoint.

    python benchmarks/train_smoke.py --devices 2 --out /tmp/smoke          # GPUs of one host
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python benchmarks/train_smoke.py --devices 2 --out /tmp/smoke --platform cpu

Every run goes through ``python -m experiments.main`` exactly as a user would start it. Writes
``OUT/smoke.log`` (every command and its output) and ``OUT/summary.json`` (per run: return code, wall
time, first/last logged metrics, steps/s of the last interval, whether it resumed). The model is a
scaled-down Wan DiT (``--dim``/``--layers``) with random weights; data and manifold are seeded random.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import harness


def overrides(args, workdir_steps: int, **extra) -> list[str]:
    base = {
        "model.preset": "tiny", "model.dim": args.dim, "model.num_layers": args.layers,
        "model.num_heads": args.heads or args.dim // 64, "model.ffn_dim": args.ffn or 4 * args.dim,
        "model.text_dim": 64, "model.freq_dim": 256, "model.remat_policy": args.remat,
        "model.dtype": args.dtype, "model.param_dtype": "float32",
        "data.source": "random", "data.random_latent_shape": f"({args.frames},{args.size},{args.size},16)",
        "data.random_text_shape": "(16,64)", "reward.manifold": "random", "reward.random.num_anchors": 256,
        "reward.random.hidden_dim": 128, "train.steps": workdir_steps, "train.log_every": 5,
        "train.checkpoint_every": 10, "optim.learning_rate": 1e-5,
    }
    if args.attention:
        base["model.attention_impl"] = args.attention
    base.update(extra)
    return [f"--config.{k}={v}" for k, v in base.items()]


def command(workdir: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.main", "--config=experiments/reward_finetune.py",
            f"--workdir={workdir}", *flags]


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run(name: str, cmds: list[tuple[list[str], dict]], workdir: str, log, results: dict, timeout: int) -> None:
    """Run ``cmds`` (commands started together: one per process) and record the outcome under ``name``."""
    log.write(f"\n===== {name}\n")
    for cmd, env in cmds:
        log.write("$ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd) + "\n")
    log.flush()
    t0 = time.time()
    workers = [harness.Worker(cmd, env) for cmd, env in cmds]
    outs, codes = [], []
    for i, worker in enumerate(workers):
        done = worker.wait(timeout, expects_result=False)
        outs.append(done.output)
        codes.append(done.rc)
        log.write(f"--- process {i} (rc {done.rc})\n{done.output}\n")
    log.flush()
    rows = read_metrics(workdir)
    scalar = [r for r in rows if "loss" in r]
    results[name] = {
        "returncodes": codes, "wall_s": round(time.time() - t0, 1),
        "resumed": any("resumed from" in o for o in outs),
        "first": scalar[0] if scalar else None, "last": scalar[-1] if scalar else None,
        "devices_line": next((line for o in outs for line in o.splitlines() if line.startswith("devices:")), ""),
    }
    print(f"{name}: rc {codes} in {results[name]['wall_s']}s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="", help="run directories (default OUT/work)")
    ap.add_argument("--platform", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=0, help="0: dim // 64")
    ap.add_argument("--ffn", type=int, default=0, help="0: 4 x dim")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--scale-steps", type=int, default=12)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="", help="model.attention_impl (cudnn on GPU)")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--parts", default="dp,fsdp,multiprocess",
                    help="comma list of dp, fsdp, 2d (data 2 x fsdp n/2, full fine-tuning with anti-drift), "
                         "multiprocess, scale (weak scaling: 1 device vs all, LoRA)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    n = args.devices
    work = args.work or os.path.join(args.out, "work")
    results: dict = {"devices": n, "platform": args.platform, "model": f"dim {args.dim} x {args.layers} layers",
                     "latent": [args.frames, args.size, args.size, 16]}
    parts = args.parts.split(",")
    with open(os.path.join(args.out, "smoke.log"), "w") as log:
        if "dp" in parts:
            w = os.path.join(work, "dp_lora")
            flags = dict(**{"mesh.data": n, "mesh.fsdp": 1, "data.batch_size": 2 * n, "lora.rank": 16,
                            "objective.drift_weight": 1.0, "reward.kind": "shell"})
            run("dp_lora", [(command(w, overrides(args, 20, **flags)), {})], w, log, results, args.timeout)
            run("dp_lora_resume", [(command(w, overrides(args, 30, **flags)), {})], w, log, results, args.timeout)
        if "fsdp" in parts:
            w = os.path.join(work, "fsdp_full")
            flags = {"mesh.data": 1, "mesh.fsdp": n, "data.batch_size": 2 * n, "train.microbatch_size": 1,
                     "objective.name": "noised_data", "reward.kind": "shell_band"}
            run("fsdp_full_microbatch", [(command(w, overrides(args, 10, **flags)), {})], w, log, results,
                args.timeout)
        if "2d" in parts:
            if n < 4 or n % 2:
                raise SystemExit("--parts 2d needs an even number of devices >= 4 (mesh data 2 x fsdp n/2)")
            w = os.path.join(work, "mesh_2d_full")
            flags = {"mesh.data": 2, "mesh.fsdp": n // 2, "data.batch_size": n, "objective.drift_weight": 1.0}
            run("mesh_2d_full_drift", [(command(w, overrides(args, 10, **flags)), {})], w, log, results, args.timeout)
        if "multiprocess" in parts:
            w = os.path.join(work, "multiprocess")
            flags = {"mesh.data": n, "mesh.fsdp": 1, "data.batch_size": 2 * n, "lora.rank": 16}
            for name, steps in (("multiprocess_lora", 10), ("multiprocess_lora_resume", 15)):
                port = free_port()
                cmds = []
                for i in range(n):
                    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n),
                           "JAX_PROCESS_ID": str(i)}
                    if args.platform == "gpu":
                        env["JAX_LOCAL_DEVICE_IDS"] = str(i)
                    else:
                        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
                    cmds.append((command(w, overrides(args, steps, **flags)), env))
                run(name, cmds, w, log, results, args.timeout)
        if "scale" in parts:
            rates = {}
            for devices in (1, n):
                w = os.path.join(work, f"scale_{devices}")
                flags = {"mesh.devices": devices, "mesh.data": devices, "mesh.fsdp": 1, "data.batch_size": devices,
                         "lora.rank": 16, "train.log_every": args.scale_steps // 2,
                         "train.checkpoint_every": 10 * args.scale_steps}
                run(f"scale_{devices}", [(command(w, overrides(args, args.scale_steps, **flags)), {})], w, log,
                    results, args.timeout)
                last = results[f"scale_{devices}"]["last"]
                rates[devices] = last.get("steps_per_s") if last else None
            if rates.get(1) and rates.get(n):
                results["weak_scaling_efficiency"] = rates[n] / rates[1]
                results["steps_per_s"] = rates
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
