"""95% intervals for the embedded benchmark's metrics: a two-way (seeds x prompts) percentile bootstrap.

Every model of the benchmark is fine-tuned and sampled with ``S`` seeds on the same ``P`` test prompts,
and every per-clip value is kept as an array ``[S, P, ...]``. A metric is a statistic of such arrays
(a mean, a ratio of two means, a distance between mean spectra, an accuracy difference), so its
sampling variability has two sources, the seed and the prompt, crossed::

    for b in 1..B:
        seeds_b   = S draws with replacement from 0..S-1          (kept as is when S == 1)
        prompts_b = P draws with replacement from 0..P-1          (the same prompts for every seed)
        t_b       = statistic(x[seeds_b][:, prompts_b] for every array x)
    z0       = Phi^-1(share of t_b below statistic(x))                 (the bootstrap's median bias)
    interval = (quantile_{Phi(2 z0 - z)}(t), quantile_{Phi(2 z0 + z)}(t)),  z = Phi^-1(1 - (1 - level) / 2)

All arrays of one call are resampled with the same indices, so paired comparisons (a variant against
the base on the same prompts and noise) keep their pairing. With ``S == 1`` this is the ordinary
bias-corrected percentile bootstrap over prompts. The bias correction matters for the distances: a
resample repeats clips, which moves a Frechet or spectrum distance one way, and a plain percentile
interval can then miss the estimate altogether; for a mean it is the plain percentile interval.
References: Efron and Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13-14 (percentile
and bias-corrected intervals); for crossed random effects, Owen, "The pigeonhole bootstrap", Ann. Appl.
Stat. 1(1), 2007 (resampling rows and columns independently).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _check(data: Arrays) -> tuple[int, int]:
    if not data:
        raise ValueError("bootstrap needs at least one array")
    shapes = {k: np.shape(v) for k, v in data.items()}
    bad = {k: s for k, s in shapes.items() if len(s) < 2}
    if bad:
        raise ValueError(f"arrays must be [seeds, prompts, ...]; got {bad}")
    lead = {s[:2] for s in shapes.values()}
    if len(lead) != 1:
        raise ValueError(f"arrays disagree on [seeds, prompts]: {shapes}")
    s, p = lead.pop()
    if s < 1 or p < 2:
        raise ValueError(f"need >= 1 seed and >= 2 prompts, got [seeds={s}, prompts={p}]")
    return s, p


def bootstrap(data: Arrays, statistic: Callable[[Arrays], float], *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """``{"value", "lo", "hi", "level", "n_boot", "seeds", "prompts", "method"}`` for ``statistic(data)``.

    ``data``: arrays ``[S, P, ...]`` (seeds x prompts); ``statistic`` maps such a dict (resampled) to a
    float. The resampling is the module docstring's. A statistic that is not finite on a resample
    (e.g. a ratio whose resampled denominator is 0) makes that resample count as missing; more than 1%
    missing is an error naming the statistic's value.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a {level:.0%} interval, got {n_boot}")
    s, p = _check(data)
    arrays = {k: np.asarray(v) for k, v in data.items()}
    value = float(statistic(arrays))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, np.float64)
    for b in range(n_boot):
        si = rng.integers(0, s, s) if s > 1 else np.zeros(1, np.int64)
        pi = rng.integers(0, p, p)
        stats[b] = statistic({k: v[si][:, pi] for k, v in arrays.items()})
    finite = np.isfinite(stats)
    if finite.mean() < 0.99:
        raise ValueError(f"the statistic (value {value}) is not finite on {np.sum(~finite)} of {n_boot} resamples")
    from statistics import NormalDist
    norm = NormalDist()
    t = stats[finite]
    share = np.clip((np.sum(t < value) + 0.5 * np.sum(t == value)) / t.size, 0.5 / t.size, 1 - 0.5 / t.size)
    z0, z = norm.inv_cdf(share), norm.inv_cdf(1 - (1 - level) / 2)
    lo, hi = np.quantile(t, [norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)])
    method = ("bias-corrected percentile bootstrap over prompts" if s == 1 else
              "two-way bias-corrected percentile bootstrap over seeds and prompts")
    return {"value": value, "lo": float(lo), "hi": float(hi), "level": level, "n_boot": n_boot, "seeds": s,
            "prompts": p, "method": method}


def jackknife(data: Arrays, statistic: Callable[[Arrays], float], *, level: float = 0.95) -> dict[str, Any]:
    """Leave-one-prompt-out jackknife normal interval (all seeds of the left-out prompt go together)::

        t_(i) = statistic(x without prompt i),   se^2 = (P - 1) / P * sum_i (t_(i) - mean_i t_(i))^2
        interval = statistic(x) -+ z se,          z = Phi^-1(1 - (1 - level) / 2)

    For statistics that a bootstrap resample distorts because it repeats clips (a Frechet distance: a
    repeated feature vector shrinks the fitted covariance, so every resample lands on one side of the
    estimate and no percentile interval holds it); leaving one out repeats nothing. Reference: Efron and
    Tibshirani (1993), ch. 11.
    """
    from statistics import NormalDist
    s, p = _check(data)
    arrays = {k: np.asarray(v) for k, v in data.items()}
    value = float(statistic(arrays))
    keep = np.ones(p, bool)
    t = np.empty(p, np.float64)
    for i in range(p):
        keep[i] = False
        t[i] = statistic({k: v[:, keep] for k, v in arrays.items()})
        keep[i] = True
    se = float(np.sqrt((p - 1) / p * np.sum((t - t.mean()) ** 2)))
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    return {"value": value, "lo": value - z * se, "hi": value + z * se, "level": level, "n_boot": 0, "seeds": s,
            "prompts": p, "method": "leave-one-prompt-out jackknife, normal interval"}


def mean_of(key: str) -> Callable[[Arrays], float]:
    """Statistic: the mean of ``data[key]`` over everything."""
    return lambda d: float(np.mean(d[key]))


def ratio_of_means(num: str, den: str) -> Callable[[Arrays], float]:
    """Statistic: ``mean(data[num]) / mean(data[den])`` (a detail ratio against the base, paired)."""
    return lambda d: float(np.mean(d[num]) / np.mean(d[den]))


def difference_of_means(a: str, b: str) -> Callable[[Arrays], float]:
    """Statistic: ``mean(data[a]) - mean(data[b])`` (e.g. an accuracy change against the base)."""
    return lambda d: float(np.mean(d[a]) - np.mean(d[b]))


def excludes(interval: Mapping[str, float], null: float, side: str) -> bool:
    """Whether ``interval`` lies entirely ``above`` or ``below`` ``null`` (the claim holds only then)."""
    if side == "above":
        return interval["lo"] > null
    if side == "below":
        return interval["hi"] < null
    raise ValueError(f"side must be 'above' or 'below', got {side!r}")


def format_interval(interval: Mapping[str, float], fmt: str = ".3f") -> str:
    """``"1.160 [1.101, 1.224]"``."""
    return f"{interval['value']:{fmt}} [{interval['lo']:{fmt}}, {interval['hi']:{fmt}}]"


__all__ = ["bootstrap", "jackknife", "mean_of", "ratio_of_means", "difference_of_means", "excludes", "format_interval"]
