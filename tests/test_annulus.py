"""The Gaussian-annulus property that motivates the shell.

Data lie on the shells (radius r = sigma sqrt(D)) of a mixture of Gaussians in D = 16. After the
two-stage fit, gradient descent on ``lcc`` pulls points toward the local means (radius far below
r: the blur of mean regression), while descent on ``shell`` brings them to the data radius, from
inside and from outside.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.data.synthetic_latents import make_shell_mixture
from shelllcc.manifold import fit
from shelllcc.manifold.init import calibrate_shell, init_manifold
from shelllcc.manifold.params import ManifoldConfig
from shelllcc.rewards import manifold_distance


@pytest.fixture(scope="module")
def fitted():
    mixture = make_shell_mixture(0, dim=16, num_components=8, sigma=0.5, center_scale=3.0)
    rng = np.random.default_rng(0)
    data, _ = mixture.sample(rng, 20_000)
    cfg = ManifoldConfig(dim=16, num_anchors=32, hidden_dim=64)
    params = init_manifold(jax.random.PRNGKey(0), cfg, data, anchor_init="kmeans++")

    for stage, steps in ((1, 500), (2, 300)):
        opt = fit.make_optimizer(fit.OptimConfig(learning_rate=3e-3, warmup_steps=50, total_steps=steps))
        if stage == 2:
            params = calibrate_shell(params, data[:4096])
        step_fn = fit.stage1_step if stage == 1 else fit.stage2_step
        step = fit.jit_step(functools.partial(step_fn, optimizer=opt, config=cfg), None)
        state = fit.init_state(params, opt, stage)
        for _ in range(steps):
            state, metrics = step(state, data[rng.integers(0, len(data), 1024)])
        params = state.params
        assert int(state.skipped) == 0
    return mixture, params


def _descend(params, x0, kind, steps=300, lr=0.05):
    n = x0.shape[0]
    grad = jax.grad(lambda x: n * manifold_distance(params, x, kind))   # per-point gradients

    @jax.jit
    def run(x):
        return jax.lax.fori_loop(0, steps, lambda _, x: x - lr * grad(x), x)

    return np.asarray(run(jnp.asarray(x0)))


@pytest.mark.parametrize("start", [0.5, 1.0, 1.6])
def test_lcc_regresses_to_local_means(fitted, start):
    mixture, params = fitted
    x0, _ = mixture.sample(np.random.default_rng(1), 256, radius_factor=start)
    x = _descend(params, x0, "lcc")
    radius = mixture.nearest_center_distance(x) / mixture.radius
    assert radius.mean() < 0.3, radius.mean()


@pytest.mark.parametrize("start", [0.5, 1.0, 1.6])
def test_shell_restores_data_radius(fitted, start):
    mixture, params = fitted
    x0, _ = mixture.sample(np.random.default_rng(2), 256, radius_factor=start)
    x = _descend(params, x0, "shell")
    radius = mixture.nearest_center_distance(x) / mixture.radius
    assert abs(radius.mean() - 1.0) < 0.1, radius.mean()
    assert np.mean(np.abs(radius - 1.0) < 0.1) > 0.9        # nearly every point, not only on average


def test_fitted_shell_sits_on_the_data(fitted):
    """Held-out data: ||delta|| ~ 1, so ``shell`` is small there and large for points off the shell."""
    mixture, params = fitted
    rng = np.random.default_rng(3)
    on, _ = mixture.sample(rng, 2048)
    inside, _ = mixture.sample(rng, 2048, radius_factor=0.3)
    outside, _ = mixture.sample(rng, 2048, radius_factor=2.0)
    assert abs(float(manifold_distance(params, on, "shell_norm")) - 1.0) < 0.05
    d_on = float(manifold_distance(params, on, "shell"))
    assert d_on < 0.1
    assert float(manifold_distance(params, inside, "shell")) > 5 * d_on
    assert float(manifold_distance(params, outside, "shell")) > 5 * d_on
    # lcc prefers the blurred (inside) points to the real ones: the failure mode the shell fixes.
    assert float(manifold_distance(params, inside, "lcc")) < float(manifold_distance(params, on, "lcc"))
