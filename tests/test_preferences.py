"""Preference pairs of the embedded benchmark: degradations, the oracle, splits, the TFDS builder, VideoAlign's CSV."""

import csv

import numpy as np
import pytest

from shelllcc.data import moving_textures as mt
from shelllcc.data import preference_oracle as oracle
from shelllcc.data import preferences as pf

SPEC = mt.ClipSpec(num_frames=9, height=64, width=64)


def _clips(n=6):
    return [mt.generate_example(123, i, SPEC) for i in range(n)]


def test_degradations_do_what_they_say():
    ex = _clips(1)[0]
    v = ex["video"]
    f = v.astype(np.float64)
    b = pf.blur(v, 1.2)
    assert oracle.object_detail(b) < 0.5 * oracle.object_detail(v)
    assert abs(b.astype(np.float64).mean() - f.mean()) < 1.0            # a blur keeps the mean
    n = pf.add_noise(v, 12.0, np.random.default_rng(0))
    assert 10.0 < np.std(n.astype(np.float64) - f) < 13.0               # clipping at 0/255 trims a little
    c = pf.colour_shift(v, 2, 30.0)
    np.testing.assert_array_equal(c[..., :2], v[..., :2])
    inside = v[..., 2] < 200
    np.testing.assert_array_equal(c[..., 2][inside].astype(int), v[..., 2][inside].astype(int) + 30)
    r = pf.frame_repeat(v, 3)
    np.testing.assert_array_equal(r[0], r[2])
    np.testing.assert_array_equal(r[3], v[3])
    np.testing.assert_array_equal(pf.reverse(v)[0], v[-1])
    # a re-render with the direction changed keeps everything but the motion: the first frames' objects overlap
    wrong = pf.degrade("wrong_motion", v, ex["attributes"], SPEC, [1, 2], np.random.default_rng(0))
    track_v, track_w = oracle.track(mt.generate_clip(np.random.default_rng([1, 2]), ex["attributes"], SPEC)), oracle.track(wrong)
    d_v, d_w = track_v[-1] - track_v[0], track_w[-1] - track_w[0]
    assert np.dot(d_v, d_w) / (np.linalg.norm(d_v) * np.linalg.norm(d_w)) < 0.9


def test_oracle_prefers_the_original_on_the_degraded_dimension():
    rng = np.random.default_rng(0)
    for i, ex in enumerate(_clips(5)):
        v, a = ex["video"], ex["attributes"]
        ref = mt.generate_clip(np.random.default_rng([9, i]), a, SPEC)
        assert oracle.vq_score(pf.blur(v, 1.2), ref) < oracle.vq_score(v, ref)
        assert oracle.vq_score(pf.add_noise(v, 15.0, rng), ref) < oracle.vq_score(v, ref)
        assert oracle.vq_score(pf.colour_shift(v, 1, 40.0), ref) < oracle.vq_score(v, ref)
        assert oracle.mq_score(pf.reverse(v), a) < oracle.mq_score(v, a) - 1.0
        assert oracle.mq_score(pf.frame_repeat(v, 2), a) < oracle.mq_score(v, a)
        for kind in ("swap_colour", "swap_shape"):
            seed = [7, i]
            orig = mt.generate_clip(np.random.default_rng(seed), a, SPEC)
            assert oracle.ta_score(pf.degrade(kind, orig, a, SPEC, seed, rng), a) < oracle.ta_score(orig, a)
        # held frames do not change what is drawn: TA is exactly equal on the first frame
        assert oracle.ta_score(pf.frame_repeat(v, 2), a) == oracle.ta_score(v, a)


def test_labels_and_margins():
    np.testing.assert_array_equal(oracle.labels_from_scores([1.0, 0.0, -1.0], [0.0, 0.05, 1.0], [0.1, 0.1, 0.1]), [1, 0, -1])
    diffs = np.random.default_rng(0).normal(size=(300, 3))
    m = oracle.tie_margins(diffs)
    assert np.all(np.abs(np.mean(np.abs(diffs) <= m, axis=0) - 1 / 3) < 0.01)


def test_pairs_splits_are_disjoint_by_prompt_and_a_third_are_ties():
    made = pf.make_pairs(pf.PreferenceConfig(num_prompts=14, pairs_per_prompt=4))
    keys = {s: {pf.attribute_key(p["attributes"]) for p in ps} for s, ps in made["pairs"].items()}
    caps = {s: {p["caption"] for p in ps} for s, ps in made["pairs"].items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not keys[a] & keys[b] and not caps[a] & caps[b]
    train = np.array([p["labels"] for p in made["pairs"]["train"]])
    assert abs(np.mean(train == 0) - 1 / 3) < 0.05
    for p in made["pairs"]["train"]:
        np.testing.assert_array_equal(p["labels"], oracle.labels_from_scores(p["score_a"], p["score_b"], made["margins"]))


def test_builder_round_trip(tmp_path):
    cfg = pf.PreferenceConfig(num_prompts=10, pairs_per_prompt=3, degraded_per_prompt=3)
    builder = pf.build(str(tmp_path), cfg, verbose=False)
    made = pf.make_pairs(cfg)
    train = builder.as_data_source("train")
    assert len(train) == len(made["pairs"]["train"])
    ex = train[0]
    want = made["pairs"]["train"][int(ex["index"])]
    np.testing.assert_array_equal(ex["video_a"], want["video_a"])
    np.testing.assert_array_equal(pf.labels_of(ex), want["labels"])
    np.testing.assert_allclose(builder.info.metadata["tie_margins"], made["margins"], rtol=1e-6)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(pf.CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in pf.CSV_COLUMNS})


def test_videoalign_csv_reader_counts_bad_rows(tmp_path):
    (tmp_path / "videos").mkdir()
    for name in ("1_A", "1_B", "2_A", "2_B"):
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"x")
    row = lambda a, b, p, vq="A", mq="B", ta="same": {"path_A": f"./videos/{a}.mp4", "path_B": f"./videos/{b}.mp4",
                                                       "prompt": p, "VQ": vq, "MQ": mq, "TA": ta}
    _write_csv(tmp_path / "data.csv", [
        row("1_A", "1_B", "a cat"),
        row("1_A", "1_B", "a cat"),                 # duplicate
        row("3_A", "1_B", "a dog"),                 # missing video
        row("2_A", "2_B", "a fox", vq="A>B"),       # unknown label, kept with that label ignored
        row("2_B", "2_A", "a fox", ta="SAME"),
    ])
    records, report = pf.read_videoalign_csv(str(tmp_path / "data.csv"))
    assert {k: report[k] for k in ("rows", "kept", "duplicate", "missing_video", "unknown_label")} == \
        {"rows": 5, "kept": 3, "duplicate": 1, "missing_video": 1, "unknown_label": 1}
    assert report["examples"] == {"duplicate": [2], "missing_video": [3], "unknown_label": [4]}
    np.testing.assert_array_equal(records[0]["labels"], [1, -1, 0])
    np.testing.assert_array_equal(records[1]["labels"], [2, -1, 0])
    assert records[0]["path_a"] == str(tmp_path / "videos" / "1_A.mp4")
    _write_csv(tmp_path / "bad.csv", [])
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("path_A,path_B,prompt,VQ\n")
    with pytest.raises(ValueError, match="missing column"):
        pf.read_videoalign_csv(str(tmp_path / "bad.csv"))
