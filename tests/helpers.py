"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.manifold.params import ManifoldConfig, init_params


def random_manifold(seed: int = 0, dim: int = 16, num_anchors: int = 32, hidden_dim: int = 24):
    """Random parameters with every part non-trivial (BN statistics, scale, shift, shell weights)."""
    cfg = ManifoldConfig(dim=dim, num_anchors=num_anchors, hidden_dim=hidden_dim)
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    p = init_params(keys[0], cfg, jax.random.normal(keys[1], (num_anchors, dim)))
    p = p.replace(
        scale=jnp.asarray(1.3, jnp.float32), shift=0.2 * jax.random.normal(keys[2], (dim,)),
        bn=p.bn.replace(mean=0.1 * jax.random.normal(keys[3], (hidden_dim,)),
                        var=jax.random.uniform(keys[4], (hidden_dim,), minval=0.5, maxval=2.0)),
        coder=p.coder.replace(bn_scale=jax.random.uniform(keys[5], (hidden_dim,), minval=0.5, maxval=1.5)),
        shell=p.shell.replace(w1=0.3 * jax.random.normal(keys[6], (hidden_dim, dim)) / np.sqrt(hidden_dim),
                              b1=0.1 * jax.random.normal(keys[7], (dim,))))
    return p, cfg


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
