#!/usr/bin/env python
"""The full ``reward_finetune`` train step: the reward's share of its time, and weak scaling over devices.

The step is the one ``experiments/reward_finetune.py`` trains with: ``dit_setup.run_training``'s pieces
(``build_model``, ``split_trainable``, ``reward_finetune.make_loss``, ``optimizer_from``,
``train_state_shardings``, ``make_train_step`` + ``jit_train_step``) build the same jitted, sharded,
state-donating step (Wan DiT forward + backward, the one-step objective with the manifold reward inside
``shard_map``, the guarded AdamW update) from ``configs/wan21_reward.py:<--config>``, with seeded random
weights, a seeded random manifold (``reward.manifold=random``, default 4096 anchors x hidden 512: the
Wan2.1-1.3B manifold's size) and one random batch (``data.source=random``: latents ``[B, T, H, W, 16]``,
default 21 x 60 x 104 = 81 frames at 480x832, and umT5-shaped text ``[B, 512, 4096]``) placed once and
reused. No checkpoints, metric writers or data pipeline.

Parts (``--parts``):

* ``share``: one process (``--share-devices``, default 1 device) builds the state once and compiles the
  step twice: ``reward`` (as configured) and ``no_reward``, where the manifold distance is replaced by
  ``mean(z^2)`` (differentiable, a cotangent of z's shape flows into the DiT's backward exactly as with
  the reward; everything else, the manifold in the frozen state included, is identical). The two are
  timed interleaved on the same state; ``reward_share = (t_with - t_without) / t_with`` (target <= 2%).
  It also times the reward alone: ``jax.value_and_grad`` of ``manifold_distance`` w.r.t. ``z`` at the
  step's latent shape, with exactly the options the step passed to it (recorded while tracing).
* ``scale``: weak scaling, ``--per-device-batch`` (1) example(s) per device, global batch = N x that,
  one process per device count (the first N of ``CUDA_VISIBLE_DEVICES``; on CPU
  ``--xla_force_host_platform_device_count=N``) and per mesh (``--mesh``: ``data`` = data N x fsdp 1,
  ``fsdp`` = data 1 x fsdp N, ``2d`` = data 2 x fsdp N/2 for N >= 4 even; ``both`` = data,fsdp).
  ``scaling_efficiency = t_1 / t_N`` of the median step times (t_1 from this invocation's 1-device run
  or ``--t1-ms``).

Timing: the step is compiled ahead of time (``lower().compile()``, not timed as a step), run
``--warmup`` times, then ``--steps`` times with ``jax.block_until_ready`` around each; medians are
reported. Peak memory: the largest ``peak_bytes_in_use`` of the mesh's devices (``memory_stats()``;
None on CPU), for the whole worker process. Each worker's full output goes to ``OUT_DIR/<name>.log`` (workers,
logs and records: ``benchmarks/harness.py``); one JSONL record per worker is appended to
``bench.out_jsonl`` as soon as it finishes, so a partial run keeps what it measured; the table goes to
``OUT_DIR/step_bench.log``.

Options are ml_collections config flags, as ``experiments/main.py`` takes them: ``--config`` is this file with
a ``configs/wan21_reward.py`` argument (``get_config`` below; default ``1.3b-full``), which holds the training
config and the benchmark's own options in ``bench``; ``--config.KEY=VALUE`` sets any field::

    python benchmarks/step_bench.py --config.bench.out_dir=$OUT/step_bench                # GPUs: both parts
    python benchmarks/step_bench.py --config=benchmarks/step_bench.py:1.3b-full --config.bench.parts=share
    python benchmarks/step_bench.py --config.bench.parts=scale --config.bench.devices=1,2,4 --config.bench.mesh=data
    python benchmarks/step_bench.py --config.bench.devices=1,2 --config.bench.grid=3,8,8 --config.bench.text_len=16 \\
        --config.reward.random.num_anchors=64 --config.reward.random.hidden_dim=32 --config.bench.steps=3 \\
        --config.bench.warmup=1 --config.bench.out_jsonl=/tmp/sb.jsonl --config.model.preset=tiny \\
        --config.model.dim=64 --config.model.num_layers=2 --config.model.num_heads=2 --config.model.ffn_dim=128 \\
        --config.model.text_dim=64 --config.model.freq_dim=256 --config.model.attention_impl= \\
        --config.model.remat_policy=none --config.model.param_dtype=float32 --config.model.dtype=float32 \\
        --config.reward.compute_dtype=float32                                                   # CPU check

The earlier spellings still work and are rewritten to these (:data:`LEGACY`, :func:`modern_argv`):
``--config 1.3b-full`` (``--config=benchmarks/step_bench.py:1.3b-full``), ``--override K=V ...``
(``--config.K=V``), ``--parts``, ``--devices 1 2 4``, ``--mesh``, ``--share-devices``, ``--steps``, ``--warmup``,
``--grid T H W``, ``--text-len``, ``--per-device-batch``, ``--t1-ms``, ``--platform``, ``--out-dir``,
``--out-jsonl`` and ``--worker-timeout`` (``--config.bench.<name with _>``), ``--kind``, ``--compute-dtype``,
``--chunk-size`` (``--config.reward.*``), ``--num-anchors``, ``--hidden-dim`` (``--config.reward.random.*``) and
``--microbatch`` (``--config.train.microbatch_size``). E.g. ``--parts share --config 1.3b-full --steps 5``.

Never imports tensorflow; the parent process never starts a JAX backend (workers own the devices).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness
import ml_collections

PROGRESS = "[step_bench] "
THIS = os.path.abspath(__file__)


# ------------------------------------------------------------------------------------------ config

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/wan21_reward.py:ARG`` (default ``1.3b-full``) on random data and a random manifold (4096 anchors x
    hidden 512: the Wan2.1-1.3B manifold's size), and the benchmark's options in ``bench``."""
    from configs import wan21_reward

    c = wan21_reward.get_config(arg or "1.3b-full")
    c.data.source, c.data.prefetch = "random", 1
    c.reward.manifold = "random"
    c.reward.random.num_anchors, c.reward.random.hidden_dim = 4096, 512
    c.train.microbatch_size = 1            # 0: the whole batch at once
    c.bench = ml_collections.ConfigDict(dict(
        parts="share,scale",               # comma list of share, scale
        devices=(1, 2, 4),                 # device counts of the scale part
        mesh="both",                       # scale meshes: comma list of data, fsdp, 2d; both = data,fsdp
        share_devices=1,                   # devices of the share part (mesh data N x fsdp 1)
        steps=10, warmup=2,                # timed steps (per variant); untimed steps after compilation (>= 1)
        grid=(21, 60, 104),                # latent grid T, H, W (81 frames at 480x832); data.random_latent_shape
        text_len=512,                      # text tokens (their width is the model's text_dim)
        per_device_batch=1,                # examples per device per step
        t1_ms=0.0,                         # 1-device step time for the efficiency when 1 is not among devices
        platform="auto",                   # auto | gpu | cpu
        out_dir="",                        # worker logs, step_bench.jsonl and .log (default: a new temp dir)
        out_jsonl=harness.RESULTS,
        worker_timeout=900.0))
    return c


