"""Time of the DiT's random init on the host CPU (one jitted program) vs on the accelerator.

    python benchmarks/init_probe.py [--preset wan2.1-t2v-1.3b] [--device-too]

Prints lower / compile / run seconds for each; ``--device-too`` also compiles the init for the default
backend (slow on GPU for 1.3B: this is why ``experiments/dit_setup.build_model`` draws on the host).
"""

import argparse
import time

import jax
from flax import nnx

from shelllcc.models.wan_transformer import WanTransformer, get_config


def timed(name, init, device):
    with jax.default_device(device):
        t = time.time()
        low = jax.jit(init).lower()
        print(f"{name}: lower {time.time() - t:.1f}s", flush=True)
        t = time.time()
        compiled = low.compile()
        print(f"{name}: compile {time.time() - t:.1f}s", flush=True)
        t = time.time()
        jax.block_until_ready(compiled())
        print(f"{name}: run {time.time() - t:.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--device-too", action="store_true")
    args = ap.parse_args()
    cfg = get_config(args.preset, dtype="bfloat16", param_dtype="float32")

    def init():
        return nnx.state(WanTransformer(cfg, rngs=nnx.Rngs(0))).to_pure_dict()

    timed("host cpu", init, jax.local_devices(backend="cpu")[0])
    if args.device_too:
        timed(jax.devices()[0].platform, init, jax.devices()[0])


if __name__ == "__main__":
    main()
