"""Reader throughput: batches/s of cached latents through the TF-free grain pipeline.

    python benchmarks/reader_bench.py                       # both sizes below, CPU
    python benchmarks/reader_bench.py --sizes wan1.3b --batches 20

A latent cache is written once (random latents standing in for VAE output; the reader cost does
not depend on their values) and read with ``shelllcc.data.readers.make_dataset`` (shuffle, repeat,
batch), with and without ``prefetch_to_device``. Sizes:
``demo``: latent [5, 8, 8, 16] f32, 64-token text embeddings of dim 128, batch 32;
``wan1.3b``: latent [21, 60, 104, 16] bf16 (81 frames at 480x832), 512 x 4096 umT5 embeddings trimmed
to 40 tokens, batch 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import harness  # first: puts the repository root on sys.path
import jax
import ml_dtypes
import numpy as np

from shelllcc.data import latent_cache, readers

SIZES = {
    "demo": dict(latent=(5, 8, 8, 16), dtype=np.float32, text=(64, 128), text_len=12, batch=32, clips=512),
    "wan1.3b": dict(latent=(21, 60, 104, 16), dtype=ml_dtypes.bfloat16, text=(512, 4096), text_len=40, batch=1,
                    clips=48),
}


def write_cache(out_dir: str, size: dict) -> None:
    n = size["clips"]
    source = [{"video": np.zeros((1, 1, 1, 3), np.uint8), "caption": f"clip {i}", "index": i} for i in range(n)]
    rng = np.random.default_rng(0)
    latent = (rng.standard_normal(size["latent"]).astype(np.float32))
    text = np.zeros(size["text"], np.float32)
    text[: size["text_len"]] = rng.standard_normal((size["text_len"], size["text"][1]))

    def encode_video(videos):
        return np.broadcast_to(latent, (len(videos),) + latent.shape).astype(size["dtype"])

    def encode_text(captions):
        return np.broadcast_to(text, (len(captions),) + text.shape), np.full(len(captions), size["text_len"])

    latent_cache.encode_to_cache(source, out_dir, encode_video=encode_video, encode_text=encode_text,
                                 batch_size=size["batch"], shard_size=max(size["batch"], 64 if n > 64 else n),
                                 latent_dtype=size["dtype"], video_encoder_description="reader_bench random",
                                 text_encoder_description="reader_bench random", progress=False)


def time_batches(iterator, batches: int) -> float:
    """Batches/s, after a first batch that pays for thread start-up and file opening."""
    times = harness.timed(lambda: next(iterator), batches, warmup=1, sync=lambda batch: jax.block_until_ready(
        [v for v in jax.tree.leaves(batch) if isinstance(v, jax.Array)]))
    return batches / (sum(times) / 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batches", type=int, default=50)
    harness.add_output_args(p, out_dir=False)
    args = p.parse_args()
    bench = harness.Bench("reader_bench", args.out_jsonl)
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} ({os.cpu_count()} cores)"
    for name in args.sizes:
        size = SIZES[name]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_cache(tmp, size)
            write_s = time.perf_counter() - t0
            cache = latent_cache.open_cache(tmp)
            batches = min(args.batches, 10 * len(cache) // size["batch"])
            make = lambda: iter(readers.make_dataset(cache, batch_size=size["batch"], seed=0))
            host = time_batches(make(), batches)
            prefetcher = readers.prefetch_to_device(make(), size=2)
            device_rate = time_batches(prefetcher, batches)
            prefetcher.close()
        mb = np.prod(size["latent"]) * np.dtype(size["dtype"]).itemsize * size["batch"] / 2**20
        print(f"{name}: {host:.1f} batches/s to host, {device_rate:.1f} batches/s with device prefetch "
              f"(batch {size['batch']}, {mb:.2f} MiB of latents per batch; cache written in {write_s:.1f}s)")
        bench.record(device=device, size=name, batch_size=size["batch"], latent_shape=list(size["latent"]),
                     latent_dtype=np.dtype(size["dtype"]).name, batches=batches, host_batches_per_s=host,
                     device_prefetch_batches_per_s=device_rate, latent_mib_per_batch=float(mb),
                     python=platform.python_version(), versions=dict(jax=jax.__version__))


if __name__ == "__main__":
    main()