def config_summary(c) -> dict:
    m = c.model
    return dict(
        model=dict(preset=m.preset, dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads, ffn_dim=m.ffn_dim,
                   text_dim=m.text_dim, dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl,
                   remat_policy=m.remat_policy),
        lora_rank=c.lora.rank, objective=c.objective.name, drift_weight=c.objective.drift_weight,
        latent_shape=list(c.data.random_latent_shape), text_shape=list(c.data.random_text_shape),
        batch_size=c.data.batch_size, microbatch_size=c.train.microbatch_size,
        mesh=dict(data=c.mesh.data, fsdp=c.mesh.fsdp),
        reward=dict(kind=c.reward.kind, weight=c.reward.weight, coder=c.reward.coder,
                    compute_dtype=c.reward.compute_dtype, chunk_size=c.reward.chunk_size,
                    implementation=c.reward.implementation, kernel=c.reward.kernel,
                    num_anchors=c.reward.random.num_anchors, hidden_dim=c.reward.random.hidden_dim,
                    patch_size=list(c.reward.random.patch_size)),
        optim=dict(lr=c.optim.learning_rate, grad_clip=c.optim.grad_clip, weight_decay=c.optim.weight_decay))


# Old flags -> (config key, number of values: 1, 3 or "+").
LEGACY = {"--parts": ("bench.parts", 1), "--devices": ("bench.devices", "+"), "--mesh": ("bench.mesh", 1),
          "--share-devices": ("bench.share_devices", 1), "--steps": ("bench.steps", 1),
          "--warmup": ("bench.warmup", 1), "--grid": ("bench.grid", 3), "--text-len": ("bench.text_len", 1),
          "--per-device-batch": ("bench.per_device_batch", 1), "--t1-ms": ("bench.t1_ms", 1),
          "--platform": ("bench.platform", 1), "--out-dir": ("bench.out_dir", 1),
          "--out-jsonl": ("bench.out_jsonl", 1), "--results": ("bench.out_jsonl", 1),
          "--worker-timeout": ("bench.worker_timeout", 1), "--kind": ("reward.kind", 1),
          "--compute-dtype": ("reward.compute_dtype", 1), "--chunk-size": ("reward.chunk_size", 1),
          "--num-anchors": ("reward.random.num_anchors", 1), "--hidden-dim": ("reward.random.hidden_dim", 1),
          "--microbatch": ("train.microbatch_size", 1)}


