"""The ``every_other`` policy: after a warm-up, alternate compute and reuse per chunk."""

from __future__ import annotations

from typing import ClassVar

import attrs

from cachekit.config import ConfigBase, in_range, knob, to_bool
from cachekit.protocols import Outcome
from cachekit.protocols import PolicyContract
from cachekit.types import ChunkCall, Decision, DecisionKind, Probe, Scope

__all__ = ["EveryOtherConfig", "EveryOtherPolicy", "EveryOtherState"]


@attrs.frozen(kw_only=True)
class EveryOtherConfig(ConfigBase):
    """Settings of ``every_other``: which steps of a chunk are always computed."""

    tag_prefix: ClassVar[str] = "eo"
    presets: ClassVar[dict] = {"slow": {"warmup_steps": 4}, "fast": {"warmup_steps": 1}}

    warmup_steps: int = knob(
        2, converter=int, validator=in_range(1),
        doc="First steps of each chunk that are always computed (default 2, unit: steps of "
            "the chunk; at least 1, since step 0 has no residual to reuse).",
        trade="larger = more faithful, slower")
    compute_last: bool = knob(
        True, converter=to_bool,
        doc="Always compute each chunk's last step (default true).",
        trade="on = more faithful final frames, one more compute per chunk")


class EveryOtherState:
    """Per-(branch, chunk) state, owned by the engine: did this chunk's last step reuse?"""

    __slots__ = ("reused_last",)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reused_last = False

    def check_valid(self) -> None:
        assert isinstance(self.reused_last, bool), self.reused_last


class EveryOtherPolicy:
    """Alternate compute and reuse per (branch, chunk); never reuse two steps in a row."""

    name: ClassVar[str] = "every_other"
    scope: ClassVar[Scope] = Scope.CHUNK
    needs_residual: ClassVar[bool] = True
    # Hints for cachekit's policy contract suite: settings under which the policy never
    # reuses (a warm-up longer than any chunk) and the knob holding the warm-up length.
    contract: ClassVar[PolicyContract] = PolicyContract(
        lossless={"warmup_steps": 1000}, warmup_knob="warmup_steps")

    def __init__(self, config: EveryOtherConfig | None = None, registry=None) -> None:
        # The engine builds the policy as factory(config, registry); the registry lets a
        # policy build helpers by name (e.g. a motion estimator). This one needs none.
        self.config = config or EveryOtherConfig()

    def new_state(self, call: ChunkCall) -> EveryOtherState:
        return EveryOtherState()

    def decide(self, call: ChunkCall, probe: Probe, state: EveryOtherState,
               memory: dict) -> Decision:
        c = self.config
        if call.step < c.warmup_steps:
            return Decision.compute("warmup")
        if c.compute_last and call.step == call.num_steps - 1:
            return Decision.compute("last_step")
        if state.reused_last:
            return Decision.compute("alternate")
        return Decision.reuse("alternate")

    def observe(self, call: ChunkCall, probe: Probe, state: EveryOtherState,
                outcome: Outcome, memory: dict) -> None:
        # Record what the engine *did*, not what we asked for: a reuse whose residual was
        # evicted is turned into a compute (and counted in the summary).
        state.reused_last = outcome.decision.kind is DecisionKind.REUSE
