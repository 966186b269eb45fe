"""Experiment ``train_vae``: train the embedded benchmark's video VAE (:class:`shelllcc.models.patch_vae.PatchVAE`).

Data: a prepared TFDS video dataset (``data.dataset``: a builder directory or a name under
``data.data_dir``; by default the embedded benchmark, built here if missing). Each step draws random
space-time crops of the clips on the device (``data.crop_frames`` x ``data.crop_size``^2, aligned to
the patch grid in time so every crop starts a latent frame), which makes a step several times cheaper
than whole clips while the model, local by construction, sees every position.

Loss per crop ``x`` in [-1, 1], ``z ~ q(z | x)``, ``y = decode(z)``::

    l1 * mean|y - x| + kl * mean(0.5 (mu^2 + sigma^2 - 1 - log sigma^2))

L1 rather than squared error: on two-level textures (stripes, checks) its minimiser is one of the
levels, not their average, so an undertrained decoder errs towards contrast rather than grey. (An L1
penalty on image gradients was tried and removed: flat output is a stationary point of it, and the
model fell into it.)

Writes under ``workdir``: ``checkpoints/``, ``metrics.jsonl``, ``model/`` (the VAE, with per-channel
latent mean/std measured on ``data.stats_clips`` training clips) and ``reconstruction.json``
(held-out reconstruction error and detail ratios).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry, dit_setup
from shelllcc import parallel
from shelllcc.data import embedded_benchmark, readers
from shelllcc.evaluation import detail
from shelllcc.models import saving
from shelllcc.models.patch_vae import PatchVAE, PatchVAEConfig, with_latent_stats
from shelllcc.training import checkpoints, loop, metric_writers
from shelllcc.training import train_state as ts
from shelllcc.training.step import jit_train_step, make_train_step, train_state_shardings

MODEL_DIR = "model"
RECONSTRUCTION_JSON = "reconstruction.json"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "train_vae"
    c.seed = 0
    c.mesh = dit_setup.mesh_section()
    c.data = dict(
        dataset="",                  # a TFDS builder directory or a dataset name under data_dir
        data_dir="",                 # where the embedded benchmark is built when dataset is empty
        split="train",
        eval_split="test",
        batch_size=32,               # crops per step (global)
        crop_frames=9,               # 1 + 4k frames per crop (0: whole clips)
        crop_size=32,                # crop height = width (0: whole frames)
        stats_clips=256,             # training clips encoded to measure the latent mean / std
        eval_clips=64,               # held-out clips for reconstruction.json
        prefetch=2,
    )
    c.model = dict(z_dim=16, patch=8, temporal_patch=4, width=256, depth=1, conv_width=64, mlp_ratio=1.0)
    c.loss = dict(l1=1.0, kl=1e-4)
    c.train = dit_setup.train_section(steps=1000)
    c.optim = dit_setup.optim_section(learning_rate=2e-3)
    c.optim.schedule, c.optim.warmup_steps, c.optim.end_lr_fraction = "cosine", 50, 0.05
    return c


def model_config(m: ml_collections.ConfigDict) -> PatchVAEConfig:
    return PatchVAEConfig(z_dim=m.z_dim, patch=m.patch, temporal_patch=m.temporal_patch, width=m.width,
                          depth=m.depth, conv_width=m.conv_width, mlp_ratio=m.mlp_ratio,
                          latents_mean=(0.0,) * m.z_dim, latents_std=(1.0,) * m.z_dim)


def open_source(d: ml_collections.ConfigDict, split: str):
    """The dataset's ``split`` as a random-access source (building the embedded benchmark if needed)."""
    if d.dataset:
        return readers.open_split(d.dataset, split, d.data_dir or None)
    if not d.data_dir:
        raise ValueError("set data.dataset (a TFDS builder directory or name) or data.data_dir (where the "
                         "embedded benchmark is built)")
    return embedded_benchmark.build(d.data_dir).as_data_source(split)


def check_crop(d: ml_collections.ConfigDict, cfg: PatchVAEConfig, video_shape: tuple[int, ...]) -> tuple[int, int]:
    t, h, w = video_shape[:3]
    frames = d.crop_frames or t
    size = d.crop_size or min(h, w)
    if (frames - 1) % cfg.temporal_patch or frames > t:
        raise ValueError(f"data.crop_frames={frames} must be 1 + {cfg.temporal_patch} k and at most the clips' "
                         f"{t} frames")
    if size % cfg.patch or size > min(h, w):
        raise ValueError(f"data.crop_size={size} must be a multiple of {cfg.patch} and at most the frames' "
                         f"{h}x{w}")
    if not d.crop_size and h != w:
        raise ValueError(f"data.crop_size=0 (whole frames) needs square frames, got {h}x{w}")
    return frames, size


