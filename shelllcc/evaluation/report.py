"""The demo's presentation layer: comparison images and videos, training-curve and distribution plots,
and a markdown report.

Every writer is a pure function of its inputs that writes one file (``comparison_video``: one MP4 and
one GIF) and returns its path::

    montage_png("out/montage.png", {"base": base, "shell": shell}, frame_index=8)   # [N, T, H, W, 3] each
    comparison_video("out/compare", {"base": base, "shell": shell}, fps=8)          # compare.mp4, compare.gif
    training_curves_png("out/curves.png", {"shell": "runs/shell/metrics.jsonl"}, ["loss", "reward"])
    histograms_png("out/dist.png", {"real": d_real, "base": d_base}, xlabel="manifold distance")
    spectra_png("out/spectra.png", {"real": p_real, "base": p_base}, freqs)
    write_report("out/report.md", [("Metrics", markdown_table(rows, columns))])

Videos are ``uint8`` or float in ``[-1, 1]`` (see :mod:`shelllcc.evaluation.media`). Image montages are
composed pixel by pixel with Pillow, so their layout is exact and testable (:func:`montage_layout`);
plots use matplotlib's object API on the Agg canvas, leaving pyplot's global state and the process's
backend alone. Labels use Pillow's built-in font (no system fonts needed) and matplotlib's bundled DejaVu.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from shelllcc.evaluation.media import frame_grid, to_uint8, write_gif, write_mp4

Crop = tuple[int, int, int]  # (y, x, size) of a square window, in input pixels

# Fixed colours for the demo's set names, so a variant looks the same in every figure.
_NAMED_COLOURS = {"real": "black", "base": "tab:gray", "control": "tab:blue", "lcc": "tab:orange",
                  "shell_norm": "tab:green", "shell": "tab:red", "shell_band": "tab:purple"}
_SPARE_COLOURS = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "teal", "maroon"]


def _colours(names: Sequence[str]) -> dict[str, str]:
    spare = iter(_SPARE_COLOURS)
    return {n: _NAMED_COLOURS.get(n) or next(spare, None) or "tab:gray" for n in names}


def _replace_into(path: str, write: Callable[[str], None], suffix: str) -> str:
    # write next to the target and rename, so a crash never leaves a truncated file under `path`
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp" + suffix
    write(tmp)
    os.replace(tmp, path)
    return path


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 without sized default font
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _check_rows(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not rows:
        raise ValueError("need at least one variant (rows is empty)")
    out = {}
    for name, v in rows.items():
        v = np.asarray(v)
        if v.ndim != 5:
            raise ValueError(f"variant {name!r}: expected videos [N, T, H, W, C], got shape {v.shape}")
        out[name] = np.stack([to_uint8(x) for x in v]) if v.dtype != np.uint8 else v
        if out[name].shape[-1] == 1:
            out[name] = np.repeat(out[name], 3, axis=-1)
    shapes = {n: v.shape for n, v in out.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all variants must hold the same prompts and video shape; got {shapes}")
    return out


# ----------------------------------------------------------------------------------------------- montage

@dataclasses.dataclass(frozen=True)
class MontageLayout:
    """Pixel geometry of :func:`montage_png`: boxes are ``(top, left, bottom, right)``, bottom/right exclusive.

    Each cell holds the frame (scaled by ``frame_scale``) with the zoomed crop (``crop_size * zoom``
    square) to its right, ``gap`` pixels apart; cells are ``pad`` apart, below a ``header`` band of variant
    names (and a ``title_h`` band), right of a ``label_w`` column of prompt indices.
    """
    n_prompts: int
    n_variants: int
    frame_h: int
    frame_w: int
    crop_size: int
    zoom: int
    frame_scale: int = 2
    pad: int = 6
    gap: int = 2
    header: int = 20
    title_h: int = 0
    label_w: int = 24

    @property
    def cell_w(self) -> int:
        return self.frame_w * self.frame_scale + self.gap + self.crop_size * self.zoom

    @property
    def cell_h(self) -> int:
        return max(self.frame_h * self.frame_scale, self.crop_size * self.zoom)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the image."""
        return (self.title_h + self.header + self.n_prompts * (self.cell_h + self.pad),
                self.label_w + self.pad + self.n_variants * (self.cell_w + self.pad))

    def cell_origin(self, prompt: int, variant: int) -> tuple[int, int]:
        return (self.title_h + self.header + prompt * (self.cell_h + self.pad),
                self.label_w + self.pad + variant * (self.cell_w + self.pad))

    def frame_box(self, prompt: int, variant: int) -> tuple[int, int, int, int]:
        y, x = self.cell_origin(prompt, variant)
        return y, x, y + self.frame_h * self.frame_scale, x + self.frame_w * self.frame_scale

    def crop_box(self, prompt: int, variant: int) -> tuple[int, int, int, int]:
        y, x = self.cell_origin(prompt, variant)
        x += self.frame_w * self.frame_scale + self.gap
        return y, x, y + self.crop_size * self.zoom, x + self.crop_size * self.zoom


