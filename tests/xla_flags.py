"""XLA flags of the test suite's processes (imports no JAX: tests/conftest.py sets them before JAX starts).

Most of the suite's time is XLA:CPU compiling small programs that then run for milliseconds, so the suite
compiles with LLVM at -O0 and without its expensive passes: 26% less CPU than the embedded pipeline's
-O1 (``experiments.main.FAST_CPU_COMPILE``) on test_wan_transformer.py + test_lora.py, 2-core machine.
Floating-point semantics are unchanged (no fast-math), so the tolerances hold.
"""

SUITE_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a process a test starts: ``devices`` host CPU devices, the suite's compile flags."""
    return f"--xla_force_host_platform_device_count={devices} {SUITE_CPU_COMPILE}"
