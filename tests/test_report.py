"""Tests of shelllcc.evaluation.report: montage geometry and pixels, comparison videos, plots, markdown."""

import json

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from shelllcc.evaluation import report as R


def _videos(seed, n=2, t=5, h=16, w=20):
    return np.random.default_rng(seed).integers(0, 256, (n, t, h, w, 3), dtype=np.uint8)


def _png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


# matplotlib's tab10 colours the report gives sets without a fixed colour, and the fixed "base" grey;
# figures are saved at 110 dpi from figsize (width, height) in inches
BROWN, PINK, GREY = (140, 86, 75), (227, 119, 194), (127, 127, 127)
DPI = 110


def _count(img, rgb, tol=24):
    """Pixels within ``tol`` (per channel) of colour ``rgb``."""
    return int((np.abs(img.astype(np.int32) - np.asarray(rgb)).max(-1) <= tol).sum())


def test_montage_pixels_follow_layout(tmp_path):
    rows = {"base": _videos(0), "shell": _videos(1), "lcc": _videos(2)}
    crop, zoom = (3, 5, 6), 3
    path = R.montage_png(str(tmp_path / "m.png"), rows, frame_index=-1, crop=crop, zoom=zoom, title="t")
    img = _png(path)
    lay = R.montage_layout(rows, zoom=zoom, crop_size=crop[2], title="t")
    assert img.shape[:2] == lay.size
    cy, cx, cs = crop
    for j, vids in enumerate(rows.values()):
        for i in range(2):
            t, l, b, r = lay.crop_box(i, j)
            want = vids[i, -1, cy:cy + cs, cx:cx + cs].repeat(zoom, 0).repeat(zoom, 1)
            np.testing.assert_array_equal(img[t:b, l:r], want)
            # the frame panel outside the red crop outline is the 2x pixel-repeated frame
            t, l, b, r = lay.frame_box(i, j)
            np.testing.assert_array_equal(img[t:t + 2 * cy, l:r], vids[i, -1, :cy].repeat(2, 0).repeat(2, 1))


def test_montage_size_grows_with_variants_and_prompts(tmp_path):
    one = R.montage_png(str(tmp_path / "a.png"), {"base": _videos(0)}, frame_index=0)
    two = R.montage_png(str(tmp_path / "b.png"), {"base": _videos(0), "x": _videos(1)}, frame_index=0)
    tall = R.montage_png(str(tmp_path / "c.png"), {"base": _videos(0, n=3)}, frame_index=0)
    (h1, w1), (h2, w2), (h3, w3) = (_png(p).shape[:2] for p in (one, two, tall))
    lay = R.montage_layout({"base": _videos(0)})
    assert (h2, w2 - w1) == (h1, lay.cell_w + lay.pad)
    assert (w3, h3 - h1) == (w1, lay.cell_h + lay.pad)


def test_auto_crop_finds_texture_and_is_shared_across_variants(tmp_path):
    frame = np.full((32, 32, 3), 128, np.uint8)
    frame[18:26, 4:12] = np.random.default_rng(0).integers(0, 256, (8, 8, 3))
    y, x, s = R.auto_crop(frame, 8)
    assert (y, x, s) == (18, 4, 8)
    assert R.auto_crop(np.zeros((32, 32, 3)), 8) == (12, 12, 8)  # no detail: centre
    base = np.broadcast_to(frame, (1, 3, 32, 32, 3))
    other = _videos(5, n=1, t=3, h=32, w=32)
    path = R.montage_png(str(tmp_path / "m.png"), {"base": base, "other": other}, frame_index=1, zoom=4)
    img = _png(path)
    size = R.default_crop_size(32, 32, 4)
    lay = R.montage_layout({"base": base, "other": other}, zoom=4)
    ay, ax, _ = R.auto_crop(frame, size)
    t, l, b, r = lay.crop_box(0, 1)
    np.testing.assert_array_equal(img[t:b, l:r], other[0, 1, ay:ay + size, ax:ax + size].repeat(4, 0).repeat(4, 1))


def test_montage_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="same prompts"):
        R.montage_png(str(tmp_path / "m.png"), {"a": _videos(0, n=2), "b": _videos(0, n=3)}, frame_index=0)
    with pytest.raises(ValueError, match="does not fit"):
        R.montage_png(str(tmp_path / "m.png"), {"a": _videos(0)}, frame_index=0, crop=(12, 0, 8))


