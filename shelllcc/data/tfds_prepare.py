"""Preparing this project's TFDS builders: ArrayRecord files, configs passed by value."""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow_datasets as tfds


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder], config: tfds.core.BuilderConfig,
            data_dir: str) -> tuple[tfds.core.GeneratorBasedBuilder, str]:
    """Build (or reuse) ``builder_cls`` with ``config`` under ``data_dir``.

    Returns the builder and a word on what happened (``reused`` or ``built in Ns``) for progress lines.
    """
    # TFDS refuses a config object named like a registered one; the registered one is then this config.
    registered = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    if config.name in registered and registered[config.name] != config:
        raise ValueError(f"config name {config.name!r} is taken by a different registered config")
    arg = config.name if config.name in registered else config
    builder = builder_cls(config=arg, data_dir=os.path.expanduser(data_dir), file_format="array_record")
    t0 = time.time()
    already = builder.is_prepared()
    builder.download_and_prepare()
    return builder, "reused" if already else f"built in {time.time() - t0:.1f}s"


def video_feature(num_frames: int, height: int, width: int) -> tfds.features.Tensor:
    """uint8 ``[T, H, W, 3]`` clip, zlib-compressed: lossless, and decoding needs no TensorFlow."""
    return tfds.features.Tensor(shape=(num_frames, height, width, 3), dtype=np.uint8,
                                encoding=tfds.features.Encoding.ZLIB)
