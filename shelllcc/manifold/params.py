"""Manifold parameters: a pytree of anchors, coder MLP, BatchNorm statistics and shell head.

Shapes (K anchors, D patch dimension, H hidden width):

    anchors [K, D]   scale []   shift [D]
    coder:  w0 [D, H] b0 [H]  bn_scale [H] bn_bias [H]  w1 [H, H] b1 [H]  w2 [H, K] b2 [K]
    bn:     mean [H] var [H] count []        (running statistics, PyTorch BatchNorm1d convention)
    shell:  w0 [D, H] b0 [H]  w1 [H, D] b1 [D]

Weights are stored ``[in, out]`` (the transpose of ``torch.nn.Linear.weight``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class CoderParams:
    """Coder MLP ``f: D -> H -> H -> K`` (Linear, BatchNorm, ReLU, Linear, ReLU, Linear)."""

    w0: jax.Array
    b0: jax.Array
    bn_scale: jax.Array
    bn_bias: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


@struct.dataclass
class BatchNormStats:
    """Running statistics of the coder's BatchNorm; updated by stage 1, not by the optimizer."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


@struct.dataclass
class ShellParams:
    """Shell head ``g: D -> H -> D`` (Linear, ReLU, Linear) giving a per-dimension log-variance."""

    w0: jax.Array
    b0: jax.Array
    w1: jax.Array
    b1: jax.Array


@struct.dataclass
class ManifoldParams:
    anchors: jax.Array
    scale: jax.Array
    shift: jax.Array
    coder: CoderParams
    bn: BatchNormStats
    shell: ShellParams

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def dim(self) -> int:
        return self.anchors.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.coder.w0.shape[1]


@dataclasses.dataclass(frozen=True)
class ManifoldConfig:
    """Static description of a manifold; saved next to its parameters.

    ``patch_size`` is the (pt, ph, pw) block of latent positions flattened into one patch, so
    ``dim == latent_channels * pt * ph * pw``.
    """

    dim: int
    num_anchors: int
    hidden_dim: int
    patch_size: tuple[int, int, int] = (1, 1, 1)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    shell_eps: float = 1e-6

    def __post_init__(self):
        for name in ("dim", "num_anchors", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ManifoldConfig.{name} must be a positive int, got {value!r}")
        patch = tuple(int(p) for p in self.patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"ManifoldConfig.patch_size must be three positive ints, got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", patch)
        if self.dim % math.prod(patch):
            raise ValueError(
                f"ManifoldConfig.dim={self.dim} is not divisible by the patch volume {math.prod(patch)} "
                f"of patch_size={patch}")

    @property
    def latent_channels(self) -> int:
        return self.dim // math.prod(self.patch_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ManifoldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ManifoldConfig keys {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


def _linear(key: jax.Array, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
    # PyTorch's nn.Linear default, so freshly initialised manifolds behave like the reference's.
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    w = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
    b = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
    return w, b


def init_params(key: jax.Array, config: ManifoldConfig, anchors: jax.Array) -> ManifoldParams:
    """Fresh parameters around given anchors ``[K, D]`` (see ``manifold.init`` for choosing them)."""
    k_, d_, h_ = config.num_anchors, config.dim, config.hidden_dim
    anchors = jnp.asarray(anchors, jnp.float32)
    if anchors.shape != (k_, d_):
        raise ValueError(f"anchors have shape {anchors.shape}, config expects [num_anchors={k_}, dim={d_}]")
    keys = jax.random.split(key, 5)
    w0, b0 = _linear(keys[0], d_, h_)
    w1, b1 = _linear(keys[1], h_, h_)
    w2, b2 = _linear(keys[2], h_, k_)
    sw0, sb0 = _linear(keys[3], d_, h_)
    sw1, sb1 = _linear(keys[4], h_, d_)
    return ManifoldParams(
        anchors=anchors,
        scale=jnp.ones((), jnp.float32),
        shift=jnp.zeros((d_,), jnp.float32),
        coder=CoderParams(w0=w0, b0=b0, bn_scale=jnp.ones((h_,), jnp.float32),
                          bn_bias=jnp.zeros((h_,), jnp.float32), w1=w1, b1=b1, w2=w2, b2=b2),
        bn=BatchNormStats(mean=jnp.zeros((h_,), jnp.float32), var=jnp.ones((h_,), jnp.float32),
                          count=jnp.zeros((), jnp.int32)),
        shell=ShellParams(w0=sw0, b0=sb0, w1=sw1 * 0.01, b1=jnp.zeros((d_,), jnp.float32)),
    )


def expected_shapes(config: ManifoldConfig) -> dict[str, Sequence[int]]:
    """Leaf path -> shape, for validating parameters that come from outside (checkpoints)."""
    k_, d_, h_ = config.num_anchors, config.dim, config.hidden_dim
    return {
        "anchors": (k_, d_), "scale": (), "shift": (d_,),
        "coder.w0": (d_, h_), "coder.b0": (h_,), "coder.bn_scale": (h_,), "coder.bn_bias": (h_,),
        "coder.w1": (h_, h_), "coder.b1": (h_,), "coder.w2": (h_, k_), "coder.b2": (k_,),
        "bn.mean": (h_,), "bn.var": (h_,), "bn.count": (),
        "shell.w0": (d_, h_), "shell.b0": (h_,), "shell.w1": (h_, d_), "shell.b1": (d_,),
    }


def check_params(params: ManifoldParams, config: ManifoldConfig) -> None:
    """Raise ``ValueError`` naming every leaf whose shape disagrees with ``config``."""
    bad = []
    for path, shape in expected_shapes(config).items():
        leaf = params
        for part in path.split("."):
            leaf = getattr(leaf, part)
        if tuple(leaf.shape) != tuple(shape):
            bad.append(f"{path}: has {tuple(leaf.shape)}, config implies {tuple(shape)}")
    if bad:
        raise ValueError("manifold parameters disagree with their config "
                         f"(dim={config.dim}, num_anchors={config.num_anchors}, "
                         f"hidden_dim={config.hidden_dim}): " + "; ".join(bad))
