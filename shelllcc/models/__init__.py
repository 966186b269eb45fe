"""Flax NNX video diffusion models: the Wan2.1 transformer, its causal 3D VAE, a small text encoder."""

from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig, WordTokenizer
from shelllcc.models.wan_transformer import WanTransformer, WanTransformerConfig, get_config
from shelllcc.models.wan_vae import WanVAE, WanVAEConfig, denormalize_latents, normalize_latents

__all__ = ["TextEncoder", "TextEncoderConfig", "WanTransformer", "WanTransformerConfig", "WanVAE", "WanVAEConfig",
           "WordTokenizer", "denormalize_latents", "get_config", "normalize_latents"]
