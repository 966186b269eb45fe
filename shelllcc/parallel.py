"""Device mesh and sharding helpers.

The mesh has axes ``('data', 'fsdp')``. Batches are split over both (FSDP shards the batch as well
as the parameters); parameters are replicated unless a logical-axis rule maps one of their axes
to ``'fsdp'``. Axes are ``AxisType.Auto`` so ``jax.jit`` propagates shardings from the in/out
shardings we give it.

Parameters carry logical axis names (flax's ``out_sharding`` metadata); flax resolves them with the
rules of :func:`sharding_context` (``jax.set_mesh`` + ``nnx.logical_axis_rules``): models built inside
it are born sharded, and :func:`shardings` / :func:`optimizer_shardings` give the ``NamedSharding``s of
their parameters and optimizer states::

    with sharding_context(mesh, DEFAULT_RULES, LOGICAL_AXES):
        model = nnx.eval_shape(make_model)
        param_sh = shardings(variables_dict(nnx.state(model, nnx.Param)), mesh)
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def mesh_platform(mesh: Mesh) -> str:
    """The platform ('gpu', 'tpu', 'cpu') of ``mesh``'s devices: what a step built for the mesh is compiled
    for (a CPU host compiling for a TPU topology has the default backend 'cpu'). An abstract mesh has no
    devices; then the default backend's."""
    devices = getattr(mesh, "devices", None)
    return devices.flat[0].platform if isinstance(devices, np.ndarray) else jax.default_backend()


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, slices: int = 1) -> Mesh:
    """A ``('data', 'fsdp')`` mesh over ``devices`` (default: all); one of ``data`` and ``fsdp`` may be
    ``-1``, meaning every device the other axis leaves.

    ``slices > 1`` (TPU multi-slice): the devices form that many slices (their ``slice_index``) joined by
    the data-centre network; ``data`` and ``fsdp`` size the mesh within one slice (ICI) and the ``data``
    axis also runs across slices, outermost, so only the gradient all-reduce crosses DCN (FSDP's
    per-layer gathers stay on ICI). The mesh's ``data`` axis is ``slices x data``.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if slices > 1:
        return _multi_slice_mesh(data, fsdp, devices, slices)
    data, fsdp = _axis_sizes(data, fsdp, len(devices))
    try:
        return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)
    except NotImplementedError:
        # a TPU torus none of whose axis products is an axis size (fsdp 8 on a 4x4 slice): an axis of
        # the torus is split between data and fsdp
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _axis_sizes(data: int, fsdp: int, n: int) -> tuple[int, int]:
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh data and fsdp may be -1")
    if data == -1 or fsdp == -1:
        other = fsdp if data == -1 else data
        if other < 1 or n % other:
            raise ValueError(f"mesh axis of size {other} does not divide the {n} available devices")
        data, fsdp = (n // other, fsdp) if data == -1 else (data, n // other)
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} available")
    return data, fsdp


def _multi_slice_mesh(data: int, fsdp: int, devices: list, slices: int) -> Mesh:
    from jax.experimental import mesh_utils
    found = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(found) != slices:
        raise ValueError(f"mesh.slices={slices} but the devices belong to {len(found)} slice(s)")
    ici = _axis_sizes(data, fsdp, len(devices) // slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


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


def set_mesh(mesh: Mesh):
    """``jax.set_mesh(mesh)`` (a context manager), or ``jax.sharding.use_mesh`` on a jax without it."""
    fn = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return fn(mesh)


def axis_rules(rules: Sequence[tuple[str, Any]] | Mapping[str, Any], mesh: Mesh,
               logical_axes: Sequence[str] = ()) -> tuple[tuple[str, Any], ...]:
    """``rules`` ((logical, mesh axes) pairs, first match wins) made ready for ``nnx.logical_axis_rules``
    on ``mesh``: a rule whose mesh axes this mesh lacks maps to ``None`` (replicated; one rule set serves
    meshes with and without 'tensor'), and every name of ``logical_axes`` without a rule maps to ``None``
    (flax would otherwise take the logical name for a mesh axis). A rule naming an axis that no mesh of
    this project has is an error naming the rule (a typo)."""
    table: dict[str, Any] = {}
    for logical, target in (rules.items() if isinstance(rules, Mapping) else rules):
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in mesh.shape and a not in KNOWN_MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule ({logical!r}, {target!r}) names mesh axes {unknown}, neither in the "
                             f"mesh {dict(mesh.shape)} nor among the known axes {KNOWN_MESH_AXES}")
        if logical in table:
            continue
        if not axes or any(a not in mesh.shape for a in axes):
            table[logical] = None
        else:
            table[logical] = axes[0] if len(axes) == 1 else axes
    for name in logical_axes:
        table.setdefault(name, None)
    return tuple(table.items())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = DEFAULT_RULES,
                     logical_axes: Sequence[str] = ()):
    """``mesh`` as the current mesh (:func:`set_mesh`) and ``rules`` (see :func:`axis_rules`) as flax's
    logical axis rules: models built inside create their parameters sharded, and :func:`shardings`
    resolves their logical axis names."""
    with set_mesh(mesh), nnx.logical_axis_rules(axis_rules(rules, mesh, logical_axes)):
        yield


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    # What jax cannot place stays replicated: a dimension whose size the mesh axes do not divide
    # (device_put and jit refuse uneven shardings), a mesh axis already used by an earlier dimension,
    # or a name that is no axis of this mesh (a logical name no rule resolved).
    used: set[str] = set()
    out = []
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if (not axes or any(a not in mesh.shape for a in axes) or used & set(axes)
                or size % math.prod(mesh.shape[a] for a in axes)):
            out.append(None)
            continue
        used |= set(axes)
        out.append(entry)
    return P(*out)


def shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every array of ``tree`` (an ``nnx.State``, a module's variables in a dict, an
    optax state initialised from them, ...): flax's ``nnx.get_partition_spec`` resolves the logical axis
    names the ``nnx.Variable``s carry with the rules in context (:func:`sharding_context`); arrays that
    are no ``Variable`` (step counts) are replicated. The result has ``tree``'s structure with each
    ``Variable`` replaced by its value's sharding, i.e. the structure of the pure arrays.
    """
    specs = nnx.get_partition_spec(tree)

    def one(x, spec):
        value = x.get_value() if _is_variable(x) else x
        spec = spec.get_value() if _is_variable(spec) else spec
        shape = getattr(value, "shape", None)
        if shape is None:
            return None
        return NamedSharding(mesh, _fit(spec if spec is not None else P(), shape, mesh))

    return jax.tree.map(one, tree, specs, is_leaf=_is_variable)


