"""Saving and loading the project's NNX models: ``DIR/model.json`` (kind + architecture) + ``DIR/params`` (orbax).

Kinds: ``wan_transformer`` (:class:`WanTransformerConfig`), ``wan_vae`` (:class:`WanVAEConfig`),
``patch_vae`` (:class:`PatchVAEConfig`), ``text_encoder`` (:class:`TextEncoderConfig`). Only the architecture is
stored; runtime knobs (compute and parameter dtype, attention kernel, remat policy) are chosen when loading::

    save_model("run/model", model)
    model = load_model("run/model", dtype=jnp.bfloat16, attention_impl="cudnn")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from shelllcc.models.patch_vae import PatchVAE, PatchVAEConfig
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig
from shelllcc.models.wan_transformer import WanTransformer, WanTransformerConfig
from shelllcc.models.wan_vae import WanVAE, WanVAEConfig

MODEL_JSON = "model.json"
_RUNTIME = {"wan_transformer": ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_blocks"),
            "text_encoder": ("dtype",), "wan_vae": (), "patch_vae": ()}
_CLASSES = {"wan_transformer": (WanTransformer, WanTransformerConfig), "wan_vae": (WanVAE, WanVAEConfig),
            "text_encoder": (TextEncoder, TextEncoderConfig), "patch_vae": (PatchVAE, PatchVAEConfig)}


def model_kind(model: nnx.Module) -> str:
    for kind, (cls, _) in _CLASSES.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"cannot save a {type(model).__name__}; known models: {sorted(_CLASSES)}")


def architecture(config: Any, kind: str) -> dict:
    """JSON-able architecture fields of a model config (runtime fields left out)."""
    skip = set(_RUNTIME[kind])
    out = {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_architecture(kind: str, arch: dict, **runtime) -> Any:
    if kind not in _CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(_CLASSES)}")
    cfg_cls = _CLASSES[kind][1]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(arch) - known
    if unknown:
        raise ValueError(f"{kind} architecture has unknown fields {sorted(unknown)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    return cfg_cls(**fields, **{k: v for k, v in runtime.items() if k in _RUNTIME[kind]})


def save_model(directory: str, model: nnx.Module, params: Any = None, extra: dict | None = None) -> str:
    """Write ``model``'s architecture and parameters (or ``params``, a pure dict replacing them, e.g.
    trained weights that were never merged back into ``model``) under ``directory``."""
    kind = model_kind(model)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if params is None:
        params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, MODEL_JSON), "w") as f:
            json.dump({"kind": kind, "architecture": architecture(model.config, kind), "extra": extra or {}},
                      f, indent=2)
    return directory


def read_model_json(directory: str) -> dict:
    path = os.path.join(os.path.abspath(directory), MODEL_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {directory!r} (missing {MODEL_JSON})")
    with open(path) as f:
        return json.load(f)


def abstract_model(kind: str, config: Any, *, param_dtype: Any = None, dtype: Any = None) -> nnx.Module:
    cls = _CLASSES[kind][0]
    if kind == "wan_vae":
        kw = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
        return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kw))
    if kind == "patch_vae":
        return nnx.eval_shape(lambda: cls(config, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def load_model(directory: str, *, shardings: Any = None, **runtime) -> nnx.Module:
    """Rebuild a saved model. ``runtime``: ``dtype``, ``param_dtype``, ``attention_impl``,
    ``remat_policy`` as the kind accepts. ``shardings``: ``fn(abstract pure-dict params) -> tree of
    shardings`` placing each array (default: one device)."""
    info = read_model_json(directory)
    kind = info["kind"]
    config = config_from_architecture(kind, info["architecture"], **runtime)
    abstract = abstract_model(kind, config, dtype=runtime.get("dtype"), param_dtype=runtime.get("param_dtype"))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = params.to_pure_dict()
    placed = shardings(target) if shardings is not None else jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, placed)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(os.path.abspath(directory), "params"), target)
        except ValueError as e:
            raise ValueError(f"saved model {directory!r} does not match its model.json architecture: {e}") from e
    return nnx.merge(graphdef, restored, rest)


__all__ = ["save_model", "load_model", "read_model_json", "architecture", "config_from_architecture",
           "abstract_model", "model_kind", "MODEL_JSON"]
