#!/usr/bin/env python
"""Per-device memory of the ``reward_finetune`` train step against the device count, data-parallel and FSDP
meshes, compiled ahead of time with nothing allocated (issue 21, item 1: the data-parallel out-of-memory).

    python benchmarks/dp_memory.py                                   # CPU, forced host devices, 1 2 4
    python benchmarks/dp_memory.py --platform tpu --topology v5p:2x2x1 --devices 1,4
    python benchmarks/dp_memory.py --platform gpu --devices 1,4      # ONE GPU compiles for 4 (mock topology)
    python benchmarks/dp_memory.py --layers 2 --latent 21,30,52 --mesh data   # smaller, faster

The step is the run's own (``experiments.dit_setup.abstract_step``, as ``tpu_aot.py`` and
``compile_bench.py`` build it: DiT from ``nnx.eval_shape``, the config's mesh and sharding rules, optimizer,
the reward of a random manifold of the 1.3B size, ``jit_train_step`` with the state donated) for
``benchmarks/step_bench.py``'s config (``--config``, default ``1.3b-full``: float32 master weights, bf16
compute, ``attention_forward_saveable``, one example per device, ``train.microbatch_size=1``), traced with
``ShapeDtypeStruct``s, lowered and compiled for each mesh (``data`` N x fsdp 1 and data 1 x ``fsdp`` N) and
N of ``--devices``. Each compile runs in its own subprocess (``harness.run``) with its own devices:

* ``cpu``: ``--xla_force_host_platform_device_count=N`` host devices.
* ``tpu``: the compile-only devices of ``--topology`` (libtpu, no TPU; the first N of them).
* ``gpu``: one GPU is enough: for N > 1 the GPU client is mocked as N hosts of one device each
  (``jax_mock_gpu_topology=1xNx1``, JAX's mock-NCCL client), so XLA:GPU compiles the N-device SPMD program
  (the program each GPU would run) without N GPUs. Nothing is executed.

Printed per compile: ``compiled.memory_analysis()`` per device (argument, output, aliased output, temp;
``total = argument + output - alias + temp``), temp against the 1-device compile, and the largest
allocations of XLA's buffer assignment (the ``*memory-usage-report.txt`` of ``--xla_dump_to``, one
temporary dump per compile; ``--top 0`` skips it). One record per invocation goes to
``benchmarks/results.jsonl`` through ``harness.Bench`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import harness

GB = harness.GB


def parse_report(path: str, top: int) -> list[dict]:
    """The ``top`` largest allocations of an XLA ``*memory-usage-report.txt`` (default memory space):
    ``{"gib": size, "shapes": the values sharing it}``."""
    rows = []
    unit = {"B": 2.0 ** -30, "KiB": 2.0 ** -20, "MiB": 2.0 ** -10, "GiB": 1.0, "TiB": 2.0 ** 10}
    with open(path) as f:
        for line in f:
            if line.startswith("Memory Space:") and rows:
                break                       # only the first (default) memory space
            m = re.match(r"\s*[0-9.]+\w+\(\s*\d+%\);\s*([0-9.]+)(B|KiB|MiB|GiB|TiB);\s*\d+;\s*\d+;\s*(.*)$", line)
            if m:
                rows.append({"gib": round(float(m.group(1)) * unit[m.group(2)], 4), "shapes": m.group(3).strip()[:200]})
    return sorted(rows, key=lambda r: -r["gib"])[:top]


def worker(args) -> dict:
    """One compile: ``args.mesh`` x ``args.n`` on ``args.platform``; runs in its own process."""
    import jax

    if args.platform == "gpu" and args.n > 1:
        jax.config.update("jax_mock_gpu_topology", f"1x{args.n}x1")
    from benchmarks import step_bench
    from experiments import dit_setup, reward_finetune
    from experiments.overrides import apply_overrides
    from shelllcc import parallel

    c = step_bench.get_config(args.config)
    if args.layers:
        c.model.num_layers = args.layers
    c.mesh.data, c.mesh.fsdp = (args.n, 1) if args.mesh == "data" else (1, args.n)
    c.mesh.devices = args.n
    c.data.batch_size = args.n * args.per_device_batch
    apply_overrides(c, dict(map(parse_override, args.override)), "--override")
    if args.platform == "tpu":
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices()
    latent = (*map(int, args.latent.split(",")), 16)
    text = (args.text_len, dit_setup.transformer_config(c.model).text_dim)
    built = dit_setup.abstract_step(c, reward_finetune.make_loss(c), devices[:args.n], latent, text)
    with parallel.set_mesh(built.mesh):
        compiled = built.step.jitted.trace(built.state, built.batch, built.rng).lower().compile()
    mem = harness.memory_analysis(compiled)
    hlo = compiled.as_text()
    collectives = {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
                   for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")}
    return dict(platform=args.platform, device_kind=devices[0].device_kind, mesh=dict(built.mesh.shape), n=args.n,
                mesh_kind=args.mesh, microbatches=built.microbatches, attention_impl=built.attention_impl,
                remat_policy=c.model.remat_policy, scan_layers=bool(c.model.scan_layers),
                num_layers=built.model_config.num_layers, trainable_params=built.trainable_params,
                param_gib=round(built.param_bytes / GB, 3), collectives=collectives,
                **{k: round(v, 4) for k, v in mem.items()})


def parse_override(item: str):
    from benchmarks.tpu_aot import parse_override as parse
    return parse(item)


def worker_env(platform: str, n: int, dump: str | None) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_force_host_platform_device_count", "--xla_dump_to"))]
    if platform == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={n}")
    if dump:
        flags += [f"--xla_dump_to={dump}", "--xla_dump_hlo_module_re=jit_step"]
    env = {"XLA_FLAGS": " ".join(flags), "PYTHONPATH": harness.REPO}
    if platform in ("cpu", "tpu"):
        env["JAX_PLATFORMS"] = "cpu"       # TPU: compile-only devices of a topology; no TPU backend needed
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="cpu", choices=("cpu", "tpu", "gpu"))
    p.add_argument("--topology", default="v5p:2x2x1", help="--platform tpu: the TPU slice whose chips compile")
    p.add_argument("--devices", default="1,2,4", help="comma list of device counts N")
    p.add_argument("--mesh", default="data,fsdp", help="comma list: data (data N x fsdp 1), fsdp (data 1 x fsdp N)")
    p.add_argument("--config", default="1.3b-full", help="benchmarks/step_bench.py's config argument")
    p.add_argument("--layers", type=int, default=0, help="DiT blocks (0: the preset's, 30 for 1.3B)")
    p.add_argument("--latent", default="21,60,104", help="one example's latent grid T,H,W (16 channels)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--per-device-batch", type=int, default=1)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (dotted keys)")
    p.add_argument("--top", type=int, default=3, help="largest allocations shown per compile (0: no XLA dump)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile (subprocess)")
    p.add_argument("--no-record", action="store_true", help="do not append to the results file")
    harness.add_output_args(p)
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        args.mesh, args.n = args._worker, args._n
        harness.emit(worker(args))
        return None

    bench = harness.Bench("dp_memory", out_jsonl=None if args.no_record else args.out_jsonl, out_dir=args.out_dir,
                          argv=argv)
    counts = [int(x) for x in args.devices.split(",")]
    meshes = [m.strip() for m in args.mesh.split(",") if m.strip()]
    rows, temp1, done_meshes = [], {}, {}
    for mesh in meshes:
        for n in counts:
            shape = (n, 1) if mesh == "data" else (1, n)
            if shape in done_meshes:                          # data 1 x fsdp 1 is one mesh: compiled once
                rows.append({**done_meshes[shape], "mesh_kind": mesh})
                continue
            dump = tempfile.mkdtemp(prefix="dp_memory_") if args.top else None
            cmd = harness.script_cmd(__file__, *(argv if argv is not None else sys.argv[1:]),
                                     "--_worker", mesh, "--_n", n)
            bench.log(f"[dp_memory] compiling mesh {mesh} x {n} on {args.platform} ...")
            done = harness.run(cmd, timeout=args.timeout, env=worker_env(args.platform, n, dump))
            if done.result is None:
                bench.failed(f"{mesh} x {n}", done)
                rows.append({"mesh_kind": mesh, "n": n, "error": done.error, "tail": done.tail(8)})
            else:
                r = dict(done.result, compile_wall_s=round(done.wall_s, 1))
                reports = sorted(glob.glob(os.path.join(dump, "*jit_step*memory-usage-report.txt"))) if dump else []
                if reports:
                    r["largest"] = parse_report(reports[-1], args.top)
                rows.append(r)
                done_meshes[shape] = r
            if dump:
                shutil.rmtree(dump, ignore_errors=True)
    for r in rows:
        if "temp_gb" in r:
            r["total_gb"] = round(r["argument_gb"] + r["output_gb"] - r["alias_gb"] + r["temp_gb"], 4)
            temp1.setdefault(r["mesh_kind"], r["temp_gb"] if r["n"] == 1 else None)
    for r in rows:
        base = temp1.get(r.get("mesh_kind"))
        if "temp_gb" in r and base:
            r["temp_vs_1"] = round(r["temp_gb"] / base, 3)
        if r.get("largest"):
            r["largest_gib"] = r["largest"][0]["gib"]
    bench.log()
    bench.table([("mesh", "mesh_kind", "s"), ("N", "n", "d"), ("argument GiB", "argument_gb", ".3f"),
                 ("output GiB", "output_gb", ".3f"), ("aliased GiB", "alias_gb", ".3f"),
                 ("temp GiB", "temp_gb", ".3f"), ("total GiB", "total_gb", ".3f"), ("temp / N=1", "temp_vs_1", ".3f"),
                 ("largest alloc GiB", "largest_gib", ".3f")], rows)
    for r in rows:
        for a in r.get("largest", []):
            bench.log(f"  {r['mesh_kind']} x {r['n']}: {a['gib'] * 1024:.1f} MiB  {a['shapes']}")
    first = next((r for r in rows if "temp_gb" in r), {})
    record = dict(device={"cpu": "CPU compile (forced host devices)", "tpu": f"TPU AOT {args.topology}",
                          "gpu": "GPU compile (mock topology, one GPU)"}[args.platform],
                  host=harness.host_device(), platform=args.platform, config=args.config,
                  layers=first.get("num_layers"), latent=[*map(int, args.latent.split(",")), 16],
                  text_len=args.text_len, per_device_batch=args.per_device_batch, overrides=args.override,
                  jax=harness.package_version("jax"), rows=rows,
                  commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.REPO,
                                        capture_output=True, text=True).stdout.strip())
    if not args.no_record:
        bench.record(**record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
