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
None on CPU), for the whole worker process. Each worker's full output goes to ``OUT_DIR/<name>.log``;
one JSONL record per worker is appended to ``--out-jsonl`` as soon as it finishes, so a partial run
keeps what it measured.

    python benchmarks/step_bench.py --out-dir $OUT/step_bench                    # GPUs: both parts
    python benchmarks/step_bench.py --parts share --out-dir $OUT/share           # ~4-5 min on one H100
    python benchmarks/step_bench.py --parts scale --devices 1 2 4 --mesh data    # ~2 min per worker
    python benchmarks/step_bench.py --parts share,scale --devices 1 2 --grid 3 8 8 --text-len 16 \\
        --num-anchors 64 --hidden-dim 32 --steps 3 --warmup 1 --out-jsonl /tmp/sb.jsonl \\
        --override model.preset=tiny model.dim=64 model.num_layers=2 model.num_heads=2 model.ffn_dim=128 \\
                   model.text_dim=64 model.freq_dim=256 model.attention_impl= model.remat_policy=none \\
                   model.param_dtype=float32 model.dtype=float32 reward.compute_dtype=float32   # CPU check

Never imports tensorflow; the parent process does not import jax at all (workers own the devices).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESULT = "RESULT "
PROGRESS = "[step_bench] "
GB = 1024.0 ** 3


# ------------------------------------------------------------------------------------------ config

