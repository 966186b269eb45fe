"""Generator objectives (shelllcc.flow.objectives) against float64 NumPy re-statements."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.flow.objectives import noised_data, one_step_from_noise, sft_loss
from shelllcc.flow.rectified import add_noise, denoise
from shelllcc.flow.timesteps import sample_training_sigmas, uniform_sigmas
from shelllcc.rewards.manifold_distance import manifold_distance
from tests import reference_math as ref
from tests.helpers import random_manifold

SHAPE = (3, 2, 3, 3, 4)  # [B, T, H, W, C]
B, C = SHAPE[0], SHAPE[-1]


def _problem(seed=0):
    r = np.random.default_rng(seed)
    return dict(
        M=(np.eye(C) * 0.3 + 0.2 * r.standard_normal((C, C))).astype(np.float32),
        u=(1e-3 * r.standard_normal(C)).astype(np.float32),
        c=(0.1 * r.standard_normal((B, C))).astype(np.float32),
        x0=r.standard_normal(SHAPE).astype(np.float32),
        eps=r.standard_normal(SHAPE).astype(np.float32),
        target=(0.5 * r.standard_normal(SHAPE)).astype(np.float32),
    )


def _velocity(M, u):
    """Linear model ``v = x @ M + t u + c`` (per-example context added over T, H, W)."""
    def fn(x, t, c):
        return x @ M + t[:, None, None, None, None] * u + c[:, None, None, None, :]
    return fn


def _np_velocity(x, t, c, M, u):
    f = np.float64
    return x.astype(f) @ M.astype(f) + t.astype(f)[:, None, None, None, None] * u.astype(f) \
        + c.astype(f)[:, None, None, None, :]


def _np_reward(z, target):
    return np.mean((z - target.astype(np.float64)) ** 2)


def _quad_reward(target):
    return lambda z: jnp.mean(jnp.square(z - target))


def _bs(s):
    return np.asarray(s, np.float64)[:, None, None, None, None]


# float64 re-statements of DESIGN 2.5 -----------------------------------------------------------


def _np_one_step(M, u, c, eps, target, s, M_ref=None, margin=0.0, weight=1.0):
    x, s64 = eps.astype(np.float64), np.asarray(s, np.float64)
    z = x - _bs(s64) * _np_velocity(eps, 1000 * s64, c, M, u)
    loss = _np_reward(z, target)
    if M_ref is not None:
        z_ref = x - _bs(s64) * _np_velocity(eps, 1000 * s64, c, M_ref, u)
        loss += weight * max(np.mean((z - z_ref) ** 2) - margin, 0.0)
    return loss


def _np_noised(M, u, c, x0, eps, target, s, sft_weight):
    s64 = np.asarray(s, np.float64)
    x = (1 - _bs(s64)) * x0.astype(np.float64) + _bs(s64) * eps.astype(np.float64)
    v = _np_velocity(x, 1000 * s64, c, M, u)
    z = x - _bs(s64) * v
    sft = np.mean((v - (eps.astype(np.float64) - x0.astype(np.float64))) ** 2)
    return _np_reward(z, target) + sft_weight * sft


def _np_sft(M, u, c, x0, eps, s):
    return _np_noised(M, u, c, x0, eps, np.zeros_like(x0), s, 1.0) - _np_noised(
        M, u, c, x0, eps, np.zeros_like(x0), s, 0.0)


def _fd_grad(f, M, h=1e-5):
    M = M.astype(np.float64)
    g = np.zeros_like(M)
    for idx in np.ndindex(M.shape):
        d = np.zeros_like(M)
        d[idx] = h
        g[idx] = (f(M + d) - f(M - d)) / (2 * h)
    return g


def _close(a, b, rtol=1e-5, atol=0.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# one-step from noise ----------------------------------------------------------------------------


def test_one_step_matches_reference_and_key_draw():
    p = _problem()
    key = jax.random.PRNGKey(3)
    s = np.asarray(uniform_sigmas(key, (B,), 0.7, 1.0))
    loss, m = one_step_from_noise(_velocity(p["M"], p["u"]), _quad_reward(p["target"]), p["eps"], p["c"], key)
    ref = _np_one_step(p["M"], p["u"], p["c"], p["eps"], p["target"], s)
    _close(loss, ref)
    _close(m["reward"], ref)
    assert float(m["drift_mse"]) == 0.0 and float(m["drift_penalty"]) == 0.0
    _close(m["s_mean"], s.mean(), rtol=1e-6)
    # an explicit s gives the same value as the key draw it equals
    loss2, _ = one_step_from_noise(_velocity(p["M"], p["u"]), _quad_reward(p["target"]), p["eps"], p["c"],
                                   None, s=s)
    _close(loss2, loss, rtol=1e-7)


def test_one_step_with_drift_value_and_grad():
    p = _problem(1)
    M_ref = p["M"] + 0.05 * np.random.default_rng(9).standard_normal((C, C)).astype(np.float32)
    s = np.array([0.72, 0.85, 0.99], np.float32)
    margin, weight = 1e-4, 2.5

    def f(M):
        return one_step_from_noise(_velocity(M, p["u"]), _quad_reward(p["target"]), p["eps"], p["c"], None,
                                   s=s, ref_velocity_fn=_velocity(M_ref, p["u"]), drift_margin=margin,
                                   drift_weight=weight)

    loss, m = f(jnp.asarray(p["M"]))
    ref_fn = functools.partial(_np_one_step, u=p["u"], c=p["c"], eps=p["eps"], target=p["target"], s=s,
                               M_ref=M_ref, margin=margin, weight=weight)
    _close(loss, ref_fn(p["M"]))
    assert float(m["drift_mse"]) > margin  # the penalty is active, so its gradient is tested too
    g = jax.grad(lambda M: f(M)[0])(jnp.asarray(p["M"]))
    _close(g, _fd_grad(lambda M: ref_fn(M), p["M"]), rtol=1e-4, atol=1e-6)


def test_drift_zero_for_reference_model_and_grows_with_deviation():
    p = _problem(2)
    s = np.array([0.7, 0.8, 0.95], np.float32)
    reward = _quad_reward(p["target"])
    base, _ = one_step_from_noise(_velocity(p["M"], p["u"]), reward, p["eps"], p["c"], None, s=s)
    for margin in (0.0, 0.1):
        loss, m = one_step_from_noise(_velocity(p["M"], p["u"]), reward, p["eps"], p["c"], None, s=s,
                                      ref_velocity_fn=_velocity(p["M"], p["u"]), drift_margin=margin,
                                      drift_weight=10.0)
        assert float(m["drift_mse"]) == 0.0 and float(m["drift_penalty"]) == 0.0
        _close(loss, base, rtol=1e-7)
    dM = np.random.default_rng(0).standard_normal((C, C)).astype(np.float32)
    penalties = []
    for scale in (0.01, 0.03, 0.1):
        _, m = one_step_from_noise(_velocity(p["M"] + scale * dM, p["u"]), reward, p["eps"], p["c"], None,
                                   s=s, ref_velocity_fn=_velocity(p["M"], p["u"]))
        penalties.append(float(m["drift_penalty"]))
    assert 0.0 < penalties[0] < penalties[1] < penalties[2]


def test_reference_model_gets_no_gradient():
    p = _problem(3)
    s = np.array([0.75, 0.8, 0.9], np.float32)

    def f(M_ref):
        return one_step_from_noise(_velocity(p["M"] * 1.1, p["u"]), _quad_reward(p["target"]), p["eps"],
                                   p["c"], None, s=s, ref_velocity_fn=_velocity(M_ref, p["u"]))[0]

    g = jax.grad(f)(jnp.asarray(p["M"]))
    assert float(jnp.max(jnp.abs(g))) == 0.0


# noised data and SFT ----------------------------------------------------------------------------


def test_noised_data_value_and_grad():
    p = _problem(4)
    key = jax.random.PRNGKey(7)
    s = np.asarray(uniform_sigmas(key, (B,), 0.3, 0.9))

    def f(M, sft_weight=0.5):
        return noised_data(_velocity(M, p["u"]), _quad_reward(p["target"]), p["x0"], p["eps"], p["c"], key,
                           s_lo=0.3, s_hi=0.9, sft_weight=sft_weight)

    loss, m = f(jnp.asarray(p["M"]))
    ref_fn = functools.partial(_np_noised, u=p["u"], c=p["c"], x0=p["x0"], eps=p["eps"], target=p["target"],
                               s=s, sft_weight=0.5)
    _close(loss, ref_fn(p["M"]))
    _close(m["sft"], _np_sft(p["M"], p["u"], p["c"], p["x0"], p["eps"], s))
    g = jax.grad(lambda M: f(M)[0])(jnp.asarray(p["M"]))
    _close(g, _fd_grad(lambda M: ref_fn(M), p["M"]), rtol=1e-4, atol=1e-6)


def test_noised_data_without_sft_is_reward_on_denoise():
    p = _problem(5)
    s = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    vel, reward = _velocity(p["M"], p["u"]), _quad_reward(p["target"])
    loss, m = noised_data(vel, reward, p["x0"], p["eps"], p["c"], None, s=s, sft_weight=0.0)
    x = add_noise(p["x0"], p["eps"], s)
    expected = reward(denoise(x, vel(x, 1000.0 * s, p["c"]), s))
    _close(loss, expected, rtol=1e-6)
    _close(m["reward"], expected, rtol=1e-6)


def test_sft_loss_matches_reference_with_sampler():
    p = _problem(6)
    key = jax.random.PRNGKey(11)
    sampler = functools.partial(sample_training_sigmas, distribution="logit_normal", shift=3.0)
    s = np.asarray(sampler(key, (B,)))
    loss, m = sft_loss(_velocity(p["M"], p["u"]), p["x0"], p["eps"], p["c"], key, sigma_sampler=sampler)
    _close(loss, _np_sft(p["M"], p["u"], p["c"], p["x0"], p["eps"], s))
    _close(m["s_mean"], s.mean(), rtol=1e-6)
    g = jax.grad(lambda M: sft_loss(_velocity(M, p["u"]), p["x0"], p["eps"], p["c"], key,
                                    sigma_sampler=sampler)[0])(jnp.asarray(p["M"]))
    _close(g, _fd_grad(lambda M: _np_sft(M, p["u"], p["c"], p["x0"], p["eps"], s), p["M"]),
           rtol=1e-4, atol=1e-6)


def test_noise_levels_in_range():
    p = _problem(7)
    vel, reward = _velocity(p["M"], p["u"]), (lambda z: jnp.mean(z ** 2))
    eps = np.repeat(p["eps"], 22, axis=0)[:64]
    c = np.repeat(p["c"], 22, axis=0)[:64]
    x0 = np.repeat(p["x0"], 22, axis=0)[:64]
    for i in range(5):
        key = jax.random.PRNGKey(100 + i)
        _, m = one_step_from_noise(vel, reward, eps, c, key, s_lo=0.7, s_hi=1.0)
        assert 0.7 <= float(m["s_min"]) <= float(m["s_max"]) <= 1.0
        _, m = noised_data(vel, reward, x0, eps, c, key, s_lo=0.2, s_hi=0.4)
        assert 0.2 <= float(m["s_min"]) <= float(m["s_max"]) <= 0.4


def test_model_called_once_per_objective():
    p = _problem(8)
    calls = {"model": 0, "ref": 0}
    base = _velocity(p["M"], p["u"])

    def counted(name):
        def fn(x, t, c):
            calls[name] += 1
            return base(x, t, c)
        return fn

    reward = _quad_reward(p["target"])
    key = jax.random.PRNGKey(0)
    with jax.disable_jit():
        one_step_from_noise(counted("model"), reward, p["eps"], p["c"], key, ref_velocity_fn=counted("ref"))
        assert calls == {"model": 1, "ref": 1}
        noised_data(counted("model"), reward, p["x0"], p["eps"], p["c"], key, sft_weight=1.0)
        assert calls["model"] == 2
        sft_loss(counted("model"), p["x0"], p["eps"], p["c"], key)
        assert calls == {"model": 3, "ref": 1}


# the real manifold reward -----------------------------------------------------------------------


def _np_shell_per_example(p64, z):
    """Per-example ``shell`` distance of ``[B, T, H, W, 16]`` latents (1x1x1 patches), float64."""
    return np.array([ref.distance(p64, zb.reshape(-1, zb.shape[-1]), "shell") for zb in z])


def test_real_manifold_reward_under_jit():
    """The three objectives with the real manifold reward, jitted together: the loss, every metric and the
    gradient equal a float64 NumPy evaluation of the same formulas (reference_math's shell distance)."""
    params, cfg = random_manifold(0, dim=16)
    p64 = ref.to_numpy(params)
    shape = (2, 3, 4, 4, 16)
    r = np.random.default_rng(0)
    M = np.asarray(np.eye(16) * 0.5 + 0.1 * r.standard_normal((16, 16)), np.float32)
    u = np.asarray(1e-3 * r.standard_normal(16), np.float32)
    c = np.asarray(0.1 * r.standard_normal((2, 16)), np.float32)
    x0 = np.asarray(r.standard_normal(shape), np.float32)
    eps = np.asarray(r.standard_normal(shape), np.float32)
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    # the noise levels each objective draws from its key (the draw itself: test_one_step_matches_reference...)
    s1, s2, s3 = (np.asarray(uniform_sigmas(k, (2,), lo, 1.0), np.float64) for k, lo in ((k1, 0.7), (k2, 0.2),
                                                                                       (k3, 0.0)))
    m_ref = 0.9 * M.astype(np.float64)                  # the frozen reference: 0.9 x the evaluation point

    def reward(z):
        return manifold_distance(params, z, "shell", per_example=True)

    @jax.jit
    def all_objectives(M, key):
        k1, k2, k3 = jax.random.split(key, 3)
        l1, m1 = one_step_from_noise(_velocity(M, u), reward, eps, c, k1,
                                     ref_velocity_fn=_velocity(jax.lax.stop_gradient(M) * 0.9, u),
                                     drift_margin=0.0)
        l2, m2 = noised_data(_velocity(M, u), reward, x0, eps, c, k2, s_lo=0.2, s_hi=1.0, sft_weight=0.3)
        l3, m3 = sft_loss(_velocity(M, u), x0, eps, c, k3)
        return l1 + l2 + l3, (m1, m2, m3)

    def np_all(M):
        """float64: (loss, metrics of the three objectives)."""
        e64, x064 = eps.astype(np.float64), x0.astype(np.float64)
        z1 = e64 - _bs(s1) * _np_velocity(eps, 1000 * s1, c, M, u)
        z1_ref = e64 - _bs(s1) * _np_velocity(eps, 1000 * s1, c, m_ref, u)
        r1, drift = _np_shell_per_example(p64, z1).mean(), np.mean((z1 - z1_ref) ** 2)
        x2 = (1 - _bs(s2)) * x064 + _bs(s2) * e64
        v2 = _np_velocity(x2, 1000 * s2, c, M, u)
        r2 = _np_shell_per_example(p64, x2 - _bs(s2) * v2).mean()
        sft2 = np.mean((v2 - (e64 - x064)) ** 2)
        x3 = (1 - _bs(s3)) * x064 + _bs(s3) * e64
        sft3 = np.mean((_np_velocity(x3, 1000 * s3, c, M, u) - (e64 - x064)) ** 2)
        loss = (r1 + max(drift, 0.0)) + (r2 + 0.3 * sft2) + sft3
        return loss, ({"reward": r1, "drift_mse": drift}, {"reward": r2, "sft": sft2}, {"sft": sft3})

    (loss, metrics), g = jax.value_and_grad(all_objectives, has_aux=True)(jnp.asarray(M), key)
    want_loss, want_metrics = np_all(M.astype(np.float64))
    _close(loss, want_loss)
    assert want_metrics[0]["drift_mse"] > 1e-3           # the drift penalty is active
    for got_m, want_m, s in zip(metrics, want_metrics, (s1, s2, s3)):
        for name, value in want_m.items():
            _close(got_m[name], value)
        _close(got_m["s_mean"], s.mean(), rtol=1e-6)
    # the gradient: central differences of the float64 loss in every entry of M
    _close(g, _fd_grad(lambda M: np_all(M)[0], M), rtol=1e-4, atol=1e-6)

    # each objective alone, jitted, with its default noise range: gradient == float64 central differences
    def np_one_step(M):
        z = eps.astype(np.float64) - _bs(t1) * _np_velocity(eps, 1000 * t1, c, M, u)
        return _np_shell_per_example(p64, z).mean()

    def np_noised(M):
        x = (1 - _bs(t2)) * x0.astype(np.float64) + _bs(t2) * eps.astype(np.float64)
        v = _np_velocity(x, 1000 * t2, c, M, u)
        return _np_shell_per_example(p64, x - _bs(t2) * v).mean() + np.mean(
            (v - (eps.astype(np.float64) - x0)) ** 2)

    t1 = t2 = np.asarray(uniform_sigmas(key, (2,), 0.7, 1.0), np.float64)
    for obj, np_obj in ((lambda M: one_step_from_noise(_velocity(M, u), reward, eps, c, key)[0], np_one_step),
                        (lambda M: noised_data(_velocity(M, u), reward, x0, eps, c, key)[0], np_noised)):
        gi = jax.jit(jax.grad(obj))(jnp.asarray(M))
        _close(gi, _fd_grad(np_obj, M), rtol=1e-4, atol=1e-6)
