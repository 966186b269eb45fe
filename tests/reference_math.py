"""Float64 NumPy re-statement of DESIGN.md 2.1-2.4, written from the formulas, independent of shelllcc.

Parameters are taken as a plain dict of float64 arrays (see :func:`to_numpy`); patches as ``[N, D]``.
"""

from __future__ import annotations

import numpy as np


def to_numpy(params) -> dict:
    c, bn, s = params.coder, params.bn, params.shell
    f = lambda x: np.asarray(x, np.float64)
    return dict(A=f(params.anchors), s=f(params.scale), b=f(params.shift),
                w0=f(c.w0), b0=f(c.b0), gamma=f(c.bn_scale), beta=f(c.bn_bias), w1=f(c.w1), b1=f(c.b1),
                w2=f(c.w2), b2=f(c.b2), mean=f(bn.mean), var=f(bn.var),
                sw0=f(s.w0), sb0=f(s.b0), sw1=f(s.w1), sb1=f(s.b1))


def relu(x):
    return np.maximum(x, 0.0)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def coder_weights(p, z, train=False, eps=1e-5):
    h = z @ p["w0"] + p["b0"]
    if train:
        mu, var = h.mean(0), h.var(0)
    else:
        mu, var = p["mean"], p["var"]
    h = relu((h - mu) / np.sqrt(var + eps) * p["gamma"] + p["beta"])
    h = relu(h @ p["w1"] + p["b1"])
    return softmax(h @ p["w2"] + p["b2"])


def skeleton(p, z, train=False):
    return p["s"] * (coder_weights(p, z, train) @ p["A"]) + p["b"]


def delta(p, z, zhat, eps=1e-6):
    lv = relu(zhat @ p["sw0"] + p["sb0"]) @ p["sw1"] + p["sb1"]
    return (z - zhat) / (np.exp(lv) + eps), lv


def distance(p, z, kind, target=None):
    zhat = skeleton(p, z)
    if kind == "lcc":
        return np.mean(((z - zhat) ** 2).sum(-1))
    norm = np.linalg.norm(delta(p, z, zhat)[0], axis=-1)
    if kind == "shell_norm":
        return norm.mean()
    if kind == "shell":
        return np.abs(norm - 1).mean()
    if kind == "shell_band":
        return abs(norm.mean() - target)
    raise ValueError(kind)


def stage1_terms(p, z):
    w = coder_weights(p, z, train=True)
    zhat = p["s"] * (w @ p["A"]) + p["b"]
    d2 = ((z[:, None, :] - p["A"][None]) ** 2).sum(-1)      # explicit N x K x D: fine at test sizes
    usage = w.mean(0)
    k = usage.shape[0]
    return dict(rec=np.mean((zhat - z) ** 2), locality=np.mean((w * d2).sum(-1)),
                usage_kl=np.sum(usage * np.log(usage / (1.0 / k))), basis_to_patch=np.mean(d2.min(0)))


def stage2_loss(p, z, logvar_weight=0.01):
    zhat = skeleton(p, z)
    d, lv = delta(p, z, zhat)
    return np.mean((np.linalg.norm(d, axis=-1) - 1) ** 2) + logvar_weight * np.mean(lv ** 2)


def patchify(latents, patch):
    """Loop-based patch extraction: row order (t, h, w) blocks, each flattened (pt, ph, pw, C)."""
    b, t, h, w, c = latents.shape
    pt, ph, pw = patch
    rows = []
    for bi in range(b):
        for ti in range(0, t, pt):
            for hi in range(0, h, ph):
                for wi in range(0, w, pw):
                    rows.append(latents[bi, ti:ti + pt, hi:hi + ph, wi:wi + pw, :].reshape(-1))
    return np.stack(rows).reshape(b, -1, pt * ph * pw * c)


def llc_code(anchors, z, k, lam):
    """LLC by elimination of the constraint: c = c0 + N y, least squares in y (not the Gram closed form)."""
    d2 = ((anchors - z) ** 2).sum(-1)
    idx = np.argsort(d2)[:k]
    b = anchors[idx]
    c0 = np.full(k, 1.0 / k)
    # Orthonormal basis of {v : sum(v) = 0} from the SVD of the all-ones row.
    null = np.linalg.svd(np.ones((1, k)))[2][1:].T          # [k, k-1]
    # min || (c0 + N y) B - z ||^2 + lam || c0 + N y ||^2  as one stacked least-squares problem.
    a_mat = np.concatenate([(null.T @ b).T, np.sqrt(lam) * null], axis=0)
    rhs = np.concatenate([z - c0 @ b, -np.sqrt(lam) * c0])
    y = np.linalg.lstsq(a_mat, rhs, rcond=None)[0]
    c = c0 + null @ y
    return idx, c, c @ b
