"""Rewards for fine-tuning video generators; each a pure function of (parameters, latents)."""

from shelllcc.rewards.manifold_distance import KINDS, manifold_distance, patch_values, region_distances

__all__ = ["KINDS", "manifold_distance", "patch_values", "region_distances"]
