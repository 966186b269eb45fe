"""Low-rank adapters (LoRA) for the ``Dense`` layers of the Wan transformer, in Flax NNX.

A target ``Dense`` (``y = x W + b``, ``W [in, out]``) becomes a ``LoRADense``::

    y = x W + b + (alpha / rank) * (x A) B          A [in, rank], B [rank, out]

computed in the layer's compute dtype; ``A`` and ``B`` are stored as ``LoRAParam`` (float32 by default).
``A`` starts small random (kaiming-uniform, bound ``1/sqrt(in)``) and ``B`` zero, so an adapted model is
initially exactly the base model. ``LoRADense`` subclasses ``Dense`` and shares its ``kernel``/``bias``
Variables, so the base parameters keep their paths (``blocks.0.self_attn.query.kernel``); the adapters sit
next to them (``...query.lora_a``, ``...query.lora_b``). With stacked blocks (``scan_layers``, paths like
``blocks.self_attn.query.kernel [L, in, out]``) the adapters are stacked too, one per layer along the
leading ``'layers'`` axis, with the values the per-block layout would give them.

Typical reward fine-tuning use::

    apply_lora(model, rank=16, alpha=16, rngs=nnx.Rngs(0))       # in place
    graphdef, lora, frozen = split_lora(model)                   # differentiate ``lora`` only
    def loss_fn(lora):
        return loss(nnx.merge(graphdef, lora, frozen), batch)
    grads = jax.grad(loss_fn)(lora)
    ...
    merge_lora(model)                                            # plain model, W <- W + (alpha/rank) A B
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from shelllcc.models.wan_transformer import LAYERS, Dense, KeyStream, born_sharded

# The attention projections of both attention layers of every block (q, k, v, o).
DEFAULT_TARGETS = tuple(f"{attn}.{proj}" for attn in ("self_attn", "cross_attn")
                        for proj in ("query", "key", "value", "out"))

_WILDCARDS = set("*?[")


class LoRAParam(nnx.Param):
    """A LoRA adapter weight. A subclass of ``nnx.Param`` so that filters can separate adapters
    (``LoRAParam``) from base weights (``base_filter``) while optimisers over ``nnx.Param`` still see both."""


# nnx filter selecting the adapter weights, and one selecting every other parameter.
lora_filter = LoRAParam
base_filter = nnx.All(nnx.Param, nnx.Not(LoRAParam))


class LoRADense(Dense):
    """``y = x W + b + (alpha / rank) * (x A) B`` (``A [in, rank]``, ``B [rank, out]``), in ``dtype``.

    Built from an existing ``Dense``: takes over its ``kernel``/``bias`` Variables (same objects, same
    attribute names, so paths and logical axes of the base weights are unchanged) and adds ``lora_a``
    (logical axes ``(in_axis, None)``) and ``lora_b`` (``(None, out_axis)``) as ``LoRAParam``.

    A ``Dense`` of the stacked blocks (``scan_layers``: kernel ``[L, in, out]``, names ``('layers', in, out)``)
    gets stacked adapters, ``A [L, in, rank]`` and ``B [L, rank, out]`` with the leading ``'layers'`` axis,
    and ``key`` holds one key per layer (``[L]``): layer ``i``'s ``A`` is drawn from ``key[i]``, as the
    per-block layout draws it. Inside ``nnx.scan`` each layer sees the 2-D slices, so the call is the same.
    """

    def __init__(self, base: Dense, *, rank: int, alpha: float, key: jax.Array, param_dtype: Any = jnp.float32):
        # Deliberately not calling Dense.__init__: it would draw a fresh random kernel we'd throw away.
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.dtype = base.dtype
        self.kernel = base.kernel
        self.bias = base.bias
        self.rank = int(rank)
        self.alpha = float(alpha)
        *layers, in_features, out_features = base.kernel.shape
        names = base.kernel.get_metadata().get("out_sharding") or (None,) * base.kernel.ndim
        *layer_axes, in_axis, out_axis = names
        if len(layers) > 1:
            raise ValueError(f"LoRA supports one leading (layer) axis, got a kernel of shape {base.kernel.shape}")
        # variance_scaling(1/3, fan_in, uniform) = U(-1/sqrt(in), 1/sqrt(in)): torch's kaiming_uniform(a=sqrt(5)),
        # the usual LoRA choice; fan_in of A [in, rank] is ``in``.
        a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        draw = lambda k: a_init(k, (in_features, self.rank), param_dtype)  # noqa: E731
        if layers:
            if jnp.shape(key) != tuple(layers):
                raise ValueError(f"a stacked Dense of {layers[0]} layers needs {layers[0]} keys, got {jnp.shape(key)}")
            a = jax.vmap(draw)(key)
        else:
            a = draw(key)
        eager = born_sharded()
        self.lora_a = LoRAParam(a, out_sharding=(*layer_axes, in_axis, None), eager_sharding=eager)
        # B = 0 makes the update vanish exactly at initialisation (the adapted model *is* the base model).
        self.lora_b = LoRAParam(jnp.zeros((*layers, self.rank, out_features), param_dtype),
                                out_sharding=(*layer_axes, None, out_axis), eager_sharding=eager)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> jnp.ndarray:
        """The float32 kernel update ``(alpha / rank) A B`` ``[in, out]`` (``[L, in, out]`` stacked; what
        ``merge_lora`` folds in)."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = super().__call__(x)  # the base path, bit-identical to Dense
        x = x.astype(self.dtype)
        # Low-rank path as two thin matmuls (never materialise A B: [in, out] per layer and step).
        update = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + jnp.asarray(self.scale, self.dtype) * update


