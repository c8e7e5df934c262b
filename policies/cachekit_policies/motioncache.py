"""``motioncache``: motion-weighted, token-wise residual reuse per (branch, chunk) (§5, §6).

Per ACTIVE chunk, in the chunk's own step count ``s`` (reference/algorithms.md §5.3, §5.6):

1. **Warm-up** ``s < W``: compute.  **Boundary** ``s == W``: compute, accumulators to 0.
   So the first ``W + 1`` steps always compute.
2. **Chunk-wise phase** (MAGI-1 variant, §6.1; off by default): for
   ``W < s <= W + chunk_wise_only_steps``, FlowCache-style reuse of the whole chunk with a
   scalar accumulator (threshold ``chunk_wise_threshold``); token accumulators stay at 0.
3. **Token-wise phase**, ``s > W + chunk_wise_only_steps``. Distance ``d`` = the indicator on
   the chunk's per-frame modulation (``global``: one value for the chunk; ``token``: one per
   frame, shared by the frame's tokens). Per token ``a = acc + d * w``; ``need = a >= tau``;
   optional symmetric temporal vote (θ); if ``0 < |need| / N < rho`` the whole chunk is reused
   and ``a`` is kept (min update ratio), else ``a[need] = 0``. Returns
   ``Decision.subset(need)``: all, none or a sorted token subset.

   * **Phase 1**: until ``phase1_steps`` token-wise steps *computed something*, ``w = 1`` (so
     decisions are all-or-nothing).
   * **Phase 2**: motion weights from the configured estimator (registry name), refreshed
     after every step and used at the next (output-based estimators such as ``frame_diff``),
     or computed from the probe at the step itself (latent-based estimators, MAGI timing).
     With ``phase1_steps = 0`` phase 2 starts right after the boundary / chunk-wise phase.

No forced last step by default (the SkyReels reference has none; ``compute_last`` adds it).
Not reproduced from the reference (§7): per-token modulation storage (kept per frame), the
stale cross-window and cross-noise-level previous-chunk frame (frames are keyed by
``(chunk, step)`` in the window memory, see :mod:`cachekit_policies.estimators`), call-parity
branches, MAGI's stale masks at the first/last step and its one-sided post-reset vote.
Negative polynomial values are clamped to 0.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Optional

import attrs
import torch

from cachekit.config import ConfigBase, in_range, knob, one_of, to_bool
from cachekit.errors import ConfigError, invalid_value
from cachekit.motion import NORM_MODES, temporal_vote
from cachekit.protocols import Outcome
from cachekit.protocols import PolicyContract
from cachekit.types import REUSE_SPACES, ChunkCall, Decision, Probe, Scope, tensor_repr

from ._indicator import (
    Indicator,
    accumulate,
    check_coefficient_settings,
    coefficients_file_knob,
    coefficients_knob,
    coefficients_range_knob,
    modulation_of,
    recomputed_everything,
    threshold_knob,
)
from .estimators import DEFAULT_MEMORY_STEPS

__all__ = ["MotionCacheConfig", "MotionCachePolicy", "MotionCacheState"]


def _optional_float(value: Any) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return float(value)


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _estimator_name(inst, attribute, value) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(invalid_value(f"{type(inst).__name__}.{attribute.name}",
                                        "a registered motion estimator name such as "
                                        "'frame_diff', 'latent_diff' or 'flow_proxy'", value))


@attrs.frozen(kw_only=True)
class MotionCacheConfig(ConfigBase):
    """Settings of ``motioncache``; defaults are the paper's SkyReels run (§5.8)."""

    tag_prefix: ClassVar[str] = "motioncache"
    # Only one configuration is published (§5.8, the defaults); the paper does not say whether
    # it is the slow or the fast row. `fast` raises tau as FlowCache's fast script does.
    presets: ClassVar[dict] = {"slow": {"threshold": 0.10}, "fast": {"threshold": 0.15}}

    threshold: float = threshold_knob(
        0.1, doc="tau: per-token accumulated weighted drift at which a token is recomputed "
                 "(token_cache_threshold). Unitless (the polynomial's output). Default 0.1.")
    warmup_steps: int = knob(
        4, converter=int, validator=in_range(0),
        doc="W: warm-up steps of each chunk; steps 0..W (W + 1 steps, the boundary included) "
            "always compute. Unit: the chunk's steps. Default 4.",
        trade="larger = more faithful, slower")
    phase1_steps: int = knob(
        6, converter=int, validator=in_range(0),
        doc="P1: token-wise steps *with some compute* that use uniform weights (chunk-level, "
            "all-or-nothing decisions) before motion weights switch on. Default 6.",
        trade="larger = motion weights start later (closer to flowcache)")
    chunk_wise_only_steps: int = knob(
        0, converter=int, validator=in_range(0),
        doc="MAGI-1 variant: steps after the boundary with FlowCache-style whole-chunk reuse "
            "before the token-wise phase (MAGI config: 20 with warmup_steps=5 counted as "
            "W=4 here, phase1_steps=0). Default 0 (SkyReels).",
        trade="larger = longer chunk-level phase; no token subsets there")
    chunk_wise_threshold: Optional[float] = knob(
        None, converter=_optional_float,
        validator=attrs.validators.optional(in_range(0.0)),
        doc="Threshold of the chunk-wise phase (MAGI rel_l1_thresh); None = `threshold`. "
            "Default None.",
        trade="larger = more whole-chunk reuse in that phase")
    distance_mode: str = knob(
        "global", validator=one_of("global", "token"),
        doc="'global': one drift for the chunk's whole modulation (paper); 'token': one drift "
            "per frame, shared by its tokens (the reference's per-token e0 holds the same "
            "information, §7.7). Identical under diffusion forcing (one timestep per chunk). "
            "Default 'global'.",
        trade="none under diffusion forcing")
    estimator: str = knob(
        "frame_diff", validator=_estimator_name,
        doc="Motion estimator (registry name): 'frame_diff' (output hidden states, SkyReels), "
            "'latent_diff' (input latent, MAGI-1), 'flow_proxy' (normal-flow speed), or a "
            "plugin's. Default 'frame_diff'.",
        trade="frame_diff needs the output (one step stale); latent ones are fresh but see "
              "the noise of early steps")
    weight_norm_mode: str = knob(
        "max_rescale", validator=one_of(*NORM_MODES),
        doc="Per-frame normalisation of the motion map: 'mean' (mean 1, unbounded), 'max' "
            "([0, 1]), 'max_rescale' ([floor, 1], paper). Default 'max_rescale'.",
        trade="'max'/'max_rescale' only slow accumulation down (w <= 1); 'mean' also speeds "
              "moving tokens up")
    weight_floor: float = knob(
        0.6, converter=float, validator=in_range(0.0, 1.0),
        doc="phi: lowest weight of 'max_rescale' (static tokens accumulate at phi x the drift). "
            "Default 0.6.",
        trade="lower = static tokens reused longer (faster, less faithful)")
    weight_power: float = knob(
        1.0, converter=float, validator=in_range(0.0, lo_open=True),
        doc="Exponent on the normalised motion map before the floor (MAGI "
            "temporal_weight_power). Default 1.0.",
        trade="> 1 = only the fastest tokens get high weights (faster, less faithful)")
    temporal_vote: bool = knob(
        True, converter=to_bool,
        doc="Symmetric per-position majority vote over the chunk's frames "
            "(enable_temporal_consistency). Default on.",
        trade="on = temporally coherent token sets; can add or drop recomputes")
    vote_threshold: float = knob(
        0.5, converter=float, validator=in_range(0.0, 1.0),
        doc="theta: a position is recomputed in every frame when more than this fraction of "
            "its frames need it. Default 0.5.",
        trade="larger = fewer recomputes (faster)")
    min_update_ratio: float = knob(
        0.4, converter=float, validator=in_range(0.0, 1.0),
        doc="rho: when 0 < recomputed fraction < rho, reuse the whole chunk instead and keep "
            "the accumulators (they will trigger a larger update later). 0 disables. "
            "Default 0.4.",
        trade="larger = fewer, larger partial updates (less overhead per computed token)")
    compute_last: bool = knob(
        False, converter=to_bool,
        doc="Always compute each chunk's last step (the SkyReels reference does not). "
            "Default off.",
        trade="on = cleaner final frames, one more compute per chunk and branch")
    motion_memory_steps: int = knob(
        DEFAULT_MEMORY_STEPS, converter=int, validator=in_range(1),
        doc="Steps of its own last frame a chunk keeps in the window memory for the next chunk "
            "(which compares at the same step). Must exceed the schedule's ar_step, else the "
            "next chunk's frame 0 falls back to frame 1's map. Default 8.",
        trade="larger = more memory (one [B, HW, D] frame per step and chunk)")
    reuse_space: str = knob(
        "residual", validator=one_of(*REUSE_SPACES),
        doc="What a reused token repeats: 'residual' = the block stack's residual from its "
            "last computed step, put through this step's output head (SkyReels variant); "
            "'latent_delta' = the latent update x_new - x_old of its last step, so the "
            "reused part of the chunk moves exactly as it moved then (MAGI-1 variant, "
            "algorithms.md 6.3). 'latent_delta' needs an adapter that supports it in chunked "
            "mode (refdit does). Default 'residual'.",
        trade="'latent_delta' skips the output head too, but repeats a step whose size "
              "was set by the previous noise level")
    coefficients: tuple = coefficients_knob()
    coefficients_file: Optional[str] = coefficients_file_knob()
    coefficients_x_range: tuple = coefficients_range_knob()

    def __attrs_post_init__(self) -> None:
        check_coefficient_settings(self)

    @property
    def token_phase_start(self) -> int:
        """First step of the token-wise phase: ``W + 1 + chunk_wise_only_steps``."""
        return self.warmup_steps + 1 + self.chunk_wise_only_steps


