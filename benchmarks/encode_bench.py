"""VAE encode throughput (clips/s) for the latent cache: the jitted encoder alone and end to end.

    python benchmarks/encode_bench.py --preset tiny --frames 17 --size 64 --batch-size 4 --clips 32
    python benchmarks/encode_bench.py --preset wan2.1 --frames 81 --height 480 --width 832 --dtype bfloat16

Two numbers per run:

* ``clips_per_s``: the jitted ``latent_cache.vae_video_encoder`` on random uint8 batches already in host
  memory (uint8 -> [-1, 1] -> ``vae.encode``), after one warm-up call (its time, compile included, is
  ``compile_s``). This is the ceiling for caching a dataset with this VAE on this device.
* ``cache_clips_per_s`` (unless ``--no-cache``): ``latent_cache.encode_to_cache`` over the same number
  of in-memory clips into a temporary directory, with a trivial text encoder: adds serialisation,
  ArrayRecord writes, hashing and the shard bookkeeping. Includes its own compile for the batch shape
  only if it differs (it does not: the same jitted function is reused).

Weights are random (drawn leaf by leaf from the abstract module: eager NNX init of the VAE is slow on
CPU, and the timing does not depend on the values). Prints one JSON line and appends it to
``--out-jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import harness


def random_vae(preset: str, dtype, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from shelllcc.models.wan_vae import WanVAE, WanVAEConfig

    abstract = nnx.eval_shape(lambda: WanVAE(WanVAEConfig.preset(preset), dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    # numpy draws, not jax.random: one jax.random call per leaf shape compiles a program each (~30 s).
    def draw(leaf):
        if len(leaf.shape) >= 2:  # fan-in scaled kernels keep activations O(1)
            values = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            values = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(values.astype(np.float32)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="WanVAEConfig preset: tiny or wan2.1")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64, help="height = width (unless given separately)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clips", type=int, default=32, help="clips timed (rounded up to whole batches)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-cache", action="store_true", help="skip the end-to-end encode_to_cache timing")
    harness.add_output_args(p, out_dir=False)
    args = p.parse_args(argv)
    bench = harness.Bench("encode_bench", args.out_jsonl, argv=argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from shelllcc.data import latent_cache

    h, w = args.height or args.size, args.width or args.size
    dtype = getattr(jnp, args.dtype)
    t0 = time.perf_counter()
    vae = random_vae(args.preset, dtype)
    jax.block_until_ready(jax.tree.leaves(nnx.state(vae)))
    init_s = time.perf_counter() - t0
    encode = latent_cache.vae_video_encoder(vae)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (args.batch_size, args.frames, h, w, 3), dtype=np.uint8)

    t0 = time.perf_counter()
    latents = np.asarray(encode(video))
    compile_s = time.perf_counter() - t0
    steps = max(1, -(-args.clips // args.batch_size))
    # np.asarray waits for the result and copies it to the host, as the cache writer does.
    encode_s = sum(harness.timed(lambda: np.asarray(encode(video)), steps, sync=lambda _: None)) / 1e3
    clips = steps * args.batch_size

    result = {
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
        "preset": args.preset, "dtype": args.dtype, "frames": args.frames, "height": h, "width": w,
        "batch_size": args.batch_size, "clips": clips, "latent_shape": list(latents.shape[1:]),
        "clips_per_s": clips / encode_s, "ms_per_batch": 1000 * encode_s / steps,
        "compile_s": compile_s, "init_s": init_s, "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__},
    }

    if not args.no_cache:
        source = [{"video": video[i % args.batch_size], "caption": f"clip {i}", "index": np.int64(i)}
                  for i in range(clips)]

        def text(captions):  # trivial text encoder: the VAE is what is measured
            return np.zeros((len(captions), 1, 8), np.float32), np.zeros((len(captions),), np.int32)

        with tempfile.TemporaryDirectory() as d:
            summary = latent_cache.encode_to_cache(
                source, d, encode_video=encode, encode_text=text, batch_size=args.batch_size,
                shard_size=args.batch_size * max(1, steps // 2), progress=False)
        result["cache_clips_per_s"] = summary["clips_per_s"]
        result["cache_bytes_per_clip"] = summary["bytes"] / clips

    print(json.dumps(bench.record(**result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
