"""Localised degradations (shelllcc.data.patch_degradations): the grid's pixels, each degradation doing what it
says inside its region and nothing outside, and the labelled clips."""

import numpy as np
import pytest

from shelllcc.data import moving_textures as mt
from shelllcc.data import patch_degradations as pd

SPEC = mt.ClipSpec(num_frames=9, height=64, width=64)
LATENT = (3, 16, 16)        # the embedded benchmark's VAE: causal, 4x in time and space


def _clip(i=0):
    return mt.generate_example(mt.split_seed(0, "train"), i, SPEC)["video"]


def _laplacian_energy(video, mask):
    y = np.asarray(video, np.float64).mean(-1)
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]
    return float(np.mean(lap[mask[:, 1:-1, 1:-1]] ** 2))


def test_pixel_masks_tile_the_clip_on_the_causal_layout():
    m = pd.pixel_patch_masks((9, 64, 64, 3), LATENT, pd.DEFAULT_PATCH)
    assert m.shape == (12, 9, 64, 64) and pd.patch_grid(LATENT, pd.DEFAULT_PATCH) == (3, 2, 2)
    np.testing.assert_array_equal(m.sum(0), 1)                       # a partition of the clip's pixels
    # patch (k, i, j) in row-major order: latent frame 0 is pixel frame 0, latent frame 1 frames 1..4
    assert np.flatnonzero(m[0].any((1, 2))).tolist() == [0] and m[0, 0, :32, :32].all() and not m[0, 0, 32:].any()
    assert np.flatnonzero(m[5].any((1, 2))).tolist() == [1, 2, 3, 4] and m[5, 1, :32, 32:].all()
    assert np.flatnonzero(m[11].any((1, 2))).tolist() == [5, 6, 7, 8] and m[11, 8, 32:, 32:].all()
    with pytest.raises(ValueError, match=r"patch \(1, 5, 5\) .* must tile the latent grid \(3, 16, 16\)"):
        pd.pixel_patch_masks((9, 64, 64), LATENT, (1, 5, 5))


@pytest.mark.parametrize("kind", pd.KINDS)
def test_each_degradation_acts_inside_its_patch_only(kind):
    video = _clip(1)
    masks = pd.pixel_patch_masks(video.shape, LATENT, pd.DEFAULT_PATCH)
    region = masks[5]
    donor, texture = pd.texture_donor(mt.split_seed(0, "train"), 1, SPEC)
    out = pd.degrade_patch(kind, video, region, np.random.default_rng(0), donor)
    assert out.dtype == np.uint8 and out.shape == video.shape
    np.testing.assert_array_equal(out[~region], video[~region])       # bit-identical outside
    assert np.any(out[region] != video[region])
    if kind == "blur":
        assert _laplacian_energy(out, region) < 0.6 * _laplacian_energy(video, region)
    elif kind == "noise":
        assert _laplacian_energy(out, region) > 1.5 * _laplacian_energy(video, region)
    elif kind == "colour_shift":
        shift = out[region].astype(float).mean(0) - video[region].astype(float).mean(0)
        assert np.max(np.abs(shift)) > 15 and np.sort(np.abs(shift))[1] == 0   # one channel moved
    else:
        np.testing.assert_array_equal(out[region], donor[region])
        assert texture != mt.generate_example(mt.split_seed(0, "train"), 1, SPEC)["attributes"]["texture"]


def test_colour_shift_moves_the_mean_colour_by_the_amount_where_nothing_clips():
    video = np.full((9, 64, 64, 3), 100, np.uint8)
    region = pd.pixel_patch_masks(video.shape, LATENT, pd.DEFAULT_PATCH)[3]
    out = pd.colour_shift_region(video, region, 2, -37.0)
    np.testing.assert_array_equal(out[region].astype(int).mean(0), [100, 100, 63])


def test_degrade_patches_labels_exactly_the_changed_patches():
    video = _clip(2)
    masks = pd.pixel_patch_masks(video.shape, LATENT, pd.DEFAULT_PATCH)
    donor = pd.texture_donor(mt.split_seed(0, "train"), 2, SPEC)[0]
    for seed in range(6):
        out, labels, kinds = pd.degrade_patches(video, masks, np.random.default_rng(seed), max_patches=4, donor=donor)
        assert labels.dtype == np.int32 and labels.shape == (12,) and 1 <= (labels == 0).sum() <= 4
        assert [bool(k) for k in kinds] == (labels == 0).tolist() and set(kinds) <= set(pd.KINDS) | {""}
        changed = (out != video).any(-1)
        assert not changed[masks[labels == 1].any(0)].any()
        for q in np.flatnonzero(labels == 0):
            assert changed[masks[q]].any()
    with pytest.raises(ValueError, match="max_patches=13 must be in 1..12"):
        pd.degrade_patches(video, masks, np.random.default_rng(0), max_patches=13)


def test_patch_clips_are_deterministic_and_mix_clean_and_degraded():
    src = pd.PatchClips(SPEC, 5, 16, LATENT, max_patches=3, clean_share=0.25)
    again = pd.PatchClips(SPEC, 5, 16, LATENT, max_patches=3, clean_share=0.25)
    recs = src.__getitems__(range(16))
    np.testing.assert_array_equal(recs[7]["video"], again[7]["video"])
    clean = [r for r in recs if r["patch_labels"].all()]
    assert 0 < len(clean) < 16
    for r in clean:
        np.testing.assert_array_equal(r["video"], mt.generate_example(5, int(r["index"]), SPEC)["video"])
        assert r["kinds"] == ",,,,,,,,,,,"
    r = next(r for r in recs if not r["patch_labels"].all())
    assert [bool(k) for k in r["kinds"].split(",")] == (r["patch_labels"] == 0).tolist()
