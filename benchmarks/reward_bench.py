#!/usr/bin/env python
"""Benchmark of the manifold rewards: forward + gradient w.r.t. the latents (DESIGN 2.3).

For every kind and JAX variant (implementation ``fused`` or ``remat``, kernel ``xla`` or ``pallas``,
chunk_size, compute_dtype, Pallas tile sizes; ``--variants``) it times ``jax.value_and_grad`` of
``shelllcc.rewards.manifold_distance`` on one latent (default ``[1, 20, 60, 60, 16]``, N = 72,000
patches of D = 16, K = 4096 anchors, hidden width 512) and compares it with a plain PyTorch eager
float32 implementation of the same formulas (all N patches at once, ``.backward()``), which also
serves as the numerical reference for the JAX value and gradient.

Every measurement runs in its own subprocess (``--_worker jax|torch``) so that one configuration's
peak memory, compilation caches and allocator state cannot leak into the next; the parent process
only prepares the inputs (on the CPU), collects the results and prints the table.

Run from the repository root::

    python benchmarks/reward_bench.py                       # full size, GPU
    python benchmarks/reward_bench.py --grid 2 8 8 --num-anchors 64 --hidden 32 \
        --repeats 3 --out-jsonl /tmp/rb.jsonl              # quick CPU check
    python benchmarks/reward_bench.py --kinds shell --variants remat:xla:8192:bfloat16 \
        fused:xla:8192:bfloat16 fused:pallas:16384:bfloat16:64,64,4,2,64,64,8,2

Only jax, numpy, torch and shelllcc.manifold / shelllcc.rewards are imported, so that it runs on a
machine with no data-pipeline dependencies.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("shelllcc") is None:
    # The package may not be pip-installed on the benchmark machine; use this checkout.
    sys.path.insert(0, REPO_ROOT)

KINDS = ("lcc", "shell_norm", "shell", "shell_band")
RESULT_PREFIX = "@@REWARD_BENCH_RESULT "
GB = 1024.0 ** 3

# NVIDIA datasheet dense peaks (SXM parts) in TFLOP/s, used only to print a rough compute floor.
# JAX's default float32 matmul precision on Hopper is TF32; PyTorch's default is true float32.
DATASHEET_TFLOPS = {
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0},
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0},
}


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=3, default=[20, 60, 60], metavar=("T", "H", "W"),
                   help="latent grid; N = T*H*W patches of D=channels (default 20 60 60: N=72,000)")
    p.add_argument("--channels", type=int, default=16, help="latent channels = patch dimension D")
    p.add_argument("--num-anchors", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--chunk-sizes", nargs="+", default=["8192", "full"],
                   help="rows coded at once; 'full' means N (one chunk: no scan, no remat)")
    p.add_argument("--compute-dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="multiply the coder's last layer by this; freshly initialised logits are small, so "
                        "the softmax is nearly uniform, whereas a trained coder's is peaked (try 10-30 for "
                        "a harder bfloat16 accuracy check)")
    p.add_argument("--tau", type=float, default=1.0, help="target of kind=shell_band")
    p.add_argument("--variants", nargs="+", default=None,
                   help="explicit JAX variants IMPL:KERNEL:CHUNK:DTYPE[:BLOCKS] (IMPL fused|remat, KERNEL "
                        "xla|pallas|auto, CHUNK an int or 'full', BLOCKS 'bn,bk,warps,stages,bbn,bbk,bwarps,bstages[,fused|ds]' "
                        "for the Pallas kernels); replaces the --chunk-sizes x --compute-dtypes grid")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jax-matmul-precision", default="default",
                   help="jax_default_matmul_precision for the JAX workers ('default' leaves JAX's own "
                        "default, which is TF32 for float32 on Ampere/Hopper GPUs; 'highest' is true f32)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--out-jsonl", default=os.path.join(REPO_ROOT, "benchmarks", "results.jsonl"),
                   help="append one JSON object per measurement here")
    p.add_argument("--out-dir", default=None,
                   help="if given, also write reward_bench.jsonl and reward_bench.log here")
    p.add_argument("--label", default="", help="free text stored with every JSON record")
    p.add_argument("--worker-timeout", type=float, default=300.0, help="seconds per subprocess")
    # Internal: the subprocess entry points.
    p.add_argument("--_worker", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_kind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_impl", default="remat", help=argparse.SUPPRESS)
    p.add_argument("--_kernel", default="xla", help=argparse.SUPPRESS)
    p.add_argument("--_blocks", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def n_patches(args) -> int:
    t, h, w = args.grid
    return t * h * w


def parse_blocks(spec: str):
    from shelllcc.manifold.softmax_code_pallas import Blocks
    if not spec:
        return Blocks()
    fields = spec.split(",")
    if len(fields) not in (8, 9):
        raise SystemExit(f"blocks {spec!r}: expected bn,bk,warps,stages,bbn,bbk,bwarps,bstages[,fused|ds]")
    return Blocks(*(int(v) for v in fields[:8]), *fields[8:])


def resolve_variants(args) -> list[dict]:
    """JAX configurations to time: dicts of impl, kernel, chunk, dtype, blocks (a string)."""
    n = n_patches(args)
    if not args.variants:
        return [dict(impl="remat", kernel="xla", chunk=c, dtype=d, blocks="")
                for c in resolve_chunks(args) for d in args.compute_dtypes]
    out = []
    for v in args.variants:
        parts = v.split(":")
        if len(parts) not in (4, 5) or parts[0] not in ("fused", "remat") or \
                parts[1] not in ("xla", "pallas", "auto") or parts[3] not in ("float32", "bfloat16"):
            raise SystemExit(f"--variants: {v!r} is not IMPL:KERNEL:CHUNK:DTYPE[:BLOCKS]")
        chunk = n if parts[2] == "full" else int(parts[2])
        blocks = parts[4] if len(parts) == 5 else ""
        parse_blocks(blocks)
        out.append(dict(impl=parts[0], kernel=parts[1], chunk=chunk, dtype=parts[3], blocks=blocks))
    return out


def resolve_chunks(args) -> list[int]:
    n = n_patches(args)
    chunks = []
    for c in args.chunk_sizes:
        value = n if c == "full" else int(c)
        if value < 1:
            raise SystemExit(f"--chunk-sizes: {c!r} is not a positive int or 'full'")
        if value not in chunks:
            chunks.append(value)
    return chunks


# ---------------------------------------------------------------------------------------------
# Work and floor
# ---------------------------------------------------------------------------------------------

def flops(kind: str, n: int, d: int, h: int, k: int) -> tuple[float, float]:
    """(forward FLOPs, forward+backward FLOPs) of the matrix products, 2 FLOPs per multiply-add.

    Per patch: coder D*H + H*H + H*K, skeleton K*D, and for the shell kinds the shell head D*H + H*D.
    Only the gradient w.r.t. the latents is asked for, so the backward pass needs each product's input
    gradient alone, the same multiply-adds as the forward: 2x in total (0.70 TFLOP for the Wan2.1-1.3B
    size). The Pallas kernel recomputes the logits in its backward (one more N*H*K product), and the
    ``remat`` implementation the whole chunk forward; those extra products are not counted as work.
    """
    macs = d * h + h * h + h * k + k * d
    if kind != "lcc":
        macs += d * h + h * d
    fwd = 2.0 * macs * n
    return fwd, 2.0 * fwd


def datasheet_peaks(device_kind: str | None):
    if not device_kind or "pcie" in device_kind.lower():
        return None
    for name, peaks in DATASHEET_TFLOPS.items():
        if name in device_kind:
            return peaks
    return None


# ---------------------------------------------------------------------------------------------
# Inputs: prepared once in the parent (on the CPU) and shared by every worker through files
# ---------------------------------------------------------------------------------------------

def make_inputs(args, data_dir: str) -> None:
    """Random manifold parameters and latents, saved as params.npz and latents.npy."""
    import jax

    # The parent must never touch the accelerator: a live context here would hold memory while
    # the workers measure theirs.
    jax.config.update("jax_platforms", "cpu")
    from shelllcc.manifold.params import ManifoldConfig, expected_shapes, init_params

    d, k, h = args.channels, args.num_anchors, args.hidden
    rng = np.random.default_rng(args.seed)
    config = ManifoldConfig(dim=d, num_anchors=k, hidden_dim=h)
    anchors = rng.standard_normal((k, d)).astype(np.float32)
    params = init_params(jax.random.key(args.seed), config, anchors)

    def perturb(shape, centre, spread):
        return (centre + spread * rng.standard_normal(shape)).astype(np.float32)

    # Move every parameter away from its identity initial value, so that the reference comparison
    # exercises BatchNorm folding, the global scale and the shift, not only the weights.
    params = params.replace(
        scale=np.float32(1.0 + 0.1 * rng.standard_normal()),
        shift=perturb((d,), 0.0, 0.05),
        coder=params.coder.replace(bn_scale=perturb((h,), 1.0, 0.1), bn_bias=perturb((h,), 0.0, 0.1),
                                   w2=params.coder.w2 * args.logit_scale, b2=params.coder.b2 * args.logit_scale),
        bn=params.bn.replace(mean=perturb((h,), 0.0, 0.1),
                             var=rng.uniform(0.5, 1.5, (h,)).astype(np.float32)),
    )
    arrays = {}
    for path in expected_shapes(config):
        leaf = params
        for part in path.split("."):
            leaf = getattr(leaf, part)
        arrays[path] = np.asarray(leaf)
    np.savez(os.path.join(data_dir, "params.npz"), **arrays)

    # Standard normal, like Wan's normalised latents; never zeros (a zero residual is a kink of
    # every norm).
    t, hh, w = args.grid
    latents = rng.standard_normal((1, t, hh, w, d)).astype(np.float32)
    np.save(os.path.join(data_dir, "latents.npy"), latents)


def load_arrays(data_dir: str):
    with np.load(os.path.join(data_dir, "params.npz")) as f:
        arrays = {name: f[name] for name in f.files}
    return arrays, np.load(os.path.join(data_dir, "latents.npy"))


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# JAX worker
# ---------------------------------------------------------------------------------------------

def _memory_stats(device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # CPU clients may not implement it
        return {}


def _temp_bytes(compiled):
    """``temp_size_in_bytes`` of the executable's memory analysis, or None where unavailable."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):  # some versions return one entry per device
        analysis = analysis[0] if analysis else None
    value = getattr(analysis, "temp_size_in_bytes", None)
    return int(value) if value is not None else None


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    if args.jax_matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.jax_matmul_precision)
    from shelllcc.manifold.params import (BatchNormStats, CoderParams, ManifoldConfig, ManifoldParams,
                                          ShellParams, check_params)
    from shelllcc.rewards import manifold_distance

    arrays, latents = load_arrays(args._data)

    def group(prefix):
        return {name.split(".", 1)[1]: v for name, v in arrays.items() if name.startswith(prefix + ".")}

    params = ManifoldParams(anchors=arrays["anchors"], scale=arrays["scale"], shift=arrays["shift"],
                            coder=CoderParams(**group("coder")), bn=BatchNormStats(**group("bn")),
                            shell=ShellParams(**group("shell")))
    check_params(params, ManifoldConfig(dim=args.channels, num_anchors=args.num_anchors,
                                        hidden_dim=args.hidden))

    device = jax.devices()[0]
    params = jax.device_put(params, device)
    x = jax.device_put(latents, device)
    jax.block_until_ready((params, x))
    before = _memory_stats(device)

    kind, chunk, dtype = args._kind, args._chunk, jnp.dtype(args._dtype)
    target = args.tau if kind == "shell_band" else None

    blocks = parse_blocks(args._blocks)

    def distance(p, z):
        return manifold_distance(p, z, kind, target, chunk_size=chunk, compute_dtype=dtype,
                                 implementation=args._impl, kernel=args._kernel, blocks=blocks)

    # Parameters are an argument, not a closure: a frozen manifold is passed in at fine-tuning time,
    # and closed-over arrays would be baked into the executable as constants.
    step = jax.jit(jax.value_and_grad(distance, argnums=1))
    t0 = time.perf_counter()
    compiled = step.lower(params, x).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = compiled(params, x)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3)
    value, grad = out
    after = _memory_stats(device)

    peak = None
    if "peak_bytes_in_use" in after and "bytes_in_use" in before:
        # The peak counter cannot be reset, so it also covers compilation (e.g. autotuning scratch);
        # temp_size_in_bytes below is the executable's own requirement.
        peak = (after["peak_bytes_in_use"] - before["bytes_in_use"]) / GB
    temp = _temp_bytes(compiled)

    np.savez(args._result, value=np.asarray(value, np.float64), grad=np.asarray(grad, np.float32))
    emit({"ms": statistics.median(times), "ms_min": min(times), "peak_gb": peak,
          "temp_gb": None if temp is None else temp / GB, "compile_s": compile_s,
          "device_kind": device.device_kind, "platform": device.platform, "value": float(value),
          "jax_version": jax.__version__,
          "matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None) or "default")})


# ---------------------------------------------------------------------------------------------
# PyTorch reference worker: the DESIGN formulas written plainly, float32, eager, no chunking
# ---------------------------------------------------------------------------------------------

def torch_worker(args) -> None:
    import torch
    from torch import nn

    arrays, latents = load_arrays(args._data)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, k, h = args.channels, args.num_anchors, args.hidden

    def t(name):
        return torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dev)

    # Coder f: Linear -> BatchNorm1d (eval: running statistics) -> ReLU -> Linear -> ReLU -> Linear.
    coder = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h, eps=1e-5), nn.ReLU(),
                          nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k)).to(dev)
    # Shell head g: Linear -> ReLU -> Linear.
    shell = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)).to(dev)
    with torch.no_grad():
        for layer, w, b in ((coder[0], "coder.w0", "coder.b0"), (coder[3], "coder.w1", "coder.b1"),
                            (coder[5], "coder.w2", "coder.b2"), (shell[0], "shell.w0", "shell.b0"),
                            (shell[2], "shell.w1", "shell.b1")):
            layer.weight.copy_(t(w).T)  # JAX stores [in, out]; nn.Linear.weight is [out, in]
            layer.bias.copy_(t(b))
        coder[1].weight.copy_(t("coder.bn_scale"))
        coder[1].bias.copy_(t("coder.bn_bias"))
        coder[1].running_mean.copy_(t("bn.mean"))
        coder[1].running_var.copy_(t("bn.var"))
    for module in (coder, shell):
        module.eval()
        module.requires_grad_(False)  # the manifold is frozen: only d(distance)/d(latents) is wanted
    anchors, scale, shift = t("anchors"), t("scale"), t("shift")
    kind, tau = args._kind, args.tau

    def distance(x):
        z = x.reshape(-1, d)
        w = torch.softmax(coder(z), dim=-1)           # [N, K] coding weights
        zhat = scale * (w @ anchors) + shift          # skeleton point
        if kind == "lcc":
            return ((z - zhat) ** 2).sum(-1).mean()
        lv = shell(zhat)                              # per-dimension log-variance
        delta = (z - zhat) / (torch.exp(lv) + 1e-6)
        norm = delta.norm(dim=-1)
        if kind == "shell_norm":
            return norm.mean()
        if kind == "shell":
            return (norm - 1.0).abs().mean()
        return (norm.mean() - tau).abs()

    x = torch.from_numpy(latents).to(dev).requires_grad_(True)
    cuda = dev.type == "cuda"

    def step():
        x.grad = None
        value = distance(x)
        value.backward()
        return value

    for _ in range(args.warmup):
        step()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        x.grad = None
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            value = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            value = step()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - baseline) / GB

    np.savez(args._result, value=np.float64(value.item()), grad=x.grad.detach().cpu().numpy())
    emit({"ms": statistics.median(times), "ms_min": min(times), "peak_gb": peak,
          "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
          "value": float(value.item()), "torch_version": torch.__version__,
          "float32_matmul_precision": torch.get_float32_matmul_precision()})


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, compare, record, print
# ---------------------------------------------------------------------------------------------

