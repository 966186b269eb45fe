"""Wan2.1 text-to-video sampling: the denoising loop and the VAE decode, this project against diffusers.

    python benchmarks/sample_bench.py --out-dir $OUT                     # GPU: every worker below
    python benchmarks/sample_bench.py --preset tiny --vae-preset tiny --grid 3 8 8 --text-len 16 --steps 3 \\
        --workers jax:loop jax:loop_batched jax:decode                   # CPU smoke

The loop (issue perf2, target 3): ``--steps`` (50) UniPC steps with classifier-free guidance ``--guidance`` (5.0),
batch 1, latent ``[1, 21, 60, 104, 16]`` (81 frames at 480x832), 512 text tokens of dim 4096 for the prompt and
as many for the negative prompt, random weights in bf16, the sampler's state in float32, shift 3.0 (Wan2.1 at
480p). Workers, each in its own process (``benchmarks/harness.py``) so that peak memory is its own:

* ``jax:loop[:attention]``: ``shelllcc.flow.samplers.unipc_sample`` with ``cfg_velocity`` (two forward passes
  per step), the whole loop one jitted ``lax.scan``, compiled ahead of time (compile time reported apart).
* ``jax:loop_batched[:attention]``: the same loop with the conditional and unconditional passes as one forward
  pass on a batch of 2 (what diffusers' pipelines call batched CFG; ours does not do it by default).
* ``diffusers:loop``: ``WanPipeline``'s denoising loop written out as the pipeline runs it (transformer in bf16
  under ``torch.no_grad``, two passes, ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` 3.0,
  latents in float32), after one untimed step.
* ``jax:decode[:<flag preset>]`` / ``diffusers:decode``: the Wan2.1 VAE decoding the latent to 81 x 480 x 832
  frames, float32 on both sides (diffusers' Wan examples load the VAE in float32), after one untimed decode.
  Flag presets (appended to that worker's ``XLA_FLAGS``): ``noautotune`` (``--xla_gpu_autotune_level=0``: no
  convolution autotuning, whose trial buffers count in the process's peak).

Each loop and decode is timed ``--repeats`` times (default 1: a 50-step loop is about a minute) with the device
synchronised; medians are reported, and the speed-ups divide diffusers' time by ours from the same call. Peak
memory is the worker process's (compilation and autotuning included); for ours the compiled program's own
``memory_analysis()`` is recorded beside it (``program``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness

WORKERS = ("jax:loop:cudnn", "jax:loop_batched:cudnn", "diffusers:loop", "jax:decode", "jax:decode:noautotune",
           "diffusers:decode")
XLA_FLAG_PRESETS = {"": "", "noautotune": "--xla_gpu_autotune_level=0"}


def _random_like(abstract, seed: int = 0):
    """N(0, 0.02^2) weights drawn on the host (one jax.random program per shape compiles for minutes on a GPU;
    the timing does not depend on the values)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray((0.02 * rng.standard_normal(a.shape, np.float32)).astype(a.dtype)),
                        abstract)


def _jax_loop(args, variant: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shelllcc.flow.samplers import unipc_sample
    from shelllcc.flow.timesteps import wan_sampling_schedule
    from shelllcc.models.wan_transformer import WanTransformer, get_config

    parts = variant.split(":")
    batched = parts[1] == "loop_batched"
    cfg = get_config(args.preset, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                     attention_impl=(parts[2] if len(parts) > 2 else None) or None)
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    params = _random_like(abs_params)
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abs_rest)
    t, h, w = args.grid
    k = jax.random.split(jax.random.key(1), 3)
    noise = jax.random.normal(k[0], (1, t, h, w, cfg.in_channels), jnp.float32)
    ctx = jax.random.normal(k[1], (1, args.text_len, cfg.text_dim), jnp.bfloat16)
    neg = jax.random.normal(k[2], (1, args.text_len, cfg.text_dim), jnp.bfloat16)
    schedule = wan_sampling_schedule(args.steps, shift=args.shift)
    g = args.guidance

    def loop(params, noise, ctx, neg):
        model = nnx.merge(graphdef, params, rest)
        if not batched:
            return unipc_sample(lambda x, ts, c: model(x, ts, c), noise, ctx, schedule,
                                negative_context=neg, guidance_scale=g)

        def both(x, ts, c):          # c: the two contexts stacked; one pass on [x, x]
            v = model(jnp.concatenate([x, x]), jnp.concatenate([ts, ts]), c).astype(x.dtype)
            cond, uncond = jnp.split(v, 2)
            return uncond + g * (cond - uncond)
        return unipc_sample(both, noise, jnp.concatenate([ctx, neg]), schedule)

    device = jax.devices()[0]
    t0 = time.perf_counter()
    compiled = jax.jit(loop).lower(params, noise, ctx, neg).compile()
    compile_s = time.perf_counter() - t0
    times = harness.timed(lambda: compiled(params, noise, ctx, neg), args.repeats, args.warmup)
    return dict(side="jax", worker=variant, ms=statistics.median(times), ms_min=min(times),
                per_step_ms=statistics.median(times) / args.steps, peak_gb=harness.jax_peak_gb([device]),
                program=harness.memory_analysis(compiled), compile_s=compile_s, device_name=device.device_kind,
                versions=dict(jax=jax.__version__))