def modern_argv(argv: list[str]) -> list[str]:
    """The earlier command line's spellings (see the module docstring) as ``--config`` flags, ``--config`` first
    (config_flags wants the file before its overrides)."""
    first, out, i = [], [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        i += 1
        if name not in LEGACY and name not in ("--config", "--override"):
            out.append(argv[i - 1])
            continue
        count = 1 if name == "--config" or eq else LEGACY.get(name, (None, "+"))[1]
        values = [value] if eq else []
        while not eq and (len(values) < count if count != "+" else i < len(argv) and not argv[i].startswith("--")):
            values.append(argv[i])
            i += 1
        if name == "--config":
            first.append("--config=" + (values[0] if ".py" in values[0] else f"{THIS}:{values[0]}"))
        elif name == "--override":
            out += ["--config." + v.removeprefix("config.") for v in values]
        elif LEGACY[name][0].startswith("reward.") and values[0] in ("", "0"):
            continue                        # the old default: the config's own value
        else:
            out.append(f"--config.{LEGACY[name][0]}=" + (values[0] if count == 1 else f"({','.join(values)},)"))
    return first + out


# ------------------------------------------------------------------------------------------ the worker

def _say(msg: str) -> None:
    print(PROGRESS + msg, flush=True)


@contextlib.contextmanager
def _reward_as(variant: str, calls: list):
    """While tracing: ``reward_finetune``'s ``manifold_distance`` recorded (``reward``) or replaced by
    ``mean(z^2)`` (``no_reward``). ``calls`` gets ``(variant, kind, target, kwargs)`` per traced call."""
    import jax.numpy as jnp

    from experiments import reward_finetune

    real = reward_finetune.manifold_distance

    def recording(params, z, kind, target=None, **kw):
        calls.append(("reward", kind, target, kw, z.shape))
        return real(params, z, kind, target, **kw)

    def trivial(params, z, kind, target=None, **kw):
        calls.append(("no_reward", kind, target, kw, z.shape))
        return jnp.mean(jnp.square(z.astype(jnp.float32)))

    reward_finetune.manifold_distance = recording if variant == "reward" else trivial
    try:
        yield
    finally:
        reward_finetune.manifold_distance = real


def _live_gb_per_device() -> float:
    """Largest per-device total of live jax arrays (what the state and anything kept alive hold)."""
    import jax
    per: dict = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values()) / harness.GB if per else 0.0


