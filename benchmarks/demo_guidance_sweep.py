"""The base's attribute accuracy on the validation prompts for several sampler settings (validation only).

    python benchmarks/demo_guidance_sweep.py --workdir DIR [--prompts 64] [--seeds 0 1] [--settings S ...]

``DIR`` is a run of ``configs/demo.py`` that finished its ``classifier`` stage. For each setting (solver,
steps, guidance scale, shift) the installed base samples the first ``--prompts`` validation prompts with
every seed's noise; the table gives the mean accuracy over seeds per attribute, and one record goes to
``benchmarks/results.jsonl``. This is how the demo's sampler (``configs/demo.py``: UniPC, 10 steps,
guidance 3.0) was chosen; the test prompts are not touched. ``--settings``: ``solver:steps:guidance:shift`` with an
optional ``:lo-hi`` guidance interval (``sampler.guidance_interval``), e.g. ``unipc:10:4:3:0.5-1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import harness
import numpy as np

SETTINGS = (("unipc", 10, 2.0, 3.0), ("unipc", 10, 3.0, 3.0), ("unipc", 10, 4.0, 3.0), ("unipc", 25, 2.0, 3.0),
            ("unipc", 10, 2.0, 1.0), ("unipc", 25, 3.0, 1.0), ("euler", 25, 2.0, 3.0), ("unipc", 50, 2.0, 3.0))


def _parse(spec: str) -> tuple:
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise SystemExit(f"--settings {spec!r}: expected solver:steps:guidance:shift[:lo-hi]")
    interval = tuple(float(v) for v in parts[4].split("-")) if len(parts) == 5 else ()
    if len(interval) not in (0, 2):
        raise SystemExit(f"--settings {spec!r}: the interval is lo-hi, e.g. 0.5-1")
    return parts[0], int(parts[1]), float(parts[2]), float(parts[3]), interval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--settings", nargs="+", default=None, help="solver:steps:guidance:shift[:lo-hi] (module doc)")
    harness.add_output_args(p, out_dir=False)
    a = p.parse_args(argv)
    bench = harness.Bench("demo_guidance_sweep", a.out_jsonl, argv=argv)
    import ml_collections

    from configs import demo
    from experiments import embedded_pipeline as ep
    from experiments import embedded_validation as ev
    c = demo.get_config()
    c.validation.prompts = a.prompts
    paths = ep.Paths(os.path.abspath(a.workdir))
    if not os.path.exists(paths.stage_marker("classifier")):
        raise SystemExit(f"{a.workdir}: the classifier stage has not finished; run configs/demo.py there first")
    evs = ep._Evaluators(c, paths)
    evs._build_shared()
    s = evs._shared
    rows = []
    for solver, steps, g, shift, interval in (_parse(x) for x in a.settings) if a.settings else (
            (*x, ()) for x in SETTINGS):
        cfg = ml_collections.ConfigDict(dict(solver=solver, steps=steps, guidance_scale=g, shift=shift,
                                             guidance_interval=interval))
        t0 = time.time()
        per_seed = []
        for seed in a.seeds:
            e = ev.Evaluator(base_model=s["base"], mesh=s["mesh"], contexts=s["contexts"], labels=s["labels"],
                             real_videos=s["real"], latent_shape=s["shape"], sampler_cfg=cfg, seed=seed,
                             decoder=s["decoder"], classifier=s["classifier"], manifold=None)
            per_seed.append(e.set_reference(s["base"]))
        acc = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0] if k.startswith("acc") or
               k == "attribute_accuracy"}
        rows.append({"solver": solver, "steps": steps, "guidance": g, "shift": shift,
                     "guidance_interval": list(interval), **acc,
                     "seconds_per_seed": round((time.time() - t0) / len(a.seeds), 1)})
        where = f" at sigma {interval[0]:g}-{interval[1]:g}" if interval else ""
        print(f"{solver:>6} {steps:>3} steps guidance {g:<4}{where} shift {shift:<4} accuracy {acc['attribute_accuracy']:.3f} ("
              + ", ".join(f"{k[4:]} {v:.2f}" for k, v in acc.items() if k.startswith("acc_")) + ")", flush=True)
    bench.record(device=harness.host_device(), split="validation", prompts=a.prompts, seeds=a.seeds, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
