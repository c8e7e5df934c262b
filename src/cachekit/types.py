"""Frozen values that cross a boundary between sampler, model adapter, engine and policies.

All classes here are immutable attrs classes validated at construction: a bad value raises
:class:`cachekit.errors.ConfigError` naming the field, the expected range and the value.
Tensor fields print their shape only; a :class:`Probe`'s tensors compare by identity (the same
signals), a :class:`Decision`'s token subset by value.

Vocabulary (see ``docs/architecture.md``): a *window* is what one sampler pass denoises; a
*chunk* is a causal block of frames sharing one timestep; a *step* is the k-th update of one
chunk; a *branch* is a guidance pass named by the caller; a *token* is one patch of one frame,
frame-major inside a chunk.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import attrs
import torch

from .errors import ConfigError, field_converter, invalid_value

__all__ = [
    "REUSE_SPACES",
    "ChunkState",
    "Scope",
    "ChunkCall",
    "Probe",
    "Decision",
    "DecisionKind",
    "IterationInfo",
    "BlockRunner",
    "ChunkHook",
    "GroupRunner",
    "tensor_repr",
    "ModelSpec",
]


def _same_object(a: Any, b: Any) -> bool:
    return a is b


def _same_tokens(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))


_BY_IDENTITY = attrs.cmp_using(eq=_same_object)
_BY_VALUE = attrs.cmp_using(eq=_same_tokens)


def tensor_repr(t: Any) -> str:
    """Shape-only repr for tensor fields (values would flood logs)."""
    if t is None:
        return "None"
    if isinstance(t, torch.Tensor):
        return f"Tensor{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}"
    return repr(t)


def as_tuple(value: Iterable[Any]) -> tuple:
    """attrs converter: any iterable to a tuple (typed, unlike ``converter=as_tuple``)."""
    return tuple(value)


def _check(cond: bool, setting: str, expected: str, got: Any, fix: str | None = None) -> None:
    if not cond:
        raise ConfigError(invalid_value(setting, expected, got, fix))


def _non_negative_int(name: str):
    def v(_inst, _attr, value):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
               name, "an int >= 0", value)
    return v


def _positive_int(name: str):
    def v(_inst, _attr, value):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               name, "an int >= 1", value)
    return v


class ChunkState(enum.Enum):
    """What a chunk of the current window does in one iteration of the schedule."""

    PENDING = "pending"      # not started yet (pure noise); never run in chunked mode
    ACTIVE = "active"        # updated this iteration: one denoising step
    FINISHED = "finished"    # all steps done; only its context K/V matters
    PREFIX = "prefix"        # clean conditioning frames (long-video overlap)


#: What an engine call can wrap (:attr:`ChunkCall.space`, a policy's ``reuse_space``).
REUSE_SPACES = ("residual", "latent_delta")


class Scope(enum.Enum):
    """What one engine call covers."""

    CHUNK = "chunk"    # one chunk (chunked execution; FlowCache, MotionCache)
    WINDOW = "window"  # the whole window as one unit (vanilla execution; TeaCache)


@attrs.frozen(kw_only=True)
class IterationInfo:
    """One row of the schedule as the sampler hands it to a model session.

    ``states[g]`` and ``steps[g]`` describe chunk ``g`` of the window: ``steps[g]`` is the
    number of updates chunk ``g`` had before this iteration (0..num_steps-1 while ACTIVE,
    ``num_steps`` once FINISHED, 0 while PENDING, ``num_steps`` for PREFIX chunks).

    ``step_sizes[g]`` (optional) is the change of chunk ``g``'s noise level in this iteration's
    Euler update (``sigma_next - sigma_now``: negative while ACTIVE, 0 otherwise). Samplers
    that know it pass it; adapters need it for ``latent_delta`` reuse.
    """

    window: int = attrs.field(validator=_non_negative_int("window"))
    iteration: int = attrs.field(validator=_non_negative_int("iteration"))
    num_iterations: int = attrs.field(validator=_positive_int("num_iterations"))
    branch: str = attrs.field()
    num_steps: int = attrs.field(validator=_positive_int("num_steps"))
    chunk_frames: int = attrs.field(validator=_positive_int("chunk_frames"))
    states: tuple[ChunkState, ...] = attrs.field(converter=as_tuple)
    steps: tuple[int, ...] = attrs.field(converter=as_tuple)
    step_sizes: Optional[tuple[float, ...]] = attrs.field(
        default=None, converter=lambda v: None if v is None else tuple(float(x) for x in v))

    @branch.validator
    def _v_branch(self, _a, value):
        _check(isinstance(value, str) and value != "", "branch",
               "a non-empty string such as 'cond' or 'uncond'", value,
               "Pass the guidance branch explicitly; cachekit never infers it from call parity.")

    def __attrs_post_init__(self):
        _check(len(self.states) == len(self.steps) and len(self.states) >= 1,
               "IterationInfo.steps", f"one entry per chunk ({len(self.states)} states)",
               self.steps)
        _check(self.iteration < self.num_iterations, "iteration",
               f"< num_iterations={self.num_iterations}", self.iteration)
        for g, (state, step) in enumerate(zip(self.states, self.steps)):
            _check(isinstance(state, ChunkState), f"IterationInfo.states[{g}]",
                   "a ChunkState", state)
            _check(0 <= step <= self.num_steps, f"IterationInfo.steps[{g}]",
                   f"0..num_steps={self.num_steps}", step)
            if state is ChunkState.ACTIVE:
                _check(step < self.num_steps, f"IterationInfo.steps[{g}]",
                       f"< num_steps={self.num_steps} for an ACTIVE chunk", step)
        if self.step_sizes is not None:
            _check(len(self.step_sizes) == len(self.states), "IterationInfo.step_sizes",
                   f"one entry per chunk ({len(self.states)} states)", self.step_sizes)
            for g, (state, ds) in enumerate(zip(self.states, self.step_sizes)):
                ok = math.isfinite(ds) and (ds < 0 if state is ChunkState.ACTIVE else ds == 0)
                _check(ok, f"IterationInfo.step_sizes[{g}]",
                       "< 0 for an ACTIVE chunk, 0 otherwise", ds)

    @property
    def num_chunks(self) -> int:
        return len(self.states)

    @property
    def num_frames(self) -> int:
        return self.num_chunks * self.chunk_frames

    def active_chunks(self) -> list[int]:
        return [g for g, s in enumerate(self.states) if s is ChunkState.ACTIVE]


@attrs.frozen(kw_only=True)
class ChunkCall:
    """The context of one engine call: which (branch, chunk, step) is being denoised.

    ``step`` is this chunk's own update index (0..num_steps-1): policies reason in steps, not
    iterations. For ``scope=WINDOW`` (one decision for the whole window, vanilla execution)
    ``chunk`` is 0, ``step`` is the iteration index within the window and ``num_steps`` the
    number of iterations of the window.

    ``timestep`` is the chunk's current timestep in the model's own units (for a WINDOW call,
    the mean over the window's frames); it is informational, decisions use probe signals.

    ``space`` says what the engine call wraps (one of :data:`REUSE_SPACES`):

    * ``"residual"`` (default): ``h_in`` is the block stack's input hidden states and ``run``
      returns its output; a reuse adds the cached block-stack residual (SkyReels variants).
    * ``"latent_delta"``: ``h_in`` is the chunk's latent as tokens (patchified, ``[B, N, C*p*p]``)
      and ``run`` returns the latent *after* this step's Euler update, so the cached quantity is
      the update ``x_new - x_old`` and a reuse repeats the previous step's update (MAGI-1
      variant, algorithms.md section 6.3). The engine refuses a call whose space differs from
      its policy's ``reuse_space``.
    """

    branch: str = attrs.field()
    chunk: int = attrs.field(validator=_non_negative_int("chunk"))
    step: int = attrs.field(validator=_non_negative_int("step"))
    num_steps: int = attrs.field(validator=_positive_int("num_steps"))
    window: int = attrs.field(default=0, validator=_non_negative_int("window"))
    iteration: int = attrs.field(default=0, validator=_non_negative_int("iteration"))
    frames: int = attrs.field(default=1, validator=_positive_int("frames"))
    tokens_per_frame: int = attrs.field(default=1, validator=_positive_int("tokens_per_frame"))
    timestep: float = attrs.field(default=0.0, converter=field_converter(float))  # type: ignore[misc]
    scope: Scope = attrs.field(default=Scope.CHUNK)
    space: str = attrs.field(default="residual")

    @branch.validator
    def _v_branch(self, _a, value):
        _check(isinstance(value, str) and value != "", "branch",
               "a non-empty string such as 'cond' or 'uncond'", value,
               "Pass the guidance branch explicitly; cachekit never infers it from call parity.")

    def __attrs_post_init__(self):
        _check(self.step < self.num_steps, "step", f"< num_steps={self.num_steps}", self.step)
        _check(isinstance(self.scope, Scope), "scope", "a cachekit.types.Scope", self.scope)
        _check(self.space in REUSE_SPACES, "space", f"one of {REUSE_SPACES}", self.space)

    @property
    def num_tokens(self) -> int:
        """Tokens in this call: ``frames * tokens_per_frame`` (frame-major order)."""
        return self.frames * self.tokens_per_frame

    @property
    def key(self) -> tuple[str, int]:
        """The state key: ``(branch, chunk)``."""
        return (self.branch, self.chunk)


@attrs.frozen(kw_only=True)
class Probe:
    """Cheap signals available before the blocks run, for indicators and motion estimators.

    * ``modulation``: per-frame timestep modulation ``[B, F, M, D]`` (Wan's ``e0`` per frame,
      ``M`` = 6 modulation vectors). Policies use it as the TeaCache-style indicator.
    * ``latent``: the call's input latent ``[B, C, F, H, W]`` (or None if the adapter has none).
    * ``grid``: the token grid ``(F, H_tokens, W_tokens)``; ``F*H*W`` equals the call's tokens.
    * ``patch``: the spatial patch size ``(ph, pw)`` mapping latent pixels to tokens.
    """

    modulation: Optional[torch.Tensor] = attrs.field(eq=_BY_IDENTITY, hash=False,
                                                      repr=tensor_repr, default=None)
    latent: Optional[torch.Tensor] = attrs.field(eq=_BY_IDENTITY, hash=False, repr=tensor_repr,
                                                  default=None)
    grid: tuple[int, int, int] = attrs.field(converter=as_tuple, default=(1, 1, 1))
    patch: tuple[int, int] = attrs.field(converter=as_tuple, default=(1, 1))

    def __attrs_post_init__(self):
        _check(len(self.grid) == 3 and all(isinstance(v, int) and v >= 1 for v in self.grid),
               "Probe.grid", "(F, H_tokens, W_tokens) of positive ints", self.grid)
        _check(len(self.patch) == 2 and all(isinstance(v, int) and v >= 1 for v in self.patch),
               "Probe.patch", "(ph, pw) of positive ints", self.patch)
        if self.modulation is not None:
            _check(self.modulation.dim() == 4 and self.modulation.shape[1] == self.grid[0],
                   "Probe.modulation", f"a [B, F={self.grid[0]}, M, D] tensor",
                   tensor_repr(self.modulation))
        if self.latent is not None:
            _check(self.latent.dim() == 5 and self.latent.shape[2] == self.grid[0],
                   "Probe.latent", f"a [B, C, F={self.grid[0]}, H, W] tensor",
                   tensor_repr(self.latent))


class DecisionKind(enum.Enum):
    COMPUTE = "compute"   # run the block stack on every token
    REUSE = "reuse"       # h_out = h_in + cached residual, no block runs
    PARTIAL = "partial"   # run the blocks on a token subset, reuse the rest


@attrs.frozen
class Decision:
    """What a policy returns for one (branch, chunk, step).

    Build with :meth:`compute`, :meth:`reuse` or :meth:`subset`. ``tokens`` (PARTIAL only)
    is a sorted, duplicate-free ``int64`` index tensor into the call's tokens; the engine
    checks it lies inside the chunk.
    """

    kind: DecisionKind
    tokens: Optional[torch.Tensor] = attrs.field(default=None, eq=_BY_VALUE, hash=False,
                                                 repr=tensor_repr)
    reason: str = ""

    @classmethod
    def compute(cls, reason: str = "") -> "Decision":
        return cls(DecisionKind.COMPUTE, None, reason)

    @classmethod
    def reuse(cls, reason: str = "") -> "Decision":
        return cls(DecisionKind.REUSE, None, reason)

    @classmethod
    def subset(cls, tokens: torch.Tensor, num_tokens: int, reason: str = "") -> "Decision":
        """A token subset; collapses to COMPUTE (all tokens) or REUSE (no token)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        k = int(tokens.numel())
        if k == 0:
            return cls.reuse(reason)
        if k == num_tokens:
            return cls.compute(reason)
        return cls(DecisionKind.PARTIAL, tokens, reason)

    def __attrs_post_init__(self):
        _check(isinstance(self.kind, DecisionKind), "Decision.kind", "a DecisionKind", self.kind)
        if self.kind is DecisionKind.PARTIAL:
            _check(isinstance(self.tokens, torch.Tensor) and self.tokens.dim() == 1
                   and self.tokens.numel() > 0 and self.tokens.dtype == torch.long,
                   "Decision.tokens", "a non-empty 1-D int64 tensor for PARTIAL",
                   tensor_repr(self.tokens))
        else:
            _check(self.tokens is None, "Decision.tokens", "None unless kind is PARTIAL",
                   tensor_repr(self.tokens))

    def num_computed(self, num_tokens: int) -> int:
        if self.kind is DecisionKind.COMPUTE:
            return num_tokens
        if self.kind is DecisionKind.REUSE:
            return 0
        assert self.tokens is not None
        return int(self.tokens.numel())


