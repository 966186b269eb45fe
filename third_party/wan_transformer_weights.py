"""Load a diffusers ``WanTransformer3DModel`` folder (Wan2.1 T2V) into ``shelllcc.models.wan_transformer``.

The model is built abstractly (``nnx.eval_shape``: shapes only, no memory), every checkpoint name and
shape is checked against it from the safetensors headers before anything is read, and then each tensor
is converted as it streams from its memory map (cast to the parameter dtype, re-laid out) and placed on
the device(s), so the host never holds more than the current tensor besides the page cache.

Layout changes: Linear ``weight [out, in]`` -> ``kernel [in, out]``; Conv3d ``weight [out, in, kt, kh, kw]``
-> ``kernel [kt, kh, kw, in, out]``; everything else (biases, norm weights, modulation tables) as is.
With stacked blocks (``scan_layers``, the default) block ``i``'s tensor becomes row ``i`` of the stacked
parameter (``blocks.3.attn1.to_q.weight`` -> ``blocks.self_attn.query.kernel[3]``): the stacked arrays are
allocated on the device(s) and filled one layer at a time, so the host still holds one tensor.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shelllcc import parallel
from shelllcc.models.wan_transformer import LOGICAL_AXES, WanTransformer, WanTransformerConfig
from third_party.safetensors_checkpoint import iter_tensors, read_config, read_header, weight_files

DIFFUSERS_CLASS = "WanTransformer3DModel"
# diffusers config key -> (our field, diffusers' default when the key is absent)
_CONFIG_FIELDS = {
    "patch_size": ("patch_size", (1, 2, 2)),
    "in_channels": ("in_channels", 16),
    "out_channels": ("out_channels", 16),
    "text_dim": ("text_dim", 4096),
    "freq_dim": ("freq_dim", 256),
    "ffn_dim": ("ffn_dim", 13824),
    "num_layers": ("num_layers", 40),
    "cross_attn_norm": ("cross_attn_norm", True),
    "qk_norm": ("qk_norm", "rms_norm_across_heads"),
    "eps": ("eps", 1e-6),
    "rope_max_seq_len": ("rope_max_seq_len", 1024),
}
_HEAD_KEYS = {"num_attention_heads": 40, "attention_head_dim": 128}
_IMAGE_TO_VIDEO_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")

LINEAR, CONV3D, COPY = "linear", "conv3d", "copy"


class Target(NamedTuple):
    """Where a diffusers tensor goes: our parameter ``path``, the layout change ``kind`` and, for the
    stacked blocks (``scan_layers``), the ``layer`` (row of the leading axis); ``None`` otherwise."""
    path: str
    kind: str
    layer: int | None = None


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not correspond one to one to the model's parameters."""


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> WanTransformerConfig:
    """``WanTransformerConfig`` from a diffusers ``config.json`` dict; ``overrides`` set runtime fields
    (``dtype``, ``param_dtype``, ``attention_impl``, ``remat_policy``).

    Raises ``ValueError`` for image-to-video configs and for keys this port does not know.
    """
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"config is for {cls!r}, expected {DIFFUSERS_CLASS!r}")
    i2v = {k: config[k] for k in _IMAGE_TO_VIDEO_KEYS if config.get(k) is not None}
    if i2v:
        raise ValueError(f"image-to-video Wan configs are not supported (T2V only): {i2v}")
    known = set(_CONFIG_FIELDS) | set(_HEAD_KEYS) | set(_IMAGE_TO_VIDEO_KEYS)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unknown keys in the Wan transformer config: {unknown}")

    fields = {field: config.get(key, default) for key, (field, default) in _CONFIG_FIELDS.items()}
    if fields["out_channels"] is None:
        fields["out_channels"] = fields["in_channels"]
    heads = config.get("num_attention_heads", _HEAD_KEYS["num_attention_heads"])
    fields.update(num_heads=heads, dim=heads * config.get("attention_head_dim", _HEAD_KEYS["attention_head_dim"]))
    fields.update(overrides)
    return WanTransformerConfig(**fields)