def _parse_value(raw: str, current):
    """``raw`` (command-line text) as a value of ``current``'s type."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple):
        if isinstance(value, list):
            value = tuple(value)
        elif not isinstance(value, tuple):
            value = (value,)
    return value


def apply_override(config, item: str) -> None:
    """``key.path=value`` into ``config`` (the key must exist; the value takes the field's type)."""
    if "=" not in item:
        raise ValueError(f"--override expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise KeyError(f"--override {key}: no section {p!r} in the config")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"--override {key}: no field {leaf!r} (fields: {sorted(node.keys())})")
    node[leaf] = _parse_value(raw, node[leaf])


def build_config(args, spec: dict):
    """``configs/wan21_reward.py:<args.config>`` set up for the benchmark: random data of the benchmark's
    shapes, a random manifold, the worker's mesh and batch; then ``--override``s."""
    from configs import wan21_reward
    from experiments import dit_setup

    c = wan21_reward.get_config(args.config)
    n = spec["devices"]
    c.mesh.data, c.mesh.fsdp, c.mesh.devices = spec["data"], spec["fsdp"], n
    c.data.source = "random"
    c.data.batch_size = n * args.per_device_batch
    c.data.prefetch = 1
    c.train.microbatch_size = args.microbatch
    c.reward.manifold = "random"
    c.reward.random.num_anchors = args.num_anchors
    c.reward.random.hidden_dim = args.hidden_dim
    if args.kind:
        c.reward.kind = args.kind
    if args.compute_dtype:
        c.reward.compute_dtype = args.compute_dtype
    if args.chunk_size:
        c.reward.chunk_size = args.chunk_size
    for item in args.override:
        apply_override(c, item)
    keys = {item.split("=", 1)[0].removeprefix("config.") for item in args.override}
    mcfg = dit_setup.transformer_config(c.model)
    if "data.random_latent_shape" not in keys:
        c.data.random_latent_shape = (*args.grid, mcfg.in_channels)
    if "data.random_text_shape" not in keys:
        c.data.random_text_shape = (args.text_len, mcfg.text_dim)
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


def _peak_gb(devices) -> float | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001  (backends without memory stats)
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / GB if peaks else None


def _live_gb_per_device() -> float:
    """Largest per-device total of live jax arrays (what the state and anything kept alive hold)."""
    import jax
    per: dict = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values()) / GB if per else 0.0


def _memory_analysis(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if m is None:
        return {}
    out = {}
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes"):
        v = getattr(m, name, None)
        if v is not None:
            out[name.replace("_size_in_bytes", "_gb")] = v / GB
    return out


def _timed(fn, n: int) -> list[float]:
    import jax
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def worker(args, spec: dict) -> dict:
    import jax
    import numpy as np

    from experiments import dit_setup, reward_finetune
    from shelllcc import parallel
    from shelllcc.training import train_state as ts
    from shelllcc.training.step import jit_train_step, make_train_step, microbatch_count, train_state_shardings

    t_start = time.perf_counter()
    config = build_config(args, spec)
    variants = spec["variants"]

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
        mem[v] = _memory_analysis(compiled[v])
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
        _timed(run(v), max(args.warmup, 1))
        _say(f"{v}: {max(args.warmup, 1)} warm-up step(s) in {time.perf_counter() - t0:.1f}s")
    times = {v: [] for v in variants}
    last = {}
    for _ in range(args.steps):          # interleaved, so slow drifts hit every variant alike
        for v in variants:
            times[v] += _timed(run(v), 1)
            last[v] = holder["metrics"]
    metrics = {v: {key: float(x) for key, x in jax.device_get(m).items()} for v, m in last.items()}
    for v in variants:
        _say(f"{v}: median {statistics.median(times[v]):.1f} ms/step over {args.steps} "
             f"(min {min(times[v]):.1f}); loss {metrics[v].get('loss', float('nan')):.5g}")

    out = dict(devices=len(devices), mesh=dict(mesh.shape), device_kind=devices[0].device_kind,
               platform=jax.default_backend(), init_s=init_s, n_trainable=n_train, n_frozen=n_frozen,
               live_state_gb=live_gb, microbatches=k, config=config_summary(config),
               versions=_versions(), variants={})
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
        from shelllcc.rewards import manifold_distance
        import jax.numpy as jnp
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
        _timed(lambda: rc(manifold, z), max(args.warmup, 1))
        r_times = _timed(lambda: rc(manifold, z), args.steps)
        out["reward_alone"] = dict(reward_ms=statistics.median(r_times), reward_ms_min=min(r_times),
                                   compile_s=r_compile, z_shape=list(z_shape),
                                   options={k2: (str(v2) if not isinstance(v2, (int, float, str, bool, type(None)))
                                                 else v2) for k2, v2 in kw.items() if k2 != "mesh"},
                                   kind=kind, target=target)
        _say(f"reward alone (value_and_grad w.r.t. z {tuple(z_shape)}): median {out['reward_alone']['reward_ms']:.1f} "
             f"ms, compile {r_compile:.1f}s")

    out["peak_gb"] = _peak_gb(devices)
    out["wall_s"] = time.perf_counter() - t_start
    return out


def _versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    return out


# ------------------------------------------------------------------------------------------ the parent

def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("mesh", "batch_size")}


def _earlier_t1(path: str, args, summary: dict) -> float | None:
    """The 1-device step time of an earlier scale run of the same configuration in ``path`` (a split run:
    ``--devices 1 2`` then ``--devices 4`` with the same ``--out-dir``); the latest wins."""
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
                    and r.get("config_arg") == args.config and r.get("overrides") == list(args.override)
                    and _comparable(r.get("config") or {}) == _comparable(summary)):
                t1 = r["step_ms"]
    return t1


