"""Read and write the reference implementation's PyTorch manifold checkpoint (DESIGN 4).

File format (``torch.save``)::

    {"model": state_dict, "config": {"embedding_dim": D, "num_bases": K, "hidden_dim": H, ...}, ...}

State dict (keys may carry a ``module.`` prefix) and its ``ManifoldParams`` leaf::

    basis [K, D]                      anchors [K, D]
    global_scale [1]                  scale []
    global_bias [1, D]                shift [D]
    predictor.0.weight/bias [H, D]/[H]    coder.w0 [D, H] (transposed) / coder.b0
    predictor.1.weight/bias [H]           coder.bn_scale / coder.bn_bias      (BatchNorm1d, eps 1e-5)
    predictor.1.running_mean/var [H]      bn.mean / bn.var
    predictor.1.num_batches_tracked []    bn.count (int64 in torch, int32 here)
    predictor.3.weight/bias [H, H]/[H]    coder.w1 (transposed) / coder.b1
    predictor.5.weight/bias [K, H]/[K]    coder.w2 (transposed) / coder.b2
    surface_head.0.weight/bias [H, D]/[H] shell.w0 (transposed) / shell.b0
    surface_head.2.weight/bias [D, H]/[D] shell.w1 (transposed) / shell.b1

``torch.nn.Linear`` stores ``[out, in]``; shelllcc stores ``[in, out]``. A ``patch_size`` in the
config is honoured; for patches larger than one position, D is taken to be ordered as shelllcc's
``patchify`` orders it, ``(pt, ph, pw, C)``.
"""

from __future__ import annotations

import operator
import os
import pickle
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from shelllcc.errors import InputFileError
from shelllcc.manifold.params import (
    BatchNormStats,
    CoderParams,
    ManifoldConfig,
    ManifoldParams,
    ShellParams,
    check_params,
    expected_shapes,
)

_PREFIX = "module."
_COUNT_KEY = "predictor.1.num_batches_tracked"
_REQUIRED_CONFIG = ("embedding_dim", "num_bases", "hidden_dim")


def _layout(d: int, k: int, h: int) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """``(torch key, shelllcc leaf path, torch shape, transposed)`` for every state-dict entry."""
    return [
        ("basis", "anchors", (k, d), False),
        ("global_scale", "scale", (1,), False),
        ("global_bias", "shift", (1, d), False),
        ("predictor.0.weight", "coder.w0", (h, d), True),
        ("predictor.0.bias", "coder.b0", (h,), False),
        ("predictor.1.weight", "coder.bn_scale", (h,), False),
        ("predictor.1.bias", "coder.bn_bias", (h,), False),
        ("predictor.1.running_mean", "bn.mean", (h,), False),
        ("predictor.1.running_var", "bn.var", (h,), False),
        (_COUNT_KEY, "bn.count", (), False),
        ("predictor.3.weight", "coder.w1", (h, h), True),
        ("predictor.3.bias", "coder.b1", (h,), False),
        ("predictor.5.weight", "coder.w2", (k, h), True),
        ("predictor.5.bias", "coder.b2", (k,), False),
        ("surface_head.0.weight", "shell.w0", (h, d), True),
        ("surface_head.0.bias", "shell.b0", (h,), False),
        ("surface_head.2.weight", "shell.w1", (d, h), True),
        ("surface_head.2.bias", "shell.b1", (d,), False),
    ]


def _config_from_dict(cfg: Any, path) -> ManifoldConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: checkpoint has no 'config' dict (got {type(cfg).__name__}); the reference "
                         f"format stores {{'model': state_dict, 'config': {{{', '.join(_REQUIRED_CONFIG)}, ...}}}}")
    dims = {}
    for key in _REQUIRED_CONFIG:
        if key not in cfg:
            raise ValueError(f"{path}: checkpoint config lacks required key {key!r} (has {sorted(map(str, cfg))})")
        try:
            dims[key] = operator.index(cfg[key])
        except TypeError:
            raise ValueError(f"{path}: config[{key!r}] must be an int, got {cfg[key]!r}") from None
    patch = cfg.get("patch_size", (1, 1, 1))
    if isinstance(patch, int):
        # A bare int does not say which of (t, h, w) it covers; only the trivial patch is unambiguous.
        if patch != 1:
            raise ValueError(f"{path}: config patch_size={patch!r} is ambiguous; expected three ints (pt, ph, pw)")
        patch = (1, 1, 1)
    try:
        return ManifoldConfig(dim=dims["embedding_dim"], num_anchors=dims["num_bases"],
                              hidden_dim=dims["hidden_dim"], patch_size=tuple(patch))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid manifold config: {e}") from e