@attrs.define(slots=True)
class MotionCacheState:
    """Per-(branch, chunk) state of ``motioncache``.

    * ``acc`` ``[N]`` float32: per-token accumulated weighted drift (None before first use);
    * ``weights`` ``[N]``: the motion weights for the next step (phase 2), else None;
    * ``prev``: the chunk's modulation at its previous step, per frame ``[B, F, M, D]``;
    * ``chunk_acc``: scalar accumulator of the chunk-wise phase;
    * ``p1_count`` / ``p1_done``: token-wise steps that computed something / phase 2 reached.
    """

    acc: Optional[torch.Tensor] = attrs.field(default=None, repr=tensor_repr)
    weights: Optional[torch.Tensor] = attrs.field(default=None, repr=tensor_repr)
    prev: Optional[torch.Tensor] = attrs.field(default=None, repr=tensor_repr)
    chunk_acc: float = 0.0
    p1_count: int = 0
    p1_done: bool = False

    def reset(self) -> None:
        self.acc = self.weights = self.prev = None
        self.chunk_acc = 0.0
        self.p1_count = 0
        self.p1_done = False

    def zero_acc(self, n: int, device: Any) -> None:
        self.acc = torch.zeros(n, dtype=torch.float32, device=device)
        self.chunk_acc = 0.0

    def check_valid(self) -> None:
        if self.acc is not None:
            assert self.acc.dim() == 1, f"acc must be [N], got {tuple(self.acc.shape)}"
            assert bool(torch.isfinite(self.acc).all()) and bool((self.acc >= 0).all()), \
                "acc must be finite and >= 0"
        if self.weights is not None:
            assert self.acc is None or self.weights.shape == self.acc.shape, "weights vs acc"
            assert bool(torch.isfinite(self.weights).all()) and bool((self.weights >= 0).all())
        assert self.prev is None or self.prev.dim() == 4, "prev must be [B, F, M, D]"
        assert math.isfinite(self.chunk_acc) and self.chunk_acc >= 0.0
        assert self.p1_count >= 0


