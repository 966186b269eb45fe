#!/usr/bin/env python
"""The softmax-coding kernels alone, against one plain matrix product of the same size.

Times, at the Wan2.1-1.3B reward size (``h [N, H]``, ``W [H, K]``, anchors ``[K, D]``; default
N = 72,000, H = 512, K = 4096, D = 16, bf16 operands):

* ``gemm``: ``h @ W`` through XLA (float32 result): the one ``N x H x K`` product the forward must do,
  at the GEMM library's efficiency; the reference for what a kernel built around it can reach;
* ``forward``: ``shelllcc.manifold.softmax_code_pallas.forward`` per tile configuration;
* ``backward``: ``backward_h`` per configuration (``fused``: dh accumulated in the kernel, two
  ``N x H x K`` products; ``ds``: the kernel writes ``ds`` and XLA multiplies it by ``W^T``).

Each configuration's result is checked against XLA's plain formulas in float32 (relative error) before
it is timed; a configuration that fails to compile (e.g. too much shared memory) is reported and skipped.

    python benchmarks/softmax_code_bench.py --out-dir $OUT/kernels
"""

from __future__ import annotations

import argparse
import statistics

import harness
import numpy as np

FORWARD = ["64,64,4,2", "64,128,4,2", "64,32,4,3", "128,32,8,2", "128,64,8,1", "64,64,4,4"]
BACKWARD = ["64,64,8,2,fused", "32,64,4,2,fused", "64,32,8,2,fused", "64,64,4,2,ds", "128,64,8,2,ds",
            "128,128,8,2,ds", "64,128,4,3,ds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=72000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--num-anchors", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--forward", nargs="*", default=FORWARD, help="bn,bk,warps,stages")
    p.add_argument("--backward", nargs="*", default=BACKWARD, help="bn,bk,warps,stages,fused|ds")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--logit-scale", type=float, default=1.0)
    harness.add_output_args(p)
    args = p.parse_args()
    bench = harness.Bench("softmax_code_bench", args.out_jsonl, args.out_dir)
    log = bench.log

    import jax
    import jax.numpy as jnp

    from shelllcc.manifold import softmax_code_pallas as sp

    n, hid, k, d = args.n, args.hidden, args.num_anchors, args.dim
    rng = np.random.default_rng(0)
    h = jnp.asarray(np.maximum(rng.standard_normal((n, hid)), 0), jnp.float32)      # post-ReLU
    w = jnp.asarray(rng.standard_normal((hid, k)) * args.logit_scale / np.sqrt(hid), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal(k), jnp.float32)
    a = jnp.asarray(rng.standard_normal((k, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    device = jax.devices()[0]
    interpret = jax.default_backend() != "gpu"     # CPU: Pallas interpret mode, for checking the script
    log(f"softmax_code_bench {bench.date} on {device.device_kind}, jax {jax.__version__}")
    log(f"N={n} H={hid} K={k} D={d}; one N*H*K product = {2 * n * hid * k / 1e12:.3f} TFLOP")

    def timeit(fn, *xs):
        out = jax.block_until_ready(fn(*xs))
        return statistics.median(harness.timed(lambda: fn(*xs), args.repeats)), out

    # references in float32 XLA
    @jax.jit
    def ref_fwd(h, w, b, a):
        s = jnp.dot(h, w, precision="highest") + b
        lse = jax.nn.logsumexp(s, axis=1)
        return jnp.dot(jnp.exp(s - lse[:, None]), a, precision="highest"), lse

    @jax.jit
    def ref_bwd(h, w, b, a, g, lse, delta):
        p_ = jnp.exp(jnp.dot(h, w, precision="highest") + b - lse[:, None])
        ds = p_ * (jnp.dot(g, a.T, precision="highest") - delta[:, None])
        return jnp.dot(ds, w.T, precision="highest")

    y_ref, lse_ref = ref_fwd(h, w, b, a)
    delta = jnp.sum(g * y_ref, axis=1)
    dh_ref = ref_bwd(h, w, b, a, g, lse_ref, delta)
    rel = lambda x, r: float(jnp.linalg.norm(x - r) / jnp.linalg.norm(r))
    flop = 2.0 * n * hid * k
    rows = []

    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    gemm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    ms, _ = timeit(gemm, hb, wb)
    rows.append(dict(part="gemm", config="xla bf16 -> f32", ms=ms, tflops=flop / ms / 1e9, err=None))

    for spec in args.forward:
        bn, bk, nw, ns = (int(v) for v in spec.split(","))
        blocks = sp.Blocks(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
        fn = jax.jit(lambda h, w, b, a, blocks=blocks: sp.forward(h, w, b, a, compute_dtype=jnp.bfloat16,
                                                                   blocks=blocks, interpret=interpret))
        try:
            ms, (y, lse) = timeit(fn, h, w, b, a)
            rows.append(dict(part="forward", config=spec, ms=ms, tflops=flop / ms / 1e9,
                             err=max(rel(y, y_ref), rel(lse, lse_ref))))
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result
            rows.append(dict(part="forward", config=spec, ms=None, tflops=None, err=None,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        log(f"forward {spec}: {rows[-1]}")

    for spec in args.backward:
        f = spec.split(",")
        blocks = sp.Blocks(bwd_block_n=int(f[0]), bwd_block_k=int(f[1]), bwd_num_warps=int(f[2]),
                           bwd_num_stages=int(f[3]), backward=f[4])
        fn = jax.jit(lambda h, w, b, a, g, lse, delta, blocks=blocks: sp.backward_h(
            h, w, b, a, g, lse, delta, compute_dtype=jnp.bfloat16, blocks=blocks, interpret=interpret))
        try:
            ms, dh = timeit(fn, h, w, b, a, g, lse_ref, delta)
            rows.append(dict(part="backward", config=spec, ms=ms, tflops=2 * flop / ms / 1e9, err=rel(dh, dh_ref)))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(part="backward", config=spec, ms=None, tflops=None, err=None,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        log(f"backward {spec}: {rows[-1]}")

    log()
    log("part      config               ms   TFLOP/s (useful)  rel.err vs f32")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        log(f"{r['part']:<9} {r['config']:<18} {ms:>7} {tf:>9}  {err:>12}  {r.get('error', '')}")
    log("(forward: one N*H*K product of useful work; backward: two, the recomputed logits and dh)")
    for r in rows:
        bench.record(device=device.device_kind, n=n, hidden_dim=hid, num_anchors=k, dim=d,
                     logit_scale=args.logit_scale, part=r["part"], config=r["config"], ms=r["ms"],
                     tflops=r["tflops"], rel_err_vs_f32=r["err"], error=r.get("error"), jax_version=jax.__version__)


if __name__ == "__main__":
    main()
