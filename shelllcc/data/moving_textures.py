"""Moving Textures: an embedded text-to-video benchmark whose detail and blur are measurable.

Each clip shows one object (a shape) filled with a coloured, high-frequency texture, sliding in a
straight line over a static, lower-contrast textured background. The caption names every attribute,
e.g. ``"a red circle with fine stripes moving left at slow speed"``.

Why this data:

* **Detail and blur are measurable.** Textures are hard-edged stripes, checks, dots and pixel-scale
  noise at periods of a few pixels, so they carry strong high-frequency energy that any blur
  (a VAE round trip, an over-smoothed sampler, reward hacking towards flat colour) visibly removes.
  Comparing e.g. the mean absolute Laplacian inside the object before and after generation
  quantifies it; the exact object mask is available from :func:`generate_clip`.
* **Attributes are classifiable.** Shape, colour, texture, texture scale, direction and speed are
  drawn independently from small fixed sets (module-level tuples), so a classifier trained on real
  clips can score whether generated clips follow their prompt, per attribute.
* **Captions are closed-vocabulary.** Every caption word is in :data:`VOCABULARY`, so a word-level
  tokenizer needs no out-of-vocabulary handling.
* **No download, fast and deterministic.** Pure vectorised NumPy; clip ``i`` of a split depends only
  on ``(seed, i)``, so the set can be rebuilt (or sharded) anywhere and gives the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white")
TEXTURES = ("stripes", "checks", "dots", "noise")
SCALES = ("fine", "coarse")
DIRECTIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
SPEEDS = ("slow", "fast")

COLOUR_RGB: Mapping[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.10),
    "cyan": (0.10, 0.90, 0.95),
    "magenta": (0.95, 0.15, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}

# Unit vectors in image coordinates (x to the right, y downwards, as rows grow).
_S = float(np.sqrt(0.5))
DIRECTION_VECTORS: Mapping[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-_S, -_S), "up-right": (_S, -_S), "down-left": (-_S, _S), "down-right": (_S, _S),
}

# Distance travelled over a reference clip of 17 frames, as a fraction of the frame's short side.
# The two ranges do not overlap, so "fast" always moves farther than "slow".
SPEED_TRAVEL: Mapping[str, tuple[float, float]] = {"slow": (0.17, 0.23), "fast": (0.38, 0.46)}
_REFERENCE_STEPS = 16

# Texture period in pixels (cell size for noise). Even "coarse" stays at a few pixels so both
# scales have hard edges that a 3x3 blur visibly softens; "fine" is near the Nyquist limit.
TEXTURE_PERIOD: Mapping[str, Mapping[str, tuple[float, float]]] = {
    "stripes": {"fine": (3.0, 4.0), "coarse": (6.0, 8.0)},
    "checks": {"fine": (3.5, 4.5), "coarse": (7.0, 9.0)},
    "dots": {"fine": (3.5, 4.5), "coarse": (6.5, 8.5)},
    "noise": {"fine": (1.0, 1.3), "coarse": (2.2, 2.8)},
}

ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "scale": SCALES,
    "direction": DIRECTIONS, "speed": SPEEDS,
}

CAPTION_TEMPLATES = (
    "a {speed} {colour} {shape} with {scale} {texture} moving {direction}",
    "a {colour} {shape} with {scale} {texture} moving {direction} at {speed} speed",
    "{scale} {texture} on a {colour} {shape} that moves {direction} at {speed} speed",
)


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for template in CAPTION_TEMPLATES:
        for word in template.split():
            if word.startswith("{"):
                words.update(v for value in ATTRIBUTES[word[1:-1]] for v in value.split())
            else:
                words.add(word)
    if "a" in words:
        words.add("an")
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()

SPLIT_CODES: Mapping[str, int] = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How clips are rendered; the attributes say *what* is rendered.

    ``seed`` is the dataset's base seed: a builder derives per-split seeds with
    :func:`split_seed` so splits never share clips.
    """

    num_frames: int = 17
    height: int = 64
    width: int = 64
    seed: int = 0
    background_texture: bool = True      # off: flat grey, e.g. to isolate the object in tests
    background_contrast: float = 0.12    # low, so the object's texture dominates the detail metric
    object_size: tuple[float, float] = (0.15, 0.20)  # radius range, fraction of the short side
    object_dark: float = 0.25            # brightness of the texture's "off" phase, times the colour
    noise_std: float = 0.0               # optional sensor noise, in [0, 1] units