def random_crops(video: jax.Array, key: jax.Array, frames: int, size: int, temporal_patch: int) -> jax.Array:
    """Per-clip random crops ``[B, frames, size, size, C]``; starts in time at a latent-frame boundary."""
    b, t, h, w, c = video.shape
    kt, ky, kx = jax.random.split(key, 3)
    n_t = (t - frames) // temporal_patch + 1
    t0 = jax.random.randint(kt, (b,), 0, n_t) * temporal_patch
    y0 = jax.random.randint(ky, (b,), 0, h - size + 1)
    x0 = jax.random.randint(kx, (b,), 0, w - size + 1)

    def one(v, t_, y_, x_):
        return jax.lax.dynamic_slice(v, (t_, y_, x_, 0), (frames, size, size, c))
    return jax.vmap(one)(video, t0, y0, x0)


def vae_loss(y: jax.Array, x: jax.Array, mean: jax.Array, logvar: jax.Array, weights) -> tuple[jax.Array, dict]:
    """The module doc's loss; returns ``(loss, metrics)``."""
    l1 = jnp.mean(jnp.abs(y - x))
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return weights.l1 * l1 + weights.kl * kl, {"l1": l1, "kl": kl}


def _to_unit(video_uint8: jax.Array) -> jax.Array:
    return video_uint8.astype(jnp.float32) / 127.5 - 1.0


