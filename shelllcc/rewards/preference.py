"""Preference losses and the accuracy with ties of VideoAlign (ALIGNMENT_METHODS section 1).

Conventions: a pair (A, B) of clips, per dimension m (VQ, MQ, TA) rewards ``r_a[:, m]`` and ``r_b[:, m]``,
a label +1 (A preferred), -1 (B preferred) or 0 (tie); any other label marks a missing rating.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TIE_THETA = 5.0     # VideoAlign's theta for the BTT (Rao-Kupper) loss


def btt_loss(r_a, r_b, labels, theta: float = TIE_THETA):
    """Bradley-Terry with ties (Rao-Kupper), the mean negative log-likelihood over the valid labels.

    With ``d = r_a - r_b`` per entry ``[B, M]`` and ``k = log(theta)``::

        P(A > B) = sigmoid(d - k)          P(B > A) = sigmoid(-d - k)
        P(tie)   = (theta^2 - 1) sigmoid(d - k) sigmoid(-d - k)          (the three sum to one)
        label +1:  l = -log sigmoid(d - k)
        label -1:  l = -log sigmoid(-d - k)
        label  0:  l = -log sigmoid(d - k) - log sigmoid(-d - k) - log(theta^2 - 1)
        loss = sum_valid l / max(#valid, 1)       (labels outside {+1, -1, 0} are not valid)

    Upstream (VideoAlign ``trainer.py``) masks invalid labels but divides by all entries; we divide by the
    valid ones, so the loss's scale does not depend on how many ratings are missing. ``theta > 1``.
    """
    if not theta > 1.0:
        raise ValueError(f"btt_loss: theta must be > 1 (theta = 1 gives ties probability 0), got {theta}")
    d = jnp.asarray(r_a, jnp.float32) - jnp.asarray(r_b, jnp.float32)
    labels = jnp.asarray(labels)
    k = math.log(theta)
    win_a = jax.nn.log_sigmoid(d - k)
    win_b = jax.nn.log_sigmoid(-d - k)
    tie = win_a + win_b + math.log(theta * theta - 1.0)
    loglik = jnp.where(labels == 1, win_a, jnp.where(labels == -1, win_b, tie))
    valid = (labels == 1) | (labels == -1) | (labels == 0)
    return -jnp.sum(jnp.where(valid, loglik, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def bt_loss(r_a, r_b, labels):
    """Bradley-Terry without ties (VideoAlign's ablation "BT"): ties and invalid labels are dropped.

    ::

        l = -log sigmoid(s d),  s = label in {+1, -1},  d = r_a - r_b;   loss = sum l / max(#decided, 1)
    """
    d = jnp.asarray(r_a, jnp.float32) - jnp.asarray(r_b, jnp.float32)
    labels = jnp.asarray(labels)
    decided = (labels == 1) | (labels == -1)
    sign = jnp.where(labels == -1, -1.0, 1.0)
    loglik = jax.nn.log_sigmoid(sign * d)
    return -jnp.sum(jnp.where(decided, loglik, 0.0)) / jnp.maximum(jnp.sum(decided), 1)


def regression_loss(r_a, r_b, labels):
    """Regression to the label (VideoAlign's ablation "regression"; the target scale is ours).

    Upstream regresses on absolute scores, which a pairwise set does not have; we regress the difference
    on the label, ties included::

        loss = sum_valid (r_a - r_b - label)^2 / max(#valid, 1)      label in {+1, -1, 0}
    """
    d = jnp.asarray(r_a, jnp.float32) - jnp.asarray(r_b, jnp.float32)
    labels = jnp.asarray(labels)
    valid = (labels == 1) | (labels == -1) | (labels == 0)
    err = jnp.square(d - labels.astype(jnp.float32))
    return jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _counts(labels: np.ndarray, diffs: np.ndarray, epsilon: float):
    """C, D, Th, Tm, Thm of Deutsch et al. at tie threshold ``epsilon`` (model tie iff |m| <= epsilon)."""
    model_tie = np.abs(diffs) <= epsilon
    human_tie = labels == 0
    concord = (~human_tie) & (~model_tie) & (labels * diffs > 0)
    return (int(np.sum(concord)), int(np.sum((~human_tie) & (~model_tie) & ~(labels * diffs > 0))),
            int(np.sum(human_tie & ~model_tie)), int(np.sum(~human_tie & model_tie)), int(np.sum(human_tie & model_tie)))


def tie_calibrated_accuracy(labels, diffs):
    """Pairwise accuracy with ties (Deutsch et al. 2023, "tie calibration") as VideoAlign evaluates it.

    ``labels`` int ``[N]`` in {+1, -1, 0} (human), ``diffs`` float ``[N]`` = r(A) - r(B) (model). The model
    says "tie" iff ``|m| <= eps``, and with C concordant, D discordant, Th human-only ties, Tm model-only
    ties, Thm ties of both::

        acc(eps)          = (C + Thm) / (C + D + Th + Tm + Thm)
        acc_with_ties     = max over eps in {|m_i|} of acc(eps);   epsilon = the smallest eps attaining it
        acc_without_ties  = C / (C + D) at eps = -1 (no model ties; human ties left out; m = 0 is discordant)

    The threshold is chosen on the evaluated set itself, as upstream does (optimistic); to use one fitted
    elsewhere, call :func:`accuracy_at` with it. Candidates are the |m_i| as upstream's sweep visits them
    (not eps = -1). Where several |m_i| are equal, upstream's incremental update also scores the
    in-between states that move only some of them into ties, which no threshold produces; we score each
    threshold with all of them moved. Returns ``(acc_with_ties, acc_without_ties, epsilon)`` as floats
    (nan without any decided pair for the second).
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    diffs = np.asarray(diffs, np.float64).reshape(-1)
    if labels.shape != diffs.shape:
        raise ValueError(f"tie_calibrated_accuracy: labels {labels.shape} and diffs {diffs.shape} differ")
    if labels.size == 0:
        raise ValueError("tie_calibrated_accuracy: no pairs")
    if not np.all(np.isin(labels, (-1, 0, 1))):
        raise ValueError("tie_calibrated_accuracy: labels must be in {+1, -1, 0}")
    n = labels.size
    decided = labels != 0
    correct = decided & (labels * diffs > 0)
    denom = int(np.sum(decided))
    without = float(np.sum(correct) / denom) if denom else float("nan")
    # Moving a pair into the model's ties changes the numerator by +1 (a human tie becomes Thm) or -1 (a
    # concordant pair becomes Tm) or 0 (a discordant one); the denominator stays N. So acc(eps) is the
    # decisive-correct count plus the running sum of those changes over the pairs with |m| <= eps.
    order = np.argsort(np.abs(diffs), kind="stable")
    mags = np.abs(diffs)[order]
    change = np.where(labels[order] == 0, 1, np.where(correct[order], -1, 0))
    numer = np.sum(correct) + np.cumsum(change)
    # the state at a threshold is the one after the last pair with that |m|
    last = np.r_[mags[1:] != mags[:-1], True]
    scores, thresholds = numer[last] / n, mags[last]
    best = int(np.argmax(scores))
    return float(scores[best]), without, float(thresholds[best])


def accuracy_at(labels, diffs, epsilon: float) -> float:
    """acc(eps) of :func:`tie_calibrated_accuracy` at a given threshold (e.g. one fitted on validation)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    diffs = np.asarray(diffs, np.float64).reshape(-1)
    c, d, th, tm, thm = _counts(labels, diffs, float(epsilon))
    return (c + thm) / max(c + d + th + tm + thm, 1)


__all__ = ["TIE_THETA", "accuracy_at", "bt_loss", "btt_loss", "regression_loss", "tie_calibrated_accuracy"]
