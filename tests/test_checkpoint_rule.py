"""The checkpoint rule on synthetic validation trajectories whose right answer is known by construction."""

import pytest

from shelllcc.evaluation.checkpoint_rule import collapse_step, pick_checkpoint


def traj(laps, accs, every=10):
    return [{"step": every * (i + 1), "laplacian_ratio": l, "attribute_accuracy": a}
            for i, (l, a) in enumerate(zip(laps, accs))]


# a run that gains detail, peaks at step 30, then collapses from step 50 (accuracy far below 0.60 - 0.05)
RISE_AND_COLLAPSE = traj([1.05, 1.12, 1.30, 1.22, 1.60, 1.90, 2.10], [0.61, 0.60, 0.59, 0.58, 0.40, 0.31, 0.30])


def test_peak_is_the_most_detail_before_the_collapse():
    p = pick_checkpoint(RISE_AND_COLLAPSE, rule="peak", base_accuracy=0.60)
    # the collapsed steps have more "detail" (noise); they must not be picked
    assert p["step"] == 30 and p["collapse_step"] == 50 and p["window_end"] == 40


def test_last_and_final():
    assert pick_checkpoint(RISE_AND_COLLAPSE, rule="last", base_accuracy=0.60)["step"] == 40
    assert pick_checkpoint(RISE_AND_COLLAPSE, rule="final", base_accuracy=0.60)["step"] == 70


def test_one_noisy_evaluation_is_not_a_collapse():
    # a single dip below the floor (patience 2) leaves the window open
    t = traj([1.0, 1.1, 1.2, 1.3], [0.60, 0.50, 0.60, 0.60])
    assert collapse_step(t, base_accuracy=0.6, patience=2) is None
    assert pick_checkpoint(t, base_accuracy=0.6, patience=2)["step"] == 40
    # with patience 1 the dip ends the window at step 10
    assert collapse_step(t, base_accuracy=0.6, patience=1) == 20
    assert pick_checkpoint(t, base_accuracy=0.6, patience=1)["step"] == 10


def test_collapse_at_the_first_evaluation_keeps_the_first_step():
    t = traj([3.0, 3.1, 3.2], [0.2, 0.2, 0.2])
    p = pick_checkpoint(t, base_accuracy=0.6)
    assert p["step"] == 10 and p["collapse_step"] == 10 and p["window_end"] is None
    assert "first evaluation" in p["reason"]


def test_ties_go_to_the_earliest_step():
    t = traj([1.2, 1.2, 1.1], [0.6, 0.6, 0.6])
    assert pick_checkpoint(t, base_accuracy=0.6)["step"] == 10


def test_the_floor_is_inclusive():
    # exactly base - max_accuracy_drop is kept
    t = traj([1.0, 2.0, 3.0], [0.55, 0.55, 0.55])
    assert collapse_step(t, base_accuracy=0.6, max_accuracy_drop=0.05) is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown checkpoint rule"):
        pick_checkpoint(RISE_AND_COLLAPSE, rule="best", base_accuracy=0.6)
    with pytest.raises(ValueError, match="increasing and > 0"):
        pick_checkpoint([{"step": 0, "laplacian_ratio": 1.0, "attribute_accuracy": 0.6}], base_accuracy=0.6)
    with pytest.raises(ValueError, match="no validation"):
        pick_checkpoint([], base_accuracy=0.6)
