"""Pure tensor functions behind the reuse policies' indicators and the motion estimators.

Nothing here keeps state or knows about branches, chunks or the engine: every function maps
tensors to tensors (or a float), so each can be tested against a hand transcription of
``reference/algorithms.md``. Policies and estimators (``cachekit_policies``) compose them.

Indicator (§2)
    :func:`rel_l1` (relative L1 drift of a signal between two steps) and :func:`poly_rescale`
    (the TeaCache polynomial, highest degree first).
Motion maps (§5.5, §6.2)
    Per-token "how much does this token move" maps ``D`` of shape ``[F, HW]`` (frame-major,
    ``HW`` = tokens per frame), later normalised per frame by :func:`normalize_weights`:

    * :func:`frame_diff_map` / :func:`frame_diff_weights`: relative inter-frame difference of a
      chunk's output hidden states (MotionCache-SkyReels);
    * :func:`latent_diff_map`: absolute inter-frame difference of the latent, channel-mean,
      average-pooled to the token grid (MotionCache-MAGI);
    * :func:`flow_proxy_map`: a cheap normal-flow speed on the latent, pooled to tokens.

    In every map the first frame of a chunk is compared with the previous chunk's last frame
    when the caller has it; otherwise (chunk 0 of a window, or a previous chunk that is a clean
    prefix and never published its frame) frame 0 takes frame 1's map, and a single-frame
    chunk without a previous frame gets a constant map of ones.
Decisions (§5.6)
    :func:`temporal_vote`, the symmetric per-position majority vote over a chunk's frames.

Shapes: ``B`` batch, ``F`` frames, ``HW`` tokens per frame, ``D`` hidden width, ``C`` latent
channels. Functions compute in at least float32 (float64 inputs stay float64).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .errors import ConfigError, invalid_value

__all__ = [
    "EPS",
    "NORM_MODES",
    "rel_l1",
    "poly_rescale",
    "frame_diff_map",
    "frame_diff_weights",
    "normalize_weights",
    "latent_diff_map",
    "flow_proxy_map",
    "temporal_vote",
]

#: Denominator guard of the reference code (``+ 1e-8``) for relative differences and ranges.
EPS: float = 1e-8

#: Per-frame normalisations of a motion map (see :func:`normalize_weights`).
NORM_MODES = ("mean", "max", "max_rescale")

Number = Union[float, torch.Tensor]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # half/bfloat16 -> float32; float32/float64 kept (float64 lets tests compare exactly).
    return torch.promote_types(t.dtype, torch.float32)


def rel_l1(a: torch.Tensor, b: torch.Tensor, eps: float = EPS,
           dim: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Relative L1 drift ``mean|a - b| / (mean|b| + eps)`` (§2 notation).

    ``b`` is the *previous* signal. With ``dim=None`` both means run over every element and the
    result is a 0-d tensor; with ``dim`` they run over those dimensions only (e.g.
    ``dim=(0, 2, 3)`` on a ``[B, F, M, D]`` modulation gives one drift per frame, ``[F]``).
    Identical inputs give exactly 0 (also for all-zero inputs, thanks to ``eps``); NaN/Inf in
    the inputs propagate, so callers can test the result with :func:`torch.isfinite`.
    """
    if a.shape != b.shape:
        raise ConfigError(invalid_value("rel_l1 inputs", f"equal shapes ({tuple(b.shape)})",
                                        tuple(a.shape)))
    dt = _work_dtype(a)
    a, b = a.to(dt), b.to(dt)
    if dim is None:
        return (a - b).abs().mean() / (b.abs().mean() + eps)
    dims = tuple(dim)
    return (a - b).abs().mean(dim=dims) / (b.abs().mean(dim=dims) + eps)


def poly_rescale(x: Number, coeffs: Sequence[float]) -> Number:
    """Evaluate the TeaCache polynomial ``c0*x^n + ... + cn`` (highest degree first) by Horner.

    ``coeffs == ()`` is the identity (raw ``x``). Works element-wise on tensors and on floats.
    No clamping here: policies clamp negative values themselves (see ``_indicator.py``).
    """
    if len(coeffs) == 0:
        return x
    out: Number = (torch.full_like(x, float(coeffs[0])) if isinstance(x, torch.Tensor)
                   else float(coeffs[0]))
    for c in coeffs[1:]:
        out = out * x + float(c)
    return out


