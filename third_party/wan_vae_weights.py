"""Load a diffusers ``AutoencoderKLWan`` folder (``vae/``: config.json + safetensors) into ``WanVAE``.

The model is built abstractly (``nnx.eval_shape``: no memory, no initialisation), then each parameter is
filled as its tensor streams from the safetensors files. Name and layout mapping:

    diffusers key                                  WanVAE parameter path
    <m>.weight  Conv3d [out, in, kt, kh, kw]   ->  <m>.kernel [kt, kh, kw, in, out]
    <m>.weight  Conv2d [out, in, kh, kw]       ->  <m>.kernel [kh, kw, in, out]
    <m>.gamma   [C, 1, 1(, 1)]                 ->  <m>.gamma  [C]
    <m>.bias    [C]                            ->  <m>.bias   [C]
    ....resample.1.<p>     (Sequential slot)   ->  ....resample.<p>
    ....upsamplers.0.<p>   (one-element list)  ->  ....upsampler.<p>

Every checkpoint tensor must land on a parameter and every parameter must be filled; otherwise the
error lists the offending keys. Needs neither torch nor the ``safetensors`` package.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from shelllcc.models.wan_vae import WanVAE, WanVAEConfig, config_from_diffusers
from third_party.safetensors_checkpoint import iter_tensors, read_config, tensor_names

Path = tuple[Any, ...]

# (diffusers fragment, WanVAE fragment); applied left to right, and right to left for the inverse
_RENAMES = ((".resample.1.", ".resample."), (".upsamplers.0.", ".upsampler."))
_MAX_LISTED = 20


def diffusers_key_to_path(key: str) -> Path:
    """``'decoder.up_blocks.0.upsamplers.0.resample.1.weight'`` -> ``('decoder', 'up_blocks', 0, 'upsampler',
    'resample', 'kernel')``."""
    name = key
    for theirs, ours in _RENAMES:
        name = name.replace(theirs, ours)
    if name.endswith(".weight"):
        name = name[: -len(".weight")] + ".kernel"
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def path_to_diffusers_key(path: Path) -> str:
    """Inverse of ``diffusers_key_to_path``."""
    name = ".".join(str(p) for p in path)
    if name.endswith(".kernel"):
        name = name[: -len(".kernel")] + ".weight"
    for theirs, ours in _RENAMES:
        name = name.replace(ours, theirs)
    return name


def convert_tensor(key: str, array: np.ndarray) -> np.ndarray:
    """A diffusers tensor in WanVAE layout (a transposed view where possible; no copy)."""
    if key.endswith(".weight"):
        if array.ndim == 5:  # Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
            return array.transpose(2, 3, 4, 1, 0)
        if array.ndim == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
            return array.transpose(2, 3, 1, 0)
        raise ValueError(f"{key}: expected a Conv2d or Conv3d weight (rank 4 or 5), got shape {array.shape}")
    if key.endswith(".gamma"):  # [C, 1, 1(, 1)] broadcast shape of channels-first RMS norm -> [C]
        return array.reshape(array.shape[0])
    return array


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def abstract_vae(config: WanVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, precision=None) -> WanVAE:
    """A ``WanVAE`` whose parameters are ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return nnx.eval_shape(lambda: WanVAE(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                         rngs=nnx.Rngs(0)))


def load_vae(path: str, *, dtype=jnp.float32, param_dtype=None, precision=None) -> WanVAE:
    """``WanVAE`` with the weights of a diffusers ``AutoencoderKLWan`` folder.

    ``dtype``: compute dtype; ``param_dtype``: storage dtype of the weights (default: ``dtype``).
    Raises ``ValueError`` naming the keys if the checkpoint and the model disagree (unexpected, missing or
    misshapen tensors), ``FileNotFoundError`` if the folder has no config or weights.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    config = config_from_diffusers(read_config(path))
    graphdef, state = nnx.split(abstract_vae(config, dtype=dtype, param_dtype=param_dtype, precision=precision))
    slots = dict(nnx.to_flat_state(state))

    # Check names before reading any data, so a wrong folder fails fast.
    names = tensor_names(path)
    unexpected = sorted(n for n in names if diffusers_key_to_path(n) not in slots)
    missing = sorted(set(map(path_to_diffusers_key, slots)) - set(names))
    if unexpected or missing:
        lines = [f"{path}: checkpoint does not match WanVAE({config})"]
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        raise ValueError("\n".join(lines))

    filled = {}
    for name, array in iter_tensors(path):
        target = diffusers_key_to_path(name)
        slot = slots[target]
        value = convert_tensor(name, array)
        if value.shape != tuple(slot.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, which converts to {value.shape}; "
                             f"the model expects {tuple(slot.shape)} at {'.'.join(map(str, target))}")
        if target in filled:
            raise ValueError(f"{path}: tensor {name!r} appears more than once")
        filled[target] = slot.replace(jnp.asarray(value, dtype=param_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, filled[p]) for p in slots]))
