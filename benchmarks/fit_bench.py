#!/usr/bin/env python
"""Benchmark of manifold fitting, stage 1: training-step throughput in patches/s (DESIGN 2.1).

Times this project's jitted ``shelllcc.manifold.fit.stage1_step`` (stage-1 loss of
``shelllcc.manifold.losses.stage1_loss``, coder BatchNorm in train mode, the optimizer of
``fit.make_optimizer(fit.OptimConfig())``: global-norm clipping then AdamW on a warmup + cosine
schedule, BatchNorm running statistics updated, non-finite steps skipped) against a plain PyTorch
eager float32 implementation of the same math, written out in the torch worker below without
importing shelllcc:

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

Every measurement runs in its own subprocess (``--_worker jax|torch``); the parent only prepares
the inputs on the host (numpy; parameters from ``shelllcc.manifold.params.init_params`` with a
seeded key and random anchors), collects the results, compares them and prints the table. Before
timing, each worker runs ``--check-steps`` steps from the same initial parameters on the same batch
and saves the resulting parameters; the parent reports the relative difference of the loss and of
the parameter update (``||p_x - p_torch|| / ||p_torch - p_init||``) against PyTorch float32, and
of Adam's first moment (an average of the clipped gradients, free of Adam's per-element
normalisation, which amplifies rounding in elements whose gradient is near zero). The
default schedule starts its linear warmup at learning rate 0, so the first update is exactly zero:
``--check-steps`` defaults to 3 (learning rates 0, 1e-5, 2e-5 with the default 100 warmup steps).
The aggregate update error leaves out ``coder.b0``: in front of a train-mode BatchNorm its exact
gradient is zero, the computed one is rounding noise (~1e-9), and Adam turns that noise into steps
of arbitrary sign, so its "update" agrees between no two implementations (it is still listed per leaf).

Run from the repository root::

    python benchmarks/fit_bench.py                                      # full size, GPU
    python benchmarks/fit_bench.py --torch-tf32 --compute-dtypes float32 bfloat16
    python benchmarks/fit_bench.py --num-anchors 64 --hidden 32 --batch 512 --repeats 3 \
        --warmup 1 --out-jsonl /tmp/fb.jsonl --out-dir /tmp/fb             # quick CPU check

Only jax, optax, flax, numpy, torch and shelllcc.manifold are imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# Shared with the reward benchmark (this directory is on sys.path when a script here runs).
from reward_bench import _memory_stats, _temp_bytes, fmt, package_version, write_jsonl  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("shelllcc") is None:
    # The package may not be pip-installed on the benchmark machine; use this checkout.
    sys.path.insert(0, REPO_ROOT)

RESULT_PREFIX = "@@FIT_BENCH_RESULT "
GB = 1024.0 ** 3

# NVIDIA datasheet dense peaks (SXM parts): TFLOP/s and HBM TB/s, used only to print rough floors.
# JAX's default float32 matmul precision on Hopper is TF32; PyTorch's default is true float32.
DATASHEET = {
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "hbm_tbs": 3.35},
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "hbm_tbs": 4.8},
}

# Trainable leaves of stage 1 (fit.stage1_trainable) and the BatchNorm running statistics, by the
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
    p.add_argument("--out-jsonl", default=os.path.join(REPO_ROOT, "benchmarks", "results.jsonl"),
                   help="append one JSON object per measurement here")
    p.add_argument("--out-dir", default=None, help="if given, also write fit_bench.jsonl and fit_bench.log here")
    p.add_argument("--label", default="", help="free text stored with every JSON record")
    p.add_argument("--worker-timeout", type=float, default=600.0, help="seconds per subprocess")
    # Internal: the subprocess entry points.
    p.add_argument("--_worker", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
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


def datasheet_peaks(device_kind: str | None):
    if not device_kind or "pcie" in device_kind.lower():
        return None
    for name, peaks in DATASHEET.items():
        if name in device_kind:
            return peaks
    return None


# ---------------------------------------------------------------------------------------------
# Inputs: prepared once in the parent (on the CPU) and shared by every worker through files
# ---------------------------------------------------------------------------------------------

def make_inputs(args, data_dir: str) -> dict:
    """Initial parameters (params.npz), one batch of patches (patches.npy) and the constants of the
    math (meta.json, from shelllcc's defaults). Returns the meta dict."""
    import jax

    # The parent must never touch the accelerator: a live context here would hold memory while
    # the workers measure theirs.
    jax.config.update("jax_platforms", "cpu")
    from shelllcc.manifold import fit
    from shelllcc.manifold.losses import Stage1Weights
    from shelllcc.manifold.params import ManifoldConfig, expected_shapes, init_params

    d, k, h = args.dim, args.num_anchors, args.hidden
    rng = np.random.default_rng(args.seed)
    config = ManifoldConfig(dim=d, num_anchors=k, hidden_dim=h)
    anchors = rng.standard_normal((k, d)).astype(np.float32)
    params = init_params(jax.random.key(args.seed), config, anchors)
    arrays = {}
    for path in expected_shapes(config):
        leaf = params
        for part in path.split("."):
            leaf = getattr(leaf, part)
        arrays[path] = np.asarray(leaf)
    np.savez(os.path.join(data_dir, "params.npz"), **arrays)
    # Standard normal, like Wan's normalised latents.
    np.save(os.path.join(data_dir, "patches.npy"), rng.standard_normal((args.batch, d)).astype(np.float32))

    meta = {"optim": dataclasses.asdict(fit.OptimConfig()), "weights": dataclasses.asdict(Stage1Weights()),
            "bn_eps": config.bn_eps, "bn_momentum": config.bn_momentum,
            # optax.adamw's defaults, which fit.make_optimizer does not override.
            "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8}}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def load_inputs(data_dir: str):
    with np.load(os.path.join(data_dir, "params.npz")) as f:
        arrays = {name: f[name] for name in f.files}
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    return arrays, np.load(os.path.join(data_dir, "patches.npy")), meta


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


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
    from shelllcc.manifold.params import (BatchNormStats, CoderParams, ManifoldConfig, ManifoldParams,
                                          ShellParams, check_params)

    arrays, patches, meta = load_inputs(args._data)
    config = ManifoldConfig(dim=args.dim, num_anchors=args.num_anchors, hidden_dim=args.hidden,
                            bn_eps=meta["bn_eps"], bn_momentum=meta["bn_momentum"])

    def group(prefix):
        return {name.split(".", 1)[1]: v for name, v in arrays.items() if name.startswith(prefix + ".")}

    def fresh_params():
        params = ManifoldParams(anchors=arrays["anchors"], scale=arrays["scale"], shift=arrays["shift"],
                                coder=CoderParams(**group("coder")), bn=BatchNormStats(**group("bn")),
                                shell=ShellParams(**group("shell")))
        check_params(params, config)
        return params

    device = jax.devices()[0]
    optimizer = fit.make_optimizer(fit.OptimConfig(**meta["optim"]))
    step_fn = functools.partial(fit.stage1_step, optimizer=optimizer, weights=Stage1Weights(**meta["weights"]),
                                config=config, compute_dtype=jnp.dtype(args._dtype))
    step = fit.jit_step(step_fn, None)   # what experiments/fit_manifold.py runs (mesh=None: one device)

    def fresh_state():
        return jax.device_put(fit.init_state(jax.device_put(fresh_params(), device), optimizer, 1), device)

    batch = jax.device_put(patches, device)
    state = fresh_state()
    jax.block_until_ready((state, batch))
    before = _memory_stats(device)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    # Correctness check: --check-steps steps from the initial parameters on this batch.
    losses = []
    for _ in range(args.check_steps):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    p = state.params
    leaves = {"anchors": p.anchors, "scale": p.scale, "shift": p.shift, "bn.mean": p.bn.mean, "bn.var": p.bn.var}
    leaves.update({f"coder.{f.name}": getattr(p.coder, f.name) for f in dataclasses.fields(p.coder)})
    # Adam's first moment: an average of the clipped gradients, compared without Adam's normalisation.
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    mu = next(x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)).mu
    leaves.update({"mu.anchors": mu["anchors"], "mu.scale": mu["scale"], "mu.shift": mu["shift"]})
    leaves.update({f"mu.coder.{f.name}": getattr(mu["coder"], f.name) for f in dataclasses.fields(mu["coder"])})
    np.savez(args._result, losses=np.asarray(losses, np.float64),
             **{name: np.asarray(v, np.float32) for name, v in leaves.items()})
    skipped = int(state.skipped)

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) * 1e3)
    after = _memory_stats(device)
    peak = after["peak_bytes_in_use"] / GB if "peak_bytes_in_use" in after else None
    temp = _temp_bytes(compiled)
    emit({**summarize(times, args.steps, args.batch), "peak_gb": peak,
          "resident_before_compile_gb": before["bytes_in_use"] / GB if "bytes_in_use" in before else None,
          "temp_gb": None if temp is None else temp / GB, "compile_s": compile_s,
          "device_name": device.device_kind, "platform": device.platform, "losses": losses,
          "final_loss": float(metrics["loss"]), "skipped_steps": int(state.skipped), "check_skipped": skipped,
          "jax_version": jax.__version__,
          "matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None) or "default")})


# ---------------------------------------------------------------------------------------------
# PyTorch reference worker: the same math written plainly, eager, no shelllcc import
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
    from torch import nn

    if args._tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    arrays, patches, meta = load_inputs(args._data)
    cuda = args.platform != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    d, k, h = args.dim, args.num_anchors, args.hidden
    o, lw, ad = meta["optim"], meta["weights"], meta["adam"]

    def t(name):
        return torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dev)

    # Coder f: Linear -> BatchNorm1d (train mode: batch statistics) -> ReLU -> Linear -> ReLU -> Linear.
    coder = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h, eps=meta["bn_eps"], momentum=meta["bn_momentum"]),
                          nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k)).to(dev)
    with torch.no_grad():
        for layer, w, b in ((coder[0], "coder.w0", "coder.b0"), (coder[3], "coder.w1", "coder.b1"),
                            (coder[5], "coder.w2", "coder.b2")):
            layer.weight.copy_(t(w).T)  # JAX stores [in, out]; nn.Linear.weight is [out, in]
            layer.bias.copy_(t(b))
        coder[1].weight.copy_(t("coder.bn_scale"))
        coder[1].bias.copy_(t("coder.bn_bias"))
        coder[1].running_mean.copy_(t("bn.mean"))
        coder[1].running_var.copy_(t("bn.var"))
    coder.train()
    anchors = nn.Parameter(t("anchors"))
    scale = nn.Parameter(t("scale"))
    shift = nn.Parameter(t("shift"))
    params = [anchors, scale, shift, *coder.parameters()]
    opt_kwargs = {"fused": True} if args.torch_fused_adam else {}
    opt = torch.optim.AdamW(params, lr=0.0, betas=(ad["b1"], ad["b2"]), eps=ad["eps"],
                            weight_decay=o["weight_decay"], **opt_kwargs)
    z = torch.from_numpy(patches).to(dev)
    log_k = math.log(k)

    def stage1_loss(z):
        w = torch.softmax(coder(z), dim=-1)                                     # [N, K]
        zhat = scale * (w @ anchors) + shift
        l_rec = ((zhat - z) ** 2).mean()
        d2 = ((z * z).sum(-1, keepdim=True) + (anchors * anchors).sum(-1) - 2.0 * (z @ anchors.T)).clamp_min(0.0)
        l_loc = (w * d2).sum(-1).mean()
        usage = w.mean(0)
        l_use = (usage * (usage.clamp_min(1e-12).log() + log_k)).sum()
        l_b2p = d2.amin(0).mean()   # amin splits the gradient among ties, as jnp.min does
        return l_rec + lw["locality"] * l_loc + lw["usage"] * l_use + lw["basis_to_patch"] * l_b2p

    count = [0]

    def step():
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(count[0], o)
        opt.zero_grad(set_to_none=True)
        loss = stage1_loss(z)
        loss.backward()
        # optax.clip_by_global_norm: g * c / max(||g||, c) (torch's clip_grad_norm_ adds 1e-6 to the norm).
        grads = [q.grad for q in params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        factor = o["grad_clip"] / total.clamp_min(o["grad_clip"])
        torch._foreach_mul_(grads, factor)
        opt.step()
        count[0] += 1
        return loss

    def export():
        with torch.no_grad():
            named = {"anchors": anchors, "scale": scale, "shift": shift,
                     "coder.w0": coder[0].weight, "coder.b0": coder[0].bias,
                     "coder.bn_scale": coder[1].weight, "coder.bn_bias": coder[1].bias,
                     "coder.w1": coder[3].weight, "coder.b1": coder[3].bias,
                     "coder.w2": coder[5].weight, "coder.b2": coder[5].bias}
            out = {"bn.mean": coder[1].running_mean, "bn.var": coder[1].running_var}
            for name, q in named.items():
                tr = name in ("coder.w0", "coder.w1", "coder.w2")   # back to [in, out]
                out[name] = q.T if tr else q
                out["mu." + name] = opt.state[q]["exp_avg"].T if tr else opt.state[q]["exp_avg"]
            return {name: v.detach().float().cpu().numpy() for name, v in out.items()}

    losses = [step().item() for _ in range(args.check_steps)]
    np.savez(args._result, losses=np.asarray(losses, np.float64), **export())

    for _ in range(args.warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / GB if cuda else None
    emit({**summarize(times, args.steps, args.batch), "peak_gb": peak,
          "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "platform": dev.type, "losses": losses,
          "final_loss": float(loss.item()), "torch_version": torch.__version__,
          "float32_matmul_precision": torch.get_float32_matmul_precision(),
          "optimizer": "AdamW(fused)" if args.torch_fused_adam else "AdamW(default: foreach on CUDA)"})


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, compare, record, print
# ---------------------------------------------------------------------------------------------

class Log:
    """Prints and, with --out-dir, mirrors every line to fit_bench.log as it goes."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "fit_bench.log") if out_dir else None

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def run_worker(args, log, which, data_dir, result_path, dtype="float32", tf32=False):
    """Runs one worker subprocess; returns (result dict, arrays) or (None, None) on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", which, "--_data", data_dir,
           "--_result", result_path, "--_dtype", dtype,
           "--dim", str(args.dim), "--num-anchors", str(args.num_anchors), "--hidden", str(args.hidden),
           "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--check-steps", str(args.check_steps),
           "--platform", args.platform, "--jax-matmul-precision", args.jax_matmul_precision]
    if tf32:
        cmd.append("--_tf32")
    if args.torch_fused_adam:
        cmd.append("--torch-fused-adam")
    env = dict(os.environ)
    if which == "jax" and args.platform != "auto":
        env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.platform]
    if which == "torch" and args.platform == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    name = f"{which} {dtype}{' tf32' if tf32 else ''}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout,
                              cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        log(f"  ! {name} worker timed out after {args.worker_timeout:g} s")
        return None, None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        log(f"  ! {name} worker failed with exit code {proc.returncode}; last lines of its output:")
        for ln in (proc.stdout + proc.stderr).strip().splitlines()[-15:]:
            log("    " + ln)
        return None, None
    with np.load(result_path) as f:
        arrays = {name: f[name].astype(np.float64) for name in f.files}
    return json.loads(lines[-1][len(RESULT_PREFIX):]), arrays


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


