"""The benchmark's 95% intervals against independent statements: normal theory, coverage, pairing."""

import numpy as np
import pytest

from shelllcc.evaluation import intervals as iv


def test_mean_interval_matches_normal_theory():
    # for the mean of P iid values the bootstrap interval approaches mean +- 1.96 s / sqrt(P) (float64 numpy)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1, 400))
    r = iv.bootstrap({"x": x}, iv.mean_of("x"), n_boot=4000, seed=1)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    assert r["value"] == pytest.approx(x.mean(), abs=1e-12)
    assert r["lo"] == pytest.approx(x.mean() - half, abs=0.08 * half)
    assert r["hi"] == pytest.approx(x.mean() + half, abs=0.08 * half)
    assert r["method"].startswith("bias-corrected percentile bootstrap over prompts")


def test_coverage_of_a_ratio_of_means():
    # a property: over many simulated benchmarks the 95% interval of a paired ratio covers the true ratio
    # about 95% of the time (true ratio 1.2; 200 trials, so the binomial sd of the rate is 0.015)
    rng = np.random.default_rng(2)
    hits = 0
    trials = 200
    for t in range(trials):
        base = rng.gamma(4.0, 1.0, size=(1, 64))
        model = 1.2 * base * rng.lognormal(0.0, 0.2, size=(1, 64)) / np.exp(0.02)
        r = iv.bootstrap({"m": model, "b": base}, iv.ratio_of_means("m", "b"), n_boot=400, seed=t)
        hits += r["lo"] <= 1.2 <= r["hi"]
    assert 0.90 <= hits / trials <= 0.99


def test_pairing_is_kept():
    # identical model and base: every resample has ratio exactly 1, so the interval is [1, 1]
    x = np.random.default_rng(3).gamma(2.0, 1.0, size=(3, 20))
    r = iv.bootstrap({"m": x, "b": x.copy()}, iv.ratio_of_means("m", "b"), n_boot=200)
    assert r["value"] == r["lo"] == r["hi"] == pytest.approx(1.0)
    assert r["seeds"] == 3 and r["method"].startswith("two-way")


def test_seed_variation_widens_the_interval():
    # the same prompts' values shifted per seed: resampling seeds must show that spread, which a bootstrap
    # over prompts alone (one seed) cannot
    rng = np.random.default_rng(4)
    prompts = rng.normal(0, 1, size=(1, 50))
    seeds = prompts + np.array([[-1.0], [0.0], [1.0]])
    narrow = iv.bootstrap({"x": prompts}, iv.mean_of("x"), n_boot=1000)
    wide = iv.bootstrap({"x": seeds}, iv.mean_of("x"), n_boot=1000)
    assert (wide["hi"] - wide["lo"]) > 3 * (narrow["hi"] - narrow["lo"])


def test_jackknife_se_of_a_frechet_distance_matches_monte_carlo():
    # the spread of the Frechet distance over independent draws of the model's clips (a Monte Carlo
    # truth) against the jackknife's standard error from one draw
    from shelllcc.evaluation import frechet
    rng = np.random.default_rng(6)
    f, n = 4, 64
    ref = rng.normal(size=(2000, f))
    mu_r, sig_r = frechet.gaussian_stats(ref)
    stat = lambda d: frechet.frechet_distance(*frechet.gaussian_stats(d["x"].reshape(-1, f)), mu_r, sig_r)  # noqa
    draws = [rng.normal(0.5, 1.3, size=(1, n, f)) for _ in range(300)]
    truth = np.std([stat({"x": x}) for x in draws], ddof=1)
    ses = [(r["hi"] - r["value"]) / 1.959964 for r in (iv.jackknife({"x": x}, stat) for x in draws[:20])]
    assert np.median(ses) == pytest.approx(truth, rel=0.3)
    r = iv.jackknife({"x": draws[0]}, stat)
    assert r["lo"] < r["value"] < r["hi"] and r["method"].startswith("leave-one-prompt-out")


def test_excludes_and_errors():
    assert iv.excludes({"lo": 1.01, "hi": 1.2}, 1.0, "above")
    assert not iv.excludes({"lo": 0.99, "hi": 1.2}, 1.0, "above")
    assert iv.excludes({"lo": -0.3, "hi": -0.01}, 0.0, "below")
    with pytest.raises(ValueError, match="seeds, prompts"):
        iv.bootstrap({"x": np.zeros(5)}, iv.mean_of("x"))
    with pytest.raises(ValueError, match="disagree"):
        iv.bootstrap({"x": np.zeros((1, 5)), "y": np.zeros((1, 6))}, iv.mean_of("x"))
