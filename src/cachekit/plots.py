"""Small PNG/GIF figures drawn with Pillow alone (no matplotlib): an x-y chart, a recompute
heatmap and a recompute overlay on a video.

Used by :mod:`cachekit.bench`; kept generic so a plugin's own benchmarks can reuse them.
Values are drawn, never interpolated or smoothed. Infinite y values (PSNR of identical videos)
are drawn in a band above the plot area labelled ``inf``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Series", "Marker", "nice_ticks", "xy_plot", "colormap", "recompute_heatmap",
           "recompute_overlay_gif", "PALETTE"]

#: Distinguishable line colours (the "tab10" palette).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# Viridis, sampled at 9 points (perceptually uniform, legible in grey).
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                     (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], float)
_BLACK, _GREY, _LIGHT, _WHITE = (0, 0, 0), (110, 110, 110), (225, 225, 225), (255, 255, 255)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError, ValueError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[float, float]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _as_tuple(value: Any) -> tuple:
    return tuple(value)


@attrs.frozen
class Series:
    """One curve: points ``(x, y)`` joined in the given order (``line=False``: points only)."""

    name: str
    points: tuple = attrs.field(converter=_as_tuple)
    color: tuple = (31, 119, 180)
    line: bool = True
    labels: tuple = attrs.field(default=(), converter=_as_tuple)  # optional text per point


@attrs.frozen
class Marker:
    """A single highlighted point (e.g. the uncached reference): a star with a label."""

    x: float
    y: float
    label: str
    color: tuple = (0, 0, 0)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, color: tuple) -> None:
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    draw.polygon(pts, fill=color, outline=_BLACK)


def xy_plot(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str,
            ylabel: str, markers: Sequence[Marker] = (), notes: Sequence[str] = (),
            width: int = 960, height: int = 640, x_min: Optional[float] = None,
            y_min: Optional[float] = None) -> Path:
    """Write a PNG chart of ``series`` (lines with round points) and ``markers`` (stars).

    Infinite y values are placed in a band above the plot area labelled ``inf``; NaN points
    are skipped. ``notes`` are printed under the x label, one per line.
    """
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    f_title, f_lab, f_tick = _font(20), _font(15), _font(13)
    pts_all = [(x, y) for s in series for x, y in s.points] + [(m.x, m.y) for m in markers]
    xs = [x for x, y in pts_all if math.isfinite(x) and not math.isnan(y)]
    ys = [y for _, y in pts_all if math.isfinite(y)]
    has_inf = any(y == math.inf for _, y in pts_all)
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x_min is not None:
        x_lo = min(x_lo, x_min)
    if y_min is not None:
        y_lo = min(y_lo, y_min)
    span_x = (x_hi - x_lo) or max(abs(x_hi), 1.0)
    span_y = (y_hi - y_lo) or max(abs(y_hi), 1.0)
    x_lo, x_hi = x_lo - 0.08 * span_x, x_hi + 0.08 * span_x
    y_lo, y_hi = y_lo - 0.08 * span_y, y_hi + 0.08 * span_y

    legend_w = 30 + int(max([_text_size(draw, s.name, f_lab)[0] for s in series] +
                        [_text_size(draw, m.label, f_lab)[0] for m in markers] + [40]))
    left, right = 80, width - legend_w - 30
    top = 50 + (40 if has_inf else 0)
    bottom = height - 70 - 18 * len(notes)
    inf_y = 50 + 18  # centre of the inf band

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        if y == math.inf:
            return inf_y
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    # grid, ticks, axes
    for t in nice_ticks(x_lo, x_hi, 6):
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=_LIGHT)
        lab = _fmt_tick(t)
        w, _ = _text_size(draw, lab, f_tick)
        draw.text((x - w / 2, bottom + 6), lab, fill=_BLACK, font=f_tick)
    for t in nice_ticks(y_lo, y_hi, 6):
        y = py(t)
        draw.line([(left, y), (right, y)], fill=_LIGHT)
        lab = _fmt_tick(t)
        w, h = _text_size(draw, lab, f_tick)
        draw.text((left - w - 8, y - h / 2 - 2), lab, fill=_BLACK, font=f_tick)
    draw.rectangle([left, top, right, bottom], outline=_BLACK)
    if has_inf:
        for x in range(left, right, 12):
            draw.line([(x, top - 10), (x + 6, top - 10)], fill=_GREY)
        w, h = _text_size(draw, "inf", f_tick)
        draw.text((left - w - 8, inf_y - h / 2 - 2), "inf", fill=_BLACK, font=f_tick)

    w, _ = _text_size(draw, title, f_title)
    draw.text(((left + right) / 2 - w / 2, 12), title, fill=_BLACK, font=f_title)
    w, _ = _text_size(draw, xlabel, f_lab)
    draw.text(((left + right) / 2 - w / 2, bottom + 28), xlabel, fill=_BLACK, font=f_lab)
    for i, note in enumerate(notes):
        draw.text((left, bottom + 50 + 18 * i), note, fill=_GREY, font=f_tick)
    # the y label, rotated
    lw, lh = _text_size(draw, ylabel, f_lab)
    lab_img = Image.new("RGBA", (int(lw) + 4, int(lh) + 8), (255, 255, 255, 0))
    ImageDraw.Draw(lab_img).text((2, 0), ylabel, fill=_BLACK, font=f_lab)
    lab_img = lab_img.rotate(90, expand=True)
    img.paste(lab_img, (8, int((top + bottom) / 2 - lab_img.size[1] / 2)), lab_img)

    # data
    for s in series:
        pts = [(px(x), py(y)) for x, y in s.points if math.isfinite(x) and not math.isnan(y)]
        if s.line and len(pts) > 1:
            draw.line(pts, fill=s.color, width=3)
        for (x, y) in pts:
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=s.color, outline=_BLACK)
        for (x, y), lab in zip(pts, s.labels):
            if lab:
                draw.text((x + 7, y - 16), str(lab), fill=s.color, font=f_tick)
    for m in markers:
        if not (math.isfinite(m.x) and not math.isnan(m.y)):
            continue
        x, y = px(m.x), py(m.y)
        _star(draw, x, y, 10, m.color)

    # legend
    lx, ly = right + 20, top
    for s in series:
        draw.line([(lx, ly + 9), (lx + 22, ly + 9)], fill=s.color, width=3)
        draw.ellipse([lx + 6, ly + 4, lx + 16, ly + 14], fill=s.color, outline=_BLACK)
        draw.text((lx + 28, ly), s.name, fill=_BLACK, font=f_lab)
        ly += 24
    for m in markers:
        _star(draw, lx + 11, ly + 9, 8, m.color)
        draw.text((lx + 28, ly), m.label, fill=_BLACK, font=f_lab)
        ly += 24

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours ``[..., 3]`` uint8 for values in ``[0, 1]`` (clipped)."""
    v = np.clip(np.asarray(values, dtype=float), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    t = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - t) + _VIRIDIS[hi] * t + 0.5).astype(np.uint8)


