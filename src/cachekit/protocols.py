"""The typed interfaces of the hot path: Policy, MotionEstimator, ResidualStore, ModelAdapter.

Plugins *register* factories through pluggy hooks (see :mod:`cachekit.hookspecs`), but the
engine calls the objects they build through these plain Protocols, once per chunk call: a
pluggy call costs microseconds and would be wasted on every chunk of every step.

State ownership
---------------
Policies keep no per-chunk state on ``self``. The engine owns one state object per
``(branch, chunk)`` key (made by :meth:`Policy.new_state`) and passes it in. Window and run
boundaries drop every state explicitly, so a decision can never leak across branch, chunk,
window or run. The contract suite in :mod:`cachekit.testing` checks this for every policy.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import attrs
import torch

from .types import ChunkCall, Decision, IterationInfo, ModelSpec, Probe, Scope, tensor_repr

__all__ = [
    "Policy",
    "MotionEstimator",
    "ResidualStore",
    "ModelAdapter",
    "ModelSession",
    "Outcome",
    "WindowMemory",
]


@attrs.frozen(kw_only=True)
class Outcome:
    """What happened in one engine call, handed to :meth:`Policy.observe` afterwards.

    ``h_out`` is the block-stack output the model will use (computed, reused or mixed);
    ``computed`` is None when every token was computed, an empty tensor when none was, else
    the computed token indices. Policies must not modify the tensors.
    """

    decision: Decision
    h_in: torch.Tensor = attrs.field(eq=False, repr=tensor_repr)
    h_out: torch.Tensor = attrs.field(eq=False, repr=tensor_repr)
    computed_tokens: int
    num_tokens: int


class WindowMemory:
    """Scratch space for estimators and policies that must look at a *neighbouring* chunk.

    One dict per branch, cleared at every window start (so a chunk never compares against a
    frame from another window or branch). Keys are chosen by the user, e.g.
    ``("frame_diff.last_frame", chunk)``.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, dict[Any, Any]] = {}

    def branch(self, branch: str) -> dict[Any, Any]:
        return self._data.setdefault(branch, {})

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return sum(len(d) for d in self._data.values())


@runtime_checkable
class Policy(Protocol):
    """A reuse policy: decides, per (branch, chunk, step), what to compute.

    Class attributes:
      * ``name``: the registered name.
      * ``scope``: :class:`Scope.CHUNK` (per chunk, chunked execution), :class:`Scope.WINDOW`
        (one decision per window, vanilla execution), or None (either: the policy does not
        care what a call covers). The engine refuses calls of another scope with a clear error.
      * ``needs_residual``: whether the engine must store residuals for it (``none`` does not).
    """

    name: ClassVar[str]
    scope: ClassVar[Optional[Scope]]
    needs_residual: ClassVar[bool]
    config: Any

    def new_state(self, call: ChunkCall) -> Any:
        """Fresh per-(branch, chunk) state for the first call of that key in a window."""

    def decide(self, call: ChunkCall, probe: Probe, state: Any, memory: dict) -> Decision:
        """Return the decision for this call. ``memory`` is the branch's :class:`WindowMemory`."""

    def observe(self, call: ChunkCall, probe: Probe, state: Any, outcome: Outcome,
                memory: dict) -> None:
        """Update ``state`` after the engine applied the decision (e.g. motion weights)."""


@runtime_checkable
class MotionEstimator(Protocol):
    """Turns a chunk's signals into per-token motion weights ``[N]`` (frame-major).

    ``h_out`` is the chunk's block-stack output ``[B, N, D]``; ``probe.latent`` its input latent.
    ``memory`` is the branch's window memory, for cross-chunk comparisons (previous chunk's
    last frame). Weights are finite, ``>= 0``.
    """

    name: ClassVar[str]

    def weights(self, call: ChunkCall, probe: Probe, h_out: torch.Tensor,
                memory: dict) -> torch.Tensor: ...


@runtime_checkable
class ResidualStore(Protocol):
    """Holds one residual ``[B, N, D]`` per ``(branch, chunk)`` key.

    Guarantees: :meth:`get` returns either None or exactly the last tensor written for that key
    (with token updates applied), in the dtype it was put with; never another key's tensor,
    never a wrong shape. Under a byte budget it may *drop* entries (counted in ``evictions``),
    after which :meth:`get` returns None and the engine recomputes (counted).
    """

    nbytes: int
    peak_nbytes: int
    evictions: int

    def get(self, key: tuple[str, int]) -> Optional[torch.Tensor]: ...
    def put(self, key: tuple[str, int], residual: torch.Tensor) -> None: ...
    def update(self, key: tuple[str, int], tokens: torch.Tensor, values: torch.Tensor) -> None: ...
    def discard(self, key: tuple[str, int]) -> None: ...
    def clear(self) -> None: ...
    def check_valid(self) -> None: ...


@runtime_checkable
class ModelSession(Protocol):
    """One generation's worth of model state (per-branch K/V caches), driven by a sampler."""

    def begin_window(self, window: int, num_frames: int) -> None: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                 info: IterationInfo) -> torch.Tensor: ...


@runtime_checkable
class ModelAdapter(Protocol):
    """A model the samplers can drive; it calls the engine's hook around its block stack."""

    name: ClassVar[str]
    spec: ModelSpec

    def session(self, *, batch: int, mode: str = "chunked", hook: Any = None) -> ModelSession: ...
