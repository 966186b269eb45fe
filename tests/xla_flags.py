"""XLA flags of the test suite's processes (imports no JAX: tests/conftest.py sets them before JAX starts).

Most of the suite's time is XLA:CPU compiling small programs that then run for milliseconds, so the suite
compiles with LLVM at -O0 and without its expensive passes: 26% less CPU than the embedded pipeline's
-O1 (``experiments.main.FAST_CPU_COMPILE``) on test_wan_transformer.py + test_lora.py, 2-core machine.
Floating-point semantics are unchanged (no fast-math), so the tolerances hold.

``--xla_cpu_use_fusion_emitters=false`` emits fused loops with XLA's older elemental emitter instead of the
MLIR fusion emitters, whose lowering pipeline costs more compile time than the tiny programs run: with it,
test_lora.py + test_flow_methods.py took 47 s against 66 s, test_pisces.py + test_wan_vae.py 67 s against
108 s (fresh compilation cache each, 2-core machine, 2026-12-02; the same tests pass).
"""

SUITE_CPU_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                     "--xla_cpu_use_fusion_emitters=false")


def subprocess_xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a process a test starts: ``devices`` host CPU devices, the suite's compile flags."""
    return f"--xla_force_host_platform_device_count={devices} {SUITE_CPU_COMPILE}"