def diffusers_key_map(cfg: WanTransformerConfig) -> dict[str, Target]:
    """Every diffusers tensor name of a T2V checkpoint -> ``Target(our parameter path, layout change, layer)``
    for ``cfg``'s layout (per-block ``blocks.{i}.*`` or, with ``scan_layers``, row ``i`` of ``blocks.*``)."""
    keys: dict[str, Target] = {}
    layer: int | None = None

    def put(src: str, dst: str, kind: str):
        keys[src] = Target(dst, kind, layer)

    def linear(src: str, dst: str):
        put(f"{src}.weight", f"{dst}.kernel", LINEAR)
        put(f"{src}.bias", f"{dst}.bias", COPY)

    put("patch_embedding.weight", "patch_embed.kernel", CONV3D)
    put("patch_embedding.bias", "patch_embed.bias", COPY)
    linear("condition_embedder.time_embedder.linear_1", "time_embed.linear_1")
    linear("condition_embedder.time_embedder.linear_2", "time_embed.linear_2")
    linear("condition_embedder.time_proj", "time_proj")
    linear("condition_embedder.text_embedder.linear_1", "text_embed.linear_1")
    linear("condition_embedder.text_embedder.linear_2", "text_embed.linear_2")
    for i in range(cfg.num_layers):
        src = f"blocks.{i}"
        dst, layer = ("blocks", i) if cfg.scan_layers else (f"blocks.{i}", None)
        put(f"{src}.scale_shift_table", f"{dst}.modulation_table", COPY)
        for attn_src, attn_dst in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for proj_src, proj_dst in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "out")):
                linear(f"{src}.{attn_src}.{proj_src}", f"{dst}.{attn_dst}.{proj_dst}")
            put(f"{src}.{attn_src}.norm_q.weight", f"{dst}.{attn_dst}.query_norm.scale", COPY)
            put(f"{src}.{attn_src}.norm_k.weight", f"{dst}.{attn_dst}.key_norm.scale", COPY)
        if cfg.cross_attn_norm:
            put(f"{src}.norm2.weight", f"{dst}.cross_norm.scale", COPY)
            put(f"{src}.norm2.bias", f"{dst}.cross_norm.bias", COPY)
        linear(f"{src}.ffn.net.0.proj", f"{dst}.ffn.up")
        linear(f"{src}.ffn.net.2", f"{dst}.ffn.down")
    layer = None
    put("scale_shift_table", "head_modulation_table", COPY)
    linear("proj_out", "proj_out")
    return keys


def to_model_layout(array: np.ndarray, kind: str) -> np.ndarray:
    """A (lazy, strided) view of a diffusers tensor in our layout."""
    if kind == LINEAR:
        return array.T
    if kind == CONV3D:
        return array.transpose(2, 3, 4, 1, 0)
    return array


