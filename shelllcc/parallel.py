"""Device mesh and sharding helpers.

The mesh has axes ``('data', 'fsdp')``. Batches are split over both (FSDP shards the batch as well
as the parameters); parameters are replicated unless a logical-axis rule maps one of their axes
to ``'fsdp'``. Axes are ``AxisType.Auto`` so ``jax.jit`` propagates shardings from the in/out
shardings we give it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp')`` mesh; ``data=-1`` takes every device not used by ``fsdp``."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} available devices")
        data = n // fsdp
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
