"""Localised degradations of a clip on a patch grid: the oracle of HALO's patch labels on the embedded benchmark.

HALO (arXiv 2502.06812) distils patch rewards from GPT-4o judgements of generated videos; no model judges
here. Instead a real Moving Textures clip is degraded inside a random subset of the patches of a grid, and
each patch's label says whether it was degraded (``1`` clean, ``0`` degraded). Everything in this module is
**ours**: the four degradations (the localised forms of :mod:`shelllcc.data.preferences`' global ones, plus
a texture swap), their strengths, the grid and how many patches are hit.

**The patch grid** is stated in latent units: a patch is ``patch = (pt, ph, pw)`` latent cells of a latent grid
``latent = (t, h, w)``, so the grid is ``(t / pt, h / ph, w / pw)``, ``P`` patches in row-major (t, h, w) order
(the order of :func:`shelllcc.rewards.patch_reward.latent_patch_masks` and of the patch reward model's output).
Patch ``(k, i, j)`` covers the pixels of its latent cells (:mod:`shelllcc.data.latent_grid`'s layout: with a
causal VAE the first latent frame is pixel frame 0, each later one ``r`` frames). On the embedded benchmark
(9 frames of 64 x 64, latents ``[3, 16, 16]``, the DiT's tokens ``(1, 4, 4)`` latent cells) the default patch
is ``(1, 8, 8)``: one latent frame of 2 x 2 tokens, 32 x 32 pixels, a grid ``3 x 2 x 2`` of 12 patches. Why
(ours): a patch about the size of the object (diameter 19-26 px) can hold all of it, so a degraded patch is
visibly so; a latent frame in time keeps patches on the VAE's frame groups; 12 patches with a few hit keep
both labels frequent.

Degradations (pixel space, float64, the region's pixels only; rounded back to uint8)::

    blur          separable Gaussian over H and W, sigma ~ U[1.0, 2.0] px            (lowers the detail)
    noise         + N(0, std^2), std ~ U[10, 25] / 255                                 (raises the detail)
    colour_shift  + a ~ +-U[30, 60] / 255 on one random channel                        (moves the mean colour)
    texture_swap  the pixels of a donor clip: the same clip re-rendered with another
                  texture (same nuisances; :func:`texture_donor`)                     (another pattern)

Outside the chosen patches the clip is bit-identical (the degraded values are written through a boolean mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shelllcc.data import moving_textures as mt

KINDS = ("blur", "noise", "colour_shift", "texture_swap")
DEFAULT_PATCH = (1, 8, 8)           # latent cells per patch (module doc: why)
BLUR_SIGMA = (1.0, 2.0)
NOISE_STD = (10.0, 25.0)            # 0-255 units
COLOUR_SHIFT = (30.0, 60.0)         # 0-255 units


def patch_grid(latent: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """``(t / pt, h / ph, w / pw)``; a patch that does not tile the latent grid is an error naming both."""
    latent, patch = tuple(int(x) for x in latent), tuple(int(x) for x in patch)
    if len(latent) != 3 or len(patch) != 3 or min(patch) < 1 or any(a % p for a, p in zip(latent, patch)):
        raise ValueError(f"patch {patch} (latent cells) must tile the latent grid {latent} (t, h, w)")
    return tuple(a // p for a, p in zip(latent, patch))


def _frames_of(k: int, r: int, causal: bool) -> range:
    if not causal:
        return range(r * k, r * (k + 1))
    return range(0, 1) if k == 0 else range(1 + r * (k - 1), 1 + r * k)


def pixel_patch_masks(video_shape: Sequence[int], latent: Sequence[int], patch: Sequence[int],
                      causal: bool = True) -> np.ndarray:
    """``bool [P, T, H, W]``: the pixels of each patch of the grid (module doc) of a clip ``[T, H, W(, 3)]``
    whose VAE gives latents ``latent = (t, h, w)`` (causal: ``T = 1 + r (t - 1)``, else ``T = r t``)."""
    T, H, W = (int(x) for x in tuple(video_shape)[:3])
    t, h, w = (int(x) for x in latent)
    gt, gh, gw = patch_grid(latent, patch)
    pt, ph, pw = (int(x) for x in patch)
    if H % h or W % w:
        raise ValueError(f"a {H} x {W} clip does not divide into a {h} x {w} latent grid")
    if causal and (t < 2 and T != 1 or t >= 2 and (T - 1) % (t - 1)):
        raise ValueError(f"{T} frames are not a causal layout 1 + r (t - 1) of {t} latent frames")
    if not causal and T % t:
        raise ValueError(f"{T} frames do not divide into {t} latent frames")
    r = (T - 1) // (t - 1) if causal and t > 1 else (1 if causal else T // t)
    sh, sw = H // h, W // w
    out = np.zeros((gt * gh * gw, T, H, W), bool)
    p = 0
    for k in range(gt):
        frames = [f for cell in range(k * pt, (k + 1) * pt) for f in _frames_of(cell, r, causal)]
        for i in range(gh):
            for j in range(gw):
                out[p, frames, i * ph * sh:(i + 1) * ph * sh, j * pw * sw:(j + 1) * pw * sw] = True
                p += 1
    return out


def _u8(x) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _inside(video, mask, degraded) -> np.ndarray:
    """``degraded`` where ``mask [T, H, W]``, the clip's own bytes elsewhere."""
    video = np.asarray(video)
    mask = np.asarray(mask, bool)
    if video.dtype != np.uint8 or video.ndim != 4 or mask.shape != video.shape[:3]:
        raise ValueError(f"a uint8 clip [T, H, W, 3] and a mask [T, H, W] on it, got {video.dtype} {video.shape} "
                         f"and {mask.shape}")
    return np.where(mask[..., None], _u8(degraded), video)