class Log:
    """Prints and, with --out-dir, mirrors every line to reward_bench.log as it goes (so that a run
    cut off by a time limit still leaves its log behind)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "reward_bench.log") if out_dir else None

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def run_worker(args, log, which, data_dir, result_path, kind, variant=None):
    """Runs one worker subprocess; returns (result dict, arrays) or (None, None) on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", which, "--_data", data_dir,
           "--_result", result_path, "--_kind", kind,
           "--channels", str(args.channels), "--num-anchors", str(args.num_anchors),
           "--hidden", str(args.hidden), "--tau", repr(args.tau), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--jax-matmul-precision", args.jax_matmul_precision]
    if which == "jax":
        cmd += ["--_chunk", str(variant["chunk"]), "--_dtype", variant["dtype"], "--_impl", variant["impl"],
                "--_kernel", variant["kernel"], "--_blocks", variant["blocks"]]
    label = variant_label(variant) if variant else ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        log(f"  ! {which} worker ({kind} {label}) timed out after {args.worker_timeout:g} s")
        return None, None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        log(f"  ! {which} worker ({kind} {label}) failed with exit code {proc.returncode}; "
            "last lines of its output:")
        for ln in (proc.stdout + proc.stderr).strip().splitlines()[-15:]:
            log("    " + ln)
        return None, None
    with np.load(result_path) as f:
        arrays = {"value": float(f["value"]), "grad": f["grad"].astype(np.float64)}
    return json.loads(lines[-1][len(RESULT_PREFIX):]), arrays


