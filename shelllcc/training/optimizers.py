"""Optax optimizers from a config: AdamW, learning-rate schedules, clipping, parameter masks.

Parameters are nested dicts (``nnx.State.to_pure_dict()``); a parameter's *path* is its keys joined by
dots, e.g. ``blocks.3.self_attn.query.kernel``. Masks select parameters by glob patterns on paths.

    cfg = OptimizerConfig(learning_rate=1e-5, schedule="constant", grad_clip=1.0, freeze=("patch_embed.*",))
    tx = make_optimizer(cfg, params)
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, Sequence

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW after global-norm clipping, with a warmup + decay learning-rate schedule.

    Attributes:
      learning_rate: peak learning rate.
      schedule: ``constant`` | ``cosine`` | ``linear`` decay after a linear warmup from 0.
      warmup_steps: linear warmup length (0: start at the peak).
      total_steps: schedule length (decay ends here).
      end_lr_fraction: final learning rate as a fraction of the peak (cosine and linear).
      b1, b2, eps: Adam moments.
      weight_decay: decoupled weight decay (AdamW).
      decay_vectors: also decay parameters with fewer than 2 dimensions (biases, norm scales,
        modulation tables); off by default, the usual choice for transformers.
      grad_clip: global-norm clip threshold; 0 turns clipping off.
      freeze: glob patterns over parameter paths; matching parameters get zero updates (and no
        optimizer state). A pattern that matches nothing is an error (a typo would freeze nothing).
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_vectors: bool = False
    grad_clip: float = 1.0
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.learning_rate < 0 or self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"need learning_rate >= 0, warmup_steps >= 0, total_steps >= 1; got "
                             f"{self.learning_rate}, {self.warmup_steps}, {self.total_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], total_steps: int) -> "OptimizerConfig":
        """From an ``optim`` ConfigDict (every field but ``total_steps``, which the run length gives)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"total_steps"}
        values = dict(config)
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown optimizer settings {sorted(unknown)}; known: {sorted(fields)}")
        return cls(total_steps=total_steps, **values)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """``lr(step)``: linear warmup 0 -> peak over ``warmup_steps``, then constant / cosine / linear to
    ``end_lr_fraction * peak`` at ``total_steps``."""
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(cfg.total_steps - warm, 1)
    end = peak * cfg.end_lr_fraction
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def param_paths(params: Any) -> Any:
    """A tree like ``params`` whose leaves are the parameters' dotted paths."""
    def name(path, _):
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return jax.tree_util.tree_map_with_path(name, params)


def glob_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Bool tree: True where the parameter's path matches any of ``patterns`` (``fnmatch`` globs)."""
    return jax.tree.map(lambda p: any(fnmatch.fnmatchcase(p, pat) for pat in patterns), param_paths(params))


def check_patterns(params: Any, patterns: Sequence[str], what: str) -> None:
    paths = jax.tree.leaves(param_paths(params))
    dead = [pat for pat in patterns if not any(fnmatch.fnmatchcase(p, pat) for p in paths)]
    if dead:
        examples = ", ".join(paths[:4])
        raise ValueError(f"{what} patterns {dead} match no parameter (paths look like: {examples}, ...)")


def decay_mask(params: Any, decay_vectors: bool = False, layer_axes: Any = None) -> Any:
    """Bool tree: which parameters weight decay applies to (matrices, or everything). ``layer_axes``: a
    tree like ``params`` giving each parameter's number of leading stacked-layer axes (the DiT's
    ``scan_layers`` blocks), which do not count: a stacked bias ``[L, out]`` is a vector; default none."""
    if layer_axes is None:
        layer_axes = jax.tree.map(lambda _: 0, params)
    return jax.tree.map(lambda x, n: decay_vectors or len(getattr(x, "shape", ())) - n >= 2, params, layer_axes)


def make_optimizer(cfg: OptimizerConfig, params: Any = None, layer_axes: Any = None) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw(schedule, decay mask)``; parameters matching ``cfg.freeze`` get
    ``set_to_zero`` instead (optax ``multi_transform``, so they carry no Adam moments).

    ``params`` is used for its structure and shapes only (abstract arrays are fine). It may be left
    out when ``cfg.freeze`` is empty and no ``layer_axes`` are given: the decay mask is then computed
    from the tree the optimizer is given (optax calls a callable mask on it), which gives the same mask.
    ``layer_axes``: see :func:`decay_mask`.
    """
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if params is None and layer_axes is not None:
        raise ValueError("make_optimizer: layer_axes needs params (the tree they describe)")
    mask = (decay_mask(params, cfg.decay_vectors, layer_axes) if params is not None
            else lambda tree: decay_mask(tree, cfg.decay_vectors))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=mask))
    tx = optax.chain(*parts)
    if not cfg.freeze:
        return tx
    if params is None:
        raise ValueError(f"optim.freeze={list(cfg.freeze)} needs the parameters (their paths) to build the optimizer")
    check_patterns(params, cfg.freeze, "optim.freeze")
    labels = jax.tree.map(lambda frozen: "freeze" if frozen else "train", glob_mask(params, cfg.freeze))
    # clipping sees the gradients of the trainable parameters only
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


__all__ = ["OptimizerConfig", "SCHEDULES", "make_schedule", "make_optimizer", "param_paths", "glob_mask",
           "decay_mask", "check_patterns"]