def print_table(log, rows):
    cols = [("impl", "impl", "s"), ("dtype", "compute_dtype", "s"), ("matmul", "matmul_precision", "s"),
            ("step_ms", "step_ms", ".2f"), ("patches/s", "patches_per_s", ",.0f"), ("peak_gb", "peak_gb", ".3f"),
            ("vs_torch", "speedup_vs_torch", ".2f"), ("vs_torch_tf32", "speedup_vs_torch_tf32", ".2f"),
            ("TFLOP/s", "tflops_per_s", ".2f"), ("loss_rel_err", "loss_rel_err", ".1e"),
            ("grad_rel_err", "grad_rel_err", ".1e"),
            ("update_rel_err", "update_rel_err", ".1e"), ("max_leaf", "update_rel_err_max_leaf", ".1e")]
    cells = [[fmt(r.get(key), spec) for _, key, spec in cols] for r in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _, _) in enumerate(cols)]
    log("  ".join(name.rjust(w) for (name, _, _), w in zip(cols, widths)))
    log("  ".join("-" * w for w in widths))
    for c in cells:
        log("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def main(args) -> None:
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    log = Log(args.out_dir)
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    n, d, k, h = args.batch, args.dim, args.num_anchors, args.hidden
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    flops = step_flops(n, d, h, k)
    versions = {"jax": package_version("jax"), "jaxlib": package_version("jaxlib"), "optax": package_version("optax"),
                "flax": package_version("flax"), "torch": package_version("torch"), "numpy": np.__version__,
                "python": sys.version.split()[0]}

    log(f"fit_bench (manifold stage 1)  {date}")
    log(f"command: {command}")
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
        with np.load(os.path.join(data_dir, "params.npz")) as f:
            init = {name: f[name] for name in f.files}
        variants = []
        if not args.no_torch:
            variants.append(("torch", "float32", False))
            if args.torch_tf32:
                variants.append(("torch", "float32", True))
        variants += [("jax", dt, False) for dt in args.compute_dtypes]
        for impl, dtype, tf32 in variants:
            res, arr = run_worker(args, log, impl, data_dir,
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
        row = record(args, command, date, versions, flops, impl, dtype, tf32, res,
                     {} if is_ref else compare(arr, ref[1], init), ref[0], ref_tf32)
        rows.append(row)
        write_jsonl(args, row, "fit_bench")

    log()
    for row in rows:
        if row.get("update_rel_err_per_leaf"):
            leaf = ", ".join(f"{nm} {fmt(v, '.1e')}" for nm, v in row["update_rel_err_per_leaf"].items())
            log(f"check {row['impl']} {row['compute_dtype']}{' tf32' if row['torch_tf32'] else ''} vs torch float32: "
                f"loss rel err {fmt(row['loss_rel_err'], '.2e')}, grad rel err {fmt(row['grad_rel_err'], '.2e')}, update rel err {fmt(row['update_rel_err'], '.2e')} "
                f"(reference update norm {row['update_norm_ref']:.3e}), BN running stats rel err "
                f"{fmt(row['bn_stats_rel_err'], '.2e')}; per leaf: {leaf}")
    device_kind = next((r["device"] for r in rows if r.get("device")), None)
    peaks = datasheet_peaks(device_kind)
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
    print_table(log, rows)


def record(args, command, date, versions, flops, impl, dtype, tf32, res, errs, ref, ref_tf32) -> dict:
    ms = res["step_ms"] if res else None
    precision = None
    if res:
        precision = res.get("matmul_precision") if impl == "jax" else res.get("float32_matmul_precision")
    return {
        "bench": "fit_bench", "date": date, "command": command, "label": args.label,
        "device": res["device_name"] if res else None, "platform": res.get("platform", None) if res else None,
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
    if parsed._worker == "jax":
        jax_worker(parsed)
    elif parsed._worker == "torch":
        torch_worker(parsed)
    else:
        main(parsed)
