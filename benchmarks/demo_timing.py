"""Wall time of the README's main job (the embedded pipeline) per stage, in a fresh workdir.

    python benchmarks/demo_timing.py [--workdir DIR] [--config configs/demo.py] [--device "2-core CPU ..."]

Runs ``python -m experiments.main --config=CONFIG --workdir=DIR`` (DIR must not hold an earlier run),
then reads the pipeline's ``timings.json`` and ``results.json``; prints the per-stage table and the
total wall time of the command (interpreter start-up and imports included) and appends one JSON line
to ``benchmarks/results.jsonl``. The machine should be otherwise idle: every figure is CPU-bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="")
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--device", default=f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})")
    p.add_argument("--log", default="", help="write the run's output here (default: WORKDIR/demo.log)")
    p.add_argument("--out-jsonl", default=os.path.join(REPO, "benchmarks", "results.jsonl"))
    a = p.parse_args(argv)
    workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="demo_timing_"))
    if os.path.exists(os.path.join(workdir, "timings.json")):
        raise SystemExit(f"{workdir} already holds a pipeline run; give a fresh --workdir")
    os.makedirs(workdir, exist_ok=True)
    log = a.log or os.path.join(workdir, "demo.log")
    cmd = [sys.executable, "-m", "experiments.main", f"--config={a.config}", f"--workdir={workdir}"]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc:
        print(f"the pipeline failed (rc {rc}); see {log}")
        return rc
    stages = json.load(open(os.path.join(workdir, "timings.json")))
    results = json.load(open(os.path.join(workdir, "results.json")))
    print(f"{'stage':<14}{'seconds':>9}")
    for k, v in stages.items():
        print(f"{k:<14}{v:>9.1f}")
    print(f"{'total (cmd)':<14}{wall:>9.1f}   ({wall / 60:.1f} min, imports and start-up included)")
    record = {"bench": "demo_timing", "device": a.device, "date": datetime.date.today().isoformat(),
              "command": " ".join(["python", "benchmarks/demo_timing.py", "--config", a.config]),
              "stages_s": stages, "total_s": round(wall, 1),
              "base_attribute_accuracy": results["models"]["base"]["attribute_accuracy"],
              "vae_psnr_db": results.get("vae_reconstruction", {}).get("psnr_db"),
              "verdict": results.get("verdict"), "claim": results.get("claim"), "workdir": workdir}
    with open(a.out_jsonl, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