def test_comparison_video_frames_and_size(tmp_path):
    rows = {"base": _videos(0, n=3, t=6), "shell": _videos(1, n=3, t=6)}
    rows["shell_f"] = rows["shell"].astype(np.float32) / 127.5 - 1.0  # float videos are accepted too
    mp4, gif = R.comparison_video(str(tmp_path / "cmp"), rows, fps=8, upscale=2, prompts=[0, 2], pad=4)
    assert (mp4, gif) == (str(tmp_path / "cmp.mp4"), str(tmp_path / "cmp.gif"))
    h = R.COMPARISON_HEADER + 2 * 16 * 2 + 4
    w = 3 * 20 * 2 + 2 * 4
    frames = R.comparison_frames(rows, upscale=2, prompts=[0, 2], pad=4)
    assert frames.shape == (6, h, w, 3)
    # tile (prompt 2, variant 1) holds the upscaled video
    y0, x0 = R.COMPARISON_HEADER + 16 * 2 + 4, 20 * 2 + 4
    np.testing.assert_array_equal(frames[:, y0:y0 + 32, x0:x0 + 40], rows["shell"][2].repeat(2, 1).repeat(2, 2))
    video = np.stack(iio2.mimread(mp4, format="FFMPEG"))
    assert video.shape == (6, h, w, 3)
    anim = iio.imread(gif, index=None)
    assert anim.shape[:3] == (6, h, w)


def test_training_curves_tolerate_missing_metric(tmp_path):
    path = tmp_path / "run_a" / "metrics.jsonl"
    path.parent.mkdir()
    with open(path, "w") as f:
        for s in range(20):
            f.write(json.dumps({"step": s, "loss": 10.0 ** (-s / 4), "reward": s * 0.1}) + "\n")
        f.write('{"step": 20, "lo')  # a writer was interrupted mid-line
    assert len(R.load_metrics(str(path))) == 20
    runs = {"a": str(path), "b": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(10)]}
    out = R.training_curves_png(str(tmp_path / "c.png"), runs, ["loss", "reward", "grad_norm"])
    img = _png(out)
    # no run logs grad_norm: two panels of 4.5 x 3.2 inches side by side
    assert img.shape == (round(3.2 * DPI), round(2 * 4.5 * DPI), 3)
    left, right = img[:, :img.shape[1] // 2], img[:, img.shape[1] // 2:]
    # run a (brown) is in both panels; run b (pink) lacks "reward", so it is in the loss panel only
    assert _count(left, BROWN) > 100 and _count(right, BROWN) > 100
    assert _count(left, PINK) > 100 and _count(right, PINK) == 0
    default = _png(R.training_curves_png(str(tmp_path / "d.png"), runs))   # default: the metric both log, loss
    assert default.shape == (round(3.2 * DPI), round(4.5 * DPI), 3)
    assert _count(default, BROWN) > 100 and _count(default, PINK) > 100


def test_training_curves_missing_file_named(tmp_path):
    missing = str(tmp_path / "nope" / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="nope/metrics.jsonl"):
        R.training_curves_png(str(tmp_path / "c.png"), {"a": missing}, ["loss"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        R.load_metrics(str(bad))


def test_histograms_and_spectra_write_png(tmp_path):
    rng = np.random.default_rng(0)
    samples = {"real": rng.normal(size=50), "base": np.append(rng.normal(1, 1, 49), np.nan), "empty": []}
    hist = _png(R.histograms_png(str(tmp_path / "h.png"), samples, xlabel="d", bins=10, title="t"))
    assert hist.shape == (round(4.0 * DPI), round(6.0 * DPI), 3)
    # the base histogram (grey, its finite values) is drawn; the empty set has a legend entry (brown) only
    assert _count(hist, GREY, tol=10) > 1000
    assert 10 < _count(hist, BROWN) < 200
    freqs = np.arange(8) / 16
    spectra = {"real": np.r_[0.0, 1.0 / freqs[1:] ** 2], "base": rng.random((4, 8))}
    spec = _png(R.spectra_png(str(tmp_path / "s.png"), spectra, freqs))
    assert spec.shape == (round(4.0 * DPI), round(6.0 * DPI), 3)
    assert _count(spec, GREY, tol=10) > 500 and _count(spec, (0, 0, 0), tol=10) > 1000
    with pytest.raises(ValueError, match="bins"):
        R.spectra_png(str(tmp_path / "s.png"), {"x": np.ones(5)}, freqs)


def test_markdown_table_and_report(tmp_path):
    rows = [{"name": "base", "fid": 12.3456, "share": 0.25}, {"name": "a|b", "fid": None}]
    table = R.markdown_table(rows, [("name", "Variant", None), ("fid", "FID", ".2f"), ("share", "HF", "{:.0%}")])
    assert table == ("| Variant | FID | HF |\n"
                     "|---|---:|---:|\n"
                     "| base | 12.35 | 25% |\n"
                     "| a\\|b | — | — |")
    path = R.write_report(str(tmp_path / "out" / "report.md"), [("Metrics", table + "\n"), ("Notes", "x")],
                          title="Demo")
    assert open(path, encoding="utf-8").read() == f"# Demo\n\n## Metrics\n\n{table}\n\n## Notes\n\nx\n"
