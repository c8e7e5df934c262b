"""Calibration of the indicator's rescale polynomial (TeaCache-style), with provenance.

Indicator-based policies (``teacache``, ``flowcache``, ``motioncache``) accumulate
``poly(x)`` where ``x`` is the relative L1 change of a cheap input-side signal (the timestep
modulation) between a chunk's consecutive steps. The polynomial maps that change to the change
it predicts in what reuse throws away: the block-stack residual. This module measures both on
real generations and fits the map:

* ``x = relL1(m_t, m_{t-1})``: modulation of the call (``probe.modulation``);
* ``y = relL1(R_t, R_{t-1})``: residual ``R = h_out - h_in`` of the whole block stack,
  where ``relL1(a, b) = mean|a - b| / (mean|b| + eps)``.

Pairs are recorded per (branch, chunk, step) for ``scope='chunk'`` (chunked execution) or per
(branch, window iteration) for ``scope='window'`` (vanilla execution, for ``teacache``).
:func:`fit_polynomial` fits ``np.polyfit(x, y, degree)`` and reports R^2; :func:`check_polynomial`
warns (:class:`CoefficientWarning`) when the fitted curve is negative or decreasing inside the
observed range, where an accumulator would shrink or a larger drift would score lower (the
published Wan-1.3B polynomial is both, see docs).

The JSON written by :func:`save_calibration` is what policies read with ``coefficients_file``::

    {"format": "cachekit.calibration/1", "model": ..., "scope": "chunk"|"window",
     "indicator": "modulation", "target": "residual", "degree": 4,
     "coefficients": [c_deg, ..., c_0],   # numpy.polyval order, highest degree first
     "x_range": [lo, hi], "y_range": [lo, hi], "r2": ..., "num_pairs": ..., "seeds": [...],
     "sampler": {...}, "cachekit_version": ..., "command": "cachekit calibrate ..."}
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .errors import ConfigError, invalid_value
from .motion import rel_l1 as _motion_rel_l1
from .types import ChunkCall, Decision, Probe, Scope

__all__ = ["CoefficientWarning", "CalibrationRecorder", "fit_polynomial", "check_polynomial",
           "calibrate", "save_calibration", "load_calibration", "rel_l1", "FORMAT"]

FORMAT = "cachekit.calibration/1"
_EPS = 1e-8


class CoefficientWarning(UserWarning):
    """A rescale polynomial is negative or non-monotonic over the range it is used on."""


def rel_l1(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> float:
    """:func:`cachekit.motion.rel_l1` over every element, as a Python float (the very function
    the policies use, so the calibrated x is the policies' x)."""
    return float(_motion_rel_l1(a, b, eps))


class CalibrationRecorder:
    """A pseudo-policy that always computes and records ``(x, y)`` pairs (see module doc)."""

    name: ClassVar[str] = "calibration_recorder"
    needs_residual: ClassVar[bool] = True

    def __init__(self, scope: Scope = Scope.CHUNK) -> None:
        self.scope = scope  # type: ignore[misc]
        self.config = None
        self.pairs: list[tuple[str, int, int, float, float]] = []

    def new_state(self, call: ChunkCall) -> dict:
        return {"m": None, "r": None}

    def decide(self, call: ChunkCall, probe: Probe, state: dict, memory: dict) -> Decision:
        return Decision.compute("calibration")

    def observe(self, call, probe, state, outcome, memory) -> None:
        if probe.modulation is None:
            raise ConfigError("calibration needs probe.modulation from the model adapter")
        m = probe.modulation.detach().float()
        r = (outcome.h_out - outcome.h_in).detach().float()
        if state["m"] is not None:
            x, y = rel_l1(m, state["m"]), rel_l1(r, state["r"])
            if np.isfinite(x) and np.isfinite(y):
                self.pairs.append((call.branch, call.chunk, call.step, x, y))
        state["m"], state["r"] = m, r


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> dict[str, Any]:
    """Least-squares polynomial ``y ~ poly(x)``; returns coefficients (highest first), R^2 and
    the observed ranges. Needs more distinct x values than ``degree``."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ConfigError(invalid_value("calibration pairs", "two 1-D sequences of equal length",
                                        (xa.shape, ya.shape)))
    if len(np.unique(xa)) <= degree:
        raise ConfigError(invalid_value(
            "calibration pairs", f"more than degree={degree} distinct indicator values",
            len(np.unique(xa)), "Record more steps or seeds, or lower the degree."))
    coeffs = np.polyfit(xa, ya, degree)
    pred = np.polyval(coeffs, xa)
    ss_res = float(((ya - pred) ** 2).sum())
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    return {"degree": degree, "coefficients": [float(c) for c in coeffs],
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "x_range": [float(xa.min()), float(xa.max())],
            "y_range": [float(ya.min()), float(ya.max())], "num_pairs": int(xa.size)}


def check_polynomial(coefficients: Sequence[float], x_range: Sequence[float], *,
                     where: str = "polynomial", samples: int = 512) -> list[str]:
    """Problems of ``poly`` over ``x_range`` (negative values, decreasing parts); each is
    also emitted as a :class:`CoefficientWarning`. Returns the list of messages."""
    if not coefficients:
        return []
    lo, hi = float(x_range[0]), float(x_range[1])
    xs = np.linspace(lo, hi, samples)
    ys = np.polyval(np.asarray(coefficients, dtype=np.float64), xs)
    problems = []
    if (ys < 0).any():
        neg = xs[ys < 0]
        problems.append(f"{where} is negative for x in [{neg.min():.4g}, {neg.max():.4g}] "
                        f"(inside the range [{lo:.4g}, {hi:.4g}] it is used on): an accumulator "
                        f"would shrink there")
    dec = np.diff(ys) < -1e-12 * max(1.0, float(np.abs(ys).max()))
    if dec.any():
        xd = xs[1:][dec]
        problems.append(f"{where} decreases for x in [{xd.min():.4g}, {xd.max():.4g}]: a larger "
                        f"drift scores lower there")
    for p in problems:
        warnings.warn(p, CoefficientWarning, stacklevel=2)
    return problems


def calibrate(adapter: Any, *, seeds: Sequence[int], sampler: Any, scope: str = "chunk",
              degree: int = 4, model: str = "", progress: bool = False,
              registry: Any = None) -> dict[str, Any]:
    """Run uncached generations for ``seeds`` recording pairs, fit, return the JSON dict."""
    from . import __version__
    from .engine import CacheEngine
    from .sampling import generate

    if scope not in ("chunk", "window"):
        raise ConfigError(invalid_value("scope", "'chunk' or 'window'", scope))
    rec = CalibrationRecorder(Scope.CHUNK if scope == "chunk" else Scope.WINDOW)
    engine = CacheEngine(rec, registry=registry)
    sampler = sampler.evolve(mode="chunked" if scope == "chunk" else "vanilla")
    for seed in seeds:
        cond, uncond, _ = adapter.encode_prompt(None, seed=seed, batch=1)
        with torch.inference_mode():
            generate(adapter, cond, uncond=uncond, config=sampler, engine=engine, seed=seed,
                     progress=progress)
    x = [p[3] for p in rec.pairs]
    y = [p[4] for p in rec.pairs]
    fit = fit_polynomial(x, y, degree)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = check_polynomial(fit["coefficients"], fit["x_range"])
    for w in caught:
        warnings.warn(str(w.message), CoefficientWarning, stacklevel=2)
    return {"format": FORMAT, "model": model, "scope": scope, "indicator": "modulation",
            "target": "residual", **fit, "problems": problems, "seeds": list(seeds),
            "sampler": sampler.to_dict(), "cachekit_version": __version__,
            "pairs_per_branch": {b: sum(1 for p in rec.pairs if p[0] == b)
                                 for b in sorted({p[0] for p in rec.pairs})}}


def save_calibration(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and validate a calibration JSON (see the module docstring for the schema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(invalid_value("coefficients_file", "an existing calibration JSON",
                                        str(path), "Create one with `cachekit calibrate`."))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"coefficients_file {path}: not valid JSON ({exc})") from exc
    coeffs = data.get("coefficients") if isinstance(data, dict) else None
    if not (isinstance(coeffs, list) and coeffs and all(isinstance(c, (int, float))
                                                        and np.isfinite(c) for c in coeffs)):
        raise ConfigError(invalid_value(f"coefficients_file {path}: 'coefficients'",
                                        "a non-empty list of finite numbers", coeffs))
    rng = data.get("x_range")
    if not (isinstance(rng, list) and len(rng) == 2 and rng[0] < rng[1]):
        raise ConfigError(invalid_value(f"coefficients_file {path}: 'x_range'", "[lo, hi]", rng))
    return data