class MotionCachePolicy:
    """Motion-weighted token-wise reuse (see module docstring)."""

    name: ClassVar[str] = "motioncache"
    scope: ClassVar[Scope] = Scope.CHUNK
    needs_residual: ClassVar[bool] = True
    #: Hints for the policy contract suite (cachekit.testing.contract). The speed values suit
    #: the toy model's trajectory, whose modulation drifts by about 1 per step.
    contract: ClassVar[PolicyContract] = PolicyContract(
        lossless={"threshold": 0.0}, speed_knob="threshold",
        speed_values=(0.0, 0.5, 1.0, 2.0, 4.0), warmup_knob="warmup_steps",
        stress={"warmup_steps": 1, "phase1_steps": 0})

    def __init__(self, config: MotionCacheConfig | None = None, registry: Any = None) -> None:
        self.config = c = config or MotionCacheConfig()
        self.indicator = Indicator.from_config(c, self.name, "chunk")
        options = dict(norm=c.weight_norm_mode, floor=c.weight_floor, power=c.weight_power,
                       memory_steps=c.motion_memory_steps)
        if registry is None:
            # Built directly (not through a Registry): use the built-in estimators.
            from .estimators import ESTIMATORS

            if c.estimator not in ESTIMATORS:
                raise ConfigError(invalid_value(
                    "MotionCacheConfig.estimator", f"one of {sorted(ESTIMATORS)} without a "
                    f"registry", c.estimator, "Build the policy with Registry.create_policy() "
                    "to use a plugin's estimator."))
            self.estimator = ESTIMATORS[c.estimator][0](**options)
        else:
            self.estimator = registry.create_estimator(c.estimator, **options)
        self._weights_after = bool(getattr(self.estimator, "uses_output", True))

    @property
    def reuse_space(self) -> str:
        """Read by the engine and the model adapter (see ``ChunkCall.space``)."""
        return self.config.reuse_space

    def new_state(self, call: ChunkCall) -> MotionCacheState:
        return MotionCacheState()

    # -- helpers ------------------------------------------------------------------------------
    def _motion_weights(self, call: ChunkCall, probe: Probe, h_out: Optional[torch.Tensor],
                        memory: dict) -> torch.Tensor:
        w = self.estimator.weights(call, probe, h_out, memory)
        if not isinstance(w, torch.Tensor) or w.shape != (call.num_tokens,):
            raise ConfigError(invalid_value(
                f"weights of motion estimator {self.config.estimator!r} for {call.key}",
                f"a [{call.num_tokens}] tensor", tensor_repr(w)))
        return w.to(torch.float32)

    # -- the policy ---------------------------------------------------------------------------
    def decide(self, call: ChunkCall, probe: Probe, state: MotionCacheState,
               memory: dict) -> Decision:
        # Syncs the device (distance, token count); the engine runs it eagerly, outside any
        # compiled region.
        c = self.config
        s, n = call.step, call.num_tokens
        mod = modulation_of(probe, call, self.name)
        prev, state.prev = state.prev, mod          # overwritten at every step (§5.6 step 7)
        if state.acc is None or state.acc.numel() != n:
            state.zero_acc(n, mod.device)

        if s < c.warmup_steps:
            state.zero_acc(n, mod.device)
            return Decision.compute("warmup")
        if s == c.warmup_steps:
            state.zero_acc(n, mod.device)
            state.p1_count = 0
            return Decision.compute("boundary")
        if c.compute_last and s == call.num_steps - 1:
            state.zero_acc(n, mod.device)
            return Decision.compute("last_step")
        if prev is None or prev.shape != mod.shape:
            state.zero_acc(n, mod.device)
            return Decision.compute("no_previous")

        if s < c.token_phase_start:                   # chunk-wise phase (MAGI variant)
            state.acc = torch.zeros_like(state.acc)
            d = self.indicator.distance(mod, prev)
            if not math.isfinite(d):
                state.chunk_acc = 0.0
                return Decision.compute("nonfinite_distance")
            thr = c.threshold if c.chunk_wise_threshold is None else c.chunk_wise_threshold
            compute, state.chunk_acc = accumulate(state.chunk_acc, d, thr)
            return Decision.compute("chunk_wise") if compute else Decision.reuse("chunk_wise")

        # token-wise phase
        if c.distance_mode == "global":
            d_any: Any = self.indicator.distance(mod, prev)
            finite = math.isfinite(d_any)
        else:
            d_frame = self.indicator.frame_distance(mod, prev)              # [F]
            finite = bool(torch.isfinite(d_frame).all())
            d_any = d_frame.to(torch.float32).repeat_interleave(call.tokens_per_frame)
        if not finite:
            state.zero_acc(n, mod.device)
            return Decision.compute("nonfinite_distance")

        phase = "phase2" if state.p1_done else "phase1"
        if state.p1_done and not self._weights_after:
            state.weights = self._motion_weights(call, probe, None, memory)
        w = state.weights if state.p1_done and state.weights is not None else None
        a = state.acc + (d_any * w if w is not None else d_any)
        need = a >= c.threshold
        if c.temporal_vote and call.frames > 1:
            need = temporal_vote(need, call.frames, c.vote_threshold)
        k = int(need.sum())
        if 0 < k and k / n < c.min_update_ratio:
            state.acc = a                              # skip the chunk, keep the accumulators
            return Decision.reuse("min_update_ratio")
        state.acc = a.masked_fill(need, 0.0)
        return Decision.subset(torch.nonzero(need).flatten(), n, phase)

    def observe(self, call: ChunkCall, probe: Probe, state: MotionCacheState,
                outcome: Outcome, memory: dict) -> None:
        c = self.config
        if recomputed_everything(outcome) and state.acc is not None:
            state.acc = torch.zeros_like(state.acc)
            state.chunk_acc = 0.0
        s = call.step
        start = c.token_phase_start
        if not state.p1_done:
            if s >= start and outcome.computed_tokens > 0:
                state.p1_count += 1
                if state.p1_count >= c.phase1_steps:
                    state.p1_done = True
            elif s == start - 1 and c.phase1_steps == 0:
                state.p1_done = True
        if state.p1_done and self._weights_after:
            state.weights = self._motion_weights(call, probe, outcome.h_out, memory)
