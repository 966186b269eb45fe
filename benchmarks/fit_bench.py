#!/usr/bin/env python
"""Benchmark of manifold fitting, stage 1: training-step throughput in patches/s (DESIGN 2.1).

Times this project's jitted ``shelllcc.manifold.fit.stage1_step`` (stage-1 loss of
``shelllcc.manifold.losses.stage1_loss``, coder BatchNorm in train mode, the optimizer of
``fit.make_optimizer(fit.OptimConfig())``: global-norm clipping then AdamW on a warmup + cosine
schedule, BatchNorm running statistics updated, non-finite steps skipped) against a plain PyTorch
eager float32 implementation of the same math, without shelllcc: the stage-1 loss of
``third_party.shell_lcc_torch.ReferenceManifold`` (in train mode) and the update written out in the torch
worker below:

    f      = Linear(D, H) -> BatchNorm1d(H) (batch statistics) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, K)
    w      = softmax(f(z)),  zhat = s * (w @ A) + b
    d2     = max(|z|^2 + |A|^2 - 2 z A^T, 0)                                    [N, K]
    loss   = mean (zhat - z)^2 + l_loc mean_n sum_k w d2 + l_use sum_k p log(K p) + l_b2p mean_k min_n d2
             (p = mean_n w; weights from losses.Stage1Weights; l_* = 0.1 by default)
    update = AdamW(lr=schedule(t), b1=0.9, b2=0.999, eps=1e-8, weight decay 0) of the gradient clipped
             to global norm 1 (optax.clip_by_global_norm semantics: g * c / max(|g|, c)), on
             (anchors, scale, shift, coder); BatchNorm running stats r <- 0.9 r + 0.1 batch (unbiased var).

All constants (loss weights, optimizer hyper-parameters and schedule, BatchNorm eps and momentum)
are read from shelllcc's dataclass defaults in the parent and handed to both workers, so the two
implementations cannot drift apart. Differences of the PyTorch side: no skip of non-finite steps (it
would need a host sync per step; the JAX select over the state is a negligible cost) and a per-step
Python float learning rate (the same schedule values).

Work per step (matrix products only, 2 FLOPs per multiply-add). Per patch the forward does
``D*H + H*H + H*K`` (coder) ``+ K*D`` (skeleton ``w @ A``) ``+ K*D`` (distances ``z A^T``)
multiply-adds; the backward costs about twice the forward (both operands' gradients of every product;
the tiny input-gradient terms of the first layer and of ``z A^T`` are counted anyway), so::

    FLOPs/step = 3 x 2 x N x (D*H + H*H + H*K + 2*K*D)

For the Wan2.1-1.3B manifold (D=16, K=4096, H=512) and N=65,536 patches that is 2.50 M multiply-adds
per patch, 0.982 TFLOP per step: a compute floor of 14.7 ms in true fp32, 1.98 ms in TF32 and
0.99 ms in bf16 at an H100/H200 SXM's datasheet dense peaks (67 / 495 / 989 TFLOP/s). Besides the
products, each step makes several elementwise passes over ``N x K`` float32 matrices (logits,
softmax, ``w * d2``, their gradients); one such pass moves 1.07 GB at N=65,536, K=4096, i.e.
0.32 ms at 3.35 TB/s (H100) or 0.22 ms at 4.8 TB/s (H200); the log prints both floors on those GPUs.

Every measurement runs in its own subprocess (``--_worker jax|torch``, ``benchmarks/harness.py``); the parent
only prepares the inputs on the host (parameters from ``shelllcc.manifold.params.init_params`` with a seeded
key and random anchors, saved as a reference checkpoint that both workers read), collects the results,
compares them and prints the table. Before timing, each worker runs ``--check-steps`` steps from the same
initial parameters on the same batch and saves the resulting parameters; the parent reports the relative
difference of the loss and of the parameter update (``||p_x - p_torch|| / ||p_torch - p_init||``) against
PyTorch float32, and of Adam's first moment (an average of the clipped gradients, free of Adam's per-element
normalisation, which amplifies rounding in elements whose gradient is near zero). The default schedule starts
its linear warmup at learning rate 0, so the first update is exactly zero: ``--check-steps`` defaults to 3
(learning rates 0, 1e-5, 2e-5 with the default 100 warmup steps). The aggregate update error leaves out
``coder.b0``: in front of a train-mode BatchNorm its exact gradient is zero, the computed one is rounding
noise (~1e-9), and Adam turns that noise into steps of arbitrary sign, so its "update" agrees between no two
implementations (it is still listed per leaf).

Run from the repository root::

    python benchmarks/fit_bench.py                                      # full size, GPU
    python benchmarks/fit_bench.py --torch-tf32 --compute-dtypes float32 bfloat16
    python benchmarks/fit_bench.py --num-anchors 64 --hidden 32 --batch 512 --repeats 3 \
        --warmup 1 --out-jsonl /tmp/fb.jsonl --out-dir /tmp/fb             # quick CPU check

Only jax, optax, flax, numpy, torch, shelllcc.manifold and third_party are imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness
import numpy as np
from reward_bench import random_manifold  # this directory is on sys.path when a script here runs

# Trainable leaves of stage 1 (fit.trainable(params, 1)) and the BatchNorm running statistics, by the
# names of params.expected_shapes.
TRAINABLE = ("anchors", "scale", "shift", "coder.w0", "coder.b0", "coder.bn_scale", "coder.bn_bias",
             "coder.w1", "coder.b1", "coder.w2", "coder.b2")
BN_STATS = ("bn.mean", "bn.var")
# The bias in front of the train-mode BatchNorm has an exactly zero gradient (the batch mean removes
# it), so its computed gradient is rounding noise, which Adam normalises into +-lr steps of random
# sign: its "update" differs between any two implementations and is left out of the aggregate error.
ZERO_GRAD_LEAVES = ("coder.b0",)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=16, help="patch dimension D (Wan latent channels, patch 1x1x1)")
    p.add_argument("--num-anchors", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=65536, help="patches per step N")
    p.add_argument("--compute-dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"],
                   help="JAX rows: stage1_step's compute_dtype (matmul operands; float32 accumulation)")
    p.add_argument("--jax-matmul-precision", default="default",
                   help="jax_default_matmul_precision for the JAX workers ('default' leaves JAX's own "
                        "default, which is TF32 for float32 on Ampere/Hopper GPUs; 'highest' is true f32)")
    p.add_argument("--torch-tf32", action="store_true",
                   help="also time PyTorch with TF32 matmuls (an extra row; the reference stays true float32)")
    p.add_argument("--torch-fused-adam", action="store_true",
                   help="torch.optim.AdamW(fused=True) instead of its default (foreach) implementation")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch (no speedup, no correctness check)")
    p.add_argument("--platform", choices=["auto", "cpu", "gpu"], default="auto",
                   help="device for both workers (auto: the GPU when there is one)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat (one host sync per repeat)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (after compilation)")
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of the correctness check (the default schedule's first learning rate is 0)")
    p.add_argument("--seed", type=int, default=0)
    harness.add_output_args(p, label=True)
    harness.add_worker_args(p, ("jax", "torch"), timeout=600.0)
    p.add_argument("--_dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--_tf32", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.check_steps < 1:
        p.error("--repeats, --steps and --check-steps must be >= 1 and --warmup >= 0")
    if args.batch < 2:
        p.error("--batch must be >= 2 (BatchNorm batch statistics)")
    return args


# ---------------------------------------------------------------------------------------------
# Work and floors
# ---------------------------------------------------------------------------------------------

def macs_per_patch(d: int, h: int, k: int) -> int:
    """Forward multiply-adds per patch: coder D*H + H*H + H*K, skeleton K*D, distances K*D."""
    return d * h + h * h + h * k + 2 * k * d


def step_flops(n: int, d: int, h: int, k: int) -> float:
    """Forward + backward FLOPs of one step's matrix products: 3 x forward, 2 FLOPs per multiply-add."""
    return 3.0 * 2.0 * n * macs_per_patch(d, h, k)