def load_manifold(path: str | os.PathLike, *, trusted: bool = False) -> tuple[ManifoldParams, ManifoldConfig]:
    """Read a reference checkpoint into float32 ``ManifoldParams`` and its ``ManifoldConfig``.

    The file is unpickled with ``weights_only=True`` (tensors, containers and plain Python values
    only); pass ``trusted=True`` to allow arbitrary pickled objects from a file you trust.
    Raises ``ValueError`` naming the file and the offending key or tensor on any mismatch.
    """
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError) as e:
        hint = "" if trusted else " If the file is trusted and holds other pickled objects, pass trusted=True."
        raise InputFileError(f"{path}: could not read as a torch checkpoint: {e}.{hint}") from e
    except Exception as e:
        # a truncated, empty or foreign file: torch answers "[Errno 22] Invalid argument", a bare EOFError
        # or whatever the unpickler trips on (KeyError: 101), none naming the file
        raise InputFileError(f"{path}: truncated, empty or not a torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        what = f"a dict with keys {sorted(map(str, ckpt))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a reference manifold checkpoint: expected a dict with a 'model' state "
                         f"dict and a 'config' dict, got {what}")
    config = _config_from_dict(ckpt.get("config"), path)

    state = {}
    for key, value in ckpt["model"].items():
        key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if key in state:
            raise ValueError(f"{path}: state dict holds {key!r} both with and without the {_PREFIX!r} prefix")
        state[key] = value

    layout = _layout(config.dim, config.num_anchors, config.hidden_dim)
    # Old BatchNorm checkpoints predate num_batches_tracked; torch itself accepts them, and eval ignores it.
    missing = [k for k, *_ in layout if k not in state and k != _COUNT_KEY]
    if missing:
        raise ValueError(f"{path}: state dict is missing {missing}")
    unexpected = sorted(set(state) - {k for k, *_ in layout})
    if unexpected:
        warnings.warn(f"{path}: ignoring state-dict entries the manifold does not use: {unexpected}", stacklevel=2)

    ours = expected_shapes(config)
    dims = (f"embedding_dim={config.dim}, num_bases={config.num_anchors}, hidden_dim={config.hidden_dim}")
    bad, leaves = [], {}
    for key, leaf, shape, transposed in layout:
        if key not in state:
            leaves[leaf] = jnp.zeros((), jnp.int32)
            continue
        t = state[key]
        if not isinstance(t, torch.Tensor):
            bad.append(f"{key!r} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != shape:
            bad.append(f"tensor {key!r} has shape {tuple(t.shape)}, config ({dims}) implies {shape}")
        elif leaf == "bn.count":
            leaves[leaf] = jnp.asarray(int(t), jnp.int32)
        else:
            a = t.detach().to(torch.float32).numpy()
            leaves[leaf] = jnp.asarray((a.T if transposed else a).reshape(ours[leaf]))
    if bad:
        raise ValueError(f"{path}: checkpoint tensors disagree with its config: " + "; ".join(bad))

    def group(prefix):
        return {p.split(".", 1)[1]: v for p, v in leaves.items() if p.startswith(prefix + ".")}

    params = ManifoldParams(anchors=leaves["anchors"], scale=leaves["scale"], shift=leaves["shift"],
                            coder=CoderParams(**group("coder")), bn=BatchNormStats(**group("bn")),
                            shell=ShellParams(**group("shell")))
    try:
        check_params(params, config)
    except ValueError as e:  # unreachable after the per-tensor check; kept as the library's own guard
        raise ValueError(f"{path}: {e}") from e
    return params, config


def save_manifold(params: ManifoldParams, config: ManifoldConfig, path: str | os.PathLike,
                  extra: dict | None = None) -> str | os.PathLike:
    """Write ``params`` in the reference format; returns ``path``.

    Tensors are float32 (``num_batches_tracked`` int64), so a reference-layout ``torch.nn.Module``
    loads ``ckpt["model"]`` with ``load_state_dict(strict=True)``. ``extra`` adds top-level entries
    (e.g. training metadata); it may not replace ``model`` or ``config``.
    """
    import torch

    check_params(params, config)
    # The reference module hard-codes these; a checkpoint cannot carry other values.
    if config.bn_eps != 1e-5 or config.shell_eps != 1e-6:
        raise ValueError(f"the reference format fixes bn_eps=1e-5 and shell_eps=1e-6; config has "
                         f"bn_eps={config.bn_eps}, shell_eps={config.shell_eps}")
    extra = dict(extra or {})
    clash = sorted({"model", "config"} & set(extra))
    if clash:
        raise ValueError(f"extra may not replace the checkpoint's {clash}")

    state = {}
    for key, leaf, shape, transposed in _layout(config.dim, config.num_anchors, config.hidden_dim):
        value = params
        for part in leaf.split("."):
            value = getattr(value, part)
        if leaf == "bn.count":
            state[key] = torch.tensor(int(value), dtype=torch.int64)
            continue
        a = np.asarray(value, np.float32)
        state[key] = torch.tensor(np.ascontiguousarray(a.T if transposed else a)).reshape(shape)
    ckpt = {"model": state,
            "config": {"embedding_dim": config.dim, "num_bases": config.num_anchors,
                       "hidden_dim": config.hidden_dim, "patch_size": list(config.patch_size)},
            **extra}
    # Write then rename, so an interrupted save never leaves a truncated checkpoint under `path`.
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path