def variables_dict(state: Any) -> dict:
    """An ``nnx.State`` as nested dicts with its ``nnx.Variable``s as leaves: the structure of
    ``to_pure_dict()`` (what optimizers and checkpoints see) with the variables' metadata kept."""
    out: dict = {}
    for path, variable in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = variable
    return out


def optimizer_shardings(optimizer: Any, state: Any, mesh: Mesh) -> Any:
    """Shardings of ``optimizer.init(state.to_pure_dict())``: the optimizer is initialised abstractly on
    the parameters as variables, so its params-shaped leaves (Adam's moments) carry the parameters'
    logical names and get their shardings; step counts are replicated. Under :func:`sharding_context`."""
    abstract = jax.eval_shape(optimizer.init, variables_dict(state))
    return shardings(abstract, mesh)


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


def init_per_leaf(make: Callable[[], Any], shardings: Any = None, *, log: Callable[[str], None] | None = None) -> Any:
    """``make()``'s pytree (e.g. a model's parameters built from seeds), each leaf computed by its own jitted
    program and born with its sharding (``shardings``: a matching pytree, one sharding for all, or None for
    the default device).

    Every program traces all of ``make`` and returns one leaf, so XLA drops the rest: the values equal
    ``jax.jit(make)()``'s (the random draws are keyed per parameter, not by order of execution), while at most
    one leaf and its draws exist at a time, on the devices, and none on the host. A one-program init of
    Wan2.1-14B (28 GB of bf16 from float32 draws) did not fit the host's memory. ``log`` gets a progress line
    every few seconds.
    """
    abstract = jax.eval_shape(make)
    leaves, treedef = jax.tree.flatten(abstract)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        per_leaf = [shardings] * len(leaves)
    else:
        per_leaf = treedef.flatten_up_to(shardings)
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    out, done, t0, last = [], 0, time.perf_counter(), time.perf_counter()
    for i, (leaf, sharding) in enumerate(zip(leaves, per_leaf)):
        program = jax.jit(lambda i=i: jax.tree.leaves(make())[i], out_shardings=sharding)
        out.append(jax.block_until_ready(program()))
        done += leaf.size * leaf.dtype.itemsize
        if log is not None and (time.perf_counter() - last > 5.0 or i == len(leaves) - 1):
            last = time.perf_counter()
            log(f"init: {i + 1}/{len(leaves)} parameters, {done / 2**30:.1f} of {total / 2**30:.1f} GiB "
                f"({last - t0:.0f}s)")
    return jax.tree.unflatten(treedef, out)