def worker_config(config, spec: dict, overridden):
    """``config`` set up for one worker: its mesh and global batch, random data of the benchmark's shapes; a
    key given on the command line (``overridden``) keeps its value."""
    from experiments import dit_setup
    from experiments.overrides import apply_overrides

    b, n = config.bench, spec["devices"]
    mcfg = dit_setup.transformer_config(config.model)
    values = {"mesh.data": spec["data"], "mesh.fsdp": spec["fsdp"], "mesh.devices": n,
              "data.batch_size": n * b.per_device_batch,
              "data.random_latent_shape": (*b.grid, mcfg.in_channels),
              "data.random_text_shape": (b.text_len, mcfg.text_dim)}
    apply_overrides(config, {k: v for k, v in values.items() if k not in overridden}, "step_bench")
    return config


def worker(config, spec: dict, overridden) -> dict:
    import jax
    import numpy as np

    from experiments import dit_setup, reward_finetune
    from shelllcc import parallel
    from shelllcc.training import train_state as ts
    from shelllcc.training.step import jit_train_step, make_train_step, microbatch_count, train_state_shardings

    t_start = time.perf_counter()
    config = worker_config(config, spec, overridden)
    b, variants = config.bench, spec["variants"]

    # --- as dit_setup.run_training builds them (keep in step with it)
    mesh = dit_setup.make_mesh(config.mesh)
    rules = dit_setup.sharding_rules(config)
    k = microbatch_count(config.data.batch_size, config.train.microbatch_size, mesh)
    devices = list(mesh.devices.flat)
    _say(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); mesh {dict(mesh.shape)}; "
         f"global batch {config.data.batch_size}" + (f" in {k} microbatches" if k > 1 else "")
         + f"; latent {tuple(config.data.random_latent_shape)}, text {tuple(config.data.random_text_shape)}")
    t0 = time.perf_counter()
    loaded = dit_setup.build_model(config.model, mesh, rules)
    init_s = time.perf_counter() - t0
    source = loaded.source
    graphdef, trainable, frozen_model = dit_setup.split_trainable(loaded.model, config.lora, config.seed)
    params, frozen_pure = trainable.to_pure_dict(), frozen_model.to_pure_dict()
    optimizer, schedule = dit_setup.optimizer_from(config, params)
    with dit_setup.sharding_context(mesh, rules):
        param_sh = dit_setup.state_shardings(trainable, mesh)
        frozen_model_sh = dit_setup.state_shardings(frozen_model, mesh)
        opt_sh = parallel.optimizer_shardings(optimizer, trainable, mesh)
    setup = dit_setup.Setup(graphdef, params, frozen_pure, mesh, param_sh)
    loss_fn, extra_frozen, extra_sh = reward_finetune.make_loss(config)(setup)
    frozen = {"model": frozen_pure, **extra_frozen}
    frozen_sh = {"model": frozen_model_sh, **extra_sh}
    state_sh = train_state_shardings(param_sh, opt_sh, frozen_sh, mesh)
    rep = parallel.replicated(mesh)
    rng = parallel.place(jax.random.PRNGKey(config.seed), rep)
    frozen = parallel.place(frozen, frozen_sh)
    params = parallel.place(params, param_sh)
    with dit_setup.sharding_context(mesh, rules):
        state = jax.jit(lambda p, f: ts.create(p, optimizer, f), out_shardings=state_sh)(params, frozen)
    del params, frozen_pure, trainable, frozen_model, loaded
    host_iter = dit_setup.host_batches(config.data, config.seed)
    batch = jax.block_until_ready(parallel.global_batch(next(host_iter), mesh))
    state = jax.block_until_ready(state)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen["model"]))
    live_gb = _live_gb_per_device()
    _say(f"model {source}: {n_train:,} trainable, {n_frozen:,} frozen parameters; init "
         f"{init_s:.1f}s; live arrays {live_gb:.2f} GB/device")

    # --- one jitted step per variant, traced and compiled ahead of time under its reward
    compiled, compile_s, mem = {}, {}, {}
    calls: list = []
    for v in variants:
        step = jit_train_step(make_train_step(loss_fn, optimizer, schedule, k), state_sh, mesh)
        t0 = time.perf_counter()
        with _reward_as(v, calls), jax.set_mesh(mesh):
            lowered = step.jitted.lower(state, batch, rng)
        traced = [c for c in calls if c[0] == v]
        if not traced:
            raise RuntimeError(f"variant {v}: the step never called reward_finetune.manifold_distance; the "
                               f"benchmark's hook no longer matches experiments/reward_finetune.py")
        compiled[v] = lowered.compile()
        compile_s[v] = time.perf_counter() - t0
        mem[v] = harness.memory_analysis(compiled[v])
        _say(f"{v}: compiled in {compile_s[v]:.1f}s " + json.dumps({a: round(b, 3) for a, b in mem[v].items()}))

    holder = {"state": state, "metrics": None}
    del state

    def run(v):
        def go():
            holder["state"], holder["metrics"] = compiled[v](holder["state"], batch, rng)
            return holder["state"], holder["metrics"]
        return go

    for v in variants:
        t0 = time.perf_counter()
        harness.timed(run(v), 0, max(b.warmup, 1))
        _say(f"{v}: {max(b.warmup, 1)} warm-up step(s) in {time.perf_counter() - t0:.1f}s")
    times = {v: [] for v in variants}
    last = {}
    for _ in range(b.steps):             # interleaved, so slow drifts hit every variant alike
        for v in variants:
            times[v] += harness.timed(run(v), 1)
            last[v] = holder["metrics"]
    metrics = {v: {key: float(x) for key, x in jax.device_get(m).items()} for v, m in last.items()}
    for v in variants:
        _say(f"{v}: median {statistics.median(times[v]):.1f} ms/step over {b.steps} "
             f"(min {min(times[v]):.1f}); loss {metrics[v].get('loss', float('nan')):.5g}")

    out = dict(devices=len(devices), mesh=dict(mesh.shape), device_kind=devices[0].device_kind,
               platform=jax.default_backend(), init_s=init_s, n_trainable=n_train, n_frozen=n_frozen,
               live_state_gb=live_gb, microbatches=k, config=config_summary(config),
               versions={m: harness.package_version(m) for m in ("jax", "jaxlib", "flax", "optax")}, variants={})
    for v in variants:
        out["variants"][v] = dict(step_ms=statistics.median(times[v]), step_ms_min=min(times[v]),
                                  step_ms_max=max(times[v]), step_ms_all=[round(t, 3) for t in times[v]],
                                  compile_s=compile_s[v], memory_analysis=mem[v], metrics=metrics[v])
    if "reward" in variants and "no_reward" in variants:
        diffs = [a - b for a, b in zip(times["reward"], times["no_reward"])]
        out["paired_diff_ms"] = statistics.median(diffs)

    # --- the reward alone, with the options the step passed to it
    if spec.get("reward_alone"):
        rec = next((c for c in calls if c[0] == "reward"), None)
        if rec is None:
            raise RuntimeError("reward alone: no traced call of the real reward to copy options from")
        _, kind, target, kw, z_shape = rec
        import jax.numpy as jnp

        from shelllcc.rewards import manifold_distance
        manifold = holder["state"].frozen["manifold"]
        z = jax.device_put(jax.random.normal(jax.random.PRNGKey(7), z_shape, jnp.float32),
                           parallel.batch_sharding(mesh))

        def reward(p, z):
            return manifold_distance(p, z, kind, target, **kw)

        fn = jax.jit(jax.value_and_grad(reward, argnums=1))
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            rc = fn.lower(manifold, z).compile()
        r_compile = time.perf_counter() - t0
        r_times = harness.timed(lambda: rc(manifold, z), b.steps, max(b.warmup, 1))
        out["reward_alone"] = dict(reward_ms=statistics.median(r_times), reward_ms_min=min(r_times),
                                   compile_s=r_compile, z_shape=list(z_shape),
                                   options={k2: (str(v2) if not isinstance(v2, (int, float, str, bool, type(None)))
                                                 else v2) for k2, v2 in kw.items() if k2 != "mesh"},
                                   kind=kind, target=target)
        _say(f"reward alone (value_and_grad w.r.t. z {tuple(z_shape)}): median {out['reward_alone']['reward_ms']:.1f} "
             f"ms, compile {r_compile:.1f}s")

    out["peak_gb"] = harness.jax_peak_gb(devices)
    out["wall_s"] = time.perf_counter() - t_start
    return out