# ----------------------------------------------------------------------------------------------
# module surgery
# ----------------------------------------------------------------------------------------------

def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _matches(path: str, pattern: str) -> bool:
    if _WILDCARDS & set(pattern):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def _replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for step in path[:-1]:
        parent = parent[step] if isinstance(step, int) else getattr(parent, step)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def _dense_modules(model: nnx.Module) -> list[tuple[tuple, Dense]]:
    # Materialise the list first: the caller replaces modules, which must not happen while iterating.
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Dense) and path]


def _layers(dense: Dense) -> int | None:
    """Number of stacked layers of a ``Dense`` of the ``scan_layers`` blocks (leading ``'layers'`` axis), else None."""
    names = dense.kernel.get_metadata().get("out_sharding") or ()
    return dense.kernel.shape[0] if names and names[0] == LAYERS else None


def _per_block_paths(path: tuple, dense: Dense) -> list[tuple]:
    """The paths a module has in the per-block layout: ``blocks.self_attn.query`` of ``L`` stacked
    layers stands for ``blocks.0.self_attn.query`` ... ``blocks.{L-1}.self_attn.query``."""
    n = _layers(dense)
    return [path] if n is None else [(path[0], i, *path[1:]) for i in range(n)]


def _order(path: tuple) -> tuple:
    # nnx's traversal order of the per-block layout: sorted keys, list indices as numbers
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in path)


