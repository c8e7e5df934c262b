"""Synthetic conditional videos for the bundled reference model (numpy only, deterministic).

A video is one anti-aliased sprite over a low-contrast textured background, shape
``[F, H, W, 3]`` float32 in ``[0, 1]``. What is drawn is named by a :class:`Condition`, a
frozen value with one discrete value per attribute:

* ``shape``: the sprite's outline (square, circle, triangle, diamond, cross);
* ``color``: one of six saturated sprite colours;
* ``motion``: ``static`` (nothing moves at all), ``slow`` / ``fast`` (the sprite moves with a
  constant velocity and bounces off the borders; the background stays put) or ``pan`` (the
  whole scene, background and sprite together, translates: a camera pan);
* ``background``: a periodic texture (stripes, checker, gradient, soft noise). Textures are
  periodic on the frame so that a pan never runs out of background;
* ``tint``: a global colour cast of the background (neutral, warm, cool).

Everything is rendered analytically in continuous coordinates (signed distance functions for
the sprite, sinusoids for the textures), so sub-pixel motion is smooth and a seed fixes the
video exactly. ``make_video`` also returns ground truth for motion estimators: the per-frame
sprite centre, its velocity in pixels per frame and a per-frame sprite mask.

Condition strings round-trip: ``Condition.parse(str(c)) == c`` with the format
``"shape=circle,color=red,motion=fast,background=stripes,tint=neutral"``.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from cachekit.errors import ConfigError, invalid_value

__all__ = ["ATTRIBUTES", "Condition", "sample_condition", "make_video", "COLORS"]

#: The attributes of a condition and their allowed values, in a fixed order. The order is part
#: of the model's condition embedding (``Condition.ids``): append, never reorder.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("square", "circle", "triangle", "diamond", "cross"),
    "color": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "motion": ("static", "slow", "fast", "pan"),
    "background": ("stripes", "checker", "gradient", "noise"),
    "tint": ("neutral", "warm", "cool"),
}

#: Saturated sprite colours (RGB in [0, 1]); the backgrounds stay in a mid-grey band so that
#: every colour stands out.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.80, 0.18),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.98, 0.88, 0.08),
    "magenta": (0.90, 0.10, 0.85),
    "cyan": (0.05, 0.88, 0.92),
}

#: Background colour cast per tint (multiplies the grey texture).
_TINTS: dict[str, tuple[float, float, float]] = {
    "neutral": (1.0, 1.0, 1.0),
    "warm": (1.12, 0.98, 0.82),
    "cool": (0.84, 0.97, 1.14),
}

# Speeds in pixels per frame for a 32-pixel frame; scaled with the frame size so that a motion
# class looks the same at any resolution. Ranges do not overlap: slow < fast.
_SPEED_RANGE = {"static": (0.0, 0.0), "slow": (0.35, 0.7), "fast": (1.3, 2.0), "pan": (0.5, 0.9)}
_REF_SIZE = 32.0
# Background: mean grey level and texture amplitude (low contrast so the sprite stands out).
_BG_MEAN = (0.38, 0.58)
_BG_AMPLITUDE = (0.06, 0.12)
# Sprite radius as a fraction of the smaller frame side.
_RADIUS_FRACTION = (0.13, 0.19)


def _attr_validator(name: str):
    allowed = ATTRIBUTES[name]

    def check(_inst, _attr, value):
        if value not in allowed:
            raise ConfigError(invalid_value(
                f"Condition.{name}", f"one of {', '.join(allowed)}", value,
                f"Pick a {name} from that list (see cachekit_models.synthetic.ATTRIBUTES)."))
    return check


@attrs.frozen
class Condition:
    """What one synthetic video shows: one discrete value per attribute (see ``ATTRIBUTES``).

    Defaults give a valid condition, so ``Condition.parse`` accepts partial strings; the
    unnamed attributes keep their defaults.
    """

    shape: str = attrs.field(default="circle", validator=_attr_validator("shape"))
    color: str = attrs.field(default="red", validator=_attr_validator("color"))
    motion: str = attrs.field(default="slow", validator=_attr_validator("motion"))
    background: str = attrs.field(default="stripes", validator=_attr_validator("background"))
    tint: str = attrs.field(default="neutral", validator=_attr_validator("tint"))

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k)}" for k in ATTRIBUTES)

    @classmethod
    def parse(cls, text: str) -> "Condition":
        """Parse ``"key=value,key=value"`` (any order, spaces ignored, unnamed keys default)."""
        if not isinstance(text, str):
            raise ConfigError(invalid_value("condition", "a string like 'shape=circle,color=red'",
                                            text))
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep:
                raise ConfigError(invalid_value(
                    "condition", "comma-separated key=value pairs", text,
                    "Write e.g. 'shape=circle,color=red,motion=fast,background=stripes'."))
            if key not in ATTRIBUTES:
                raise ConfigError(invalid_value(
                    "condition attribute", f"one of {', '.join(ATTRIBUTES)}", key))
            if key in values:
                raise ConfigError(invalid_value(
                    f"condition attribute {key!r}", "at most one value", text))
            values[key] = value
        return cls(**values)

    def ids(self) -> tuple[int, ...]:
        """Index of each attribute's value in ``ATTRIBUTES`` (attribute order), for embeddings."""
        return tuple(ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES)

    @classmethod
    def from_ids(cls, ids: tuple[int, ...]) -> "Condition":
        """Inverse of :meth:`ids`."""
        if len(ids) != len(ATTRIBUTES):
            raise ConfigError(invalid_value("Condition ids", f"{len(ATTRIBUTES)} ints", ids))
        return cls(**{k: ATTRIBUTES[k][int(i)] for k, i in zip(ATTRIBUTES, ids)})


