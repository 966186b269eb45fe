"""GT-SVJ's energy contrastive loss (shelllcc.rewards.energy_judge) and our Gran-DPO reconstruction
(shelllcc.flow.objectives.gran_dpo_loss), against float64 numpy statements written here."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.flow import objectives
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


# ------------------------------------------------------------------------------------------ Gran-DPO

B, T, H, W, C = 3, 2, 4, 4, 3


def _masks():
    """Four quadrants over both frames, the top-left quadrant of frame 1 only, and an empty mask."""
    m = np.zeros((6, T, H, W), np.float32)
    for p, (i, j) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        m[p, :, i:i + 2, j:j + 2] = 1
    m[4, 1, :2, :2] = 1
    return m


def _dpo_np(etw, erw, etl, erl, t, beta, time_dependent):
    beta_t = beta * (1 - t) ** 2 if time_dependent else beta
    z = (etw - erw) - (etl - erl)
    return np.logaddexp(0.0, 0.5 * beta_t * z)                    # -log sigmoid(-(beta_t / 2) z)


def _gran_dpo_np(errs, t, masks, r_w, r_l, beta, delta, lam, time_dependent):
    """Loop over clips and patches, float64."""
    etw, erw, etl, erl = (np.asarray(e, np.float64) for e in errs)
    video = np.mean([_dpo_np(etw[b].mean(), erw[b].mean(), etl[b].mean(), erl[b].mean(), t[b], beta, time_dependent)
                     for b in range(len(t))])
    losses, flipped = [], 0
    for b in range(len(t)):
        for p, mask in enumerate(masks):
            inside = mask.astype(bool)
            if not inside.any() or not abs(r_w[b, p] - r_l[b, p]) > delta:
                continue
            tw, rw, tl, rl = (e[b][inside].mean() for e in (etw, erw, etl, erl))   # [n, C] (or [n]) -> mean
            if r_l[b, p] > r_w[b, p]:
                tw, rw, tl, rl = tl, rl, tw, rw
                flipped += 1
            losses.append(_dpo_np(tw, rw, tl, rl, t[b], beta, time_dependent))
    patch = np.mean(losses) if losses else 0.0
    n = len(losses)
    return video + lam * patch, video, patch, n / (len(t) * len(masks)), flipped / max(n, 1)


def _pair(seed, channels=True):
    rng = np.random.default_rng(seed)
    shape = (B, T, H, W, C) if channels else (B, T, H, W)
    errs = [rng.uniform(0.1, 2.0, shape) for _ in range(4)]
    t = rng.uniform(0.05, 0.95, B)
    r_w, r_l = rng.standard_normal((B, 6)), rng.standard_normal((B, 6))
    return errs, t, r_w, r_l


def _gran(errs, t, masks, r_w, r_l, **kw):
    return objectives.gran_dpo_loss(*(f32(e) for e in errs), f32(t), f32(masks), f32(r_w), f32(r_l), **kw)


@pytest.mark.parametrize("time_dependent,channels", [(False, True), (True, True), (False, False)])
def test_gran_dpo_matches_numpy(time_dependent, channels):
    errs, t, r_w, r_l = _pair(2, channels)
    masks = _masks()
    kw = dict(beta=3.0, delta=0.5, lam=0.7, time_dependent=time_dependent)
    loss, m = _gran(errs, t, masks, r_w, r_l, **kw)
    want = _gran_dpo_np(errs, t, masks, r_w, r_l, **kw)
    got = [float(m[k]) for k in ("loss", "video_loss", "patch_loss", "patch_selected", "patch_flipped")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(loss) == got[0] and 0 < got[3] < 5 / 6 and 0 < got[4] < 1    # some patches left out, some flipped


def test_gran_dpo_lam_zero_and_large_delta_give_flow_dpo():
    errs, t, r_w, r_l = _pair(3)
    masks = _masks()
    clip = [f32(e.mean(axis=(1, 2, 3, 4))) for e in errs]
    flow_dpo = float(objectives.flow_dpo_loss(*clip, f32(t), 3.0))
    loss0, _ = _gran(errs, t, masks, r_w, r_l, beta=3.0, delta=0.1, lam=0.0)
    np.testing.assert_allclose(float(loss0), flow_dpo, rtol=1e-6)
    delta = float(np.max(np.abs(r_w - r_l))) + 1e-3
    loss1, m1 = _gran(errs, t, masks, r_w, r_l, beta=3.0, delta=delta, lam=5.0)
    np.testing.assert_allclose([float(loss1), float(m1["video_loss"])], [flow_dpo, flow_dpo], rtol=1e-6)
    assert float(m1["patch_loss"]) == 0.0 and float(m1["patch_selected"]) == 0.0 and float(m1["patch_flipped"]) == 0.0


def test_gran_dpo_orders_each_patch_by_its_rewards():
    """One selected patch: its loss follows its own rewards' order (the sign of z flips with them), identical
    errors give log 2 either way, and relabelling w <-> l with the rewards leaves the patch term unchanged."""
    errs, t, _, _ = _pair(4)
    masks = _masks()[:1]
    kw = dict(beta=3.0, delta=0.5, lam=1.0)
    up, down = np.ones((B, 1)), np.zeros((B, 1))
    _, m_wl = _gran(errs, t, masks, up, down, **kw)
    _, m_lw = _gran(errs, t, masks, down, up, **kw)
    inside = masks[0].astype(bool)
    z = np.array([(errs[0][b][inside].mean() - errs[1][b][inside].mean())
                  - (errs[2][b][inside].mean() - errs[3][b][inside].mean()) for b in range(B)])
    np.testing.assert_allclose(float(m_wl["patch_loss"]), np.mean(np.logaddexp(0, 1.5 * z)), rtol=1e-5)
    np.testing.assert_allclose(float(m_lw["patch_loss"]), np.mean(np.logaddexp(0, -1.5 * z)), rtol=1e-5)
    assert float(m_wl["patch_flipped"]) == 0.0 and float(m_lw["patch_flipped"]) == 1.0
    # winner and loser identical inside the patch (outside they differ): log 2 whatever the order
    same = [e.copy() for e in errs]
    same[2][:, inside], same[3][:, inside] = same[0][:, inside], same[1][:, inside]
    for r_w, r_l in ((up, down), (down, up)):
        np.testing.assert_allclose(float(_gran(same, t, masks, r_w, r_l, **kw)[1]["patch_loss"]), math.log(2), rtol=1e-6)
    # relabelling: swap the clips' roles and their patch rewards together
    _, m_swapped = _gran([errs[2], errs[3], errs[0], errs[1]], t, masks, down, up, **kw)
    np.testing.assert_allclose(float(m_swapped["patch_loss"]), float(m_wl["patch_loss"]), rtol=1e-6)


def test_gran_dpo_jit_and_gradient():
    errs, t, r_w, r_l = _pair(5)
    masks = _masks()                       # includes an empty mask: never selected, no nan in the gradient
    kw = dict(beta=3.0, delta=0.3, lam=0.5)
    eager, m_eager = _gran(errs, t, masks, r_w, r_l, **kw)
    fn = jax.jit(partial(objectives.gran_dpo_loss, **kw))
    jitted, m_jit = fn(*(f32(e) for e in errs), f32(t), f32(masks), f32(r_w), f32(r_l))
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    assert set(m_jit) == set(m_eager) == {"loss", "video_loss", "patch_loss", "patch_selected", "patch_flipped"}
    g = jax.grad(lambda e: fn(e, *(f32(x) for x in errs[1:]), f32(t), f32(masks), f32(r_w), f32(r_l))[0])(f32(errs[0]))
    assert g.shape == errs[0].shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
    # against central differences of the float64 statement, at coordinates inside and outside the patches
    rng, h = np.random.default_rng(7), 1e-5
    flat = np.asarray(errs[0], np.float64)
    for idx in zip(*(rng.integers(0, n, 12) for n in flat.shape)):
        up, down = flat.copy(), flat.copy()
        up[idx] += h
        down[idx] -= h
        fd = (_gran_dpo_np([up, *errs[1:]], t, masks, r_w, r_l, time_dependent=False, **kw)[0]
              - _gran_dpo_np([down, *errs[1:]], t, masks, r_w, r_l, time_dependent=False, **kw)[0]) / (2 * h)
        np.testing.assert_allclose(float(g[idx]), fd, rtol=2e-3, atol=1e-6)


def test_gran_dpo_bad_inputs():
    errs, t, r_w, r_l = _pair(6)
    masks = _masks()
    with pytest.raises(ValueError, match="patch_masks must be"):
        _gran(errs, t, masks[:, :, :2], r_w, r_l, beta=1.0, delta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="patch rewards must be"):
        _gran(errs, t, masks, r_w[:, :3], r_l, beta=1.0, delta=0.1, lam=1.0)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        _gran(errs, t, masks, r_w, r_l, beta=1.0, delta=-0.1, lam=1.0)


def _toy_velocity(weight):
    """``v = weight * x + 0.1 * sum_C(x)`` per element: a policy or reference with one parameter tensor."""
    return lambda x, timestep, context: weight * x + 0.1 * jnp.sum(x, axis=-1, keepdims=True)


def test_gran_dpo_objective_is_the_loss_of_the_models_errors():
    """The objective over velocity functions == the numpy loop on errors computed in float64 from the same
    noise levels; lam = 0 gives flow_dpo_objective; policy = reference gives log 2 (1 + lam)."""
    rng = np.random.default_rng(7)
    x_w, x_l, eps = (rng.standard_normal((B, T, H, W, C)) for _ in range(3))
    s = rng.uniform(0.1, 0.9, B)
    w_theta, w_ref = rng.uniform(0.5, 1.5, (T, H, W, C)), rng.uniform(0.5, 1.5, (T, H, W, C))
    r_w, r_l = rng.standard_normal((B, 6)), rng.standard_normal((B, 6))
    masks = _masks()

    def errs_np(weight, x0):
        x = (1 - s[:, None, None, None, None]) * x0 + s[:, None, None, None, None] * eps
        v = weight * x + 0.1 * x.sum(-1, keepdims=True)
        return (v - (eps - x0)) ** 2

    errs = [errs_np(w_theta, x_w), errs_np(w_ref, x_w), errs_np(w_theta, x_l), errs_np(w_ref, x_l)]
    kw = dict(beta=50.0, delta=0.3, lam=0.7)
    want = _gran_dpo_np(errs, s, masks, r_w, r_l, time_dependent=False, **kw)
    loss, m = jax.jit(lambda wt, wr, *a: objectives.gran_dpo_objective(
        _toy_velocity(wt), _toy_velocity(wr), *a[:3], None, None, *a[3:], s=f32(s), **kw))(
        f32(w_theta), f32(w_ref), f32(x_w), f32(x_l), f32(eps), f32(masks), f32(r_w), f32(r_l))
    np.testing.assert_allclose([float(loss), float(m["video_loss"]), float(m["patch_loss"])], want[:3], rtol=2e-5)
    assert float(m["patch_selected"]) == pytest.approx(want[3]) and float(m["s_mean"]) == pytest.approx(s.mean())

    args = (_toy_velocity(f32(w_theta)), _toy_velocity(f32(w_ref)), f32(x_w), f32(x_l), f32(eps), None,
            jax.random.PRNGKey(3))
    dpo, _ = objectives.flow_dpo_objective(*args, beta=50.0)
    gran, _ = objectives.gran_dpo_objective(*args, f32(masks), f32(r_w), f32(r_l), beta=50.0, delta=0.3, lam=0.0)
    np.testing.assert_allclose(float(gran), float(dpo), rtol=1e-6)
    same = _toy_velocity(f32(w_theta))
    loss, m = objectives.gran_dpo_objective(same, same, *args[2:], f32(masks), f32(r_w), f32(r_l), **kw)
    assert float(m["patch_selected"]) > 0
    np.testing.assert_allclose(float(loss), math.log(2) * (1 + kw["lam"]), rtol=1e-6)
