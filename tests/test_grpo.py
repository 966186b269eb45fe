"""GRPO's losses (shelllcc.flow.grpo) against float64 NumPy statements written here from ALIGNMENT_METHODS.md
section 5, with central-difference gradient checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.flow import grpo

# ---------------------------------------------------------------------------------------------------------
# GRPO losses
# ---------------------------------------------------------------------------------------------------------


def test_group_advantages_against_numpy():
    rng = np.random.default_rng(4)
    r = rng.standard_normal((3, 6))
    r[1] = 2.0                         # a group of equal rewards: advantage 0
    r[2, 0] = 1e3                      # an outlier: clipped at 5
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    ref = np.clip(ref, -5, 5)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(grpo.group_advantages(jnp.asarray(r))), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(grpo.group_advantages(jnp.asarray(r))), ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(grpo.group_advantages(jnp.asarray(r)))[1] == 0.0)
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        grpo.group_advantages(jnp.zeros(5))


def ppo_reference(new, old, adv, eps):
    ratio = np.exp(new - old)
    return np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)))


def test_policy_loss_against_numpy_and_gradients():
    rng = np.random.default_rng(5)
    old = rng.standard_normal((6, 3))
    new = old + 1e-3 * rng.standard_normal((6, 3))       # some ratios inside 1 +- 1e-3, some outside 1 +- 1e-4
    adv = rng.standard_normal(6)
    with jax.enable_x64(True):
        for eps in (1e-4, 1e-2, 0.2):
            loss, m = grpo.grpo_policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), eps)
            assert float(loss) == pytest.approx(ppo_reference(new, old, adv[:, None], eps), rel=1e-12)
            ratio = np.exp(new - old)
            assert float(m["clip_fraction"]) == pytest.approx(np.mean(np.abs(ratio - 1) > eps))
        assert 0 < float(grpo.grpo_policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv))[1]["clip_fraction"]) < 1

        # gradient: central differences away from the clip kinks
        eps = 1e-2
        f = lambda z: grpo.grpo_policy_loss(z, jnp.asarray(old), jnp.asarray(adv), eps)[0]
        g = np.asarray(jax.grad(f)(jnp.asarray(new)))
        h = 1e-7
        fd = np.zeros_like(new)
        for idx in np.ndindex(new.shape):
            e = np.zeros_like(new)
            e[idx] = h
            fd[idx] = (ppo_reference(new + e, old, adv[:, None], eps) - ppo_reference(new - e, old, adv[:, None], eps)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
        # no gradient into the old log-probs or the advantages (data)
        go = jax.grad(lambda o, a: grpo.grpo_policy_loss(jnp.asarray(new), o, a, eps)[0], argnums=(0, 1))(
            jnp.asarray(old), jnp.asarray(adv))
        assert all(np.all(np.asarray(z) == 0) for z in go)


def test_kl_with_and_without_dt():
    rng = np.random.default_rng(6)
    mt, mr = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 3))
    s, dt = np.array([0.5, 1.0, 2.0, 0.7]), -0.1
    sq = ((mt - mr) ** 2).reshape(4, -1).mean(-1)
    with jax.enable_x64(True):
        no_dt = grpo.grpo_kl(jnp.asarray(mt), jnp.asarray(mr), jnp.asarray(s), dt, with_dt=False)
        yes_dt = grpo.grpo_kl(jnp.asarray(mt), jnp.asarray(mr), jnp.asarray(s), dt, with_dt=True)
        np.testing.assert_allclose(np.asarray(no_dt), sq / (2 * s ** 2), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(yes_dt), sq / (2 * s ** 2 * 0.1), rtol=1e-12)
        # with dt it is the KL of the two Gaussian transitions N(mu, s^2 |dt|), per element (closed form)
        var = (s ** 2 * 0.1)[:, None, None]
        kl_gauss = ((mt - mr) ** 2 / (2 * var)).reshape(4, -1).mean(-1)
        np.testing.assert_allclose(np.asarray(yes_dt), kl_gauss, rtol=1e-12)
        # gradient w.r.t. mu_theta by central differences; none into the reference
        f = lambda z: jnp.sum(grpo.grpo_kl(z, jnp.asarray(mr), jnp.asarray(s), dt, with_dt=True))
        g = np.asarray(jax.grad(f)(jnp.asarray(mt)))
        fd = np.zeros_like(mt)
        h = 1e-6
        for idx in np.ndindex(mt.shape):
            e = np.zeros_like(mt)
            e[idx] = h
            fd[idx] = (float(f(jnp.asarray(mt + e))) - float(f(jnp.asarray(mt - e)))) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
        gr = jax.grad(lambda z: jnp.sum(grpo.grpo_kl(jnp.asarray(mt), z, jnp.asarray(s), dt)))(jnp.asarray(mr))
        assert np.all(np.asarray(gr) == 0)


def test_objective_terms_and_dance_mode():
    rng = np.random.default_rng(7)
    old = rng.standard_normal((4, 2))
    new = old + 1e-3 * rng.standard_normal((4, 2))
    adv = rng.standard_normal(4)
    kl = rng.random((4, 2))
    with jax.enable_x64(True):
        loss, m = grpo.grpo_objective(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), kl=jnp.asarray(kl),
                                      kl_weight=0.04)
        pol = ppo_reference(new, old, adv[:, None], 1e-4)
        assert float(m["policy_loss"]) == pytest.approx(pol, rel=1e-12)
        assert float(m["kl"]) == pytest.approx(kl.mean(), rel=1e-12)
        assert float(loss) == pytest.approx(pol + 0.04 * kl.mean(), rel=1e-12)
        dance, md = grpo.grpo_objective(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv))
        assert float(dance) == pytest.approx(pol, rel=1e-12) and float(md["kl_term"]) == 0.0
        assert set(m) == set(md)
    with pytest.raises(ValueError, match="needs kl values"):
        grpo.grpo_objective(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), kl_weight=0.1)


def test_timestep_subsets_and_best_of_n():
    steps = grpo.select_timesteps(jax.random.PRNGKey(0), 10, 0.6)
    assert steps.shape == (6,) and len(set(np.asarray(steps).tolist())) == 6 and np.all(np.diff(np.asarray(steps)) > 0)
    per = grpo.select_timesteps(jax.random.PRNGKey(1), 10, grpo.DANCE_TIMESTEP_FRACTION, num_samples=5)
    assert per.shape == (5, 6) and not all(np.array_equal(per[0], per[i]) for i in range(1, 5))
    assert np.array_equal(np.asarray(grpo.select_timesteps(jax.random.PRNGKey(2), 4, 1.0)), np.arange(4))
    with pytest.raises(ValueError, match="fraction"):
        grpo.select_timesteps(jax.random.PRNGKey(0), 10, 0.0)

    r = jnp.asarray([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2], [5.0, 1.0, 3.0, 4.0, 2.0, 0.0]])
    idx = np.asarray(grpo.best_of_n_indices(r, 4))
    assert idx.tolist() == [[1, 4, 0, 5], [0, 3, 5, 1]]
    adv = grpo.group_advantages(r)
    picked = np.asarray(grpo.gather_groups(adv, jnp.asarray(idx)))
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(adv), idx, axis=1))
    x = jnp.arange(2 * 6 * 3).reshape(2, 6, 3)
    assert np.array_equal(np.asarray(grpo.gather_groups(x, jnp.asarray(idx)))[1, 0], np.asarray(x)[1, 0])
    with pytest.raises(ValueError, match="n_keep"):
        grpo.best_of_n_indices(r, 7)