def sample_condition(rng: np.random.Generator | int) -> Condition:
    """A uniformly random condition (each attribute independently)."""
    rng = np.random.default_rng(rng)
    return Condition(**{k: v[int(rng.integers(len(v)))] for k, v in ATTRIBUTES.items()})


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _sprite_sdf(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a sprite of radius ``r`` centred at 0."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        s = 0.85 * r  # same visual area as the circle, roughly
        qx, qy = ax - s, ay - s
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    if shape == "diamond":
        return (ax + ay - 1.2 * r) / np.sqrt(2.0)
    if shape == "cross":
        arm, half = 1.05 * r, 0.38 * r
        bar1 = np.maximum(ax - arm, ay - half)
        bar2 = np.maximum(ax - half, ay - arm)
        return np.minimum(bar1, bar2)
    if shape == "triangle":
        # Upward equilateral triangle: the max of its edge half-plane distances (a bound on
        # the true SDF that is exact near the edges, which is all the anti-aliasing needs).
        k = np.sqrt(3.0)
        y = dy - 0.2 * r  # shift down so the triangle's area is centred on the position
        return np.maximum((k * ax - y) / 2.0 - 0.55 * r, y - 0.55 * r)
    raise ConfigError(invalid_value("shape", f"one of {ATTRIBUTES['shape']}", shape))


def _background(kind: str, rng: np.random.Generator, height: int, width: int):
    """Return ``f(yy, xx) -> [.., ]`` grey texture in [0,1], periodic over (height, width)."""
    mean = rng.uniform(*_BG_MEAN)
    amp = rng.uniform(*_BG_AMPLITUDE)
    two_pi = 2.0 * np.pi
    if kind == "stripes":
        # Integer wave numbers keep the texture periodic on the frame (needed for pans).
        ky, kx = int(rng.integers(0, 4)), int(rng.integers(2, 6))
        if rng.random() < 0.5:
            ky, kx = kx, ky
        phase = rng.uniform(0, two_pi)
        return lambda yy, xx: mean + amp * np.sin(two_pi * (ky * yy / height + kx * xx / width)
                                                  + phase)
    if kind == "checker":
        n = int(rng.integers(2, 5))
        phase = rng.uniform(0, two_pi, size=2)
        # tanh-softened product of sines: a checkerboard without aliasing
        return lambda yy, xx: mean + amp * np.tanh(3.0 * np.sin(two_pi * n * yy / height + phase[0])
                                                  * np.sin(two_pi * n * xx / width + phase[1]))
    if kind == "gradient":
        # One period over the frame along an axis or diagonal: a smooth light-to-dark ramp
        # that still tiles (wave numbers must be integers).
        ky, kx = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(4))]
        phase = rng.uniform(0, two_pi)
        return lambda yy, xx: mean + 1.4 * amp * np.cos(two_pi * (ky * yy / height + kx * xx / width)
                                                        + phase)
    if kind == "noise":
        # sum of a few random low-frequency periodic waves: soft "cloudy" noise
        n_waves = 6
        ks = rng.integers(-3, 4, size=(n_waves, 2))
        ks[np.all(ks == 0, axis=1)] = (1, 0)
        phases = rng.uniform(0, two_pi, size=n_waves)
        weights = rng.uniform(0.5, 1.0, size=n_waves)
        weights /= weights.sum()

        def f(yy, xx):
            acc = 0.0
            for (ky, kx), ph, w in zip(ks, phases, weights):
                acc = acc + w * np.sin(two_pi * (ky * yy / height + kx * xx / width) + ph)
            return mean + 2.0 * amp * acc
        return f
    raise ConfigError(invalid_value("background", f"one of {ATTRIBUTES['background']}", kind))


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float):
    """Position and velocity at times ``t`` of a point moving at ``v`` reflected in [lo, hi]."""
    span = hi - lo
    if span <= 0 or v == 0:
        return np.full(t.shape, p0 if span > 0 else (lo + hi) / 2), np.zeros(t.shape)
    u = np.mod(p0 - lo + v * t, 2 * span)      # unfolded coordinate on a 2*span circle
    forward = u <= span
    pos = lo + np.where(forward, u, 2 * span - u)
    vel = np.where(forward, v, -v)
    return pos, vel


