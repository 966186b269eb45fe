"""VideoAlign's four pure functions against independent float64 NumPy statements (ALIGNMENT_METHODS 1)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.flow.guidance import guided_velocity
from shelllcc.flow.objectives import flow_dpo_loss
from shelllcc.rewards.preference import accuracy_at, bt_loss, btt_loss, regression_loss, tie_calibrated_accuracy


def _np_rao_kupper(ra, rb, theta):
    """P(A > B), P(B > A), P(tie) from strengths a = e^{r_A}, b = e^{r_B} (Rao and Kupper 1967)."""
    a, b = np.exp(ra), np.exp(rb)
    p_a = a / (a + theta * b)
    p_b = b / (b + theta * a)
    p_tie = (theta ** 2 - 1) * a * b / ((a + theta * b) * (theta * a + b))
    return p_a, p_b, p_tie


def test_btt_loss_is_the_rao_kupper_likelihood():
    r = np.random.default_rng(0)
    ra, rb = r.normal(0, 2, (7, 3)), r.normal(0, 2, (7, 3))
    labels = r.choice([1, -1, 0, 2, -7], size=(7, 3))
    for theta in (5.0, 1.5):
        p_a, p_b, p_tie = _np_rao_kupper(ra, rb, theta)
        np.testing.assert_allclose(p_a + p_b + p_tie, 1.0, rtol=1e-12)
        nll = np.where(labels == 1, -np.log(p_a), np.where(labels == -1, -np.log(p_b), -np.log(p_tie)))
        valid = np.isin(labels, (1, -1, 0))
        want = nll[valid].mean()
        got = btt_loss(jnp.asarray(ra, jnp.float32), jnp.asarray(rb, jnp.float32), labels, theta=theta)
        np.testing.assert_allclose(float(got), want, rtol=2e-5)
    # nothing valid: zero, not nan
    assert float(btt_loss(ra, rb, np.full((7, 3), 9))) == 0.0


def test_btt_tie_is_most_likely_at_equal_rewards_and_large_gaps_are_finite():
    d = jnp.linspace(-3, 3, 61)
    tie = jax.vmap(lambda x: btt_loss(x[None, None], jnp.zeros((1, 1)), jnp.zeros((1, 1), jnp.int32)))(d)
    assert int(jnp.argmin(tie)) == 30
    big = btt_loss(jnp.array([[200.0]]), jnp.array([[-200.0]]), jnp.array([[-1]]))
    np.testing.assert_allclose(float(big), 400 + math.log(5.0), rtol=1e-5)


def test_bt_and_regression_losses():
    r = np.random.default_rng(1)
    ra, rb = r.normal(size=(5, 3)), r.normal(size=(5, 3))
    labels = r.choice([1, -1, 0, 3], size=(5, 3))
    d = ra - rb
    dec = np.isin(labels, (1, -1))
    want = np.mean(np.log1p(np.exp(-labels[dec] * d[dec])))
    np.testing.assert_allclose(float(bt_loss(ra, rb, labels)), want, rtol=1e-5)
    val = np.isin(labels, (1, -1, 0))
    np.testing.assert_allclose(float(regression_loss(ra, rb, labels)), np.mean((d[val] - labels[val]) ** 2), rtol=1e-5)


# --- accuracy with ties ---------------------------------------------------------------------------


def _np_acc(h, m, eps):
    c = d = th = tm = thm = 0
    for hi, mi in zip(h, m):
        model_tie = abs(mi) <= eps
        if hi == 0:
            thm, th = thm + model_tie, th + (not model_tie)
        elif model_tie:
            tm += 1
        elif hi * mi > 0:
            c += 1
        else:
            d += 1
    return (c + thm) / (c + d + th + tm + thm), c, d


def _brute_force(h, m):
    """max over every threshold the upstream sweep visits, scored from scratch; smallest eps on ties."""
    best, best_eps = -np.inf, None
    for eps in sorted(set(np.abs(m).tolist())):
        acc = _np_acc(h, m, eps)[0]
        if acc > best:
            best, best_eps = acc, eps
    _, c, d = _np_acc(h, m, -1.0)
    return best, (c / (c + d) if c + d else float("nan")), best_eps


def _upstream_sweep(h, m):
    """The incremental sweep of VideoAlign's calc_accuracy.py, restated: pairs in order of |m|, each moved
    into the model's ties, the accuracy scored after each move. Equal to thresholds when the |m| differ."""
    state = dict(zip("C D Th Tm Thm".split(), [0] * 5))
    for hi, mi in zip(h, m):
        key = "Th" if hi == 0 else ("C" if hi * mi > 0 else "D")
        state[key] += 1
    best, best_eps = -np.inf, None
    for hi, mi in sorted(zip(h, m), key=lambda p: abs(p[1])):
        if hi == 0:
            state["Th"], state["Thm"] = state["Th"] - 1, state["Thm"] + 1
        else:
            key = "C" if hi * mi > 0 else "D"
            state[key], state["Tm"] = state[key] - 1, state["Tm"] + 1
        acc = (state["C"] + state["Thm"]) / sum(state.values())
        if acc > best:
            best, best_eps = acc, abs(mi)
    return best, best_eps


