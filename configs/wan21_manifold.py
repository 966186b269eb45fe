"""Fit the Shell-LCC manifold on Wan2.1 VAE latents from a latent cache, in the space the DiT trains in.

    python -m experiments.main --config=configs/wan21_manifold.py --workdir=runs/manifold \\
        --config.data.cache.dir=cache/train

Latents are normalised with the Wan2.1 VAE's per-channel statistics, as ``configs/wan21_reward.py``
normalises the DiT's data, so the manifold and the generator see the same space. 4096 anchors and a
512-wide coder, the reference size; patches of one latent position (D = 16).
"""

from experiments import fit_manifold
from shelllcc.models.wan_vae import WanVAEConfig


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/wan21_manifold.py takes no argument, got {arg!r}")
    c = fit_manifold.default_config()
    c.data.source = "cache"
    vae = WanVAEConfig.preset("wan2.1")
    c.data.cache.latent_mean, c.data.cache.latent_std = tuple(vae.latents_mean), tuple(vae.latents_std)
    c.data.max_train_patches = 4_000_000
    c.manifold.num_anchors, c.manifold.hidden_dim = 4096, 512
    c.manifold.init_patches = 262_144
    c.stage1.steps, c.stage2.steps = 20_000, 5_000
    c.stage1.batch_size = c.stage2.batch_size = 8192
    c.compute_dtype = "bfloat16"
    c.log_every, c.checkpoint_every = 100, 2000
    return c
