"""Wan2.1 DiT training step (forward + backward) in JAX next to diffusers' WanTransformer3DModel.

    python benchmarks/dit_bench.py --out-dir $OUT
    python benchmarks/dit_bench.py --preset tiny --grid 3 8 8 --text-len 16 --variants jax:none   # CPU smoke

Both sides: random weights in bf16, batch 1, latent ``[1, 21, 60, 104, 16]`` (81 frames at 480x832),
512 text tokens of dim 4096, loss ``mean((v - target)^2)`` in float32, gradients of every parameter,
no optimizer update. Each variant runs in its own process (``benchmarks/harness.py``) so peak memory is its
own. Variants:
``jax:<remat policy>[:<attention impl>[:<xla flag preset>]]`` and ``diffusers:plain`` /
``diffusers:checkpointing``. Flag presets (appended to ``XLA_FLAGS`` of that worker): ``cublas``
(matrix products through cuBLAS rather than XLA's Triton GEMM fusions).

FLOPs are counted from the architecture (matmuls and attention, x3 for forward + backward):
per block ``2 * (4 D^2 + 2 D F) * N + 2 * 2 D^2 * (N + L) + 4 N^2 D + 4 N L D`` forward multiply-adds
x2, with N video tokens, L text tokens, D model dim, F FFN dim. MFU is achieved FLOP/s over the
GPU's dense bf16 peak (989 TFLOP/s for H100 SXM and H200).
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness

XLA_FLAG_PRESETS = {"": "", "cublas": "--xla_gpu_enable_triton_gemm=false"}


def train_flops(dim, ffn, layers, n_tokens, text_len, text_dim, patch_volume, channels,
                weight_grads: bool = True) -> float:
    """Forward + backward FLOPs of one training step, matmuls and attention only: 3x the forward, or, without
    weight gradients (LoRA: the adapters' products are negligible), 2x the forward for the weight products and
    still 3x for attention's (it has no weights)."""
    linear = (2 * (4 * dim * dim + 2 * dim * ffn) * n_tokens         # self-attn q,k,v,o + FFN
              + 2 * (2 * dim * dim) * n_tokens                        # cross-attn q, o
              + 2 * (2 * dim * dim) * text_len)                       # cross-attn k, v (on the text)
    attention = 4 * n_tokens * n_tokens * dim + 4 * n_tokens * text_len * dim   # scores and values, both layers
    outside = (2 * text_len * (text_dim * dim + dim * dim)           # text embedder
               + 2 * n_tokens * dim * patch_volume * channels * 2)    # patch embed + head
    return (3.0 if weight_grads else 2.0) * (layers * linear + outside) + 3.0 * layers * attention


def _jax_worker(args, variant: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shelllcc import parallel
    from shelllcc.models.wan_transformer import WanTransformer, get_config
    from shelllcc.training import lora

    parts = variant.split(":")
    remat = parts[1] if len(parts) > 1 else "none"
    attention = parts[2] if len(parts) > 2 else None
    cfg = get_config(args.preset, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=remat,
                     attention_impl=attention)
    t, h, w = args.grid

    def make():
        model = WanTransformer(cfg, rngs=nnx.Rngs(0))
        if args.lora_rank:
            lora.apply_lora(model, rank=args.lora_rank, alpha=float(args.lora_rank), rngs=nnx.Rngs(1),
                            param_dtype=jnp.bfloat16)
        return model

    graphdef, abstract_params, abstract_rest = nnx.split(nnx.eval_shape(make),
                                                         lora.lora_filter if args.lora_rank else nnx.Param, ...)
    # The project's own init, one program per parameter on the device (parallel.init_per_leaf): no host copy
    # of the weights, which a 14B model would not fit twice.
    t_init = time.perf_counter()
    params, rest = parallel.init_per_leaf(
        lambda: nnx.split(make(), lora.lora_filter if args.lora_rank else nnx.Param, ...)[1:])
    init_s = time.perf_counter() - t_init
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(keys[0], (1, t, h, w, cfg.in_channels), jnp.bfloat16)
    target = jax.random.normal(keys[1], x.shape, jnp.float32)
    ctx = jax.random.normal(keys[2], (1, args.text_len, cfg.text_dim), jnp.bfloat16)
    timestep = jnp.array([700.0], jnp.float32)

    @jax.jit
    def step(params, rest, x, timestep, ctx, target):
        # rest (the frozen weights under LoRA) is an argument: closed over, it would be captured as constants
        # (28.6 GB for 14B) into the program
        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(x, timestep, ctx)
            return jnp.mean(jnp.square(out.astype(jnp.float32) - target))
        return jax.value_and_grad(loss_fn)(params)

    device = jax.devices()[0]
    t0 = time.perf_counter()
    loss, _ = jax.block_until_ready(step(params, rest, x, timestep, ctx, target))   # no update: same every step
    compile_s = time.perf_counter() - t0
    times = harness.timed(lambda: step(params, rest, x, timestep, ctx, target), args.repeats, args.warmup)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    return dict(side="jax", variant=variant, step_ms=statistics.median(times), step_ms_min=min(times),
                peak_gb=harness.jax_peak_gb([device]), compile_s=compile_s, init_s=init_s,
                loss=float(loss), n_params=int(n_params), device_name=device.device_kind,
                versions=dict(jax=jax.__version__), dims=(cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_dim,
                                                          cfg.patch_volume, cfg.in_channels, cfg.patch_size))


def diffusers_transformer(cfg, dev):
    """diffusers' ``WanTransformer3DModel`` of our config's architecture, random bf16 weights born on ``dev`` (a
    host-side float32 14B would take minutes to initialise)."""
    import torch
    from diffusers import WanTransformer3DModel

    with dev:
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
            qk_norm=cfg.qk_norm, rope_max_seq_len=cfg.rope_max_seq_len)
    return model.to(dev, torch.bfloat16)


def _torch_lora(model, rank: int) -> None:
    """Freeze ``model`` and add ``y += (alpha / rank) (x A^T) B^T`` (alpha = rank, B zero, A Kaiming-uniform,
    bf16) to q, k, v and the output projection of both attention layers of every block: peft's LoRA on the
    project's ``DEFAULT_TARGETS``, written here because peft is not on the benchmark machine."""
    import math

    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                                    dtype=base.weight.dtype))
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                                    dtype=base.weight.dtype))
            torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t()) @ self.b.t()

    model.requires_grad_(False)
    for block in model.blocks:
        for attn in (block.attn1, block.attn2):
            attn.to_q, attn.to_k, attn.to_v = (LoRALinear(m) for m in (attn.to_q, attn.to_k, attn.to_v))
            attn.to_out[0] = LoRALinear(attn.to_out[0])


