"""Record an uncached trajectory once, replay it through an engine with any policy.

A policy's decisions change the video, and so the inputs every later call sees. To compare
decisions *across settings* (does a larger threshold ever compute more?) or *across call
orders* (are (branch, chunk) states really isolated?), the inputs must be held fixed. This
module does that:

* :func:`record_trajectory` samples a video with :class:`~cachekit.testing.ToyModel` (or any
  adapter) **without** a cache, through a recording hook. Each engine call is stored as a
  :class:`RecordedCall`: its :class:`~cachekit.types.ChunkCall`, block input ``h_in`` ``[B, N, D]``,
  :class:`~cachekit.types.Probe` and full block-stack output ``h_out`` ``[B, N, D]``.
* :func:`replay` drives a :class:`~cachekit.engine.CacheEngine` over those calls with a
  :class:`ReplayRunner` in place of the model: ``run(h)`` answers the recorded ``h_out`` and
  ``run(h_sub, idx)`` the recorded ``h_out[:, idx]``. The policy sees exactly the recorded
  ``h_in`` and probe whatever it decided before; only its own state, the stored residuals and
  the ``Outcome.h_out`` it observes depend on its choices.

Replays can select a subset of the calls (one (branch, chunk) alone) and reorder them (guidance
branches in reverse order inside each iteration): the contract suite
(:mod:`cachekit.testing.contract`) uses both. Every replay hands the engine fresh copies of the
recorded tensors and, with ``strict=True``, fails if a policy modified them in place.

Example::

    traj = record_trajectory(mode="chunked")            # the contract suite's scenario
    engine = CacheEngine.from_name("fixed_interval", interval=3)
    result = replay(engine, traj)
    result.stats.computed_token_fraction
    alone = replay(CacheEngine(engine.policy), traj.select(lambda c: c.key == ("cond", 1)))
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import attrs
import torch

from ..types import ChunkCall, Probe, tensor_repr

__all__ = [
    "RecordedCall",
    "Trajectory",
    "TrajectoryRecorder",
    "ReplayRunner",
    "ReplayResult",
    "record_trajectory",
    "replay",
    "default_sampler_config",
]


def _clone_probe(probe: Probe) -> Probe:
    return attrs.evolve(
        probe,
        modulation=None if probe.modulation is None else probe.modulation.clone(),
        latent=None if probe.latent is None else probe.latent.clone())


def _same_probe(a: Probe, b: Probe) -> Optional[str]:
    """Name of the first probe tensor that differs, or None."""
    for field in ("modulation", "latent"):
        x, y = getattr(a, field), getattr(b, field)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return f"probe.{field}"
    return None


@attrs.frozen(kw_only=True)
class RecordedCall:
    """One engine call of an uncached run: context, block input, probe, full block output."""

    index: int
    call: ChunkCall
    h_in: torch.Tensor = attrs.field(eq=False, repr=tensor_repr)    # [B, N, D]
    probe: Probe = attrs.field(eq=False)
    h_out: torch.Tensor = attrs.field(eq=False, repr=tensor_repr)   # [B, N, D]

    @property
    def key(self) -> tuple[int, str, int, int]:
        """``(window, branch, chunk, step)``: unique within a trajectory."""
        c = self.call
        return (c.window, c.branch, c.chunk, c.step)


def _calls(items: Iterable[RecordedCall]) -> tuple[RecordedCall, ...]:
    return tuple(items)


@attrs.frozen(kw_only=True)
class Trajectory:
    """The recorded calls of one uncached generation, in call order (immutable).

    ``mode`` is the execution mode it was recorded in (``"chunked"``: one call per active
    chunk, :attr:`~cachekit.types.Scope.CHUNK`; ``"vanilla"``: one call per window and
    iteration, :attr:`~cachekit.types.Scope.WINDOW`); a policy must have the matching scope.
    ``video`` is the uncached result ``[B, C, F, H, W]`` (None for hand-built trajectories).
    """

    calls: tuple[RecordedCall, ...] = attrs.field(converter=_calls)
    mode: str = "chunked"
    video: Optional[torch.Tensor] = attrs.field(default=None, eq=False, repr=tensor_repr)

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        return iter(self.calls)

    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(sorted({rc.call.window for rc in self.calls}))

    @property
    def branches(self) -> tuple[str, ...]:
        """Branch names in order of first appearance."""
        return tuple(dict.fromkeys(rc.call.branch for rc in self.calls))

    def keys(self) -> list[tuple[int, str, int]]:
        """Distinct ``(window, branch, chunk)`` in order of first appearance."""
        return list(dict.fromkeys((rc.call.window, rc.call.branch, rc.call.chunk)
                                  for rc in self.calls))

    @property
    def total_tokens(self) -> int:
        return sum(rc.call.num_tokens for rc in self.calls)

    def select(self, keep: Callable[[ChunkCall], bool]) -> "Trajectory":
        """The calls whose :class:`ChunkCall` satisfies ``keep``, in the same order."""
        return attrs.evolve(self, calls=tuple(rc for rc in self.calls if keep(rc.call)))

    def branches_reversed(self) -> "Trajectory":
        """Same calls; inside each (window, iteration) the guidance branches run in reverse
        order (``uncond`` before ``cond``). Chunk order inside a branch is kept."""
        rank = {b: i for i, b in enumerate(self.branches)}
        out: list[RecordedCall] = []
        group: list[RecordedCall] = []

        def flush() -> None:
            out.extend(sorted(group, key=lambda rc: -rank[rc.call.branch]))  # stable
            group.clear()

        for rc in self.calls:
            if group and (group[0].call.window, group[0].call.iteration) != \
                    (rc.call.window, rc.call.iteration):
                flush()
            group.append(rc)
        flush()
        return attrs.evolve(self, calls=tuple(out))


class TrajectoryRecorder:
    """A stand-in for an engine that computes every call and records it (see module doc).

    It implements the engine's lifecycle (``begin_run`` / ``begin_window`` / ``end_window`` /
    ``end_run``) so a sampler drives it like a :class:`~cachekit.engine.CacheEngine`.
    """

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []
        self._window: Optional[int] = None

    def begin_run(self, **info: Any) -> None:
        self.calls = []

    def begin_window(self, window: int) -> None:
        self._window = int(window)

    def end_window(self) -> None:
        self._window = None

    def end_run(self) -> None:
        return None

    def __call__(self, call: ChunkCall, h_in: torch.Tensor, run: Any, probe: Probe) -> torch.Tensor:
        h_ref = h_in.clone()
        h_out = run(h_in)
        self.calls.append(RecordedCall(index=len(self.calls), call=call, h_in=h_ref,
                                       probe=_clone_probe(probe), h_out=h_out.detach().clone()))
        return h_out


def default_sampler_config(mode: str = "chunked") -> Any:
    """The contract scenario: 12 frames in 2 overlapping windows (8 frames, 2 of overlap), chunks
    of 2 frames, 8 steps, ``ar_step=1``, guidance 4 (``cond`` and ``uncond`` branches)."""
    from ..sampling import SamplerConfig  # the sampler imports the schedule module: lazily

    return SamplerConfig(num_frames=12, num_steps=8, base_num_frames=8, overlap_history=2,
                         causal_block_size=2, ar_step=1, guidance_scale=4.0, mode=mode)


def record_trajectory(adapter: Any = None, *, config: Any = None, mode: str | None = None,
                      cond: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
                      seed: int = 0) -> Trajectory:
    """Sample once without a cache and record every engine call.

    :param adapter: a model adapter; default ``ToyModel(seed=0)``.
    :param config: a :class:`~cachekit.sampling.SamplerConfig`; default
        :func:`default_sampler_config` (``mode`` overrides its mode).
    :param cond, uncond: encoded conditions; default the toy's label 3 and its null condition
        (two branches). Pass ``uncond=None`` with a custom ``cond`` for a single branch.
    """
    from ..sampling import generate
    from .toy import ToyModel

    if config is None:
        config = default_sampler_config(mode or "chunked")
    elif mode is not None:
        config = config.evolve(mode=mode)
    if adapter is None:
        adapter = ToyModel(seed=0)
    if cond is None:
        cond = adapter.encode_condition(torch.tensor([3]))
        uncond = adapter.null_condition(1)
    recorder = TrajectoryRecorder()
    result = generate(adapter, cond, uncond=uncond, config=config, engine=recorder, seed=seed)
    return Trajectory(calls=tuple(recorder.calls), mode=config.mode, video=result.video)


class ReplayRunner:
    """The :class:`~cachekit.types.BlockRunner` of one recorded call.

    ``run(h)`` returns a copy of the recorded full output; ``run(h_sub, idx)`` the recorded
    output at ``idx``. It asserts what it is given: ``h`` is the recorded input (at ``idx``),
    ``idx`` a sorted, duplicate-free int64 index inside the call's tokens. ``runs`` lists the
    subsets it answered (None = all tokens).
    """

    def __init__(self, recorded: RecordedCall, *, strict: bool = True) -> None:
        self.rc = recorded
        self.strict = strict
        self.runs: list[Optional[torch.Tensor]] = []

    def __call__(self, h: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        rc = self.rc
        where = f"replayed call {rc.key} (window, branch, chunk, step)"
        n = rc.call.num_tokens
        if tokens is None:
            assert h.shape == rc.h_in.shape, (
                f"{where}: run(h) got h of shape {tuple(h.shape)}, expected the chunk's "
                f"{tuple(rc.h_in.shape)}")
            if self.strict:
                assert torch.equal(h, rc.h_in), (
                    f"{where}: run(h) got an h that is not the call's input")
            self.runs.append(None)
            return rc.h_out.clone()
        assert isinstance(tokens, torch.Tensor) and tokens.dim() == 1 and \
            tokens.dtype == torch.long, (
                f"{where}: run(h_sub, tokens) needs a 1-D int64 tensor, got {tensor_repr(tokens)}")
        k = int(tokens.numel())
        assert 0 < k < n, f"{where}: a token subset must hold 0 < K < N={n} tokens, got K={k}"
        lo, hi = int(tokens.min()), int(tokens.max())
        assert lo >= 0 and hi < n, (
            f"{where}: token subset out of the chunk: indices {lo}..{hi}, chunk has {n} tokens")
        assert k == 1 or bool((tokens[1:] > tokens[:-1]).all()), (
            f"{where}: token subset must be sorted and duplicate-free: {tokens.tolist()}")
        assert h.shape == (rc.h_in.shape[0], k, rc.h_in.shape[2]), (
            f"{where}: run(h_sub, tokens) got h_sub of shape {tuple(h.shape)}, expected "
            f"{(rc.h_in.shape[0], k, rc.h_in.shape[2])}")
        if self.strict:
            assert torch.equal(h, rc.h_in.index_select(1, tokens)), (
                f"{where}: run(h_sub, tokens) got an h_sub that is not the input at those tokens")
        self.runs.append(tokens.clone())
        return rc.h_out.index_select(1, tokens)


@attrs.frozen(kw_only=True)
class ReplayResult:
    """What a replay produced: the engine's summary, the block output of every call (in replay
    order) and, per call, the token subsets the runner answered (None = all tokens; an empty
    list = the call reused everything)."""

    stats: Any
    calls: tuple[RecordedCall, ...]
    outputs: tuple[torch.Tensor, ...] = attrs.field(eq=False, repr=False)
    runs: tuple[tuple[Optional[torch.Tensor], ...], ...] = attrs.field(eq=False, repr=False)


def replay(engine: Any, trajectory: Trajectory | Iterable[RecordedCall], *, strict: bool = True,
           run_info: dict | None = None) -> ReplayResult:
    """Drive ``engine`` over recorded calls as one run; see the module docstring.

    Opens a run, a window at each change of ``call.window`` (in the order the calls come), makes
    every call with fresh copies of ``h_in`` and the probe and a :class:`ReplayRunner`, and
    closes the run. With ``strict``, a policy (or engine) that modifies ``h_in`` or the probe
    tensors in place fails with :class:`AssertionError`.
    """
    calls = tuple(trajectory.calls if isinstance(trajectory, Trajectory) else trajectory)
    outputs: list[torch.Tensor] = []
    runs: list[tuple[Optional[torch.Tensor], ...]] = []
    engine.begin_run(**(run_info or {"replay": True}))
    window: Optional[int] = None
    try:
        for rc in calls:
            if rc.call.window != window:
                window = rc.call.window
                engine.begin_window(window)
            h_in = rc.h_in.clone()
            probe = _clone_probe(rc.probe)
            runner = ReplayRunner(rc, strict=strict)
            h_out = engine(rc.call, h_in, runner, probe)
            if strict:
                assert torch.equal(h_in, rc.h_in), (
                    f"replayed call {rc.key}: h_in was modified in place during the call "
                    f"(policies must not write to h_in, probe or Outcome tensors)")
                changed = _same_probe(probe, rc.probe)
                assert changed is None, (
                    f"replayed call {rc.key}: {changed} was modified in place during the call")
            assert isinstance(h_out, torch.Tensor) and h_out.shape == rc.h_out.shape, (
                f"replayed call {rc.key}: the engine returned {tensor_repr(h_out)}, expected "
                f"shape {tuple(rc.h_out.shape)}")
            outputs.append(h_out)
            runs.append(tuple(runner.runs))
    finally:
        stats = engine.end_run()
    return ReplayResult(stats=stats, calls=calls, outputs=tuple(outputs), runs=tuple(runs))
