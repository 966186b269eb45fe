"""Training-data readers: TFDS ``array_record`` datasets read through grain, without TensorFlow.

The pipeline is::

    source = open_split("my_dataset", "train", data_dir=...)        # random access, no TF
    ds = make_dataset(source, batch_size=8, seed=0)                  # grain IterDataset
    it = iter(ds)                                                    # grain DatasetIterator
    for batch in prefetch_to_device(it, sharding=batch_sharding(mesh)):
        ...

Why grain rather than ``tfds.as_dataset``: ``as_dataset`` builds a ``tf.data`` pipeline and so
imports TensorFlow (hundreds of MB, its own thread pools, fights JAX for the accelerator); TFDS's
``data_source`` API reads ``array_record`` files directly and grain gives a deterministic,
checkpointable pipeline on top of any random-access source.

Batch format: a dict of numpy arrays with a leading batch dimension. Numeric / bool features are
``np.stack``-ed. Text / bytes features (TFDS ``Text`` decodes to Python ``bytes`` in the data-source
API) become 1-D numpy **object** arrays of the original ``bytes``/``str`` values. Object arrays are
chosen over fixed-width ``S``/``U`` arrays because those pad to the longest element and silently
strip trailing NUL bytes, and over lists because object arrays index/slice like the other fields
(e.g. ``batch["caption"][mask]``). ``prefetch_to_device`` leaves them on the host.

Checkpointing: the iterator returned by ``iter(make_dataset(...))`` is a ``grain.DatasetIterator``;
``get_state()`` returns a JSON-able dict (see ``iterator_state_to_json``) and ``set_state`` restores
it exactly. For an orbax ``CheckpointManager`` use grain's own handler (needs orbax, which we have)::

    import grain, orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

(it writes one ``process_<i>-of-<n>.json`` per process), or store ``iterator_state_to_json(it)``
yourself with ``ocp.args.JsonSave`` / ``JsonRestore``. If batches are consumed through
``prefetch_to_device``, save the *prefetcher's* state (``DevicePrefetcher.get_state``), not the
underlying iterator's: the latter has already run ``size`` batches ahead.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

# Threads that read + transform examples ahead of the consumer. Array-record reads release the
# GIL, so threads (not processes) are enough for decoding small/medium records; heavy Python
# transforms would want grain's ``mp_prefetch`` instead.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=64)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------

def open_split(name_or_builder_dir: str, split: str, data_dir: str | None = None):
    """Open one split of a prepared TFDS dataset as a random-access source (no TensorFlow).

    ``name_or_builder_dir`` is either a registered/prepared dataset name (``"name"``,
    ``"name:1.0.0"`` or ``"name/config:1.0.0"``, found under ``data_dir``) or the path of a
    builder directory (the one holding ``dataset_info.json``), which is what you get from a
    dataset prepared by code that is not importable here.

    The dataset must have been prepared with ``file_format='array_record'``; TFRecord files are
    not random-access and would need ``tf.data``. Raises ``FileNotFoundError`` naming the dataset,
    split and directory when any of them is missing.
    """
    # Imported here so that importing this module stays cheap for code that only uses make_dataset.
    import tensorflow_datasets as tfds

    is_dir = os.path.isdir(name_or_builder_dir) and os.path.exists(
        os.path.join(name_or_builder_dir, "dataset_info.json"))
    where = name_or_builder_dir if is_dir else (data_dir or "<default TFDS data_dir>")
    try:
        if is_dir:
            builder = tfds.builder_from_directory(name_or_builder_dir)
        else:
            builder = tfds.builder(name_or_builder_dir, data_dir=data_dir)
            if not builder.is_prepared():
                raise FileNotFoundError("dataset is not prepared there")
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, FileNotFoundError...)
        raise FileNotFoundError(
            f"cannot open TFDS dataset {name_or_builder_dir!r} (split {split!r}) in {where!r}: {e}"
        ) from e

    available = list(builder.info.splits.keys())
    # Split slicing ("train[:10%]") is legal; check only the base split name.
    base_split = split.split("[", 1)[0].split("+", 1)[0]
    if base_split not in available:
        raise FileNotFoundError(
            f"TFDS dataset {builder.info.full_name!r} in {where!r} has no split {split!r}; "
            f"available splits: {available}")
    try:
        return builder.as_data_source(split)
    except Exception as e:  # e.g. prepared as tfrecord: no random access without TF
        raise FileNotFoundError(
            f"cannot read split {split!r} of TFDS dataset {builder.info.full_name!r} in {where!r} "
            f"as a random-access source (was it prepared with file_format='array_record'?): {e}"
        ) from e


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------

def _is_text(x: Any) -> bool:
    return isinstance(x, (bytes, str)) or (
        isinstance(x, np.ndarray) and x.dtype.kind in ("S", "U", "O"))


def _stack_leaf(values: Sequence[Any]) -> np.ndarray:
    if all(isinstance(v, (bytes, str)) for v in values):
        # np.array(list_of_bytes) would give a fixed-width 'S' array (padding, NUL stripping);
        # fill an object array element by element to keep the values exactly.
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out
    if any(_is_text(v) for v in values):
        return np.stack([np.asarray(v, dtype=object) for v in values])
    return np.stack([np.asarray(v) for v in values])


def stack_examples(examples: Sequence[Any]) -> Any:
    """Batch a list of examples (nested dicts/lists of arrays and scalars) into stacked arrays.

    Numeric leaves are ``np.stack``-ed; bytes/str leaves become object arrays (see module doc).
    """
    return jax.tree.map(lambda *leaves: _stack_leaf(leaves), *examples,
                        is_leaf=lambda x: isinstance(x, (bytes, str)))


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

class ShardView:
    """``source[index::count]`` as a random-access sequence; indices wrap modulo its length.

    The wrap makes "position ``epoch * len + i``" (what grain's shuffle/repeat ask for) mean
    "element ``i`` of this shard" whatever the grain version.
    """

    def __init__(self, source: Any, index: int, count: int):
        self._source = source
        self._index = index
        self._count = count
        self._len = len(range(index, len(source), count))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Any:
        return self._source[self._index + (int(i) % self._len) * self._count]

    def _getitems(self, indices: Sequence[int]) -> list:
        # grain hands a whole batch's indices to sources that define ``_getitems``; TFDS sources
        # spell it ``__getitems__`` (array_record then reads the records in parallel).
        keys = [self._index + (int(i) % self._len) * self._count for i in indices]
        many = getattr(self._source, "__getitems__", None)
        return list(many(keys)) if many is not None else [self._source[k] for k in keys]

    def __repr__(self) -> str:
        return f"ShardView({self._source!r}, {self._index}::{self._count})"


def make_dataset(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """A deterministic, sharded, shuffled, repeated, batched grain pipeline over ``source``.

    Args:
      source: anything random-access with ``__len__``/``__getitem__`` (a TFDS data source from
        ``open_split``, a list, ...).
      batch_size: per-process batch size.
      seed: shuffle seed. The same seed gives the same order; each epoch uses a different
        permutation (grain derives the epoch's seed from ``seed + epoch``).
      shuffle: shuffle examples (off for evaluation).
      num_epochs: ``None`` repeats forever; otherwise stop after that many passes.
      drop_remainder: drop a final partial batch. With repetition the stream is continuous, so
        only the very end of the last epoch can be partial; batches may span an epoch boundary.
      process_index, process_count: this process reads ``source[process_index::process_count]``
        (default ``jax.process_index()`` / ``jax.process_count()``), so processes see disjoint
        examples. With ``len(source)`` not divisible by ``process_count`` shards differ by one
        example; with finite ``num_epochs`` processes may then get a different number of batches,
        so multi-host training should repeat forever and stop by step count.
      transform: optional per-example function (numpy in, numpy out), run in grain's reader
        threads before batching.
      read_options: grain thread/prefetch settings (``DEFAULT_READ_OPTIONS`` if ``None``).

    Returns:
      A ``grain.IterDataset``; ``iter(ds)`` gives a checkpointable ``grain.DatasetIterator``
      yielding dicts of numpy arrays with a leading ``batch_size`` dimension.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")

    # Shard before shuffling: every process then shuffles only its own slice, and the shards are
    # disjoint by construction whatever the seed. A strided slice (not contiguous blocks) keeps
    # shards balanced to within one example. We slice with our own view rather than grain's
    # ``MapDataset.slice`` because how that maps indices past the end (which shuffle + repeat
    # produce) has changed across grain 0.2.x releases; with uneven shards the wrong mapping reads
    # another process's examples from the second epoch on.
    shard = ShardView(source, process_index, process_count)
    if len(shard) == 0:
        raise ValueError(f"process {process_index}/{process_count} has no examples "
                         f"(source has {len(source)})")
    ds = grain.MapDataset.source(shard)
    if shuffle:
        # Shuffle the finite per-epoch dataset and repeat *after*: grain's shuffle maps index
        # ``epoch * n + i`` through a permutation seeded by ``seed + epoch``, so each epoch is a
        # fresh permutation while the whole stream stays a pure function of (seed, position) —
        # which is what makes the iterator state a tiny position counter.
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack_examples)
    return ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


class _Positions:
    """``range(n)`` as a random-access source: grain's pipeline over it yields the indices it would read."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> int:
        return int(i)


class InMemoryBatches:
    """The batches of :func:`make_dataset` over ``source`` in the same order, gathered from arrays in memory.

    Every example of this process's shard is read and ``transform``-ed once, then stacked per field;
    grain's pipeline runs over the example *indices* only (``_Positions``), so the order, the epochs, the
    sharding and ``get_state``/``set_state`` are exactly those of ``make_dataset(source, ...)`` with the
    same arguments: a run can switch between the two and resume from the other's state. Why: a grain
    pipeline that decodes and transforms every example in Python threads delivers a few thousand
    examples a second, which starves an accelerator training a small model (25 steps/s at batch 128 on
    an H200, ``benchmarks/RESULTS.md``); gathering from arrays is a numpy ``take``.

    Memory: the shard's transformed examples (``nbytes``), printed when loaded.
    """

    def __init__(self, source: Any, *, batch_size: int, seed: int, transform: Callable[[Any], Any] | None = None,
                 process_index: int | None = None, process_count: int | None = None, name: str = "",
                 read_batch: int = 256):
        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
        # the index pipeline checks batch_size and the process arguments, and fails on an empty shard
        self._indices = iter(make_dataset(_Positions(len(source)), batch_size=batch_size, seed=seed,
                                          process_index=process_index, process_count=process_count,
                                          read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)))
        shard = ShardView(source, process_index, process_count)
        self._first, self._stride = process_index, process_count
        t0 = time.perf_counter()
        chunks = []
        for lo in range(0, len(shard), read_batch):
            examples = shard._getitems(range(lo, min(lo + read_batch, len(shard))))
            if transform is not None:
                examples = [transform(e) for e in examples]
            chunks.append(stack_examples(examples))
        self._arrays = jax.tree.map(lambda *c: np.concatenate(c), *chunks)
        self.nbytes = sum(a.nbytes for a in jax.tree.leaves(self._arrays))
        print(f"[in_memory] {name or type(source).__name__}: {len(shard)} examples of process "
              f"{process_index}/{process_count} in memory ({self.nbytes / 2**20:.1f} MiB, read in "
              f"{time.perf_counter() - t0:.1f}s)", flush=True)

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        local = (np.asarray(next(self._indices), np.int64) - self._first) // self._stride
        return jax.tree.map(lambda a: np.take(a, local, axis=0), self._arrays)

    def get_state(self) -> dict:
        return self._indices.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._indices.set_state(state)


# --------------------------------------------------------------------------------------------------
# Iterator state
# --------------------------------------------------------------------------------------------------

def iterator_state_to_json(iterator: Any) -> str:
    """The iterator's ``get_state()`` as a JSON string (for ``ocp.args.JsonSave`` or a file)."""
    return json.dumps(iterator.get_state())


def restore_iterator_state(iterator: Any, state: str | bytes | Mapping[str, Any]) -> Any:
    """``iterator.set_state`` from a dict or its JSON text; returns the iterator for chaining.

    Grain only guarantees that a state restores on the same grain version and the same pipeline
    (source length, sharding, batch size, transforms); restoring into a different pipeline may
    silently produce a different stream.
    """
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    iterator.set_state(dict(state))
    return iterator


# --------------------------------------------------------------------------------------------------
# Device prefetch
# --------------------------------------------------------------------------------------------------

def _is_numeric(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind in "biufc"


class DevicePrefetcher:
    """Iterator that runs ``iterator`` ``size`` batches ahead in a thread and puts them on device.

    Numeric numpy leaves are transferred (``jax.device_put``, or with a ``sharding`` assembled
    into a global array from this process's batch via ``jax.make_array_from_process_local_data``,
    so the same code works on one host and many); other leaves (text, object arrays) stay on the
    host. The transfer happens in the thread so it overlaps the training step.

    ``get_state()`` returns the wrapped iterator's state as of the last batch *yielded to the
    caller*, not as of the last batch read ahead, so checkpoints taken while prefetching resume
    exactly after the last consumed batch. (Restore by calling ``set_state`` on a fresh grain
    iterator and wrapping it again.)
    """

    _END = object()

    def __init__(self, iterator: Iterator[Any], size: int = 2, sharding: Any = None):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator = iterator
        self._sharding = sharding
        self._has_state = hasattr(iterator, "get_state")
        self._state = iterator.get_state() if self._has_state else None
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="device_prefetch", daemon=True)
        self._thread.start()

    def _to_device(self, x: Any) -> Any:
        if not _is_numeric(x):
            return x
        if self._sharding is None:
            return jax.device_put(x)
        return jax.make_array_from_process_local_data(self._sharding, x)

    def _put(self, item: Any) -> bool:
        # Poll so that close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._iterator:
                if self._stop.is_set():
                    return
                # Snapshot the state right after this batch so it travels with the batch.
                state = self._iterator.get_state() if self._has_state else None
                item = (jax.tree.map(self._to_device, batch), state)
                if not self._put(item):
                    return
            self._put((self._END, None))
        except BaseException as e:  # re-raised in the consumer thread
            self._put((e, None))

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, state = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._state = state
        return item

    def get_state(self) -> Any:
        """State of the wrapped iterator just after the last batch returned by ``__next__``."""
        if not self._has_state:
            raise TypeError(f"{type(self._iterator).__name__} has no get_state()")
        return self._state

    def close(self) -> None:
        """Stop the background thread (it finishes the batch it is on)."""
        self._stop.set()
        self._thread.join(timeout=5)


def prefetch_to_device(iterator: Iterator[Any], size: int = 2, sharding: Any = None
                       ) -> DevicePrefetcher:
    """Wrap ``iterator`` so batches arrive as jax arrays, ``size`` batches ahead (see
    ``DevicePrefetcher``). ``sharding`` is e.g. ``shelllcc.parallel.batch_sharding(mesh)``; the
    per-process batch must then divide evenly over this process's share of the batch axes."""
    return DevicePrefetcher(iterator, size=size, sharding=sharding)