def split_seed(seed: int, split: str) -> int:
    """Seed of ``split`` (train/validation/test) derived from a dataset seed; distinct per split."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_CODES)}")
    # Hashing through SeedSequence avoids accidental overlap such as train(seed=1) == test(seed=0).
    return int(np.random.SeedSequence([int(seed), SPLIT_CODES[split]]).generate_state(1)[0])


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of clip ``index`` of the split with seed ``seed``; independent of other clips."""
    return np.random.default_rng([int(seed), int(index)])


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One value per attribute, independently and uniformly, so every combination is possible."""
    return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}


def attribute_labels(attributes: Mapping[str, str]) -> dict[str, int]:
    """Integer class index of every attribute (its position in the module-level tuple)."""
    return {name: ATTRIBUTES[name].index(attributes[name]) for name in ATTRIBUTES}


def caption(attributes: Mapping[str, str], variant: int = 0) -> str:
    """Caption naming every attribute; ``variant`` picks one of :data:`CAPTION_TEMPLATES`."""
    template = CAPTION_TEMPLATES[variant % len(CAPTION_TEMPLATES)]
    words = template.format(**{name: attributes[name] for name in ATTRIBUTES}).split()
    for i, word in enumerate(words[:-1]):
        if word == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Rendering. Everything is computed on the full [T, H, W] grid with signed distances, so edges are
# anti-aliased by a 1-pixel ramp and sub-pixel motion is smooth rather than jumping by whole pixels.


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    # Fraction of a pixel inside the region for a signed distance in pixels (negative inside).
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _square_wave(x: np.ndarray, period: float) -> np.ndarray:
    # Anti-aliased 50% duty square wave: signed distance to the nearest edge turned into coverage.
    f = x / period
    f = f - np.floor(f)
    return np.clip(period * (np.abs(f - 0.5) - 0.25) + 0.5, 0.0, 1.0)


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, approx. near the edge) of ``shape`` of radius ``r`` at the origin."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return np.sqrt(u * u + v * v) - r
    if shape == "square":
        # Scaled so the area is close to the circle's, keeping object sizes comparable.
        return np.maximum(au, av) - 0.89 * r
    if shape == "diamond":
        return (au + av - 1.25 * r) * np.float32(_S)
    if shape == "triangle":
        # Equilateral, pointing up (v grows downwards); circumradius enlarged to match the area.
        c = 1.35 * r
        return np.maximum(v, np.maximum(0.866 * u - 0.5 * v, -0.866 * u - 0.5 * v)) - 0.5 * c
    if shape == "cross":
        a, b = 1.1 * r, 0.4 * r
        return np.minimum(np.maximum(au - a, av - b), np.maximum(au - b, av - a))
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72 * r) - 0.38 * r
    raise ValueError(f"unknown shape {shape!r}")


def _bilinear_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cell: float,
                    extent: float) -> np.ndarray:
    # Random values on a lattice of spacing `cell` covering [-extent, extent]^2, bilinearly
    # interpolated so the pattern moves smoothly with sub-pixel shifts, then thresholded with a
    # steep ramp: interpolation alone is smooth between lattice points and a blur barely changes it,
    # whereas the thresholded speckles have ~1-pixel edges that a blur visibly removes.
    n = int(np.ceil(2 * extent / cell)) + 3
    grid = rng.random((n, n), dtype=np.float32)
    gx = np.clip((x + extent) / cell, 0.0, n - 1.001)
    gy = np.clip((y + extent) / cell, 0.0, n - 1.001)
    ix, iy = gx.astype(np.int32), gy.astype(np.int32)
    fx, fy = gx - ix, gy - iy
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    value = top * (1 - fy) + bottom * fy
    return np.clip((value - 0.5) * np.float32(2.5 * cell) + 0.5, 0.0, 1.0)


def _texture(rng: np.random.Generator, texture: str, scale: str, u: np.ndarray, v: np.ndarray,
             extent: float) -> np.ndarray:
    """Pattern in [0, 1] at texture coordinates ``(u, v)``; random angle, phase and period."""
    lo, hi = TEXTURE_PERIOD[texture][scale]
    period = float(rng.uniform(lo, hi))
    angle = float(rng.uniform(0.0, np.pi))
    phase = rng.uniform(0.0, period, size=2)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    ru = c * u + s * v + np.float32(phase[0])
    rv = -s * u + c * v + np.float32(phase[1])
    if texture == "stripes":
        return _square_wave(ru, period)
    if texture == "checks":
        a, b = _square_wave(ru, period), _square_wave(rv, period)
        return a * b + (1 - a) * (1 - b)
    if texture == "dots":
        du = ru - period * np.floor(ru / period) - 0.5 * period
        dv = rv - period * np.floor(rv / period) - 0.5 * period
        return _coverage(np.sqrt(du * du + dv * dv) - 0.3 * period)
    if texture == "noise":
        # No rotation: an axis-aligned lattice is as random-looking and cheaper to index.
        return _bilinear_noise(rng, u, v, period, extent)
    raise ValueError(f"unknown texture {texture!r}")


def _trajectory(rng: np.random.Generator, attributes: Mapping[str, str], config: ClipSpec,
                radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Object centre ``(x[T], y[T])`` in pixels: linear motion, path kept inside the frame."""
    short = min(config.height, config.width)
    step = float(rng.uniform(*SPEED_TRAVEL[attributes["speed"]])) * short / _REFERENCE_STEPS
    dx, dy = DIRECTION_VECTORS[attributes["direction"]]
    total = step * max(config.num_frames - 1, 0)
    centre = []
    for d, size in ((dx, config.width), (dy, config.height)):
        # Choose the path's midpoint so both ends keep the whole object in frame where possible;
        # when the path is too long, centre it so the object leaves equally at both ends.
        half = 0.5 * abs(d) * total
        lo, hi = radius + half, size - radius - half
        centre.append(float(rng.uniform(lo, hi)) if lo < hi else 0.5 * size)
    t = np.arange(config.num_frames, dtype=np.float32) - 0.5 * (config.num_frames - 1)
    return (np.float32(centre[0]) + np.float32(dx * step) * t,
            np.float32(centre[1]) + np.float32(dy * step) * t)


