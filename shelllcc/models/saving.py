"""Saving and loading the project's NNX models: ``DIR/model.json`` (kind + architecture) + ``DIR/params`` (orbax).

Kinds: ``wan_transformer`` (:class:`WanTransformerConfig`), ``wan_vae`` (:class:`WanVAEConfig`),
``patch_vae`` (:class:`PatchVAEConfig`), ``text_encoder`` (:class:`TextEncoderConfig`), ``video_text_dual_encoder``
and ``video_text_matcher`` (:mod:`shelllcc.models.video_text`, the text-video embedding space), and those other packages
add with :func:`register_kind` (``video_classifier``). Only the architecture is
stored; runtime knobs (compute and parameter dtype, attention kernel, remat policy) are chosen when loading::

    save_model("run/model", model)
    model = load_model("run/model", dtype=jnp.bfloat16, attention_impl="cudnn")

Layout of the DiT's blocks: saved models (and packed ones, :mod:`shelllcc.models.packed`) always hold one
entry per block (``blocks/0/...``, ``blocks/1/...``), whatever ``scan_layers`` the model ran with; a
stacked model (``scan_layers=True``: one array per parameter with a leading layer axis) is unstacked when
saved and stacked again when loaded. Why per-block: every model saved or shipped before stacked blocks
existed has that layout (``configs/pretrained/demo/base.npz`` is checksummed and cannot change), so keeping
it means one format on disk, readable by old and new code alike, and it keeps ``scan_layers`` a runtime
knob like the remat policy (chosen when loading, not part of the architecture). The cost, a copy of the
blocks' weights while saving or loading a stacked model, is paid once per save or load, not per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from shelllcc.models.patch_vae import PatchVAE, PatchVAEConfig
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig
from shelllcc.models.video_text import (
    DUAL_ENCODER_KIND,
    MATCHER_KIND,
    DualEncoder,
    DualEncoderConfig,
    MatchingModel,
    MatchingModelConfig,
)
from shelllcc.models.wan_transformer import WanTransformer, WanTransformerConfig, stack_blocks, stacked_layout, unstack_blocks
from shelllcc.models.wan_vae import WanVAE, WanVAEConfig

MODEL_JSON = "model.json"
_RUNTIME = {"wan_transformer": ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers"),
            "text_encoder": ("dtype",), "wan_vae": (), "patch_vae": (), DUAL_ENCODER_KIND: (), MATCHER_KIND: ()}
_CLASSES = {"wan_transformer": (WanTransformer, WanTransformerConfig), "wan_vae": (WanVAE, WanVAEConfig),
            "text_encoder": (TextEncoder, TextEncoderConfig), "patch_vae": (PatchVAE, PatchVAEConfig),
            DUAL_ENCODER_KIND: (DualEncoder, DualEncoderConfig), MATCHER_KIND: (MatchingModel, MatchingModelConfig)}


def register_kind(kind: str, module_cls: type, config_cls: type, runtime: tuple[str, ...] = ()) -> None:
    """Make a model of another package savable here (e.g. the evaluation's video classifier), so that it
    uses this one format instead of its own. ``runtime``: config fields chosen when loading, not saved."""
    if kind in _CLASSES and _CLASSES[kind] != (module_cls, config_cls):
        raise ValueError(f"model kind {kind!r} is already registered for {_CLASSES[kind][0].__name__}")
    _CLASSES[kind], _RUNTIME[kind] = (module_cls, config_cls), tuple(runtime)


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


def disk_params(kind: str, params: dict) -> dict:
    """``params`` (a pure dict) in the layout saved and packed models hold: the DiT's blocks one per entry."""
    if kind == "wan_transformer" and stacked_layout(params):
        return unstack_blocks(params)
    return params


def row_sharding(sharding: Any) -> Any:
    """The sharding of one row of a stacked array (its leading layer axis dropped)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


def save_model(directory: str, model: nnx.Module, params: Any = None, extra: dict | None = None) -> str:
    """Write ``model``'s architecture and parameters (or ``params``, a pure dict replacing them, e.g.
    trained weights that were never merged back into ``model``) under ``directory``; the DiT's blocks
    one entry per block (module docstring)."""
    kind = model_kind(model)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if params is None:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = disk_params(kind, params)
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


@functools.lru_cache(maxsize=None)
def _stack_onto(sharding: jax.sharding.Sharding):
    """``jnp.stack`` of the arguments onto ``sharding``: one jitted function per sharding, so that loading
    models again (every variant and seed of a pipeline) reuses its compiled programs instead of tracing and
    compiling a new function per leaf (measured: 972 stacks, 24 s of a 344 s embedded pipeline miniature)."""
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def load_model(directory: str, *, shardings: Any = None, **runtime) -> nnx.Module:
    """Rebuild a saved model. ``runtime``: ``dtype``, ``param_dtype``, ``attention_impl``,
    ``remat_policy``, ``scan_layers`` as the kind accepts. ``shardings``: ``fn(abstract pure-dict params)
    -> tree of shardings`` placing each array (default: one device); with stacked blocks the saved
    per-block arrays are restored at their rows' shardings and stacked onto the given ones."""
    info = read_model_json(directory)
    kind = info["kind"]
    config = config_from_architecture(kind, info["architecture"], **runtime)
    abstract = abstract_model(kind, config, dtype=runtime.get("dtype"), param_dtype=runtime.get("param_dtype"))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = nnx.to_pure_dict(params)
    placed = shardings(target) if shardings is not None else jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, placed)
    stacked = kind == "wan_transformer" and stacked_layout(target)
    if stacked:
        row = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=row_sharding(a.sharding))  # noqa: E731
        n = config.num_layers
        disk_target = {**target, "blocks": {i: jax.tree.map(row, target["blocks"]) for i in range(n)}}
    else:
        disk_target = target
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(os.path.abspath(directory), "params"), disk_target)
        except ValueError as e:
            raise ValueError(f"saved model {directory!r} does not match its model.json architecture: {e}") from e
    if stacked:
        block_sh = {jax.tree_util.keystr(p): s.sharding
                    for p, s in jax.tree_util.tree_flatten_with_path(target["blocks"])[0]}

        restored = stack_blocks(restored, lambda path, leaves: _stack_onto(block_sh[jax.tree_util.keystr(path)])(*leaves))
    return nnx.merge(graphdef, restored, rest)


__all__ = ["register_kind", "save_model", "load_model", "read_model_json", "architecture", "config_from_architecture",
           "abstract_model", "model_kind", "disk_params", "row_sharding", "MODEL_JSON"]
