"""Which kernels the train step compiles to on this machine's devices: the DiT's attention and the reward.

    python benchmarks/platform_kernels.py [--config configs/wan21_reward.py:1.3b-lora] [--latent 5,30,52,16]

Builds the experiment's own step for the local devices (``experiments.dit_setup.abstract_step``, as
``tpu_aot.py`` does for a TPU topology), compiles it and counts the custom calls in the compiled program:
cuDNN's fused attention (``__cudnn$fmha...``) and Triton kernels (the reward's Pallas GPU kernel). Prints
what ``attention_impl`` and the reward's ``kernel="auto"`` resolve to for the mesh's platform and whether
the compiled program holds those kernels. Its purpose: a GPU run confirms that threading the target platform
through (for TPU compiles) left the GPU's choices as they were. Appends one record to
``benchmarks/results.jsonl`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import re
import sys

import harness
import tpu_aot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/wan21_reward.py:1.3b-lora")
    p.add_argument("--latent", default="5,30,52,16", help="one example's latent T,H,W,C (small: compiles fast)")
    p.add_argument("--text", default="512,4096")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    import jax

    from experiments import dit_setup
    from shelllcc import parallel
    from shelllcc.rewards.fused_values import resolve_kernel

    config = tpu_aot.load_config(args.config)
    config.reward.manifold = "random"
    config.data.batch_size, config.train.microbatch_size = len(jax.devices()), 1
    latent = tuple(int(x) for x in args.latent.split(","))
    text = tuple(int(x) for x in args.text.split(","))
    devices = jax.devices()
    built, compiled, times = tpu_aot.compile_abstract(config, devices, latent, text)
    platform = parallel.mesh_platform(built.mesh)
    hlo = compiled.as_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
    cudnn = sum("cudnn" in c and "fmha" in c for c in calls)
    triton = sum("triton" in c.lower() for c in calls)
    row = dict(platform=platform, device=devices[0].device_kind, config=args.config, latent=list(latent),
               attention_impl_config=config.model.attention_impl,
               attention_impl_resolved=dit_setup.attention_impl(config.model, platform),
               reward_kernel_config=config.reward.get("kernel", "auto"),
               reward_kernel_resolved=resolve_kernel(config.reward.get("kernel", "auto"),
                                                     config.reward.get("coder", "amortized"), platform),
               cudnn_fmha_calls=cudnn, triton_calls=triton, custom_call_targets=sorted(set(calls)),
               compile_s=round(times["compile_s"], 1), jax=jax.__version__)
    for k, v in row.items():
        print(f"{k}: {v}", flush=True)
    if not args.no_record:
        harness.Bench("platform_kernels", argv=argv).record(**row)
    ok = platform != "gpu" or (row["attention_impl_resolved"] == "cudnn" and cudnn > 0
                               and (row["reward_kernel_resolved"] != "pallas" or triton > 0))
    print("GPU kernels as before: cuDNN attention and the Pallas reward" if ok and platform == "gpu"
          else ("not a GPU: nothing to confirm" if platform != "gpu" else "MISMATCH"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
