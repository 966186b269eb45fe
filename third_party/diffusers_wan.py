"""Wan2.1 in diffusers format -> shelllcc's Flax models.

    transformer = load_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer", dtype=jnp.bfloat16)
    velocity = transformer(latents, timestep, context)      # channels-last [B, T, H, W, 16]
    vae = load_vae("Wan2.1-T2V-1.3B-Diffusers/vae")
    mean = vae.encode(video)                                # video [B, T, H, W, 3] in [-1, 1]
    video = vae.decode(mean)

Both read ``config.json`` plus safetensors (single file or sharded with an index) by memory map,
one tensor at a time, so a 14B checkpoint never sits twice in host memory; neither needs torch.
"""

from third_party.wan_transformer_weights import CheckpointMismatchError, load_config, load_transformer
from third_party.wan_vae_weights import load_vae

__all__ = ["CheckpointMismatchError", "load_config", "load_transformer", "load_vae"]
