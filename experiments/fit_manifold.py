"""Experiment ``fit_manifold``: two-stage Shell-LCC fit on a latent source, saved with orbax.

Writes under ``workdir``: ``checkpoints/`` (resumable fit state), ``manifold/`` (the fitted manifold,
loadable with ``shelllcc.manifold.io.load_manifold``), ``metrics.jsonl`` and ``distances.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from experiments import config_entry
from shelllcc import parallel
from shelllcc.data import latent_files, synthetic_latents
from shelllcc.manifold import fit, io
from shelllcc.manifold.init import calibrate_shell, init_manifold
from shelllcc.manifold.losses import Stage1Weights
from shelllcc.manifold.params import ManifoldConfig
from shelllcc.manifold.coders import amortized_code
from shelllcc.manifold.patches import check_latents, patchify, unpatchify
from shelllcc.rewards import manifold_distance
from shelllcc.training import checkpoints, metric_writers


def default_config() -> ml_collections.ConfigDict:
    """Every key of this experiment, with defaults; config files override values, never add keys."""
    c = ml_collections.ConfigDict()
    c.experiment = "fit_manifold"
    c.seed = 0
    c.compute_dtype = "float32"
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh = dict(data=-1, fsdp=1)

    c.data = dict(
        source="synthetic",              # synthetic | npy | cache
        test_fraction=0.1,               # held-out latents for the distance report
        max_train_patches=2_000_000,     # host-memory bound on the patch pool (0: no bound)
        synthetic=dict(dim=16, num_components=8, sigma=0.5, center_scale=3.0, num_videos=64,
                       grid=(4, 16, 16), region=(1, 8, 8)),
        npy=dict(pattern="", layout="channels_last", key=""),
        # a latent cache (shelllcc.data.latent_cache); latents normalised (x - mean) / std as the DiT
        # experiments' data.latent_mean / latent_std do, so the manifold lives in the generator's space
        cache=dict(dir="", max_examples=0, latent_mean=(), latent_std=()),
    )
    c.manifold = dict(num_anchors=64, hidden_dim=128, patch_size=(1, 1, 1), anchor_init="kmeans++",
                      kmeans_iters=10, init_patches=65_536)
    c.stage1 = dict(steps=1000, batch_size=2048, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0,
                    grad_clip=1.0, locality=0.1, usage=0.1, basis_to_patch=0.1)
    c.stage2 = dict(steps=500, batch_size=2048, learning_rate=3e-3, warmup_steps=50, weight_decay=0.0,
                    grad_clip=1.0, logvar_weight=0.01)
    c.eval = dict(chunk_size=8192, blur_radius=1, noise_std=0.5, regress_factor=0.3)
    return c


@dataclasses.dataclass
class LatentSplits:
    train_patches: np.ndarray   # [N, D]
    test_latents: np.ndarray    # [B, T, H, W, C]
    description: str


def load_latents(config) -> LatentSplits:
    d = config.data
    patch = tuple(config.manifold.patch_size)
    rng = np.random.default_rng(config.seed)
    if d.source == "synthetic":
        s = d.synthetic
        mixture = synthetic_latents.make_shell_mixture(config.seed, s.dim, s.num_components, s.sigma, s.center_scale)
        latents = synthetic_latents.synthetic_latent_videos(mixture, rng, s.num_videos, tuple(s.grid), tuple(s.region))
        desc = (f"synthetic shell mixture: {s.num_components} components in D={s.dim}, "
                f"shell radius {mixture.radius:.3f}, {s.num_videos} latents of grid {tuple(s.grid)}, "
                f"one component per {tuple(s.region)} region")
    elif d.source == "npy":
        if not d.npy.pattern:
            raise ValueError("data.source='npy' needs --config.data.npy.pattern='/path/*.npy'")
        latents, report = latent_files.load_latent_files(d.npy.pattern, d.npy.layout, d.npy.key or None)
        desc = f"{report['used']} of {report['files']} files matching {d.npy.pattern!r}, {latents.shape[0]} latents"
        if report["skipped"]:
            desc += f"; skipped {report['skipped']}"
    elif d.source == "cache":
        latents, desc = _cache_latents(d.cache)
    else:
        raise ValueError(f"unknown data.source {d.source!r}; expected 'synthetic', 'npy' or 'cache'")
    if latents.shape[0] < 2:
        raise ValueError(f"need at least 2 latents to hold some out for testing, got {latents.shape[0]}")
    order = rng.permutation(latents.shape[0])
    n_test = min(max(1, int(round(d.test_fraction * latents.shape[0]))), latents.shape[0] - 1)
    test, train = latents[order[:n_test]], latents[order[n_test:]]
    dim = latents.shape[-1] * math.prod(patch)
    check_latents(train, dim, patch)
    patches = np.asarray(patchify(jnp.asarray(train), patch)).reshape(-1, dim)
    if d.max_train_patches and patches.shape[0] > d.max_train_patches:
        patches = patches[rng.choice(patches.shape[0], d.max_train_patches, replace=False)]
    return LatentSplits(train_patches=patches, test_latents=test, description=desc)


def _cache_latents(c) -> tuple[np.ndarray, str]:
    if not c.dir:
        raise ValueError("data.source='cache' needs --config.data.cache.dir=/path/to/latent/cache")
    if len(c.latent_mean) != len(c.latent_std):
        raise ValueError(f"data.cache.latent_mean has {len(c.latent_mean)} entries, latent_std {len(c.latent_std)}")
    from shelllcc.data.latent_cache import open_cache
    cache = open_cache(c.dir, latent_dtype=np.float32)
    n = len(cache) if not c.max_examples else min(c.max_examples, len(cache))
    latents = np.stack([cache[i]["latents"] for i in range(n)])
    if len(c.latent_mean):
        if len(c.latent_mean) != latents.shape[-1]:
            raise ValueError(f"data.cache.latent_mean has {len(c.latent_mean)} entries; cache {c.dir!r} latents "
                             f"have {latents.shape[-1]} channels")
        latents = (latents - np.asarray(c.latent_mean, np.float32)) / np.asarray(c.latent_std, np.float32)
    norm = " (normalised)" if len(c.latent_mean) else ""
    return latents, f"{n} of {len(cache)} latents{norm} from the cache {c.dir!r}, each {latents.shape[1:]}"


def _batch(pool: np.ndarray, seed: int, stage: int, step: int, batch_size: int) -> np.ndarray:
    # A pure function of (seed, stage, step): a resumed run draws exactly the batches it would have.
    rng = np.random.default_rng([seed, stage, step])
    return pool[rng.integers(0, pool.shape[0], batch_size)]


class _Progress:
    """Buffers each step's device metrics and writes their means every ``every`` steps (console,
    TensorBoard, ``metrics.jsonl``) with steps/s and ETA; the device is waited on only then."""

    def __init__(self, writer, every: int, total: int):
        self.writer, self.every, self.total = writer, every, total
        self.pending, self.t0, self.s0 = [], time.time(), None

    def add(self, step: int, stage: int, metrics) -> None:
        if self.s0 is None:
            self.s0, self.t0 = step, time.time()
        if self.pending and self.pending[-1][0] != stage:
            self.flush(step - 1, self.pending[-1][0])       # never average stage-1 and stage-2 metrics together
        self.pending.append((stage, metrics))
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.flush(step, stage)

    def flush(self, step: int, stage: int) -> None:
        fetched = jax.device_get([m for _, m in self.pending])
        self.pending = []
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        rate = (step + 1 - self.s0) / max(time.time() - self.t0, 1e-9)
        self.writer.write_scalars(step + 1, dict(mean, stage=stage, steps_per_s=rate,
                                                 eta_s=(self.total - step - 1) / max(rate, 1e-9)))


def _blur(latents: np.ndarray, radius: int) -> np.ndarray:
    """Box blur over (H, W): a stand-in for a generator's over-smoothed latents."""
    if radius <= 0:
        return latents
    k = 2 * radius + 1
    padded = np.pad(latents, ((0, 0), (0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = np.zeros_like(latents)
    for dy in range(k):
        for dx in range(k):
            out += padded[:, :, dy:dy + latents.shape[2], dx:dx + latents.shape[3]]
    return out / (k * k)


def evaluate(params, mconfig: ManifoldConfig, splits: LatentSplits, config, tau: float) -> dict:
    """Each distance on held-out real latents and on degraded copies of them."""
    test = splits.test_latents
    rng = np.random.default_rng(config.seed + 1)
    mean, std = test.mean(axis=(0, 1, 2, 3)), test.std(axis=(0, 1, 2, 3))
    variants = {
        "real (held out)": test,
        f"blurred (box {2 * config.eval.blur_radius + 1}x{2 * config.eval.blur_radius + 1})":
            _blur(test, config.eval.blur_radius),
        f"real + noise (std {config.eval.noise_std})": test + config.eval.noise_std * std * rng.standard_normal(
            test.shape).astype(np.float32),
        "gaussian (matched mean/std)": (mean + std * rng.standard_normal(test.shape)).astype(np.float32),
    }
    # Mean regression made explicit: each patch moved toward its own skeleton point.
    flat = jnp.asarray(patchify(jnp.asarray(test), mconfig.patch_size)).reshape(-1, mconfig.dim)
    zhat = np.asarray(amortized_code(params, flat, eps=mconfig.bn_eps)[1])
    a = config.eval.regress_factor
    regressed = zhat + a * (np.asarray(flat) - zhat)
    grid = test.shape[1:4]
    variants[f"pulled to skeleton (x{a})"] = np.asarray(
        unpatchify(jnp.asarray(regressed).reshape(test.shape[0], -1, mconfig.dim), grid, mconfig.patch_size))
    kinds = {"lcc": None, "shell_norm": None, "shell": None, "shell_band": tau}
    results = {}
    for name, lat in variants.items():
        results[name] = {
            kind: float(manifold_distance(params, jnp.asarray(lat), kind, target, patch_size=mconfig.patch_size,
                                          chunk_size=config.eval.chunk_size, bn_eps=mconfig.bn_eps,
                                          shell_eps=mconfig.shell_eps))
            for kind, target in kinds.items()}
    return results


def _stage_steps(config):
    s1, s2 = config.stage1, config.stage2
    optim1 = fit.OptimConfig(s1.learning_rate, s1.warmup_steps, s1.steps, s1.weight_decay, s1.grad_clip)
    optim2 = fit.OptimConfig(s2.learning_rate, s2.warmup_steps, s2.steps, s2.weight_decay, s2.grad_clip)
    return fit.make_optimizer(optim1), fit.make_optimizer(optim2)


get_config = config_entry.defaults_entry(default_config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    n_shards = parallel.num_batch_shards(mesh)
    for stage in ("stage1", "stage2"):
        if config[stage].batch_size % n_shards:
            raise ValueError(f"{stage}.batch_size={config[stage].batch_size} is not divisible by the "
                             f"{n_shards} batch shards of the mesh {dict(mesh.shape)}")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}", flush=True)

    splits = load_latents(config)
    pool = splits.train_patches
    print(f"data: {splits.description}", flush=True)
    print(f"train patches: {pool.shape[0]} x D={pool.shape[1]}; test latents: {splits.test_latents.shape}", flush=True)

    m = config.manifold
    mconfig = ManifoldConfig(dim=pool.shape[1], num_anchors=m.num_anchors, hidden_dim=m.hidden_dim,
                             patch_size=tuple(m.patch_size))
    compute_dtype = jnp.dtype(config.compute_dtype)
    opt1, opt2 = _stage_steps(config)
    weights = Stage1Weights(config.stage1.locality, config.stage1.usage, config.stage1.basis_to_patch)
    step1 = fit.jit_step(lambda s, b: fit.stage1_step(s, b, optimizer=opt1, weights=weights, config=mconfig,
                                                      compute_dtype=compute_dtype), mesh)
    step2 = fit.jit_step(lambda s, b: fit.stage2_step(s, b, optimizer=opt2, config=mconfig,
                                                      logvar_weight=config.stage2.logvar_weight,
                                                      compute_dtype=compute_dtype), mesh)
    n1, n2 = config.stage1.steps, config.stage2.steps
    total = n1 + n2

    rng = np.random.default_rng(config.seed)
    init_sample = pool[rng.choice(pool.shape[0], min(pool.shape[0], m.init_patches), replace=False)]
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    start, stage = 0, 1
    latest = manager.latest_step()
    if latest is None:
        t0 = time.time()
        params = init_manifold(jax.random.PRNGKey(config.seed), mconfig, init_sample, m.anchor_init,
                               m.kmeans_iters)
        print(f"anchors: {m.num_anchors} by {m.anchor_init} from {init_sample.shape[0]} patches "
              f"in {time.time() - t0:.1f}s", flush=True)
        state = parallel.replicate_tree(fit.init_state(params, opt1, 1), mesh)
    else:
        # The restore target is built abstractly: re-running the anchor init (k-means) would be wasted.
        meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        stage = meta["stage"]
        abstract = jax.eval_shape(lambda p: fit.init_state(p, opt1 if stage == 1 else opt2, stage),
                                  io.abstract_params(mconfig))
        rep = parallel.replicated(mesh)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
        state = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        start = latest
        print(f"resumed from {ckpt_dir} at step {start} (stage {stage})", flush=True)

    def save(step, stage, state, force=False):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave({"stage": stage, "step": step})),
                     force=force)

    writer = metric_writers.create_writer(workdir, prefix="fit_manifold", total_steps=total)
    progress = _Progress(writer, config.log_every, total)
    try:
        with checkpoints.PreemptionGuard() as guard:
            for step in range(start, total):
                if guard.should_stop(step):
                    save(step, stage, state, force=True)
                    writer.write_texts(step, {"preempted": f"SIGTERM: saved a checkpoint at step {step}, exiting"})
                    raise checkpoints.Preempted(f"stopped by SIGTERM at step {step} (checkpoint saved)")
                if step == n1 and stage == 1:
                    # Stage 2 starts from the final stage-1 manifold with a calibrated shell and fresh optimizer.
                    params = calibrate_shell(jax.device_get(state.params), init_sample, mconfig.bn_eps)
                    state = parallel.replicate_tree(fit.init_state(params, opt2, 2), mesh)
                    stage = 2
                if stage == 1:
                    batch = _batch(pool, config.seed, 1, step, config.stage1.batch_size)
                    state, metrics = step1(state, parallel.shard_batch(batch, mesh))
                else:
                    batch = _batch(pool, config.seed, 2, step - n1, config.stage2.batch_size)
                    state, metrics = step2(state, parallel.shard_batch(batch, mesh))
                progress.add(step, stage, metrics)
                if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                    save(step + 1, stage, state)
            if total > start:
                save(total, stage, state, force=True)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()

    params = jax.device_get(state.params)
    skipped = int(state.skipped)
    tau = float(manifold_distance(params, jnp.asarray(init_sample), "shell_norm", chunk_size=config.eval.chunk_size,
                                  bn_eps=mconfig.bn_eps, shell_eps=mconfig.shell_eps))
    out = io.save_manifold(os.path.join(workdir, "manifold"), params, mconfig,
                           extra={"shell_band_target": tau, "data": splits.description})
    print(f"saved manifold to {out} (shell_band target tau = mean ||delta|| on train patches = {tau:.4f}); "
          f"non-finite steps skipped in the last stage: {skipped}", flush=True)

    results = evaluate(params, mconfig, splits, config, tau)
    with open(os.path.join(workdir, "distances.json"), "w") as f:
        json.dump(results, f, indent=2)
    kinds = list(next(iter(results.values())))
    print("\nmanifold distances (lower = closer to the data manifold):")
    print(f"{'latents':34s}" + "".join(f"{k:>12s}" for k in kinds))
    for name, row in results.items():
        print(f"{name:34s}" + "".join(f"{row[k]:12.4f}" for k in kinds))
    return results