def apply_lora(model: nnx.Module, *, rank: int = 16, alpha: float = 16.0,
               targets: Iterable[str] = DEFAULT_TARGETS, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32) -> nnx.Module:
    """Replace, in place, every target ``Dense`` of ``model`` by a ``LoRADense``; returns ``model``.

    Update: ``y = x W + b + (alpha / rank) * (x A) B`` (see the module docstring).

    ``targets`` are matched against the dotted module path relative to ``model`` in the per-block
    layout (list indices as numbers, e.g. ``blocks.3.self_attn.query``), whatever the layout:

    * a pattern with a wildcard (``*``, ``?``, ``[``) is an ``fnmatch`` pattern on the whole path
      (``blocks.*.self_attn.query``, ``blocks.1.*_attn.*``; ``*`` also crosses dots);
    * otherwise it is a suffix on whole path components: ``self_attn.query`` matches
      ``blocks.0.self_attn.query`` but ``attn.query`` does not.

    Only ``Dense`` modules are candidates. Every pattern must match at least one of them, else
    ``ValueError`` naming the pattern (a typo would otherwise silently train nothing). Applying LoRA
    twice to the same layer is an error too.

    Stacked blocks (``scan_layers``) get stacked adapters; a pattern may then select a block module in
    all layers or in none (``blocks.1.ffn.up`` alone needs ``scan_layers=False``). The adapters' initial
    values are those of the per-block layout: the keys are handed out in its module order.
    """
    targets = tuple(targets)
    if not targets:
        raise ValueError("apply_lora: no targets given")
    candidates = [(vp, path, m) for path, m in _dense_modules(model) for vp in _per_block_paths(path, m)]
    hit = lambda vp: any(_matches(_path_str(vp), t) for t in targets)  # noqa: E731
    unmatched = [t for t in targets if not any(_matches(_path_str(vp), t) for vp, _, _ in candidates)]
    if unmatched:
        raise ValueError(f"LoRA target pattern(s) matched no Dense module: {unmatched}")
    chosen = [(vp, path, m) for vp, path, m in candidates if hit(vp)]
    already = sorted({_path_str(path) for _, path, m in chosen if isinstance(m, LoRADense)})
    if already:
        raise ValueError(f"LoRA is already applied to: {already}")
    by_module: dict[tuple, list] = {}
    for vp, path, m in chosen:
        by_module.setdefault(path, []).append(vp)
    partial = [f"{_path_str(path)} ({len(by_module[path])} of {_layers(m)} layers)" for path, m in _dense_modules(model)
               if path in by_module and _layers(m) is not None and len(by_module[path]) != _layers(m)]
    if partial:
        raise ValueError(f"LoRA targets {list(targets)} select some layers of stacked blocks: {partial}; the "
                         "stacked layout (model.scan_layers=True) adapts a block module in every layer or none; "
                         "build the model with scan_layers=False for per-layer targets")
    # One draw from rngs, then fold_in per layer (see KeyStream: avoids quadratic nnx.eval_shape traces),
    # handed out in the per-block layout's module order so both layouts start from the same adapters.
    keys = KeyStream(rngs.params())
    key_of = {vp: keys() for vp in sorted((vp for vp, _, _ in chosen), key=_order)}
    for path, m in _dense_modules(model):
        if path not in by_module:
            continue
        vps = by_module[path]
        key = key_of[vps[0]] if _layers(m) is None else jnp.stack([key_of[vp] for vp in vps])
        _replace_module(model, path, LoRADense(m, rank=rank, alpha=alpha, key=key, param_dtype=param_dtype))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel, ``W <- W + (alpha / rank) A B`` (summed in float32, cast
    back to the kernel dtype), and put plain ``Dense`` modules back, in place; returns ``model``.

    The result has no ``LoRAParam`` left and the same outputs as the adapted model up to rounding
    (exactly the rounding of the kernel dtype; bf16 kernels lose the low bits of small updates).
    """
    for path, module in _dense_modules(model):
        if not isinstance(module, LoRADense):
            continue
        kernel = module.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) + module.delta()).astype(kernel.dtype)
        in_features, out_features = kernel.shape[-2:]
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)[-2:]
        # An abstract Dense (no random kernel drawn), then give it the real, merged Variables.
        plain = nnx.eval_shape(lambda: Dense(in_features, out_features, axes, dtype=module.dtype,
                                             param_dtype=kernel.dtype, keys=KeyStream(jax.random.key(0))))
        plain.kernel = kernel
        plain.bias = module.bias
        _replace_module(model, path, plain)
    return model


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_params, frozen_rest)`` = ``nnx.split(model, LoRAParam, ...)``.

    Differentiate a loss w.r.t. ``lora_params`` only (``nnx.merge(graphdef, lora_params, frozen_rest)``
    inside the loss); ``frozen_rest`` holds the base weights and every other state, never differentiated.
    """
    return nnx.split(model, lora_filter, ...)


def lora_param_count(model: nnx.Module) -> int:
    """Number of adapter scalars: ``sum over adapted layers of rank * (in + out)``."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, lora_filter)))
