"""Test setup: 8 host-platform devices for the sharding tests (must precede the first jax import), and a
persistent JAX compilation cache shared by every test and every subprocess a test starts."""

import gc
import importlib.util
import os
import tempfile

import pytest

# libtpu (test requirements: tests/test_tpu_aot.py) takes a lock file when it loads; processes of the suite
# load it side by side and only compile for TPU, so none needs it exclusively
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# With libtpu installed and no TPU, JAX probes for one at start and prints a dozen stderr lines (in every
# subprocess too, breaking the one-line error checks). The suite runs on the CPU and the TPU topology
# compiles do not need a TPU backend, so where no GPU plugin is installed JAX starts the CPU alone.
if importlib.util.find_spec("libtpu") is not None and not os.path.exists("/dev/accel0") and not any(
        importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.xla_flags import SUITE_CPU_COMPILE  # noqa: E402  (imports no JAX)

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# the suite's compile flags (tests/xla_flags.py); the subprocesses the tests start inherit them
if "xla_backend_optimization_level" not in flags:
    flags += " " + SUITE_CPU_COMPILE
os.environ["XLA_FLAGS"] = flags.strip()

# Programs that take at least this long to compile are written to the cache. Most of the suite's time is
# compilation of small programs (tiny models, a few steps), many of them compiled again by later tests or
# by the subprocesses of the end-to-end tests; below ~0.1 s reading an entry saves little.
CACHE_MIN_COMPILE_SECS = 0.1


def _compilation_cache_dir(config) -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` if set, else a folder of the pytest cache (``.pytest_cache``) or, with
    the cache provider off, of the temp dir; keyed by the jax and jaxlib versions."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    import jax
    import jaxlib

    name = f"jax-compilation-cache-{jax.__version__}-jaxlib-{jaxlib.__version__}"
    cache = getattr(config, "cache", None)
    if cache is not None:
        return str(cache.mkdir(name))
    path = os.path.join(tempfile.gettempdir(), f"shelllcc-{name}")
    os.makedirs(path, exist_ok=True)
    return path


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False      # keep HEAVY_FIRST's order (pytest-xdist >= 3.6 reorders)
    path = _compilation_cache_dir(config)
    # pytest-xdist (README: `-n 2`): a folder per worker, shared by that worker's tests and subprocesses.
    # JAX writes cache entries without a lock when the cache has no size limit, so a process could read
    # another worker's half-written entry (a warning on stderr, then a compile of its own).
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        path = os.path.join(path, worker)
        os.makedirs(path, exist_ok=True)
    # the environment for the subprocesses the tests start (python -m experiments.main ...), the config
    # update for this process (jax may already be imported by a plugin)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(CACHE_MIN_COMPILE_SECS)
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)


# The longest files (their summed test times, 70-420 s each, `--durations`, 2-core machine, 2026-12-02), run
# first. `-n 2 --dist loadfile` hands out whole files in collection order; xdist's own reorder (most tests first)
# put the pipeline miniature, few tests but ~7 minutes, near the end, where one worker ran it alone for minutes.
HEAVY_FIRST = ("test_embedded_pipeline.py", "test_train_experiments.py", "test_embeddings.py", "test_pisces.py",
               "test_train_energy_judge.py", "test_train_embeddings.py", "test_grpo_experiment.py",
               "test_bad_inputs.py", "test_classifier.py", "test_stage_markers.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_file():
    """JAX keeps every program it compiled (and Python keeps cycles) until asked: after each test file,
    drop them. A worker of `-n 2` runs about half the files in one process and otherwise grows to several
    GB; this keeps each smaller (~10% on 4 files measured) at no measured CPU cost; programs another file
    compiles again come from the persistent cache when they took >= CACHE_MIN_COMPILE_SECS."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
