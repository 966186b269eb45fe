"""Judges of preference pairs side by side: accuracy with and without ties per dimension (issue 18 part 3).

A judge is anything that orders two clips: the BTT reward model (``r(A) - r(B)`` per dimension), GT-SVJ's
energy judge (``-(E(A) - E(B))``: lower energy is better), its preference head, or a Shell-LCC distance used
with no annotation at all (``-(d(A) - d(B))``: the clip nearer the manifold wins). Each gives per pair either
one score difference ``[N]`` (the same for every dimension: a judge that knows no dimensions) or one per
dimension ``[N, 3]``. With human labels ``h`` in {+1, -1, 0} per dimension (VQ, MQ, TA), per dimension
(VideoAlign's ``calc_accuracy.py``, :func:`shelllcc.rewards.preference.tie_calibrated_accuracy`)::

    acc(eps)          = (C + Thm) / (C + D + Th + Tm + Thm)       model tie iff |m| <= eps
    acc_with_ties     = max over eps in {|m_i|} of acc(eps)       (eps chosen on the evaluated pairs: optimistic)
    acc_without_ties  = C / (C + D) over the decided pairs at eps = -1 (m = 0 counts as discordant)

each with a 95% bootstrap interval over pairs.

``overall`` is the mean over the three dimensions (ours, as :mod:`shelllcc.evaluation.preference_eval`).
:func:`source_differences` computes a judge's differences on a pair set from any reward of latents.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.evaluation import preference_eval

DIMENSIONS = ("VQ", "MQ", "TA")
METRICS = ("acc_with_ties", "acc_without_ties")
TABLE_MD, TABLE_JSON = "judges.md", "judges.json"


def judge_accuracies(labels, diffs, *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{dim: {acc_with_ties, acc_without_ties, eps, interval}, "overall": {...}}`` of one judge; ``labels``
    int ``[N, 3]`` in {+1, -1, 0}, ``diffs`` ``[N]`` (one per pair, used for every dimension) or ``[N, 3]``, the
    judge's ``score(A) - score(B)`` (higher score = better clip). ``interval``: each metric's 95% interval,
    a bias-corrected bootstrap over pairs (:func:`shelllcc.evaluation.preference_eval.accuracy_report`, which
    refits the tie threshold on every resample, as the value fits it on the evaluated pairs)."""
    labels = np.asarray(labels).astype(np.int64)
    diffs = np.asarray(diffs, np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(DIMENSIONS):
        raise ValueError(f"judge_accuracies: labels must be [N, 3], got shape {labels.shape}")
    if diffs.ndim == 1:
        diffs = np.repeat(diffs[:, None], len(DIMENSIONS), axis=1)
    if diffs.shape != labels.shape:
        raise ValueError(f"judge_accuracies: diffs must be [N] or [N, 3] for labels {labels.shape}, got {diffs.shape}")
    if not np.all(np.isfinite(diffs)):
        raise ValueError(f"judge_accuracies: {int(np.sum(~np.isfinite(diffs)))} score differences are not finite")
    rep = preference_eval.accuracy_report(labels, diffs, n_boot=n_boot, seed=seed)
    out: dict[str, dict[str, Any]] = {}
    for name in (*DIMENSIONS, "overall"):
        out[name] = {m: rep[m][name]["value"] for m in METRICS}
        out[name]["interval"] = {m: [rep[m][name]["lo"], rep[m][name]["hi"]] for m in METRICS}
        if name != "overall":
            out[name]["eps"] = rep["eps_test"][name]
    return out


def judges_table(judges: Mapping[str, Mapping[str, Any]], labels, *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Every judge's accuracies: ``judges`` is ``{name: {"diffs": [N] | [N, 3], "description": str}}``; returns
    ``{"pairs": N, "n_boot": n_boot, "judges": {name: {"description", **judge_accuracies}}}`` (JSON-able)."""
    labels = np.asarray(labels)
    out = {"pairs": int(labels.shape[0]), "n_boot": int(n_boot), "judges": {}}
    for name, j in judges.items():
        out["judges"][name] = {"description": str(j.get("description", "")),
                               **judge_accuracies(labels, j["diffs"], n_boot=n_boot, seed=seed)}
    return out


def table_markdown(table: Mapping[str, Any], metric: str = "acc_with_ties") -> str:
    """A markdown table of one metric: a row per judge, a column per dimension and overall, each value with
    its 95% interval where the table has one."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}; expected one of {METRICS}")
    cols = (*DIMENSIONS, "overall")

    def cell(entry):
        v = entry[metric]
        if not math.isfinite(v):
            return "-"
        lo_hi = entry.get("interval", {}).get(metric)
        return f"{v:.3f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")
    lines = [f"| judge ({metric.replace('_', ' ')}, {table['pairs']} test pairs) | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, j in table["judges"].items():
        lines.append(f"| {name} | " + " | ".join(cell(j[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_table(out_dir: str, table: Mapping[str, Any]) -> tuple[str, str]:
    """``judges.json`` and ``judges.md`` (with and without ties, then the judges' descriptions) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    md = [table_markdown(table, "acc_with_ties"), "", table_markdown(table, "acc_without_ties"), ""]
    md += [f"- **{name}**: {j['description']}" for name, j in table["judges"].items()]
    paths = os.path.join(out_dir, TABLE_JSON), os.path.join(out_dir, TABLE_MD)
    for path, text in zip(paths, (json.dumps(table, indent=1), "\n".join(md) + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return paths


@functools.lru_cache(maxsize=16)
def _score_fn(score: Callable):
    return jax.jit(lambda params, z: score(params, z))


def source_differences(score: Callable[[Any, Any], Any], params: Any, z_a: np.ndarray, z_b: np.ndarray,
                       batch_size: int = 32) -> np.ndarray:
    """``score(A) - score(B)`` per pair: ``score(params, latents [B, ...]) -> [B] or [B, 3]`` (a jittable
    function of clean latents, higher is better; ``params`` passed as an argument, not baked in). One compiled
    shape: the last batch is padded with its last pair."""
    fn = _score_fn(score)
    n = len(z_a)
    batch_size = max(1, min(batch_size, n))
    out = []
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        z = jnp.asarray(np.concatenate([z_a[pad], z_b[pad]]), jnp.float32)
        s = np.asarray(fn(params, z), np.float64)
        out.append((s[:batch_size] - s[batch_size:])[: len(idx)])
    return np.concatenate(out)


__all__ = ["DIMENSIONS", "METRICS", "TABLE_JSON", "TABLE_MD", "judge_accuracies", "judges_table", "source_differences",
           "table_markdown", "write_table"]
