"""Fidelity metrics between two videos, and the analytic cost model of a generation.

Fidelity (reference/algorithms.md §8: the protocol of FlowCache's and MotionCache's
``tools/video_metrics.py``). Videos are float arrays ``[F, H, W, 3]`` in ``[0, 1]`` (RGB), as
:func:`cachekit.io.load_video` returns them; the reference is the *uncached* generation of the
same seed, not ground truth.

* :func:`psnr`: ``-10 log10(MSE)`` with **one** MSE over the whole video (every frame, pixel
  and channel), data range 1. Identical videos give ``inf``.
* :func:`ssim`: torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=1.0)`` default,
  re-implemented in torch: 11x11 Gaussian window (sigma 1.5), constants ``k1=0.01, k2=0.03``,
  population (co)variances clamped at 0, averaged over the valid window positions, the three
  channels and the frames. Equal to scikit-image's ``structural_similarity(...,
  channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` averaged over frames (up to the clamp; a test checks it).
  Frames smaller than the window (the toy model's 4x4 frames) use the largest odd window that
  fits (truncated Gaussian, renormalised); :func:`ssim_window` says which, and the benchmark
  reports it.
* LPIPS is **not computed**: it needs the ``lpips`` package and its pretrained AlexNet weights,
  which are downloaded at first use; cachekit never downloads weights. Reported as ``None``
  with :data:`LPIPS_UNAVAILABLE` as the reason.

The papers compare 8-bit decodes of mp4 files; cachekit compares the decoded float frames
directly (no codec, no 8-bit rounding), so its PSNR can be higher for tiny differences.

Cost model (analytic FLOPs, multiply-add = 2) of one generation, derived from the sampler's
schedule rows and, for a cached run, the engine's per-call records
(:class:`~cachekit.stats.CallRecord`: computed tokens per (window, iteration, branch, chunk)):

* **vanilla** execution runs every chunk of the window (active, finished, prefix and pending)
  at every iteration as one sequence: one block-stack forward of ``F*n`` query tokens over
  ``F*n`` keys per iteration and branch (a dense masked attention computes every score);
* **chunked** execution runs, per iteration and branch, the ACTIVE chunks (the computed
  tokens of each, over the keys of slots ``0..g``) plus one refresh of a FINISHED or PREFIX
  chunk's context K/V slot each time that chunk's state changes (only for chunks up to the
  last active one), exactly as the bundled model's and the toy model's sessions do.

The per-forward cost comes from the model when it has one (``adapter.model.block_flops(q, kv)``
or ``adapter.block_flops(q, kv)``, as the bundled ``refdit`` does) and otherwise from a
generic transformer estimate from the :class:`~cachekit.types.ModelSpec` (see
:func:`generic_block_flops`); :func:`block_cost` says which. Embedding, output head,
normalisations and the sampler's own arithmetic are not counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .errors import ConfigError, invalid_value
from .types import ChunkState

__all__ = [
    "LPIPS_UNAVAILABLE",
    "SSIM_SIGMA",
    "SSIM_KERNEL",
    "psnr",
    "mse",
    "ssim",
    "ssim_window",
    "compare_videos",
    "generic_block_flops",
    "block_cost",
    "window_plans",
    "FlopCount",
    "generation_flops",
]

#: Why LPIPS is reported as None.
LPIPS_UNAVAILABLE = ("LPIPS not computed: it needs the `lpips` package and its pretrained "
                     "AlexNet weights, which are downloaded from the internet at first use; "
                     "cachekit does not download weights")
#: SSIM Gaussian window: sigma and taps (torchmetrics' and Wang et al. 2004's default).
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
_K1, _K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------
def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both videos as float64 ``[F, H, W, 3]`` arrays of one shape (clear errors otherwise)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    for name, v in (("video A", a), ("video B", b)):
        if v.ndim != 4 or v.shape[-1] != 3:
            raise ConfigError(invalid_value(name, "an array [F, H, W, 3] (RGB in [0, 1])",
                                            v.shape))
        if not np.isfinite(v).all():
            raise ConfigError(invalid_value(name, "finite values", "NaN or Inf"))
    if a.shape != b.shape:
        raise ConfigError(invalid_value(
            "video shapes", "two videos of the same shape [F, H, W, 3]",
            f"{a.shape} and {b.shape}",
            "Compare generations of the same frames and size (same sampler settings and "
            "seed); frame counts must match, nothing is resized."))
    return a, b


def mse(a: Any, b: Any) -> float:
    """Mean squared error over every frame, pixel and channel."""
    a, b = _pair(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(a: Any, b: Any, *, data_range: float = 1.0) -> float:
    """PSNR in dB with one MSE over the whole video; ``inf`` for identical videos."""
    m = mse(a, b)
    if m == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range * data_range / m))


def ssim_window(height: int, width: int, kernel_size: int = SSIM_KERNEL) -> int:
    """The Gaussian window SSIM uses on ``height x width`` frames: ``kernel_size`` (11) when it
    fits, else the largest odd size that does (at least 1)."""
    k = min(kernel_size, height, width)
    return max(1, k if k % 2 else k - 1)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    dist = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (dist / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_frame(a: Any, b: Any, *, data_range: float = 1.0,
                   sigma: float = SSIM_SIGMA, kernel_size: int = SSIM_KERNEL) -> np.ndarray:
    """SSIM of each frame ``[F]`` (mean over valid window positions and channels)."""
    a, b = _pair(a, b)
    f, h, w, c = a.shape
    k = ssim_window(h, w, kernel_size)
    x = torch.from_numpy(a).permute(0, 3, 1, 2)   # [F, C, H, W]
    y = torch.from_numpy(b).permute(0, 3, 1, 2)
    kern = _gaussian_kernel(k, sigma).expand(c, 1, k, k).contiguous()
    # Valid convolution: the same positions torchmetrics keeps after its pad-and-crop, and
    # scikit-image after its crop (neither lets the padding reach a kept position).
    stack = torch.cat([x, y, x * x, y * y, x * y])
    out = torch.nn.functional.conv2d(stack, kern, groups=c).split(f)
    mu_x, mu_y = out[0], out[1]
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = torch.clamp(out[2] - mu_xx, min=0.0)
    var_y = torch.clamp(out[3] - mu_yy, min=0.0)
    cov = out[4] - mu_xy
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    s = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return s.reshape(f, -1).mean(dim=1).numpy()


def ssim(a: Any, b: Any, *, data_range: float = 1.0, sigma: float = SSIM_SIGMA,
         kernel_size: int = SSIM_KERNEL) -> float:
    """SSIM averaged over frames (see the module docstring); 1.0 for identical videos."""
    return float(np.mean(ssim_per_frame(a, b, data_range=data_range, sigma=sigma,
                                        kernel_size=kernel_size)))


def compare_videos(a: Any, b: Any, *, data_range: float = 1.0) -> dict[str, Any]:
    """PSNR, SSIM (and LPIPS = None with the reason) of video ``a`` against reference ``b``."""
    a, b = _pair(a, b)
    f, h, w, _ = a.shape
    m = float(np.mean((a - b) ** 2))
    return {
        "frames": f, "height": h, "width": w,
        "mse": m,
        "psnr": math.inf if m == 0.0 else float(10.0 * math.log10(data_range ** 2 / m)),
        "ssim": ssim(a, b, data_range=data_range),
        "ssim_window": ssim_window(h, w),
        "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0,
        "lpips": None,
        "lpips_reason": LPIPS_UNAVAILABLE,
    }


# ---------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------
#: FFN width multiple the generic estimate assumes (Wan, SkyReels-V2 and refdit use 4).
GENERIC_FFN_MULT = 4


def generic_block_flops(spec: Any, q_tokens: int, kv_tokens: int, batch: int = 1) -> int:
    """A generic transformer estimate from a :class:`~cachekit.types.ModelSpec`: per block,
    q/k/v/o projections ``8 q D^2``, attention scores and weighted sum ``4 q kv D`` and an FFN
    of width ``4 D`` (``16 q D^2``): ``num_blocks * (24 q D^2 + 4 q kv D)``. No
    cross-attention, norms or modulation. Used for adapters without ``block_flops``."""
    d = int(spec.hidden)
    per_block = (8 + 4 * GENERIC_FFN_MULT) * q_tokens * d * d + 4 * q_tokens * kv_tokens * d
    return int(batch * spec.num_blocks * per_block)


def block_cost(adapter: Any) -> tuple[Callable[[int, int], float], str]:
    """``(cost(q_tokens, kv_tokens) -> FLOPs, source)`` of one block-stack forward.

    ``source`` is ``"model"`` when the adapter (or its ``model``) has ``block_flops`` and
    ``"generic"`` (:func:`generic_block_flops` on ``adapter.spec``) otherwise.
    """
    for owner in (getattr(adapter, "model", None), adapter):
        fn = getattr(owner, "block_flops", None)
        if callable(fn):
            return (lambda q, kv, fn=fn: float(fn(int(q), int(kv)))), "model"
    spec = adapter.spec
    return (lambda q, kv: float(generic_block_flops(spec, int(q), int(kv)))), "generic"


def window_plans(spec: Any, cfg: Any) -> list[tuple[Any, list]]:
    """``[(WindowPlan, rows)]`` of a generation (:func:`cachekit.sampling.plan_generation`)."""
    from .sampling import plan_generation

    return plan_generation(cfg, spec)


class FlopCount:
    """FLOPs and query-token passes of one generation (``flops``, ``tokens``), with a per-kind
    split: ``active`` (ACTIVE chunks or whole-window calls) and ``context`` (K/V refreshes)."""

    __slots__ = ("flops", "tokens", "context_flops", "context_tokens")

    def __init__(self) -> None:
        self.flops = 0.0
        self.tokens = 0
        self.context_flops = 0.0
        self.context_tokens = 0

    def add(self, cost: Callable[[int, int], float], q: int, kv: int, *,
            context: bool = False) -> None:
        if q <= 0:
            return
        c = cost(q, kv)
        self.flops += c
        self.tokens += q
        if context:
            self.context_flops += c
            self.context_tokens += q

    def as_dict(self) -> dict[str, float]:
        return {"flops": self.flops, "tokens": self.tokens, "context_flops": self.context_flops,
                "context_tokens": self.context_tokens}


def generation_flops(spec: Any, cfg: Any, cost: Callable[[int, int], float], *,
                     branches: Sequence[str] = ("cond", "uncond"), mode: Optional[str] = None,
                     records: Optional[Iterable[Any]] = None) -> FlopCount:
    """Analytic FLOPs of one generation with sampler settings ``cfg`` (module docstring).

    :param mode: ``"chunked"`` or ``"vanilla"`` (default ``cfg.mode``).
    :param records: the engine's :class:`~cachekit.stats.CallRecord` of a cached run; their
        ``computed`` token counts replace "all tokens" for every call they cover (chunk calls
        in chunked mode, whole-window calls in vanilla mode). None = uncached.
    :raises ConfigError: records that do not match the schedule (another sampler setting).
    """
    mode = mode or cfg.mode
    cbs = cfg.causal_block_size or spec.chunk_frames
    n_frame = spec.tokens_per_frame
    n_chunk = cbs * n_frame
    computed: Optional[dict[tuple[int, int, str, int], int]] = None
    if records is not None:
        computed = {(r.window, r.iteration, r.branch, r.chunk): int(r.computed) for r in records}
    used = 0
    count = FlopCount()

    def look_up(key: tuple[int, int, str, int], default: int) -> int:
        nonlocal used
        if computed is None:
            return default
        if key not in computed:
            raise ConfigError(invalid_value(
                "engine records", f"one record per {mode} call of the schedule",
                f"none for (window, iteration, branch, chunk) = {key}",
                "Count FLOPs with the sampler settings the run used."))
        used += 1
        return computed[key]

    for plan, rows in window_plans(spec, cfg):
        frames = plan.end - plan.start
        n_window = frames * n_frame
        for b in branches:
            slot: dict[int, ChunkState] = {}
            for it, (states, _steps) in enumerate(rows):
                if mode == "vanilla":
                    q = look_up((plan.index, it, b, 0), n_window)
                    count.add(cost, q, n_window)
                    continue
                active = [g for g, s in enumerate(states) if s is ChunkState.ACTIVE]
                if not active:
                    continue
                for g in range(active[-1] + 1):
                    st = states[g]
                    kv = (g + 1) * n_chunk
                    if st is ChunkState.PENDING:
                        continue
                    if st is not ChunkState.ACTIVE:
                        if slot.get(g) is not st:
                            count.add(cost, n_chunk, kv, context=True)
                            slot[g] = st
                        continue
                    q = look_up((plan.index, it, b, g), n_chunk)
                    if q > 0:
                        count.add(cost, q, kv)
                        slot[g] = st
    if computed is not None and used != len(computed):
        raise ConfigError(invalid_value(
            "engine records", f"{used} records matching the {mode} schedule",
            f"{len(computed)} records", "Count FLOPs with the sampler settings the run used."))
    return count
