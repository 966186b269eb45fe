"""TFDS builder for a user's folder of captioned videos (ArrayRecord, TensorFlow not needed).

Turns a directory tree of ``.mp4`` / ``.webm`` / ``.mov`` / ``.gif`` files (extension matched
case-insensitively, searched recursively) into fixed-shape training clips with captions::

    from shelllcc.data import video_folder
    cfg = video_folder.VideoFolderConfig(video_dir="~/my_videos", num_frames=81, height=480,
                                         width=832, fps=16, clips_per_video=4, test_fraction=0.05)
    builder = video_folder.build("~/tensorflow_datasets", cfg)
    train = builder.as_data_source("train")      # random access, TF-free (see readers.py)

Captions, in order of precedence (the most specific source wins):

1. a sidecar ``<video-stem>.txt`` next to the video (``clips/a.mp4`` -> ``clips/a.txt``);
2. ``captions.jsonl`` at the folder root, one ``{"file": <relative path>, "caption": ...}`` per line;
3. ``captions.csv`` at the folder root, with columns ``file`` and ``caption``.

Relative paths use ``/`` and are relative to ``video_dir``. Captions are whitespace-stripped.

How clips are cut. Each video is first resampled in time to ``fps`` (when given) by
*nearest-frame selection*: output frame ``k`` shows the source frame whose timestamp is closest to
``k / fps`` (ties go to the earlier frame); output times run while ``k / fps`` is before the end
of the video. A 30 fps source at ``fps=15`` so takes frames 0, 2, 4, ...; ``fps`` above the source
rate repeats frames. With ``fps=None`` every source frame is kept and the clip's ``fps`` is the
source's. From the ``N`` resampled frames, ``n = min(clips_per_video, N // num_frames)`` clips
are cut, **evenly spaced and non-overlapping**: clip ``k`` starts at ``k * (N - T) // (n - 1)``
(``T = num_frames``), so the first clip starts at the first frame, the last ends at the last
frame, and the gap between starts is at least ``T``. Evenly spaced rather than consecutive, so a
long video contributes clips from its whole length, not just its opening seconds.

Frames are resized so that the short side covers the target (aspect kept), then centre-cropped
to ``height x width`` -- done in one Pillow ``resize`` with a crop ``box`` and Lanczos filtering
(``reducing_gap`` for speed on large downscales), which antialiases properly when shrinking.

Files that cannot be used are skipped, counted by reason (:data:`SKIP_REASONS`) and listed (first
:data:`MAX_LISTED` paths per reason) in a summary printed at the end of the build, stored in the
dataset's metadata (``builder.info.metadata["build_report"]``) and in ``build_report.json`` in
the builder's data dir. A build that yields no clip at all raises :class:`NoClipsError`.

Decoding: imageio's ``ffmpeg`` reader (imageio-ffmpeg ships its own ffmpeg binary) for mp4 / webm
/ mov, imageio's Pillow plugin for gif. Each video is read twice: a cheap probe (container
metadata, plus a packet count by stream copy, which does not decode) to plan the clips, then one
streaming decode that keeps only the frames the planned clips use, resized at once, and stops
after the last one. So memory is ``clips_per_video`` clips at the target size, not the video.

Format caveats: ffmpeg-decoded videos are treated as constant frame rate at the container's
nominal rate (frame ``i`` at ``i / fps``), so for variable-frame-rate files (phone recordings,
screen captures) the resampling's timing is approximate; gif frames use
their own per-frame durations (a missing or 0 duration counts as 100 ms, as browsers do). A video
whose decodable frames end well before its declared duration (a cut-off download) is skipped as
``truncated``; a video whose audio track outlasts the video by over 10 % would be too. A video whose
decoder reports errors on the frames its clips use (garbled bytes mid-stream, which ffmpeg conceals and
decodes anyway) is skipped as ``damaged``; gifs are checked by Pillow's decode alone.

The config's name is derived from its fields (the directory by name + a hash of its absolute
path), not from the folder's content: after adding or removing videos, delete the built
directory (or change a field) to rebuild -- an existing build is otherwise reused.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from shelllcc.data.tfds_prepare import prepare, video_feature

NAME = "shelllcc_video_folder"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".gif")
SKIP_REASONS = ("unreadable", "truncated", "damaged", "too_short", "no_caption", "empty_caption")
MAX_LISTED = 20            # paths listed per skip reason in the report
GIF_DEFAULT_FRAME_S = 0.1  # browsers show 0/absent gif frame delays as ~100 ms
# A video is "truncated" when its decodable frames cover less than this fraction of the declared
# duration (slack for container rounding and B-frame delay at the end of a stream).
TRUNCATION_FRACTION = 0.9


class NoClipsError(RuntimeError):
    """The folder produced no clip at all; the message carries the skip counts."""


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
    """Where the videos are and how clips are cut; every field is part of the config's name.

    ``min_frames``: a video needs at least ``max(num_frames, min_frames)`` frames after fps
    resampling (0 means ``num_frames``). ``test_fraction``: share of *videos* (not clips) put in
    the ``test`` split, chosen by a hash of ``(seed, relative path)`` -- stable across machines and
    re-builds, and all clips of one video land in the same split.
    """

    name: str = ""            # derived from the fields below when left empty
    video_dir: str = ""
    num_frames: int = 17
    height: int = 64
    width: int = 64
    fps: float | None = None
    clips_per_video: int = 1
    min_frames: int = 0
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for field in ("num_frames", "height", "width", "clips_per_video"):
            if getattr(self, field) < 1:
                raise ValueError(f"VideoFolderConfig.{field} must be positive, got {getattr(self, field)}")
        if self.min_frames < 0:
            raise ValueError(f"VideoFolderConfig.min_frames must be >= 0, got {self.min_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"VideoFolderConfig.fps must be positive or None, got {self.fps}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"VideoFolderConfig.test_fraction must be in [0, 1), got {self.test_fraction}")
        if not self.name:
            root = os.path.abspath(os.path.expanduser(self.video_dir)) if self.video_dir else ""
            base = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(root.rstrip("/")) or "none").strip("_")[:32]
            # Hash of the full path: two folders called "videos" must not share a build directory.
            digest = hashlib.sha1(root.encode()).hexdigest()[:8]
            fps = "src" if self.fps is None else f"{self.fps:g}".replace(".", "p")
            frac = f"{self.test_fraction:g}".replace(".", "p")
            self.name = (f"{base}_{digest}_t{self.num_frames}_{self.height}x{self.width}_fps{fps}"
                         f"_c{self.clips_per_video}_min{self.min_frames}_test{frac}_seed{self.seed}")

    @property
    def required_frames(self) -> int:
        return max(self.num_frames, self.min_frames)


# --------------------------------------------------------------------------------------------------
# Pure helpers (public so that tests and users can reproduce exactly what the builder does)
# --------------------------------------------------------------------------------------------------

def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``frame`` (uint8 HxWx3) so its short side covers ``height x width``, centre-crop.

    The crop is a (fractional) source box handed to Pillow, so cropping and scaling are one
    Lanczos resample: no rounding of an intermediate size, and the crop is exactly centred.
    """
    from PIL import Image

    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
    if w * height > h * width:       # source is wider than the target: crop the sides
        cw = h * width / height
        box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
    else:                            # taller (or same aspect): crop top and bottom
        ch = w * height / width
        box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    img = Image.fromarray(np.ascontiguousarray(frame[..., :3], dtype=np.uint8))
    # reducing_gap: a cheap box pre-shrink before Lanczos on big reductions (4K -> 480p), with no
    # visible quality loss at 3.0.
    out = img.resize((width, height), resample=Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def resample_indices(timestamps: np.ndarray, end_time: float, fps: float | None) -> np.ndarray:
    """Source frame index of each output frame when resampling to ``fps`` (nearest timestamp).

    ``timestamps`` are the sorted start times (s) of the source frames, ``end_time`` the end of
    the last one. Output frame ``k`` is at ``k / fps`` for every ``k / fps < end_time``; ties go to
    the earlier frame. ``fps=None`` keeps every source frame.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    if fps is None or len(ts) == 0:
        return np.arange(len(ts))
    eps = 1e-9  # k / fps and i / src_fps that are equal on paper may differ in the last bit
    count = int(math.ceil(end_time * fps - eps))
    t = np.arange(max(count, 0), dtype=np.float64) / fps
    below = np.clip(np.searchsorted(ts, t + eps, side="right") - 1, 0, len(ts) - 1)
    above = np.minimum(below + 1, len(ts) - 1)
    take_above = (ts[above] - t) < (t - ts[below]) - eps
    return np.where(take_above, above, below)


def clip_starts(num_resampled: int, num_frames: int, clips_per_video: int) -> list[int]:
    """Starts (in resampled frames) of evenly spaced, non-overlapping clips; see module doc."""
    n = min(clips_per_video, num_resampled // num_frames)
    if n <= 0:
        return []
    if n == 1:
        return [0]
    span = num_resampled - num_frames
    # Integer division keeps consecutive starts >= num_frames apart (span / (n-1) >= num_frames).
    return [k * span // (n - 1) for k in range(n)]


def split_of(relpath: str, seed: int, test_fraction: float) -> str:
    """``"test"`` or ``"train"`` for a video, from a hash of ``(seed, relative path)``."""
    if test_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return "test" if u < test_fraction else "train"


def find_videos(video_dir: str) -> list[str]:
    """Relative (``/``-separated) paths of the videos under ``video_dir``, sorted."""
    found = []
    for root, dirs, files in os.walk(video_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skip .git, .cache, ...
        for f in files:
            if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."):
                found.append(os.path.relpath(os.path.join(root, f), video_dir).replace(os.sep, "/"))
    return sorted(found)


def _norm_rel(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def read_caption_index(video_dir: str) -> dict[str, str]:
    """Captions from ``captions.jsonl`` / ``captions.csv`` at the root (jsonl wins on conflict).

    Malformed index files are an error, not a skip: they are the user's, and a silent partial read
    would drop many videos at once.
    """
    captions: dict[str, str] = {}
    csv_path = os.path.join(video_dir, "captions.csv")
    if os.path.exists(csv_path):
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{csv_path}: needs columns 'file' and 'caption', has {reader.fieldnames}")
            for row in reader:
                captions[_norm_rel(row["file"] or "")] = row["caption"] or ""
    jsonl_path = os.path.join(video_dir, "captions.jsonl")
    if os.path.exists(jsonl_path):
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    captions[_norm_rel(row["file"])] = row.get("caption") or ""
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"{jsonl_path}:{lineno}: expected {{\"file\": ..., \"caption\": ...}}: {e}")
    return captions


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

class _Skip(Exception):
    """Raised inside per-video processing: the video is skipped for ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _short(err: BaseException) -> str:
    # ffmpeg errors carry its whole banner; the last non-empty line is the informative one.
    lines = [l.strip() for l in str(err).strip().splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


def _ffmpeg_decode_errors(path: str, num_frames: int) -> list[str]:
    """The decoder's error messages on the first ``num_frames`` frames. Garbled bytes in the middle of a
    stream decode without failing: the decoder conceals the damage and says so only on stderr, so the
    frames a clip would take are decoded once more into nothing with errors shown and nothing else."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path,
           "-map", "0:v:0", "-frames:v", str(num_frames), "-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"ffmpeg exited with code {proc.returncode}"]
    return lines


def _ffmpeg_packet_count(path: str) -> int:
    """Video packets (= frames for the usual codecs) by stream copy: no decoding, so it's cheap."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path,
           "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    counts = re.findall(r"frame=\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or not counts:
        raise _Skip("unreadable", f"ffmpeg could not read the video stream: {proc.stderr.strip()[-200:]}")
    return int(counts[-1])


class _Video:
    """One opened video: ``timestamps`` / ``end_time`` for planning, ``frames()`` to decode."""

    def __init__(self, path: str):
        self.path = path
        self.is_gif = path.lower().endswith(".gif")
        self._reader = None
        if self.is_gif:
            self._probe_gif()
        else:
            self._probe_ffmpeg()

    def _probe_gif(self):
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                durations = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    durations.append(im.info.get("duration") or 0)
        except Exception as e:  # Pillow raises a zoo of types on bad files
            raise _Skip("unreadable", _short(e))
        if not durations:
            raise _Skip("unreadable", "no frames")
        d = np.array([x / 1000.0 if x and x > 0 else GIF_DEFAULT_FRAME_S for x in durations])
        self.timestamps = np.concatenate([[0.0], np.cumsum(d)[:-1]])
        self.end_time = float(d.sum())
        self.source_fps = len(d) / self.end_time  # average, for fps=None

    def _probe_ffmpeg(self):
        import imageio

        try:
            self._reader = imageio.get_reader(self.path, "ffmpeg")
            meta = self._reader.get_meta_data()
        except Exception as e:
            self.close()
            raise _Skip("unreadable", _short(e))
        fps = meta.get("fps") or 0.0
        if not (fps > 0 and math.isfinite(fps)):
            self.close()
            raise _Skip("unreadable", f"no usable frame rate ({fps!r})")
        try:
            count = _ffmpeg_packet_count(self.path)
        except _Skip:
            self.close()
            raise
        if count <= 0:
            self.close()
            raise _Skip("unreadable", "no video frames")
        declared = meta.get("duration") or 0.0
        if math.isfinite(declared) and declared > 0 and count < TRUNCATION_FRACTION * declared * fps - 1:
            self.close()
            raise _Skip("truncated", f"{count} frames at {fps:g} fps but the container declares {declared:g} s")
        self.source_fps = float(fps)
        self.timestamps = np.arange(count) / fps
        self.end_time = count / fps

    def frames(self) -> Iterator[np.ndarray]:
        """Decoded RGB frames in order, streamed."""
        if self.is_gif:
            import imageio.v3 as iio

            with iio.imopen(self.path, "r", plugin="pillow") as f:
                yield from f.iter(mode="RGB")
        else:
            yield from self._reader

    def close(self):
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None


def extract_clips(path: str, config: VideoFolderConfig) -> list[dict]:
    """All clips of one video as dicts (``video``, ``clip_index``, ``start_frame``, ``fps``).

    ``start_frame`` is the index, in the *source's* frame numbering, of the clip's first frame.
    Raises ``_Skip`` (with a reason from :data:`SKIP_REASONS`) when the video can't be used.
    """
    video = _Video(path)
    try:
        sel = resample_indices(video.timestamps, video.end_time, config.fps)
        if len(sel) < config.required_frames:
            raise _Skip("too_short", f"{len(sel)} frames after resampling, need {config.required_frames}")
        starts = clip_starts(len(sel), config.num_frames, config.clips_per_video)
        plans = [sel[s:s + config.num_frames] for s in starts]
        needed = set(int(i) for p in plans for i in p)
        last = max(needed)
        if not video.is_gif:
            errors = _ffmpeg_decode_errors(path, last + 1)
            if errors:
                raise _Skip("damaged", f"{len(errors)} decoder error(s) in the first {last + 1} frames, e.g. "
                                       f"{errors[0][:200]}")
        kept: dict[int, np.ndarray] = {}
        decoded = 0
        frames = video.frames()
        try:
            for i, frame in enumerate(frames):
                decoded = i + 1
                if i in needed:
                    kept[i] = resize_frame(np.asarray(frame), config.height, config.width)
                if i >= last:
                    break  # nothing later is used: don't decode the rest of a long video
        except Exception as e:
            reason = "truncated" if decoded else "unreadable"
            raise _Skip(reason, f"decoding stopped after {decoded} frames: {_short(e)}")
        finally:
            frames.close()  # release the gif file / stop the ffmpeg pipe now, not at garbage collection
        if last not in kept:
            raise _Skip("truncated" if decoded else "unreadable",
                        f"only {decoded} frames decodable, clips need frame {last}")
        fps = float(config.fps) if config.fps is not None else float(video.source_fps)
        return [{"video": np.stack([kept[int(i)] for i in p]), "clip_index": k,
                 "start_frame": int(p[0]), "fps": np.float32(fps)} for k, p in enumerate(plans)]
    finally:
        video.close()


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------

# Under -m this body also runs as __main__, whose copy must leave the name to the imported module's
# (see the end of the file); TFDS refuses a second registration of one name.
class VideoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Clips with captions from a local folder of videos (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = []   # a folder config is always user-made; build() passes it as an object
    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "video": video_feature(cfg.num_frames, cfg.height, cfg.width),
                "caption": tfds.features.Text(),
                "source": tfds.features.Text(),
                "clip_index": np.int64,
                "start_frame": np.int64,
                "fps": np.float32,
            }),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(),
        )

    # -- planning ----------------------------------------------------------------------------------

    def _new_report(self) -> dict:
        cfg = self.builder_config
        return {"video_dir": os.path.abspath(os.path.expanduser(cfg.video_dir)), "config": cfg.name,
                "videos_found": 0, "videos_used": 0, "files_processed": 0,
                "clips": {"train": 0, "test": 0},
                "skipped": {r: 0 for r in SKIP_REASONS}, "skipped_files": {r: [] for r in SKIP_REASONS},
                "captions_without_video": [], "empty_splits": []}

    def _skip(self, relpath: str, reason: str, detail: str):
        rep = self._report
        rep["skipped"][reason] += 1
        if len(rep["skipped_files"][reason]) < MAX_LISTED:
            rep["skipped_files"][reason].append({"file": relpath, "detail": detail})

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        root = os.path.abspath(os.path.expanduser(cfg.video_dir))
        if not cfg.video_dir or not os.path.isdir(root):
            raise FileNotFoundError(f"VideoFolderConfig.video_dir {cfg.video_dir!r} is not a directory")
        self._root = root
        self._report = self._new_report()
        self._t0 = time.time()
        videos = find_videos(root)
        self._report["videos_found"] = len(videos)
        index = read_caption_index(root)
        self._report["captions_without_video"] = sorted(set(index) - set(videos))[:MAX_LISTED]

        by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
        for rel in videos:
            sidecar = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
            if os.path.exists(sidecar):
                with open(sidecar, encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            elif rel in index:
                caption = index[rel]
            else:
                self._skip(rel, "no_caption", "no sidecar .txt and not in captions.jsonl / captions.csv")
                continue
            caption = caption.strip()
            if not caption:
                self._skip(rel, "empty_caption", "caption is empty")
                continue
            by_split[split_of(rel, cfg.seed, cfg.test_fraction)].append((rel, caption))
        self._total_to_decode = sum(len(v) for v in by_split.values())
        self._report["files_processed"] = self._report["skipped"]["no_caption"] + self._report["skipped"]["empty_caption"]
        if self._total_to_decode == 0:
            self._fail()
        # TFDS refuses an empty split; a small folder may hash no video into test.
        splits = {}
        for split, items in by_split.items():
            if items:
                splits[split] = self._generate_examples(split, items)
            elif split == "train" or cfg.test_fraction > 0:
                self._report["empty_splits"].append(split)
        self._remaining_splits = set(splits)
        return splits

    # -- generation --------------------------------------------------------------------------------

    def _generate_examples(self, split: str, items: list[tuple[str, str]]):
        cfg = self.builder_config
        rep = self._report
        written = 0
        last_print = 0.0
        for rel, caption in items:
            try:
                clips = extract_clips(os.path.join(self._root, rel), cfg)
            except _Skip as s:
                self._skip(rel, s.reason, s.detail)
                clips = []
            rep["files_processed"] += 1
            if clips:
                rep["videos_used"] += 1
            for clip in clips:
                written += 1
                rep["clips"][split] += 1
                yield f"{rel}#{clip['clip_index']}", {**clip, "caption": caption, "source": rel}
            now = time.time()
            if now - last_print > 5.0 or rep["files_processed"] == rep["videos_found"]:
                last_print = now
                print(f"[{NAME}] {rep['files_processed']}/{rep['videos_found']} files processed, "
                      f"{sum(rep['clips'].values())} clips written ({now - self._t0:.0f}s)", flush=True)
        self._remaining_splits.discard(split)
        if not self._remaining_splits and sum(rep["clips"].values()) == 0:
            self._fail()
        if written == 0:
            # TFDS would stop with a bare "No examples were yielded"; say why instead.
            raise NoClipsError(f"split {split!r} got no clip: every one of its {len(items)} videos was skipped; "
                               f"{self._counts_text()}")

    def _counts_text(self) -> str:
        rep = self._report
        counts = ", ".join(f"{r}={n}" for r, n in rep["skipped"].items() if n)
        return f"{rep['videos_found']} videos found under {rep['video_dir']}; skipped: {counts or 'none'}"

    def _fail(self):
        self._print_summary()
        raise NoClipsError(f"no clip could be made: {self._counts_text()}. "
                           f"Examples: {json.dumps({r: v[:3] for r, v in self._report['skipped_files'].items() if v})}")

    def _print_summary(self):
        rep = self._report
        lines = [f"[{NAME}] {rep['videos_found']} videos found, {rep['videos_used']} used, "
                 f"clips: {rep['clips']['train']} train + {rep['clips']['test']} test"]
        for reason in SKIP_REASONS:
            n = rep["skipped"][reason]
            if n:
                lines.append(f"  skipped {n} {reason}:")
                lines.extend(f"    {e['file']}: {e['detail']}" for e in rep["skipped_files"][reason])
                if n > len(rep["skipped_files"][reason]):
                    lines.append(f"    ... and {n - len(rep['skipped_files'][reason])} more")
        if rep["captions_without_video"]:
            lines.append(f"  captions naming no video (first {MAX_LISTED}): {rep['captions_without_video']}")
        if rep["empty_splits"]:
            lines.append(f"  empty splits (not written): {rep['empty_splits']}")
        print("\n".join(lines), flush=True)

    def _download_and_prepare(self, dl_manager, download_config=None, **kwargs):
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config, **kwargs)
        # Here self.data_dir is still the temporary directory that TFDS renames on success, so the
        # report lands next to dataset_info.json; the metadata copy goes into metadata.json.
        self.info.metadata["build_report"] = self._report
        with open(os.path.join(self.data_dir, "build_report.json"), "w") as f:
            json.dump(self._report, f, indent=1)
        self._print_summary()


