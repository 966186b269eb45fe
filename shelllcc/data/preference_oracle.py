"""The oracle that stands in for human raters on Moving Textures preference pairs (issue 17, ours).

Every score is higher-is-better and computed in float64 NumPy from pixels (a clip ``uint8 [T, H, W, 3]``),
the prompt's attributes and, for VQ, a real clip with the same attributes. Nothing is trained, so labels do
not depend on a classifier's errors; the terms are chosen so that each degradation of
:mod:`shelllcc.data.preferences` moves the dimension it belongs to and leaves the others nearly unchanged.

* **VQ (visual quality)**, fidelity and detail against the reference ``ref``::

      VQ = -( |log(D(x) / D(ref))| + 5 cast(x) + 10 flicker(x) )

  ``D`` the object's detail (:func:`object_detail`, the mean squared Laplacian of the luma inside the object:
  blur lowers it, noise raises it, both lose; the object's texture and scale are the prompt's, the
  background's are nuisances, hence inside the object only), ``flicker`` the RMS frame-to-frame change of the
  static background (:func:`flicker`: pixel noise), ``cast`` the distance of the background's
  mean colour from the nearest one a clean background can have (:func:`colour_cast`). ``ref`` is a third
  real clip of the prompt (other nuisances than either clip of a pair), so two real clips are judged alike
  and neither is favoured for being the reference.
* **MQ (motion quality)**, direction, speed and temporal consistency of the object's track ``c_t`` (the
  centroid of the bright pixels, the object's; the muted background never reaches them)::

      u_t = c_{t+1} - c_t,   e = the prompt's direction x its mean per-frame travel
      MQ  = -( |mean_t u_t - e| + mean_t |u_t - mean_t u_t| ) / |e|

  Reversed or wrong motion fails the first term, repeated (held) frames the second.
* **TA (text alignment)**, the appearance attributes the prompt names: colour and shape (direction and speed
  are scored by MQ, texture by VQ's spectrum)::

      TA = margin_colour + margin_shape
      margin_colour = min_{c != named} |k(x) - k(c)| - |k(x) - k(named)|    k = colour / its max channel
      margin_shape  = IoU(sil, named shape) - max_{s != named} IoU(sil, s)

  ``sil`` the object's closed bright-pixel silhouette in the first frame, compared with each shape rendered
  at its centroid with the same area.

A pair's label per dimension: ``+1`` if ``score(A) - score(B) > margin``, ``-1`` if below ``-margin``, else
``0`` (tie); the margins are per dimension, the 1/3-quantile of ``|score(A) - score(B)|`` on the train split
(so about a third of its pairs are ties; more where many pairs are exactly equal on a dimension).
"""

from __future__ import annotations

import functools

import numpy as np

from shelllcc.data import moving_textures as mt

DIMENSIONS = ("VQ", "MQ", "TA")
BRIGHT = 0.45        # brightest channel of the muted background stays below it, every object colour above
_LUMA = np.array([0.299, 0.587, 0.114])


def _float(video) -> np.ndarray:
    v = np.asarray(video)
    return v.astype(np.float64) / 255.0 if v.dtype == np.uint8 else v.astype(np.float64)


def _bright_weight(v: np.ndarray) -> np.ndarray:
    return np.maximum(v.max(axis=-1) - BRIGHT, 0.0)


def track(video) -> np.ndarray:
    """Object centre per frame ``[T, 2]`` (x, y pixels): the centroid of the bright pixels."""
    v = _float(video)
    wgt = _bright_weight(v) + 1e-9
    ys, xs = np.arange(v.shape[1]) + 0.5, np.arange(v.shape[2]) + 0.5
    total = wgt.sum(axis=(1, 2))
    return np.stack([(wgt * xs[None, None]).sum(axis=(1, 2)) / total, (wgt * ys[None, :, None]).sum(axis=(1, 2)) / total], -1)


def _window(x: np.ndarray, size: int, op) -> np.ndarray:
    half = size // 2
    fill = -np.inf if op is np.maximum else np.inf
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        p = np.pad(x, pad, constant_values=fill)
        out = p.take(range(0, x.shape[axis]), axis=axis)
        for k in range(1, size):
            out = op(out, p.take(range(k, k + x.shape[axis]), axis=axis))
        x = out
    return x


def silhouette(frame) -> np.ndarray:
    """Solid object mask ``[H, W]`` of one frame: bright pixels closed over the texture's dark phase (7x7)."""
    bright = np.clip(5.0 * (_float(frame).max(axis=-1) - BRIGHT), 0.0, 1.0)
    return _window(_window(bright, 7, np.maximum), 7, np.minimum)


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    u = np.linspace(-40, 40, 801)
    uu, vv = np.meshgrid(u, u)
    return float(np.mean(mt._shape_sdf(shape, uu, vv, 10.0) < 0) * 80 * 80)


def _shape_mask(shape: str, centre, area: float, h: int, w: int) -> np.ndarray:
    r = 10.0 * np.sqrt(max(area, 1.0) / _unit_area(shape))
    u = np.arange(w)[None, :] + 0.5 - centre[0]
    v = np.arange(h)[:, None] + 0.5 - centre[1]
    return np.clip(0.5 - mt._shape_sdf(shape, u, v, r), 0.0, 1.0)


