"""Preference pairs for the embedded benchmark (VideoAlign-style, issue 17), and a reader of VideoAlign's CSV.

A record is a prompt, two clips A and B and a label per dimension (VQ, MQ, TA) in {+1 = A, -1 = B, 0 = tie},
as :mod:`shelllcc.data.preference_oracle` judges them. Clips are stored as **uint8 video**, not latents: the
oracle and any human or VLM rater judge pixels, a user's set (the CSV reader) arrives as videos, and latents
would tie the dataset to one VAE; the reward model's experiment encodes both clips with its VAE.

Clips of a prompt (a Moving Textures attribute set and caption):

* real: the prompt's clip, and a second real clip of the same attributes with other nuisances (a near-tie);
* degraded copies of the first (:data:`DEGRADATIONS`, severity drawn per copy): ``blur`` (Gaussian, sigma
  0.6-1.6 px), ``noise`` (Gaussian, std 6-20 / 255), ``colour_shift`` (a global cast of 15-45 / 255 on one
  channel), ``frame_repeat`` (every frame held 2-3 times), ``reverse`` (time reversed), ``wrong_motion``
  (re-rendered, same nuisances, another direction), ``swap_colour`` and ``swap_shape`` (re-rendered with the
  attribute changed);
* generated (optional, :class:`GeneratedSource`): samples of the base model and its fine-tuned variants, a
  directory per model as ``experiments/sample.py`` writes it (``samples/prompts.json`` and either the
  ``{i:04d}.mp4`` files or ``latents.npy`` with a decoder). Captions are matched to prompts by attributes.

Pairs: ``pairs_per_prompt`` distinct pairs of a prompt's clips, A/B order random. Splits are by prompt: an
attribute set goes to train / validation / test by a hash of it, so no caption nor attribute set is in two
splits. The tie margins are fitted on the train split's pairs (``tie_share`` of them ties) and applied to
every split; they are stored in the dataset's metadata (``builder.info.metadata['tie_margins']``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections import Counter
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from shelllcc.data import moving_textures as mt
from shelllcc.data import preference_oracle as oracle
from shelllcc.data.tfds_prepare import prepare, video_feature

NAME = "shelllcc_preferences"
DEGRADATIONS = ("blur", "noise", "colour_shift", "frame_repeat", "reverse", "wrong_motion", "swap_colour",
                "swap_shape")
SPLITS = ("train", "validation", "test")


# --- degradations (uint8 [T, H, W, 3] -> uint8) ------------------------------------------------------


def _u8(x) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blur(video, sigma: float) -> np.ndarray:
    """Gaussian blur over H and W (separable, edge-replicated), ``sigma`` in pixels."""
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
    return _u8(x)


def add_noise(video, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of ``std`` in [0, 255] units."""
    return _u8(np.asarray(video, np.float64) + rng.normal(0.0, std, np.shape(video)))


def colour_shift(video, channel: int, amount: float) -> np.ndarray:
    """A global colour cast: ``amount`` (0-255 units) added to one channel of every pixel."""
    x = np.asarray(video, np.float64).copy()
    x[..., channel] += amount
    return _u8(x)