def variant_label(v: dict) -> str:
    return ":".join(str(x) for x in (v["impl"], v["kernel"], v["chunk"], v["dtype"])) + \
        (f":{v['blocks']}" if v["blocks"] else "")


def package_version(name: str):
    # From the installed metadata: importing torch in the parent is slow and not needed.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(log, rows):
    cols = [("kind", "kind", "s"), ("impl", "implementation", "s"), ("kernel", "kernel", "s"),
            ("chunk", "chunk_size", "d"), ("dtype", "compute_dtype", "s"), ("blocks", "blocks", "s"),
            ("jax_ms", "jax_ms", ".2f"), ("jax_peak_gb", "jax_peak_gb", ".3f"),
            ("jax_temp_gb", "jax_temp_gb", ".3f"), ("torch_ms", "torch_ms", ".2f"),
            ("torch_peak_gb", "torch_peak_gb", ".3f"), ("speedup", "speedup_vs_torch", ".2f"),
            ("value_rel_err", "value_rel_err", ".1e"), ("grad_rel_err", "grad_rel_err", ".1e"),
            ("jax_TFLOP/s", "jax_tflops", ".1f")]
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
    variants = resolve_variants(args)
    n, d, k, h = n_patches(args), args.channels, args.num_anchors, args.hidden
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    log(f"reward_bench  {date}")
    log(f"command: {command}")
    log(f"jax {package_version('jax')}, torch {package_version('torch')}, python {sys.version.split()[0]}")
    log(f"latent [1, {args.grid[0]}, {args.grid[1]}, {args.grid[2]}, {d}]: N={n:,} patches, D={d}, "
        f"K={k}, hidden={h}, logit scale={args.logit_scale:g}; repeats={args.repeats}, warmup={args.warmup}, "
        f"jax matmul precision={args.jax_matmul_precision}")
    log("work (matrix products, 2 FLOPs per multiply-add; per patch: coder D*H + H*H + H*K, skeleton K*D, "
        "shell D*H + H*D for the shell kinds; forward 1x, input-gradient backward 1x):")
    for kind in args.kinds:
        fwd, total = flops(kind, n, d, h, k)
        log(f"  {kind:>10}: forward {fwd / 1e9:.4g} GFLOP, forward+backward ~{total / 1e9:.4g} GFLOP")
    log("  (executed on top of that: remat recomputes each chunk's forward, the Pallas kernel the N*H*K logits)")
    log(f"  one N x K float32 matrix (logits / coding weights) is {n * k * 4 / GB:.3f} GB")

    data_dir = tempfile.mkdtemp(prefix="reward_bench_")
    rows = []
    try:
        make_inputs(args, data_dir)
        for kind in args.kinds:
            torch_res = torch_arr = None
            if not args.no_torch:
                torch_res, torch_arr = run_worker(args, log, "torch", data_dir,
                                                  os.path.join(data_dir, f"torch_{kind}.npz"), kind)
                if torch_res:
                    log(f"torch {kind:>10}: {torch_res['ms']:9.2f} ms  peak {fmt(torch_res['peak_gb'], '.3f')} "
                        f"GB  value {torch_res['value']:.6g}  on {torch_res['device_name']}")
            for i, variant in enumerate(variants):
                res, arr = run_worker(args, log, "jax", data_dir, os.path.join(data_dir, f"jax_{kind}_{i}.npz"),
                                      kind, variant)
                row = record(args, command, date, kind, variant, res, arr, torch_res, torch_arr)
                rows.append(row)
                write_jsonl(args, row)
                log(f"jax   {kind:>10}  {variant_label(variant)}: {fmt(row['jax_ms'], '9.2f')} ms  "
                    f"peak {fmt(row['jax_peak_gb'], '.3f')} GB  temp {fmt(row['jax_temp_gb'], '.3f')} GB  "
                    f"value {fmt(row['jax_value'], '.6g')}  value rel err {fmt(row['value_rel_err'], '.1e')}  "
                    f"grad rel err {fmt(row['grad_rel_err'], '.1e')}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    log()
    device_kind = next((r["jax_device"] for r in rows if r.get("jax_device")), None)
    peaks = datasheet_peaks(device_kind)
    if peaks:
        log(f"compute floor at {device_kind} datasheet dense peaks "
            f"(fp32 {peaks['fp32']:.0f}, tf32 {peaks['tf32']:.0f}, bf16 {peaks['bf16']:.0f} TFLOP/s):")
        for kind in args.kinds:
            total = flops(kind, n, d, h, k)[1]
            log(f"  {kind:>10}: fp32 {total / peaks['fp32'] / 1e9:.2f} ms, tf32 {total / peaks['tf32'] / 1e9:.2f} ms, "
                f"bf16 {total / peaks['bf16'] / 1e9:.2f} ms")
    log("notes: speedup = torch_ms / jax_ms; errors are relative to the PyTorch float32 run "
        "(|a-b|/|b| for the value, ||a-b||/||b|| for the gradient). jax_peak_gb is the allocator's "
        "peak minus the bytes in use before compiling, so it can include compile-time scratch; "
        "jax_temp_gb is the executable's temp buffer size. JAX's default float32 matmul precision "
        "on Ampere/Hopper GPUs is TF32 (PyTorch's is true float32), which alone gives ~1e-3 float32 "
        "differences there; rerun with --jax-matmul-precision highest to compare exact float32.")
    log()
    print_table(log, rows)


def record(args, command, date, kind, variant, res, arr, torch_res, torch_arr) -> dict:
    n = n_patches(args)
    total_flops = flops(kind, n, args.channels, args.hidden, args.num_anchors)[1]
    jax_ms = res["ms"] if res else None
    torch_ms = torch_res["ms"] if torch_res else None
    jax_device = res["device_kind"] if res else None
    torch_device = torch_res["device_name"] if torch_res else None
    return {
        "bench": "reward_bench",
        "device": " / ".join(x for x in (jax_device, torch_device) if x) or None,
        "date": date, "command": command, "label": args.label,
        "kind": kind, "implementation": variant["impl"], "kernel": variant["kernel"],
        "chunk_size": variant["chunk"], "compute_dtype": variant["dtype"], "blocks": variant["blocks"],
        "grid": list(args.grid), "n_patches": n, "dim": args.channels,
        "num_anchors": args.num_anchors, "hidden_dim": args.hidden,
        "jax_ms": jax_ms, "jax_ms_min": res["ms_min"] if res else None,
        "jax_peak_gb": res["peak_gb"] if res else None, "jax_temp_gb": res["temp_gb"] if res else None,
        "jax_compile_s": res["compile_s"] if res else None,
        "torch_ms": torch_ms, "torch_ms_min": torch_res["ms_min"] if torch_res else None,
        "torch_peak_gb": torch_res["peak_gb"] if torch_res else None,
        "speedup_vs_torch": torch_ms / jax_ms if jax_ms and torch_ms else None,
        "value_rel_err": rel_err(arr["value"], torch_arr["value"]) if arr and torch_arr else None,
        "grad_rel_err": rel_err(arr["grad"], torch_arr["grad"]) if arr and torch_arr else None,
        "jax_value": arr["value"] if arr else None, "torch_value": torch_arr["value"] if torch_arr else None,
        "flops": total_flops, "jax_tflops": total_flops / jax_ms / 1e9 if jax_ms else None,
        "jax_device": jax_device, "torch_device": torch_device,
        "jax_matmul_precision": res["matmul_precision"] if res else args.jax_matmul_precision,
        "torch_float32_matmul_precision": torch_res["float32_matmul_precision"] if torch_res else None,
        "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
        "tau": args.tau if kind == "shell_band" else None, "logit_scale": args.logit_scale,
        "jax_version": res["jax_version"] if res else package_version("jax"),
        "torch_version": torch_res["torch_version"] if torch_res else package_version("torch"),
        "error": None if res else "jax worker failed (see the log)",
    }


def write_jsonl(args, row: dict, name: str = "reward_bench") -> None:
    """Append ``row`` to ``--out-jsonl`` and, with ``--out-dir``, to ``OUT_DIR/<name>.jsonl``."""
    line = json.dumps(row) + "\n"
    paths = [args.out_jsonl] + ([os.path.join(args.out_dir, f"{name}.jsonl")] if args.out_dir else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed._worker == "jax":
        jax_worker(parsed)
    elif parsed._worker == "torch":
        torch_worker(parsed)
    else:
        main(parsed)
