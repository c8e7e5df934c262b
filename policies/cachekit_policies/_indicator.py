"""The indicator shared by ``teacache``, ``flowcache`` and ``motioncache`` (written once here).

Every one of these policies compares the timestep modulation of a call with the one of the
same (branch, chunk) at its previous step (reference/algorithms.md §2):

* **distance** ``d = max(0, poly(rel_l1(m, m_prev)))``: :func:`cachekit.motion.rel_l1`,
  rescaled by an optional TeaCache polynomial (highest degree first; ``()`` = identity).
  Negative polynomial values are clamped to 0 so an accumulator never *shrinks* (a known flaw
  of the Wan-1.3B fit, §2 / §7.3) and a larger threshold never computes more;
* **accumulate-and-reset**: forced steps compute and zero the accumulator; otherwise
  ``acc += d``; ``acc < threshold`` reuses (keeping ``acc``), else computes and zeroes it.
  The previous signal is overwritten at every step, computed or reused. A non-finite distance
  computes (reason ``"nonfinite_distance"``) and zeroes the accumulator.

Polynomial coefficients come from the config (``coefficients``) or from a calibration file
(``coefficients_file``) written by ``cachekit calibrate``; see :data:`CALIBRATION_SCHEMA`.
A polynomial that is negative, or decreasing, over its ``x_range`` emits a
:class:`CoefficientWarning` (the core's class, :mod:`cachekit.calibration`, re-exported here)
when the policy is built.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import attrs
import torch

from cachekit.calibration import FORMAT, CoefficientWarning, check_polynomial
from cachekit.config import in_range, knob
from cachekit.errors import CacheContextError, ConfigError, invalid_value
from cachekit.motion import poly_rescale, rel_l1
from cachekit.protocols import Outcome, PolicyContract
from cachekit.types import ChunkCall, Decision, Probe

__all__ = [
    "CoefficientWarning",
    "CALIBRATION_SCHEMA",
    "FORMAT",
    "KNOWN_COEFFICIENTS",
    "Calibration",
    "Indicator",
    "IndicatorState",
    "accumulate",
    "coefficients_knob",
    "coefficients_file_knob",
    "coefficients_range_knob",
    "check_coefficient_settings",
    "modulation_of",
    "recomputed_everything",
    "threshold_knob",
]


#: The calibration file ``cachekit calibrate`` writes (:func:`cachekit.calibration.calibrate` /
#: ``save_calibration``) and ``coefficients_file`` reads (JSON). What the policies require::
#:
#:     {
#:       "format": "cachekit.calibration/1",  # optional; if present it must be this value
#:       "model": "refdit-s",                 # required, str: the model it was fitted on
#:       "indicator": "modulation",           # required: the signal whose rel_l1 is rescaled
#:       "coefficients": [c0, c1, ..., cn],   # required, >= 1 finite numbers, highest degree first
#:       "x_range": [lo, hi],                 # required, finite, lo < hi: rel_l1 range of the fit
#:       ...                                  # anything else (scope, target, degree, r2, y_range,
#:     }                                      # num_pairs, seeds, sampler, command...) is kept in
#:                                            # Calibration.extra and not interpreted
CALIBRATION_SCHEMA: dict[str, Any] = {
    "format": f"'{FORMAT}', optional",
    "model": "str, required",
    "indicator": "'modulation', required",
    "coefficients": "list of finite floats, highest degree first, required",
    "x_range": "[lo, hi] finite floats with lo < hi, required",
}

#: Published TeaCache polynomials for Wan2.1 / SkyReels-V2 (§2), highest degree first. They
#: were fitted on Wan's ``e0`` (``ret_steps``) or ``e`` modulation; the 1.3B ret-steps set is
#: the one FlowCache and MotionCache hard-code. It is negative below x = 0.0043 and above
#: x = 0.102 and non-monotonic above 0.079: using it outside that band warns.
KNOWN_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "wan2.1-t2v-1.3b-ret-steps": (-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1,
                                  -4.99875664e-2),
    "wan2.1-t2v-14b-ret-steps": (-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1,
                                 -3.15583525e-1),
    "wan2.1-t2v-1.3b": (2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975,
                        1.37887774e-1),
    "wan2.1-t2v-14b": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429,
                       -13.02252404),
}

_DEFAULT_X_RANGE = (0.0, 1.0)


# --------------------------------------------------------------------------------------------
# config knobs (each policy config declares these three fields with these factories)
# --------------------------------------------------------------------------------------------
def _float_tuple(value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        text = value.strip()
        if text.lower() in ("", "none", "identity", "()", "[]"):
            return ()
        if text in KNOWN_COEFFICIENTS:
            return KNOWN_COEFFICIENTS[text]
        raise ConfigError(invalid_value(
            "coefficients", f"a list of numbers (highest degree first) or one of "
            f"{sorted(KNOWN_COEFFICIENTS)}", value))
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(invalid_value("coefficients", "a list of numbers, highest degree "
                                        "first", value)) from None


def _finite_tuple(inst, attribute, value) -> None:
    if not all(math.isfinite(v) for v in value):
        raise ConfigError(invalid_value(f"{type(inst).__name__}.{attribute.name}",
                                        "finite numbers", value))


def _optional_path(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return str(value)


def _range_pair(value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(invalid_value("coefficients_x_range", "[lo, hi]", value)) from None
    return (lo, hi)


def _valid_range(inst, attribute, value) -> None:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(invalid_value(f"{type(inst).__name__}.{attribute.name}",
                                        "finite [lo, hi] with lo < hi", value))


def coefficients_knob() -> Any:
    return knob(
        (), converter=_float_tuple, validator=_finite_tuple,
        doc="Polynomial rescaling the rel_l1 indicator, highest degree first (TeaCache style); "
            "() = identity (the raw rel_l1). Also accepts a name from KNOWN_COEFFICIENTS, e.g. "
            "'wan2.1-t2v-1.3b-ret-steps' (the reference runs' set, fitted on Wan's e0: it "
            "warns outside its band). Default (): identity.",
        trade="changes the unit of `threshold`; fit one for your model with `cachekit "
              "calibrate` so thresholds mean the same across models")


def coefficients_file_knob() -> Any:
    return knob(
        None, converter=_optional_path,
        doc="Path of a calibration JSON (see CALIBRATION_SCHEMA: model, indicator "
            "'modulation', coefficients, x_range) whose coefficients replace `coefficients`; "
            "None = use `coefficients`. Read when the policy is built. Default None.",
        trade="none by itself; as for `coefficients`")


def coefficients_range_knob() -> Any:
    return knob(
        _DEFAULT_X_RANGE, converter=_range_pair, validator=_valid_range,
        doc="rel_l1 range [lo, hi] over which inline `coefficients` are checked (negative or "
            "decreasing warns with CoefficientWarning); a coefficients_file brings its "
            "own x_range. Default [0, 1].",
        trade="none (diagnostics only)")


def check_coefficient_settings(cfg: Any) -> None:
    """Config-time check: ``coefficients`` and ``coefficients_file`` are exclusive."""
    if cfg.coefficients and cfg.coefficients_file is not None:
        raise ConfigError(
            f"{type(cfg).__name__}: set either coefficients or coefficients_file, not both "
            f"(got coefficients={list(cfg.coefficients)} and "
            f"coefficients_file={cfg.coefficients_file!r}). Clear one of them.")


# --------------------------------------------------------------------------------------------
# calibration files
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class Calibration:
    """A fitted indicator polynomial, as stored in a calibration JSON (see module docs)."""

    model: str
    indicator: str
    coefficients: tuple[float, ...] = attrs.field(converter=tuple)
    x_range: tuple[float, float] = attrs.field(converter=tuple)
    extra: dict = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        def bad(field: str, expected: str, got: Any) -> ConfigError:
            return ConfigError(invalid_value(
                f"{source}: {field}", expected, got,
                "A calibration file is the JSON object `cachekit calibrate` writes: "
                '{"model": ..., "indicator": "modulation", "coefficients": [...], '
                '"x_range": [lo, hi]}'))

        if not isinstance(data, Mapping):
            raise bad("top level", "a JSON object", type(data).__name__)
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise bad("format", repr(FORMAT), fmt)
        missing = [k for k in ("model", "indicator", "coefficients", "x_range") if k not in data]
        if missing:
            raise bad("required keys", "model, indicator, coefficients and x_range",
                      f"missing {missing}")
        model, indicator = data["model"], data["indicator"]
        if not isinstance(model, str):
            raise bad("model", "a string (the model name)", model)
        if indicator != "modulation":
            raise bad("indicator", "'modulation' (the only indicator the policies use)",
                      indicator)
        coeffs = data["coefficients"]
        if (not isinstance(coeffs, list) or not coeffs or
                not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                        and math.isfinite(c) for c in coeffs)):
            raise bad("coefficients", "a non-empty list of finite numbers, highest degree "
                      "first", coeffs)
        xr = data["x_range"]
        if (not isinstance(xr, list) or len(xr) != 2 or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) for v in xr) or not xr[0] < xr[1]):
            raise bad("x_range", "[lo, hi] finite numbers with lo < hi", xr)
        known = {"format", "model", "indicator", "coefficients", "x_range"}
        return cls(model=model, indicator=indicator,
                   coefficients=tuple(float(c) for c in coeffs),
                   x_range=(float(xr[0]), float(xr[1])),
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and validate a calibration JSON; errors name the file, the field and the fix."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(invalid_value(
                "coefficients_file", "an existing calibration JSON file", str(p),
                "Write one with `cachekit calibrate`, or set coefficients=[...] instead."))
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"coefficients_file {str(p)!r}: not valid JSON ({exc.msg} at line "
                              f"{exc.lineno}, column {exc.colno})") from None
        return cls.from_dict(data, source=f"coefficients_file {str(p)!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "model": self.model,
               "indicator": self.indicator, "coefficients": list(self.coefficients),
               "x_range": list(self.x_range)}
        out.update(self.extra)
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p


# --------------------------------------------------------------------------------------------
# the indicator
# --------------------------------------------------------------------------------------------
@attrs.frozen
class Indicator:
    """``d = max(0, poly(rel_l1(cur, prev)))`` with the policy's coefficients (immutable)."""

    coefficients: tuple[float, ...] = ()
    x_range: tuple[float, float] = _DEFAULT_X_RANGE
    source: str = "identity"

    @classmethod
    def from_config(cls, cfg: Any, policy: str, scope: str = "chunk") -> "Indicator":
        """Resolve ``coefficients`` / ``coefficients_file``; warn on a bad polynomial, or on a
        calibration recorded at another scope (``"chunk"`` or ``"window"``) than ``scope``."""
        if cfg.coefficients_file is not None:
            cal = Calibration.load(cfg.coefficients_file)
            ind = cls(cal.coefficients, cal.x_range,
                      f"coefficients_file {cfg.coefficients_file!r} (model {cal.model!r})")
            fitted = cal.extra.get("scope")
            if fitted is not None and fitted != scope:
                warnings.warn(
                    f"{policy}: {ind.source} was fitted at scope {fitted!r} but {policy} "
                    f"measures the drift per {scope}; the x values differ. Calibrate with "
                    f"scope={scope!r}.", CoefficientWarning, stacklevel=3)
        elif cfg.coefficients:
            ind = cls(tuple(cfg.coefficients), tuple(cfg.coefficients_x_range),
                      "config coefficients")
        else:
            ind = cls()
        # One CoefficientWarning per problem (negative / decreasing), from the core's check so
        # that `cachekit calibrate` and the policies judge a polynomial the same way. Negative
        # values are clamped to 0 by rescale(); a decreasing part is used as is.
        check_polynomial(ind.coefficients, ind.x_range,
                         where=f"{policy}: indicator polynomial from {ind.source}")
        return ind

    def rescale(self, x: Any) -> Any:
        """``max(0, poly(x))`` for a float or a tensor (NaN stays NaN)."""
        y = poly_rescale(x, self.coefficients)
        if isinstance(y, torch.Tensor):
            return torch.where(y < 0, torch.zeros_like(y), y)
        return 0.0 if y < 0 else y

    def distance(self, cur: torch.Tensor, prev: torch.Tensor) -> float:
        """Scalar distance over the whole signal (one device sync, outside compiled code)."""
        return float(self.rescale(float(rel_l1(cur, prev))))

    def frame_distance(self, cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Per-frame distance ``[F]`` of ``[B, F, M, D]`` modulations (no sync)."""
        return self.rescale(rel_l1(cur, prev, dim=(0, 2, 3)))


def accumulate(acc: float, d: float, threshold: float) -> tuple[bool, float]:
    """The TeaCache rule after the forced steps: ``(compute, new_acc)``.

    ``acc + d < threshold`` reuses and keeps the sum; otherwise compute and reset to 0. With
    ``threshold == 0`` every step computes (``d >= 0``).
    """
    total = acc + d
    if total < threshold:
        return False, total
    return True, 0.0


@attrs.define(slots=True)
class IndicatorState:
    """Per-(branch, chunk) state of the scalar rule: accumulator and previous modulation.

    ``prev`` is the modulation *per frame* ``[B, F, M, D]`` (never per token, §7.7).
    """

    acc: float = 0.0
    prev: Optional[torch.Tensor] = attrs.field(default=None, repr=False)

    def reset(self) -> None:
        self.acc = 0.0
        self.prev = None

    def check_valid(self) -> None:
        assert math.isfinite(self.acc) and self.acc >= 0.0, f"accumulator {self.acc}"
        assert self.prev is None or self.prev.dim() == 4, "prev must be [B, F, M, D]"

    def step(self, indicator: Indicator, threshold: float, signal: torch.Tensor,
             forced: Optional[str]) -> Decision:
        """Apply the accumulate-and-reset rule for one step; see the module docstring."""
        prev = self.prev
        self.prev = signal
        if forced is not None:
            self.acc = 0.0
            return Decision.compute(forced)
        if prev is None or prev.shape != signal.shape:
            # First call of this key in the window (or a geometry change): nothing to compare.
            self.acc = 0.0
            return Decision.compute("no_previous")
        d = indicator.distance(signal, prev)
        if not math.isfinite(d):
            self.acc = 0.0
            return Decision.compute("nonfinite_distance")
        compute, self.acc = accumulate(self.acc, d, threshold)
        return Decision.compute("threshold") if compute else Decision.reuse("below_threshold")


def modulation_of(probe: Probe, call: ChunkCall, policy: str) -> torch.Tensor:
    """The probe's per-frame modulation ``[B, F, M, D]``, detached copy (the adapter may reuse
    its buffer); a clear error if the model adapter provides none."""
    mod = probe.modulation
    if mod is None:
        raise CacheContextError(
            f"policy {policy!r} needs probe.modulation (the per-frame timestep modulation "
            f"[B, F, M, D]) for {call.key} step {call.step}, but the model adapter passed "
            f"None. Use an adapter that fills Probe.modulation, or another policy.")
    return mod.detach().clone()


def recomputed_everything(outcome: Outcome) -> bool:
    """Every token was computed: by the policy's choice, or because the engine overrode a
    reuse (evicted or non-finite residual, counted by the engine). Either way the
    accumulators of this (branch, chunk) must restart from 0."""
    return outcome.computed_tokens == outcome.num_tokens


def threshold_knob(default: float, *, doc: str) -> Any:
    return knob(default, converter=float, validator=in_range(0.0),
                doc=doc, trade="larger = more reuse (faster), less faithful; 0 = never reuse")


class AccumulateResetPolicy:
    """The TeaCache rule as a policy: one accumulate-and-reset state per engine key.

    ``flowcache`` (per (branch, chunk), chunked execution) and ``teacache`` (per branch, one
    decision per window, vanilla execution) are this same algorithm at two scopes; they differ
    only in their config (defaults, docs, presets) and these class attributes:

    * ``name``, ``scope`` as for any policy (the contract hints are shared, below);
    * ``config_cls``: the config class (fields ``threshold``, ``warmup_steps``,
      ``compute_last`` and the coefficient knobs);
    * ``indicator_scope``: ``"chunk"`` or ``"window"``, the calibration scope its
      coefficients must come from.

    Forced computes: steps ``< warmup_steps`` and, with ``compute_last``, the last step (in
    the engine call's own step count: the chunk's steps, or the window's iterations).
    """

    name: ClassVar[str]
    scope: ClassVar[Any]
    needs_residual: ClassVar[bool] = True
    config_cls: ClassVar[type]
    indicator_scope: ClassVar[str]
    #: Hints for the policy contract suite (cachekit.testing.contract), the same for every
    #: scope. The speed values suit the toy model's trajectory, whose modulation drifts by
    #: about 1 per step.
    contract: ClassVar[PolicyContract] = PolicyContract(
        lossless={"threshold": 0.0}, speed_knob="threshold",
        speed_values=(0.0, 0.5, 1.0, 2.0, 4.0), warmup_knob="warmup_steps",
        stress={"warmup_steps": 1})

    def __init__(self, config: Any = None, registry: Any = None) -> None:
        self.config = config or self.config_cls()
        self.indicator = Indicator.from_config(self.config, self.name, self.indicator_scope)

    def new_state(self, call: ChunkCall) -> "IndicatorState":
        return IndicatorState()

    def decide(self, call: ChunkCall, probe: Probe, state: "IndicatorState",
               memory: dict) -> Decision:
        # Syncs the device once (the distance); engine calls run eagerly, outside any
        # compiled region.
        c = self.config
        forced = None
        if call.step < c.warmup_steps:
            forced = "warmup"
        elif c.compute_last and call.step == call.num_steps - 1:
            forced = "last_step"
        return state.step(self.indicator, c.threshold, modulation_of(probe, call, self.name),
                          forced)

    def observe(self, call: ChunkCall, probe: Probe, state: "IndicatorState", outcome: Outcome,
                memory: dict) -> None:
        if recomputed_everything(outcome):
            state.acc = 0.0
