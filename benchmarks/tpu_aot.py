"""Compile an experiment's train step for a TPU topology ahead of time, on a CPU host, and report per-chip
memory and the step's roofline time (issue 16).

    python benchmarks/tpu_aot.py --config configs/wan21_reward.py:1.3b-lora --topology v5p:2x2x2
    python benchmarks/tpu_aot.py --config configs/wan21_reward.py:14b-full-v5p64        # a pod preset
    python benchmarks/tpu_aot.py --config configs/wan21_reward.py:14b-lora --topology v6e:4x4 \\
        --override mesh.fsdp=-1 mesh.data=1 data.batch_size=16

Needs libtpu (``pip install "jax[tpu]"``); no TPU. ``jax.experimental.topologies.get_topology_desc`` gives
the topology's compile-only devices; the experiment's own step (``experiments.dit_setup.abstract_step``:
the DiT from ``nnx.eval_shape``, LoRA split, the config's mesh and logical sharding rules over those
devices, optimizer, loss, microbatches, ``jit_train_step``) is traced with abstract arguments, lowered and
compiled by XLA:TPU. Kernels are chosen for the mesh's platform (TPU), not for this host: the DiT's
``flash`` attention becomes the Pallas TPU flash kernel and the reward's ``auto`` kernel XLA.

Printed per chip (a TPU chip is one JAX device on v5e, v5p and v6e): the compiled executable's argument,
output, temp (scratch) and total bytes (``argument + output - aliased + temp + code``; the step donates
its state, so outputs alias it), against the chip's HBM; the compiled FLOPs per step (XLA's cost analysis
of the per-chip program, Pallas kernels by their cost estimates) and the roofline step time at the chip's
peak dense bf16 FLOP/s (and at its HBM bandwidth for the bytes XLA counts as accessed; the larger is the
floor). The last line ends in ``fits`` or ``does not fit``. Defaults are the recipe's clip, 81 x 480 x 832
(latent 21 x 60 x 104 x 16) with 512 umT5 tokens of 4096; a reward run uses a random manifold of the
``wan21_manifold`` size (``reward.manifold`` is a path in the presets).

One record per run is appended to ``benchmarks/results.jsonl`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sys
import time

import harness

# Per chip, from Google Cloud's TPU system-architecture pages (cloud.google.com/tpu/docs/v5e, /v5p, /v6e):
# peak dense bf16 TFLOP/s, HBM capacity (GiB as the pages' "GB"; XLA reserves a little of it) and HBM TB/s.
CHIPS = {
    "v5e": {"bf16_tflops": 197.0, "hbm_gib": 16.0, "hbm_tbs": 0.819},
    "v5p": {"bf16_tflops": 459.0, "hbm_gib": 95.0, "hbm_tbs": 2.765},
    "v6e": {"bf16_tflops": 918.0, "hbm_gib": 32.0, "hbm_tbs": 1.640},
}
RECIPE_LATENT = (21, 60, 104, 16)   # 81 x 480 x 832 through the Wan2.1 VAE (4x time, 8x space)
RECIPE_TEXT = (512, 4096)
EXPERIMENTS = ("reward_finetune", "sft", "fit_manifold")


def chip_of(topology: str) -> str:
    gen = topology.split(":")[0].lower()
    gen = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}.get(gen, gen)
    if gen not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown TPU generation {gen!r}; known: {sorted(CHIPS)}")
    return gen


def load_config(spec: str):
    """``FILE[:ARG]`` -> the file's ``get_config(ARG)``."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("tpu_aot_config", os.path.join(harness.REPO, path)
                                                         if not os.path.isabs(path) else path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_override(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--override {item!r} is not key=value")
    try:
        return key.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key.strip(), raw


def topology_devices(topology: str, slices: int = 1):
    from jax.experimental import topologies
    kwargs = {"num_slices": slices} if slices > 1 else {}
    return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices


def process_rows(sharding, rows: int) -> dict[int, list[int]]:
    """Per process: the batch rows its devices hold under ``sharding`` (of a ``[rows, ...]`` array)."""
    out: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((rows,)).items():
        out.setdefault(device.process_index, set()).update(range(rows)[index[0]])
    return {p: sorted(r) for p, r in sorted(out.items())}


def check_process_rows(sharding, rows: int) -> int:
    """The rows each process feeds: ``shelllcc.data.readers`` gives each ``batch_size / processes``
    examples and ``parallel.global_batch`` assembles them with ``make_array_from_process_local_data``,
    which maps them, in order, onto the rows that process's devices hold. Those need not be contiguous (a
    mesh over a TPU topology follows the torus, so a host's chips hold rows 0, 2, 4, ...), but every
    process must hold the same number, ``batch_size / processes``, and no row may be fed by two.
    Returns the rows per process."""
    per = process_rows(sharding, rows)
    want = rows // len(per)
    seen: set[int] = set()
    for p, r in per.items():
        if len(r) != want or seen & set(r):
            raise ValueError(f"process {p}'s devices hold batch rows {r[:8]}{'...' if len(r) > 8 else ''}; the "
                             f"reader gives each of the {len(per)} processes {want} rows of its own")
        seen |= set(r)
    return want


def model_flops(cfg, latent, text_len: int, lora: bool, remat: str, examples: int) -> float:
    """FLOPs of one chip's step from the architecture: the blocks' matmuls and attention (embeddings, head,
    norms and the reward are < 1%) for ``examples`` examples (microbatches x examples per chip in each).

    XLA's cost analysis of the compiled program counts a loop's body once (the scanned blocks, the
    microbatch loop) and a Pallas kernel only by its cost estimate (the TPU flash attention's backward
    kernels have none), so it undercounts a real step several-fold; it is printed beside this.
    Backward: matmuls 2x forward (input and weight gradients), 1x under LoRA (frozen weights: input
    gradients only; the adapters are < 2% of the work); attention 2.5x forward (the flash backward
    recomputes the probabilities). Remat reruns the forward: all of it under ``full``, all but attention
    under ``attention_forward_saveable``.
    """
    t, h, w = latent[0] // cfg.patch_size[0], latent[1] // cfg.patch_size[1], latent[2] // cfg.patch_size[2]
    n, d, f = t * h * w, cfg.dim, cfg.ffn_dim
    dense = 2 * (4 * n * d * d + 2 * n * d * d + 2 * text_len * d * d + 2 * n * d * f)
    attention = 4 * n * n * d + 4 * n * text_len * d
    rerun_dense, rerun_attention = {"full": (1, 1), "attention_forward_saveable": (1, 0)}.get(remat, (0, 0))
    per_block = dense * (1 + (1 if lora else 2) + rerun_dense) + attention * (1 + 2.5 + rerun_attention)
    return float(per_block * cfg.num_layers * examples)


def compile_abstract(config, devices, latent, text):
    """``(built, compiled, times)``: the experiment's step (``dit_setup.abstract_step``) compiled for ``devices``."""
    from experiments import dit_setup, reward_finetune, sft
    from shelllcc import parallel

    make_loss = {"reward_finetune": reward_finetune.make_loss, "sft": sft.make_loss}[config.experiment]
    t0 = time.perf_counter()
    built = dit_setup.abstract_step(config, make_loss(config), devices, latent, text)
    times = {"build_s": time.perf_counter() - t0}
    with parallel.set_mesh(built.mesh):
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = built.step.jitted.trace(built.state, built.batch, built.rng).lower()
        times["lower_s"], times["lower_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        times["compile_s"], times["compile_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return built, compiled, times


def compile_step(config, devices, latent, text) -> dict:
    built, compiled, times = compile_abstract(config, devices, latent, text)
    return report(config, devices, latent, text, built, compiled, times)


def report(config, devices, latent, text, built, compiled, times) -> dict:
    from shelllcc import parallel

    rows_per_process = check_process_rows(parallel.batch_sharding(built.mesh), config.data.batch_size)
    mem = compiled.memory_analysis()
    if isinstance(mem, (list, tuple)):
        mem = mem[0]
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    cost = cost or {}
    field = lambda name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)  # noqa: E731
    m = {name: field(name) for name in ("argument", "output", "alias", "temp", "generated_code")}
    m["total"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    per_chip = config.data.batch_size // len(devices)
    analytic = model_flops(built.model_config, latent, text[0], config.lora.rank > 0, config.model.remat_policy,
                           per_chip)
    return dict(mesh=dict(built.mesh.shape), devices=len(devices), model_flops=analytic,
                processes=len({d.process_index for d in devices}),
                microbatches=built.microbatches, rows_per_process=rows_per_process,
                attention_impl=built.attention_impl, trainable_params=built.trainable_params,
                frozen_params=built.frozen_params, param_bytes=built.param_bytes, bytes=m,
                flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                **{k: round(v, 2) for k, v in times.items()})


def compile_fit(config, devices, latent) -> dict:
    """The manifold fit's two stage steps (``fit_manifold.stage_steps``, as a fit builds them) compiled for
    ``devices``: per stage the per-chip bytes and XLA's FLOPs (no scanned loop or Pallas kernel here, so
    XLA's count is the step's); the report is the larger stage's, with both stages' figures beside it."""
    import jax

    from experiments import fit_manifold
    from shelllcc import parallel
    from shelllcc.manifold import fit, io
    from shelllcc.manifold.params import ManifoldConfig

    m = config.manifold
    pt, ph, pw = tuple(m.patch_size)
    mconfig = ManifoldConfig(dim=latent[-1] * pt * ph * pw, num_anchors=m.num_anchors, hidden_dim=m.hidden_dim,
                             patch_size=tuple(m.patch_size))
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    opt, step1, step2 = fit_manifold.stage_steps(config, mconfig, mesh)
    stages = {}
    for stage, step, section in ((1, step1, config.stage1), (2, step2, config.stage2)):
        state = jax.eval_shape(lambda p, s=stage: fit.init_state(p, opt[s], s), io.abstract_params(mconfig))
        patches = jax.ShapeDtypeStruct((section.batch_size, mconfig.dim), jax.numpy.float32)
        with parallel.set_mesh(mesh):
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = step.trace(state, patches).lower().compile()
            compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        mem = compiled.memory_analysis()
        mem = mem[0] if isinstance(mem, (list, tuple)) else mem
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        b = {n: int(getattr(mem, f"{n}_size_in_bytes", 0) or 0) for n in ("argument", "output", "alias", "temp",
                                                                            "generated_code")}
        b["total"] = b["argument"] + b["output"] - b["alias"] + b["temp"] + b["generated_code"]
        stages[stage] = dict(bytes=b, flops=float(cost.get("flops", 0.0)),
                             bytes_accessed=float(cost.get("bytes accessed", 0.0)), batch_size=section.batch_size,
                             compile_s=round(compile_s, 2), compile_cpu_s=round(compile_cpu_s, 2))
    worst = max(stages.values(), key=lambda r: r["bytes"]["total"])
    return dict(mesh=dict(mesh.shape), devices=len(devices), processes=len({d.process_index for d in devices}),
                manifold=dict(dim=mconfig.dim, num_anchors=mconfig.num_anchors, hidden_dim=mconfig.hidden_dim),
                stages=stages, bytes=worst["bytes"], flops=worst["flops"], model_flops=worst["flops"],
                bytes_accessed=worst["bytes_accessed"])


def oom_numbers(message: str) -> dict:
    """XLA:TPU's out-of-memory message, e.g. 'the total memory required for HLO temporaries (97.67G) exceeds
    available HBM (95.74G)', as ``{"required_gib": ..., "available_gib": ...}`` (GiB; empty if unparsed)."""
    found = re.findall(r"\(([0-9.]+)([KMGT])\)", message)
    if len(found) < 2:
        return {}
    scale = {"K": 2.0 ** -20, "M": 2.0 ** -10, "G": 1.0, "T": 2.0 ** 10}
    (req, u1), (avail, u2) = found[-2:]
    return {"required_gib": round(float(req) * scale[u1], 2), "available_gib": round(float(avail) * scale[u2], 2)}


def summarize(r: dict, chip: dict) -> dict:
    gib = 2.0 ** 30
    hbm = chip["hbm_gib"] * gib
    compute_s = r["model_flops"] / (chip["bf16_tflops"] * 1e12)
    memory_s = r["bytes_accessed"] / (chip["hbm_tbs"] * 1e12)
    return dict(per_chip_gib={k: round(v / gib, 3) for k, v in r["bytes"].items()}, hbm_gib=chip["hbm_gib"],
                fits=r["bytes"]["total"] <= hbm, compiled_tflops=round(r["flops"] / 1e12, 2),
                model_tflops=round(r["model_flops"] / 1e12, 2),
                roofline_compute_s=round(compute_s, 3), roofline_hbm_s=round(memory_s, 3),
                roofline_s=round(max(compute_s, memory_s), 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="FILE[:ARG], e.g. configs/wan21_reward.py:1.3b-lora")
    p.add_argument("--topology", default="", help="e.g. v5p:2x2x2, v6e:4x4 (default: the config's mesh.tpu_topology)")
    p.add_argument("--slices", type=int, default=0, help="TPU slices over DCN (default: the config's mesh.slices)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotted keys)")
    p.add_argument("--latent", default=",".join(map(str, RECIPE_LATENT)), help="one example's latent T,H,W,C")
    p.add_argument("--text", default=",".join(map(str, RECIPE_TEXT)), help="one example's text context L,D")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    args = p.parse_args(argv)

    from experiments.overrides import apply_overrides

    config = load_config(args.config)
    if config.experiment not in EXPERIMENTS:
        raise SystemExit(f"{args.config}: experiment {config.experiment!r}; this tool compiles {EXPERIMENTS}")
    apply_overrides(config, dict(map(parse_override, args.override)), "--override")
    topology = args.topology or config.mesh.get("tpu_topology", "")
    if not topology:
        raise SystemExit("--topology is needed (the config names none in mesh.tpu_topology)")
    if args.slices:
        config.mesh.slices = args.slices
    slices = config.mesh.get("slices", 1)
    if config.experiment == "reward_finetune" and config.reward.manifold != "random":
        from configs import wan21_manifold
        man = wan21_manifold.get_config().manifold
        config.reward.manifold = "random"
        config.reward.random.num_anchors, config.reward.random.hidden_dim = man.num_anchors, man.hidden_dim
        config.reward.random.patch_size = tuple(man.patch_size)
    latent = tuple(int(x) for x in args.latent.split(","))
    text = tuple(int(x) for x in args.text.split(","))
    chip_name = chip_of(topology)
    chip = CHIPS[chip_name]

    import jax
    devices = topology_devices(topology, slices)
    where = f"{topology}" + (f" x {slices} slices" if slices > 1 else "")
    print(f"{args.config}: {config.experiment}, {len(devices)} {devices[0].device_kind} chips ({where}), "
          f"jax {jax.__version__}", flush=True)
    if config.experiment == "fit_manifold":
        r = compile_fit(config, devices, latent)
        s = summarize(r, chip)
        g = s["per_chip_gib"]
        for stage, st in r["stages"].items():
            gs = {k: v / 2.0 ** 30 for k, v in st["bytes"].items()}
            print(f"stage {stage} (batch {st['batch_size']} patches of D={r['manifold']['dim']}): argument "
                  f"{gs['argument']:.3f} GiB, temp {gs['temp']:.3f} GiB, total {gs['total']:.3f} GiB per chip; "
                  f"{st['flops']:.4g} FLOPs; compiled in {st['compile_s']:.1f}s", flush=True)
        record = dict(device=f"CPU host compiling for TPU {where}", host=harness.host_device(), topology=topology,
                      slices=slices, chip=chip_name, chip_peaks=chip, config=args.config, overrides=args.override,
                      latent=list(latent), jax=jax.__version__, libtpu=harness.package_version("libtpu"), **r, **s)
        if not args.no_record:
            harness.Bench("tpu_aot", argv=argv).record(**record)
        print(f"per-chip total {g['total']:.3f} GiB of {chip['hbm_gib']:g} GiB HBM ({chip_name}); roofline step "
              f"{s['roofline_s'] * 1e3:.3f} ms: {'fits' if s['fits'] else 'does not fit'}", flush=True)
        return record
    try:
        r = compile_step(config, devices, latent, text)
    except jax.errors.JaxRuntimeError as e:
        # XLA:TPU refuses to compile a program whose buffers exceed the chip's HBM: that is the answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).splitlines()[0]
        print(message, flush=True)
        record = dict(device=f"CPU host compiling for TPU {where}", host=harness.host_device(), topology=topology,
                      slices=slices, chip=chip_name, chip_peaks=chip, config=args.config, overrides=args.override,
                      latent=list(latent), text=list(text), batch_size=config.data.batch_size,
                      microbatch_size=config.train.microbatch_size, remat_policy=config.model.remat_policy,
                      jax=jax.__version__, libtpu=harness.package_version("libtpu"), fits=False,
                      compile_error=message, **oom_numbers(message))
        if not args.no_record:
            harness.Bench("tpu_aot", argv=argv).record(**record)
        print(f"XLA:TPU did not compile the step within {chip['hbm_gib']:g} GiB of HBM per chip ({chip_name}): "
              "does not fit", flush=True)
        return record
    s = summarize(r, chip)
    g = s["per_chip_gib"]
    print(f"mesh {r['mesh']} over {r['processes']} host(s); global batch {config.data.batch_size} in "
          f"{r['microbatches']} microbatch(es), {r['rows_per_process']} rows per host; attention "
          f"{r['attention_impl']}; remat {config.model.remat_policy}; {r['trainable_params']:,} trainable + "
          f"{r['frozen_params']:,} frozen parameters", flush=True)
    print(f"compile: lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s ({r['compile_cpu_s']:.1f} CPU-s)")
    print(f"per chip: argument {g['argument']:.2f} GiB, output {g['output']:.2f} GiB (aliased {g['alias']:.2f}), "
          f"temp {g['temp']:.2f} GiB, code {g['generated_code']:.3f} GiB")
    print(f"FLOPs per step per chip: compiled (XLA's count: loop bodies once, Pallas backward uncounted) "
          f"{r['flops']:.4g}, model (architecture) {r['model_flops']:.4g}; roofline at {chip['bf16_tflops']:g} "
          f"bf16 TFLOP/s: {s['roofline_compute_s']:.3f}s; HBM bytes (compiled) {r['bytes_accessed']:.4g} at "
          f"{chip['hbm_tbs']:g} TB/s: {s['roofline_hbm_s']:.3f}s")
    record = dict(device=f"CPU host compiling for TPU {where}", host=harness.host_device(), topology=topology,
                  slices=slices, chip=chip_name, chip_peaks=chip, config=args.config, overrides=args.override,
                  latent=list(latent), text=list(text), batch_size=config.data.batch_size,
                  microbatch_size=config.train.microbatch_size, remat_policy=config.model.remat_policy,
                  jax=jax.__version__, libtpu=harness.package_version("libtpu"), **r, **s)
    if not args.no_record:
        harness.Bench("tpu_aot", argv=argv).record(**record)
    verdict = "fits" if s["fits"] else "does not fit"
    print(f"per-chip total {g['total']:.2f} GiB of {chip['hbm_gib']:g} GiB HBM ({chip_name}); roofline step "
          f"{s['roofline_s']:.3f}s: {verdict}", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