def _platform(choice: str) -> str:
    if choice != "auto":
        return choice
    return "gpu" if (shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0")) else "cpu"


def worker_env(n: int, platform: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env["JAX_PLATFORMS"] = "cpu"
    else:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible or [str(i) for i in range(n)]
        if len(ids) < n:
            raise SystemExit(f"{n} devices asked for, CUDA_VISIBLE_DEVICES lists {len(ids)}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
    return env


def run_worker(args, name: str, spec: dict, platform: str, out_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--_worker", json.dumps(spec)]
    env = worker_env(spec["devices"], platform)
    log_path = os.path.join(out_dir, f"{name}.log")
    shown_env = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "JAX_PLATFORMS") if k in env}
    print(f"{PROGRESS}{name}: starting ({spec['devices']} device(s), mesh data {spec['data']} x fsdp "
          f"{spec['fsdp']}); log {log_path}", flush=True)
    t0 = time.time()
    result = None
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in shown_env.items()) + " "
                  + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        tail: list[str] = []
        found: list[str] = []

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line)
                del tail[:-60]
                if line.startswith(RESULT):
                    found.append(line[len(RESULT):])
                elif line.startswith(PROGRESS):
                    print(f"  {name}: {line[len(PROGRESS):].rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=args.worker_timeout)
            error = None if proc.returncode == 0 else f"rc {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            error = f"timed out after {args.worker_timeout:.0f}s"
        reader.join(timeout=30)
        if found:
            result = json.loads(found[-1])
    wall = time.time() - t0
    if result is None:
        error = error or "no RESULT line"
        print(f"{PROGRESS}{name}: FAILED ({error}) after {wall:.0f}s; last output:\n" + "".join(tail[-25:]),
              flush=True)
        return {"error": error, "log": log_path}
    result["worker_wall_s"] = wall
    result["log"] = log_path
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="1.3b-full",
                   help="configs/wan21_reward.py argument: 1.3b-full | 1.3b-lora | ...")
    p.add_argument("--parts", default="share,scale", help="comma list of share, scale")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="device counts of the scale part")
    p.add_argument("--mesh", default="both", help="scale meshes, comma list of data, fsdp, 2d; both = data,fsdp")
    p.add_argument("--share-devices", type=int, default=1, help="devices of the share part (mesh data N x fsdp 1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (per variant)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (at least 1)")
    p.add_argument("--kind", default="", help="reward.kind (default: the config's, shell)")
    p.add_argument("--compute-dtype", default="", help="reward.compute_dtype (default: the config's, bfloat16)")
    p.add_argument("--chunk-size", type=int, default=0, help="reward.chunk_size (default: the config's)")
    p.add_argument("--num-anchors", type=int, default=4096, help="anchors of the random manifold")
    p.add_argument("--hidden-dim", type=int, default=512, help="coder hidden width of the random manifold")
    p.add_argument("--grid", type=int, nargs=3, default=[21, 60, 104], metavar=("T", "H", "W"),
                   help="latent grid (81 frames at 480x832)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (their width is the model's text_dim)")
    p.add_argument("--per-device-batch", type=int, default=1, help="examples per device per step")
    p.add_argument("--microbatch", type=int, default=1, help="train.microbatch_size (0: whole batch at once)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config fields, e.g. model.preset=tiny model.dim=64 reward.implementation=remat")
    p.add_argument("--t1-ms", type=float, default=0.0, help="1-device step time for the efficiency when 1 is "
                                                            "not among --devices")
    p.add_argument("--platform", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--out-dir", default="", help="worker logs and step_bench.jsonl (default: a new temp dir)")
    p.add_argument("--out-jsonl", default=os.path.join(REPO, "benchmarks", "results.jsonl"))
    p.add_argument("--worker-timeout", type=float, default=900.0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._worker:
        print(RESULT + json.dumps(worker(args, json.loads(args._worker))), flush=True)
        return

    args.argv = list(sys.argv[1:])
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - {"share", "scale"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; expected share, scale")
    meshes = [m for x in args.mesh.split(",") for m in (("data", "fsdp") if x == "both" else (x,)) if m]
    if set(meshes) - {"data", "fsdp", "2d"}:
        raise SystemExit(f"unknown --mesh {args.mesh!r}; expected data, fsdp, 2d or both")
    platform = _platform(args.platform)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="step_bench_")
    os.makedirs(out_dir, exist_ok=True)
    command = "python benchmarks/step_bench.py " + shlex.join(sys.argv[1:])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{PROGRESS}config wan21_reward.py:{args.config}, platform {platform}, logs in {out_dir}", flush=True)

    def write(record: dict) -> None:
        record = dict(bench="step_bench", date=date, command=command, config_arg=args.config,
                      overrides=list(args.override), **record)
        for path in filter(None, [args.out_jsonl, os.path.join(out_dir, "step_bench.jsonl")]):
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def common(res: dict) -> dict:
        return dict(device=res.get("device_kind"), platform=res.get("platform"), n_devices=res.get("devices"),
                    mesh=res.get("mesh"), config=res.get("config"), peak_gb=res.get("peak_gb"),
                    live_state_gb=res.get("live_state_gb"), init_s=res.get("init_s"),
                    n_trainable=res.get("n_trainable"), versions=res.get("versions"), log=res.get("log"))

    table: list[str] = []
    if "share" in parts:
        n = args.share_devices
        spec = dict(devices=n, data=n, fsdp=1, variants=["reward", "no_reward"], reward_alone=True)
        res = run_worker(args, f"share_{n}dev", spec, platform, out_dir)
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
                       metrics_without_reward=wo["metrics"], steps=args.steps, warmup=args.warmup)
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
        for n in sorted(set(args.devices)):
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
        t1 = args.t1_ms or None
        t1_from = "--t1-ms" if t1 else ""
        rows = []
        for label, n, data, fsdp in runs:
            spec = dict(devices=n, data=data, fsdp=fsdp, variants=["reward"], reward_alone=False)
            res = run_worker(args, f"scale_{n}dev_{label}", spec, platform, out_dir)
            if "error" in res:
                write(dict(part="scale", n_devices=n, mesh_kind=label, mesh=dict(data=data, fsdp=fsdp),
                           error=res["error"], log=res["log"]))
                rows.append((label, n, data, fsdp, None, None, None, res["error"]))
                continue
            v = res["variants"]["reward"]
            if n == 1:
                t1, t1_from = v["step_ms"], "this run"
            elif not t1:
                t1 = _earlier_t1(os.path.join(out_dir, "step_bench.jsonl"), args, res["config"])
                t1_from = f"an earlier 1-device record in {out_dir}/step_bench.jsonl" if t1 else ""
            eff = t1 / v["step_ms"] if t1 else None
            write(dict(part="scale", mesh_kind=label, **common(res), step_ms=v["step_ms"],
                       step_ms_min=v["step_ms_min"], step_ms_all=v["step_ms_all"], step_ms_1dev=t1,
                       scaling_efficiency=eff, compile_s=v["compile_s"], memory_analysis=v["memory_analysis"],
                       metrics=v["metrics"], steps=args.steps, warmup=args.warmup))
            rows.append((label, n, data, fsdp, v["step_ms"], res["peak_gb"], eff, ""))
        table.append(f"weak scaling ({args.per_device_batch} example(s) per device, config {args.config}; "
                     f"t_1 from {t1_from or 'nowhere: pass --t1-ms or include 1 in --devices'}):")
        table.append(f"  {'mesh':8s} {'devices':>7s} {'data x fsdp':>11s} {'step_ms':>10s} {'peak_gb':>8s} "
                     f"{'scaling_efficiency':>18s}")
        for label, n, data, fsdp, ms, peak, eff, err in rows:
            if ms is None:
                table.append(f"  {label:8s} {n:7d} {f'{data} x {fsdp}':>11s}  FAILED: {err}")
                continue
            table.append(f"  {label:8s} {n:7d} {f'{data} x {fsdp}':>11s} {ms:10.1f} "
                         f"{peak if peak is not None else float('nan'):8.2f} "
                         f"{eff if eff is not None else float('nan'):18.3f}")

    print("\n" + "\n".join(table), flush=True)
    with open(os.path.join(out_dir, "step_bench_table.txt"), "w") as f:
        f.write(command + "\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
