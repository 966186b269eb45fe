"""TFDS builder for the embedded text-to-video benchmark (no download; TensorFlow not needed).

Each example is one clip of :mod:`shelllcc.data.moving_textures`: a textured shape moving over a
textured background, with its caption and attribute labels. Textures carry high-frequency detail
that blur visibly removes, so detail metrics and an attribute classifier can tell a sharp
generator from an over-smoothed one.

    from shelllcc.data import embedded_benchmark
    builder = embedded_benchmark.build(data_dir, embedded_benchmark.BenchmarkConfig(train_size=512))
    train = builder.as_data_source("train")       # ArrayRecord, random access, TF-free

The dataset is written as ArrayRecord, read back with ``tfds.data_source`` / grain. Clip ``i`` of a
split depends only on ``(seed, split, i)``, so a config's data are the same on every machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from shelllcc.data import moving_textures as mt
from shelllcc.data.tfds_prepare import prepare, video_feature

NAME = "shelllcc_moving_textures"


@dataclasses.dataclass
class BenchmarkConfig(tfds.core.BuilderConfig):
    """Size and shape of the benchmark; every field is part of the builder config's name."""

    name: str = ""            # derived from the fields below when left empty
    num_frames: int = 17
    height: int = 64
    width: int = 64
    train_size: int = 1024
    test_size: int = 128
    seed: int = 0
    background_texture: bool = True    # False: a flat grey background (only the object carries detail)
    validation_size: int = 0           # > 0: a 'validation' split too (its own seed: no clip of train or test)

    def __post_init__(self):
        for field in ("num_frames", "height", "width", "train_size", "test_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"BenchmarkConfig.{field} must be positive, got {getattr(self, field)}")
        if self.validation_size < 0:
            raise ValueError(f"BenchmarkConfig.validation_size must be >= 0, got {self.validation_size}")
        if not self.name:
            # The config's name encodes its fields, so two sizes never share a directory.
            self.name = (f"t{self.num_frames}_{self.height}x{self.width}_train{self.train_size}"
                         + (f"_val{self.validation_size}" if self.validation_size else "")
                         + f"_test{self.test_size}_seed{self.seed}" + ("" if self.background_texture else "_flatbg"))

    def clip_spec(self) -> mt.ClipSpec:
        return mt.ClipSpec(num_frames=self.num_frames, height=self.height, width=self.width, seed=self.seed,
                           background_texture=self.background_texture)


class MovingTextures(tfds.core.GeneratorBasedBuilder):
    """Textured shapes in motion, with captions and attribute labels."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "object_mask: the object's coverage per pixel (uint8, 255 = inside)."}
    BUILDER_CONFIGS = [BenchmarkConfig()]
    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        labels = {attr: tfds.features.ClassLabel(names=list(values)) for attr, values in mt.ATTRIBUTES.items()}
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": video_feature(cfg.num_frames, cfg.height, cfg.width),
                # where the object is: lets a loss or a metric look at the object apart from the background
                "object_mask": tfds.features.Tensor(shape=(cfg.num_frames, cfg.height, cfg.width), dtype=np.uint8,
                                                    encoding=tfds.features.Encoding.ZLIB),
                "caption": tfds.features.Text(),
                "index": np.int64,
                **labels,
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        splits = {"train": self._generate_examples("train", cfg.train_size)}
        if cfg.validation_size:
            splits["validation"] = self._generate_examples("validation", cfg.validation_size)
        splits["test"] = self._generate_examples("test", cfg.test_size)
        return splits

    def _generate_examples(self, split: str, size: int):
        cfg = self.builder_config
        spec = cfg.clip_spec()
        seed = mt.split_seed(cfg.seed, split)
        for index, ex in enumerate(_render(seed, size, spec)):
            yield index, {"video": ex["video"], "object_mask": mask_to_uint8(ex["mask"]), "caption": ex["caption"],
                          "index": index, **ex["labels"]}


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] -> uint8 (255 = inside), rounded: the stored form of ``object_mask``."""
    return np.clip(np.rint(np.asarray(mask, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _render_one(args) -> dict:
    seed, index, spec = args
    return mt.generate_example(seed, index, spec)


def _render(seed: int, size: int, spec: mt.ClipSpec):
    """Clips ``0 .. size - 1`` in order; large splits in worker processes (about 5 ms a clip on one core).

    Spawned, not forked: the parent has usually started JAX's threads, which a fork would copy mid-flight.
    Clip ``i`` depends on ``(seed, i)`` only, so the bytes do not depend on the number of workers.
    """
    import multiprocessing
    import os
    workers = min(os.cpu_count() or 1, 16)
    if size < PARALLEL_FROM or workers < 3:
        for index in range(size):
            yield mt.generate_example(seed, index, spec)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render_one, ((seed, i, spec) for i in range(size)), chunksize=64)


PARALLEL_FROM = 2048         # clips per split from which worker processes render them


def build(data_dir: str, config: BenchmarkConfig | None = None, verbose: bool = True) -> MovingTextures:
    """Build (or reuse) the dataset under ``data_dir`` as ArrayRecord and return its builder."""
    config = config or BenchmarkConfig()
    builder, what = prepare(MovingTextures, config, data_dir)
    if verbose:
        val = f"{config.validation_size} validation + " if config.validation_size else ""
        print(f"{NAME}/{config.name}: {config.train_size} train + {val}{config.test_size} test clips of "
              f"{config.num_frames}x{config.height}x{config.width} ({what}) at {builder.data_dir}", flush=True)
    return builder


def label_names() -> dict[str, tuple[str, ...]]:
    """Attribute -> class names, in label-index order (for classifiers and reports)."""
    return dict(mt.ATTRIBUTES)


def decode_labels(example: dict) -> dict[str, str]:
    """Attribute values of an example read back from the dataset."""
    return {attr: values[int(example[attr])] for attr, values in mt.ATTRIBUTES.items()}


__all__ = ["BenchmarkConfig", "MovingTextures", "NAME", "build", "decode_labels", "label_names"]


if __name__ == "__main__":  # python -m shelllcc.data.embedded_benchmark DATA_DIR [train_size]
    import sys
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m shelllcc.data.embedded_benchmark DATA_DIR [TRAIN_SIZE]")
    size = int(sys.argv[2]) if len(sys.argv) > 2 else BenchmarkConfig.train_size
    build(sys.argv[1], BenchmarkConfig(train_size=size))
