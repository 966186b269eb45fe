"""Time of the DiT's random init on the host CPU (one jitted program) vs on the accelerator.

    python benchmarks/init_probe.py [--preset wan2.1-t2v-1.3b] [--device-too] [--out-jsonl PATH]

Prints lower / compile / run seconds for each and appends one record per backend; ``--device-too`` also
compiles the init for the default backend (slow on GPU for 1.3B: this is why
``experiments/dit_setup.build_model`` draws on the host).
"""

import argparse
import time

import harness  # first: puts the repository root on sys.path
import jax
from flax import nnx

from shelllcc.models.wan_transformer import WanTransformer, get_config


def timed(name, init, device) -> dict:
    with jax.default_device(device):
        t = time.time()
        low = jax.jit(init).lower()
        out = {"lower_s": time.time() - t}
        print(f"{name}: lower {out['lower_s']:.1f}s", flush=True)
        t = time.time()
        compiled = low.compile()
        out["compile_s"] = time.time() - t
        print(f"{name}: compile {out['compile_s']:.1f}s", flush=True)
        out["run_s"] = harness.timed(compiled, 1)[0] / 1e3
        print(f"{name}: run {out['run_s']:.1f}s", flush=True)
    return {k: round(v, 1) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--device-too", action="store_true")
    harness.add_output_args(ap, out_dir=False)
    args = ap.parse_args()
    bench = harness.Bench("init_probe", args.out_jsonl)
    cfg = get_config(args.preset, dtype="bfloat16", param_dtype="float32")

    def init():
        return nnx.state(WanTransformer(cfg, rngs=nnx.Rngs(0))).to_pure_dict()

    devices = [("host cpu", jax.local_devices(backend="cpu")[0])]
    if args.device_too:
        devices.append((jax.devices()[0].platform, jax.devices()[0]))
    for name, device in devices:
        bench.record(device=harness.host_device() if device.platform == "cpu" else device.device_kind,
                     preset=args.preset, backend=device.platform, **timed(name, init, device),
                     jax_version=jax.__version__)


if __name__ == "__main__":
    main()