def _source_shape(model_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == LINEAR:
        return model_shape[::-1]
    if kind == CONV3D:
        kt, kh, kw, cin, cout = model_shape
        return (cout, cin, kt, kh, kw)
    return tuple(model_shape)


def _checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        for name, info in read_header(path)[0].items():
            if name in shapes:
                raise CheckpointMismatchError(f"tensor {name!r} appears in more than one shard of {folder}")
            shapes[name] = tuple(info["shape"])
    return shapes


def _listing(names: Sequence[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_checkpoint(shapes: Mapping[str, tuple[int, ...]], key_map: Mapping[str, Target],
                     params: Mapping[str, nnx.Variable]) -> None:
    """Raise ``CheckpointMismatchError`` naming every unexpected, missing or wrongly shaped tensor."""
    unmapped = sorted(set(params) - {t.path for t in key_map.values()})
    if unmapped:  # a bug in the key map, not in the checkpoint
        raise AssertionError(f"model parameters without a diffusers key: {unmapped}")
    problems = []
    unexpected = [k for k in shapes if k not in key_map]
    missing = [k for k in key_map if k not in shapes]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    wrong = []
    for name, shape in shapes.items():
        if name in key_map:
            dst, kind, layer = key_map[name]
            shape_of_one = params[dst].shape if layer is None else params[dst].shape[1:]
            want = _source_shape(shape_of_one, kind)
            if shape != want:
                wrong.append(f"{name} {list(shape)} (expected {list(want)})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_listing(wrong)}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the Wan transformer config: " + "; ".join(problems))


def _place(host: np.ndarray, dtype, sharding: NamedSharding | None) -> jax.Array:
    """Cast and copy one tensor to the device(s); with a sharding each device reads only its slice."""
    if sharding is None:
        return jax.device_put(np.ascontiguousarray(host, dtype=dtype))
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: np.ascontiguousarray(host[index], dtype=dtype))


def _drop_leading_axis(sharding: NamedSharding | None) -> NamedSharding | None:
    return None if sharding is None else NamedSharding(sharding.mesh, P(*sharding.spec[1:]))


@functools.lru_cache(maxsize=None)
def _row_setter(sharding: NamedSharding | None):
    """``(stacked, row, i) -> stacked with row i replaced``, in place (donated), kept at ``sharding``."""
    def set_row(stacked, row, i):
        return jax.lax.dynamic_update_index_in_dim(stacked, row, i, 0)
    return jax.jit(set_row, donate_argnums=0, out_shardings=sharding)


def _zeros(shape, dtype, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _named_params(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    for path, variable in nnx.to_flat_state(state):
        yield ".".join(str(p) for p in path), variable


def load_transformer(path: str, *, dtype=jnp.float32, param_dtype=None, mesh: Mesh | None = None,
                     rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
                     **config_overrides) -> WanTransformer:
    """Load a diffusers ``transformer/`` folder (``config.json`` + safetensors, single or sharded).

    ``dtype``: compute dtype; ``param_dtype``: parameter dtype (default: ``dtype``); the float32-kept
    parameters (time embedder, modulation tables, cross-attention LayerNorm) stay float32.
    With ``mesh``, parameters are placed as ``NamedSharding``s that flax resolves from their logical axis
    names with ``rules`` (``parallel.sharding_context``; replicated where no rule applies, all replicated
    when ``rules`` is None).
    ``config_overrides``: other runtime fields of ``WanTransformerConfig`` (``attention_impl``,
    ``remat_policy``). Raises ``CheckpointMismatchError`` naming unexpected / missing / misshaped keys.
    """
    cfg = config_from_diffusers(read_config(path), dtype=dtype,
                                param_dtype=dtype if param_dtype is None else param_dtype, **config_overrides)
    abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = dict(_named_params(state))
    key_map = diffusers_key_map(cfg)
    check_checkpoint(_checkpoint_shapes(path), key_map, params)
    shardings: dict[str, NamedSharding | None] = dict.fromkeys(params)
    if mesh is not None:
        with parallel.sharding_context(mesh, rules or (), LOGICAL_AXES):
            resolved = parallel.shardings(state, mesh)
        shardings = {".".join(str(p) for p in path): s for path, s in nnx.to_flat_state(resolved)}

    stacked = {t.path for t in key_map.values() if t.layer is not None}
    for dst in stacked:           # filled row by row below (every row is in the checkpoint: checked above)
        params[dst].set_value(_zeros(params[dst].shape, params[dst].dtype, shardings[dst]))
    for name, array in iter_tensors(path):
        dst, kind, layer = key_map[name]
        variable = params[dst]
        if layer is None:
            variable.set_value(_place(to_model_layout(array, kind), variable.dtype, shardings[dst]))
        else:
            row = _place(to_model_layout(array, kind), variable.dtype, _drop_leading_axis(shardings[dst]))
            variable.set_value(_row_setter(shardings[dst])(variable.get_value(), row, np.int32(layer)))
            del row
        del array
    return nnx.merge(graphdef, state)


def load_config(path: str, **overrides) -> WanTransformerConfig:
    """The ``WanTransformerConfig`` of a diffusers ``transformer/`` folder."""
    return config_from_diffusers(read_config(path), **overrides)


__all__ = ["CheckpointMismatchError", "Target", "check_checkpoint", "config_from_diffusers", "diffusers_key_map",
           "load_config", "load_transformer", "to_model_layout"]
