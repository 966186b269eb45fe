"""The video-folder TFDS builder: clip cutting, fps resampling, resize/crop, skips, splits, no TF."""

import json
import os
import shutil
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from shelllcc.data import video_folder as vf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, H, W = 8, 16, 24          # clip shape used by the builds below
BASE, STEP = 30, 5           # frame i of the index-coded videos has mean brightness BASE + STEP * i


def coded_frames(n, h, w, step=STEP, base=BASE):
    """Frames whose mean brightness encodes their index, plus a moving sine over whole x periods
    (zero mean even after an aspect-preserving crop in y), so consecutive frames differ."""
    x = np.arange(w)[None, :]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        wave = 20 * np.sin(2 * np.pi * (x + 3 * i) / w) * np.ones((h, 1))
        level = (base + step * (i % ((255 - 2 * base) // step))) + wave
        out[i] = np.clip(level, 0, 255).astype(np.uint8)[..., None]
    return out


def write_video(path, frames, fps=30, **kw):
    iio.imwrite(path, frames, fps=fps, macro_block_size=16, plugin="FFMPEG", **kw)


def frame_index(frame):
    return int(round((float(frame.mean()) - BASE) / STEP))


def decoded_resized(path):
    """Every frame of ``path`` as decoded by imageio and resized by the module's helper."""
    plugin = "pillow" if path.endswith(".gif") else "FFMPEG"
    kw = {"mode": "RGB"} if plugin == "pillow" else {}
    return [vf.resize_frame(np.asarray(f), H, W) for f in iio.imiter(path, plugin=plugin, **kw)]


EXPECTED_CLIPS = {"valid.mp4": 2, "sub/deep/LONG.MP4": 3, "anim.gif": 2, "clip.mov": 1, "clip.webm": 1}
EXPECTED_SKIPS = {"unreadable": 2, "truncated": 1, "damaged": 1, "too_short": 1, "no_caption": 1, "empty_caption": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with every case; all formats (mp4, mov, webm/vp9, gif) are writable by the
    bundled ffmpeg / Pillow, so none is left out."""
    root = tmp_path_factory.mktemp("videos")
    os.makedirs(root / "sub" / "deep")
    # 40 frames @ 30 fps -> 20 at 15 fps -> 2 clips of 8 (starts 0 and 12).
    write_video(str(root / "valid.mp4"), coded_frames(40, 32, 48))
    (root / "valid.txt").write_text("a valid video\n")
    # 120 frames -> 60 resampled -> min(3, 7) = 3 clips, starts 0, 26, 52. Upper-case extension.
    write_video(str(root / "sub" / "deep" / "LONG.MP4"), coded_frames(120, 32, 48, step=1))
    (root / "sub" / "deep" / "LONG.txt").write_text("a long video")
    # gif, 24x40 portrait (cropped in y), 30 frames x 50 ms = 1.5 s -> 23 frames at 15 fps -> 2 clips.
    iio.imwrite(str(root / "anim.gif"), coded_frames(30, 40, 24), duration=50, loop=0, plugin="pillow")
    # mov (h264) and webm (vp9), 24 frames -> 12 resampled -> 1 clip each.
    write_video(str(root / "clip.mov"), coded_frames(24, 32, 48), codec="libx264")
    write_video(str(root / "clip.webm"), coded_frames(24, 32, 48), codec="libvpx-vp9")
    (root / "clip.webm.unused").write_text("not a video")  # ignored: wrong extension
    (root / "captions.jsonl").write_text(
        json.dumps({"file": "anim.gif", "caption": "a gif"}) + "\n\n"
        + json.dumps({"file": "gone.mp4", "caption": "names no video"}) + "\n")
    (root / "captions.csv").write_text("file,caption\nclip.mov,a mov clip\n./clip.webm,a webm clip\n")
    # unreadable: random bytes, and a truncated mp4 whose index (moov, written last) is cut off.
    (root / "noise.mp4").write_bytes(np.random.RandomState(0).bytes(5000))
    (root / "noise.txt").write_text("noise")
    data = (root / "valid.mp4").read_bytes()
    (root / "cut_index.mp4").write_bytes(data[: len(data) // 2])
    (root / "cut_index.txt").write_text("cut")
    # truncated: index first (faststart), so it opens but half the declared frames are missing.
    fast = str(tmp_path_factory.mktemp("scratch") / "fast.mp4")  # outside the folder
    write_video(fast, coded_frames(60, 32, 48), output_params=["-movflags", "+faststart"])
    data = open(fast, "rb").read()
    (root / "cut_data.mp4").write_bytes(data[: len(data) // 2])
    os.remove(fast)
    (root / "cut_data.txt").write_text("cut data")
    # damaged: bytes garbled in the middle of the stream; it opens, has every frame and decodes with the
    # damage concealed, only the decoder's messages tell
    data = bytearray((root / "valid.mp4").read_bytes())
    mid = data.find(b"mdat") + len(data) // 3
    data[mid:mid + 600] = bytes(b ^ 0x5A for b in data[mid:mid + 600])
    (root / "garbled.mp4").write_bytes(bytes(data))
    (root / "garbled.txt").write_text("garbled")
    # too short: 10 frames -> 5 at 15 fps < 8.
    write_video(str(root / "short.mp4"), coded_frames(10, 32, 48))
    (root / "short.txt").write_text("short")
    # no caption / empty caption.
    write_video(str(root / "nocap.mp4"), coded_frames(24, 32, 48))
    write_video(str(root / "emptycap.mp4"), coded_frames(24, 32, 48))
    (root / "emptycap.txt").write_text("  \n ")
    return root


def pick_seed(fraction):
    """A seed whose hash split puts some, but not all, captioned good videos in test."""
    for seed in range(100):
        test = {s for s in EXPECTED_CLIPS if vf.split_of(s, seed, fraction) == "test"}
        if 0 < len(test) < len(EXPECTED_CLIPS):
            return seed
    raise AssertionError("no seed splits the fixture")


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    seed = pick_seed(0.4)
    cfg = vf.VideoFolderConfig(video_dir=str(folder), num_frames=T, height=H, width=W, fps=15,
                               clips_per_video=3, test_fraction=0.4, seed=seed)
    builder = vf.build(str(tmp_path_factory.mktemp("data")), cfg, verbose=False)
    examples = {split: [builder.as_data_source(split)[i] for i in range(len(builder.as_data_source(split)))]
                for split in ("train", "test")}
    return builder, examples, seed


def _text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


def test_clip_counts_shapes_and_captions(built):
    builder, examples, _ = built
    all_ex = examples["train"] + examples["test"]
    per_source = {}
    for ex in all_ex:
        per_source[_text(ex["source"])] = per_source.get(_text(ex["source"]), 0) + 1
        assert ex["video"].shape == (T, H, W, 3) and ex["video"].dtype == np.uint8
        assert float(ex["fps"]) == 15.0
    assert per_source == EXPECTED_CLIPS
    captions = {_text(ex["source"]): _text(ex["caption"]) for ex in all_ex}
    assert captions == {"valid.mp4": "a valid video", "sub/deep/LONG.MP4": "a long video", "anim.gif": "a gif",
                        "clip.mov": "a mov clip", "clip.webm": "a webm clip"}
    starts = {(_text(ex["source"]), int(ex["clip_index"])): int(ex["start_frame"]) for ex in all_ex}
    # start_frame is in source frames: resampled starts times 2 (30 -> 15 fps).
    assert [starts[("sub/deep/LONG.MP4", k)] for k in range(3)] == [0, 52, 104]
    assert [starts[("valid.mp4", k)] for k in range(2)] == [0, 24]


def test_clips_match_directly_decoded_frames(built, folder):
    _, examples, _ = built
    cache = {}
    for ex in examples["train"] + examples["test"]:
        src = _text(ex["source"])
        if src not in cache:
            cache[src] = decoded_resized(str(folder / src))
        frames = cache[src]
        ref = frames[int(ex["start_frame"])]
        diff = np.abs(ex["video"][0].astype(int) - ref.astype(int))
        assert diff.max() <= 2, (src, diff.max())
        if not src.endswith(".gif"):  # 30 fps sources at 15 fps: every other frame
            for j in range(T):
                want = frames[int(ex["start_frame"]) + 2 * j]
                assert np.abs(ex["video"][j].astype(int) - want.astype(int)).max() <= 2


def test_fps_resampling_picks_expected_frames(built):
    _, examples, _ = built
    by_key = {(_text(ex["source"]), int(ex["clip_index"])): ex for ex in examples["train"] + examples["test"]}
    # valid.mp4 is 30 fps, index-coded: at 15 fps clip 0 holds frames 0, 2, ..., 14 and clip 1 (resampled
    # start 12) frames 24, 26, ..., 38.
    assert [frame_index(f) for f in by_key[("valid.mp4", 0)]["video"]] == list(range(0, 16, 2))
    assert [frame_index(f) for f in by_key[("valid.mp4", 1)]["video"]] == list(range(24, 40, 2))
    # gif at 20 fps (50 ms frames) -> 15 fps: output k at k/15 s takes frame round(k * 4 / 3).
    want = [int(np.floor(k * 4 / 3 + 0.5)) for k in range(23)]
    assert [frame_index(f) for f in by_key[("anim.gif", 0)]["video"]] == want[:T]
    assert [frame_index(f) for f in by_key[("anim.gif", 1)]["video"]] == want[15:15 + T]
    assert int(by_key[("anim.gif", 1)]["start_frame"]) == want[15]


def test_resample_indices_unit():
    ts = np.arange(30) / 30
    np.testing.assert_array_equal(vf.resample_indices(ts, 1.0, 15), np.arange(0, 30, 2))
    np.testing.assert_array_equal(vf.resample_indices(ts, 1.0, None), np.arange(30))
    np.testing.assert_array_equal(vf.resample_indices(ts[:3], 0.1, 60), [0, 0, 1, 1, 2, 2])
    assert vf.clip_starts(60, 8, 3) == [0, 26, 52]
    assert vf.clip_starts(20, 8, 5) == [0, 12]
    assert vf.clip_starts(7, 8, 5) == []
    for n in range(8, 200):  # never overlapping, always inside
        s = vf.clip_starts(n, 8, 6)
        assert all(b - a >= 8 for a, b in zip(s, s[1:])) and s[-1] + 8 <= n


def test_skip_report(built, capsys):
    builder, _, _ = built
    report = vf.load_report(builder)
    assert report["skipped"] == EXPECTED_SKIPS
    listed = {r: sorted(e["file"] for e in v) for r, v in report["skipped_files"].items()}
    assert listed == {"unreadable": ["cut_index.mp4", "noise.mp4"], "truncated": ["cut_data.mp4"],
                      "damaged": ["garbled.mp4"], "too_short": ["short.mp4"], "no_caption": ["nocap.mp4"],
                      "empty_caption": ["emptycap.mp4"]}
    assert report["videos_found"] == 12 and report["videos_used"] == 5
    assert report["captions_without_video"] == ["gone.mp4"]
    assert builder.info.metadata["build_report"]["skipped"] == EXPECTED_SKIPS


def test_splits_are_disjoint_by_source(built):
    _, examples, seed = built
    train = {_text(ex["source"]) for ex in examples["train"]}
    test = {_text(ex["source"]) for ex in examples["test"]}
    assert train and test and not train & test
    assert test == {s for s in EXPECTED_CLIPS if vf.split_of(s, seed, 0.4) == "test"}


def test_all_bad_folder_raises_with_counts(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("noise.mp4", "noise.txt", "short.mp4", "short.txt", "nocap.mp4"):
        shutil.copy(folder / name, bad / name)
    cfg = vf.VideoFolderConfig(video_dir=str(bad), num_frames=T, height=H, width=W, fps=15)
    with pytest.raises(vf.NoClipsError, match=r"3 videos found.*unreadable=1, too_short=1, no_caption=1"):
        vf.build(str(tmp_path / "data"), cfg, verbose=False)


def test_build_and_read_import_no_tensorflow(folder, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(folder / "clip.mov", small / "clip.mov")
    (small / "clip.txt").write_text("mov")
    code = (
        "import sys\n"
        "from shelllcc.data import video_folder as vf\n"
        f"cfg = vf.VideoFolderConfig(video_dir={str(small)!r}, num_frames=20, height=8, width=8)\n"
        f"b = vf.build({str(tmp_path / 'data')!r}, cfg, verbose=False)\n"
        "x = b.as_data_source('train')[0]\n"
        "print('TF' if 'tensorflow' in sys.modules else 'NO_TF', x['video'].shape, float(x['fps']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # fps=None keeps the source's 30 fps; 24 frames give one 20-frame clip.
    assert "NO_TF (20, 8, 8, 3) 30.0" in proc.stdout


def test_module_command_of_the_readme(folder, tmp_path):
    """README step 1, ``python -m shelllcc.data.video_folder VIDEOS TFDS T H W FPS``: the builder class was
    ``__main__.VideoFolder`` under -m and TFDS refused it ("'__main__' is not a package")."""
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(folder / "clip.mov", small / "clip.mov")
    (small / "clip.txt").write_text("mov")
    proc = subprocess.run([sys.executable, "-m", "shelllcc.data.video_folder", str(small), str(tmp_path / "data"),
                           "20", "8", "8", "30"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{vf.NAME}/" in proc.stdout and "clips of 20x8x8" in proc.stdout
    assert os.path.isdir(tmp_path / "data" / vf.NAME)


def test_config_validation_and_names():
    with pytest.raises(ValueError, match="num_frames must be positive"):
        vf.VideoFolderConfig(video_dir="x", num_frames=0)
    with pytest.raises(ValueError, match="test_fraction"):
        vf.VideoFolderConfig(video_dir="x", test_fraction=1.0)
    a = vf.VideoFolderConfig(video_dir="/a/videos")
    b = vf.VideoFolderConfig(video_dir="/b/videos")
    assert a.name != b.name and a.name.startswith("videos_")


def test_rebuild_reuses(built, capsys):
    builder, _, _ = built
    again = vf.build(os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir))), builder.builder_config)
    assert "reused" in capsys.readouterr().out
    assert vf.load_report(again)["skipped"] == EXPECTED_SKIPS
