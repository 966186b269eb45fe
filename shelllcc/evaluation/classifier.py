"""A small video attribute classifier for the Moving Textures benchmark, trained on real clips.

It scores whether generated clips follow their prompt (per-attribute accuracy against the caption's
labels) and supplies the feature space of a Fréchet video distance (:mod:`shelllcc.evaluation.frechet`).

Architecture (:class:`VideoClassifier`), built so that each attribute is recognisable with ~20 s of
training on a 2-core CPU. ``K`` evenly spaced frames (default 2: first and last) are used:

* **Where** (:func:`locate_object`): the object centre per frame is the centroid of the pixels
  brighter than the muted background can be. Direction and speed are read from these centres (the
  motion is linear, so first and last frame suffice) by a small ReLU layer.
* **Shape and colour**: a ``S x S`` window (default 40 px, :func:`crop_around`) centred on the object
  goes through a 4-layer CNN at full resolution (4x4 stride-2 stem, so the filters see single
  pixels), with the object's :func:`silhouette` as a fourth input channel. Its last map is
  flattened, not pooled: the object is centred, so the layout is its shape.
* **Texture and scale** (:func:`spectral_texture`): rotation-invariant angular harmonics of the crop's
  power spectrum, per frequency ring. They separate stripes / checks / dots / noise whatever the
  random texture angle, and their radial profile gives the period, so fine vs coarse and any blur
  (which removes the high rings) are visible.
* The three parts are concatenated and mixed by one ReLU layer: that is :meth:`VideoClassifier.features`
  ``[B, F]``, the FVD feature space; one linear head per attribute follows.

Training minimises ``sum_a mean_i CE(logits_a(x_i), y_a,i)`` (cross-entropy summed over attributes)
with AdamW and a warmup-cosine learning rate, on mirrored / time-reversed copies with the labels
fixed up. Functions: :func:`train_classifier`, :func:`predict`, :func:`accuracy`, :func:`features`,
:func:`save_classifier` / :func:`load_classifier`.

Limits, by design of a cheap benchmark-specific scorer: the object is found by brightness (a clip
whose object is dim everywhere falls back to the frame centre, and its crop then shows background),
only a ``S x S`` window around the object is looked at (background far from it does not enter the
features), and motion is taken as the first-to-last displacement (a non-linear path is not seen).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from shelllcc.data.moving_textures import ATTRIBUTES, DIRECTION_VECTORS, DIRECTIONS
from shelllcc.models import saving

# Brightest channel above which a pixel belongs to the object: every object colour has a channel
# >= 0.92 on its texture's bright phase, the muted background stays below ~0.31 in every channel.
BRIGHT = 0.45
LEGACY_CONFIG_JSON = "classifier.json"     # the former format's file: refused with a clear message


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training settings.

    ``clip_shape`` ``(T, H, W)`` is the geometry the classifier is trained for (texture periods are in
    pixels and speed is displacement over the clip, so other geometries would be misread); ``None``
    means "take it from the training videos".
    """

    # Architecture.
    num_frames_used: int = 2          # K frames, evenly spaced from the first to the last
    crop: int = 40                    # side of the object-centred window, pixels (multiple of 8)
    width: int = 16                   # channels of the CNN stem; 2x and 4x deeper down
    hidden: int = 128                 # F, the feature dimension (and the crop embedding's)
    motion_hidden: int = 32           # width of the layer reading the object's trajectory
    texture_hidden: int = 64          # width of the layer reading the spectral texture descriptor
    harmonics: int = 4                # angular harmonics m = 0..M-1 of the crop's power spectrum
    # Training.
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    log_every: int = 100
    augment: bool = True              # random mirror / time reversal with the labels fixed up
    # Data.
    clip_shape: tuple[int, int, int] | None = None
    attributes: tuple[str, ...] = tuple(ATTRIBUTES)

    def num_classes(self) -> dict[str, int]:
        return {a: len(ATTRIBUTES[a]) for a in self.attributes}