def recompute_heatmap(path: str | Path, freq: np.ndarray, *, title: str,
                      subtitle: str = "", calls: Optional[Sequence[int]] = None) -> Path:
    """Write a PNG of recompute frequencies ``freq`` ``[chunks, frames, Ht, Wt]`` in [0, 1].

    One row of panels per chunk, one panel per frame of the chunk showing its token grid;
    the row's mean is printed on the right (with ``calls``, the number of calls it averages).
    """
    freq = np.asarray(freq, dtype=float)
    if freq.ndim != 4:
        raise ValueError(f"freq: expected [chunks, frames, Ht, Wt], got shape {freq.shape}")
    g, f, ht, wt = freq.shape
    s = max(3, min(24, 96 // max(ht, wt, 1)))       # pixels per token
    cw, ch = wt * s, ht * s
    gap = 6
    f_title, f_lab = _font(18), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = _text_size(probe, f"chunk {g - 1}", f_lab)[0] + 16
    stats_w = 170
    bar_w = 70
    grid_w = f * (cw + gap)
    width = max(label_w + grid_w + stats_w + bar_w + 20,
                _text_size(probe, title, f_title)[0] + 40,
                _text_size(probe, subtitle, f_lab)[0] + 40)
    top = 60 + 22
    height = max(top + g * (ch + gap) + 30, top + 160)
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((16, 10), title, fill=_BLACK, font=f_title)
    if subtitle:
        draw.text((16, 36), subtitle, fill=_GREY, font=f_lab)
    for j in range(f):
        draw.text((label_w + j * (cw + gap), top - 20), f"frame {j}", fill=_BLACK, font=f_lab)
    for i in range(g):
        y = top + i * (ch + gap)
        draw.text((8, y + ch / 2 - 8), f"chunk {i}", fill=_BLACK, font=f_lab)
        for j in range(f):
            tile = colormap(freq[i, j]).repeat(s, axis=0).repeat(s, axis=1)
            img.paste(Image.fromarray(tile), (label_w + j * (cw + gap), y))
        mean = float(freq[i].mean()) if freq[i].size else float("nan")
        text = f"mean {mean:.2f}" + (f"  ({calls[i]} calls)" if calls is not None else "")
        draw.text((label_w + grid_w + 4, y + ch / 2 - 8), text, fill=_BLACK, font=f_lab)
    # colour bar
    bx, by, bh = label_w + grid_w + stats_w + 5, top, max(100, min(g * (ch + gap) - gap, 300))
    ramp = colormap(np.linspace(1, 0, bh))[:, None, :].repeat(16, axis=1)
    img.paste(Image.fromarray(ramp), (bx, by))
    draw.rectangle([bx, by, bx + 16, by + bh - 1], outline=_BLACK)
    for v in (0.0, 0.5, 1.0):
        yy = by + (1 - v) * (bh - 1)
        draw.line([(bx + 16, yy), (bx + 20, yy)], fill=_BLACK)
        draw.text((bx + 22, yy - 8), f"{v:g}", fill=_BLACK, font=f_lab)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def recompute_overlay_gif(path: str | Path, frames: np.ndarray, freq: np.ndarray, *,
                          upscale: int = 4, fps: int = 8, strength: float = 0.6) -> Path:
    """An animated GIF of ``frames`` ``[F, H, W, 3]`` (in [0, 1]) tinted red where tokens were
    recomputed often: ``freq`` ``[F, H, W]`` in [0, 1] (per pixel), side by side with the
    plain video."""
    frames = np.clip(np.asarray(frames, dtype=float), 0, 1)
    freq = np.clip(np.asarray(freq, dtype=float), 0, 1)
    if freq.shape != frames.shape[:3]:
        raise ValueError(f"freq: expected shape {frames.shape[:3]}, got {freq.shape}")
    a = (strength * freq)[..., None]
    tinted = frames * (1 - a) + np.array([1.0, 0.0, 0.0]) * a
    both = np.concatenate([frames, np.ones_like(frames[:, :, :1]), tinted], axis=2)
    img = (both * 255 + 0.5).astype(np.uint8).repeat(upscale, axis=1).repeat(upscale, axis=2)
    pil = [Image.fromarray(f) for f in img]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0)
    return path
