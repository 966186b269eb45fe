"""Boundary to other ecosystems (PyTorch checkpoints, diffusers, transformers); imports torch lazily."""