def frame_repeat(video, hold: int) -> np.ndarray:
    """Each ``hold``-th frame held for ``hold`` frames (a stutter at the same length)."""
    t = np.asarray(video).shape[0]
    return np.asarray(video)[(np.arange(t) // hold) * hold]


def reverse(video) -> np.ndarray:
    return np.asarray(video)[::-1].copy()


def _rerender(index_seed, attributes, spec, **change) -> np.ndarray:
    return mt.generate_clip(np.random.default_rng(index_seed), {**attributes, **change}, spec)


def degrade(kind: str, video, attributes, spec: mt.ClipSpec, clip_seed, rng: np.random.Generator) -> np.ndarray:
    """One degradation of a real clip; ``clip_seed`` re-renders it with the same nuisances."""
    if kind == "blur":
        return blur(video, float(rng.uniform(0.6, 1.6)))
    if kind == "noise":
        return add_noise(video, float(rng.uniform(6.0, 20.0)), rng)
    if kind == "colour_shift":
        return colour_shift(video, int(rng.integers(3)), float(rng.choice([-1, 1]) * rng.uniform(15.0, 45.0)))
    if kind == "frame_repeat":
        return frame_repeat(video, int(rng.integers(2, 4)))
    if kind == "reverse":
        return reverse(video)
    if kind in ("wrong_motion", "swap_colour", "swap_shape"):
        attr = {"wrong_motion": "direction", "swap_colour": "colour", "swap_shape": "shape"}[kind]
        others = [v for v in mt.ATTRIBUTES[attr] if v != attributes[attr]]
        return _rerender(clip_seed, attributes, spec, **{attr: others[int(rng.integers(len(others)))]})
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")


# --- prompts and splits ------------------------------------------------------------------------------


def attribute_key(attributes) -> str:
    return "|".join(f"{k}={attributes[k]}" for k in mt.ATTRIBUTES)


def split_of(attributes, seed: int, fractions=(0.8, 0.1, 0.1)) -> str:
    """The split of an attribute set: a hash, so a prompt's split does not depend on which others exist."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{attribute_key(attributes)}".encode()).digest()[:8], "big") / 2 ** 64
    return "train" if h < fractions[0] else ("validation" if h < fractions[0] + fractions[1] else "test")


# --- generated clips ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GeneratedSource:
    """Sample directories of generators (``experiments/sample.py`` workdirs or their ``samples/``), read by caption.

    ``decode``: latents ``[N, T', h, w, C]`` -> uint8 videos ``[N, T, H, W, 3]``, used when a directory has
    ``latents.npy``; without it, the ``{i:04d}.mp4`` files are read. Clips whose caption is not a Moving
    Textures caption or whose shape differs from the builder's are counted in ``report`` and left out.
    """

    directories: tuple[str, ...] = ()
    decode: Callable | None = None

    def clips_by_key(self, spec: mt.ClipSpec, report: Counter) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {}
        lookup = _caption_lookup()
        for d in self.directories:
            root = d if os.path.exists(os.path.join(d, "prompts.json")) else os.path.join(d, "samples")
            with open(os.path.join(root, "prompts.json")) as f:
                prompts = json.load(f)
            if self.decode is not None and os.path.exists(os.path.join(root, "latents.npy")):
                videos = np.asarray(self.decode(np.load(os.path.join(root, "latents.npy"))))
            else:
                videos = [_read_video(os.path.join(root, f"{p['index']:04d}.mp4")) for p in prompts]
            for p, v in zip(prompts, videos):
                attrs = lookup.get(p["caption"].strip().lower())
                if attrs is None:
                    report["generated_unknown_caption"] += 1
                elif v is None or np.shape(v) != (spec.num_frames, spec.height, spec.width, 3):
                    report["generated_bad_shape"] += 1
                else:
                    out.setdefault(attribute_key(attrs), []).append(np.asarray(v, np.uint8))
                    report["generated_clips"] += 1
        return out


def _caption_lookup() -> dict[str, dict[str, str]]:
    import itertools
    table = {}
    for values in itertools.product(*mt.ATTRIBUTES.values()):
        attrs = dict(zip(mt.ATTRIBUTES, values))
        for variant in range(len(mt.CAPTION_TEMPLATES)):
            table[mt.caption(attrs, variant)] = attrs
    return table


def _read_video(path: str) -> np.ndarray | None:
    try:
        import imageio.v3 as iio
        return np.asarray(iio.imread(path, plugin="pyav" if path.endswith(".mp4") else None))[..., :3]
    except Exception:
        try:
            import imageio.v3 as iio
            return np.asarray(iio.imread(path))[..., :3]
        except Exception:
            return None


# --- the builder ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreferenceConfig(tfds.core.BuilderConfig):
    """Sizes of the preference set; every field is part of the config's name except the generated source."""

    name: str = ""
    num_frames: int = 9
    height: int = 64
    width: int = 64
    num_prompts: int = 200              # over all splits; each goes to one split by its attribute hash
    degraded_per_prompt: int = 4
    pairs_per_prompt: int = 6
    tie_share: float = 1 / 3
    seed: int = 0
    generated: GeneratedSource = dataclasses.field(default_factory=GeneratedSource)

    def __post_init__(self):
        for field in ("num_frames", "height", "width", "num_prompts", "pairs_per_prompt"):
            if getattr(self, field) < 1:
                raise ValueError(f"PreferenceConfig.{field} must be positive, got {getattr(self, field)}")
        if not 0.0 < self.tie_share < 1.0:
            raise ValueError(f"PreferenceConfig.tie_share must be in (0, 1), got {self.tie_share}")
        if not self.name:
            gen = ("_gen" + hashlib.sha256("|".join(self.generated.directories).encode()).hexdigest()[:8]
                   if self.generated.directories else "")
            self.name = (f"t{self.num_frames}_{self.height}x{self.width}_p{self.num_prompts}_d{self.degraded_per_prompt}"
                         f"_k{self.pairs_per_prompt}_tie{self.tie_share:.3f}_seed{self.seed}{gen}")

    def clip_spec(self) -> mt.ClipSpec:
        return mt.ClipSpec(num_frames=self.num_frames, height=self.height, width=self.width, seed=self.seed)


def make_pairs(config: PreferenceConfig, report: Counter | None = None) -> dict[str, list[dict]]:
    """Every split's pairs with oracle scores and labels (labels from margins fitted on train)."""
    report = Counter() if report is None else report
    spec = config.clip_spec()
    generated = config.generated.clips_by_key(spec, report) if config.generated.directories else {}
    base = mt.split_seed(config.seed, "train")
    pairs: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    index = 0
    while sum(len(p) for p in pairs.values()) < config.num_prompts * config.pairs_per_prompt:
        clip_seed = (base, index)
        rng = np.random.default_rng([base, index, 1])
        index += 1
        ex_rng = mt.clip_rng(*clip_seed)
        attrs = mt.sample_attributes(ex_rng)
        key = attribute_key(attrs)
        if key in seen:       # one prompt per attribute set
            continue
        seen.add(key)
        cap = mt.caption(attrs, int(ex_rng.integers(len(mt.CAPTION_TEMPLATES))))
        # its own seed, so the re-renders (wrong motion, swapped attributes) replay the nuisances of `real`
        real_seed = [base, index - 1, 2]
        real = mt.generate_clip(np.random.default_rng(real_seed), attrs, spec)
        clips = [("real", real), ("real_other", mt.generate_clip(np.random.default_rng([base, index - 1, 3]), attrs, spec))]
        kinds = rng.choice(len(DEGRADATIONS), size=min(config.degraded_per_prompt, len(DEGRADATIONS)), replace=False)
        clips += [(DEGRADATIONS[k], degrade(DEGRADATIONS[k], real, attrs, spec, real_seed, rng)) for k in sorted(kinds)]
        clips += [("generated", v) for v in generated.get(key, [])]
        reference = mt.generate_clip(np.random.default_rng([base, index - 1, 4]), attrs, spec)
        s = np.stack([oracle.scores(v, attrs, reference) for _, v in clips])
        all_pairs = [(i, j) for i in range(len(clips)) for j in range(i + 1, len(clips))]
        chosen = rng.choice(len(all_pairs), size=min(config.pairs_per_prompt, len(all_pairs)), replace=False)
        split = split_of(attrs, config.seed)
        for c in chosen:
            i, j = all_pairs[c]
            if rng.random() < 0.5:
                i, j = j, i
            pairs[split].append({"caption": cap, "attributes": attrs, "video_a": clips[i][1], "video_b": clips[j][1],
                                 "source_a": clips[i][0], "source_b": clips[j][0], "score_a": s[i], "score_b": s[j]})
    diffs = np.array([p["score_a"] - p["score_b"] for p in pairs["train"]]).reshape(-1, 3)
    margins = oracle.tie_margins(diffs, config.tie_share) if len(diffs) else np.zeros(3)
    for split in SPLITS:
        for p in pairs[split]:
            p["labels"] = oracle.labels_from_scores(p["score_a"], p["score_b"], margins)
    report["prompts"] = len(seen)
    return {"pairs": pairs, "margins": margins}


LABEL_NAMES = ("B", "tie", "A")       # stored class index = label + 1


class Preferences(tfds.core.GeneratorBasedBuilder):
    """Pairs of Moving Textures clips with oracle preference labels per dimension."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [PreferenceConfig()]
    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        video = video_feature(cfg.num_frames, cfg.height, cfg.width)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "caption": tfds.features.Text(),
                "video_a": video, "video_b": video,
                "source_a": tfds.features.Text(), "source_b": tfds.features.Text(),
                # label + 1: 0 = B preferred, 1 = tie, 2 = A preferred
                **{d: tfds.features.ClassLabel(names=list(LABEL_NAMES)) for d in oracle.DIMENSIONS},
                "score_a": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "score_b": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "index": np.int64,
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        made = make_pairs(self.builder_config)
        self.info.metadata["tie_margins"] = [float(m) for m in made["margins"]]
        return {s: self._generate_examples(made["pairs"][s]) for s in SPLITS if made["pairs"][s]}

    def _generate_examples(self, pairs):
        for i, p in enumerate(pairs):
            yield i, {"caption": p["caption"], "video_a": p["video_a"], "video_b": p["video_b"],
                      "source_a": p["source_a"], "source_b": p["source_b"],
                      **{d: int(p["labels"][k]) + 1 for k, d in enumerate(oracle.DIMENSIONS)},
                      "score_a": p["score_a"].astype(np.float32), "score_b": p["score_b"].astype(np.float32), "index": i}


def build(data_dir: str, config: PreferenceConfig | None = None, verbose: bool = True) -> Preferences:
    config = config or PreferenceConfig()
    builder, what = prepare(Preferences, config, data_dir)
    if verbose:
        sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
        print(f"{NAME}/{config.name}: {sizes} pairs ({what}) at {builder.data_dir}", flush=True)
    return builder


def labels_of(example) -> np.ndarray:
    """``[3]`` labels in {+1, -1, 0} (VQ, MQ, TA) of a stored example."""
    return np.array([int(example[d]) - 1 for d in oracle.DIMENSIONS], np.int64)


# --- VideoAlign's CSV ----------------------------------------------------------------------------------

CSV_COLUMNS = ("path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B")
_CSV_LABELS = {"A": 1, "B": -1, "same": 0}


def read_videoalign_csv(path: str, video_root: str | None = None) -> tuple[list[dict], dict]:
    """Rows of VideoAlign's training CSV (``datasets/train/README.md``: ``path_A``, ``path_B``, ``prompt``,
    ``VQ``/``MQ``/``TA`` in {A, B, same}, ``fps_*``, ``num_frames_*``) as records with labels ``[3]`` in
    {+1, -1, 0} and absolute paths (relative ones against ``video_root``, default the CSV's folder).

    Nothing is dropped silently: the report counts ``rows``, ``kept``, ``missing_video`` (a file of A or B
    absent), ``unknown_label`` (a dimension's value outside A / B / same, case-insensitive; that label is
    set to 2, which :func:`shelllcc.rewards.preference.btt_loss` ignores, and the row kept), ``duplicate``
    (the same path_A, path_B, prompt as an earlier row: left out), with ``examples`` of each problem (row
    numbers, 1-based after the header). A missing required column raises.
    """
    root = video_root or os.path.dirname(os.path.abspath(path))
    report = Counter()
    examples: dict[str, list[int]] = {}
    records = []
    seen = set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("path_A", "path_B", "prompt", "VQ", "MQ", "TA") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; VideoAlign's layout has {CSV_COLUMNS}")
        for row_no, row in enumerate(reader, start=1):
            report["rows"] += 1
            key = (row["path_A"], row["path_B"], row["prompt"])
            if key in seen:
                report["duplicate"] += 1
                examples.setdefault("duplicate", []).append(row_no)
                continue
            seen.add(key)
            paths = [p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p)) for p in (row["path_A"], row["path_B"])]
            if not all(os.path.exists(p) for p in paths):
                report["missing_video"] += 1
                examples.setdefault("missing_video", []).append(row_no)
                continue
            labels = []
            for d in oracle.DIMENSIONS:
                value = {k.lower(): v for k, v in _CSV_LABELS.items()}.get((row[d] or "").strip().lower())
                if value is None:
                    report["unknown_label"] += 1
                    examples.setdefault("unknown_label", []).append(row_no)
                    value = 2
                labels.append(value)
            records.append({"path_a": paths[0], "path_b": paths[1], "prompt": row["prompt"],
                            "labels": np.array(labels, np.int64), "row": row_no,
                            **{k: row.get(k) for k in ("fps_A", "num_frames_A", "fps_B", "num_frames_B")}})
            report["kept"] += 1
    out = {"rows": 0, "kept": 0, "missing_video": 0, "unknown_label": 0, "duplicate": 0, **report,
           "examples": {k: v[:10] for k, v in examples.items()}}
    return records, out


__all__ = ["CSV_COLUMNS", "DEGRADATIONS", "GeneratedSource", "NAME", "PreferenceConfig", "Preferences", "add_noise",
           "blur", "build", "colour_shift", "degrade", "frame_repeat", "labels_of", "make_pairs", "read_videoalign_csv",
           "reverse", "split_of"]