# --------------------------------------------------------------------------------------------
# motion maps [F, HW]
# --------------------------------------------------------------------------------------------
def _fill_first_frame(d_rest: Optional[torch.Tensor], d0: Optional[torch.Tensor],
                      hw: int, like: torch.Tensor) -> torch.Tensor:
    """Stack frame 0's map (``d0``, or frame 1's map, or ones) in front of ``d_rest``."""
    if d0 is None:
        d0 = d_rest[0] if d_rest is not None and d_rest.shape[0] > 0 else \
            torch.ones(hw, dtype=like.dtype, device=like.device)
    d0 = d0.reshape(1, hw)
    return d0 if d_rest is None else torch.cat([d0, d_rest], dim=0)


def frame_diff_map(hidden: torch.Tensor, prev_last_frame: Optional[torch.Tensor] = None,
                   eps: float = EPS) -> torch.Tensor:
    """Relative inter-frame difference of hidden states, per token: ``[B, F, HW, D] -> [F, HW]``.

    For ``f >= 1``: ``D[f, p] = mean_{B,D}|h[f, p] - h[f-1, p]| / (mean_{B,D}|h[f-1, p]| + eps)``.
    Frame 0 is compared the same way with ``prev_last_frame`` (``[B, HW, D]``, the previous
    chunk's last frame) when given; otherwise it takes frame 1's map (ones for ``F == 1``).
    """
    if hidden.dim() != 4:
        raise ConfigError(invalid_value("frame_diff hidden", "a [B, F, HW, D] tensor",
                                        tuple(hidden.shape)))
    h = hidden.to(_work_dtype(hidden))
    f, hw = h.shape[1], h.shape[2]

    def rel(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        # mean over batch (dim 0) and channels (last dim); keeps frames/positions.
        num = (cur - prev).abs().mean(dim=(0, -1))
        den = prev.abs().mean(dim=(0, -1)) + eps
        return num / den

    if prev_last_frame is not None:
        if prev_last_frame.shape != (h.shape[0], hw, h.shape[3]):
            raise ConfigError(invalid_value(
                "frame_diff prev_last_frame", f"shape {(h.shape[0], hw, h.shape[3])}",
                tuple(prev_last_frame.shape)))
        # one pass over [prev, f0, f1, ...]: the same numbers as comparing frame 0 separately
        ext = torch.cat([prev_last_frame.to(h.dtype)[:, None], h], dim=1)
        return rel(ext[:, 1:], ext[:, :-1])                       # [F, HW]
    d_rest = rel(h[:, 1:], h[:, :-1]) if f > 1 else None          # [F-1, HW]
    return _fill_first_frame(d_rest, None, hw, h)


def normalize_weights(d: torch.Tensor, mode: str = "max_rescale", floor: float = 0.6,
                      power: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """Normalise a motion map ``[F, HW]`` **per frame** (over its ``HW`` positions) into weights.

    * ``mean``: ``w = (D / (mean D + eps)) ** power``; mean 1 for ``power == 1``, unbounded;
    * ``max``: ``w = (D / (max D + eps)) ** power``, in ``[0, 1]``;
    * ``max_rescale``: ``w = floor + (1 - floor) * ((D - min) / (max - min + eps)) ** power``,
      in ``[floor, 1]``. A constant frame gets ``floor`` everywhere (as the reference does).

    ``floor`` is only used by ``max_rescale``; ``power == 1`` reproduces the SkyReels
    reference exactly (MAGI's ``temporal_weight_power`` is the ``power`` of ``max_rescale``).
    ``D`` must be ``>= 0``; the result is ``>= 0``.
    """
    if mode not in NORM_MODES:
        raise ConfigError(invalid_value("weight normalisation mode", f"one of {list(NORM_MODES)}",
                                        mode))
    if d.dim() != 2:
        raise ConfigError(invalid_value("motion map", "a [F, HW] tensor", tuple(d.shape)))
    if mode == "mean":
        w = d / (d.mean(dim=1, keepdim=True) + eps)
    elif mode == "max":
        w = d / (d.amax(dim=1, keepdim=True) + eps)
    else:
        lo, hi = torch.aminmax(d, dim=1, keepdim=True)
        w = (d - lo) / (hi - lo + eps)
    if power != 1.0:
        w = w.clamp_min(0.0) ** power
    if mode == "max_rescale":
        w = floor + (1.0 - floor) * w
    return w


def frame_diff_weights(hidden: torch.Tensor, prev_last_frame: Optional[torch.Tensor] = None,
                       *, norm: str = "max_rescale", floor: float = 0.6, power: float = 1.0,
                       eps: float = EPS) -> torch.Tensor:
    """MotionCache-SkyReels motion weights (``_compute_weights_from_frame_diff``, §5.5).

    ``hidden`` ``[B, F, HW, D]`` (the chunk's block-stack output), ``prev_last_frame``
    ``[B, HW, D]`` or None. Returns ``[F*HW]`` weights, frame-major (index ``f*HW + p``):
    :func:`frame_diff_map` normalised per frame by :func:`normalize_weights`.
    """
    d = frame_diff_map(hidden, prev_last_frame, eps)
    return normalize_weights(d, norm, floor, power, eps).reshape(-1)


def _check_latent(latent: torch.Tensor, patch: Sequence[int], what: str) -> tuple[int, int]:
    if latent.dim() != 5:
        raise ConfigError(invalid_value(f"{what} latent", "a [B, C, F, H, W] tensor",
                                        tuple(latent.shape)))
    ph, pw = int(patch[0]), int(patch[1])
    if latent.shape[3] % ph or latent.shape[4] % pw:
        raise ConfigError(invalid_value(f"{what} patch", f"sizes dividing the latent's "
                                        f"{tuple(latent.shape[3:])}", (ph, pw)))
    return ph, pw


def _check_prev_latent(prev: Optional[torch.Tensor], latent: torch.Tensor, what: str) -> None:
    if prev is not None:
        want = (latent.shape[0], latent.shape[1], latent.shape[3], latent.shape[4])
        if tuple(prev.shape) != want:
            raise ConfigError(invalid_value(f"{what} prev_last_frame", f"shape {want}",
                                            tuple(prev.shape)))


def _pool_to_tokens(t: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Mean over each ``ph x pw`` patch: ``[..., H, W] -> [..., H/ph * W/pw]`` (row-major)."""
    *lead, h, w = t.shape
    if ph == 1 and pw == 1:
        return t.reshape(*lead, h * w)
    t = t.reshape(*lead, h // ph, ph, w // pw, pw).mean(dim=(-3, -1))
    return t.reshape(*lead, (h // ph) * (w // pw))


def _pad_replicate(t: torch.Tensor, r: int) -> torch.Tensor:
    """Replicate-pad the last two dims by ``r`` (``F.pad(mode='replicate')`` is much slower on
    the small maps used here)."""
    *lead, h, w = t.shape
    t = torch.cat([t[..., :1].expand(*lead, h, r), t, t[..., -1:].expand(*lead, h, r)], dim=-1)
    return torch.cat([t[..., :1, :].expand(*lead, r, w + 2 * r), t,
                      t[..., -1:, :].expand(*lead, r, w + 2 * r)], dim=-2)


def latent_diff_map(latent: torch.Tensor, prev_last_frame: Optional[torch.Tensor] = None,
                    patch: Sequence[int] = (1, 1)) -> torch.Tensor:
    """Absolute inter-frame latent difference pooled to tokens (MotionCache-MAGI, §6.2).

    ``latent`` ``[B, C, F, H, W]``; ``prev_last_frame`` ``[B, C, H, W]`` (the previous chunk's
    last latent frame) or None; ``patch`` ``(ph, pw)`` latent pixels per token.
    ``D[f] = avgpool_patch(mean_{B,C}|x_f - x_{f-1}|)`` (absolute, *not* divided by
    ``|x_{f-1}|``), flattened to ``[F, HW]`` in row-major token order.
    """
    ph, pw = _check_latent(latent, patch, "latent_diff")
    _check_prev_latent(prev_last_frame, latent, "latent_diff")
    x = latent.to(_work_dtype(latent))
    f = x.shape[2]
    hw = (x.shape[3] // ph) * (x.shape[4] // pw)

    def pooled(diff: torch.Tensor) -> torch.Tensor:   # [B, C, K, H, W] -> [K, HW]
        return _pool_to_tokens(diff.abs().mean(dim=(0, 1)), ph, pw)

    d_rest = pooled(x[:, :, 1:] - x[:, :, :-1]) if f > 1 else None
    d0 = None
    if prev_last_frame is not None:
        d0 = pooled(x[:, :, :1] - prev_last_frame.to(x.dtype)[:, :, None])[0]
    return _fill_first_frame(d_rest, d0, hw, x)


def flow_proxy_map(latent: torch.Tensor, prev_last_frame: Optional[torch.Tensor] = None,
                   patch: Sequence[int] = (1, 1), *, blur: int = 3,
                   eps: float = 1e-3) -> torch.Tensor:
    """A cheap optical-flow proxy: normal-flow speed per token, ``[F, HW]`` (pixels/frame).

    On the channel-mean latent ``I`` (``[B, F, H, W]``), optionally box-blurred (``blur`` odd,
    in latent pixels; 1 = none; blurring widens the range of displacements the linearisation
    holds for), between frames ``f-1`` and ``f``:

    * ``I_t = I_f - I_{f-1}`` (temporal derivative), ``g = |grad (I_f + I_{f-1})/2|``
      (central differences, replicated border);
    * brightness constancy ``I_t + v . grad I = 0`` gives the *normal flow* speed
      ``|I_t| / |grad I|`` per pixel; per token we take its gradient-weighted mean,
      ``sum_patch |I_t| / (sum_patch g + eps * P)`` (``P`` pixels per patch), which is robust
      where the texture is flat (no gradient: no measurable motion, ratio -> 0);
    * averaged over the batch.

    It measures only the component of motion along the image gradient and saturates for
    displacements larger than the (blurred) texture scale; it is a ranking signal, not a flow
    field. Frame 0 uses ``prev_last_frame`` (``[B, C, H, W]``) or frame 1's map.
    """
    ph, pw = _check_latent(latent, patch, "flow_proxy")
    _check_prev_latent(prev_last_frame, latent, "flow_proxy")
    if blur < 1 or blur % 2 == 0:
        raise ConfigError(invalid_value("flow_proxy blur", "an odd int >= 1", blur))
    x = latent.to(_work_dtype(latent))
    b, _c, f, h, w = x.shape
    hw = (h // ph) * (w // pw)
    frames = x.mean(dim=1)                                                  # [B, F, H, W]
    if prev_last_frame is not None:
        frames = torch.cat([prev_last_frame.to(x.dtype).mean(dim=1)[:, None], frames], dim=1)
    k = frames.shape[1]
    img = frames.reshape(b * k, 1, h, w)
    if blur > 1:
        # separable box filter (cheaper than avg_pool2d on small maps), replicated border
        r = blur // 2
        img = _pad_replicate(img, r)
        img = torch.stack([img[..., :, i:i + w] for i in range(blur)]).mean(0)
        img = torch.stack([img[..., i:i + h, :] for i in range(blur)]).mean(0)
    img = img.reshape(b, k, h, w)
    if k < 2:
        return torch.ones(f, hw, dtype=x.dtype, device=x.device)
    it = img[:, 1:] - img[:, :-1]                                           # [B, K-1, H, W]
    mid = 0.5 * (img[:, 1:] + img[:, :-1]).reshape(-1, 1, h, w)
    pad = _pad_replicate(mid, 1)
    gx = 0.5 * (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2])
    gy = 0.5 * (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1])
    grad = torch.sqrt(gx * gx + gy * gy).reshape(b, k - 1, h, w)

    speed = (_pool_to_tokens(it.abs(), ph, pw) /
             (_pool_to_tokens(grad, ph, pw) + eps)).mean(dim=0)             # [K-1, HW]
    if prev_last_frame is not None:
        return speed
    return _fill_first_frame(speed, None, hw, x)


# --------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------
def temporal_vote(need: torch.Tensor, frames: int, theta: float = 0.5) -> torch.Tensor:
    """Symmetric per-position majority vote over a chunk's frames (§5.6 step 4).

    ``need`` ``[F*HW]`` bool, frame-major. For each spatial position ``p``,
    ``ratio_p = mean_f need[f, p]``; every frame at ``p`` becomes ``ratio_p > theta``. With
    ``F = 5`` and ``theta = 0.5``: 3 of 5 frames switch all 5 on, 2 of 5 switch all off.
    Returns ``[F*HW]`` bool.
    """
    n = need.numel()
    if frames < 1 or n % frames:
        raise ConfigError(invalid_value("temporal_vote frames", f"a divisor of {n} tokens",
                                        frames))
    grid = need.reshape(frames, n // frames).to(torch.float32)
    keep = grid.mean(dim=0) > theta                                         # [HW]
    return keep.expand(frames, n // frames).reshape(-1)
