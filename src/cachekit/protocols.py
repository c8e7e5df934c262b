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

from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Optional, Protocol, runtime_checkable

import attrs
import torch

from .types import (ChunkCall, Decision, IterationInfo, ModelSpec, Probe, Scope, as_tuple,
                    tensor_repr)
from .wrapping import PolicyWrapper, reuse_space_of

__all__ = [
    "Policy",
    "MotionEstimator",
    "ResidualStore",
    "ModelAdapter",
    "ModelSession",
    "Outcome",
    "WindowMemory",
    "PolicyContract",
    "PolicyWrapper",
    "reuse_space_of",
]

_CONTRACT_MODES = ("chunked", "vanilla")


@attrs.frozen(kw_only=True)
class Outcome:
    """What happened in one engine call, handed to :meth:`Policy.observe` afterwards.

    ``h_out`` is the block-stack output the model will use (computed, reused or mixed);
    ``computed_tokens`` counts the tokens whose blocks ran (``num_tokens`` = all, 0 = a pure
    reuse); ``decision.tokens`` names them for a PARTIAL decision. Policies must not modify
    the tensors.
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
      * ``reuse_space`` (optional, default ``"residual"``): what a reuse repeats, one of
        :data:`cachekit.types.REUSE_SPACES` (see :attr:`cachekit.types.ChunkCall.space`);
        read it with :func:`reuse_space_of`.
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

    ``uses_output`` (optional class attribute, default True): True when the weights need
    ``h_out`` (computed after the step, used at the next one, like ``frame_diff``); False when
    they come from the probe alone (``latent_diff``, ``flow_proxy``), in which case the policy
    calls :meth:`weights` before the step with ``h_out=None``.
    """

    name: ClassVar[str]
    uses_output: ClassVar[bool]

    def weights(self, call: ChunkCall, probe: Probe, h_out: Optional[torch.Tensor],
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

    # Optional: ``velocities(x, sigma, conds, infos) -> {branch: velocity}`` for all guidance
    # branches of one iteration (``conds``/``infos`` keyed by branch, in run order), equal to
    # one ``velocity`` call per branch in that order; the samplers call it when present, so
    # an adapter can stack the branches into one forward (the bundled model's
    # ``branch_batching``). Not part of the runtime check: a session without it is valid.


@runtime_checkable
class ModelAdapter(Protocol):
    """A model the samplers can drive; it calls the engine's hook around its block stack.

    Optional: a bool attribute ``chunk_batching`` when chunked mode can run an iteration's
    chunks either as one forward (True, through ``CacheEngine.run_chunks``) or one call per
    chunk (False), and ``branch_batching`` when its sessions' ``velocities`` can stack the
    guidance branches into one forward (True) or run them one after the other (False);
    ``python -m cachekit.microbench structure`` times the variants when they are present.
    """

    name: ClassVar[str]
    spec: ModelSpec

    def session(self, *, batch: int, mode: str = "chunked", hook: Any = None) -> ModelSession: ...


# Hints a policy class declares for the public contract suite (cachekit.testing.contract):
# part of the policy's interface, so it lives in the core, not in the testing package.
def _mapping(value: Any) -> Any:
    return None if value is None else MappingProxyType(dict(value))


def _opt_str(_inst, attribute, value) -> None:
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"PolicyContract.{attribute.name}: expected a knob name or None, "
                         f"got {value!r}")


@attrs.frozen(kw_only=True)
class PolicyContract:
    """What the contract suite needs to know about a policy's knobs (all optional).

    * ``lossless``: config overrides under which the policy never reuses (e.g.
      ``{"threshold": 0.0}``; ``{}`` if the defaults already never reuse; None = unknown, the
      ``lossless`` check is skipped).
    * ``speed_knob``: a knob where a larger value means faster (fewer computed tokens), or None.
    * ``speed_values``: a few strictly increasing values of ``speed_knob`` to sweep.
    * ``warmup_knob``: the knob giving the number of always-computed first steps, or None.
    * ``mode``: ``"chunked"`` (``Scope.CHUNK``) or ``"vanilla"`` (``Scope.WINDOW``); None = from
      the policy's ``scope``.
    * ``per_call_monotonic``: also require that no single call computes more tokens at a larger
      speed value (holds for pure per-step thresholds; not for periodic or accumulating rules).
    * ``stress``: config overrides that exercise every decision path on the short toy
      scenario (e.g. ``{"phase1_steps": 0, "warmup_steps": 1}`` so a token-wise phase is
      reached in 8 steps). Applied, with the largest speed value, on top of the ``fast`` preset
      for the isolation, token-subset, one-decision, stats, state and warm-up checks, and as a
      second base of the monotonic sweep.
    * ``sampler``: overrides of the contract scenario's
      :class:`~cachekit.sampling.SamplerConfig` (e.g. ``{"num_steps": 12}`` for a long warm-up).
    """

    lossless: Optional[Mapping[str, Any]] = attrs.field(default=None, converter=_mapping,
                                                        hash=False)
    speed_knob: Optional[str] = attrs.field(default=None, validator=_opt_str)
    speed_values: tuple = attrs.field(default=(), converter=as_tuple)
    warmup_knob: Optional[str] = attrs.field(default=None, validator=_opt_str)
    mode: Optional[str] = attrs.field(default=None)
    per_call_monotonic: bool = attrs.field(default=False, converter=bool)
    stress: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping, hash=False)
    sampler: Mapping[str, Any] = attrs.field(factory=dict, converter=_mapping, hash=False)

    @mode.validator
    def _v_mode(self, _a, value) -> None:
        if value is not None and value not in _CONTRACT_MODES:
            raise ValueError(f"PolicyContract.mode: expected one of {list(_CONTRACT_MODES)} or None, "
                             f"got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.speed_knob is not None:
            v = self.speed_values
            if len(v) < 2 or any(not (a < b) for a, b in zip(v, v[1:])):
                raise ValueError(f"PolicyContract.speed_values: expected at least 2 strictly "
                                 f"increasing values of {self.speed_knob!r}, got {v!r}")
        elif self.speed_values:
            raise ValueError("PolicyContract.speed_values given without speed_knob")
        if "mode" in self.sampler:
            raise ValueError("PolicyContract.sampler cannot set 'mode'; use PolicyContract.mode")
