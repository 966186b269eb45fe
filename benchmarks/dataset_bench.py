"""Time to render Moving Textures clips (``shelllcc.data.moving_textures.generate_split``), one record.

    python benchmarks/dataset_bench.py                      # 200 clips of 17 x 64 x 64, the train split
    python benchmarks/dataset_bench.py --clips 20 --results /tmp/db.jsonl

The default is the figure ``tests/test_moving_textures.py::test_timing_200_clips`` held as a wall-clock limit
(under 10 s for 200 clips): the clips a demo run renders per 200 examples, on the CPU, single-threaded numpy.
``seconds`` is the median over ``--repeats`` renders of the whole split.
"""

from __future__ import annotations

import argparse
import statistics

import harness  # first: puts the repository root on sys.path
import numpy as np

from shelllcc.data import moving_textures as mt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    harness.add_output_args(p, out_dir=False)
    args = p.parse_args(argv)
    bench = harness.Bench("dataset_bench", args.out_jsonl, argv=argv)
    spec = mt.ClipSpec()

    def render():
        shapes = {ex["video"].shape for ex in mt.generate_split(mt.split_seed(args.seed, args.split), args.clips, spec)}
        assert shapes == {(spec.num_frames, spec.height, spec.width, 3)}, shapes

    times = harness.timed(render, args.repeats, sync=lambda _: None)
    seconds = statistics.median(times) / 1e3
    print(f"{args.clips} Moving Textures clips ({spec.num_frames} x {spec.height} x {spec.width}): {seconds:.2f} s, "
          f"{args.clips / seconds:.1f} clips/s")
    bench.record(device=harness.host_device(), dataset="moving_textures", split=args.split, seed=args.seed,
                 clips=args.clips, clip_shape=[spec.num_frames, spec.height, spec.width, 3], repeats=args.repeats,
                 seconds=seconds, seconds_all=[t / 1e3 for t in times], clips_per_s=args.clips / seconds,
                 numpy=np.__version__)


if __name__ == "__main__":
    main()
