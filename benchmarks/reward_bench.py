#!/usr/bin/env python
"""Benchmark of the manifold rewards: forward + gradient w.r.t. the latents (DESIGN 2.3).

For every kind and JAX variant (implementation ``fused`` or ``remat``, kernel ``xla`` or ``pallas``,
chunk_size, compute_dtype, Pallas tile sizes; ``--variants``) it times ``jax.value_and_grad`` of
``shelllcc.rewards.manifold_distance`` on one latent (default ``[1, 20, 60, 60, 16]``, N = 72,000
patches of D = 16, K = 4096 anchors, hidden width 512) and compares it with a plain PyTorch eager
float32 implementation of the same formulas (all N patches at once, ``.backward()``), which also
serves as the numerical reference for the JAX value and gradient.

Every measurement runs in its own subprocess (``--_worker jax|torch``, ``benchmarks/harness.py``) so that one
configuration's peak memory, compilation caches and allocator state cannot leak into the next; the parent
process only prepares the inputs (on the CPU: a random manifold saved as a reference checkpoint, read by the
JAX worker with ``third_party.shell_lcc_reference.load_manifold`` and by the PyTorch worker as
``third_party.shell_lcc_torch.ReferenceManifold``), collects the results and prints the table.

Run from the repository root::

    python benchmarks/reward_bench.py                       # full size, GPU
    python benchmarks/reward_bench.py --grid 2 8 8 --num-anchors 64 --hidden 32 \
        --repeats 3 --out-jsonl /tmp/rb.jsonl              # quick CPU check
    python benchmarks/reward_bench.py --kinds shell --variants remat:xla:8192:bfloat16 \
        fused:xla:8192:bfloat16 fused:pallas:16384:bfloat16:64,64,4,2,64,64,8,2

Only jax, numpy, torch, shelllcc.manifold / shelllcc.rewards and third_party are imported, so that it runs
on a machine with no data-pipeline dependencies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness
import numpy as np

KINDS = ("lcc", "shell_norm", "shell", "shell_band")


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
    harness.add_output_args(p, label=True)
    harness.add_worker_args(p, ("jax", "torch"), timeout=300.0)
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


# ---------------------------------------------------------------------------------------------
# Inputs: prepared once in the parent (on the CPU) and shared by every worker through files
# ---------------------------------------------------------------------------------------------

def random_manifold(seed: int, d: int, k: int, h: int):
    """``(rng, config, params)``: ``init_params`` with a seeded key and standard-normal anchors, on the CPU (the
    parent must never touch the accelerator: a live context would hold memory while the workers measure theirs)."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    from shelllcc.manifold.params import ManifoldConfig, init_params

    rng = np.random.default_rng(seed)
    config = ManifoldConfig(dim=d, num_anchors=k, hidden_dim=h)
    return rng, config, init_params(jax.random.key(seed), config, rng.standard_normal((k, d)).astype(np.float32))


def make_inputs(args, data_dir: str) -> None:
    """Random manifold parameters and latents, saved as manifold.pt (the reference format) and latents.npy."""
    from third_party.shell_lcc_reference import save_manifold

    d, h = args.channels, args.hidden
    rng, config, params = random_manifold(args.seed, d, args.num_anchors, h)

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
    save_manifold(params, config, os.path.join(data_dir, "manifold.pt"))

    # Standard normal, like Wan's normalised latents; never zeros (a zero residual is a kink of
    # every norm).
    t, hh, w = args.grid
    latents = rng.standard_normal((1, t, hh, w, d)).astype(np.float32)
    np.save(os.path.join(data_dir, "latents.npy"), latents)


# ---------------------------------------------------------------------------------------------
# JAX worker
# ---------------------------------------------------------------------------------------------

