"""Seeded Gaussian latent + text batches of fixed shapes: smoke runs, speed runs and tests, no files."""

from __future__ import annotations

import numpy as np


class RandomLatentBatches:
    """Seeded Gaussian latents + text embeddings; batch ``i`` is a pure function of ``(seed, i)``, so the
    iterator's state is just ``i``. ``extra_fields``: more entries per example, latent-shaped for a name
    ending in ``latents`` (a Flow-DPO loser), else one number (a Flow-RWR reward), drawn after the two above
    so that adding them leaves the latents and text of every batch as they were."""

    def __init__(self, seed: int, batch_size: int, latent_shape, text_shape, process_index=0, process_count=1,
                 extra_fields=()):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
        self.seed, self.latent_shape, self.text_shape = seed, tuple(latent_shape), tuple(text_shape)
        self.local = batch_size // process_count
        self.offset = process_index * self.local
        self.batch_size = batch_size
        self.extra_fields = tuple(extra_fields)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.index])
        full_lat = rng.standard_normal((self.batch_size, *self.latent_shape), np.float32)
        full_txt = rng.standard_normal((self.batch_size, *self.text_shape), np.float32)
        extra = {name: rng.standard_normal((self.batch_size, *(self.latent_shape if name.endswith("latents") else ())),
                                           np.float32) for name in self.extra_fields}
        self.index += 1
        sl = slice(self.offset, self.offset + self.local)
        return {"latents": full_lat[sl], "context": full_txt[sl], **{k: v[sl] for k, v in extra.items()}}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
