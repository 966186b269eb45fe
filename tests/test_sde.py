"""Flow-GRPO / DanceGRPO: the SDE steps and log-probs (shelllcc.flow.sde) and the marginals they keep, against
float64 NumPy / SciPy statements written here from ALIGNMENT_METHODS.md section 5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from shelllcc.flow import sde
from shelllcc.flow.samplers import euler_sample
from shelllcc.flow.timesteps import linear_sampling_schedule

# ---------------------------------------------------------------------------------------------------------
# SDE steps
# ---------------------------------------------------------------------------------------------------------


def test_flow_grpo_step_against_the_formula():
    rng = np.random.default_rng(0)
    x, v, xi = (rng.standard_normal((3, 4, 5)) for _ in range(3))
    t, dt, a = np.array([0.9, 0.5, 0.2]), np.array([-0.1, -0.05, -0.2]), 0.7
    s = a * np.sqrt(t / (1 - t))[:, None, None]
    tt, dd = t[:, None, None], dt[:, None, None]
    mean = x + (v + s ** 2 / (2 * tt) * (x + (1 - tt) * v)) * dd
    std = s * np.sqrt(-dd)
    with jax.enable_x64(True):
        x_next, m, sd = sde.flow_grpo_step(jnp.asarray(xi), jnp.asarray(x), jnp.asarray(v), t, dt, a)
    np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sd), std[:, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(x_next), mean + std * xi, rtol=1e-12)
    # a = 0 is the Euler step of shelllcc.flow.samplers (x + (sigma_next - sigma) v, dt < 0)
    sched = linear_sampling_schedule(1)
    vel = lambda z, timestep, ctx: jnp.asarray(v, jnp.float32)
    euler = euler_sample(vel, jnp.asarray(x, jnp.float32), None, sched)
    ours, _, std0 = sde.flow_grpo_step(jnp.zeros_like(jnp.asarray(x, jnp.float32)), jnp.asarray(x, jnp.float32),
                                       jnp.asarray(v, jnp.float32), 0.5, -0.5, a=0.0)
    np.testing.assert_allclose(np.asarray(ours), x - 0.5 * v, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(euler), x - 1.0 * v, rtol=1e-5)  # the schedule's dt = -1
    assert float(std0) == 0.0
    # a key draws the noise: same key, same step; t_cap caps s_t
    k = jax.random.PRNGKey(3)
    xa = sde.flow_grpo_step(k, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32), 0.5, -0.1)[0]
    xb = sde.flow_grpo_step(k, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32), 0.5, -0.1)[0]
    assert np.array_equal(np.asarray(xa), np.asarray(xb))
    assert float(sde.flow_grpo_sigma(1.0, 0.7, t_cap=0.9)) == pytest.approx(0.7 * 3.0, rel=1e-6)


def test_dance_grpo_step_against_the_formula():
    rng = np.random.default_rng(1)
    x, v, xi = (rng.standard_normal((2, 6)) for _ in range(3))
    t, dt, eta = 0.7, -0.1, 0.3
    x0 = x - t * v
    score = -(x - (1 - t) * x0) / t ** 2
    mean = x + (v - eta ** 2 / 2 * score) * dt
    with jax.enable_x64(True):
        x_next, m, sd = sde.dance_grpo_step(jnp.asarray(xi), jnp.asarray(x), jnp.asarray(v), t, dt, eta)
        # the same mean as the Flow-GRPO form with constant diffusion eta
        np.testing.assert_allclose(np.asarray(sde.reverse_sde_mean(jnp.asarray(x), jnp.asarray(v), t, dt, eta)),
                                   mean, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-12)
    assert float(sd) == pytest.approx(eta * np.sqrt(0.1), rel=1e-12)
    np.testing.assert_allclose(np.asarray(x_next), mean + eta * np.sqrt(0.1) * xi, rtol=1e-12)


def test_gaussian_log_prob_closed_form():
    rng = np.random.default_rng(2)
    x, mean = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    std = np.array([0.3, 1.0, 2.5])
    ref = norm.logpdf(x, loc=mean, scale=std[:, None, None]).reshape(3, -1).mean(-1)
    with jax.enable_x64(True):
        ours = sde.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(std))
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-12)
        ours = sde.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), 0.7)
        np.testing.assert_allclose(np.asarray(ours), norm.logpdf(x, mean, 0.7).reshape(3, -1).mean(-1), rtol=1e-12)
    ours32 = sde.gaussian_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32), jnp.asarray(std))
    np.testing.assert_allclose(np.asarray(ours32), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        sde.gaussian_log_prob(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Marginals on Gaussian data with the exact velocity
# ---------------------------------------------------------------------------------------------------------

MU = np.array([1.5, -0.5, 0.0])
SIG = np.array([0.5, 1.0, 2.0])


def exact_velocity(x, timestep, context):
    """x0 ~ N(mu, diag sig^2), eps ~ N(0, I), x_t = (1 - t) x0 + t eps: (v, x_t) jointly Gaussian with
    E v = -mu, Cov(v, x_t) = t - (1 - t) sig^2, Var x_t = (1 - t)^2 sig^2 + t^2, so
    E[v | x_t] = -mu + (t - (1 - t) sig^2) / ((1 - t)^2 sig^2 + t^2) (x_t - (1 - t) mu)."""
    t = (timestep / 1000.0)[:, None]
    mu, sig2 = jnp.asarray(MU, x.dtype), jnp.asarray(SIG ** 2, x.dtype)
    return -mu + (t - (1 - t) * sig2) / ((1 - t) ** 2 * sig2 + t ** 2) * (x - (1 - t) * mu)


N_SAMPLES, N_STEPS = 40_000, 200


@pytest.mark.parametrize("kind", sde.KINDS)
def test_sde_keeps_the_ode_marginals(kind):
    """Final samples of the SDE (from t = 1, 200 uniform steps, 40,000 samples) and of the Euler ODE are
    N(mu, sig^2) within Monte-Carlo error plus the discretisation bias of 200 steps: |mean - mu| <=
    5 sig / sqrt(n) + 0.01 sig, |var / sig^2 - 1| <= 5 sqrt(2 / n) + 0.03 (~0.065; measured bias ~0.01-0.02).
    The state at t = 0.5 has the closed-form marginal N(mu / 2, sig^2 / 4 + 1 / 4) within the same bounds.
    A negative control (no score correction: Euler plus noise) misses the variance by far more."""
    ts = np.linspace(1.0, 0.0, N_STEPS + 1)
    x1 = jax.random.normal(jax.random.PRNGKey(0), (N_SAMPLES, 3))
    run = jax.jit(lambda x, k: sde.sde_sample(exact_velocity, x, ts, k, kind=kind))
    out = run(x1, jax.random.PRNGKey(1))
    assert out["trajectory"].shape == (N_STEPS + 1, N_SAMPLES, 3) and out["log_probs"].shape == (N_STEPS, N_SAMPLES)

    def check(x, mu, var):
        x = np.asarray(x, np.float64)
        sd = np.sqrt(var)
        assert np.all(np.abs(x.mean(0) - mu) <= 5 * sd / np.sqrt(N_SAMPLES) + 0.01 * sd), (x.mean(0), mu)
        assert np.all(np.abs(x.var(0) / var - 1) <= 5 * np.sqrt(2 / N_SAMPLES) + 0.03), (x.var(0), var)

    check(out["x"], MU, SIG ** 2)
    check(out["trajectory"][N_STEPS // 2], 0.5 * MU, 0.25 * SIG ** 2 + 0.25)
    ode = euler_sample(exact_velocity, x1, None, linear_sampling_schedule(N_STEPS))
    check(ode, MU, SIG ** 2)

    # negative control: the same noise without the drift correction (g = 0 in the mean, std kept)
    def no_correction(x, inp):
        t, dt, k = inp
        v = exact_velocity(x, jnp.full((N_SAMPLES,), 1000.0 * t), None)
        g = sde.flow_grpo_sigma(t, t_cap=ts[1]) if kind == "flow_grpo" else sde.DANCE_GRPO_ETA
        return x + v * dt + g * jnp.sqrt(-dt) * jax.random.normal(k, x.shape), None

    bad, _ = jax.lax.scan(no_correction, x1, (jnp.asarray(ts[:-1], jnp.float32), jnp.asarray(np.diff(ts), jnp.float32),
                                             jax.random.split(jax.random.PRNGKey(1), N_STEPS)))
    assert np.max(np.abs(np.asarray(bad).var(0) / SIG ** 2 - 1)) > 0.2


def test_sde_sample_log_probs_and_recomputation():
    """The stored log-probs equal step_log_prob recomputed from the trajectory (what GRPO's ratio does with
    unchanged parameters: ratio 1)."""
    ts = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    x1 = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    for kind in sde.KINDS:
        out = jax.jit(lambda x, k: sde.sde_sample(exact_velocity, x, ts, k, kind=kind))(x1, jax.random.PRNGKey(3))
        for i in range(len(ts) - 1):
            x_t = out["trajectory"][i]
            v = exact_velocity(x_t, jnp.full((4,), 1000.0 * ts[i], jnp.float32), None)
            lp, mean = sde.step_log_prob(kind, x_t, v, out["trajectory"][i + 1], ts[i], ts[i + 1] - ts[i],
                                         t_cap=0.75)
            np.testing.assert_allclose(np.asarray(lp), np.asarray(out["log_probs"][i]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(mean), np.asarray(out["means"][i]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sde.sde_sample(exact_velocity, x1, [0.0, 1.0], jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown SDE kind"):
        sde.sde_sample(exact_velocity, x1, ts, jax.random.PRNGKey(0), kind="ddim")