def frame_indices(num_frames: int, k: int) -> tuple[int, ...]:
    """``k`` frame indices evenly spaced over ``[0, num_frames - 1]`` (first and last included)."""
    if k < 2 or num_frames < k:
        raise ValueError(f"need 2 <= num_frames_used ({k}) <= clip frames ({num_frames})")
    return tuple(int(i) for i in np.round(np.linspace(0, num_frames - 1, k)))


def to_float_video(videos) -> jnp.ndarray:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is taken as already in [0, 1]."""
    v = jnp.asarray(videos)
    if v.dtype == jnp.uint8:
        return v.astype(jnp.float32) / 255.0
    return v.astype(jnp.float32)


def _check_videos(videos, config: ClassifierConfig) -> None:
    shape = tuple(np.shape(videos))
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"videos must be [B, T, H, W, 3], got shape {shape}")
    if config.clip_shape is not None and shape[1:4] != tuple(config.clip_shape):
        raise ValueError(f"videos have shape {shape}, but the classifier is for clips of "
                         f"[T, H, W] = {list(config.clip_shape)}")


@functools.lru_cache(maxsize=8)
def _ring_harmonic_basis(size: int, harmonics: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of shape ``[size^2, R * M]`` (``R = size // 2`` rings, ``M = harmonics``):
    entry ``(k, (r, m))`` is ``g_r(|k|) cos(2 m theta_k)`` (resp. sin), with ``g_r`` a unit-width
    triangular ring weight around radius ``r = 1..R`` (frequency in cycles per ``size`` pixels)."""
    f = np.fft.fftfreq(size) * size
    ky, kx = np.meshgrid(f, f, indexing="ij")
    radius, theta = np.hypot(kx, ky).ravel(), np.arctan2(ky, kx).ravel()
    rings = np.arange(1, size // 2 + 1)
    g = np.maximum(1.0 - np.abs(radius[:, None] - rings[None, :]), 0.0)          # [K, R]
    m = np.arange(harmonics)
    cos = g[:, :, None] * np.cos(2 * m[None, None, :] * theta[:, None, None])   # [K, R, M]
    sin = g[:, :, None] * np.sin(2 * m[None, None, :] * theta[:, None, None])
    return (cos.reshape(size * size, -1).astype(np.float32), sin.reshape(size * size, -1).astype(np.float32))


def spectral_texture(crops: jnp.ndarray, harmonics: int = 4) -> jnp.ndarray:
    """Rotation-invariant texture descriptor ``[N, R, M]`` of square crops ``[N, S, S, 3]`` in [0, 1].

    With ``v = max_rgb(crop)`` (colour-free brightness), ``P = |FFT2((v - mean v) * hann)|^2`` and, per
    ring ``r`` of the spectrum, the angular harmonics ``C_m(r) = sum_k g_r(|k|) P(k) exp(2 i m theta_k)``:

    * ``[..., 0] = log(C_0(r) + 1e-6)``: the radial power spectrum (texture scale; drops under blur);
    * ``[..., m] = |C_m(r)| / C_0(r)`` for ``m >= 1``: anisotropy. Rotating the pattern by ``a``
      multiplies ``C_m`` by ``exp(2 i m a)``, so the magnitudes ignore the texture's random angle.
      Stripes put one peak per half-plane (large ``m = 1``); checks and dots two orthogonal ones
      (``m = 1`` cancels, ``m = 2`` large); noise is nearly isotropic (all small).

    Convolutional filters struggle to tell stripes from checks at a random angle with ~1000 clips
    (it needs an AND over many orientation channels), whereas here it is a fixed, exact invariant.
    """
    n, size = crops.shape[0], crops.shape[1]
    v = jnp.max(crops, axis=-1)
    v = v - jnp.mean(v, axis=(1, 2), keepdims=True)
    hann = np.hanning(size + 2)[1:-1].astype(np.float32)
    power = jnp.abs(jnp.fft.fft2(v * (hann[:, None] * hann[None, :]))) ** 2
    cos, sin = _ring_harmonic_basis(size, harmonics)
    flat = power.reshape(n, size * size)
    re = (flat @ cos).reshape(n, size // 2, harmonics)
    im = (flat @ sin).reshape(n, size // 2, harmonics)
    c0 = re[..., :1]
    ratio = jnp.sqrt(re[..., 1:] ** 2 + im[..., 1:] ** 2) / (c0 + 1e-6)
    return jnp.concatenate([jnp.log(c0 + 1e-6), ratio], axis=-1)


def _window(x: jnp.ndarray, size: int, op) -> jnp.ndarray:
    # Max / min over a size x size square, as two 1-D passes (separable, 2 size instead of size^2).
    init = -jnp.inf if op is jax.lax.max else jnp.inf
    x = jax.lax.reduce_window(x, init, op, (1, size, 1), (1, 1, 1), "SAME")
    return jax.lax.reduce_window(x, init, op, (1, 1, size), (1, 1, 1), "SAME")


def silhouette(crops: jnp.ndarray, threshold: float = BRIGHT, close: int = 7) -> jnp.ndarray:
    """Solid object mask ``[N, S, S]`` in [0, 1]: the bright-pixel map
    ``clip(5 (max_rgb - threshold), 0, 1)`` closed morphologically (``close x close`` max filter,
    then min filter), which fills the texture's dark phase between bright stripes / dots without
    growing the outline, so the shape no longer depends on the texture."""
    bright = jnp.clip(5.0 * (jnp.max(crops, axis=-1) - threshold), 0.0, 1.0)
    return _window(_window(bright, close, jax.lax.max), close, jax.lax.min)


def locate_object(frames: jnp.ndarray, threshold: float = BRIGHT) -> jnp.ndarray:
    """Object centre ``[N, 2]`` (x, y in pixels) of frames ``[N, H, W, 3]`` in [0, 1].

    ``c = (sum_p w_p p + eps c_0) / (sum_p w_p + eps)`` with ``w_p = max(max_rgb(p) - threshold, 0)``
    and ``c_0`` the frame centre (the fallback when no pixel is bright). In Moving Textures every
    object colour has a channel >= 0.92 and its texture's bright phase covers >= ~28% of it, while the
    muted background stays below ~0.31 in every channel, so the weights fall on the object only.
    """
    h, w = frames.shape[1:3]
    weight = jnp.maximum(jnp.max(frames, axis=-1) - threshold, 0.0)
    ys = jnp.arange(h, dtype=jnp.float32) + 0.5
    xs = jnp.arange(w, dtype=jnp.float32) + 0.5
    eps = 1e-2
    total = jnp.sum(weight, axis=(1, 2)) + eps
    cx = (jnp.sum(weight * xs[None, None, :], axis=(1, 2)) + eps * 0.5 * w) / total
    cy = (jnp.sum(weight * ys[None, :, None], axis=(1, 2)) + eps * 0.5 * h) / total
    return jax.lax.stop_gradient(jnp.stack([cx, cy], axis=-1))


def crop_around(frames: jnp.ndarray, centre: jnp.ndarray, size: int) -> jnp.ndarray:
    """``size x size`` windows ``[N, size, size, C]`` centred on ``centre [N, 2]`` (x, y), zero-padded
    where they leave the frame (so the object stays centred even at the border)."""
    half = size // 2
    padded = jnp.pad(frames, ((0, 0), (half, half), (half, half), (0, 0)))
    # The window [round(c) - half, round(c) + half) in frame pixels starts at round(c) once padded.
    start = jnp.clip(jnp.round(centre).astype(jnp.int32), 0, jnp.asarray(padded.shape[2:0:-1]) - size)

    def one(img, s):
        return jax.lax.dynamic_slice(img, (s[1], s[0], 0), (size, size, img.shape[-1]))

    return jax.vmap(one)(padded, start)


class VideoClassifier(nnx.Module):
    """Per-attribute logits and features of videos ``[B, T, H, W, 3]`` in [0, 1]."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        if config.clip_shape is None:
            raise ValueError("ClassifierConfig.clip_shape must be set to build a VideoClassifier")
        if config.crop % 8:
            raise ValueError(f"crop must be a multiple of 8 (three stride-2 stages), got {config.crop}")
        if config.harmonics < 2:
            raise ValueError(f"harmonics must be >= 2 (m = 0 plus anisotropy), got {config.harmonics}")
        self.config = config
        self.frames = frame_indices(config.clip_shape[0], config.num_frames_used)
        w, k = config.width, config.num_frames_used
        self.stem = nnx.Conv(4, w, (4, 4), strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(w, 2 * w, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv3 = nnx.Conv(2 * w, 2 * w, (3, 3), padding="SAME", rngs=rngs)
        self.conv4 = nnx.Conv(2 * w, 4 * w, (3, 3), strides=2, padding="SAME", rngs=rngs)
        cells = (config.crop // 8) ** 2
        self.embed = nnx.Linear(cells * 4 * w + 2 * (2 * w + 4 * w), config.hidden, rngs=rngs)
        self.motion = nnx.Linear(2 * k + 4, config.motion_hidden, rngs=rngs)
        self.texture = nnx.Linear((config.crop // 2) * config.harmonics, config.texture_hidden, rngs=rngs)
        self.mlp = nnx.Linear(2 * config.hidden + config.motion_hidden + config.texture_hidden, config.hidden,
                              rngs=rngs)
        self.heads = nnx.Dict({a: nnx.Linear(config.hidden, n, rngs=rngs)
                               for a, n in config.num_classes().items()})

    def _embed(self, crops: jnp.ndarray) -> jnp.ndarray:
        """``[N, S, S, 3]`` object-centred crops -> ``[N, hidden]`` (shape and colour). The CNN sees
        RGB plus the :func:`silhouette`, which makes the outline independent of the texture."""
        x = jnp.concatenate([crops, silhouette(crops)[..., None]], axis=-1) * 2.0 - 1.0
        x = nnx.relu(self.stem(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.conv3(x)) + x
        y = nnx.relu(self.conv4(x))
        # The flattened map keeps the layout (the object is centred, so that is its shape); the
        # spatial mean and max of both scales add translation-invariant summaries.
        z = jnp.concatenate([y.reshape(y.shape[0], -1), jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2)),
                             jnp.mean(y, axis=(1, 2)), jnp.max(y, axis=(1, 2))], axis=-1)
        return nnx.relu(self.embed(z))

    def features_from_frames(self, frames: jnp.ndarray) -> jnp.ndarray:
        """Features ``[B, F]`` of the already-selected frames ``[B, K, H, W, 3]`` in [0, 1].

        Appearance: mean and max over frames of the crop embeddings, and the frame-averaged spectral
        descriptor. Motion: the object centres relative to the frame centre and the last-minus-first
        displacement, in units of 1/32 of the frame's short side (2 px at 64), so slow and fast clips
        travel ~5-7 and ~12-15 units: large enough inputs for the direction classes to separate fast.
        """
        b, k, h, w = frames.shape[:4]
        flat = frames.reshape((b * k,) + frames.shape[2:])
        centre = locate_object(flat)
        crops = crop_around(flat, centre, self.config.crop)
        e = self._embed(crops).reshape(b, k, -1)
        spec = spectral_texture(crops, self.config.harmonics).reshape(b, k, -1).mean(axis=1)
        # On real clips (40 px crops) the log-power spans ~[3, 10]; bring it to O(1) like the ratios.
        spec = spec.reshape(b, -1, self.config.harmonics)
        spec = jnp.concatenate([(spec[..., :1] - 6.5) / 2.0, spec[..., 1:]], axis=-1).reshape(b, -1)
        t = nnx.relu(self.texture(spec))
        unit = min(h, w) / 32.0
        pos = ((centre - 0.5 * jnp.asarray([w, h], jnp.float32)) / unit).reshape(b, k, 2)
        shift = pos[:, -1] - pos[:, 0]
        # The heading as a unit vector, apart from the distance: direction then needs no
        # speed-dependent boundaries, and its scale makes the 45-degree classes far apart early on.
        heading = 4.0 * shift / jnp.sqrt(jnp.sum(shift ** 2, axis=-1, keepdims=True) + 1.0)
        m = nnx.relu(self.motion(jnp.concatenate([pos.reshape(b, -1), shift, heading], axis=-1)))
        z = jnp.concatenate([jnp.mean(e, axis=1), jnp.max(e, axis=1), m, t], axis=-1)
        return nnx.relu(self.mlp(z))

    def logits_from_frames(self, frames: jnp.ndarray) -> dict[str, jnp.ndarray]:
        f = self.features_from_frames(frames)
        return {a: head(f) for a, head in self.heads.items()}

    def select_frames(self, video):
        """The ``K`` used frames ``[B, K, H, W, 3]`` of ``[B, T, H, W, 3]`` (numpy stays numpy)."""
        return video[:, jnp.asarray(self.frames)] if isinstance(video, jnp.ndarray) else \
            np.asarray(video)[:, list(self.frames)]

    def features(self, video) -> jnp.ndarray:
        """``[B, T, H, W, 3]`` (uint8 or float in [0, 1]) -> penultimate features ``[B, F]``."""
        _check_videos(video, self.config)
        return self.features_from_frames(to_float_video(self.select_frames(video)))

    def __call__(self, video) -> dict[str, jnp.ndarray]:
        """``[B, T, H, W, 3]`` (uint8 or float in [0, 1]) -> ``{attribute: logits [B, n_classes]}``."""
        _check_videos(video, self.config)
        return self.logits_from_frames(to_float_video(self.select_frames(video)))


# ---------------------------------------------------------------------------------------------
# Training and inference. Everything is jitted on (graphdef, state) so that repeated calls reuse one
# compilation; frames are selected in numpy first so only K of T frames ever reach the device.


def _check_labels(labels: Mapping[str, Any], n: int, attributes) -> dict[str, np.ndarray]:
    missing = [a for a in attributes if a not in labels]
    if missing:
        raise ValueError(f"labels lack attributes {missing}; expected {list(attributes)}")
    out = {}
    for a in attributes:
        y = np.asarray(labels[a])
        if y.shape != (n,):
            raise ValueError(f"labels[{a!r}] has shape {y.shape}, expected ({n},) to match the videos")
        if y.min(initial=0) < 0 or y.max(initial=0) >= len(ATTRIBUTES[a]):
            raise ValueError(f"labels[{a!r}] out of range [0, {len(ATTRIBUTES[a])})")
        out[a] = y.astype(np.int32)
    return out


def _direction_map(fn) -> np.ndarray:
    """Index map of directions under ``(dx, dy) -> fn(dx, dy)``."""
    names = DIRECTIONS
    vec = {n: np.asarray(DIRECTION_VECTORS[n]) for n in names}
    out = []
    for n in names:
        target = np.asarray(fn(*vec[n]))
        out.append(next(i for i, m in enumerate(names) if np.allclose(vec[m], target)))
    return np.asarray(out, np.int32)


# Label-exact augmentations: a mirror image (x -> -x) is a valid clip with the direction mirrored,
# because every shape is symmetric about its vertical axis (the triangle points up, so no vertical
# flip) and texture angles are uniform; playing a clip backwards is a valid clip with the opposite
# direction and the same speed.
_MIRROR = _direction_map(lambda dx, dy: (-dx, dy))
_REVERSE = _direction_map(lambda dx, dy: (-dx, -dy))


def _augment(frames: np.ndarray, labels: dict[str, np.ndarray], rng: np.random.Generator):
    """Randomly mirror and/or time-reverse each clip of ``frames [B, K, H, W, 3]``, fixing labels."""
    frames, labels = frames.copy(), dict(labels)
    mirror = rng.random(len(frames)) < 0.5
    reverse = rng.random(len(frames)) < 0.5
    frames[mirror] = frames[mirror][:, :, :, ::-1]
    frames[reverse] = frames[reverse][:, ::-1]
    if "direction" in labels:
        d = labels["direction"].copy()
        d[mirror] = _MIRROR[d[mirror]]
        d[reverse] = _REVERSE[d[reverse]]
        labels["direction"] = d
    return frames, labels


def _loss(model: VideoClassifier, frames_u8, labels):
    logits = model.logits_from_frames(to_float_video(frames_u8))
    per = {a: optax.softmax_cross_entropy_with_integer_labels(logits[a], labels[a]).mean() for a in logits}
    return sum(per.values()), per


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, tx, state, opt_state, frames_u8, labels):
    def loss_fn(s):
        return _loss(nnx.merge(graphdef, s), frames_u8, labels)

    (loss, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss, per


def _fresh_model(config: ClassifierConfig, seed: int) -> VideoClassifier:
    """A randomly initialised model, drawn with numpy: eager jax initialisers compile one small
    program per parameter shape, which costs seconds on a small CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoClassifier(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            # He-normal over the fan-in (all but the output axis), as suits ReLU layers.
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32))
        if path[-1].key == "scale":  # normalisation gains
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def train_classifier(videos, labels: Mapping[str, Any], *, config: ClassifierConfig = ClassifierConfig(),
                     seed: int = 0, log: Callable[[str], None] | None = print
                     ) -> tuple[VideoClassifier, dict[str, list]]:
    """Train a :class:`VideoClassifier` on ``videos`` uint8 ``[N, T, H, W, 3]`` with integer
    ``labels[attribute]`` ``[N]`` (class index in ``ATTRIBUTES[attribute]``).

    Minimises ``sum_a mean_i CE(logits_a(x_i), y_a,i)`` over random minibatches (with replacement
    across epochs, without within one) for ``config.steps`` AdamW steps. Returns the model and the
    history ``{"step", "loss", "seconds"}`` logged every ``config.log_every`` steps (and at the end).
    """
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be [N, T, H, W, 3], got shape {videos.shape}")
    if videos.dtype != np.uint8:
        raise ValueError(f"train_classifier expects uint8 videos, got {videos.dtype}")
    n = videos.shape[0]
    if config.clip_shape is None:
        config = dataclasses.replace(config, clip_shape=tuple(int(s) for s in videos.shape[1:4]))
    _check_videos(videos, config)
    ys = _check_labels(labels, n, config.attributes)
    if n < config.batch_size:
        raise ValueError(f"{n} videos is fewer than one batch of {config.batch_size}")

    model = _fresh_model(config, seed)
    frames = model.select_frames(videos)  # [N, K, H, W, 3] uint8
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                  max(config.steps, config.warmup_steps + 1))
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    graphdef, state = nnx.split(model)
    opt_state = tx.init(state)
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    history: dict[str, list] = {"step": [], "loss": [], "seconds": []}
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        if pos + config.batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos:pos + config.batch_size])
        pos += config.batch_size
        batch, batch_labels = frames[idx], {a: y[idx] for a, y in ys.items()}
        if config.augment:
            batch, batch_labels = _augment(batch, batch_labels, rng)
        state, opt_state, loss, per = _train_step(graphdef, tx, state, opt_state, batch, batch_labels)
        if step % config.log_every == 0 or step == config.steps:
            seconds = time.perf_counter() - start
            history["step"].append(step)
            history["loss"].append(float(loss))
            history["seconds"].append(seconds)
            if log is not None:
                parts = " ".join(f"{a}={float(v):.3f}" for a, v in per.items())
                log(f"classifier step {step}/{config.steps} loss={float(loss):.4f} ({parts}) {seconds:.1f}s")
    return nnx.merge(graphdef, state), history