def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    if args.jax_matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.jax_matmul_precision)
    from shelllcc.rewards import manifold_distance
    from third_party.shell_lcc_reference import load_manifold

    params, _ = load_manifold(os.path.join(args._data, "manifold.pt"))
    device = jax.devices()[0]
    params = jax.device_put(params, device)
    x = jax.device_put(np.load(os.path.join(args._data, "latents.npy")), device)
    jax.block_until_ready((params, x))
    before = harness.jax_memory(device).get("bytes_in_use", 0)

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

    times = harness.timed(lambda: compiled(params, x), args.repeats, args.warmup)
    value, grad = compiled(params, x)
    # The peak counter cannot be reset, so it also covers compilation (e.g. autotuning scratch); temp_gb is
    # the executable's own requirement.
    peak = harness.jax_peak_gb([device], before)

    np.savez(args._result, value=np.asarray(value, np.float64), grad=np.asarray(grad, np.float32))
    harness.emit({"ms": statistics.median(times), "ms_min": min(times), "peak_gb": peak,
                  "temp_gb": harness.memory_analysis(compiled).get("temp_gb"), "compile_s": compile_s,
                  "device_kind": device.device_kind, "platform": device.platform, "value": float(value),
                  "jax_version": jax.__version__,
                  "matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None) or "default")})


# ---------------------------------------------------------------------------------------------
# PyTorch reference worker: third_party.shell_lcc_torch, float32, eager, no chunking
# ---------------------------------------------------------------------------------------------

def torch_worker(args) -> None:
    import torch

    from third_party.shell_lcc_torch import ReferenceManifold

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Frozen (eval: BatchNorm's running statistics): only d(distance)/d(latents) is wanted.
    model = ReferenceManifold.load(os.path.join(args._data, "manifold.pt")).to(dev).requires_grad_(False)
    x = torch.from_numpy(np.load(os.path.join(args._data, "latents.npy"))).to(dev).requires_grad_(True)

    def step():
        x.grad = None
        value = model.distance(x.reshape(-1, args.channels), args._kind, args.tau)
        value.backward()
        return value

    sync = harness.torch_sync(dev)
    harness.timed(step, 0, args.warmup, sync)
    x.grad = None
    baseline = harness.torch_peak_reset(dev)
    times = harness.timed(step, args.repeats, sync=sync)
    peak = harness.torch_peak_gb(dev, baseline)
    value = step()

    np.savez(args._result, value=np.float64(value.item()), grad=x.grad.detach().cpu().numpy())
    harness.emit({"ms": statistics.median(times), "ms_min": min(times), "peak_gb": peak,
                  "device_name": harness.torch_device_name(dev), "value": float(value.item()),
                  "torch_version": torch.__version__,
                  "float32_matmul_precision": torch.get_float32_matmul_precision()})


# ---------------------------------------------------------------------------------------------
# Parent: run the workers, compare, record, print
# ---------------------------------------------------------------------------------------------

def run_worker(args, bench, which, data_dir, result_path, kind, variant=None):
    """Runs one worker subprocess; returns (result dict, arrays) or (None, None) on failure."""
    cmd = harness.script_cmd(__file__, "--_worker", which, "--_data", data_dir, "--_result", result_path,
                             "--_kind", kind, "--channels", args.channels, "--num-anchors", args.num_anchors,
                             "--hidden", args.hidden, "--tau", repr(args.tau), "--repeats", args.repeats,
                             "--warmup", args.warmup, "--jax-matmul-precision", args.jax_matmul_precision)
    if which == "jax":
        cmd += ["--_chunk", str(variant["chunk"]), "--_dtype", variant["dtype"], "--_impl", variant["impl"],
                "--_kernel", variant["kernel"], "--_blocks", variant["blocks"]]
    done = harness.run(cmd, timeout=args.worker_timeout)
    if done.error:
        bench.failed(f"{which} worker ({kind} {variant_label(variant) if variant else ''})", done)
        return None, None
    with np.load(result_path) as f:
        arrays = {"value": float(f["value"]), "grad": f["grad"].astype(np.float64)}
    return done.result, arrays


def variant_label(v: dict) -> str:
    return ":".join(str(x) for x in (v["impl"], v["kernel"], v["chunk"], v["dtype"])) + \
        (f":{v['blocks']}" if v["blocks"] else "")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else float(np.linalg.norm(a - b))


TABLE = [("kind", "kind", "s"), ("impl", "implementation", "s"), ("kernel", "kernel", "s"),
         ("chunk", "chunk_size", "d"), ("dtype", "compute_dtype", "s"), ("blocks", "blocks", "s"),
         ("jax_ms", "jax_ms", ".2f"), ("jax_peak_gb", "jax_peak_gb", ".3f"), ("jax_temp_gb", "jax_temp_gb", ".3f"),
         ("torch_ms", "torch_ms", ".2f"), ("torch_peak_gb", "torch_peak_gb", ".3f"),
         ("speedup", "speedup_vs_torch", ".2f"), ("value_rel_err", "value_rel_err", ".1e"),
         ("grad_rel_err", "grad_rel_err", ".1e"), ("jax_TFLOP/s", "jax_tflops", ".1f")]


def main(args) -> None:
    bench = harness.Bench("reward_bench", args.out_jsonl, args.out_dir)
    log, fmt = bench.log, harness.fmt
    variants = resolve_variants(args)
    n, d, k, h = n_patches(args), args.channels, args.num_anchors, args.hidden

    log(f"reward_bench  {bench.date}")
    log(f"command: {bench.command}")
    log(f"jax {harness.package_version('jax')}, torch {harness.package_version('torch')}, "
        f"python {sys.version.split()[0]}")
    log(f"latent [1, {args.grid[0]}, {args.grid[1]}, {args.grid[2]}, {d}]: N={n:,} patches, D={d}, "
        f"K={k}, hidden={h}, logit scale={args.logit_scale:g}; repeats={args.repeats}, warmup={args.warmup}, "
        f"jax matmul precision={args.jax_matmul_precision}")
    log("work (matrix products, 2 FLOPs per multiply-add; per patch: coder D*H + H*H + H*K, skeleton K*D, "
        "shell D*H + H*D for the shell kinds; forward 1x, input-gradient backward 1x):")
    for kind in args.kinds:
        fwd, total = flops(kind, n, d, h, k)
        log(f"  {kind:>10}: forward {fwd / 1e9:.4g} GFLOP, forward+backward ~{total / 1e9:.4g} GFLOP")
    log("  (executed on top of that: remat recomputes each chunk's forward, the Pallas kernel the N*H*K logits)")
    log(f"  one N x K float32 matrix (logits / coding weights) is {n * k * 4 / harness.GB:.3f} GB")

    data_dir = tempfile.mkdtemp(prefix="reward_bench_")
    rows = []
    try:
        make_inputs(args, data_dir)
        for kind in args.kinds:
            torch_res = torch_arr = None
            if not args.no_torch:
                torch_res, torch_arr = run_worker(args, bench, "torch", data_dir,
                                                  os.path.join(data_dir, f"torch_{kind}.npz"), kind)
                if torch_res:
                    log(f"torch {kind:>10}: {torch_res['ms']:9.2f} ms  peak {fmt(torch_res['peak_gb'], '.3f')} "
                        f"GB  value {torch_res['value']:.6g}  on {torch_res['device_name']}")
            for i, variant in enumerate(variants):
                res, arr = run_worker(args, bench, "jax", data_dir, os.path.join(data_dir, f"jax_{kind}_{i}.npz"),
                                      kind, variant)
                row = bench.record(**record(args, kind, variant, res, arr, torch_res, torch_arr))
                rows.append(row)
                log(f"jax   {kind:>10}  {variant_label(variant)}: {fmt(row['jax_ms'], '9.2f')} ms  "
                    f"peak {fmt(row['jax_peak_gb'], '.3f')} GB  temp {fmt(row['jax_temp_gb'], '.3f')} GB  "
                    f"value {fmt(row['jax_value'], '.6g')}  value rel err {fmt(row['value_rel_err'], '.1e')}  "
                    f"grad rel err {fmt(row['grad_rel_err'], '.1e')}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    log()
    device_kind = next((r["jax_device"] for r in rows if r.get("jax_device")), None)
    peaks = harness.datasheet(device_kind)
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
    bench.table(TABLE, rows)


def record(args, kind, variant, res, arr, torch_res, torch_arr) -> dict:
    n = n_patches(args)
    total_flops = flops(kind, n, args.channels, args.hidden, args.num_anchors)[1]
    jax_ms = res["ms"] if res else None
    torch_ms = torch_res["ms"] if torch_res else None
    jax_device = res["device_kind"] if res else None
    torch_device = torch_res["device_name"] if torch_res else None
    return {
        "device": " / ".join(x for x in (jax_device, torch_device) if x) or None, "label": args.label,
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
        "jax_version": res["jax_version"] if res else harness.package_version("jax"),
        "torch_version": torch_res["torch_version"] if torch_res else harness.package_version("torch"),
        "error": None if res else "jax worker failed (see the log)",
    }


if __name__ == "__main__":
    parsed = parse_args()
    {"jax": jax_worker, "torch": torch_worker}.get(parsed._worker, main)(parsed)
