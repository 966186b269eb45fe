"""How well a reward model orders preference pairs: VideoAlign's accuracies with 95% intervals, per noise level.

For pairs ``(A, B)`` with human (oracle) labels ``h`` in {+1, -1, 0} per dimension (VQ, MQ, TA) and model
differences ``m = r(A) - r(B)`` (:mod:`shelllcc.rewards.preference` has the definitions)::

    acc_with_ties      max over eps of acc(eps), eps chosen on the evaluated split itself (upstream's
                       calc_accuracy.py; optimistic)
    acc_at_val_eps     acc(eps_val), eps_val the threshold that maximises acc on the validation split
                       (an honest version of the above)
    acc_without_ties   C / (C + D) over the pairs a human decided (eps = -1)
    tie_separation     mean |m| over human-tied pairs and over decided pairs: a model that knows ties gives
                       the tied pairs the smaller differences (BTT's claim over BT)

``overall`` is the mean of the three dimensions' values (our oracle gives no overall label; upstream's
overall uses one). Rewards are taken at ``t = 0`` (clean latents) and at noise levels ``t > 0``, where both
clips of a pair get the same ``eps`` (a fixed draw per pair, seeded by the pair's position), since the
model is meant for guidance on noised latents. Intervals: the bias-corrected percentile bootstrap over
pairs (:func:`shelllcc.evaluation.intervals.bootstrap`, pairs in the role of its prompts); pairs of one
prompt are not independent, so the intervals are somewhat narrow.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shelllcc.evaluation.intervals import bootstrap
from shelllcc.rewards.preference import accuracy_at, tie_calibrated_accuracy

DIMENSIONS = ("VQ", "MQ", "TA")


@functools.lru_cache(maxsize=8)
def _pair_diffs_fn(graphdef, seed: int):
    """One compiled ``(state, z_a, z_b, context, positions, t) -> r(A) - r(B)`` per model structure and seed:
    ``t`` is an argument, so every noise level and split of a batch size share it."""
    from shelllcc.rewards.reward_model import pair_rewards

    @jax.jit
    def diffs(state, z_a, z_b, context, positions, t):
        m = nnx.merge(graphdef, state)
        key = jax.random.PRNGKey(seed)
        eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), z_a.shape[1:], jnp.float32))(positions)
        r_a, r_b = pair_rewards(m, z_a, z_b, eps, jnp.full((z_a.shape[0],), t, jnp.float32), context)
        return r_a - r_b

    return diffs


def reward_differences(model, pairs: dict[str, np.ndarray], t: float, *, seed: int = 0,
                       batch_size: int = 64) -> np.ndarray:
    """``r(A) - r(B)`` ``[N, 3]`` of every pair of ``pairs`` (``z_a``, ``z_b``, ``context``) at noise level ``t``:
    ``x = (1 - t) z + t eps`` with one ``eps`` per pair (``PRNGKey(seed)`` folded with the pair's position),
    the same for A and B; ``t = 0`` gives the clean latents."""
    graphdef, state = nnx.split(model)
    diffs = _pair_diffs_fn(graphdef, int(seed))
    n = len(pairs["z_a"])
    batch_size = min(batch_size, n)
    out = []
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])     # one compiled shape
        d = diffs(state, pairs["z_a"][pad], pairs["z_b"][pad], pairs["context"][pad], jnp.asarray(pad, jnp.int32),
                  jnp.float32(t))
        out.append(np.asarray(d)[: len(idx)])
    return np.concatenate(out).astype(np.float64)


def _acc_with_ties(labels, diffs) -> float:
    return float(np.mean([tie_calibrated_accuracy(labels[:, k], diffs[:, k])[0] for k in range(3)]))


def tie_separation(labels: np.ndarray, diffs: np.ndarray) -> dict[str, dict[str, float]]:
    """Per dimension: mean |r(A) - r(B)| over human-tied and over decided pairs, and their ratio."""
    out = {}
    for k, name in enumerate(DIMENSIONS):
        tie, decided = labels[:, k] == 0, labels[:, k] != 0
        a = float(np.mean(np.abs(diffs[tie, k]))) if tie.any() else float("nan")
        b = float(np.mean(np.abs(diffs[decided, k]))) if decided.any() else float("nan")
        out[name] = {"mean_abs_diff_tie": a, "mean_abs_diff_decided": b, "tie_over_decided": a / b if b else float("nan"),
                     "ties": int(tie.sum()), "decided": int(decided.sum())}
    return out


def accuracy_report(labels: np.ndarray, diffs: np.ndarray, val_labels: np.ndarray | None = None,
                    val_diffs: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The accuracies of the module docstring per dimension and overall, each with a 95% interval.

    ``labels`` int ``[N, 3]``, ``diffs`` ``[N, 3]``; ``val_*`` the validation split's, for ``acc_at_val_eps``.
    """
    labels = np.asarray(labels).astype(np.int64)
    diffs = np.asarray(diffs, np.float64)
    eps_val = None
    if val_labels is not None:
        eps_val = [tie_calibrated_accuracy(np.asarray(val_labels)[:, k], np.asarray(val_diffs)[:, k])[2]
                   for k in range(3)]
    data = {"labels": labels[None], "diffs": diffs[None]}

    def without(k):
        def stat(x):
            h, m = x["labels"][0, :, k], x["diffs"][0, :, k]
            dec = h != 0
            return float(np.sum(dec & (h * m > 0)) / max(np.sum(dec), 1))
        return stat

    def with_ties(k):
        return lambda x: tie_calibrated_accuracy(x["labels"][0, :, k], x["diffs"][0, :, k])[0]

    def at_val(k):
        return lambda x: accuracy_at(x["labels"][0, :, k], x["diffs"][0, :, k], eps_val[k])

    def overall(per_dim):
        return lambda x: float(np.mean([per_dim(k)(x) for k in range(3)]))

    metrics = {"acc_without_ties": without, "acc_with_ties": with_ties}
    if eps_val is not None:
        metrics["acc_at_val_eps"] = at_val
    out: dict[str, Any] = {"pairs": int(labels.shape[0]),
                           "label_counts": {d: {str(v): int(np.sum(labels[:, k] == v)) for v in (1, 0, -1)}
                                            for k, d in enumerate(DIMENSIONS)}}
    if eps_val is not None:
        out["eps_val"] = dict(zip(DIMENSIONS, eps_val))
    out["eps_test"] = {d: tie_calibrated_accuracy(labels[:, k], diffs[:, k])[2] for k, d in enumerate(DIMENSIONS)}
    for name, per_dim in metrics.items():
        out[name] = {d: bootstrap(data, per_dim(k), n_boot=n_boot, seed=seed) for k, d in enumerate(DIMENSIONS)}
        out[name]["overall"] = bootstrap(data, overall(per_dim), n_boot=n_boot, seed=seed)
    out["tie_separation"] = tie_separation(labels, diffs)
    return out


def histogram_png(path: str, labels: np.ndarray, diffs: np.ndarray, title: str = "") -> str:
    """Histograms of ``r(A) - r(B)`` per dimension, one colour per human label (A preferred / tie / B)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, (ax, name) in enumerate(zip(axes, DIMENSIONS)):
        d = diffs[:, k]
        lim = float(np.quantile(np.abs(d), 0.99)) or 1.0
        bins = np.linspace(-lim, lim, 41)
        for value, label, colour in ((1, "A preferred", "tab:blue"), (0, "tie", "tab:gray"),
                                     (-1, "B preferred", "tab:red")):
            sel = labels[:, k] == value
            ax.hist(np.clip(d[sel], -lim, lim), bins=bins, alpha=0.5, color=colour, label=f"{label} ({sel.sum()})")
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(name)
        ax.set_xlabel("r(A) - r(B)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_line(report: dict[str, Any], key: str = "acc_without_ties") -> str:
    """``VQ 0.71 [0.66, 0.76] MQ ...`` of one accuracy."""
    return " ".join(f"{d} {report[key][d]['value']:.3f} [{report[key][d]['lo']:.3f}, {report[key][d]['hi']:.3f}]"
                    for d in (*DIMENSIONS, "overall"))


__all__ = ["accuracy_report", "histogram_png", "reward_differences", "summary_line", "tie_separation"]