# ---------------------------------------------------------------------------------------------
# Inputs: prepared once in the parent (on the CPU) and shared by every worker through files
# ---------------------------------------------------------------------------------------------

def make_inputs(args, data_dir: str) -> dict:
    """Initial parameters (manifold.pt, the reference format), one batch of patches (patches.npy) and the
    constants of the math (meta.json, from shelllcc's defaults). Returns the meta dict."""
    rng, config, params = random_manifold(args.seed, args.dim, args.num_anchors, args.hidden)
    from shelllcc.manifold import fit
    from shelllcc.manifold.losses import Stage1Weights
    from third_party.shell_lcc_reference import save_manifold

    save_manifold(params, config, os.path.join(data_dir, "manifold.pt"))
    # Standard normal, like Wan's normalised latents.
    np.save(os.path.join(data_dir, "patches.npy"), rng.standard_normal((args.batch, args.dim)).astype(np.float32))

    meta = {"optim": dataclasses.asdict(fit.OptimConfig()), "weights": dataclasses.asdict(Stage1Weights()),
            "bn_eps": config.bn_eps, "bn_momentum": config.bn_momentum,
            # optax.adamw's defaults, which fit.make_optimizer does not override.
            "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8}}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def load_inputs(data_dir: str):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    return os.path.join(data_dir, "manifold.pt"), np.load(os.path.join(data_dir, "patches.npy")), meta


def named_leaves(tree, names=TRAINABLE + BN_STATS, prefix: str = "") -> dict:
    """``{prefix + name: float32 array}`` of ``ManifoldParams``-shaped ``tree`` (attributes or dict keys)."""
    out = {}
    for name in names:
        leaf = tree
        for part in name.split("."):
            leaf = leaf[part] if isinstance(leaf, dict) else getattr(leaf, part)
        out[prefix + name] = np.asarray(leaf, np.float32)
    return out


def summarize(times_ms, steps: int, n: int) -> dict:
    per_step = [t / steps for t in times_ms]
    med = statistics.median(per_step)
    return {"step_ms": med, "step_ms_min": min(per_step), "patches_per_s": n / med * 1e3}


# ---------------------------------------------------------------------------------------------
# JAX worker: this project's stage1_step, jitted as the fitting experiment jits it
# ---------------------------------------------------------------------------------------------

def jax_worker(args) -> None:
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    if args.jax_matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.jax_matmul_precision)
    from shelllcc.manifold import fit
    from shelllcc.manifold.losses import Stage1Weights
    from third_party.shell_lcc_reference import load_manifold

    manifold, patches, meta = load_inputs(args._data)
    params, config = load_manifold(manifold)
    config = dataclasses.replace(config, bn_eps=meta["bn_eps"], bn_momentum=meta["bn_momentum"])
    device = jax.devices()[0]
    optimizer = fit.make_optimizer(fit.OptimConfig(**meta["optim"]))
    step_fn = functools.partial(fit.stage1_step, optimizer=optimizer, weights=Stage1Weights(**meta["weights"]),
                                config=config, compute_dtype=jnp.dtype(args._dtype))
    step = fit.jit_step(step_fn, None)   # what experiments/fit_manifold.py runs (mesh=None: one device)

    batch = jax.device_put(patches, device)
    state = jax.device_put(fit.init_state(jax.device_put(params, device), optimizer, 1), device)
    jax.block_until_ready((state, batch))
    before = harness.jax_memory(device)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    # Correctness check: --check-steps steps from the initial parameters on this batch.
    losses = []
    for _ in range(args.check_steps):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    # Adam's first moment: an average of the clipped gradients, compared without Adam's normalisation.
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    mu = next(x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)).mu
    np.savez(args._result, losses=np.asarray(losses, np.float64), **named_leaves(state.params),
             **named_leaves(mu, TRAINABLE, "mu."))
    skipped = int(state.skipped)

    def steps(count):
        nonlocal state, metrics
        for _ in range(count):
            state, metrics = compiled(state, batch)
        return state

    harness.timed(lambda: steps(1), 0, args.warmup)
    times = harness.timed(lambda: steps(args.steps), args.repeats)
    harness.emit({**summarize(times, args.steps, args.batch), "peak_gb": harness.jax_peak_gb([device]),
                  "resident_before_compile_gb": before["bytes_in_use"] / harness.GB if "bytes_in_use" in before
                  else None, "temp_gb": harness.memory_analysis(compiled).get("temp_gb"), "compile_s": compile_s,
                  "device_name": device.device_kind, "platform": device.platform, "losses": losses,
                  "final_loss": float(metrics["loss"]), "skipped_steps": int(state.skipped),
                  "check_skipped": skipped, "jax_version": jax.__version__,
                  "matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None) or "default")})


# ---------------------------------------------------------------------------------------------
# PyTorch reference worker: third_party.shell_lcc_torch's stage-1 loss, AdamW written out, eager
# ---------------------------------------------------------------------------------------------

def warmup_cosine_lr(count: int, o: dict) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, max(total, warmup + 1), lr * end_fraction)
    as fit.make_optimizer builds it, at update number ``count`` (0 for the first update)."""
    peak, end = o["learning_rate"], o["learning_rate"] * o["end_lr_fraction"]
    warmup = max(o["warmup_steps"], 1)
    decay = max(o["total_steps"], o["warmup_steps"] + 1) - warmup
    if count < warmup:
        return peak * count / warmup
    t = min(count - warmup, decay)
    return (peak - end) * 0.5 * (1.0 + math.cos(math.pi * t / decay)) + end


def torch_worker(args) -> None:
    import torch

    from third_party.shell_lcc_torch import ReferenceManifold

    if args._tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    manifold, patches, meta = load_inputs(args._data)
    cuda = args.platform != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    o, lw, ad = meta["optim"], meta["weights"], meta["adam"]

    model = ReferenceManifold.load(manifold).to(dev).train()   # BatchNorm on batch statistics
    model.predictor[1].eps, model.predictor[1].momentum = meta["bn_eps"], meta["bn_momentum"]
    model.surface_head.requires_grad_(False)                     # stage 1 leaves the shell head alone
    params = [q for q in model.parameters() if q.requires_grad]
    opt_kwargs = {"fused": True} if args.torch_fused_adam else {}
    opt = torch.optim.AdamW(params, lr=0.0, betas=(ad["b1"], ad["b2"]), eps=ad["eps"],
                            weight_decay=o["weight_decay"], **opt_kwargs)
    z = torch.from_numpy(patches).to(dev)
    count = [0]

    def step():
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(count[0], o)
        opt.zero_grad(set_to_none=True)
        loss = model.stage1_loss(z, lw["locality"], lw["usage"], lw["basis_to_patch"])
        loss.backward()
        # optax.clip_by_global_norm: g * c / max(||g||, c) (torch's clip_grad_norm_ adds 1e-6 to the norm).
        grads = [q.grad for q in params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        torch._foreach_mul_(grads, o["grad_clip"] / total.clamp_min(o["grad_clip"]))
        opt.step()
        count[0] += 1
        return loss

    losses = [step().item() for _ in range(args.check_steps)]
    # The parameters and Adam's first moments in the reference layout, for the parent's
    # shell_lcc_reference.load_manifold.
    tensors = model.state_dict(keep_vars=True)
    for suffix, state in (("params", tensors),
                          ("mu", {n: opt.state[v]["exp_avg"] if v in opt.state else v for n, v in tensors.items()})):
        torch.save(model.checkpoint({n: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                                     for n, v in state.items()}), f"{args._result}.{suffix}.pt")

    def steps():
        for _ in range(args.steps):
            loss = step()
        return loss

    sync = harness.torch_sync(dev)
    harness.timed(step, 0, args.warmup, sync)
    harness.torch_peak_reset(dev)
    times = harness.timed(steps, args.repeats, sync=sync)
    harness.emit({**summarize(times, args.steps, args.batch), "peak_gb": harness.torch_peak_gb(dev),
                  "device_name": harness.torch_device_name(dev), "platform": dev.type, "losses": losses,
                  "final_loss": float(steps().item()), "torch_version": torch.__version__,
                  "float32_matmul_precision": torch.get_float32_matmul_precision(),
                  "optimizer": "AdamW(fused)" if args.torch_fused_adam else "AdamW(default: foreach on CUDA)"})


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, compare, record, print
# ---------------------------------------------------------------------------------------------

def run_worker(args, bench, which, data_dir, result_path, dtype="float32", tf32=False):
    """Runs one worker subprocess; returns (result dict, arrays) or (None, None) on failure."""
    cmd = harness.script_cmd(__file__, "--_worker", which, "--_data", data_dir, "--_result", result_path,
                             "--_dtype", dtype, "--dim", args.dim, "--num-anchors", args.num_anchors,
                             "--hidden", args.hidden, "--batch", args.batch, "--steps", args.steps,
                             "--repeats", args.repeats, "--warmup", args.warmup, "--check-steps", args.check_steps,
                             "--platform", args.platform, "--jax-matmul-precision", args.jax_matmul_precision)
    cmd += ["--_tf32"] * tf32 + ["--torch-fused-adam"] * args.torch_fused_adam
    env = {}
    if which == "jax" and args.platform != "auto":
        env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.platform]
    if which == "torch" and args.platform == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = harness.run(cmd, timeout=args.worker_timeout, env=env)
    if done.error:
        bench.failed(f"{which} {dtype}{' tf32' if tf32 else ''} worker", done)
        return None, None
    if which == "jax":
        with np.load(result_path) as f:
            return done.result, {name: f[name].astype(np.float64) for name in f.files}
    from third_party.shell_lcc_reference import load_manifold
    arrays = {"losses": np.asarray(done.result["losses"], np.float64),
              **named_leaves(load_manifold(result_path + ".params.pt")[0]),
              **named_leaves(load_manifold(result_path + ".mu.pt")[0], TRAINABLE, "mu.")}
    return done.result, {name: v.astype(np.float64) for name, v in arrays.items()}


def compare(arr, ref, init) -> dict:
    """Loss and update differences of ``arr`` against the reference ``ref`` (both after the check steps)."""
    if arr is None or ref is None:
        return {}
    loss_rel = float(np.max(np.abs(arr["losses"] - ref["losses"]) / np.maximum(np.abs(ref["losses"]), 1e-30)))
    per_leaf, num, den = {}, 0.0, 0.0
    for name in TRAINABLE:
        diff = np.linalg.norm(arr[name] - ref[name])
        upd = np.linalg.norm(ref[name] - init[name].astype(np.float64))
        per_leaf[name] = float(diff / upd) if upd > 0 else None
        if name not in ZERO_GRAD_LEAVES:
            num, den = num + diff ** 2, den + upd ** 2
    worst = max((n for n in per_leaf if per_leaf[n] is not None and n not in ZERO_GRAD_LEAVES),
                key=lambda n: per_leaf[n], default=None)
    g_num = sum(np.linalg.norm(arr["mu." + n] - ref["mu." + n]) ** 2 for n in TRAINABLE if n not in ZERO_GRAD_LEAVES)
    g_den = sum(np.linalg.norm(ref["mu." + n]) ** 2 for n in TRAINABLE if n not in ZERO_GRAD_LEAVES)
    bn_num = sum(np.linalg.norm(arr[n] - ref[n]) ** 2 for n in BN_STATS)
    bn_den = sum(np.linalg.norm(ref[n]) ** 2 for n in BN_STATS)
    return {"loss_rel_err": loss_rel, "grad_rel_err": float(math.sqrt(g_num / g_den)) if g_den > 0 else None,
            "update_rel_err": float(math.sqrt(num / den)) if den > 0 else None,
            "update_rel_err_w2": per_leaf["coder.w2"],
            "update_rel_err_max_leaf": per_leaf[worst] if worst else None, "update_rel_err_worst_leaf": worst,
            "update_rel_err_per_leaf": per_leaf,
            "update_norm_ref": float(math.sqrt(den)),
            "bn_stats_rel_err": float(math.sqrt(bn_num / bn_den)) if bn_den > 0 else None}


TABLE = [("impl", "impl", "s"), ("dtype", "compute_dtype", "s"), ("matmul", "matmul_precision", "s"),
         ("step_ms", "step_ms", ".2f"), ("patches/s", "patches_per_s", ",.0f"), ("peak_gb", "peak_gb", ".3f"),
         ("vs_torch", "speedup_vs_torch", ".2f"), ("vs_torch_tf32", "speedup_vs_torch_tf32", ".2f"),
         ("TFLOP/s", "tflops_per_s", ".2f"), ("loss_rel_err", "loss_rel_err", ".1e"),
         ("grad_rel_err", "grad_rel_err", ".1e"), ("update_rel_err", "update_rel_err", ".1e"),
         ("max_leaf", "update_rel_err_max_leaf", ".1e")]


def main(args) -> None:
    bench = harness.Bench("fit_bench", args.out_jsonl, args.out_dir)
    log, fmt = bench.log, harness.fmt
    n, d, k, h = args.batch, args.dim, args.num_anchors, args.hidden
    flops = step_flops(n, d, h, k)
    versions = {name: harness.package_version(name) for name in ("jax", "jaxlib", "optax", "flax", "torch")}
    versions.update(numpy=np.__version__, python=sys.version.split()[0])

    log(f"fit_bench (manifold stage 1)  {bench.date}")
    log(f"command: {bench.command}")
    log("versions: " + ", ".join(f"{a} {b}" for a, b in versions.items()))
    log(f"D={d}, K={k}, hidden={h}, batch N={n:,} patches/step; {args.warmup} warm-up steps, then "
        f"{args.repeats} repeats x {args.steps} steps (median); {args.check_steps} check steps; "
        f"jax matmul precision={args.jax_matmul_precision}")
    log(f"work: {macs_per_patch(d, h, k):,} forward multiply-adds per patch (D*H + H*H + H*K + 2*K*D); "
        f"3 x 2 x N x that = {flops / 1e12:.4g} TFLOP per step")
    nk_gb = n * k * 4 / 1e9
    log(f"  one N x K float32 matrix is {nk_gb:.3f} GB (each elementwise pass over it reads or writes that much)")

    data_dir = tempfile.mkdtemp(prefix="fit_bench_")
    results = []   # (impl, dtype, tf32, res, arr)
    try:
        meta = make_inputs(args, data_dir)
        log(f"constants from shelllcc: optim {meta['optim']}, loss weights {meta['weights']}, "
            f"bn eps {meta['bn_eps']}, bn momentum {meta['bn_momentum']}, adam {meta['adam']}")
        lrs = [warmup_cosine_lr(c, meta["optim"]) for c in range(args.check_steps)]
        log(f"  learning rates of the check steps: {', '.join(f'{x:.3g}' for x in lrs)}")
        from third_party.shell_lcc_reference import load_manifold
        init = named_leaves(load_manifold(os.path.join(data_dir, "manifold.pt"))[0])
        variants = []
        if not args.no_torch:
            variants.append(("torch", "float32", False))
            if args.torch_tf32:
                variants.append(("torch", "float32", True))
        variants += [("jax", dt, False) for dt in args.compute_dtypes]
        for impl, dtype, tf32 in variants:
            res, arr = run_worker(args, bench, impl, data_dir,
                                  os.path.join(data_dir, f"{impl}_{dtype}_{int(tf32)}.npz"), dtype, tf32)
            results.append((impl, dtype, tf32, res, arr))
            if res:
                log(f"{impl:>5} {dtype:>8}{' tf32' if tf32 else '     '}: {res['step_ms']:9.3f} ms/step  "
                    f"{res['patches_per_s']:>14,.0f} patches/s  peak {fmt(res['peak_gb'], '.3f')} GB  "
                    f"check losses {', '.join(f'{x:.7g}' for x in res['losses'])}  on {res['device_name']}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    ref = next(((r, a) for i, dt, tf, r, a in results if i == "torch" and not tf and r), (None, None))
    ref_tf32 = next((r for i, dt, tf, r, a in results if i == "torch" and tf and r), None)
    rows = []
    for impl, dtype, tf32, res, arr in results:
        is_ref = impl == "torch" and not tf32
        rows.append(bench.record(**record(args, versions, flops, impl, dtype, tf32, res,
                                          {} if is_ref else compare(arr, ref[1], init), ref[0], ref_tf32)))

    log()
    for row in rows:
        if row.get("update_rel_err_per_leaf"):
            leaf = ", ".join(f"{nm} {fmt(v, '.1e')}" for nm, v in row["update_rel_err_per_leaf"].items())
            log(f"check {row['impl']} {row['compute_dtype']}{' tf32' if row['torch_tf32'] else ''} vs torch float32: "
                f"loss rel err {fmt(row['loss_rel_err'], '.2e')}, grad rel err {fmt(row['grad_rel_err'], '.2e')}, "
                f"update rel err {fmt(row['update_rel_err'], '.2e')} "
                f"(reference update norm {row['update_norm_ref']:.3e}), BN running stats rel err "
                f"{fmt(row['bn_stats_rel_err'], '.2e')}; per leaf: {leaf}")
    device_kind = next((r["device"] for r in rows if r.get("device")), None)
    peaks = harness.datasheet(device_kind)
    if peaks:
        log(f"floors at {device_kind} datasheet peaks (dense fp32 {peaks['fp32']:.0f}, tf32 {peaks['tf32']:.0f}, "
            f"bf16 {peaks['bf16']:.0f} TFLOP/s; HBM {peaks['hbm_tbs']} TB/s): products "
            f"fp32 {flops / peaks['fp32'] / 1e9:.2f} ms, tf32 {flops / peaks['tf32'] / 1e9:.2f} ms, "
            f"bf16 {flops / peaks['bf16'] / 1e9:.2f} ms; one N x K float32 pass {nk_gb / peaks['hbm_tbs']:.3f} ms")
    log("notes: step_ms = median over repeats of (time of --steps steps) / steps; patches/s = N / step_ms; "
        "vs_torch = torch float32 step_ms / step_ms (vs_torch_tf32 likewise against the TF32 row). Errors are "
        "against PyTorch float32 after the check steps: loss = max over steps of |a-b|/|b|; grad = ||a-b||/||b|| "
        "of Adam's first moment (an average of the clipped gradients, before Adam's normalisation); update = "
        "||p - p_torch|| / ||p_torch - p_init|| over the trainable leaves (max_leaf: the worst leaf) except "
        f"{', '.join(ZERO_GRAD_LEAVES)}, whose exact gradient is zero (bias before train-mode BatchNorm) so its "
        "Adam update is normalised rounding noise (shown per leaf above). Adam normalises each gradient "
        "element, so elements whose gradient is near zero amplify rounding. JAX "
        "peak_gb is the allocator's peak since process start (state, batch, compile-time scratch); torch's is "
        "max_memory_allocated during timing (state included). JAX's default float32 matmul precision on "
        "Ampere/Hopper is TF32, PyTorch's is true float32: compare with --torch-tf32 or "
        "--jax-matmul-precision highest.")
    log()
    bench.table(TABLE, rows)


def record(args, versions, flops, impl, dtype, tf32, res, errs, ref, ref_tf32) -> dict:
    ms = res["step_ms"] if res else None
    precision = None
    if res:
        precision = res.get("matmul_precision") if impl == "jax" else res.get("float32_matmul_precision")
    return {
        "label": args.label, "device": res["device_name"] if res else None,
        "platform": res.get("platform", None) if res else None,
        "impl": impl, "compute_dtype": dtype, "torch_tf32": tf32, "matmul_precision": precision,
        "config": {"dim": args.dim, "num_anchors": args.num_anchors, "hidden_dim": args.hidden,
                   "batch": args.batch, "compute_dtype": dtype, "patch_size": [1, 1, 1]},
        "step_ms": ms, "step_ms_min": res["step_ms_min"] if res else None,
        "patches_per_s": res["patches_per_s"] if res else None,
        "peak_gb": res["peak_gb"] if res else None, "temp_gb": res.get("temp_gb") if res else None,
        "compile_s": res.get("compile_s") if res else None,
        "speedup_vs_torch": ref["step_ms"] / ms if ms and ref else None,
        "speedup_vs_torch_tf32": ref_tf32["step_ms"] / ms if ms and ref_tf32 else None,
        "flops_per_step": flops, "tflops_per_s": flops / ms / 1e9 if ms else None,
        "check_steps": args.check_steps, "check_losses": res["losses"] if res else None,
        "loss_rel_err": errs.get("loss_rel_err"), "grad_rel_err": errs.get("grad_rel_err"),
        "update_rel_err": errs.get("update_rel_err"),
        "update_rel_err_w2": errs.get("update_rel_err_w2"),
        "update_rel_err_max_leaf": errs.get("update_rel_err_max_leaf"),
        "update_rel_err_worst_leaf": errs.get("update_rel_err_worst_leaf"),
        "update_rel_err_per_leaf": errs.get("update_rel_err_per_leaf"),
        "update_norm_ref": errs.get("update_norm_ref"), "bn_stats_rel_err": errs.get("bn_stats_rel_err"),
        "errors_vs": None if not errs else "torch float32",
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
        "jax_matmul_precision_flag": args.jax_matmul_precision,
        "torch_optimizer": res.get("optimizer") if res and impl == "torch" else None,
        "skipped_steps": res.get("skipped_steps") if res else None,
        "versions": {**versions, **({"jax": res["jax_version"]} if res and "jax_version" in res else {}),
                     **({"torch": res["torch_version"]} if res and "torch_version" in res else {})},
        "error": None if res else f"{impl} worker failed (see the log)",
    }


if __name__ == "__main__":
    parsed = parse_args()
    {"jax": jax_worker, "torch": torch_worker}.get(parsed._worker, main)(parsed)
