"""shelllcc.evaluation.classifier trained on real Moving Textures clips: accuracy on held-out clips,
sensitivity to detail (blur), the Fréchet feature space, save/load and input checks.

One classifier is trained per module (384 train clips, 300 steps: ~15 s on 2 CPU cores).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from shelllcc.data import moving_textures as mt
from shelllcc.evaluation import classifier as clf
from shelllcc.evaluation.frechet import frechet_distance_from_features

NUM_TRAIN, NUM_TEST, STEPS = 384, 256, 300


def _clips(split: str, n: int):
    examples = list(mt.generate_split(mt.split_seed(0, split), n))
    videos = np.stack([e["video"] for e in examples])
    labels = {a: np.array([e["labels"][a] for e in examples]) for a in mt.ATTRIBUTES}
    return videos, labels


def _box_blur(videos: np.ndarray, k: int = 5) -> np.ndarray:
    # k x k box blur of every frame (edge padded), as two separable 1-D passes.
    x = videos.astype(np.float32)
    h, w, r = x.shape[2], x.shape[3], k // 2
    p = np.pad(x, ((0, 0), (0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(p[:, :, i:i + h] for i in range(k)) / k
    p = np.pad(x, ((0, 0), (0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    x = sum(p[:, :, :, i:i + w] for i in range(k)) / k
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data():
    train = _clips("train", NUM_TRAIN)
    test = _clips("test", NUM_TEST)
    return train, test


@pytest.fixture(scope="module")
def trained(data):
    (videos, labels), _ = data
    lines = []
    model, history = clf.train_classifier(videos, labels, config=clf.ClassifierConfig(steps=STEPS, log_every=100),
                                          seed=0, log=lines.append)
    return model, history, lines


@pytest.fixture(scope="module")
def blurred_test(data):
    """The second half of the test clips, blurred."""
    _, (videos, _) = data
    return _box_blur(videos[NUM_TEST // 2:])


def test_training_logs_and_loss_falls(trained):
    _, history, lines = trained
    assert history["step"] == [100, 200, 300]
    assert len(lines) == 3 and all(line.startswith("classifier step") for line in lines)
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_heldout_accuracy(data, trained):
    # Measured at these settings over 3 training seeds / train subsets: colour 0.97-1.0, direction
    # 0.99-1.0, scale 0.99-1.0, shape 0.90-0.92, speed 1.0, texture 0.98-0.99 (256 test clips).
    model, _, _ = trained
    _, (videos, labels) = data
    acc = clf.accuracy(clf.predict(model, videos, batch_size=64), labels)
    floors = {"colour": 0.93, "direction": 0.93, "scale": 0.93, "shape": 0.8, "speed": 0.93, "texture": 0.93}
    for attribute, floor in floors.items():
        assert acc[attribute] >= floor, (attribute, acc)
    assert acc["mean"] >= 0.9, acc


def test_blur_destroys_scale_and_texture(data, trained, blurred_test):
    # The classifier must see pixel-level detail: a 5x5 box blur takes scale and texture to about
    # chance (measured: scale ~0.5, texture 0.3-0.45) while motion, read from positions, survives.
    model, _, _ = trained
    _, (videos, labels) = data
    half = {a: y[NUM_TEST // 2:] for a, y in labels.items()}
    sharp = clf.accuracy(clf.predict(model, videos[NUM_TEST // 2:]), half)
    blurred = clf.accuracy(clf.predict(model, blurred_test), half)
    assert blurred["scale"] < sharp["scale"] - 0.25, (sharp, blurred)
    assert blurred["texture"] < sharp["texture"] - 0.3, (sharp, blurred)
    assert blurred["speed"] > 0.85, blurred


def test_frechet_real_vs_blurred(data, trained, blurred_test):
    # Two disjoint real sets are close; real vs blurred far (measured ratio 5-7x).
    model, _, _ = trained
    _, (videos, _) = data
    half = NUM_TEST // 2
    a = clf.features(model, videos[:half])
    b = clf.features(model, videos[half:])
    b_blur = clf.features(model, blurred_test)
    assert a.shape == (half, model.config.hidden) and np.all(np.isfinite(a))
    real = frechet_distance_from_features(a, b)
    fake = frechet_distance_from_features(a, b_blur)
    assert fake > 3.0 * real, (real, fake)


def test_save_load_round_trip(tmp_path, data, trained):
    model, _, _ = trained
    _, (videos, _) = data
    path = clf.save_classifier(str(tmp_path / "clf"), model, model.config)
    loaded = clf.load_classifier(path)
    assert loaded.config == model.config
    sample = videos[:64]
    p0, p1 = clf.predict(model, sample), clf.predict(loaded, sample)
    for a in p0:
        np.testing.assert_array_equal(p0[a], p1[a])
    np.testing.assert_array_equal(clf.features(model, sample), clf.features(loaded, sample))
    # The module call (float input in [0, 1]) agrees with the batched uint8 path. Jitted: run
    # eagerly, every op compiles on its own (~5 s here).
    logits = nnx.jit(lambda m, v: m(v))(loaded, sample[:8].astype(np.float32) / 255.0)
    for a in p0:
        np.testing.assert_array_equal(np.argmax(np.asarray(logits[a]), -1), p0[a][:8])


def test_bad_inputs(data, trained, tmp_path):
    model, _, _ = trained
    (videos, labels), _ = data
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\].*\(17, 64, 64, 3\)"):
        clf.predict(model, videos[0])
    with pytest.raises(ValueError, match=r"\[T, H, W\] = \[17, 64, 64\]"):
        clf.predict(model, videos[:2, :, :32])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clf.predict(model, videos[:2].astype(np.float32))
    with pytest.raises(ValueError, match="lack attributes.*speed"):
        clf.train_classifier(videos[:40], {a: y[:40] for a, y in labels.items() if a != "speed"}, log=None)
    with pytest.raises(ValueError, match=r"shape \(39,\), expected \(40,\)"):
        clf.train_classifier(videos[:40], {a: y[:39] for a, y in labels.items()}, log=None)
    with pytest.raises(ValueError, match=r"\[N, T, H, W, 3\]"):
        clf.train_classifier(videos[:40, ..., :1], labels, log=None)
    with pytest.raises(ValueError, match="predictions .* and labels .* differ"):
        clf.accuracy({"shape": np.zeros(3)}, {"shape": np.zeros(4)})
    with pytest.raises(FileNotFoundError):
        clf.load_classifier(str(tmp_path / "missing"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "classifier.json").write_text("{}")
    with pytest.raises(ValueError, match="former format"):
        clf.load_classifier(str(legacy))


def test_locate_object_tracks_the_true_centroid():
    rng = np.random.default_rng(0)
    for i in range(6):
        attributes = mt.sample_attributes(rng)
        video, mask = mt.generate_clip(i, attributes, return_mask=True)
        got = np.asarray(clf.locate_object(clf.to_float_video(video)))
        ys, xs = np.mgrid[:64, :64] + 0.5
        true = np.stack([(mask * xs).sum((1, 2)), (mask * ys).sum((1, 2))], -1) / mask.sum((1, 2))[:, None]
        # Only the bright texture phase is weighted, so the estimate is off by at most ~2 px.
        assert np.max(np.abs(got - true)) < 2.5, (attributes, np.max(np.abs(got - true)))


def test_spectral_texture_rotation_invariant_and_discriminative():
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 1, (3, 40, 40, 3)).astype(np.float32)
    # Stripes have one orientation (large m=1 at the peak ring), checks two orthogonal ones (m=1 ~ 0).
    yy, xx = np.mgrid[:40, :40].astype(np.float32)
    u = np.cos(0.4) * xx + np.sin(0.4) * yy
    v = -np.sin(0.4) * xx + np.cos(0.4) * yy
    stripes = (np.sin(2 * np.pi * u / 7) > 0).astype(np.float32)
    checks = ((np.sin(2 * np.pi * u / 7) > 0) == (np.sin(2 * np.pi * v / 7) > 0)).astype(np.float32)
    patterns = np.repeat(np.stack([stripes, checks])[..., None], 3, -1)
    crops = np.concatenate([noise, np.rot90(noise, axes=(1, 2)), patterns])
    d = np.asarray(jax.jit(clf.spectral_texture)(crops))  # one compilation instead of one per op
    np.testing.assert_allclose(d[3:6], d[:3], rtol=1e-4, atol=1e-4)  # 90-degree rotation
    for desc, m1_big in ((d[6], True), (d[7], False)):
        peak = 2 + int(np.argmax(desc[2:, 0]))
        assert (desc[peak, 1] > 0.8) == m1_big, (desc[peak], m1_big)


def test_mirror_and_reverse_label_maps(data, trained):
    names = mt.DIRECTIONS
    mirror = {names[i]: names[j] for i, j in enumerate(clf._MIRROR)}
    reverse = {names[i]: names[j] for i, j in enumerate(clf._REVERSE)}
    assert mirror["left"] == "right" and mirror["up"] == "up" and mirror["down-left"] == "down-right"
    assert reverse["up"] == "down" and reverse["up-left"] == "down-right" and reverse["right"] == "left"
    # The trained model agrees: a mirrored, time-reversed clip is seen moving the mirrored-reversed way.
    model, _, _ = trained
    _, (videos, _) = data
    sample = videos[:64]
    p = clf.predict(model, sample)["direction"]
    q = clf.predict(model, np.ascontiguousarray(sample[:, ::-1, :, ::-1]))["direction"]
    assert np.mean(q == clf._REVERSE[clf._MIRROR[p]]) > 0.9