@pytest.mark.parametrize("seed", range(6))
def test_tie_calibrated_accuracy_matches_brute_force_and_upstream_sweep(seed):
    r = np.random.default_rng(seed)
    n = int(r.integers(5, 60))
    h = r.choice([1, -1, 0], size=n, p=[0.35, 0.35, 0.3])
    m = h * r.uniform(0, 1, n) + r.normal(0, 0.6, n)
    if seed % 2:   # exact repeats of |m| and exact zeros, as identical clips give
        m = np.round(m, 1)
    acc, acc_nt, eps = tie_calibrated_accuracy(h, m)
    want, want_nt, want_eps = _brute_force(h.tolist(), m.tolist())
    assert acc == pytest.approx(want, abs=1e-12) and eps == want_eps
    assert acc_nt == pytest.approx(want_nt, abs=1e-12)
    assert accuracy_at(h, m, eps) == pytest.approx(acc, abs=1e-12)
    if len(set(np.abs(m).tolist())) == n:
        up, up_eps = _upstream_sweep(h.tolist(), m.tolist())
        assert acc == pytest.approx(up, abs=1e-12) and eps == up_eps


def test_tie_calibrated_accuracy_small_cases_by_hand():
    # all decided and right: the smallest threshold keeps 2 of 3 decided (one pair becomes a model tie)
    acc, nt, eps = tie_calibrated_accuracy([1, -1, 1], [0.5, -0.2, 1.0])
    assert (acc, nt, eps) == (pytest.approx(2 / 3), 1.0, 0.2)
    # the human ties have the smallest |m|: a threshold between them and the rest gets everything right
    acc, nt, eps = tie_calibrated_accuracy([0, 0, 1, -1], [0.01, -0.02, 0.9, -0.7])
    assert (acc, nt, eps) == (1.0, 1.0, 0.02)
    # every exhaustive label/sign combination of three pairs agrees with the brute force
    for h in itertools.product([1, -1, 0], repeat=3):
        m = [0.3, -0.1, 0.7]
        assert tie_calibrated_accuracy(h, m)[0] == pytest.approx(_brute_force(list(h), m)[0])


# --- Flow-DPO ----------------------------------------------------------------------------------------


def _np_flow_dpo(etw, erw, etl, erl, t, beta, time_dependent):
    f = np.float64
    bt = beta * (1 - t.astype(f)) ** 2 if time_dependent else np.full(t.shape, beta, f)
    z = (etw.astype(f) - erw) - (etl.astype(f) - erl)
    return np.mean(np.log1p(np.exp(bt / 2 * z)))


def test_flow_dpo_loss_against_numpy():
    r = np.random.default_rng(2)
    errs = [r.uniform(0.5, 1.5, 9) for _ in range(4)]
    t = r.uniform(0, 1, 9)
    for beta, td in [(5.0, False), (20.0, True), (0.0, False)]:
        want = _np_flow_dpo(*errs, t, beta, td)
        got = flow_dpo_loss(*[jnp.asarray(e, jnp.float32) for e in errs], jnp.asarray(t, jnp.float32), beta,
                            time_dependent=td)
        np.testing.assert_allclose(float(got), want, rtol=2e-5)
    # log 2 when the policy equals the reference; falls when the policy improves on the winner only
    e = jnp.ones(4)
    assert float(flow_dpo_loss(e, e, e, e, jnp.zeros(4), 100.0)) == pytest.approx(math.log(2))
    assert float(flow_dpo_loss(0.99 * e, e, e, e, jnp.zeros(4), 100.0)) < math.log(2)
    # the time-dependent beta vanishes at pure noise
    assert float(flow_dpo_loss(0.5 * e, e, e, e, jnp.ones(4), 100.0, time_dependent=True)) == pytest.approx(math.log(2))


def test_flow_dpo_gradient_pushes_winner_error_down():
    g = jax.grad(lambda w: flow_dpo_loss(w, jnp.ones(2), jnp.ones(2), jnp.ones(2), jnp.array([0.2, 0.7]), 10.0))
    assert np.all(np.asarray(g(jnp.ones(2))) > 0)


# --- guidance ----------------------------------------------------------------------------------------


def test_guided_velocity_against_numpy():
    r = np.random.default_rng(3)
    v, g = r.normal(size=(4, 2, 3, 3, 2)), r.normal(size=(4, 2, 3, 3, 2))
    t = np.array([0.0, 0.3, 0.9, 1.0])
    w = 0.7
    factor = np.where(t < 1, t / np.where(t < 1, 1 - t, 1), 0.0)
    want = v - w * factor[:, None, None, None, None] * g
    got = guided_velocity(jnp.asarray(v, jnp.float32), jnp.asarray(g, jnp.float32), jnp.asarray(t, jnp.float32), w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(v[3], np.float32))   # t = 1: unguided
    # differentiable in t at t = 1 without nans
    dt = jax.grad(lambda tt: jnp.sum(guided_velocity(jnp.asarray(v, jnp.float32), jnp.asarray(g, jnp.float32), tt, w)))
    assert np.all(np.isfinite(np.asarray(dt(jnp.asarray(t, jnp.float32)))))


def test_guided_euler_step_raises_a_linear_reward():
    # r(x) = <a, x>: one Euler step (t -> t - dt) of the guided velocity gains w t/(1-t) dt |a|^2 over the plain one
    a = jnp.ones((1, 4))
    x, v = jnp.zeros((1, 4)), jnp.zeros((1, 4))
    t, dt, w = 0.5, 0.1, 2.0
    x_next = x + (-dt) * guided_velocity(v, a, jnp.array([t]), w)
    assert float(jnp.sum(a * x_next)) == pytest.approx(w * t / (1 - t) * dt * 4)