@functools.partial(jax.jit, static_argnums=(0, 3))
def _infer(graphdef, state, frames, what: str):
    model = nnx.merge(graphdef, state)
    x = to_float_video(frames)
    if what == "features":
        return model.features_from_frames(x)
    return {a: jnp.argmax(l, axis=-1) for a, l in model.logits_from_frames(x).items()}


def _batched(model: VideoClassifier, videos, batch_size: int, what: str):
    _check_videos(videos, model.config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    frames = model.select_frames(videos)
    if frames.dtype != np.uint8 and frames.size and (frames.min() < -0.01 or frames.max() > 1.01):
        # A [-1, 1] or [0, 255] float video would be silently misread (brightness drives the crop).
        raise ValueError(f"float videos must be in [0, 1], got values in [{frames.min():.3g}, {frames.max():.3g}]")
    n = frames.shape[0]
    outs = []
    for s in range(0, n, batch_size):
        chunk = frames[s:s + batch_size]
        m = chunk.shape[0]
        if m < batch_size and n > batch_size:
            # Pad the tail to the batch shape so every chunk reuses one compilation.
            pad = np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outs.append(jax.tree.map(lambda a, m=m: np.asarray(a)[:m], _infer(graphdef, state, chunk, what)))
    if not outs:
        raise ValueError("no videos given")
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


def predict(model: VideoClassifier, videos, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Predicted class index per attribute, ``{attribute: int32 [N]}``; videos uint8 or float [0, 1]."""
    return _batched(model, videos, batch_size, "predict")


def features(model: VideoClassifier, videos, batch_size: int = 64) -> np.ndarray:
    """Penultimate features ``float32 [N, F]`` of ``videos`` (cast to float64 for Fréchet statistics)."""
    return _batched(model, videos, batch_size, "features")


def accuracy(pred: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, float]:
    """``{attribute: mean(pred == label)}`` over the attributes of ``pred``, plus ``"mean"`` of those."""
    out = {}
    for a, p in pred.items():
        if a not in labels:
            raise ValueError(f"labels lack attribute {a!r}")
        p, y = np.asarray(p), np.asarray(labels[a])
        if p.shape != y.shape:
            raise ValueError(f"{a}: predictions {p.shape} and labels {y.shape} differ in shape")
        out[a] = float(np.mean(p == y))
    out["mean"] = float(np.mean(list(out.values())))
    return out


# ---------------------------------------------------------------------------------------------
# Saving: the project's one model format (shelllcc.models.saving: model.json + orbax params).

KIND = "video_classifier"
saving.register_kind(KIND, VideoClassifier, ClassifierConfig)


def save_classifier(path: str, model: VideoClassifier, config: ClassifierConfig | None = None) -> str:
    """Write ``model`` (and its config, which ``config`` may restate) under directory ``path``;
    returns the absolute path."""
    if config is not None and config != model.config:
        raise ValueError(f"config {config} differs from the model's own {model.config}")
    return saving.save_model(path, model)


def load_classifier(path: str) -> VideoClassifier:
    """Rebuild a classifier written by :func:`save_classifier`."""
    if os.path.exists(os.path.join(os.path.abspath(path), LEGACY_CONFIG_JSON)):
        raise ValueError(f"{path!r} holds a classifier in the former format ({LEGACY_CONFIG_JSON} + msgpack); "
                         "train it again (delete the directory, or the workdir's stages/classifier.DONE)")
    try:
        kind = saving.read_model_json(path)["kind"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no saved classifier at {path!r} (missing {saving.MODEL_JSON})") from None
    if kind != KIND:
        raise ValueError(f"{path!r} holds a {kind!r} model, not a {KIND}")
    return saving.load_model(path)


__all__ = ["ClassifierConfig", "VideoClassifier", "train_classifier", "predict", "features", "accuracy",
           "save_classifier", "load_classifier", "to_float_video", "frame_indices"]
