"""Checks of a config's values before an experiment starts, so a value that makes no sense stops the run
with one line naming the key instead of running and saving something wrong (``stage2.steps=-100`` saved the
k-means init as "the manifold"; ``log_every=0`` crashed with ``ZeroDivisionError`` after compiling).

The rules go by a key's last name wherever it sits, so the nested sections of the embedded pipeline and of
ablations (``base.train.steps``, ``manifold.stage1.steps``) are checked like the experiments' own; each rule
encodes what the code reading that name assumes (e.g. ``eval_every=0`` means "never", ``steps=0`` nothing).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from shelllcc.errors import ConfigError

# names read as counts where 0 or less leaves nothing to run, or divides by zero
POSITIVE_INTS = ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "chunk_size",
                 "shard_size", "init_patches", "num_anchors", "hidden_dim")
# names where 0 means "off" or "no bound"
NON_NEGATIVE_INTS = ("warmup_steps", "eval_every", "microbatch_size", "max_train_patches", "max_examples",
                     "kmeans_iters")
# a share of the data held out: 0 holds nothing out, 1 trains on nothing
OPEN_FRACTIONS = ("test_fraction",)
CLOSED_FRACTIONS = ("end_lr_fraction",)
POSITIVE_FLOATS = ("learning_rate",)
NON_NEGATIVE_FLOATS = ("weight_decay", "grad_clip")
# "" for latent_dtype: keep the encoder's dtype
DTYPES = ("compute_dtype", "dtype", "param_dtype", "latent_dtype")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(key: str, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` at ``key`` (last name ``name``), or None."""
    if name in POSITIVE_INTS and not (_is_int(value) and value >= 1):
        return "must be a positive integer"
    if name in NON_NEGATIVE_INTS and not (_is_int(value) and value >= 0):
        return "must be an integer >= 0"
    if name in OPEN_FRACTIONS and not (_is_number(value) and 0 < value < 1):
        return "must be a fraction strictly between 0 and 1"
    if name in CLOSED_FRACTIONS and not (_is_number(value) and 0 <= value <= 1):
        return "must be a fraction in [0, 1]"
    if name in POSITIVE_FLOATS and not (_is_number(value) and math.isfinite(value) and value > 0):
        return "must be a finite number > 0"
    if name in NON_NEGATIVE_FLOATS and not (_is_number(value) and math.isfinite(value) and value >= 0):
        return "must be a finite number >= 0"
    if name in DTYPES and value not in FLOAT_DTYPES and not (name == "latent_dtype" and value == ""):
        return f"is not a dtype this code computes in; expected one of {FLOAT_DTYPES}"
    if name == "patch_size" and value != () and not (
            isinstance(value, (tuple, list)) and len(value) == 3 and all(_is_int(v) and v >= 1 for v in value)):
        return "must be 3 positive integers (t, h, w)"
    return None


def _walk(node: Any, prefix: str, visit: Callable[[str, str, Any], None]) -> None:
    for name, value in node.items():
        key = f"{prefix}{name}"
        if hasattr(value, "items"):
            _walk(value, key + ".", visit)
        else:
            visit(key, name, value)


def check_config(config: Any, where: str = "config") -> None:
    """Raise :class:`~shelllcc.errors.ConfigError` naming the first key whose value makes no sense."""
    def visit(key: str, name: str, value: Any) -> None:
        problem = _check_value(key, name, value)
        if problem:
            raise ConfigError(f"{where}.{key}={value!r} {problem}")
    _walk(config, "", visit)


__all__ = ["check_config"]