class BlockRunner(Protocol):
    """Runs a chunk's block stack; provided by the model adapter for each call.

    * ``run(h)`` with ``h`` of shape ``[B, N, D]`` (all tokens of the call) returns the
      block-stack output ``[B, N, D]`` (before the output head) and refreshes the chunk's
      context K/V.
    * ``run(h_sub, tokens)`` with ``tokens`` a sorted int64 index ``[K]`` and ``h_sub`` the
      block inputs at those tokens ``[B, K, D]`` returns their outputs ``[B, K, D]``. The
      subset computes Q/K/V at its true positions, writes its fresh K/V into the chunk's slot
      and attends to the whole slot (fresh at the subset, stale elsewhere) plus earlier chunks.
      Adapters that cannot do this raise :class:`NotImplementedError` with a clear message.
    """

    def __call__(self, h: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor: ...


#: The callable a model adapter invokes once per chunk (or once per window) instead of running
#: its block stack directly: ``hook(call, h_in, run, probe) -> h_out``. The engine implements it.
ChunkHook = Callable[[ChunkCall, torch.Tensor, BlockRunner, Probe], torch.Tensor]

#: Runs several chunks of one iteration and branch as ONE forward (see
#: :meth:`cachekit.engine.CacheEngine.run_chunks`): ``run(parts) -> outputs`` with ``parts`` a
#: sequence of ``(i, h, tokens)``: ``i`` the chunk's position in the engine's ``calls``, ``h``
#: ``[B, N, D]`` (``tokens`` None, all tokens) or ``[B, K, D]`` (``tokens`` the sorted int64
#: subset, as :class:`BlockRunner`). Returns one output per part in the same order and shapes.
#: Chunks attend block-causally among themselves (a later chunk sees the fresh keys/values
#: the earlier ones write in the same forward), so the result equals running them one by one.
GroupRunner = Callable[[Sequence[tuple[int, torch.Tensor, Optional[torch.Tensor]]]],
                       Sequence[torch.Tensor]]


@attrs.frozen(kw_only=True)
class ModelSpec:
    """Geometry and identity of a video model, as a model adapter declares it.

    The sampler and the engine derive token counts from it: a frame of ``height x width``
    latent pixels becomes ``(height // patch[0]) * (width // patch[1])`` tokens.
    ``chunk_frames`` is the causal block size the model was trained with and ``max_frames``
    the longest window (in latent frames) its positions cover.
    """

    name: str = attrs.field()
    channels: int = attrs.field(validator=_positive_int("channels"))
    height: int = attrs.field(validator=_positive_int("height"))
    width: int = attrs.field(validator=_positive_int("width"))
    patch: tuple[int, int] = attrs.field(converter=as_tuple)
    chunk_frames: int = attrs.field(validator=_positive_int("chunk_frames"))
    max_frames: int = attrs.field(validator=_positive_int("max_frames"))
    hidden: int = attrs.field(validator=_positive_int("hidden"))
    num_blocks: int = attrs.field(validator=_positive_int("num_blocks"))
    modulation_vectors: int = attrs.field(default=6, validator=_positive_int("modulation_vectors"))

    def __attrs_post_init__(self):
        _check(len(self.patch) == 2 and all(isinstance(v, int) and v >= 1 for v in self.patch),
               "ModelSpec.patch", "(ph, pw) of positive ints", self.patch)
        _check(self.height % self.patch[0] == 0 and self.width % self.patch[1] == 0,
               "ModelSpec.patch", f"sizes dividing height={self.height} and width={self.width}",
               self.patch)
        _check(self.max_frames % self.chunk_frames == 0, "ModelSpec.max_frames",
               f"a multiple of chunk_frames={self.chunk_frames}", self.max_frames)

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch[0]) * (self.width // self.patch[1])

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.height // self.patch[0], self.width // self.patch[1])
