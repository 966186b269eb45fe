"""Which checkpoint of a reward fine-tuning run to keep, from its validation trajectory alone.

The Shell-LCC authors expect the one-step reward to collapse the generator eventually and keep the
checkpoint at the "peak", chosen by looking at frames. This module states that choice as a rule fixed
before a run and applied to validation metrics only (never to the test prompts)::

    trajectory   = [(step_1, m_1), (step_2, m_2), ...]     validation metrics every few steps, step_1 > 0
    kept(m)      = m.attribute_accuracy >= base_accuracy - max_accuracy_drop
    collapse     = the first step_i such that kept fails at step_i and at the next patience - 1
                   evaluations (patience >= 1; consecutive failures guard against one noisy evaluation)
    window       = the evaluated steps before collapse (all of them when there is no collapse)
    rule 'peak'  : argmax over window of m[score]            (ties: the earliest step)
    rule 'last'  : the last step of window
    rule 'final' : the last evaluated step (no early stopping)

An empty window (collapse at the first evaluation) picks the first evaluated step and says so. The
base model itself (step 0) is never picked: a variant's row describes the fine-tuned model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

RULES = ("peak", "last", "final")


def collapse_step(trajectory: Sequence[Mapping[str, Any]], *, base_accuracy: float, max_accuracy_drop: float = 0.05,
                  patience: int = 2, accuracy_key: str = "attribute_accuracy") -> int | None:
    """The step at which the run counts as collapsed (module docstring), or ``None``."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    floor = base_accuracy - max_accuracy_drop
    fails = [float(r[accuracy_key]) < floor for r in trajectory]
    for i in range(len(fails) - patience + 1):
        if all(fails[i:i + patience]):
            return int(trajectory[i]["step"])
    return None


def pick_checkpoint(trajectory: Sequence[Mapping[str, Any]], *, rule: str = "peak", base_accuracy: float,
                    max_accuracy_drop: float = 0.05, patience: int = 2, score: str = "laplacian_ratio",
                    accuracy_key: str = "attribute_accuracy") -> dict[str, Any]:
    """``{"step", "rule", "collapse_step", "window_end", "reason"}`` for a validation trajectory (a list of
    dicts with ``step``, ``score`` and ``accuracy_key``, in step order)."""
    if rule not in RULES:
        raise ValueError(f"unknown checkpoint rule {rule!r}; expected one of {RULES}")
    if not trajectory:
        raise ValueError("no validation evaluations to pick a checkpoint from")
    steps = [int(r["step"]) for r in trajectory]
    if steps != sorted(set(steps)) or steps[0] < 1:
        raise ValueError(f"trajectory steps must be increasing and > 0, got {steps}")
    collapse = collapse_step(trajectory, base_accuracy=base_accuracy, max_accuracy_drop=max_accuracy_drop,
                             patience=patience, accuracy_key=accuracy_key)
    window = [r for r in trajectory if collapse is None or r["step"] < collapse]
    out = {"rule": rule, "collapse_step": collapse, "window_end": window[-1]["step"] if window else None}
    if rule == "final":
        return {**out, "step": steps[-1], "reason": "the last evaluated step (no early stopping)"}
    if not window:
        return {**out, "step": steps[0], "reason": f"validation accuracy fell more than {max_accuracy_drop} below the "
                                                   f"base's at the first evaluation; the first evaluated step is kept"}
    if rule == "last":
        why = "no collapse" if collapse is None else f"collapse at step {collapse}"
        return {**out, "step": int(window[-1]["step"]), "reason": f"the last step before collapse ({why})"}
    best = max(window, key=lambda r: (float(r[score]), -int(r["step"])))
    why = "no collapse" if collapse is None else f"before the collapse at step {collapse}"
    return {**out, "step": int(best["step"]), "reason": f"highest validation {score} ({float(best[score]):.3f}), {why}"}


__all__ = ["RULES", "collapse_step", "pick_checkpoint"]