def blur_region(video, mask, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma in px, over H and W, edge-replicated) inside ``mask``; the blur reads the pixels
    around the region too, so its border blends into the clean neighbours as a real blur would."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.asarray(video, np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * p.take(range(i, i + n), axis=axis) for i, w in enumerate(k))
    return _inside(video, mask, x)


def noise_region(video, mask, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of ``std`` (0-255 units) inside ``mask``."""
    return _inside(video, mask, np.asarray(video, np.float64) + rng.normal(0.0, std, np.shape(video)))


def colour_shift_region(video, mask, channel: int, amount: float) -> np.ndarray:
    """``amount`` (0-255 units, signed) added to one channel inside ``mask``."""
    x = np.asarray(video, np.float64).copy()
    x[..., channel] += amount
    return _inside(video, mask, x)


def swap_region(video, mask, donor) -> np.ndarray:
    """The donor clip's pixels inside ``mask`` (a texture swap when the donor is :func:`texture_donor`)."""
    donor = np.asarray(donor)
    if donor.shape != np.shape(video):
        raise ValueError(f"the donor clip {donor.shape} must have the clip's shape {np.shape(video)}")
    return _inside(video, mask, donor.astype(np.float64))


def texture_donor(seed: int, index: int, spec: mt.ClipSpec) -> tuple[np.ndarray, str]:
    """Clip ``index`` of the split ``seed`` (:func:`moving_textures.generate_example`) re-rendered with another
    object texture (picked from the clip's own stream): ``(uint8 video, the texture)``. The attributes, path and
    size are the clip's; the texture's angle, phase and period are redrawn, and a ``noise`` texture on either
    side shifts the background's draws, so the donor's background may differ too: inside a patch that is part
    of the swap."""
    rng = mt.clip_rng(seed, index)
    attributes = mt.sample_attributes(rng)
    rng.integers(len(mt.CAPTION_TEMPLATES))                    # the caption variant, as generate_example draws it
    others = [t for t in mt.TEXTURES if t != attributes["texture"]]
    texture = others[int(np.random.default_rng([int(seed), int(index), 7]).integers(len(others)))]
    return mt.generate_clip(rng, {**attributes, "texture": texture}, spec), texture


def degrade_patch(kind: str, video, mask, rng: np.random.Generator, donor=None) -> np.ndarray:
    """One degradation (:data:`KINDS`) inside ``mask`` at a strength drawn from ``rng`` (module doc)."""
    if kind == "blur":
        return blur_region(video, mask, float(rng.uniform(*BLUR_SIGMA)))
    if kind == "noise":
        return noise_region(video, mask, float(rng.uniform(*NOISE_STD)), rng)
    if kind == "colour_shift":
        return colour_shift_region(video, mask, int(rng.integers(3)),
                                   float(rng.choice([-1.0, 1.0]) * rng.uniform(*COLOUR_SHIFT)))
    if kind == "texture_swap":
        if donor is None:
            raise ValueError("texture_swap needs a donor clip (texture_donor)")
        return swap_region(video, mask, donor)
    raise ValueError(f"unknown patch degradation {kind!r}; expected one of {KINDS}")


def degrade_patches(video, masks, rng: np.random.Generator, *, max_patches: int, kinds: Sequence[str] = KINDS,
                    donor=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Degrade ``n ~ U{1..max_patches}`` random patches of ``masks [P, T, H, W]`` (:func:`pixel_patch_masks`),
    each with a kind drawn from ``kinds`` (without ``texture_swap`` when no ``donor`` is given).

    Returns ``(uint8 video, labels int32 [P], kind per patch)``: label ``1`` clean, ``0`` degraded; the kind is
    ``''`` for a clean patch. The patches are disjoint, so each degradation sees the clean clip's pixels of its
    own patch (blur and swap read clean neighbours too; the order of the patches does not matter for them)."""
    masks = np.asarray(masks, bool)
    p = masks.shape[0]
    if not 1 <= max_patches <= p:
        raise ValueError(f"max_patches={max_patches} must be in 1..{p} (the patches of the grid)")
    kinds = [k for k in kinds if donor is not None or k != "texture_swap"]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown patch degradation {k!r}; expected one of {KINDS}")
    if not kinds:
        raise ValueError("no degradation kind left to draw (texture_swap alone needs a donor)")
    n = int(rng.integers(1, max_patches + 1))
    chosen = rng.choice(p, size=n, replace=False)
    labels = np.ones(p, np.int32)
    names = [""] * p
    clean = np.asarray(video)
    out = clean.copy()
    for q in sorted(int(c) for c in chosen):
        kind = kinds[int(rng.integers(len(kinds)))]
        out = np.where(masks[q][..., None], degrade_patch(kind, clean, masks[q], rng, donor), out)
        labels[q], names[q] = 0, kind
    return out.astype(np.uint8), labels, names


class PatchClips:
    """A random-access source of patch-labelled clips (``__len__``, ``__getitem__``): clip ``i`` is Moving Textures
    clip ``i`` of the split seed ``seed``; with probability ``clean_share`` it stays clean (every label 1), else
    :func:`degrade_patches` hits up to ``max_patches`` of its patches. Each record: ``video`` uint8, ``caption``,
    ``patch_labels`` int32 ``[P]``, ``kinds`` (the kind per patch, comma-joined, '' for clean ones), ``index``.
    Clip ``i`` depends on ``(seed, i)`` and the settings only (ours: the clean share, so that whole clips vary
    in quality too and the mean patch reward has something to agree with the video reward on)."""

    def __init__(self, spec: mt.ClipSpec, seed: int, num_clips: int, latent: Sequence[int],
                 patch: Sequence[int] = DEFAULT_PATCH, *, max_patches: int = 4, clean_share: float = 0.25,
                 kinds: Sequence[str] = KINDS, causal: bool = True):
        if not 0.0 <= clean_share < 1.0:
            raise ValueError(f"clean_share={clean_share} must be in [0, 1)")
        self.spec, self.seed, self.n = spec, int(seed), int(num_clips)
        self.kinds, self.max_patches, self.clean_share = tuple(kinds), int(max_patches), float(clean_share)
        self.masks = pixel_patch_masks((spec.num_frames, spec.height, spec.width), latent, patch, causal)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        ex = mt.generate_example(self.seed, i, self.spec)
        rng = np.random.default_rng([self.seed, i, 11])
        p = self.masks.shape[0]
        video, labels, names = ex["video"], np.ones(p, np.int32), [""] * p
        if rng.random() >= self.clean_share:
            donor = texture_donor(self.seed, i, self.spec)[0] if "texture_swap" in self.kinds else None
            video, labels, names = degrade_patches(video, self.masks, rng, max_patches=self.max_patches,
                                                   kinds=self.kinds, donor=donor)
        return {"video": video, "caption": ex["caption"], "patch_labels": labels, "kinds": ",".join(names),
                "index": np.int64(i)}

    def __getitems__(self, indices: Sequence[int]) -> list:
        return [self[i] for i in indices]


__all__ = ["BLUR_SIGMA", "COLOUR_SHIFT", "DEFAULT_PATCH", "KINDS", "NOISE_STD", "PatchClips", "blur_region",
           "colour_shift_region", "degrade_patch", "degrade_patches", "noise_region", "patch_grid", "pixel_patch_masks",
           "swap_region", "texture_donor"]
