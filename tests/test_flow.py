"""Rectified flow: noising, training noise levels, sampling schedule, samplers (parity with diffusers).

References are independent: numpy float64 formulas, Gauss-Hermite quadrature, the closed-form
rectified-flow velocity of a Gaussian, and diffusers' schedulers stepped one by one in torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.flow import (
    FlowSchedule,
    add_noise,
    cfg_velocity,
    denoise,
    euler_sample,
    flow_matching_loss,
    linear_sampling_schedule,
    logit_normal_sigmas,
    loss_guidance,
    model_timestep,
    noise_from_velocity,
    sample,
    sample_training_sigmas,
    shift_sigmas,
    uniform_sigmas,
    unipc_coefficients,
    unipc_sample,
    velocity_from_x0,
    velocity_target,
    wan_sampling_schedule,
)

# ----------------------------------------------------------------------------------------------
# Analytic data: x0 ~ N(mu, diag(sd^2)), eps ~ N(0, I), x_s = (1 - s) x0 + s eps.
# E[x0 | x_s] = mu + (1 - s) sd^2 / var_s (x_s - (1 - s) mu),  E[eps | x_s] = s / var_s (...),
# var_s = (1 - s)^2 sd^2 + s^2, and v = E[eps - x0 | x_s]. The ODE maps z to mu + sd z exactly.
# ----------------------------------------------------------------------------------------------

MU = np.array([0.5, -1.0, 2.0, 0.0])
SD = np.array([0.3, 1.5, 0.1, 1.0])


def gaussian_velocity_np(x, s, mu=MU, sd=SD):
    s = np.asarray(s, np.float64)
    s = s.reshape(s.shape + (1,) * (np.ndim(x) - s.ndim)) if s.ndim else s
    var = (1 - s) ** 2 * sd ** 2 + s ** 2
    centred = x - (1 - s) * mu
    return s / var * centred - (mu + (1 - s) * sd ** 2 / var * centred)


def gaussian_velocity_fn(x, timestep, context):
    """velocity_fn with the data mean taken from ``context`` (``[B, D]`` or None -> MU)."""
    mu = MU if context is None else context
    s = (timestep / 1000.0)[:, None]
    var = (1 - s) ** 2 * SD ** 2 + s ** 2
    centred = x - (1 - s) * mu
    return (s / var * centred - (mu + (1 - s) * SD ** 2 / var * centred)).astype(x.dtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------
# Noising, targets, loss
# ----------------------------------------------------------------------------------------------


def test_noising_target_denoise_against_float64():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4, 5)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = np.array([0.0, 0.37, 1.0], np.float32)
    sb = s.astype(np.float64)[:, None, None, None, None]
    ref = (1 - sb) * x0 + sb * eps
    xs = add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(s))
    np.testing.assert_allclose(xs, ref, rtol=1e-6, atol=1e-6)
    v = velocity_target(jnp.asarray(x0), jnp.asarray(eps))
    np.testing.assert_allclose(v, eps.astype(np.float64) - x0, rtol=1e-6, atol=1e-6)
    # the exact velocity denoises exactly and recovers the noise
    np.testing.assert_allclose(denoise(xs, v, jnp.asarray(s)), x0, atol=2e-6)
    np.testing.assert_allclose(noise_from_velocity(xs, v, jnp.asarray(s)), eps, atol=2e-6)
    np.testing.assert_allclose(velocity_from_x0(xs[1:], x0[1:], jnp.asarray(s[1:])), v[1:], atol=1e-5)
    # scalar s broadcasts
    np.testing.assert_allclose(add_noise(jnp.asarray(x0), jnp.asarray(eps), 0.25),
                               0.75 * x0.astype(np.float64) + 0.25 * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model_timestep(jnp.asarray(s)), 1000.0 * s)
    with pytest.raises(ValueError):
        add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.ones((2,)))


def test_flow_matching_loss_against_float64():
    rng = np.random.default_rng(1)
    x0, eps, vp = (rng.standard_normal((4, 3, 5)).astype(np.float32) for _ in range(3))
    err = (vp.astype(np.float64) - (eps.astype(np.float64) - x0)) ** 2
    np.testing.assert_allclose(flow_matching_loss(vp, x0, eps), err.mean(), rtol=1e-6)
    w = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    np.testing.assert_allclose(flow_matching_loss(vp, x0, eps, w),
                               (err * w[:, None, None]).mean(), rtol=1e-6)
    we = rng.uniform(size=x0.shape).astype(np.float32)
    np.testing.assert_allclose(flow_matching_loss(vp, x0, eps, we), (err * we).mean(), rtol=1e-6)
    # the exact target gives zero loss; bf16 model output is accumulated in float32
    assert float(flow_matching_loss(eps - x0, x0, eps)) == 0.0
    assert flow_matching_loss(jnp.asarray(vp, jnp.bfloat16), x0, eps).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Training noise levels and the shift map
# ----------------------------------------------------------------------------------------------


def test_shift_map_fixed_points_monotone_group():
    s = np.linspace(0.0, 1.0, 1001)
    for k in (0.5, 1.0, 3.0, 5.0, 12.0):
        y = shift_sigmas(s, k)
        assert y[0] == 0.0 and y[-1] == 1.0
        assert np.all(np.diff(y) > 0)
        np.testing.assert_allclose(shift_sigmas(y, 1.0 / k), s, atol=1e-12)  # inverse
        np.testing.assert_allclose(shift_sigmas(shift_sigmas(s, k), 2.0), shift_sigmas(s, 2.0 * k),
                                   atol=1e-12)  # composition multiplies shifts
        if k > 1:
            assert np.all(y[1:-1] > s[1:-1])  # mass moves towards noise
    np.testing.assert_array_equal(shift_sigmas(s, 1.0), s)
    np.testing.assert_allclose(shift_sigmas(jnp.asarray(s, jnp.float32), 3.0), shift_sigmas(s, 3.0),
                               atol=1e-6)
    with pytest.raises(ValueError):
        shift_sigmas(s, 0.0)


def test_uniform_sigmas_range_and_moments():
    key = jax.random.PRNGKey(0)
    s = np.asarray(uniform_sigmas(key, (100_000,), 0.7, 1.0))
    assert s.min() >= 0.7 and s.max() < 1.0
    assert abs(s.mean() - 0.85) < 5 * 0.3 / np.sqrt(12 * 100_000)
    assert abs(s.var() - 0.3 ** 2 / 12) < 2e-4
    with pytest.raises(ValueError):
        uniform_sigmas(key, (3,), 0.8, 0.2)


def test_logit_normal_moments_vs_quadrature():
    n = 200_000
    for mean, std in ((0.0, 1.0), (-0.5, 0.7), (1.0, 1.5)):
        s = np.asarray(logit_normal_sigmas(jax.random.PRNGKey(3), (n,), mean, std), np.float64)
        assert s.min() > 0.0 and s.max() < 1.0
        logit = np.log(s) - np.log1p(-s)
        assert abs(logit.mean() - mean) < 5 * std / np.sqrt(n)
        assert abs(logit.std() - std) < 5 * std / np.sqrt(2 * n)
        # E[sigmoid(mean + std Z)] and Var by probabilists' Gauss-Hermite quadrature
        z, w = np.polynomial.hermite_e.hermegauss(80)
        w = w / w.sum()
        f = 1 / (1 + np.exp(-(mean + std * z)))
        m_th = np.sum(w * f)
        v_th = np.sum(w * f ** 2) - m_th ** 2
        assert abs(s.mean() - m_th) < 5 * np.sqrt(v_th / n)
        assert abs(s.var() - v_th) < 0.02 * v_th


def test_sample_training_sigmas_shift_and_dispatch():
    key = jax.random.PRNGKey(7)
    base = sample_training_sigmas(key, (50_000,), "logit_normal", mean=0.2, std=0.8)
    np.testing.assert_array_equal(base, logit_normal_sigmas(key, (50_000,), 0.2, 0.8))
    shifted = np.asarray(sample_training_sigmas(key, (50_000,), "logit_normal", mean=0.2, std=0.8,
                                                shift=3.0))
    np.testing.assert_allclose(shifted, shift_sigmas(np.asarray(base, np.float64), 3.0), atol=1e-6)
    # shifted uniform: P(s' <= y) = shift_{1/k}(y)
    su = np.asarray(sample_training_sigmas(key, (100_000,), "uniform", shift=5.0))
    for y in (0.1, 0.5, 0.8, 0.95):
        assert abs(np.mean(su <= y) - shift_sigmas(y, 1 / 5.0)) < 5 * 0.5 / np.sqrt(100_000)
    assert sample_training_sigmas(key, (2, 3), "uniform", lo=0.7, hi=1.0).shape == (2, 3)
    with pytest.raises(ValueError):
        sample_training_sigmas(key, (3,), "beta")


# ----------------------------------------------------------------------------------------------
# Inference schedule vs diffusers
# ----------------------------------------------------------------------------------------------


def _wan_unipc(shift):
    # how the Wan pipeline configures its scheduler (diffusers docs): everything else default,
    # i.e. solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
    # final_sigmas_type="zero", timestep_spacing="linspace", num_train_timesteps=1000
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=shift)


@pytest.mark.parametrize("n", [1, 2, 7, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_wan_schedule_equals_diffusers(n, shift):
    sch = _wan_unipc(shift)
    sch.set_timesteps(n)
    ours = wan_sampling_schedule(n, shift)
    assert ours.num_steps == n == len(sch.timesteps)
    np.testing.assert_array_equal(ours.sigmas, sch.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, sch.timesteps.numpy().astype(np.float32))
    assert ours.sigmas[-1] == 0.0 and 0.999 < ours.sigmas[0] < 1.0
    cont = wan_sampling_schedule(n, shift, integer_timesteps=False)
    np.testing.assert_array_equal(cont.sigmas, ours.sigmas)
    np.testing.assert_allclose(cont.timesteps, 1000.0 * ours.sigmas[:-1], rtol=1e-6)
    assert hash(cont) == hash(wan_sampling_schedule(n, shift, integer_timesteps=False))


def test_schedule_validation():
    with pytest.raises(ValueError):
        FlowSchedule(sigmas=np.array([0.5, 0.7, 0.0]), timesteps=np.array([500.0, 700.0]))
    with pytest.raises(ValueError):
        FlowSchedule(sigmas=np.array([0.9, 0.0]), timesteps=np.array([900.0, 1.0]))
    lin = linear_sampling_schedule(4, shift=1.0)
    np.testing.assert_allclose(lin.sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError):
        unipc_coefficients(lin.sigmas)  # log-SNR solver needs sigma < 1


# ----------------------------------------------------------------------------------------------
# Samplers vs diffusers, step by step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,shift", [(1, 3.0), (2, 3.0), (3, 1.0), (10, 5.0), (25, 3.0)])
def test_unipc_matches_diffusers(n, shift):
    import torch
    sch = _wan_unipc(shift)
    sch.set_timesteps(n)
    z = np.random.default_rng(n).standard_normal((64, 4))
    x = torch.tensor(z, dtype=torch.float64)
    for i, t in enumerate(sch.timesteps):
        v = torch.tensor(gaussian_velocity_np(x.numpy(), float(sch.sigmas[i])))
        x = sch.step(v, t, x).prev_sample
    ref = x.numpy()
    ours = unipc_sample(gaussian_velocity_fn, jnp.asarray(z, jnp.float32), None,
                        wan_sampling_schedule(n, shift, integer_timesteps=False))
    assert rel(ours, ref) < 1e-5


def test_unipc_orders():
    co = unipc_coefficients(wan_sampling_schedule(6, 3.0).sigmas)
    np.testing.assert_array_equal(co.predictor_order, [1, 2, 2, 2, 2, 1])
    np.testing.assert_array_equal(co.corrector_order, [0, 1, 2, 2, 2, 2])
    # the last step lands on sigma = 0: x_n = m_{n-1}, the data estimate
    assert co.a[-1] == 0.0 and co.b[-1] == 1.0 and co.cp[-1] == 0.0


@pytest.mark.parametrize("n,shift", [(4, 3.0), (20, 5.0)])
def test_euler_matches_diffusers(n, shift):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    schedule = wan_sampling_schedule(n, shift, integer_timesteps=False)
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)  # identity shift: use our sigmas as given
    sch.set_timesteps(sigmas=list(schedule.sigmas[:-1]))
    np.testing.assert_array_equal(sch.sigmas.numpy(), schedule.sigmas)
    z = np.random.default_rng(n).standard_normal((64, 4)).astype(np.float32)
    x = torch.tensor(z)
    for i, t in enumerate(sch.timesteps):
        v = torch.tensor(gaussian_velocity_np(x.numpy(), float(sch.sigmas[i])).astype(np.float32))
        x = sch.step(v, t, x).prev_sample
    ours = euler_sample(gaussian_velocity_fn, jnp.asarray(z), None, schedule)
    assert rel(ours, x.numpy()) < 1e-5


# ----------------------------------------------------------------------------------------------
# Convergence with the exact Gaussian velocity
# ----------------------------------------------------------------------------------------------


def test_samplers_converge_and_unipc_beats_euler():
    z = np.random.default_rng(0).standard_normal((4000, 4)).astype(np.float32)
    exact = MU + SD * z

    def err(fn, n):
        out = fn(gaussian_velocity_fn, jnp.asarray(z), None,
                 wan_sampling_schedule(n, 1.0, integer_timesteps=False))
        return float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2)))

    e_eu = [err(euler_sample, n) for n in (10, 20, 40)]
    e_uni = [err(unipc_sample, n) for n in (10, 20, 40)]
    assert e_eu[0] / e_eu[2] > 3.0  # first order: ~4x from 4x the steps
    assert e_uni[0] / e_uni[2] > 10.0  # second order: ~16x
    assert all(u * 4 < e for u, e in zip(e_uni, e_eu))
    # the samples are distributed as the data (statistical tolerance on 4000 draws)
    out = np.asarray(unipc_sample(gaussian_velocity_fn, jnp.asarray(z), None,
                                  wan_sampling_schedule(40, 1.0, integer_timesteps=False)))
    assert np.all(np.abs(out.mean(0) - MU) < 5 * SD / np.sqrt(len(z)))
    assert np.all(np.abs(out.std(0) / SD - 1) < 0.07)
    # Wan's schedule (shift 3, 50 steps) stops evaluating at sigma_{n-1} ~ 0.06 and returns the
    # data estimate there, E[x0 | x_s]: the mean is right, the spread is the posterior mean's,
    # (1 - s) sd^2 / sqrt(var_s) -- visibly below sd only for the narrow (sd = 0.1) dimension
    wan = wan_sampling_schedule(50, 3.0, integer_timesteps=False)
    out3 = np.asarray(sample(gaussian_velocity_fn, jnp.asarray(z), None, wan))
    s = float(wan.sigmas[-2])
    std_th = (1 - s) * SD ** 2 / np.sqrt((1 - s) ** 2 * SD ** 2 + s ** 2)
    assert np.all(np.abs(out3.mean(0) - MU) < 5 * SD / np.sqrt(len(z)))
    assert np.all(np.abs(out3.std(0) / std_th - 1) < 0.07)
    assert out3.std(0)[2] < 0.9 * SD[2]


# ----------------------------------------------------------------------------------------------
# CFG, guidance hook, jit
# ----------------------------------------------------------------------------------------------


def test_cfg_scale_one_is_conditional_and_skips_uncond():
    z = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4)), jnp.float32)
    ctx = jnp.tile(jnp.asarray(MU, jnp.float32), (8, 1))
    calls = []

    def counting(x, t, c):
        calls.append(c is None)
        return gaussian_velocity_fn(x, t, c)

    sched = wan_sampling_schedule(8, 3.0, integer_timesteps=False)
    for fn in (euler_sample, unipc_sample):
        calls.clear()
        a = fn(counting, z, ctx, sched, negative_context=None, guidance_scale=1.0)
        assert calls == [False]  # traced once by scan, conditional only
        b = fn(gaussian_velocity_fn, z, ctx, sched)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        unipc_sample(gaussian_velocity_fn, z, ctx, sched, guidance_scale=3.0)


def test_cfg_formula():
    # the Gaussian velocity is affine in mu with weights summing to 1, so
    # v(mu_u) + g (v(mu_c) - v(mu_u)) = v(mu_u + g (mu_c - mu_u)): CFG samples that Gaussian
    z = jnp.asarray(np.random.default_rng(3).standard_normal((16, 4)), jnp.float32)
    mu_c = jnp.tile(jnp.asarray([1.0, 0.5, -0.5, 2.0], jnp.float32), (16, 1))
    mu_u = jnp.tile(jnp.asarray([0.0, 0.0, 0.0, 0.0], jnp.float32), (16, 1))
    g = 4.0
    sched = wan_sampling_schedule(12, 3.0, integer_timesteps=False)
    for fn in (euler_sample, unipc_sample):
        guided = fn(gaussian_velocity_fn, z, mu_c, sched, negative_context=mu_u, guidance_scale=g)
        direct = fn(gaussian_velocity_fn, z, mu_u + g * (mu_c - mu_u), sched)
        np.testing.assert_allclose(guided, direct, rtol=1e-5, atol=1e-5)
    # a single evaluation, traced guidance scale
    x = z * 0.7
    t = jnp.full((16,), 600.0)
    vc, vu = gaussian_velocity_fn(x, t, mu_c), gaussian_velocity_fn(x, t, mu_u)
    got = jax.jit(lambda s: cfg_velocity(gaussian_velocity_fn, x, t, mu_c, mu_u, s))(jnp.float32(2.5))
    np.testing.assert_allclose(got, vu + 2.5 * (vc - vu), rtol=1e-6, atol=1e-6)


def test_guidance_interval_guides_only_its_noise_levels():
    # per step, CFG of the Gaussian velocity is the velocity of mu_u + g_i (mu_c - mu_u) (see test_cfg_formula),
    # with g_i = g inside [lo, hi] and 1 outside: an Euler loop of that in float64 numpy is the reference
    rng = np.random.default_rng(4)
    z = rng.standard_normal((6, 4))
    mu_c, mu_u = np.array([1.0, 0.5, -0.5, 2.0]), np.array([0.2, -0.1, 0.0, 0.3])
    g, interval = 4.0, (0.3, 0.8)
    sched = wan_sampling_schedule(12, 3.0, integer_timesteps=False)
    sig = np.asarray(sched.sigmas, np.float64)
    inside = (sig[:-1] >= interval[0]) & (sig[:-1] <= interval[1])
    assert 0 < inside.sum() < len(inside)          # the interval splits the schedule
    x = z.copy()
    for i in range(len(sig) - 1):
        mu = mu_u + (g if inside[i] else 1.0) * (mu_c - mu_u)
        x = x + (sig[i + 1] - sig[i]) * gaussian_velocity_np(x, sig[i], mu=mu)
    args = (gaussian_velocity_fn, jnp.asarray(z, jnp.float32), jnp.tile(jnp.asarray(mu_c, jnp.float32), (6, 1)), sched)
    neg = jnp.tile(jnp.asarray(mu_u, jnp.float32), (6, 1))
    got = euler_sample(*args, negative_context=neg, guidance_scale=g, guidance_interval=interval)
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
    for fn in (euler_sample, unipc_sample):
        whole = fn(*args, negative_context=neg, guidance_scale=g)
        np.testing.assert_allclose(fn(*args, negative_context=neg, guidance_scale=g, guidance_interval=(0.0, 1.0)),
                                   whole, rtol=1e-6, atol=1e-6)
        cond = fn(*args)
        np.testing.assert_allclose(fn(*args, negative_context=neg, guidance_scale=g, guidance_interval=(2.0, 3.0)),
                                   cond, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_interval"):
        unipc_sample(*args, negative_context=neg, guidance_scale=g, guidance_interval=(0.8, 0.3))


def test_guidance_hook_moves_towards_target():
    z = jnp.asarray(np.random.default_rng(4).standard_normal((256, 4)), jnp.float32)
    target = jnp.asarray([2.0, 2.0, 2.0, 2.0], jnp.float32)
    sched = wan_sampling_schedule(20, 3.0, integer_timesteps=False)
    hook = loss_guidance(lambda x0: 0.5 * jnp.sum((x0 - target) ** 2, axis=-1), strength=0.2)
    seen = []

    def recording(x0, s):
        seen.append((x0.shape, s.shape))
        return hook(x0, s)

    for fn in (euler_sample, unipc_sample):
        free = fn(gaussian_velocity_fn, z, None, sched)
        guided = fn(gaussian_velocity_fn, z, None, sched, guidance_fn=recording)
        d_free = jnp.linalg.norm(free - target, axis=-1)
        d_guided = jnp.linalg.norm(guided - target, axis=-1)
        assert float(d_guided.mean()) < float(d_free.mean()) - 0.1
        assert float(jnp.mean(d_guided < d_free)) > 0.95
        # a zero hook is a no-op
        same = fn(gaussian_velocity_fn, z, None, sched, guidance_fn=lambda x0, s: jnp.zeros_like(x0))
        np.testing.assert_allclose(same, free, rtol=1e-5, atol=1e-5)
    assert seen[0] == ((256, 4), (256,))


def test_jit_matches_eager_and_is_differentiable():
    z = jnp.asarray(np.random.default_rng(5).standard_normal((8, 4)), jnp.float32)
    ctx = jnp.tile(jnp.asarray(MU, jnp.float32), (8, 1))
    neg = ctx * 0.5
    sched = wan_sampling_schedule(10, 3.0)  # integer timesteps, as the pipeline
    for fn in (euler_sample, unipc_sample):
        eager = fn(gaussian_velocity_fn, z, ctx, sched, negative_context=neg, guidance_scale=5.0)
        jitted = jax.jit(lambda z, c, n: fn(gaussian_velocity_fn, z, c, sched, negative_context=n,
                                             guidance_scale=5.0))(z, ctx, neg)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
        # schedule as a static argument
        st = jax.jit(lambda z, schedule: fn(gaussian_velocity_fn, z, None, schedule),
                     static_argnums=1)(z, sched)
        np.testing.assert_allclose(st, fn(gaussian_velocity_fn, z, None, sched), rtol=1e-6, atol=1e-6)
        # backprop through the sampler (reward fine-tuning through sampling), with remat: the gradient
        # equals the one without remat, and a central difference along a random direction. The samples are
        # affine in the data mean (the context) here, so the difference quotient is exact up to float32
        # rounding of the sums, whatever the step h (measured: relative difference <= 5e-7, float32).
        def total(c, remat):
            return jnp.sum(fn(gaussian_velocity_fn, z, c, sched, remat=remat))

        gr = jax.grad(total)(ctx, True)
        np.testing.assert_allclose(gr, jax.grad(total)(ctx, False), rtol=1e-6, atol=1e-6)
        direction = jnp.asarray(np.random.default_rng(6).standard_normal(ctx.shape), jnp.float32)
        h = 0.5
        quotient = (float(total(ctx + h * direction, False)) - float(total(ctx - h * direction, False))) / (2 * h)
        assert float(jnp.linalg.norm(gr)) > 1.0
        np.testing.assert_allclose(float(jnp.vdot(gr, direction)), quotient, rtol=5e-6)
    x, traj = unipc_sample(gaussian_velocity_fn, z, None, sched, return_trajectory=True)
    assert traj.shape == (10, 8, 4)
    np.testing.assert_array_equal(traj[0], z)
    with pytest.raises(ValueError):
        sample(gaussian_velocity_fn, z, None, sched, solver="heun")