def _jax_decode(args, variant: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from shelllcc.models.wan_vae import WanVAE, WanVAEConfig

    vcfg = WanVAEConfig.preset(args.vae_preset)
    abstract = nnx.eval_shape(lambda: WanVAE(vcfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    params = _random_like(abs_params)
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abs_rest)
    t, h, w = args.grid
    z = jax.random.normal(jax.random.key(3), (1, t, h, w, vcfg.z_dim), jnp.float32)
    decode = jax.jit(lambda p, z: nnx.merge(graphdef, p, rest).decode(z))
    device = jax.devices()[0]
    t0 = time.perf_counter()
    compiled = decode.lower(params, z).compile()
    compile_s = time.perf_counter() - t0
    # the peak before the first run: what compiling (convolution autotuning included) held, apart from running
    peak_compile = harness.jax_peak_gb([device])
    times = harness.timed(lambda: compiled(params, z), args.repeats, 1)
    frames = jax.eval_shape(decode, params, z).shape[1:4]
    return dict(side="jax", worker=variant, ms=statistics.median(times), ms_min=min(times),
                peak_gb=harness.jax_peak_gb([device]), peak_after_compile_gb=peak_compile,
                program=harness.memory_analysis(compiled), compile_s=compile_s, frames=list(frames),
                device_name=device.device_kind, versions=dict(jax=jax.__version__))


def _diffusers_loop(args, variant: str) -> dict:
    import diffusers
    import torch
    from diffusers import UniPCMultistepScheduler
    from dit_bench import diffusers_transformer

    from shelllcc.models.wan_transformer import get_config

    cfg = get_config(args.preset)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = diffusers_transformer(cfg, dev).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=args.shift)
    t, h, w = args.grid
    gen = torch.Generator(device=dev).manual_seed(1)
    noise = torch.randn(1, cfg.in_channels, t, h, w, device=dev, dtype=torch.float32, generator=gen)
    ctx = torch.randn(1, args.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16, generator=gen)
    neg = torch.randn(1, args.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16, generator=gen)

    @torch.no_grad()
    def loop(steps):
        scheduler.set_timesteps(steps, device=dev)
        latents = noise.clone()
        for i, ts in enumerate(scheduler.timesteps):
            if i == steps:
                break
            x = latents.to(torch.bfloat16)
            tt = ts.expand(1)
            cond = model(hidden_states=x, timestep=tt, encoder_hidden_states=ctx, return_dict=False)[0]
            uncond = model(hidden_states=x, timestep=tt, encoder_hidden_states=neg, return_dict=False)[0]
            pred = uncond + args.guidance * (cond - uncond)
            latents = scheduler.step(pred, ts, latents, return_dict=False)[0]
        return latents

    sync = harness.torch_sync(dev)
    t0 = time.perf_counter()
    sync(loop(1))                                   # cuDNN/cuBLAS autotuning and allocator warm-up
    first_s = time.perf_counter() - t0
    harness.torch_peak_reset(dev)
    times = harness.timed(lambda: loop(args.steps), args.repeats, args.warmup, sync)
    return dict(side="diffusers", worker=variant, ms=statistics.median(times), ms_min=min(times),
                per_step_ms=statistics.median(times) / args.steps, peak_gb=harness.torch_peak_gb(dev),
                compile_s=first_s, device_name=harness.torch_device_name(dev),
                versions=dict(torch=torch.__version__, diffusers=diffusers.__version__))


def _diffusers_decode(args, variant: str) -> dict:
    import diffusers
    import torch
    from diffusers import AutoencoderKLWan

    from shelllcc.models.wan_vae import WanVAEConfig

    vcfg = WanVAEConfig.preset(args.vae_preset)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKLWan(base_dim=vcfg.base_dim, z_dim=vcfg.z_dim, dim_mult=list(vcfg.dim_mult),
                           num_res_blocks=vcfg.num_res_blocks, latents_mean=list(vcfg.latents_mean),
                           latents_std=list(vcfg.latents_std)).to(dev, torch.float32).eval()
    t, h, w = args.grid
    z = torch.randn(1, vcfg.z_dim, t, h, w, device=dev, dtype=torch.float32,
                    generator=torch.Generator(device=dev).manual_seed(3))

    @torch.no_grad()
    def decode():
        return vae.decode(z, return_dict=False)[0]

    sync = harness.torch_sync(dev)
    t0 = time.perf_counter()
    video = decode()
    sync(video)
    first_s = time.perf_counter() - t0
    harness.torch_peak_reset(dev)
    times = harness.timed(decode, args.repeats, 0, sync)
    return dict(side="diffusers", worker=variant, ms=statistics.median(times), ms_min=min(times),
                peak_gb=harness.torch_peak_gb(dev), compile_s=first_s, frames=list(video.shape[2:5]),
                device_name=harness.torch_device_name(dev),
                versions=dict(torch=torch.__version__, diffusers=diffusers.__version__))


def _worker(args, name: str) -> dict:
    side, what = name.split(":")[:2]
    if what == "decode":
        return (_jax_decode if side == "jax" else _diffusers_decode)(args, name)
    return (_jax_loop if side == "jax" else _diffusers_loop)(args, name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--vae-preset", default="wan2.1")
    p.add_argument("--grid", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "H", "W"))
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--workers", nargs="+", default=list(WORKERS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    harness.add_output_args(p)
    p.add_argument("--worker-timeout", type=float, default=420.0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in args.workers:
        side, what = (name.split(":") + [""])[:2]
        if side not in ("jax", "diffusers") or what not in ("loop", "loop_batched", "decode") or (
                side == "diffusers" and what == "loop_batched") or (
                what == "decode" and name.split(":")[2:3] and name.split(":")[2] not in XLA_FLAG_PRESETS):
            raise SystemExit(f"unknown worker {name!r}; expected one of {WORKERS} (jax loops take an attention "
                             f"implementation after a second colon, jax:decode a flag preset of {sorted(XLA_FLAG_PRESETS)})")
    if args._worker:
        harness.emit(_worker(args, args._worker))
        return

    bench = harness.Bench("sample_bench", args.out_jsonl, args.out_dir)
    log, rows = bench.log, {}
    base = harness.script_cmd(__file__, "--preset", args.preset, "--vae-preset", args.vae_preset, "--grid",
                              *args.grid, "--text-len", args.text_len, "--steps", args.steps, "--guidance",
                              args.guidance, "--shift", args.shift, "--repeats", args.repeats, "--warmup",
                              args.warmup)
    for name in args.workers:
        log(f"{name}: running")
        preset = name.split(":")[2] if name.startswith("jax:decode:") else ""
        done = harness.run(base + ["--_worker", name], timeout=args.worker_timeout,
                           env=harness.xla_flags_env(XLA_FLAG_PRESETS[preset]))
        if done.error:
            bench.failed(name, done, lines=40)
            continue
        r = rows[name] = done.result
        per_step = f" ({r['per_step_ms']:.1f} ms/step)" if "per_step_ms" in r else ""
        temp = f", program temp {r['program']['temp_gb']:.1f} GB" if r.get("program", {}).get("temp_gb") else ""
        if r.get("peak_after_compile_gb") is not None:
            temp += f", peak after compiling {r['peak_after_compile_gb']:.1f} GB"
        log(f"{name}: {r['ms']:.0f} ms{per_step}, peak {r['peak_gb'] or float('nan'):.1f} GB{temp}, "
            f"first call / compile {r['compile_s']:.1f} s")

    for what in ("loop", "decode"):
        ref = rows.get(f"diffusers:{what}")
        for name, r in rows.items():
            if name.split(":")[1] not in ((what,) if what == "decode" else ("loop", "loop_batched")):
                continue
            record = dict(device=r["device_name"], preset=args.preset, grid=list(args.grid), text_len=args.text_len,
                          steps=args.steps, guidance=args.guidance, worker=name, ms=r["ms"], ms_min=r["ms_min"],
                          peak_gb=r["peak_gb"], peak_after_compile_gb=r.get("peak_after_compile_gb"),
                          program=r.get("program"), compile_s=r["compile_s"],
                          versions=r["versions"])
            if ref is not None and r["side"] == "jax":
                record.update(diffusers_ms=ref["ms"], diffusers_peak_gb=ref["peak_gb"],
                              speedup_vs_diffusers=ref["ms"] / r["ms"])
                log(f"{name}: {ref['ms'] / r['ms']:.2f}x diffusers ({ref['ms']:.0f} ms, {ref['peak_gb'] or 0:.1f} GB)")
            bench.record(**record)


if __name__ == "__main__":
    main()
