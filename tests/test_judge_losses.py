"""GT-SVJ's energy contrastive loss (shelllcc.rewards.energy_judge), against float64 numpy statements written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.rewards import energy_judge

f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


# ------------------------------------------------------------------------------------------ energy judge

def _energy_loss_np(e_pos, e_neg, beta):
    e_pos, e_neg = np.asarray(e_pos, np.float64), np.asarray(e_neg, np.float64)
    return e_pos.mean() - e_neg.mean() + beta * (np.mean(e_pos ** 2) + np.mean(e_neg ** 2))


@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_energy_contrastive_loss_matches_numpy(beta):
    rng = np.random.default_rng(0)
    e_frames_pos, e_frames_neg = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.5
    e_pos, e_neg = e_frames_pos.mean(1), e_frames_neg.mean(1)
    np.testing.assert_allclose(np.asarray(energy_judge.frame_energies_to_clip(f32(e_frames_pos))), e_pos, rtol=1e-6)
    loss, m = jax.jit(energy_judge.energy_contrastive_loss)(energy_judge.frame_energies_to_clip(f32(e_frames_pos)),
                                                            energy_judge.frame_energies_to_clip(f32(e_frames_neg)), beta)
    np.testing.assert_allclose(float(loss), _energy_loss_np(e_pos, e_neg, beta), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), float(loss))
    np.testing.assert_allclose([float(m["energy_pos"]), float(m["energy_neg"])], [e_pos.mean(), e_neg.mean()], rtol=1e-5)
    np.testing.assert_allclose(float(m["regulariser"]), beta * (np.mean(e_pos ** 2) + np.mean(e_neg ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(m["pair_accuracy"]), np.mean(e_pos < e_neg))
    # sets of different sizes (generated negatives mixed in): separate means, no pairs
    loss2, m2 = energy_judge.energy_contrastive_loss(f32(e_pos), f32(e_neg[:4]), beta)
    np.testing.assert_allclose(float(loss2), _energy_loss_np(e_pos, e_neg[:4], beta), rtol=1e-5)
    assert set(m2) == set(m) and math.isnan(float(m2["pair_accuracy"]))


def test_energy_gradient_matches_finite_differences():
    """jax.grad (float32) through frame_energies_to_clip against central differences of the float64 statement."""
    rng = np.random.default_rng(1)
    frames_pos, frames_neg = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    beta, h = 0.2, 1e-5

    def np_loss(fp, fn):
        return _energy_loss_np(fp.mean(1), fn.mean(1), beta)

    def jax_loss(fp, fn):
        clip = energy_judge.frame_energies_to_clip
        return energy_judge.energy_contrastive_loss(clip(fp), clip(fn), beta)[0]

    grads = jax.grad(jax_loss, argnums=(0, 1))(f32(frames_pos), f32(frames_neg))
    for which, g in enumerate(grads):
        want = np.zeros((4, 3))
        for idx in np.ndindex(4, 3):
            args_p, args_m = [frames_pos.copy(), frames_neg.copy()], [frames_pos.copy(), frames_neg.copy()]
            args_p[which][idx] += h
            args_m[which][idx] -= h
            want[idx] = (np_loss(*args_p) - np_loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("beta", [0.2, 0.5, 2.0])
def test_energy_optimum_is_minus_and_plus_one_over_two_beta(beta):
    """Gradient descent on scalar energies from far away ends at E+ = -1/(2 beta), E- = +1/(2 beta), L = -1/(2 beta)."""
    def loss(e):
        return energy_judge.energy_contrastive_loss(e[:1], e[1:], beta)[0]

    lr = 0.5 / beta           # the loss's curvature is 2 beta per energy: a contraction by 1/2 per step
    step = lambda e, _: (e - lr * jax.grad(loss)(e), None)  # noqa: E731
    e, _ = jax.lax.scan(step, f32([3.0, -4.0]), None, length=300)
    np.testing.assert_allclose(np.asarray(e), [-1 / (2 * beta), 1 / (2 * beta)], rtol=1e-4)
    np.testing.assert_allclose(float(loss(e)), -1 / (2 * beta), rtol=1e-4)


def test_energy_bad_inputs():
    with pytest.raises(ValueError, match="beta must be > 0"):
        energy_judge.energy_contrastive_loss(f32([0.0]), f32([1.0]), beta=0.0)
    with pytest.raises(ValueError, match=r"e_frames must be \[B, T\]"):
        energy_judge.frame_energies_to_clip(f32(np.zeros((2, 3, 4))))
