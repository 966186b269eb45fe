"""What the stage-1 locality weight does to the Shell-LCC skeleton on the embedded benchmark's latents.

    python benchmarks/manifold_locality.py --workdir DIR [--weights 0.1 1.0] [--seeds 0 1 2]

``DIR`` is a finished embedded pipeline run (``configs/demo.py``): its train cache, normalised with its
VAE's statistics, is fitted again with the pipeline's manifold config and every locality weight and seed
(the authors use 1.0, the project used 0.1 before). Printed and appended to ``benchmarks/results.jsonl``
per weight: the held-out distances (``lcc`` = mean ||z - zhat||^2, ``shell_norm``, ``shell``), the last
stage-1 log (reconstruction mse, locality term, share of dead anchors, usage KL) and the held-out
``lcc`` of the "pulled to skeleton" and "blurred" probes the fit reports (how far the skeleton sits
from what a blurring generator produces).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import harness
import numpy as np


def last_stage1(metrics_path: str) -> dict:
    rows = [json.loads(x) for x in open(metrics_path) if x.strip()]
    s1 = [r for r in rows if r.get("stage") == 1]
    return s1[-1] if s1 else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a finished configs/demo.py run")
    p.add_argument("--weights", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    harness.add_output_args(p, out_dir=False)
    a = p.parse_args(argv)
    bench = harness.Bench("manifold_locality", a.out_jsonl, argv=argv)
    from configs import demo
    from experiments import embedded_pipeline as ep
    from experiments import fit_manifold
    config = demo.get_config()
    paths = ep.Paths(os.path.abspath(a.workdir))
    if not os.path.exists(paths.stage_marker("cache")):
        raise SystemExit(f"{a.workdir} has no finished cache stage; run the demo there first")
    mean, std = ep.latent_stats(paths)
    rows = []
    for w in a.weights:
        for seed in a.seeds:
            c = copy.deepcopy(config.manifold)
            c.seed = seed
            c.stage1.locality = w
            c.data.cache.dir, c.data.cache.latent_mean, c.data.cache.latent_std = paths.train_cache, mean, std
            out = os.path.join(paths.root, "locality", f"w{w}_seed{seed}")
            if not os.path.exists(os.path.join(out, "distances.json")):
                os.makedirs(out, exist_ok=True)
                fit_manifold.run(c, out)
            d = json.load(open(os.path.join(out, "distances.json")))
            s1 = last_stage1(os.path.join(out, "metrics.jsonl"))
            rows.append({"weight": w, "seed": seed, **{f"real_{k}": v for k, v in d["real (held out)"].items()},
                         "pulled_lcc": d["pulled to skeleton (x0.3)"]["lcc"], "blurred_lcc": d["blurred (box 3x3)"]["lcc"],
                         **{f"stage1_{k}": s1.get(k) for k in ("rec", "locality", "dead_anchor_frac", "usage_kl")}})
    keys = [k for k in rows[0] if k not in ("weight", "seed")]
    print(f"{'weight':>7} " + " ".join(f"{k:>22}" for k in keys))
    summary = {}
    for w in a.weights:
        sel = [r for r in rows if r["weight"] == w]
        summary[str(w)] = {k: [float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel], ddof=1))
                              if len(sel) > 1 else 0.0] for k in keys}
        print(f"{w:>7} " + " ".join(f"{summary[str(w)][k][0]:>14.4f} +- {summary[str(w)][k][1]:<5.3f}" for k in keys))
    bench.record(device=harness.host_device(), seeds=a.seeds, mean_and_sd_over_seeds=summary, runs=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
