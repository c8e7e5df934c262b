"""Baseline policies: ``none`` (always compute) and ``fixed_interval`` (FORA / Delta-DiT style)."""

from __future__ import annotations

from typing import ClassVar, Optional

import attrs

from cachekit.config import ConfigBase, in_range, knob, to_bool
from cachekit.protocols import PolicyContract
from cachekit.types import ChunkCall, Decision, Probe, Scope

__all__ = ["NoneConfig", "NonePolicy", "FixedIntervalConfig", "FixedIntervalPolicy"]


@attrs.frozen(kw_only=True)
class NoneConfig(ConfigBase):
    """The ``none`` policy has no knobs."""

    tag_prefix: ClassVar[str] = "none"
    presets: ClassVar[dict] = {"slow": {}, "fast": {}}


class NonePolicy:
    """Always compute every token: the uncached reference, run through the engine."""

    name: ClassVar[str] = "none"
    scope: ClassVar[Optional[Scope]] = None  # per chunk or per window alike
    needs_residual: ClassVar[bool] = False
    contract: ClassVar[PolicyContract] = PolicyContract(lossless={})

    def __init__(self, config: NoneConfig | None = None, registry=None) -> None:
        self.config = config or NoneConfig()

    def new_state(self, call: ChunkCall) -> None:
        return None

    def decide(self, call: ChunkCall, probe: Probe, state, memory) -> Decision:
        return Decision.compute("none")

    def observe(self, call, probe, state, outcome, memory) -> None:
        return None


def _positive_int(inst, attribute, value):
    in_range(1)(inst, attribute, value)


@attrs.frozen(kw_only=True)
class FixedIntervalConfig(ConfigBase):
    """Compute every ``interval``-th step after ``warmup_steps``; reuse the residual otherwise."""

    tag_prefix: ClassVar[str] = "fixed"
    presets: ClassVar[dict] = {"slow": {"interval": 2}, "fast": {"interval": 3}}

    interval: int = knob(2, converter=int, validator=in_range(1),
                         doc="Compute one step in every `interval` (steps of the chunk).",
                         trade="larger = faster, less faithful; 1 = never reuse")
    warmup_steps: int = knob(2, converter=int, validator=in_range(0),
                             doc="First steps of each chunk that are always computed.",
                             trade="larger = more faithful, slower")
    compute_last: bool = knob(True, converter=to_bool,
                              doc="Always compute each chunk's last step.",
                              trade="on = more faithful final frames, one more compute per chunk")


class FixedIntervalPolicy:
    """Content-blind periodic reuse per (branch, chunk), in the chunk's own step count."""

    name: ClassVar[str] = "fixed_interval"
    scope: ClassVar[Optional[Scope]] = None  # per chunk (chunked) or per window (vanilla)
    needs_residual: ClassVar[bool] = True
    # interval 2 -> 3 can compute more at single steps, so only totals are monotonic
    contract: ClassVar[PolicyContract] = PolicyContract(
        lossless={"interval": 1}, speed_knob="interval", speed_values=(1, 2, 3, 4),
        warmup_knob="warmup_steps")

    def __init__(self, config: FixedIntervalConfig | None = None, registry=None) -> None:
        self.config = config or FixedIntervalConfig()

    def new_state(self, call: ChunkCall) -> None:
        return None

    def decide(self, call: ChunkCall, probe: Probe, state, memory) -> Decision:
        c = self.config
        if call.step < c.warmup_steps:
            return Decision.compute("warmup")
        if c.compute_last and call.step == call.num_steps - 1:
            return Decision.compute("last_step")
        if (call.step - c.warmup_steps) % c.interval == 0:
            return Decision.compute("interval")
        return Decision.reuse("interval")

    def observe(self, call, probe, state, outcome, memory) -> None:
        return None
