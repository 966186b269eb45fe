"""Wall time of the README's main job (the embedded pipeline) per stage, in a fresh workdir.

    python benchmarks/demo_timing.py [--workdir DIR] [--config configs/demo.py] [--device "2-core CPU ..."]

Runs ``python -m experiments.main --config=CONFIG --workdir=DIR`` (DIR must not hold an earlier run),
then reads the pipeline's ``timings.json`` and ``results.json``; prints the per-stage table and the
total wall time of the command (interpreter start-up and imports included) and appends one JSON line
to ``benchmarks/results.jsonl``. The machine should be otherwise idle: every figure is CPU-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import harness


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="")
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--device", default=harness.host_device())
    p.add_argument("--log", default="", help="write the run's output here (default: WORKDIR/demo.log)")
    harness.add_output_args(p, out_dir=False)
    a = p.parse_args(argv)
    bench = harness.Bench("demo_timing", a.out_jsonl, argv=argv)
    workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="demo_timing_"))
    if os.path.exists(os.path.join(workdir, "timings.json")):
        raise SystemExit(f"{workdir} already holds a pipeline run; give a fresh --workdir")
    os.makedirs(workdir, exist_ok=True)
    log = a.log or os.path.join(workdir, "demo.log")
    cmd = [sys.executable, "-m", "experiments.main", f"--config={a.config}", f"--workdir={workdir}"]
    done = harness.run(cmd, log=log, expects_result=False)
    wall = done.wall_s
    if done.error:
        print(f"the pipeline failed ({done.error}); see {log}")
        return done.rc or 1
    stages = json.load(open(os.path.join(workdir, "timings.json")))
    results = json.load(open(os.path.join(workdir, "results.json")))
    print(f"{'stage':<14}{'seconds':>9}")
    for k, v in stages.items():
        print(f"{k:<14}{v:>9.1f}")
    print(f"{'total (cmd)':<14}{wall:>9.1f}   ({wall / 60:.1f} min, imports and start-up included)")
    bench.record(device=a.device, stages_s=stages, total_s=round(wall, 1),
                 base_attribute_accuracy=results["models"]["base"]["attribute_accuracy"],
                 vae_psnr_db=results.get("vae_reconstruction", {}).get("psnr_db"),
                 verdict=results.get("verdict"), claim=results.get("claim"), workdir=workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