def build(data_dir: str, config: VideoFolderConfig, verbose: bool = True) -> VideoFolder:
    """Build (or reuse) the dataset of ``config.video_dir`` under ``data_dir`` and return its builder."""
    builder, what = prepare(VideoFolder, config, data_dir)
    if verbose:
        print(f"{NAME}/{config.name}: clips of {config.num_frames}x{config.height}x{config.width} "
              f"({what}) at {builder.data_dir}", flush=True)
    return builder


def load_report(builder: VideoFolder) -> dict:
    """The build report (skip counts and examples) of a prepared builder."""
    with open(os.path.join(builder.data_dir, "build_report.json")) as f:
        return json.load(f)


__all__ = ["NAME", "SKIP_REASONS", "VIDEO_EXTENSIONS", "NoClipsError", "VideoFolder", "VideoFolderConfig",
           "build", "clip_starts", "extract_clips", "find_videos", "load_report", "read_caption_index",
           "resample_indices", "resize_frame", "split_of"]


def main(argv: list[str]) -> None:
    """``python -m shelllcc.data.video_folder VIDEO_DIR DATA_DIR [T H W FPS]``."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m shelllcc.data.video_folder VIDEO_DIR DATA_DIR [T H W FPS]")
    kw = {}
    for key, cast, val in zip(("num_frames", "height", "width", "fps"), (int, int, int, float), argv[2:]):
        kw[key] = cast(val)
    build(argv[1], VideoFolderConfig(video_dir=argv[0], **kw))


if __name__ == "__main__":
    # Under -m this file runs as __main__, and TFDS derives a builder's module path from its class
    # ("'__main__' is not a package"): build with the classes of the imported module instead.
    from shelllcc.data import video_folder as _module
    _module.main(sys.argv[1:])
