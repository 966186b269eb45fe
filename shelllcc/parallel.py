"""Device mesh and sharding helpers.

The mesh has axes ``('data', 'fsdp')``. Batches are split over both (FSDP shards the batch as well
as the parameters); parameters are replicated unless a logical-axis rule maps one of their axes
to ``'fsdp'``. Axes are ``AxisType.Auto`` so ``jax.jit`` propagates shardings from the in/out
shardings we give it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
KNOWN_MESH_AXES = ("data", "fsdp", "tensor")   # rules may name any; those a mesh lacks are skipped

# Logical parameter axes -> mesh axes. FSDP: the model dim of every large matrix is split over
# 'fsdp' (gathered per layer by XLA); a 'tensor' axis, when a mesh has one, splits heads and FFN.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh over ``devices`` (default: all); one of ``data`` and ``fsdp`` may be
    ``-1``, meaning every device the other axis leaves."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh data and fsdp may be -1")
    if data == -1 or fsdp == -1:
        other = fsdp if data == -1 else data
        if other < 1 or n % other:
            raise ValueError(f"mesh axis of size {other} does not divide the {n} available devices")
        data, fsdp = (n // other, fsdp) if data == -1 else (data, n // other)
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} available")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every batch axis of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch with its leading dimension split over the batch axes."""
    n = num_batch_shards(mesh)

    def put(x):
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by the {n} batch shards of the mesh")
        return jax.device_put(x, batch_sharding(mesh))

    return jax.tree.map(put, batch)


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> P:
    """Resolve logical axis names to a ``PartitionSpec`` with ``rules`` ((logical, mesh axes) pairs,
    first match wins). A dimension stays replicated when its name has no rule, when the rule's mesh
    axis is absent from this mesh (one rule set serves meshes with and without 'tensor'), when the
    mesh axis is already used by an earlier dimension, or when its size is not divisible by the
    mesh axes' size. A rule naming an axis that no mesh of this project has is an error (a typo)."""
    table: dict[str, Any] = {}
    for logical, mesh_axes in (rules.items() if isinstance(rules, Mapping) else rules):
        table.setdefault(logical, mesh_axes)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in mesh.shape and a not in KNOWN_MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule for {name!r} names mesh axes {unknown}, neither in the mesh "
                             f"{dict(mesh.shape)} nor among the known axes {KNOWN_MESH_AXES}")
        if (not axes or any(a not in mesh.shape for a in axes) or used & set(axes)
                or size % math.prod(mesh.shape[a] for a in axes)):
            spec.append(None)
            continue
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_sharding(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` of a parameter from its logical axis names (replicated when it has none)."""
    names = tuple(names) if names is not None else (None,) * len(shape)
    return NamedSharding(mesh, logical_to_mesh_spec(names, shape, mesh, rules))


def _key_name(k: Any) -> Any:
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def tree_shardings(tree: Any, names: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s) from ``names``, a
    mapping from the leaf's key path (tuple of keys) to its logical axis names; leaves it lacks are
    replicated."""
    def one(path, x):
        key = tuple(_key_name(k) for k in path)
        return param_sharding(names.get(key), x.shape, mesh, rules)
    return jax.tree_util.tree_map_with_path(one, tree)


def follow_param_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of ``params`` (an optax state: Adam's moments are
    params-shaped subtrees): a leaf whose key path ends with a parameter's path and has its shape
    gets that parameter's sharding; every other leaf (step counts, scalars) is replicated."""
    by_path: dict[tuple, tuple] = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)):
        by_path[tuple(_key_name(k) for k in path)] = (tuple(p.shape), s)
    rep = replicated(mesh)

    def one(path, x):
        key = tuple(_key_name(k) for k in path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep
    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(batch: Any, mesh: Mesh) -> Any:
    """Assemble this process's host batch into global arrays split over the batch axes. On one process
    it is :func:`shard_batch`; on several, each process passes its own rows (``make_array_from_process_local_data``)."""
    if jax.process_count() == 1:
        return shard_batch(batch, mesh)
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of ``tree`` at its sharding in ``shardings``, on one process or many.

    Leaves already placed so are kept. With several processes a host value (numpy, or a jax array on
    this process's devices only, e.g. a freshly initialised adapter) becomes a global array through
    ``make_array_from_callback``: every process must hold the same value, as seeded inits do.
    """
    multi = jax.process_count() > 1

    def one(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if not multi or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)