def encode_decode(vae: PatchVAE, videos_uint8: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(posterior means, reconstructions uint8)`` of ``videos_uint8`` in batches (host arrays)."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, v):
        model = nnx.merge(graphdef, state)
        z = model.encode(_to_unit(v))
        y = model.decode(z)
        return z, jnp.clip(jnp.round((y + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    zs, ys = [], []
    n = len(videos_uint8)
    for i in range(0, n, batch_size):
        chunk = videos_uint8[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        z, y = run(state, chunk)
        zs.append(np.asarray(z)[:batch_size - pad])
        ys.append(np.asarray(y)[:batch_size - pad])
    return np.concatenate(zs), np.concatenate(ys)


def reconstruction_report(real: np.ndarray, recon: np.ndarray) -> dict:
    """Held-out reconstruction error (uint8 pixels) and detail kept: ratios of Laplacian variance and
    high-frequency energy (above 1/4 Nyquist), reconstruction over real (1 = all detail kept)."""
    a = real.astype(np.float64) / 255.0
    b = recon.astype(np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    return {
        "clips": int(len(real)),
        "l1": float(np.mean(np.abs(a - b))),
        "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12))),
        "laplacian_ratio": float(np.mean(detail.laplacian_variance(recon)) / np.mean(detail.laplacian_variance(real))),
        "hf_ratio": float(np.mean(detail.high_frequency_energy(recon))
                          / np.mean(detail.high_frequency_energy(real))),
    }


def _videos(source, n: int) -> np.ndarray:
    n = min(n, len(source))
    items = source.__getitems__(list(range(n))) if hasattr(source, "__getitems__") else [source[i] for i in range(n)]
    return np.stack([np.asarray(x["video"]) for x in items])


def run(config: ml_collections.ConfigDict, workdir: str) -> PatchVAE:

    d = config.data
    cfg = model_config(config.model)
    train_src = open_source(d, d.split)
    video_shape = tuple(np.asarray(train_src[0]["video"]).shape)
    if len(video_shape) != 4 or video_shape[-1] != cfg.in_channels:
        raise ValueError(f"dataset videos must be [T, H, W, {cfg.in_channels}] uint8, got shape {video_shape}")
    frames, size = check_crop(d, cfg, video_shape)
    mesh = dit_setup.make_mesh(config.mesh)
    if d.batch_size % parallel.num_batch_shards(mesh):
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the mesh's batch shards {dict(mesh.shape)}")
    print(f"train_vae: {len(train_src)} clips of {video_shape}; crops {frames} x {size} x {size}; "
          f"batch {d.batch_size}; mesh {dict(mesh.shape)}", flush=True)

    vae = PatchVAE(cfg, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(vae, nnx.Param)
    params = params.to_pure_dict()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"PatchVAE: {n_params:,} parameters; latents [{cfg.latent_frames(video_shape[0])}, "
          f"{video_shape[1] // cfg.patch}, {video_shape[2] // cfg.patch}, {cfg.z_dim}] per clip", flush=True)
    weights = config.loss

    def loss_fn(p, frozen, batch, key):
        del frozen
        k_crop, k_z = jax.random.split(key)
        x = _to_unit(random_crops(batch["video"], k_crop, frames, size, cfg.temporal_patch))
        model = nnx.merge(graphdef, p)
        mean, logvar = model.encode_moments(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)
        return vae_loss(model.decode(z, clamp=False), x, mean, logvar, weights)

    optimizer, schedule = dit_setup.optimizer_from(config, params)
    rep = parallel.replicated(mesh)
    param_sh = jax.tree.map(lambda _: rep, params)
    abstract = jax.eval_shape(lambda p: ts.create(p, optimizer), params)
    state_sh = train_state_shardings(param_sh, jax.tree.map(lambda _: rep, abstract.opt_state), {}, mesh)
    step_fn = jit_train_step(make_train_step(loss_fn, optimizer, schedule), state_sh, mesh)

    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                                    asynchronous=config.train.async_checkpoints)
    rng = parallel.place(jax.random.PRNGKey(config.seed), rep)
    ds = readers.make_dataset(train_src, batch_size=d.batch_size // jax.process_count(), seed=config.seed,
                              transform=lambda ex: {"video": np.asarray(ex["video"])})
    host_iter = iter(ds)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          ts.checkpoint_items(abstract), ts.checkpoint_items(state_sh))
    found = ckpt.resume_newest(
        lambda step: ckpt.restore(step, target, jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)))
    if found is None:
        state = jax.jit(lambda p: ts.create(p, optimizer, {}), out_shardings=state_sh)(parallel.place(params, param_sh))
    else:
        latest, (items, rng, data_state, _) = found
        state = ts.from_checkpoint_items(items, {})
        if data_state is not None:
            host_iter.set_state(data_state)
        print(f"resumed from {ckpt.directory} at step {latest}", flush=True)
    batches = dit_setup.device_batches(host_iter, mesh, d.prefetch)
    writer = metric_writers.create_writer(workdir, prefix="train_vae", total_steps=config.train.steps)
    settings = loop.LoopSettings(config.train.steps, config.train.log_every, config.train.checkpoint_every)
    try:
        with checkpoints.PreemptionGuard() as guard:
            state = loop.train(step_fn, state, rng, batches, settings=settings, checkpointer=ckpt, writer=writer,
                               guard=guard, data_state=batches.get_state, meta={"experiment": "train_vae"})
    finally:
        batches.close()
        ckpt.close()
        writer.close()

    vae = nnx.merge(graphdef, jax.device_get(state.params))
    # latent statistics: the normalisation the DiT and the manifold work in (as Wan's VAE config carries)
    z, _ = encode_decode(vae, _videos(train_src, d.stats_clips))
    flat = z.reshape(-1, cfg.z_dim).astype(np.float64)
    mean, std = flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-6)
    vae = nnx.merge(graphdef, jax.device_get(state.params))
    vae.config = with_latent_stats(cfg, mean.tolist(), std.tolist())
    out = saving.save_model(os.path.join(workdir, MODEL_DIR), vae,
                            extra={"experiment": "train_vae", "steps": config.train.steps,
                                   "skipped_updates": int(jax.device_get(state.skipped))})
    report = {"latents_mean": mean.tolist(), "latents_std": std.tolist()}
    if d.eval_clips:
        real = _videos(open_source(d, d.eval_split), d.eval_clips)
        _, recon = encode_decode(vae, real)
        report.update(reconstruction_report(real, recon))
        print(f"held-out reconstruction ({report['clips']} {d.eval_split} clips): L1 {report['l1']:.4f}, "
              f"PSNR {report['psnr_db']:.2f} dB, Laplacian-variance ratio {report['laplacian_ratio']:.3f}, "
              f"high-frequency ratio {report['hf_ratio']:.3f}", flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RECONSTRUCTION_JSON), "w") as f:
            json.dump(report, f, indent=1)
    print(f"saved the VAE to {out} (latent std per channel {np.round(std, 3).tolist()})", flush=True)
    return vae


def load(workdir: str) -> PatchVAE:
    return saving.load_model(os.path.join(workdir, MODEL_DIR))


get_config = config_entry.defaults_entry(default_config)

__all__ = ["default_config", "run", "load", "random_crops", "vae_loss", "reconstruction_report", "encode_decode"]