def default_crop_size(h: int, w: int, zoom: int, frame_scale: int = 2) -> int:
    """Crop side whose zoomed panel is as tall as the scaled frame (capped by the frame)."""
    return max(1, min(h, w, (min(h, w) * frame_scale) // zoom))


def auto_crop(frame: np.ndarray, size: int) -> Crop:
    """The ``size`` square window of ``frame`` ``[H, W, C]`` with the largest Laplacian energy (sum of
    squared 4-neighbour Laplacian of the luma): where fine texture is, so the zoom shows it. A frame
    without any detail gets the centre window."""
    f = np.asarray(frame, np.float64)
    y = f @ np.array([0.299, 0.587, 0.114]) if f.shape[-1] == 3 else f[..., 0]
    h, w = y.shape
    size = min(size, h, w)
    yp = np.pad(y, 1, mode="edge")  # edge padding: borders get no spurious detail
    lap = yp[:-2, 1:-1] + yp[2:, 1:-1] + yp[1:-1, :-2] + yp[1:-1, 2:] - 4.0 * y
    integral = np.pad(np.cumsum(np.cumsum(lap ** 2, 0), 1), ((1, 0), (1, 0)))
    energy = (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size]
              + integral[:-size, :-size])
    if not energy.max() > 1e-9 * max(1.0, float(np.abs(y).max()) ** 2):
        return (h - size) // 2, (w - size) // 2, size
    iy, ix = np.unravel_index(int(np.argmax(energy)), energy.shape)
    return int(iy), int(ix), size


def montage_png(path: str, rows: Mapping[str, np.ndarray], *, frame_index: int | None = None,
                crop: Crop | Sequence[Crop] | None = None, zoom: int = 4, frame_scale: int = 2,
                title: str | None = None) -> str:
    """One frame of every prompt (rows) for every variant (columns, dict order; put the base first),
    each beside a nearest-neighbour zoom of one window, with variant names as column headers.

    ``rows``: name -> ``[N, T, H, W, 3]`` (same N prompts and shape for all). ``frame_index``: the
    frame shown (default the middle one; negative counts from the end). ``crop``: ``(y, x, size)`` for
    every prompt, a list of one per prompt, or ``None``: per prompt, the :func:`auto_crop` window of the
    first variant's frame, of side :func:`default_crop_size`. The same window is used across variants
    (a fair comparison) and is outlined in red on the frames. Geometry: :class:`MontageLayout`.
    """
    from PIL import Image, ImageDraw

    vids = _check_rows(rows)
    names = list(vids)
    n, t, h, w, _ = vids[names[0]].shape
    fi = t // 2 if frame_index is None else int(frame_index)
    if not -t <= fi < t:
        raise ValueError(f"frame_index {frame_index} is out of range for {t} frames")
    frames = {k: v[:, fi] for k, v in vids.items()}
    zoom, frame_scale = int(zoom), int(frame_scale)
    if zoom < 1 or frame_scale < 1:
        raise ValueError(f"zoom and frame_scale must be >= 1, got {zoom}, {frame_scale}")
    if crop is None:
        size = default_crop_size(h, w, zoom, frame_scale)
        crops = [auto_crop(frames[names[0]][i], size) for i in range(n)]
    elif len(crop) == 3 and all(np.isscalar(c) for c in crop):
        crops = [tuple(int(c) for c in crop)] * n
    else:
        crops = [tuple(int(c) for c in c3) for c3 in crop]
        if len(crops) != n:
            raise ValueError(f"got {len(crops)} crops for {n} prompts")
    if len({c[2] for c in crops}) != 1:
        raise ValueError(f"all crops must have one size, got {crops}")
    for cy, cx, cs in crops:
        if cs < 1 or cy < 0 or cx < 0 or cy + cs > h or cx + cs > w:
            raise ValueError(f"crop (y={cy}, x={cx}, size={cs}) does not fit a {h}x{w} frame")

    lay = MontageLayout(n, len(names), h, w, crops[0][2], zoom, frame_scale, title_h=22 if title else 0)
    canvas = np.full(lay.size + (3,), 255, np.uint8)
    for j, name in enumerate(names):
        for i in range(n):
            img = frames[name][i]
            cy, cx, cs = crops[i]
            t0, l0, b0, r0 = lay.frame_box(i, j)
            canvas[t0:b0, l0:r0] = img.repeat(frame_scale, 0).repeat(frame_scale, 1)
            t1, l1, b1, r1 = lay.crop_box(i, j)
            canvas[t1:b1, l1:r1] = img[cy:cy + cs, cx:cx + cs].repeat(zoom, 0).repeat(zoom, 1)
    im = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(im), _font(12)
    if title:
        draw.text((lay.label_w + lay.pad, 3), _fit_text(draw, title, _font(14), lay.size[1] - 2 * lay.pad),
                  fill=(0, 0, 0), font=_font(14))
    for j, name in enumerate(names):
        _, x = lay.cell_origin(0, j)
        draw.text((x, lay.title_h + 3), _fit_text(draw, name, font, lay.cell_w), fill=(0, 0, 0), font=font)
    for i in range(n):
        y, _ = lay.cell_origin(i, 0)
        draw.text((3, y + 2), str(i), fill=(0, 0, 0), font=font)
        cy, cx, cs = crops[i]
        for j in range(len(names)):
            t0, l0, _, _ = lay.frame_box(i, j)
            s = frame_scale  # the outline is drawn on the scaled frame only, never on the zoom panel
            draw.rectangle((l0 + cx * s, t0 + cy * s, l0 + (cx + cs) * s - 1, t0 + (cy + cs) * s - 1),
                           outline=(255, 0, 0))
    return _replace_into(path, lambda p: im.save(p, format="PNG"), ".png")


def montage_layout(rows: Mapping[str, np.ndarray], *, zoom: int = 4, frame_scale: int = 2,
                   crop_size: int | None = None, title: str | None = None) -> MontageLayout:
    """The :class:`MontageLayout` :func:`montage_png` uses for these inputs (``crop_size`` of explicit crops)."""
    shape = np.shape(next(iter(rows.values())))
    n, _, h, w, _ = shape
    size = default_crop_size(h, w, zoom, frame_scale) if crop_size is None else int(crop_size)
    return MontageLayout(n, len(rows), h, w, size, int(zoom), int(frame_scale), title_h=22 if title else 0)


# ------------------------------------------------------------------------------------------------- video

COMPARISON_HEADER = 20  # pixels of the name band above the columns of :func:`comparison_video`


def comparison_frames(rows: Mapping[str, np.ndarray], *, upscale: int = 2, prompts: Sequence[int] | None = None,
                      pad: int = 4) -> np.ndarray:
    """``uint8 [T, COMPARISON_HEADER + P * H * u + (P - 1) * pad, V * W * u + (V - 1) * pad, 3]``: the
    variants side by side (columns, dict order), the selected prompts stacked (rows), each upscaled
    ``u = upscale`` times by pixel repetition, with the names above the columns on a white band."""
    from PIL import Image, ImageDraw

    vids = _check_rows(rows)
    names = list(vids)
    n = vids[names[0]].shape[0]
    sel = list(range(n)) if prompts is None else [int(p) for p in prompts]
    if not sel or any(not 0 <= p < n for p in sel):
        raise ValueError(f"prompts {prompts} must select among the {n} prompts")
    u = int(upscale)
    if u < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    tiles = [vids[name][p].repeat(u, 1).repeat(u, 2) for p in sel for name in names]
    grid = frame_grid(tiles, ncols=len(names), pad=pad, pad_value=255)
    t, _, width, _ = grid.shape
    band = Image.new("RGB", (width, COMPARISON_HEADER), (255, 255, 255))
    draw, font = ImageDraw.Draw(band), _font(12)
    tile_w = tiles[0].shape[2]
    for j, name in enumerate(names):
        draw.text((j * (tile_w + pad) + 2, 3), _fit_text(draw, name, font, tile_w - 4), fill=(0, 0, 0), font=font)
    header = np.broadcast_to(np.asarray(band)[None], (t,) + np.asarray(band).shape)
    return np.concatenate([header, grid], axis=1)


def comparison_video(path_stem: str, rows: Mapping[str, np.ndarray], *, fps: float, upscale: int = 2,
                     prompts: Sequence[int] | None = None, pad: int = 4) -> tuple[str, str]:
    """Write :func:`comparison_frames` as ``path_stem.mp4`` (H.264) and ``path_stem.gif``; returns both
    paths. The MP4 is padded to even sides if needed (see :func:`~shelllcc.evaluation.media.write_mp4`)."""
    frames = comparison_frames(rows, upscale=upscale, prompts=prompts, pad=pad)
    return write_mp4(path_stem + ".mp4", frames, fps), write_gif(path_stem + ".gif", frames, fps)


# ------------------------------------------------------------------------------------------------- plots

def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    return _replace_into(path, lambda p: fig.savefig(p, format="png", dpi=110), ".png")


def load_metrics(path: str) -> list[dict]:
    """Records of a ``metrics.jsonl`` (one ``{"step": n, key: value, ...}`` object a line, as
    :class:`~shelllcc.training.metric_writers.JsonlWriter` writes). A malformed *last* line is dropped
    (a writer may be mid-append); a malformed line elsewhere raises ``ValueError`` naming file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    with open(path) as f:
        lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
    out = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: malformed metrics line ({e}): {line[:80]!r}") from None
        out.append(rec)
    return out


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    # a resumed run appends steps it already logged: the later value wins, and steps are sorted
    by_step: dict[float, float] = {}
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[float(r.get("step", i))] = float(v)
    steps = np.array(sorted(by_step), np.float64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def training_curves_png(path: str, runs: Mapping[str, str | Sequence[Mapping]], metrics: Sequence[str] | None = None,
                        *, title: str | None = None) -> str:
    """One subplot per metric (x: step; one line per run). ``runs``: name -> ``metrics.jsonl`` path or
    its parsed records. ``metrics``: default the keys every run logs (else any run logs), ``step``
    excluded. A run lacking a metric is left out of that subplot; a metric no run has is dropped. The y
    axis is logarithmic where every value is positive and they span more than two decades."""
    recs = {name: load_metrics(r) if isinstance(r, (str, os.PathLike)) else list(r) for name, r in runs.items()}
    keysets = [[k for rec in rs for k in rec if k != "step"] for rs in recs.values()]
    if metrics is None:
        ordered = list(dict.fromkeys(k for ks in keysets for k in ks))
        common = [k for k in ordered if all(k in ks for ks in keysets)]
        metrics = common or ordered
    data = {m: {name: _series(rs, m) for name, rs in recs.items()} for m in metrics}
    data = {m: {n: s for n, s in d.items() if s[0].size} for m, d in data.items()}
    data = {m: d for m, d in data.items() if d}
    colours = _colours(list(recs))
    ncols = min(3, max(1, len(data)))
    nrows = max(1, math.ceil(len(data) / ncols))
    fig = _figure(nrows, ncols, (4.5, 3.2))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (metric, series) in zip(axes, data.items()):
        for name, (x, y) in series.items():
            ax.plot(x, y, label=name, color=colours[name], lw=1.2, marker="." if x.size < 20 else None)
        vals = np.concatenate([y[np.isfinite(y)] for _, y in series.values()])
        if vals.size and vals.min() > 0 and vals.max() / vals.min() > 100:
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(data):]:
        ax.axis("off")
    if not data:
        axes[0].text(0.5, 0.5, "no metrics to plot", ha="center", va="center", transform=axes[0].transAxes)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def trajectories_png(path: str, runs: Mapping[str, Mapping[int, Sequence[Mapping]]], metrics: Sequence[str], *,
                     picks: Mapping[str, Mapping[int, int]] | None = None,
                     references: Mapping[str, float] | None = None, title: str | None = None) -> str:
    """Validation metrics against fine-tuning step: one subplot per metric, one colour per variant.

    ``runs``: variant -> seed -> rows (dicts with ``step`` and the metrics; step 0 is the base). Each seed
    is a thin line; with several seeds their mean is a thick one. ``picks``: variant -> seed -> the picked
    step, drawn as a marker on that seed's line. ``references``: metric -> a horizontal dashed line (e.g.
    1 for a ratio, the collapse threshold for the accuracy).
    """
    colours = _colours(list(runs))
    ncols = min(3, max(1, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = _figure(nrows, ncols, (4.6, 3.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for name, by_seed in runs.items():
            lines = []
            for seed, rows in sorted(by_seed.items()):
                pts = sorted((float(r["step"]), float(r[metric])) for r in rows if metric in r)
                if not pts:
                    continue
                x, y = np.array(pts).T
                lines.append((x, y))
                many = len(by_seed) > 1
                ax.plot(x, y, color=colours[name], lw=0.8 if many else 1.4, alpha=0.45 if many else 1.0,
                        marker="." if x.size < 30 and not many else None, label=None if many else name)
                step = (picks or {}).get(name, {}).get(seed)
                if step is not None and step in x:
                    ax.plot([step], [y[list(x).index(step)]], marker="*", ms=11, color=colours[name],
                            markeredgecolor="black", lw=0)
            if len(lines) > 1 and all(np.array_equal(lines[0][0], lx) for lx, _ in lines):
                ax.plot(lines[0][0], np.mean([ly for _, ly in lines], axis=0), color=colours[name], lw=1.8,
                        label=f"{name} (mean of {len(lines)} seeds)")
        if references and metric in references:
            ax.axhline(references[metric], color="black", ls="--", lw=0.8)
        ax.set_title(metric)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def histograms_png(path: str, samples: Mapping[str, np.ndarray], *, xlabel: str, bins: int = 40,
                   title: str | None = None) -> str:
    """Overlaid step histograms (density) of per-clip values, one per set, on bins shared by all sets
    (spanning every finite value); the legend gives each set's mean and count. Non-finite values are
    left out (and counted in the legend)."""
    vals = {k: np.asarray(v, np.float64).ravel() for k, v in samples.items()}
    finite = {k: v[np.isfinite(v)] for k, v in vals.items()}
    pooled = np.concatenate(list(finite.values())) if finite else np.zeros(0)
    lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, int(bins) + 1)
    colours = _colours(list(vals))
    fig = _figure(1, 1, (6.0, 4.0))
    ax = fig.add_subplot()
    for name, v in finite.items():
        dropped = vals[name].size - v.size
        label = f"{name} (mean {v.mean():.4g}, n={v.size}" if v.size else f"{name} (n=0"
        label += f", {dropped} non-finite)" if dropped else ")"
        if v.size:
            ax.hist(v, bins=edges, density=True, histtype="step", lw=1.5, color=colours[name], label=label)
        else:
            ax.plot([], [], color=colours[name], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def spectra_png(path: str, spectra: Mapping[str, np.ndarray], freqs: np.ndarray, *,
                title: str | None = "Radially averaged power spectrum") -> str:
    """Radial power spectra on a log y axis, one line per set. ``spectra``: name -> ``[R]`` or ``[N, R]``
    (averaged over N), ``freqs``: ``[R]`` in cycles/pixel (e.g. ``arange(R) / min(H, W)`` for
    :func:`~shelllcc.evaluation.detail.radial_power_spectrum`). Non-positive bins (the removed DC) are
    not drawn."""
    freqs = np.asarray(freqs, np.float64).ravel()
    colours = _colours(list(spectra))
    fig = _figure(1, 1, (6.0, 4.0))
    ax = fig.add_subplot()
    for name, s in spectra.items():
        s = np.asarray(s, np.float64)
        s = s.reshape(-1, s.shape[-1]).mean(0)
        if s.shape != freqs.shape:
            raise ValueError(f"spectrum {name!r} has {s.size} bins, freqs has {freqs.size}")
        ax.plot(freqs, np.where(s > 0, s, np.nan), label=name, color=colours[name], lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("power")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- markdown

MISSING = "—"

Fmt = str | Callable[[object], str] | None


def _cell(value, fmt: Fmt) -> str:
    if value is None:
        return MISSING
    if callable(fmt):
        text = fmt(value)
    elif fmt is None or isinstance(value, str):
        text = str(value)
    else:
        text = fmt.format(value) if "{" in fmt else format(value, fmt)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str, Fmt]]) -> str:
    """A GitHub-flavoured markdown table: one line per row, ``columns`` = ``(key, header, fmt)`` with
    ``fmt`` a format spec (``".3f"``), a template (``"{:.1%}"``), a callable, or ``None`` (``str``;
    left-aligned, the others right-aligned). Absent keys and ``None`` show as ``—``. No trailing newline."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if f is None else "---:" for _, _, f in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule] + body)


def write_report(path: str, sections: Sequence[tuple[str, str]], *, title: str | None = None) -> str:
    """Write a markdown file: optional ``# title``, then ``## section title`` and its text for each
    section. Relative image links in the texts resolve against the report's folder."""
    parts = [f"# {title}\n"] if title else []
    parts += [f"## {name}\n\n{text.strip()}\n" for name, text in sections]
    doc = "\n".join(parts)

    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(doc)

    return _replace_into(path, write, ".md")


__all__ = ["MontageLayout", "montage_layout", "auto_crop", "default_crop_size", "montage_png", "comparison_frames",
           "comparison_video", "COMPARISON_HEADER", "load_metrics", "training_curves_png", "trajectories_png", "histograms_png",
           "spectra_png", "markdown_table", "write_report", "MISSING"]