# ------------------------------------------------------------------------------------------ the parent

def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("mesh", "batch_size")}


def _earlier_t1(path: str, config_arg: str, overrides: list, summary: dict) -> float | None:
    """The 1-device step time of an earlier scale run of the same configuration in ``path`` (a split run:
    ``devices=1,2`` then ``devices=4`` with the same ``out_dir``); the latest wins."""
    if not os.path.exists(path):
        return None
    t1 = None
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (r.get("part") == "scale" and r.get("n_devices") == 1 and r.get("step_ms")
                    and r.get("config_arg") == config_arg and r.get("overrides") == overrides
                    and _comparable(r.get("config") or {}) == _comparable(summary)):
                t1 = r["step_ms"]
    return t1


def _platform(choice: str) -> str:
    if choice != "auto":
        return choice
    return "gpu" if (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0")) else "cpu"


def worker_env(n: int, platform: str) -> dict:
    """The environment variables that give a worker its ``n`` devices."""
    if platform == "cpu":
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        return {"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"]), "JAX_PLATFORMS": "cpu"}
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible or [str(i) for i in range(n)]
    if len(ids) < n:
        raise SystemExit(f"{n} devices asked for, CUDA_VISIBLE_DEVICES lists {len(ids)}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[:n])}


def run_worker(argv, b, name: str, spec: dict, platform: str, out_dir: str) -> dict:
    log_path = os.path.join(out_dir, f"{name}.log")
    print(f"{PROGRESS}{name}: starting ({spec['devices']} device(s), mesh data {spec['data']} x fsdp "
          f"{spec['fsdp']}); log {log_path}", flush=True)

    def progress(line):
        if line.startswith(PROGRESS):
            print(f"  {name}: {line[len(PROGRESS):].rstrip()}", flush=True)

    done = harness.run(harness.script_cmd(THIS, *argv, "--worker=" + json.dumps(spec)), timeout=b.worker_timeout,
                       env=worker_env(spec["devices"], platform), log=log_path, on_line=progress)
    if done.result is None:       # a worker that printed its result and then failed (e.g. at exit) still counts
        print(f"{PROGRESS}{name}: FAILED ({done.error}) after {done.wall_s:.0f}s; last output:\n{done.tail(25)}",
              flush=True)
        return {"error": done.error, "log": log_path}
    return {**done.result, "worker_wall_s": done.wall_s, "log": log_path}


def main(argv, original_argv) -> None:
    from absl import flags
    from ml_collections import config_flags

    config = flags.FLAGS.config
    overridden = config_flags.get_override_values(flags.FLAGS["config"])
    if flags.FLAGS.worker:
        harness.emit(worker(config, json.loads(flags.FLAGS.worker), overridden))
        return

    b = config.bench
    parts = [x for x in b.parts.split(",") if x]
    unknown = set(parts) - {"share", "scale"}
    if unknown:
        raise SystemExit(f"unknown bench.parts {sorted(unknown)}; expected share, scale")
    meshes = [m for x in b.mesh.split(",") for m in (("data", "fsdp") if x == "both" else (x,)) if m]
    if set(meshes) - {"data", "fsdp", "2d"}:
        raise SystemExit(f"unknown bench.mesh {b.mesh!r}; expected data, fsdp, 2d or both")
    platform = _platform(b.platform)
    out_dir = b.out_dir or tempfile.mkdtemp(prefix="step_bench_")
    bench = harness.Bench("step_bench", b.out_jsonl, out_dir, original_argv)
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[2] or "1.3b-full"
    overrides = [f"{k}={v}" for k, v in overridden.items() if not k.startswith("bench.")]
    print(f"{PROGRESS}config wan21_reward.py:{config_arg}, platform {platform}, logs in {out_dir}", flush=True)

    def write(record: dict) -> None:
        bench.record(config_arg=config_arg, overrides=overrides, **record)

    def common(res: dict) -> dict:
        return dict(device=res.get("device_kind"), platform=res.get("platform"), n_devices=res.get("devices"),
                    mesh=res.get("mesh"), config=res.get("config"), peak_gb=res.get("peak_gb"),
                    live_state_gb=res.get("live_state_gb"), init_s=res.get("init_s"),
                    n_trainable=res.get("n_trainable"), versions=res.get("versions"), log=res.get("log"))

    table: list[str] = []
    if "share" in parts:
        n = b.share_devices
        spec = dict(devices=n, data=n, fsdp=1, variants=["reward", "no_reward"], reward_alone=True)
        res = run_worker(argv, b, f"share_{n}dev", spec, platform, out_dir)
        if "error" in res:
            write(dict(part="share", n_devices=n, error=res["error"], log=res["log"]))
            table.append(f"share ({n} device(s)): FAILED, {res['error']} (see {res['log']})")
        else:
            w, wo = res["variants"]["reward"], res["variants"]["no_reward"]
            share = (w["step_ms"] - wo["step_ms"]) / w["step_ms"]
            alone = res.get("reward_alone", {})
            rec = dict(part="share", **common(res), step_ms=w["step_ms"], step_ms_min=w["step_ms_min"],
                       step_ms_without_reward=wo["step_ms"], step_ms_without_reward_min=wo["step_ms_min"],
                       reward_share=share, paired_diff_ms=res.get("paired_diff_ms"),
                       paired_reward_share=res.get("paired_diff_ms", 0.0) / w["step_ms"],
                       reward_ms=alone.get("reward_ms"),
                       reward_alone_share=(alone["reward_ms"] / w["step_ms"]) if alone else None,
                       reward_options=alone.get("options"), reward_z_shape=alone.get("z_shape"),
                       compile_s=w["compile_s"], compile_s_without_reward=wo["compile_s"],
                       step_ms_all=w["step_ms_all"], step_ms_without_reward_all=wo["step_ms_all"],
                       memory_analysis=w["memory_analysis"], metrics=w["metrics"],
                       metrics_without_reward=wo["metrics"], steps=b.steps, warmup=b.warmup)
            write(rec)
            table += [
                f"share: {res['device_kind']} x {n}, latent {res['config']['latent_shape']}, reward "
                f"{res['config']['reward']['kind']} ({res['config']['reward']['compute_dtype']}, "
                f"{res['config']['reward']['num_anchors']} anchors x {res['config']['reward']['hidden_dim']})",
                f"  {'step with reward':32s} {w['step_ms']:10.1f} ms   (min {w['step_ms_min']:.1f})",
                f"  {'step, reward -> mean(z^2)':32s} {wo['step_ms']:10.1f} ms   (min {wo['step_ms_min']:.1f})",
                f"  {'reward_share':32s} {100 * share:10.2f} %    (paired median "
                f"{100 * rec['paired_reward_share']:.2f} %; target <= 2 %)",
                f"  {'reward alone (value_and_grad)':32s} {alone.get('reward_ms', float('nan')):10.1f} ms   "
                f"({100 * (rec['reward_alone_share'] or float('nan')):.2f} % of the step)",
                f"  {'peak_gb':32s} {res['peak_gb'] if res['peak_gb'] is not None else float('nan'):10.2f}"
                f"      (live state {res['live_state_gb']:.2f} GB/device)"]

    if "scale" in parts:
        runs = []
        for n in sorted(set(b.devices)):
            if n == 1:
                runs.append(("single", 1, 1, 1))
                continue
            for m in meshes:
                if m == "data":
                    runs.append(("data", n, n, 1))
                elif m == "fsdp":
                    runs.append(("fsdp", n, 1, n))
                elif n >= 4 and n % 2 == 0:
                    runs.append(("2d", n, 2, n // 2))
                else:
                    print(f"{PROGRESS}skipping mesh 2d at {n} devices (needs an even count >= 4)", flush=True)
        t1 = b.t1_ms or None
        t1_from = "bench.t1_ms" if t1 else ""
        rows = []
        for label, n, data, fsdp in runs:
            spec = dict(devices=n, data=data, fsdp=fsdp, variants=["reward"], reward_alone=False)
            res = run_worker(argv, b, f"scale_{n}dev_{label}", spec, platform, out_dir)
            if "error" in res:
                write(dict(part="scale", n_devices=n, mesh_kind=label, mesh=dict(data=data, fsdp=fsdp),
                           error=res["error"], log=res["log"]))
                rows.append((label, n, data, fsdp, None, None, None, res["error"]))
                continue
            v = res["variants"]["reward"]
            if n == 1:
                t1, t1_from = v["step_ms"], "this run"
            elif not t1:
                t1 = _earlier_t1(bench.path("jsonl"), config_arg, overrides, res["config"])
                t1_from = f"an earlier 1-device record in {out_dir}/step_bench.jsonl" if t1 else ""
            eff = t1 / v["step_ms"] if t1 else None
            write(dict(part="scale", mesh_kind=label, **common(res), step_ms=v["step_ms"],
                       step_ms_min=v["step_ms_min"], step_ms_all=v["step_ms_all"], step_ms_1dev=t1,
                       scaling_efficiency=eff, compile_s=v["compile_s"], memory_analysis=v["memory_analysis"],
                       metrics=v["metrics"], steps=b.steps, warmup=b.warmup))
            rows.append((label, n, data, fsdp, v["step_ms"], res["peak_gb"], eff, ""))
        table.append(f"weak scaling ({b.per_device_batch} example(s) per device, config {config_arg}; "
                     f"t_1 from {t1_from or 'nowhere: set bench.t1_ms or include 1 in bench.devices'}):")
        table.append(f"  {'mesh':8s} {'devices':>7s} {'data x fsdp':>11s} {'step_ms':>10s} {'peak_gb':>8s} "
                     f"{'scaling_efficiency':>18s}")
        for label, n, data, fsdp, ms, peak, eff, err in rows:
            if ms is None:
                table.append(f"  {label:8s} {n:7d} {f'{data} x {fsdp}':>11s}  FAILED: {err}")
                continue
            table.append(f"  {label:8s} {n:7d} {f'{data} x {fsdp}':>11s} {ms:10.1f} "
                         f"{peak if peak is not None else float('nan'):8.2f} "
                         f"{eff if eff is not None else float('nan'):18.3f}")

    bench.log(f"\ncommand: {bench.command}")
    for line in table:
        bench.log(line)


def run() -> None:
    """Parse the command line (earlier spellings rewritten) with ml_collections' config flags, then ``main``."""
    from absl import app, flags
    from ml_collections import config_flags

    argv = modern_argv(sys.argv[1:])
    config_flags.DEFINE_config_file("config", f"{THIS}:1.3b-full", "this file with a configs/wan21_reward.py "
                                    "argument; --config.KEY=VALUE sets a field", lock_config=True,
                                    sys_argv=[sys.argv[0], *argv])
    flags.DEFINE_string("worker", None, "internal: the spec of one worker process (JSON)")
    app.run(lambda _: main(argv, sys.argv[1:]), argv=[sys.argv[0], *argv])


if __name__ == "__main__":
    run()
