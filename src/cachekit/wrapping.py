"""Policy stand-ins: :class:`PolicyWrapper` and :func:`reuse_space_of` (re-exported by
:mod:`cachekit.protocols`).

Kept free of torch so that light modules (the bench's CLI front end) can subclass the
wrapper without paying torch's import at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from .protocols import Outcome
    from .types import ChunkCall, Decision, Probe

__all__ = ["PolicyWrapper", "reuse_space_of"]


def reuse_space_of(obj: Any) -> str:
    """The reuse space a policy (or an engine used as a hook) declares; ``"residual"`` when it
    declares none. The one place that default lives."""
    return getattr(obj, "reuse_space", "residual")


class PolicyWrapper:
    """Base of objects that stand in for a policy in front of the engine (recorders, checkers).

    Copies every attribute the engine reads from a policy (``name``, ``scope``,
    ``needs_residual``, ``config``, ``reuse_space``, ``batch_chunks``), so a wrapped policy runs exactly as the
    bare one, and delegates ``new_state``/``decide``/``observe`` to it; subclasses override
    those to look at the traffic. Other attributes are looked up on the wrapped policy.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.scope = inner.scope
        self.needs_residual = inner.needs_residual
        self.config = getattr(inner, "config", None)
        self.reuse_space = reuse_space_of(inner)
        self.batch_chunks = bool(getattr(inner, "batch_chunks", True))

    def __getattr__(self, item: str) -> Any:
        if item == "inner":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(item)
        return getattr(self.inner, item)

    def new_state(self, call: ChunkCall) -> Any:
        return self.inner.new_state(call)

    def decide(self, call: ChunkCall, probe: Probe, state: Any, memory: dict) -> Decision:
        return self.inner.decide(call, probe, state, memory)

    def observe(self, call: ChunkCall, probe: Probe, state: Any, outcome: "Outcome",
                memory: dict) -> None:
        self.inner.observe(call, probe, state, outcome, memory)
