"""Experiment ``fit_manifold``: two-stage Shell-LCC fit on a latent source, saved with orbax.

Writes under ``workdir``: ``checkpoints/`` (resumable fit state), ``manifold/`` (the fitted manifold,
loadable with ``shelllcc.manifold.io.load_manifold``), ``metrics.jsonl`` and ``distances.json``.

The fit runs on the shared training stack: ``shelllcc.training.loop.train`` once per stage (stage 1
over steps ``[0, n1)``, stage 2 over ``[n1, n1 + n2)``), the shared train state and guarded update
(``shelllcc.manifold.fit``), ``Checkpointer`` (orbax: step, parameters, optimizer state, skipped
count; the stage in the checkpoint's meta) and ``PreemptionGuard`` (SIGTERM: save, then exit). The
stage-1 phase always ends with a checkpoint at ``n1``; a run resumed from it (or from any stage-1
step) builds stage 2's start again from the stage-1 state, as the uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import config_entry
from shelllcc import errors, parallel
from shelllcc.data import latent_files, synthetic_latents
from shelllcc.data.latent_cache import open_cache
from shelllcc.manifold import fit, io
from shelllcc.manifold.coders import amortized_code
from shelllcc.manifold.init import init_manifold
from shelllcc.manifold.losses import Stage1Weights
from shelllcc.manifold.params import ManifoldConfig
from shelllcc.manifold.patches import check_latents, patchify, unpatchify
from shelllcc.rewards import manifold_distance
from shelllcc.training import checkpoints, loop, metric_writers, optimizers
from shelllcc.training import train_state as ts


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
    skipped: list[str] = dataclasses.field(default_factory=list)   # "<file or record>: <why>", one per input left out


def load_latents(config) -> LatentSplits:
    d = config.data
    patch = tuple(config.manifold.patch_size)
    rng = np.random.default_rng(config.seed)
    skipped: list[str] = []
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
        skipped = [line for lines in report["skipped_files"].values() for line in lines]
    elif d.source == "cache":
        latents, desc, skipped = _cache_latents(d.cache)
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
    return LatentSplits(train_patches=patches, test_latents=test, description=desc, skipped=skipped)


def _cache_latents(c) -> tuple[np.ndarray, str, list[str]]:
    if not c.dir:
        raise ValueError("data.source='cache' needs --config.data.cache.dir=/path/to/latent/cache")
    if len(c.latent_mean) != len(c.latent_std):
        raise ValueError(f"data.cache.latent_mean has {len(c.latent_mean)} entries, latent_std {len(c.latent_std)}")
    cache = open_cache(c.dir, latent_dtype=np.float32)
    n = len(cache) if not c.max_examples else min(c.max_examples, len(cache))
    kept, skipped = [], []
    for i in range(n):
        ex = cache[i]
        bad = int(ex["latents"].size - np.count_nonzero(np.isfinite(ex["latents"])))
        if bad:
            # a NaN clip poisons the anchor init and every step after it (see latent_files)
            skipped.append(f"{c.dir}: record {i} (source index {int(ex.get('source_index', i))}): "
                           f"{bad} non-finite values")
        else:
            kept.append(ex["latents"])
    if not kept:
        raise ValueError(f"none of the {n} latents read from the cache {c.dir!r} is finite")
    latents = np.stack(kept)
    if len(c.latent_mean):
        if len(c.latent_mean) != latents.shape[-1]:
            raise ValueError(f"data.cache.latent_mean has {len(c.latent_mean)} entries; cache {c.dir!r} latents "
                             f"have {latents.shape[-1]} channels")
        latents = (latents - np.asarray(c.latent_mean, np.float32)) / np.asarray(c.latent_std, np.float32)
    norm = " (normalised)" if len(c.latent_mean) else ""
    desc = f"{n} of {len(cache)} latents{norm} from the cache {c.dir!r}, each {latents.shape[1:]}"
    if skipped:
        desc += f"; skipped {{'non_finite': {len(skipped)}}}"
    return latents, desc, skipped


def _batch(pool: np.ndarray, seed: int, stage: int, step: int, batch_size: int) -> np.ndarray:
    # A pure function of (seed, stage, step): a resumed run draws exactly the batches it would have.
    rng = np.random.default_rng([seed, stage, step])
    return pool[rng.integers(0, pool.shape[0], batch_size)]


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


def _init_sample(pool: np.ndarray, config) -> np.ndarray:
    """The patches the anchors are initialised from and the shell is calibrated on (a function of the seed)."""
    rng = np.random.default_rng(config.seed)
    return pool[rng.choice(pool.shape[0], min(pool.shape[0], config.manifold.init_patches), replace=False)]


def _stage_batches(pool: np.ndarray, config, stage: int, first: int, offset: int, batch_size: int, mesh):
    """Batches of global steps ``first, first + 1, ...``; step ``s`` of the run is step ``s - offset`` of the stage."""
    for step in itertools.count(first):
        yield parallel.shard_batch(_batch(pool, config.seed, stage, step - offset, batch_size), mesh)


def stage_steps(config, mconfig: ManifoldConfig, mesh) -> tuple[dict, Callable, Callable]:
    """``({1: optimizer, 2: optimizer}, stage-1 step, stage-2 step)``, jitted over ``mesh``: what a fit runs
    and what ``benchmarks/tpu_aot.py`` compiles for a TPU topology."""
    n1 = config.stage1.steps
    compute_dtype = jnp.dtype(config.compute_dtype)
    optim = {1: fit.stage_optim_config(config.stage1), 2: fit.stage_optim_config(config.stage2)}
    opt = {k: fit.make_optimizer(c) for k, c in optim.items()}
    sched1 = optimizers.make_schedule(optim[1])
    sched2_of_stage = optimizers.make_schedule(optim[2])
    # the learning rate reported at run step s of stage 2 is the stage-2 schedule at s - n1
    sched2 = lambda step: sched2_of_stage(step - n1)  # noqa: E731
    weights = Stage1Weights(config.stage1.locality, config.stage1.usage, config.stage1.basis_to_patch)
    step1 = fit.jit_step(lambda s, b: fit.stage1_step(s, b, optimizer=opt[1], weights=weights, config=mconfig,
                                                      compute_dtype=compute_dtype, schedule=sched1), mesh)
    step2 = fit.jit_step(lambda s, b: fit.stage2_step(s, b, optimizer=opt[2], config=mconfig,
                                                      logvar_weight=config.stage2.logvar_weight,
                                                      compute_dtype=compute_dtype, schedule=sched2), mesh)
    return opt, step1, step2


def fit_stages(config, workdir: str, pool: np.ndarray, init_sample: np.ndarray, mconfig: ManifoldConfig,
               mesh) -> ts.TrainState:
    """Both stages on the shared loop, resumed from ``workdir/checkpoints`` when it holds a checkpoint.

    Returns the final train state (replicated over ``mesh``). Raises ``checkpoints.Preempted`` after
    saving a checkpoint when SIGTERM arrives.
    """
    n1, n2 = config.stage1.steps, config.stage2.steps
    total = n1 + n2
    opt, step1, step2 = stage_steps(config, mconfig, mesh)

    rep = parallel.replicated(mesh)
    # the fit's data and model by content: a resume on other patches (another data.source, files, cache or
    # normalisation) would continue a fit of one data set on another and call the result one manifold
    resume = {"data (the training patches)": checkpoints.tree_sha256({"pool": pool, "init_sample": init_sample}),
              **{f"manifold.{k}": v for k, v in dataclasses.asdict(mconfig).items()}}
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
        print(f"note: {ckpt_dir} holds checkpoints of the former layout (<step>/ directly under it); they are "
              f"not resumed from (checkpoints now live in {ckpt_dir}/orbax)", flush=True)
    ckpt = checkpoints.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
    # saved with every checkpoint, as the shared loop does; the fit's steps draw no random numbers
    rng = parallel.place(jax.random.PRNGKey(config.seed), rep)
    def resume_from(step):
        # the checkpoint's stage says which optimizer's state it holds; the restore target is built
        # abstractly (re-running the anchor init, a k-means, would be wasted)
        saved = ckpt.meta(step)
        stage = saved["stage"]
        try:
            checkpoints.check_resume_settings(saved.get("resume_settings"), resume, f"{ckpt_dir} (step {step})")
        except errors.UserError as e:
            raise errors.UserError(f"{e} (data: data.source={config.data.source!r})") from None
        # a stage-1 checkpoint past the new stage1.steps would run no stage 1, then start stage 2 late; a
        # stage-2 one before it, or past the end, has no place in this config's schedule
        if (stage == 1 and step > n1) or (stage == 2 and not n1 <= step <= total):
            raise errors.UserError(
                f"{ckpt_dir} holds a stage-{stage} checkpoint at step {step}, which config stage1.steps={n1}, "
                f"stage2.steps={n2} does not reach; resume with the steps it was written with, or use a new workdir")
        abstract = jax.eval_shape(lambda p: fit.init_state(p, opt[stage], stage), io.abstract_params(mconfig))
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                              ts.checkpoint_items(abstract))
        items, key, _, _ = ckpt.restore(step, target, jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep))
        return stage, items, key

    found = ckpt.resume_newest(resume_from)
    if found is None:
        t0 = time.time()
        params = init_manifold(jax.random.PRNGKey(config.seed), mconfig, init_sample, config.manifold.anchor_init,
                               config.manifold.kmeans_iters)
        print(f"anchors: {mconfig.num_anchors} by {config.manifold.anchor_init} from {init_sample.shape[0]} "
              f"patches in {time.time() - t0:.1f}s", flush=True)
        state, stage = parallel.replicate_tree(fit.init_state(params, opt[1], 1), mesh), 1
    else:
        latest, (stage, items, rng) = found
        state = ts.from_checkpoint_items(items)
        print(f"resumed from {ckpt.directory} at step {latest} (stage {stage})", flush=True)

    writer = metric_writers.create_writer(workdir, prefix="fit_manifold", total_steps=total)

    def phase(step_fn, state, stage, batch_size, offset, end, later, guard):
        # one stage: the shared loop from the state's step to run step `end`; checkpoints carry the stage
        start = int(jax.device_get(state.step))
        settings = loop.LoopSettings(end, config.log_every, config.checkpoint_every, later_steps=later)
        return loop.train(lambda s, b, _rng: step_fn(s, b), state, rng,
                          _stage_batches(pool, config, stage, start, offset, batch_size, mesh),
                          settings=settings, checkpointer=ckpt, writer=writer, guard=guard,
                          meta={"experiment": config.experiment, "stage": stage, "resume_settings": resume})

    try:
        with checkpoints.PreemptionGuard() as guard:
            if stage == 1:
                state = phase(step1, state, 1, config.stage1.batch_size, 0, n1, n2, guard)
                if n2 > 0:
                    # stage 2 starts from the final stage-1 manifold with a calibrated shell and fresh optimizer
                    state, stage = fit.start_stage2(state, opt[2], init_sample, mconfig, mesh), 2
            if stage == 2:
                state = phase(step2, state, 2, config.stage2.batch_size, n1, total, 0, guard)
    finally:
        ckpt.close()
        writer.close()
    return state


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
    for line in splits.skipped:
        print(f"  skipped {line}", flush=True)
    print(f"train patches: {pool.shape[0]} x D={pool.shape[1]}; test latents: {splits.test_latents.shape}", flush=True)

    m = config.manifold
    mconfig = ManifoldConfig(dim=pool.shape[1], num_anchors=m.num_anchors, hidden_dim=m.hidden_dim,
                             patch_size=tuple(m.patch_size))
    init_sample = _init_sample(pool, config)
    state = fit_stages(config, workdir, pool, init_sample, mconfig, mesh)

    params = jax.device_get(state.params)
    skipped = int(jax.device_get(state.skipped))
    tau = float(manifold_distance(params, jnp.asarray(init_sample), "shell_norm", chunk_size=config.eval.chunk_size,
                                  bn_eps=mconfig.bn_eps, shell_eps=mconfig.shell_eps))
    out = io.save_manifold(os.path.join(workdir, "manifold"), params, mconfig,
                           extra={"shell_band_target": tau, "data": splits.description})
    print(f"saved manifold to {out} (shell_band target tau = mean ||delta|| on train patches = {tau:.4f}); "
          f"non-finite steps skipped (both stages): {skipped}", flush=True)

    results = evaluate(params, mconfig, splits, config, tau)
    with open(os.path.join(workdir, "distances.json"), "w") as f:
        json.dump(results, f, indent=2)
    kinds = list(next(iter(results.values())))
    print("\nmanifold distances (lower = closer to the data manifold):")
    print(f"{'latents':34s}" + "".join(f"{k:>12s}" for k in kinds))
    for name, row in results.items():
        print(f"{name:34s}" + "".join(f"{row[k]:12.4f}" for k in kinds))
    return results
