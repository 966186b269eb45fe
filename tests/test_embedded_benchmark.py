"""The embedded benchmark's TFDS builder: ArrayRecord on disk, read back without TensorFlow."""

import os
import subprocess
import sys

import numpy as np
import pytest

from shelllcc.data import embedded_benchmark as eb
from shelllcc.data import moving_textures as mt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_frames=5, height=32, width=32, train_size=12, test_size=4, seed=3)


def test_examples_equal_the_generator(tmp_path):
    cfg = eb.BenchmarkConfig(**SMALL)
    builder = eb.build(str(tmp_path), cfg, verbose=False)
    for split, size in (("train", 12), ("test", 4)):
        source = builder.as_data_source(split)
        assert len(source) == size
        seen = set()
        for i in range(size):
            ex = source[i]
            want = mt.generate_example(mt.split_seed(3, split), int(ex["index"]), cfg.clip_spec())
            np.testing.assert_array_equal(ex["video"], want["video"])
            assert ex["video"].shape == (5, 32, 32, 3) and ex["video"].dtype == np.uint8
            # the stored mask is the generator's coverage to within uint8 rounding, and it is where the clip
            # differs from the same clip's pixels elsewhere: fully covered pixels carry the object's colour
            assert ex["object_mask"].dtype == np.uint8 and ex["object_mask"].shape == (5, 32, 32)
            np.testing.assert_allclose(ex["object_mask"] / 255.0, want["mask"], atol=0.5 / 255 + 1e-7)
            assert (ex["object_mask"] == 255).any(axis=(1, 2)).all()        # the object is in every frame
            caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"]
            assert caption == want["caption"]
            assert eb.decode_labels(ex) == want["attributes"]
            seen.add(int(ex["index"]))
        assert seen == set(range(size))
    # Train and test are different clips.
    assert not np.array_equal(builder.as_data_source("train")[0]["video"], builder.as_data_source("test")[0]["video"])


def test_rebuild_reuses_and_configs_do_not_collide(tmp_path, capsys):
    eb.build(str(tmp_path), eb.BenchmarkConfig(**SMALL))
    eb.build(str(tmp_path), eb.BenchmarkConfig(**SMALL))
    assert "reused" in capsys.readouterr().out
    other = eb.build(str(tmp_path), eb.BenchmarkConfig(**dict(SMALL, num_frames=9)), verbose=False)
    assert other.as_data_source("train")[0]["video"].shape[0] == 9
    flat = eb.build(str(tmp_path), eb.BenchmarkConfig(**dict(SMALL, background_texture=False)), verbose=False)
    ex = flat.as_data_source("train")[0]
    want = mt.generate_example(mt.split_seed(3, "train"), int(ex["index"]),
                               mt.ClipSpec(num_frames=5, height=32, width=32, seed=3, background_texture=False))
    np.testing.assert_array_equal(ex["video"], want["video"])
    # a flat background: the corner pixel (never under the object's start) is the same grey in every clip
    assert len({tuple(flat.as_data_source("train")[i]["video"][0, 0, 0]) for i in range(12)}) <= 2
    assert sorted(d for d in os.listdir(tmp_path / eb.NAME) if not d.startswith(".")) == [
        "t5_32x32_train12_test4_seed3", "t5_32x32_train12_test4_seed3_flatbg", "t9_32x32_train12_test4_seed3"]


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="train_size must be positive"):
        eb.BenchmarkConfig(train_size=0)


def test_build_and_read_import_no_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from shelllcc.data import embedded_benchmark as eb\n"
        f"b = eb.build({str(tmp_path)!r}, eb.BenchmarkConfig(train_size=4, test_size=2, height=16, width=16,"
        " num_frames=3), verbose=False)\n"
        "x = b.as_data_source('train')[1]\n"
        "print('TF' if 'tensorflow' in sys.modules else 'NO_TF', x['video'].shape)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO_TF (3, 16, 16, 3)" in proc.stdout
