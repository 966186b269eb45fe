"""PISCES's token transport prior (shelllcc.rewards.optimal_transport) against float64 NumPy statements written
here from ALIGNMENT_METHODS.md section 4: the KL-relaxed Sinkhorn, the cost, the fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from shelllcc.rewards import optimal_transport as ot


def relaxed_sinkhorn(cost, eps=0.05, mass=0.9, max_iters=200, tol=1e-3):
    """PISCES's solver: log-domain scalings, text side first, both updates raised to tau = rho / (rho + eps),
    rho = eps m / (1 - m), uniform marginals; stops when the largest change of a log-scaling is below tol.
    Returns (the plan before row normalisation, the number of iterations run)."""
    n, m = cost.shape
    rho = eps * mass / (1.0 - mass)
    tau = rho / (rho + eps)
    log_k = -cost / eps
    log_u, log_v = np.zeros(n), np.zeros(m)
    for it in range(1, max_iters + 1):
        new_u = tau * (np.log(1.0 / n) - logsumexp(log_k + log_v[None, :], axis=1))
        new_v = tau * (np.log(1.0 / m) - logsumexp(log_k.T + new_u[None, :], axis=1))
        change = max(np.abs(new_u - log_u).max(), np.abs(new_v - log_v).max())
        log_u, log_v = new_u, new_v
        if change < tol:
            break
    return np.exp(log_u[:, None] + log_k + log_v[None, :]), it


def rows(p):
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-8)


def test_relaxation_exponent_is_the_mass():
    for m in (0.1, 0.5, 0.9):
        rho = 0.05 * m / (1 - m)
        assert ot.relaxation_exponent(0.05, m) == pytest.approx(rho / (rho + 0.05), rel=1e-12)
        assert ot.relaxation_exponent(0.05, m) == pytest.approx(m, rel=1e-12)
    assert ot.relaxation_exponent(0.05, 0.9995) == 1.0
    with pytest.raises(ValueError, match="mass"):
        ot.relaxation_exponent(0.05, 0.0)


def test_iterates_equal_the_reference_in_float64():
    """Same map, same order: after k iterations (no early stop) the plans agree to rounding."""
    cost = np.random.default_rng(0).random((7, 30))
    with jax.enable_x64(True):
        for k in (1, 2, 7):
            ours = np.asarray(ot.token_transport_plan(jnp.asarray(cost), max_iters=k, tol=1e-300))
            ref, _ = relaxed_sinkhorn(cost, max_iters=k, tol=0.0)
            np.testing.assert_allclose(ours, rows(ref), rtol=0, atol=1e-14)


def test_converged_plan_equals_the_reference_in_float64():
    """Stopping rules differ (ott: marginal-gradient 1-norm; PISCES: change of log-scalings); run both to a
    tight tolerance and they meet at the same fixed point: agreement 1e-12 absolute (plan entries ~1e-1)."""
    cost = np.random.default_rng(1).random((9, 40))
    with jax.enable_x64(True):
        ours = np.asarray(ot.token_transport_plan(jnp.asarray(cost), max_iters=5000, tol=1e-13))
    ref, iters = relaxed_sinkhorn(cost, max_iters=5000, tol=1e-14)
    assert iters < 5000
    np.testing.assert_allclose(ours, rows(ref), rtol=0, atol=1e-12)


def test_default_settings_close_to_the_reference_in_float32():
    """At PISCES's settings (tol 1e-3, 200 iterations) and a realistic size, in float32: the two stopping
    rules stop near each other; the row-normalised plans agree to 1e-3 of the largest entry (1e-4 here)."""
    rng = np.random.default_rng(2)
    cost = rng.random((24, 1 + 4 * 64))
    ours = np.asarray(ot.token_transport_plan(jnp.asarray(cost, jnp.float32)), np.float64)
    ref, iters = relaxed_sinkhorn(cost)
    ref = rows(ref)
    assert iters < 200
    assert np.abs(ours - ref).max() <= 1e-4 * ref.max()


def test_rows_normalised_and_jit_vmap():
    costs = jnp.asarray(np.random.default_rng(3).random((3, 5, 11)), jnp.float32)
    batched = jax.jit(jax.vmap(ot.token_transport_plan))(costs)
    assert batched.shape == (3, 5, 11) and batched.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(batched).sum(-1), 1.0, atol=1e-5)
    for b in range(3):
        # a batched while-loop freezes each member once it has stopped: the same plan as alone
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(ot.token_transport_plan(costs[b])), atol=1e-6)
        # and at PISCES's settings within 1e-3 of the largest entry of the reference (stopping rules differ)
        ref = rows(relaxed_sinkhorn(np.asarray(costs[b], np.float64))[0])
        assert np.abs(np.asarray(batched[b]) - ref).max() <= 1e-3 * ref.max()
    # tight tolerance, batched: the reference's fixed point
    tight = jax.jit(jax.vmap(lambda c: ot.token_transport_plan(c, max_iters=3000, tol=1e-7)))(costs)
    for b in range(3):
        ref = rows(relaxed_sinkhorn(np.asarray(costs[b], np.float64), max_iters=3000, tol=1e-10)[0])
        np.testing.assert_allclose(np.asarray(tight[b]), ref, atol=1e-5)
    # other static settings go through jit in a closure
    f = jax.jit(lambda c: ot.token_transport_plan(c, epsilon=0.1, mass=0.5, max_iters=500, tol=1e-7))
    ref = rows(relaxed_sinkhorn(np.asarray(costs[0], np.float64), eps=0.1, mass=0.5, max_iters=500, tol=1e-10)[0])
    np.testing.assert_allclose(np.asarray(f(costs[0])), ref, atol=1e-5)


def test_diagonal_cost_gives_a_diagonal_plan():
    n = 6
    cost = np.ones((n, n)) + 0.05 * np.random.default_rng(4).random((n, n))
    np.fill_diagonal(cost, 0.0)
    plan = np.asarray(ot.token_transport_plan(jnp.asarray(cost, jnp.float32)))
    assert (plan.argmax(axis=1) == np.arange(n)).all()
    assert (np.diag(plan) > 0.9).all()


def test_partial_mass_transports_less_than_balanced():
    """Before row normalisation. The kernel is exp(-C / eps) (no a b^T factor), so the relaxed plan's total
    mass is not m: it is below the balanced plan's 1 where transport is dear (exp(-C / eps) << a_i b_j,
    here C in [0.5, 1], eps log(N M) ~ 0.25) and may exceed 1 on a min-max scaled cost whose near-zero
    entries make exp(-C / eps) ~ 1 >> a_i b_j (the second case below)."""
    rng = np.random.default_rng(5)
    dear = 0.5 + 0.5 * rng.random((8, 20))
    balanced, _ = relaxed_sinkhorn(dear, mass=0.9995, max_iters=3000, tol=1e-12)
    partial, _ = relaxed_sinkhorn(dear, mass=0.9, max_iters=3000, tol=1e-12)
    assert balanced.sum() == pytest.approx(1.0, abs=1e-2)
    assert partial.sum() < 0.8 * balanced.sum()
    cheap, _ = relaxed_sinkhorn(rng.random((8, 20)), mass=0.9, max_iters=3000, tol=1e-12)
    assert cheap.sum() > 1.0
    # ott's own unnormalised plan for the same problem (what token_transport_plan normalises) says the same
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn
    with jax.enable_x64(True):
        tau = ot.relaxation_exponent(0.05, 0.9)
        geom = geometry.Geometry(cost_matrix=jnp.asarray(dear.T), epsilon=0.05)
        out = sinkhorn.Sinkhorn(threshold=1e-12, max_iterations=3000, implicit_diff=None)(
            linear_problem.LinearProblem(geom, tau_a=tau, tau_b=tau))
        np.testing.assert_allclose(np.asarray(out.matrix.T), partial, rtol=1e-8, atol=1e-14)


def test_no_gradient_flows_through_the_plan():
    cost = jnp.asarray(np.random.default_rng(6).random((4, 9)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(7).random((4, 9)), jnp.float32)
    g = jax.grad(lambda c: jnp.sum(w * ot.token_transport_plan(c)))(cost)
    assert np.all(np.asarray(g) == 0.0)
    # through the fusion: gradients reach A, not P
    attn = jax.nn.softmax(jnp.asarray(np.random.default_rng(8).standard_normal((4, 9)), jnp.float32))
    ga, gp = jax.grad(lambda a, p: jnp.sum(w * ot.fuse_attention(a, p)), argnums=(0, 1))(attn, attn)
    assert np.abs(np.asarray(ga)).max() > 0 and np.all(np.asarray(gp) == 0.0)


def test_bad_shapes_fail_in_one_line():
    with pytest.raises(ValueError, match=r"cost must be \[N, M\]"):
        ot.token_transport_plan(jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="attn must be"):
        ot.pisces_cost(jnp.ones((3, 4)), jnp.ones((5, 4)), jnp.ones((3, 4)), jnp.zeros(5), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="positions"):
        ot.pisces_cost(jnp.ones((3, 4)), jnp.ones((5, 4)), jnp.ones((3, 5)), jnp.zeros(5), jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        ot.fuse_attention(jnp.ones((2, 3, 4)), jnp.ones((3, 5)))


def cost_reference(y, x, a, t, s, gamma=0.2, eta=0.2):
    """C_ij = clamp(1 - cos, 0, 2) + 0.2 |tau_i - t_j| / T + 0.2 ||pi_i - s_j|| / sqrt 2, min-max scaled."""
    a = a / a.sum(1, keepdims=True)
    cos = (y @ x.T) / np.linalg.norm(y, axis=1)[:, None] / np.linalg.norm(x, axis=1)[None, :]
    big_t = max(t.max() - t.min(), 1.0)
    tau, pi = a @ t, a @ s
    c = np.clip(1 - cos, 0, 2) + gamma * np.abs(tau[:, None] - t[None]) / big_t
    c = c + eta * np.linalg.norm(pi[:, None, :] - s[None], axis=-1) / np.sqrt(2)
    return (c - c.min()) / (c.max() - c.min())


def test_cost_against_numpy():
    rng = np.random.default_rng(9)
    frames, pos = ot.visual_token_geometry(3, 2, 4, with_cls=True)
    m = 1 + 3 * 2 * 4
    assert frames.shape == (m,) and pos.shape == (m, 2)
    assert float(frames[0]) == -1 and float(frames[-1]) == 2 and tuple(np.asarray(pos[0])) == (-1, -1)
    np.testing.assert_allclose(np.asarray(pos[1:9]), [[0, 0], [0, 1 / 3], [0, 2 / 3], [0, 1], [1, 0], [1, 1 / 3],
                                                       [1, 2 / 3], [1, 1]], atol=1e-6)
    y, x = rng.standard_normal((5, 8)), rng.standard_normal((m, 8))
    a = rng.random((5, m))
    ours = ot.pisces_cost(y, x, a, frames, pos)
    ref = cost_reference(y, x, a, np.asarray(frames, np.float64), np.asarray(pos, np.float64))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6)
    assert float(ours.min()) == 0.0 and float(ours.max()) == pytest.approx(1.0, abs=1e-6)
    # an explicit T replaces max t - min t
    ours = ot.pisces_cost(y, x, a, frames, pos, num_frames=5.0)
    c = cost_reference(y, x, a, np.asarray(frames, np.float64), np.asarray(pos, np.float64))
    assert np.abs(np.asarray(ours) - c).max() > 1e-4          # T changed, the cost did
    # the cost feeds the plan end to end, jitted
    plan = jax.jit(lambda *z: ot.token_transport_plan(ot.pisces_cost(*z)))(y, x, a, frames, pos)
    np.testing.assert_allclose(np.asarray(plan), rows(relaxed_sinkhorn(ref)[0]), atol=1e-4)
    # finite gradients at a token that sits exactly on its attention-weighted mean position
    a_peak = np.zeros((5, m))
    a_peak[:, 3] = 1.0
    g = jax.grad(lambda yy: jnp.sum(ot.pisces_cost(yy, x, a_peak, frames, pos)))(jnp.asarray(y, jnp.float32))
    assert np.isfinite(np.asarray(g)).all()


def test_fusion_against_numpy():
    rng = np.random.default_rng(10)
    attn = rng.random((2, 3, 7))
    attn /= attn.sum(-1, keepdims=True)
    attn[0, 0, 0] = 0.0
    plan = rows(rng.random((3, 7)))
    logits = np.log(attn + 1e-6) + np.log(plan + 1e-6)[None]
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    ours = ot.fuse_attention(jnp.asarray(attn, jnp.float32), jnp.asarray(plan, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)
