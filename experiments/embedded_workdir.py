"""The embedded pipeline's workdir: where each stage's outputs live, and the readers every stage shares.

Both the pipeline (``experiments/embedded_pipeline.py``) and its evaluation and validation
(``embedded_evaluation.py``, ``embedded_validation.py``) read the same folders; keeping the layout here
lets them import it without importing each other.
"""

from __future__ import annotations

import json
import os

import ml_collections

from experiments import train_vae
from shelllcc.data import embedded_benchmark

SPLITS = ("train", "validation", "test")
ATTRIBUTE_FIELDS = ("shape", "colour", "texture", "scale", "direction", "speed")
DONE = "DONE"
# one fine-tuning run's validation files (experiments/embedded_validation.py writes them)
TRAJECTORY = "trajectory.jsonl"
PICK_JSON = "pick.json"
PICKED_DIR = "picked"


class Paths:
    """Every folder of one pipeline run, under ``workdir``."""

    def __init__(self, workdir: str):
        j = lambda *p: os.path.join(workdir, *p)  # noqa: E731
        self.root = workdir
        self.data, self.vae, self.text_encoder = j("data"), j("vae"), j("text_encoder")
        self.cache = lambda split: j("latents", split)
        self.train_cache, self.test_cache = j("latents", "train"), j("latents", "test")
        self.base, self.manifold, self.classifier = j("base"), j("manifold"), j("classifier")
        self.variant = lambda name, seed=0: j("variants", name, f"seed{seed}")
        self.samples = lambda name, seed=0: j("samples", name, f"seed{seed}")
        self.stage_marker = lambda stage: j("stages", f"{stage}.{DONE}")


def benchmark_config(b: ml_collections.ConfigDict) -> embedded_benchmark.BenchmarkConfig:
    return embedded_benchmark.BenchmarkConfig(num_frames=b.num_frames, height=b.height, width=b.width,
                                              train_size=b.train_size, validation_size=b.validation_size,
                                              test_size=b.test_size, seed=b.seed,
                                              background_texture=b.background_texture)


def builder(config, paths: Paths, verbose: bool = False):
    """The run's TFDS builder of the Moving Textures splits (built on first use)."""
    return embedded_benchmark.build(paths.data, benchmark_config(config.benchmark), verbose=verbose)


def latent_stats(paths: Paths) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the VAE's latents, as the VAE stage recorded them."""
    with open(os.path.join(paths.vae, train_vae.RECONSTRUCTION_JSON)) as f:
        info = json.load(f)
    return tuple(info["latents_mean"]), tuple(info["latents_std"])


# The base's architecture is stated once, in config.base.model; the fine-tuning and sampling runs load
# saved models (init_from), whose model.json carries it, and take the base's runtime knobs.
ARCHITECTURE_KEYS = ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim", "patch_size")
RUNTIME_KEYS = ("scan_layers",)


def like_base(model: ml_collections.ConfigDict, config) -> None:
    """A DiT ``model`` section given the base's architecture and runtime knobs."""
    for k in ARCHITECTURE_KEYS + RUNTIME_KEYS:
        model[k] = config.base.model[k]


def variant_names(config) -> tuple[str, ...]:
    return tuple(config.run_variants)


def read_trajectory(run_dir: str) -> list[dict]:
    """The validation rows of one fine-tuning run, in step order."""
    with open(os.path.join(run_dir, TRAJECTORY)) as f:
        return [json.loads(line) for line in f if line.strip()]