def _iou(a, b) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


def _chroma(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, np.float64)
    return rgb / max(rgb.max(), 1e-9)


def colour_cast(video) -> float:
    """|mean background colour - the nearest colour a Moving Textures background can have|_1 (reference-free:
    a background is ``0.35 (0.3 + 0.4 tint)`` plus a zero-mean pattern, the tint one of the named colours)."""
    v = _float(video)
    keep = _bright_weight(v) == 0
    mean = v[keep].mean(axis=0) if keep.any() else v.reshape(-1, 3).mean(axis=0)
    legal = [0.35 * (0.3 + 0.4 * np.asarray(rgb)) for rgb in mt.COLOUR_RGB.values()]
    return float(min(np.abs(mean - b).sum() for b in legal))


def object_detail(video) -> float:
    """Mean squared 4-neighbour Laplacian of the luma over the object's pixels (its silhouette, 2 px in from
    the outline so the edge against the background does not count), averaged over frames."""
    v = _float(video)
    y = v @ _LUMA
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]
    values = []
    for t in range(v.shape[0]):
        inner = _window(silhouette(v[t]), 5, np.minimum)[1:-1, 1:-1]
        if inner.sum() > 1.0:
            values.append(float((inner * lap[t] ** 2).sum() / inner.sum()))
    return float(np.mean(values)) if values else 0.0


def flicker(video) -> float:
    """RMS frame-to-frame change of the luma over the background (pixels away from the object in both frames).

    The camera is fixed and the background static, so a clean clip has 0 here; pixel noise does not."""
    v = _float(video)
    y = v @ _LUMA
    away = np.stack([_window(silhouette(v[t]), 9, np.maximum) < 0.01 for t in range(v.shape[0])])
    both = away[1:] & away[:-1]
    if not both.any():
        return 0.0
    return float(np.sqrt(np.mean((y[1:] - y[:-1])[both] ** 2)))


def vq_score(video, reference) -> float:
    ratio = (object_detail(video) + 1e-6) / (object_detail(reference) + 1e-6)
    return -(abs(float(np.log(ratio))) + 5.0 * colour_cast(video) + 10.0 * flicker(video))


def expected_velocity(attributes, short_side: int) -> np.ndarray:
    step = float(np.mean(mt.SPEED_TRAVEL[attributes["speed"]])) * short_side / mt._REFERENCE_STEPS
    return np.asarray(mt.DIRECTION_VECTORS[attributes["direction"]]) * step


def mq_score(video, attributes) -> float:
    v = _float(video)
    u = np.diff(track(v), axis=0)
    e = expected_velocity(attributes, min(v.shape[1:3]))
    mean = u.mean(axis=0)
    return -float((np.linalg.norm(mean - e) + np.mean(np.linalg.norm(u - mean, axis=-1))) / np.linalg.norm(e))


def ta_score(video, attributes) -> float:
    v = _float(video)
    frame = v[0]
    wgt = _bright_weight(frame)
    if wgt.sum() < 1e-6:
        return -2.0     # no object at all: worse than any wrong colour or shape
    colour = (frame * wgt[..., None]).sum(axis=(0, 1)) / wgt.sum()
    dist = {c: float(np.abs(_chroma(colour) - _chroma(rgb)).sum()) for c, rgb in mt.COLOUR_RGB.items()}
    named = attributes["colour"]
    colour_margin = min(d for c, d in dist.items() if c != named) - dist[named]
    sil = silhouette(frame)
    centre = track(v[:1])[0]
    area = float(sil.sum())
    h, w = sil.shape
    iou = {s: _iou(sil, _shape_mask(s, centre, area, h, w)) for s in mt.SHAPES}
    shape_margin = iou[attributes["shape"]] - max(x for s, x in iou.items() if s != attributes["shape"])
    return colour_margin + shape_margin


def scores(video, attributes, reference) -> np.ndarray:
    """``[3]`` oracle scores (VQ, MQ, TA) of one clip."""
    return np.array([vq_score(video, reference), mq_score(video, attributes), ta_score(video, attributes)])


def labels_from_scores(score_a, score_b, margins) -> np.ndarray:
    """+1 / -1 / 0 per dimension: A better by more than the margin, B better, or a tie."""
    d = np.asarray(score_a, np.float64) - np.asarray(score_b, np.float64)
    m = np.asarray(margins, np.float64)
    return np.where(d > m, 1, np.where(d < -m, -1, 0)).astype(np.int64)


def tie_margins(score_diffs, tie_share: float = 1 / 3) -> np.ndarray:
    """Per-dimension margins: the ``tie_share`` quantile of ``|score(A) - score(B)|`` over pairs ``[N, 3]``."""
    return np.quantile(np.abs(np.asarray(score_diffs, np.float64)), tie_share, axis=0)


__all__ = ["DIMENSIONS", "labels_from_scores", "mq_score", "scores", "silhouette", "ta_score", "tie_margins",
           "track", "vq_score"]