def _diffusers_worker(args, variant: str) -> dict:
    import diffusers
    import torch

    from shelllcc.models.wan_transformer import get_config

    cfg = get_config(args.preset)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = diffusers_transformer(cfg, dev).train()
    if args.lora_rank:
        _torch_lora(model, args.lora_rank)
    if variant.endswith("checkpointing"):
        model.enable_gradient_checkpointing()
    t, h, w = args.grid
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, cfg.in_channels, t, h, w, device=dev, dtype=torch.bfloat16, generator=g)
    target = torch.randn(x.shape, device=dev, dtype=torch.float32, generator=g)
    ctx = torch.randn(1, args.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16, generator=g)
    timestep = torch.tensor([700.0], device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, timestep, ctx, return_dict=False)[0]
        loss = torch.mean(torch.square(out.float() - target))
        loss.backward()
        return loss

    sync = harness.torch_sync(dev)
    t0 = time.perf_counter()
    loss = step()                                     # no update: the same every step
    sync(loss)
    first_s = time.perf_counter() - t0
    harness.timed(step, 0, args.warmup, sync)
    harness.torch_peak_reset(dev)
    times = harness.timed(step, args.repeats, sync=sync)
    return dict(side="diffusers", variant=variant, step_ms=statistics.median(times), step_ms_min=min(times),
                peak_gb=harness.torch_peak_gb(dev), compile_s=first_s, loss=float(loss),
                n_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                device_name=harness.torch_device_name(dev),
                versions=dict(torch=torch.__version__, diffusers=diffusers.__version__))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--grid", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "H", "W"))
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=[
        "diffusers:plain", "diffusers:checkpointing", "jax:full:cudnn", "jax:attention_saveable:cudnn",
        "jax:dots_with_no_batch_dims_saveable:cudnn"])
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train only rank-R adapters on q/k/v/o of both attention layers, both sides (0: every weight)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    harness.add_output_args(p)
    p.add_argument("--worker-timeout", type=float, default=420.0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._worker:
        harness.emit((_jax_worker if args._worker.startswith("jax") else _diffusers_worker)(args, args._worker))
        return

    bench = harness.Bench("dit_bench", args.out_jsonl, args.out_dir)
    log, rows = bench.log, []
    base = harness.script_cmd(__file__, "--preset", args.preset, "--grid", *args.grid, "--text-len", args.text_len,
                              "--repeats", args.repeats, "--warmup", args.warmup, "--lora-rank", args.lora_rank)
    for variant in args.variants:
        preset = variant.split(":")[3] if variant.startswith("jax") and variant.count(":") >= 3 else ""
        if preset not in XLA_FLAG_PRESETS:
            raise SystemExit(f"unknown XLA flag preset {preset!r} in {variant!r}; expected {sorted(XLA_FLAG_PRESETS)}")
        done = harness.run(base + ["--_worker", variant], timeout=args.worker_timeout,
                           env=harness.xla_flags_env(XLA_FLAG_PRESETS[preset]))
        if done.error:
            bench.failed(variant, done, lines=40)
            rows.append(dict(variant=variant, error=done.error))
            continue
        res = done.result
        rows.append(res)
        log(f"{variant}: {res['step_ms']:.1f} ms/step, peak {res['peak_gb'] or float('nan'):.1f} GB, "
            f"loss {res['loss']:.4f}, params {res['n_params'] / 1e9:.3f}B, first call {res['compile_s']:.1f}s")

    from shelllcc.models.wan_transformer import get_config
    cfg = get_config(args.preset)
    t, h, w = args.grid
    n_tokens = (t // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    flops = train_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, n_tokens, args.text_len, cfg.text_dim,
                        cfg.patch_volume, cfg.in_channels, weight_grads=not args.lora_rank)
    ok = [r for r in rows if "step_ms" in r]
    diff = {r["variant"]: r for r in ok if r["side"] == "diffusers"}
    log(f"\n{args.preset}, latent {tuple(args.grid)} ({n_tokens} tokens), {args.text_len} text tokens: "
        f"{flops / 1e12:.1f} TFLOP per step")
    header = f"{'variant':45s} {'step_ms':>9s} {'peak_gb':>8s} {'TFLOP/s':>8s} {'MFU':>6s}" + "".join(
        f" {'vs ' + k.split(':')[1]:>14s}" for k in diff)
    log(header)
    for r in ok:
        tflops = flops / (r["step_ms"] / 1e3) / 1e12
        peak = (harness.datasheet(r["device_name"]) or {}).get("bf16")
        mfu = tflops / peak if peak else None
        speed = {k: d["step_ms"] / r["step_ms"] for k, d in diff.items()}
        log(f"{r['variant']:45s} {r['step_ms']:9.1f} {r['peak_gb'] or 0:8.1f} {tflops:8.1f} "
            f"{(mfu or 0) * 100:5.1f}%" + "".join(f" {s:13.2f}x" for s in speed.values()))
        record = dict(device=r["device_name"], preset=args.preset, grid=list(args.grid), text_len=args.text_len,
                      lora_rank=args.lora_rank, variant=r["variant"], step_ms=r["step_ms"],
                      step_ms_min=r["step_ms_min"], peak_gb=r["peak_gb"], tflops=tflops, mfu=mfu,
                      train_tflop=flops / 1e12, n_params=r["n_params"], loss=r["loss"], versions=r["versions"])
        if r["side"] == "jax":
            for k, d in diff.items():
                tag = k.split(":")[1]
                record[f"diffusers_{tag}_step_ms"] = d["step_ms"]
                record[f"diffusers_{tag}_peak_gb"] = d["peak_gb"]
                record[f"speedup_vs_diffusers_{tag}"] = d["step_ms"] / r["step_ms"]
        bench.record(**record)


if __name__ == "__main__":
    main()