def make_video(cond: Condition, seed: int, frames: int = 16, height: int = 32,
               width: int = 32) -> tuple[np.ndarray, dict[str, Any]]:
    """Render the video of ``cond`` for ``seed``.

    Returns ``(video, meta)``: ``video`` ``[F, H, W, 3]`` float32 in [0, 1]; ``meta`` holds
    ``position`` ``[F, 2]`` (sprite centre, (y, x) pixels, image coordinates), ``velocity``
    ``[F, 2]`` (pixels per frame, (y, x); the sprite's motion in the image, which for a pan is
    the pan velocity), ``mask`` ``[F, H, W]`` bool (sprite coverage >= 0.5), ``pan`` ``[2]``
    (scene velocity in px/frame, zero unless ``motion == 'pan'``), ``radius`` and ``condition``.
    A pan wraps the scene around the frame (textures are periodic; a sprite leaving one side
    comes back on the other).
    """
    if not isinstance(cond, Condition):
        raise ConfigError(invalid_value("cond", "a synthetic.Condition", cond))
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not (isinstance(v, (int, np.integer)) and v >= 1):
            raise ConfigError(invalid_value(name, "an int >= 1", v))
    rng = np.random.default_rng(seed)
    size = float(min(height, width))
    scale = size / _REF_SIZE
    radius = rng.uniform(*_RADIUS_FRACTION) * size

    texture = _background(cond.background, rng, height, width)
    tint = np.asarray(_TINTS[cond.tint], dtype=np.float64)
    color = np.asarray(COLORS[cond.color], dtype=np.float64)

    t = np.arange(frames, dtype=np.float64)
    lo_y, hi_y = radius, height - radius
    lo_x, hi_x = radius, width - radius
    p0 = np.array([rng.uniform(lo_y, hi_y), rng.uniform(lo_x, hi_x)])
    speed = rng.uniform(*_SPEED_RANGE[cond.motion]) * scale
    angle = rng.uniform(0, 2 * np.pi)
    v = speed * np.array([np.sin(angle), np.cos(angle)])

    pan = np.zeros(2)
    if cond.motion in ("slow", "fast"):
        py, vy = _bounce(p0[0], v[0], t, lo_y, hi_y)
        px, vx = _bounce(p0[1], v[1], t, lo_x, hi_x)
        position = np.stack([py, px], axis=1)
        velocity = np.stack([vy, vx], axis=1)
    elif cond.motion == "pan":
        pan = v
        position = np.mod(p0[None, :] + t[:, None] * pan[None, :], [height, width])
        velocity = np.repeat(pan[None, :], frames, axis=0)
    else:  # static
        position = np.repeat(p0[None, :], frames, axis=0)
        velocity = np.zeros((frames, 2))

    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64),
                         np.arange(width, dtype=np.float64), indexing="ij")
    video = np.empty((frames, height, width, 3), dtype=np.float32)
    mask = np.empty((frames, height, width), dtype=bool)
    for f in range(frames):
        # Background in scene coordinates: a pan samples the texture at a moving offset.
        grey = texture(yy - pan[0] * f, xx - pan[1] * f)
        bg = np.clip(grey[..., None] * tint[None, None, :], 0.0, 1.0)
        dy = yy - position[f, 0]
        dx = xx - position[f, 1]
        if cond.motion == "pan":  # shortest displacement on the torus (the scene wraps)
            dy = (dy + height / 2) % height - height / 2
            dx = (dx + width / 2) % width - width / 2
        sdf = _sprite_sdf(cond.shape, dy, dx, radius)
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)  # one-pixel anti-aliased edge
        video[f] = (bg * (1 - alpha[..., None]) + color * alpha[..., None]).astype(np.float32)
        mask[f] = alpha >= 0.5
    meta = {
        "position": position.astype(np.float32),
        "velocity": velocity.astype(np.float32),
        "mask": mask,
        "pan": pan.astype(np.float32),
        "radius": float(radius),
        "condition": cond,
    }
    return video, meta
