"""Data sources: synthetic latents now; TFDS builders and readers arrive with the data pipeline."""
