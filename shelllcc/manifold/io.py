"""Saving and loading a fitted manifold with orbax: ``DIR/params`` (arrays) + ``DIR/manifold.json``."""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from shelllcc.errors import InputFileError
from shelllcc.manifold.params import ManifoldConfig, ManifoldParams, check_params, init_params

CONFIG_FILE = "manifold.json"


def abstract_params(config: ManifoldConfig) -> ManifoldParams:
    """Shape/dtype skeleton of parameters for ``config`` (no arrays allocated)."""
    import jax.numpy as jnp
    return jax.eval_shape(
        lambda: init_params(jax.random.PRNGKey(0), config, jnp.zeros((config.num_anchors, config.dim))))


def save_manifold(directory: str, params: ManifoldParams, config: ManifoldConfig, extra: dict | None = None) -> str:
    """Write ``params`` and ``config`` (plus JSON-able ``extra``, e.g. ``shell_band`` tau) under ``directory``."""
    check_params(params, config)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params, force=True)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"config": config.to_dict(), "extra": extra or {}}, f, indent=2)
    return directory


def load_manifold(directory: str) -> tuple[ManifoldParams, ManifoldConfig, dict]:
    """Inverse of :func:`save_manifold`: returns ``(params, config, extra)``."""
    directory = os.path.abspath(directory)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not a saved manifold")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        config = ManifoldConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputFileError(f"{cfg_path}: not a readable manifold description ({type(e).__name__}: {e}); "
                             f"fit the manifold again") from e
    params_dir = os.path.join(directory, "params")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir, abstract_params(config))
    except Exception as e:
        # orbax's failures (missing or damaged arrays, shapes that disagree with manifold.json) come as
        # hundreds of lines of asyncio traceback; the last line of its message holds the cause
        cause = [ln for ln in str(e).splitlines() if ln.strip()]
        raise InputFileError(f"{params_dir}: the manifold's arrays cannot be restored for the config in {cfg_path} "
                             f"({type(e).__name__}: {cause[-1] if cause else ''})") from e
    check_params(params, config)
    return params, config, meta.get("extra", {})