def generate_clip(rng_or_seed: np.random.Generator | int, attributes: Mapping[str, str],
                  config: ClipSpec = ClipSpec(), return_mask: bool = False
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one clip: ``uint8 [T, H, W, 3]``; with ``return_mask`` also the object's coverage.

    The mask is ``float32 [T, H, W]`` in [0, 1] (anti-aliased coverage of the object), so
    evaluation can measure detail inside the object and tests can track its centroid.
    Nuisance parameters (size, position, texture angle/phase/period, background) come from the rng.
    """
    rng = (rng_or_seed if isinstance(rng_or_seed, np.random.Generator)
           else np.random.default_rng(rng_or_seed))
    for name, values in ATTRIBUTES.items():
        if attributes[name] not in values:
            raise ValueError(f"{name}={attributes[name]!r} not in {values}")
    t_, h, w = config.num_frames, config.height, config.width
    short = min(h, w)
    radius = float(rng.uniform(*config.object_size)) * short
    cx, cy = _trajectory(rng, attributes, config, radius)

    ys = np.arange(h, dtype=np.float32) + np.float32(0.5)
    xs = np.arange(w, dtype=np.float32) + np.float32(0.5)
    # Object coordinates [T, H, W]: the texture is attached to the object, so it moves with it.
    u = xs[None, None, :] - cx[:, None, None]
    v = ys[None, :, None] - cy[:, None, None]
    u, v = np.broadcast_arrays(u, v)
    mask = _coverage(_shape_sdf(attributes["shape"], u, v, radius)).astype(np.float32)
    pattern = _texture(rng, attributes["texture"], attributes["scale"], u, v, 1.6 * radius + 2)
    colour = np.asarray(COLOUR_RGB[attributes["colour"]], dtype=np.float32)
    shade = np.float32(config.object_dark) + np.float32(1 - config.object_dark) * pattern
    obj = shade[..., None] * colour

    # The background is static (a fixed camera), so all motion in the clip is the object's.
    if config.background_texture:
        others = [t for t in TEXTURES if t != attributes["texture"]]
        bg_texture = others[int(rng.integers(len(others)))]
        bg_scale = SCALES[int(rng.integers(len(SCALES)))]
        bx, by = np.meshgrid(xs - 0.5 * w, ys - 0.5 * h)
        bg_pattern = _texture(rng, bg_texture, bg_scale, bx, by, 0.5 * max(h, w) + 2)
        # A muted tint of another colour: mixed with grey so the object's saturated colour stands out.
        others_c = [c for c in COLOURS if c != attributes["colour"]]
        tint = np.asarray(COLOUR_RGB[others_c[int(rng.integers(len(others_c)))]], np.float32)
        base = np.float32(0.35) * (0.6 * np.float32(0.5) + 0.4 * tint)
        bg = base + np.float32(config.background_contrast) * (bg_pattern[..., None] - 0.5)
    else:
        bg = np.full((h, w, 3), 0.3, dtype=np.float32)

    m = mask[..., None]
    frames = m * obj + (1 - m) * bg[None]
    if config.noise_std > 0:
        frames = frames + rng.normal(0.0, config.noise_std, frames.shape).astype(np.float32)
    video = np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert video.shape == (t_, h, w, 3)
    return (video, mask) if return_mask else video


def generate_example(seed: int, index: int, config: ClipSpec = ClipSpec()) -> dict:
    """Clip ``index`` of the split with seed ``seed``: depends on ``(seed, index)`` only. ``mask`` is the
    object's coverage ``float32 [T, H, W]`` (see :func:`generate_clip`)."""
    rng = clip_rng(seed, index)
    attributes = sample_attributes(rng)
    variant = int(rng.integers(len(CAPTION_TEMPLATES)))
    video, mask = generate_clip(rng, attributes, config, return_mask=True)
    return {
        "video": video,
        "mask": mask,
        "caption": caption(attributes, variant),
        "attributes": dict(attributes),
        "labels": attribute_labels(attributes),
    }


def generate_split(seed: int, num_clips: int, config: ClipSpec = ClipSpec(), start: int = 0
                   ) -> Iterator[dict]:
    """Yield clips ``start .. start + num_clips - 1`` as dicts
    ``{video, mask, caption, attributes, labels}``; pass a :func:`split_seed` as ``seed``.

    ``start`` lets a builder shard a split across workers with identical results.
    """
    for index in range(start, start + num_clips):
        yield generate_example(seed, index, config)
