"""Moving Textures generator: determinism, coverage of attributes/vocabulary, motion, detail."""

import itertools

import numpy as np
import pytest

from shelllcc.data import moving_textures as mt

SMALL = mt.ClipSpec(num_frames=3, height=24, width=24)
PLAIN = mt.ClipSpec(background_texture=False)


def _attrs(**overrides):
    base = {"shape": "circle", "colour": "red", "texture": "stripes", "scale": "fine",
            "direction": "right", "speed": "slow"}
    base.update(overrides)
    return base


def _centroid(mask):
    """Mask-weighted centre (x, y) per frame, ``[T, 2]``."""
    t, h, w = mask.shape
    total = mask.sum(axis=(1, 2))
    x = (mask.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / total
    y = (mask.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / total
    return np.stack([x, y], axis=1)


def _laplacian(frames):
    f = frames.astype(np.float32)
    return (f[:, 1:-1, :-2] + f[:, 1:-1, 2:] + f[:, :-2, 1:-1] + f[:, 2:, 1:-1]
            - 4 * f[:, 1:-1, 1:-1])


def _box_blur3(frames):
    f = np.pad(frames.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    return sum(f[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def test_split_determinism_and_index_independence():
    seed = mt.split_seed(3, "train")
    a = list(mt.generate_split(seed, 5))
    b = list(mt.generate_split(seed, 12))
    for x, y in zip(a, b[:5]):
        assert x["video"].tobytes() == y["video"].tobytes()
        assert x["caption"] == y["caption"] and x["labels"] == y["labels"]
    # Sharding with `start` reproduces the same clips.
    c = list(mt.generate_split(seed, 3, start=2))
    for x, y in zip(c, b[2:5]):
        assert x["video"].tobytes() == y["video"].tobytes()
    videos = [x["video"].tobytes() for x in b]
    assert len(set(videos)) == len(videos)


def test_splits_differ():
    assert len({mt.split_seed(0, s) for s in ("train", "validation", "test")}) == 3
    assert mt.split_seed(0, "train") != mt.split_seed(1, "train")
    train = next(mt.generate_split(mt.split_seed(0, "train"), 1))
    test = next(mt.generate_split(mt.split_seed(0, "test"), 1))
    assert train["video"].tobytes() != test["video"].tobytes()
    with pytest.raises(ValueError):
        mt.split_seed(0, "dev")


def test_example_structure():
    ex = next(mt.generate_split(mt.split_seed(0, "train"), 1))
    assert ex["video"].shape == (17, 64, 64, 3) and ex["video"].dtype == np.uint8
    assert set(ex["attributes"]) == set(mt.ATTRIBUTES) == set(ex["labels"])
    for name, value in ex["attributes"].items():
        assert isinstance(value, str)
        assert mt.ATTRIBUTES[name][ex["labels"][name]] == value
    video, mask = mt.generate_clip(1, ex["attributes"], mt.ClipSpec(num_frames=5, height=32,
                                                                    width=48), return_mask=True)
    assert video.shape == (5, 32, 48, 3) and video.dtype == np.uint8
    assert mask.shape == (5, 32, 48) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0


def test_generate_clip_seed_determinism():
    attrs = _attrs(texture="noise")
    assert mt.generate_clip(7, attrs).tobytes() == mt.generate_clip(7, attrs).tobytes()
    assert mt.generate_clip(7, attrs).tobytes() != mt.generate_clip(8, attrs).tobytes()


def test_every_combination_renders():
    # Colour only multiplies the pattern, so it is cycled rather than crossed to keep this fast.
    geometric = ("shape", "texture", "scale", "direction", "speed")
    combos = itertools.product(*(mt.ATTRIBUTES[n] for n in geometric))
    for i, values in enumerate(combos):
        attrs = dict(zip(geometric, values), colour=mt.COLOURS[i % len(mt.COLOURS)])
        video, mask = mt.generate_clip(i, attrs, SMALL, return_mask=True)
        assert video.shape == (3, 24, 24, 3)
        assert mask.sum(axis=(1, 2)).min() > 5.0  # the object is visible in every frame
    for colour in mt.COLOURS:
        mt.generate_clip(0, _attrs(colour=colour), SMALL)


def test_unknown_attribute_rejected():
    with pytest.raises(ValueError):
        mt.generate_clip(0, _attrs(shape="hexagon"), SMALL)


def test_captions_name_every_attribute_within_vocabulary():
    vocab = set(mt.VOCABULARY)
    rng = np.random.default_rng(0)
    for _ in range(300):
        attrs = mt.sample_attributes(rng)
        for variant in range(len(mt.CAPTION_TEMPLATES)):
            words = mt.caption(attrs, variant).split()
            assert set(words) <= vocab
            for value in attrs.values():
                assert value in words
    for ex in mt.generate_split(mt.split_seed(0, "test"), 20, SMALL):
        assert set(ex["caption"].split()) <= vocab
    assert mt.caption(_attrs(colour="orange"), 0).startswith("a slow orange")
    assert mt.caption(_attrs(colour="orange"), 1).startswith("an orange")


@pytest.mark.parametrize("direction", mt.DIRECTIONS)
def test_motion_follows_direction(direction):
    for seed in range(3):
        _, mask = mt.generate_clip(seed, _attrs(direction=direction, shape="square"), PLAIN,
                                   return_mask=True)
        c = _centroid(mask)
        move = c[-1] - c[0]
        expected = np.asarray(mt.DIRECTION_VECTORS[direction])
        assert np.dot(move, expected) > 5.0
        # Nearly all displacement is along the stated direction.
        assert abs(move[0] * expected[1] - move[1] * expected[0]) < 1.0
        # Smooth linear motion: equal steps frame to frame.
        steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
        assert steps.std() < 0.1 * steps.mean()


def test_plain_background_centroid_of_pixels_moves():
    # The rendered pixels themselves (not only the mask) move: object over a flat background.
    video = mt.generate_clip(0, _attrs(direction="left", colour="white"), PLAIN)
    diff = np.abs(video.astype(np.float32) - 76.5).sum(-1)  # 0.3 grey background
    c = _centroid(diff)
    assert c[-1, 0] - c[0, 0] < -5.0 and abs(c[-1, 1] - c[0, 1]) < 1.5


def test_fast_moves_farther_than_slow():
    for seed in range(5):
        dist = {}
        for speed in mt.SPEEDS:
            _, mask = mt.generate_clip(seed, _attrs(speed=speed, direction="down-left"), PLAIN,
                                       return_mask=True)
            c = _centroid(mask)
            dist[speed] = np.linalg.norm(c[-1] - c[0])
        assert dist["fast"] > 1.5 * dist["slow"]


@pytest.mark.parametrize("texture", mt.TEXTURES)
@pytest.mark.parametrize("scale", mt.SCALES)
def test_textures_carry_high_frequency_energy(texture, scale):
    video, mask = mt.generate_clip(4, _attrs(texture=texture, scale=scale, shape="square",
                                             colour="white"), return_mask=True)
    inside = (mask[:, 2:-2, 2:-2] > 0.999)  # interior of the object, away from its edges
    # Restrict to pixels whose 5x5 neighbourhood is inside, so the object's outline is excluded.
    core = np.ones_like(inside[:, 2:-2, 2:-2])
    for i in range(5):
        for j in range(5):
            core &= inside[:, i:i + inside.shape[1] - 4, j:j + inside.shape[2] - 4]
    assert core.sum() > 100
    sharp = np.abs(_laplacian(video))[:, 3:-3, 3:-3][core].mean()
    blurred = np.abs(_laplacian(_box_blur3(video)))[:, 3:-3, 3:-3][core].mean()
    assert sharp > 10.0  # grey levels per pixel: real detail, not a flat fill
    # Fine textures sit near Nyquist and nearly vanish under the blur; coarse ones keep their
    # interiors but lose their sharp edges.
    assert sharp > (2.5 if scale == "fine" else 1.8) * blurred


def test_background_is_lower_contrast_than_object():
    video, mask = mt.generate_clip(2, _attrs(colour="white"), return_mask=True)
    v = video.astype(np.float32).mean(-1)
    assert v[mask > 0.999].std() > 3 * v[mask < 0.001].std()
