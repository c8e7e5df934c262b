"""Reading and writing videos, contact sheets and arrays.

Videos are float arrays ``[F, H, W, 3]`` in ``[0, 1]`` (RGB). ``.npy`` keeps them exactly (for
comparisons); ``.mp4`` needs the ``video`` extra (imageio + PyAV) and is lossy; ``.gif`` is
written with Pillow alone. :func:`save_video` picks mp4 when it can and says which it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, invalid_value

__all__ = ["save_video", "load_video", "contact_sheet", "has_video_extra", "to_uint8"]


def has_video_extra() -> bool:
    """True when imageio and PyAV are importable (the ``video`` extra)."""
    try:
        import av  # noqa: F401
        import imageio  # noqa: F401
    except ImportError:
        return False
    return True


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(invalid_value(name, "an array [F, H, W, 3]", frames.shape))
    if not np.isfinite(frames).all():
        raise ConfigError(invalid_value(name, "finite values", "NaN or Inf"))
    return frames


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats to ``uint8`` (clipped, rounded)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_video(frames: np.ndarray, path: str | Path, *, fps: int = 8, upscale: int = 1) -> Path:
    """Write ``frames`` ``[F, H, W, 3]`` in [0, 1] to ``path``.

    The suffix chooses the format: ``.npy`` (exact float32), ``.mp4`` (video extra), ``.gif``.
    Passing ``.mp4`` without the video extra writes ``.gif`` next to it instead and returns
    that path. ``upscale`` repeats pixels (small videos are hard to see).
    """
    frames = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, frames.astype(np.float32))
        return path
    img = to_uint8(frames)
    if upscale > 1:
        img = img.repeat(upscale, axis=1).repeat(upscale, axis=2)
    if path.suffix == ".mp4" and has_video_extra():
        import imageio.v3 as iio

        # yuv420p needs even sizes
        h, w = img.shape[1:3]
        img = np.pad(img, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        iio.imwrite(path, img, fps=fps, codec="libx264", plugin="pyav")
        return path
    if path.suffix == ".mp4":
        path = path.with_suffix(".gif")
    if path.suffix != ".gif":
        raise ConfigError(invalid_value("video path", "a .npy, .mp4 or .gif file", str(path)))
    from PIL import Image

    pil = [Image.fromarray(f) for f in img]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0)
    return path


def load_video(path: str | Path) -> np.ndarray:
    """Read ``[F, H, W, 3]`` float32 in [0, 1] from ``.npy``, ``.gif`` or a video file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(invalid_value("video path", "an existing file", str(path)))
    if path.suffix == ".npy":
        arr = np.load(path)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        return _check_frames(arr.astype(np.float32), str(path))
    if path.suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            arr = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        return arr.astype(np.float32) / 255.0
    if not has_video_extra():
        raise ConfigError(f"reading {path.suffix} files needs the video extra: "
                          f"pip install 'cachekit[video]' (or convert to .npy)")
    import imageio.v3 as iio

    arr = iio.imread(path, plugin="pyav")
    return _check_frames(arr.astype(np.float32) / 255.0, str(path))


def contact_sheet(rows: Sequence[np.ndarray], path: str | Path, *, upscale: int = 4,
                  gap: int = 2, labels: Sequence[str] | None = None) -> Path:
    """Save a PNG grid: one row per video ``[F, H, W, 3]``, one column per frame."""
    from PIL import Image, ImageDraw

    rows = [_check_frames(r) for r in rows]
    if not rows:
        raise ConfigError(invalid_value("rows", "at least one video", 0))
    f = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1] * upscale, rows[0].shape[2] * upscale
    label_w = 0 if not labels else 8 * max(len(s) for s in labels) + 8
    sheet = Image.new("RGB", (label_w + f * (w + gap) + gap, len(rows) * (h + gap) + gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, video in enumerate(rows):
        img = to_uint8(video).repeat(upscale, axis=1).repeat(upscale, axis=2)
        y = gap + i * (h + gap)
        if labels:
            draw.text((4, y + h // 2 - 6), labels[i], fill=(0, 0, 0))
        for j, frame in enumerate(img):
            sheet.paste(Image.fromarray(frame), (label_w + gap + j * (w + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
