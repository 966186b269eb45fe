"""The fused manifold reward: Pallas kernels (interpret mode) against float64 numpy, and the fused
value-and-gradient path against plain autodiff of the formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shelllcc.manifold import softmax_code_pallas as sp
from shelllcc.manifold.params import ManifoldConfig, init_params
from shelllcc.rewards import fused_values as pv
from shelllcc.rewards import manifold_distance

SMALL = sp.Blocks(block_n=16, block_k=32, bwd_block_n=16, bwd_block_k=16)


def _softmax_code64(h, w, b, a, g):
    """float64 numpy statement of softmax coding and its backward w.r.t. h."""
    h, w, b, a, g = (np.asarray(x, np.float64) for x in (h, w, b, a, g))
    s = h @ w + b
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    lse = m[:, 0] + np.log(e.sum(axis=1))
    p = np.exp(s - lse[:, None])
    y = p @ a
    delta = (g * y).sum(axis=1)
    dh = (p * (g @ a.T - delta[:, None])) @ w.T
    return y, lse, dh


def _rel(x, ref):
    return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("n,hid,k,d", [(37, 24, 45, 16), (64, 32, 64, 7)])
def test_kernels_match_float64(n, hid, k, d):
    rng = np.random.default_rng(n)
    h = rng.standard_normal((n, hid)).astype(np.float32)
    w = (0.5 * rng.standard_normal((hid, k))).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    a = rng.standard_normal((k, d)).astype(np.float32)
    g = rng.standard_normal((n, d)).astype(np.float32)
    y_ref, lse_ref, dh_ref = _softmax_code64(h, w, b, a, g)
    y, lse = sp.forward(h, w, b, a, compute_dtype=jnp.float32, blocks=SMALL, interpret=True)
    assert y.shape == (n, d) and lse.shape == (n,)
    assert _rel(y, y_ref) < 1e-5 and _rel(lse, lse_ref) < 1e-6
    delta = np.sum(g * np.asarray(y), axis=1)
    dh = sp.backward_h(h, w, b, a, g, lse, delta, compute_dtype=jnp.float32, blocks=SMALL, interpret=True)
    assert dh.shape == (n, hid) and _rel(dh, dh_ref) < 1e-5
    ds_blocks = dataclasses.replace(SMALL, backward="ds")
    dh_ds = sp.backward_h(h, w, b, a, g, lse, delta, compute_dtype=jnp.float32, blocks=ds_blocks, interpret=True)
    assert _rel(dh_ds, dh_ref) < 1e-5
    # bf16 operands, f32 accumulation and softmax
    y16, _ = sp.forward(h, w, b, a, compute_dtype=jnp.bfloat16, blocks=SMALL, interpret=True)
    assert 1e-5 < _rel(y16, y_ref) < 2e-2


def test_kernel_shape_errors():
    with pytest.raises(ValueError, match="W \\[H, K\\]"):
        sp.forward(np.zeros((4, 8), np.float32), np.zeros((8, 5), np.float32), np.zeros(6, np.float32),
                   np.zeros((6, 16), np.float32), interpret=True)


def _params(seed=0, d=16, k=48, h=32, logit_scale=3.0):
    rng = np.random.default_rng(seed)
    cfg = ManifoldConfig(dim=d, num_anchors=k, hidden_dim=h)
    p = init_params(jax.random.PRNGKey(seed), cfg, rng.standard_normal((k, d)).astype(np.float32))
    return p.replace(scale=jnp.float32(1.1), shift=jnp.asarray(0.05 * rng.standard_normal(d), jnp.float32),
                     coder=p.coder.replace(w2=p.coder.w2 * logit_scale,
                                           bn_scale=jnp.asarray(1 + 0.1 * rng.standard_normal(h), jnp.float32)),
                     bn=p.bn.replace(mean=jnp.asarray(0.1 * rng.standard_normal(h), jnp.float32)))


@pytest.mark.parametrize("kind", ["lcc", "shell_norm", "shell", "shell_band"])
@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_fused_equals_autodiff(kind, kernel):
    params = _params()
    lat = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 5, 5, 16)), jnp.float32)
    target = 0.8 if kind == "shell_band" else None

    def dist(implementation, chunk):
        return lambda x: manifold_distance(params, x, kind, target, chunk_size=chunk, implementation=implementation,
                                           kernel=kernel, blocks=SMALL, per_example=True)

    ref, ref_vjp = jax.vjp(dist("remat", 10**6), lat)
    ct = jnp.asarray([0.7, -1.3], jnp.float32)    # unequal per-example cotangents
    for chunk in (32, 10**6):                        # several chunks with padding; one chunk
        got, vjp = jax.vjp(dist("fused", chunk), lat)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(vjp(ct)[0], ref_vjp(ct)[0], rtol=1e-4, atol=1e-6)


def test_fused_parameter_gradients_and_jit():
    params = _params(seed=3)
    lat = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 6, 6, 16)), jnp.float32)

    def loss(w2, anchors, x, implementation):
        p = params.replace(coder=params.coder.replace(w2=w2), anchors=anchors)
        return manifold_distance(p, x, "shell", chunk_size=20, implementation=implementation, kernel="xla")

    args = (params.coder.w2, params.anchors, lat)
    want = jax.grad(loss, argnums=(0, 1, 2))(*args, "remat")
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(*args, "fused")
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_frozen_manifold_costs_no_parameter_gradient():
    """With the manifold frozen, the compiled gradient does the fused work only (XLA drops the rest)."""
    params = _params(k=256, h=64)
    lat = jnp.zeros((1, 1, 16, 16, 16)) + 0.3

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    frozen = flops(jax.grad(lambda x: manifold_distance(params, x, "shell", chunk_size=10**6)), lat)
    trained = flops(jax.grad(lambda w2, x: manifold_distance(params.replace(coder=params.coder.replace(w2=w2)), x,
                                                               "shell", chunk_size=10**6), argnums=(0, 1)),
                    params.coder.w2, lat)
    n, d, h, k = 256, 16, 64, 256
    forward = 2 * n * (d * h + h * h + h * k + k * d + 2 * d * h)
    assert frozen < 1.15 * 2 * forward                 # forward + input gradients, nothing recomputed
    assert trained > frozen + 1.5 * n * h * k          # plus at least the product for dW2


def test_kernel_option_errors():
    params = _params()
    lat = jnp.zeros((1, 1, 2, 2, 16))
    with pytest.raises(ValueError, match="unknown kernel"):
        manifold_distance(params, lat, "shell", kernel="cuda")
    with pytest.raises(ValueError, match="amortized coder only"):
        manifold_distance(params, lat, "shell", coder="analytic", kernel="pallas")
    with pytest.raises(ValueError, match="unknown implementation"):
        manifold_distance(params, lat, "shell", implementation="eager")
    assert pv.resolve_kernel("auto", "analytic") == "xla"
