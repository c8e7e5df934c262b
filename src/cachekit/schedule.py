"""Denoising schedules for chunk-by-chunk video diffusion: pure and model-agnostic.

Which chunk of a window is denoised at which iteration, and at which noise level. Nothing here
touches a model; samplers read these values and drive a model adapter with them.

Units
-----
* **Frames are model (latent) frames** everywhere in this module: one frame = one latent frame
  the transformer sees. A VAE with a temporal factor (Wan / SkyReels-V2: 4) turns ``p`` pixel
  frames into ``(p - 1) // 4 + 1`` latent frames; adapters with a VAE convert with
  :func:`latent_frames` / :func:`pixel_frames` *before* calling :func:`plan_windows` or
  :func:`diffusion_forcing_schedule`.
* A **chunk** is ``causal_block_size`` consecutive frames sharing one timestep.
* An **iteration** is one row of a schedule: one model call per guidance branch.
* A chunk's **step** is the number of denoising updates it had *before* the iteration
  (``0..num_steps-1`` while ACTIVE, ``num_steps`` once FINISHED or for a PREFIX chunk, 0 while
  PENDING). The update an ACTIVE chunk takes at step ``k`` goes from noise level
  ``sigmas[k]`` to ``sigmas[k + 1]`` of :func:`flow_sigmas` (``timesteps[k]`` in model units).

Contents
--------
* :func:`diffusion_forcing_schedule` -> :class:`DFSchedule`: SkyReels-V2 diffusion forcing
  (``generate_timestep_matrix``), reproduced exactly and cross-checked against diffusers.
* :func:`magi_schedule` -> :class:`MagiSchedule`: MAGI-1 sliding-window stages.
  Both are :class:`ChunkSchedule` values with the same per-iteration rows
  (:meth:`ChunkSchedule.chunk_rows`), so one sampler loop drives either.
* :func:`plan_windows` -> list of :class:`WindowPlan`: long videos as overlapping windows.
* :func:`flow_sigmas`, :func:`flow_timesteps`: the shifted flow-matching noise levels.

Arrays stored on the schedule values are **NumPy arrays marked read-only** (the values are frozen;
writing into them raises ``ValueError``). Copy before converting to torch
(``torch.from_numpy(a.copy())``): torch warns about non-writable arrays.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Union

import attrs
import numpy as np
import torch

from .errors import ConfigError, invalid_value
from .types import ChunkState

__all__ = [
    "PENDING_TIMESTEP",
    "FINISHED_TIMESTEP",
    "ChunkRow",
    "ChunkSchedule",
    "DFSchedule",
    "MagiSchedule",
    "WindowPlan",
    "diffusion_forcing_schedule",
    "df_num_iterations",
    "magi_schedule",
    "plan_windows",
    "latent_frames",
    "pixel_frames",
    "flow_sigmas",
    "flow_timesteps",
]

#: Timestep SkyReels-V2 puts in the step matrix for a frame that has not started (pure noise).
#: It is the ``999`` sentinel of ``generate_timestep_matrix``'s template, in model units.
PENDING_TIMESTEP: float = 999.0
#: Timestep in the step matrix for a finished or prefix (clean) frame.
FINISHED_TIMESTEP: float = 0.0

#: One iteration of a schedule: ``(state, step)`` per chunk of the window, oldest chunk first.
ChunkRow = tuple[tuple[ChunkState, int], ...]

TimestepsLike = Union[Sequence[float], np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------
# validation helpers


def _fail(setting: str, expected: str, got: Any, fix: Optional[str] = None) -> None:
    raise ConfigError(invalid_value(setting, expected, got, fix))


def _int(setting: str, value: Any, minimum: int, fix: Optional[str] = None) -> int:
    """``value`` as a Python int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool):
        _fail(setting, f"an int >= {minimum}", value, fix)
    try:
        v = operator.index(value)
    except TypeError:
        _fail(setting, f"an int >= {minimum}", value, fix)
    if v < minimum:
        _fail(setting, f"an int >= {minimum}", value, fix)
    return v


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _array_repr(a: Any) -> str:
    if a is None:
        return "None"
    if isinstance(a, np.ndarray):
        return f"ndarray{tuple(a.shape)}:{a.dtype}"
    return repr(a)


def _options(value: int, multiple: int) -> list[int]:
    """The multiples of ``multiple`` around ``value`` (the positive ones)."""
    lo = (value // multiple) * multiple
    return [v for v in (lo, lo + multiple) if v > 0]


def _round_options(value: int, multiple: int) -> str:
    return " or ".join(str(v) for v in _options(value, multiple))


# --------------------------------------------------------------------------------------------
# the common row structure


@attrs.frozen(kw_only=True)
class ChunkSchedule:
    """Per-iteration chunk rows, shared by :class:`DFSchedule` and :class:`MagiSchedule`.

    ``rows[it][g] = (state, step)`` for iteration ``it`` and chunk ``g`` (oldest first):

    * ``ACTIVE``: updated this iteration; ``step`` = updates before it, ``0..num_steps-1``;
    * ``FINISHED``: all ``num_steps`` updates done; ``step = num_steps``;
    * ``PREFIX``: clean conditioning chunk, never updated; ``step = num_steps``;
    * ``PENDING``: not started (pure noise); ``step = 0``.

    ``states(it)``/``steps(it)`` are exactly the ``states``/``steps`` of
    :class:`cachekit.types.IterationInfo`. Build with :func:`diffusion_forcing_schedule` or
    :func:`magi_schedule`; the constructor checks the rows are consistent.
    """

    num_steps: int = attrs.field()
    chunk_frames: int = attrs.field()
    num_chunks: int = attrs.field()
    num_prefix_chunks: int = attrs.field()
    rows: tuple[ChunkRow, ...] = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        T = self.num_steps
        _int("num_steps", T, 1)
        _int("chunk_frames", self.chunk_frames, 1)
        _int("num_chunks", self.num_chunks, 1)
        _int("num_prefix_chunks", self.num_prefix_chunks, 0)
        if not self.rows:
            _fail("rows", "at least one iteration", self.rows)
        for it, row in enumerate(self.rows):
            if len(row) != self.num_chunks:
                _fail(f"rows[{it}]", f"{self.num_chunks} (state, step) pairs", row)
            for g, (state, step) in enumerate(row):
                ok = {
                    ChunkState.ACTIVE: 0 <= step < T,
                    ChunkState.FINISHED: step == T,
                    ChunkState.PREFIX: step == T and g < self.num_prefix_chunks,
                    ChunkState.PENDING: step == 0,
                }.get(state, False)
                if not ok:
                    _fail(f"rows[{it}][{g}]", "ACTIVE 0..T-1, FINISHED/PREFIX T, PENDING 0 "
                          f"(T={T}, prefix chunks {self.num_prefix_chunks})", (state, step))

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_iterations(self) -> int:
        """Rows of the schedule (model calls per guidance branch)."""
        return len(self.rows)

    @property
    def num_frames(self) -> int:
        """Frames of the window: ``num_chunks * chunk_frames``."""
        return self.num_chunks * self.chunk_frames

    # -- rows ----------------------------------------------------------------------------
    def chunk_rows(self) -> tuple[ChunkRow, ...]:
        """All rows: ``rows[it][g] = (ChunkState, step)`` (see the class docstring)."""
        return self.rows

    def row(self, iteration: int) -> ChunkRow:
        return self.rows[iteration]

    def states(self, iteration: int) -> tuple[ChunkState, ...]:
        return tuple(s for s, _ in self.rows[iteration])

    def steps(self, iteration: int) -> tuple[int, ...]:
        return tuple(k for _, k in self.rows[iteration])

    def active_chunks(self, iteration: int) -> list[int]:
        """Chunks updated at ``iteration``, oldest first."""
        return [g for g, (s, _) in enumerate(self.rows[iteration]) if s is ChunkState.ACTIVE]

    def updates_per_chunk(self) -> list[int]:
        """How many iterations each chunk is ACTIVE (``num_steps`` for every non-prefix chunk)."""
        counts = [0] * self.num_chunks
        for row in self.rows:
            for g, (s, _) in enumerate(row):
                counts[g] += s is ChunkState.ACTIVE
        return counts


# --------------------------------------------------------------------------------------------
# diffusion forcing (SkyReels-V2)


@attrs.frozen(kw_only=True)
class DFSchedule(ChunkSchedule):
    """A SkyReels-V2 diffusion-forcing step matrix for one window.

    Frame-level arrays (read-only NumPy, ``I = num_iterations``, ``F = num_frames``):

    * ``step_index`` ``[I, F]`` int64: the template index of each frame *after* iteration
      ``it``; 0 = not started, ``r`` in ``1..T`` = at ``timesteps[r - 1]`` (this is the
      timestep the model sees at that iteration), ``T + 1`` = finished (or prefix).
    * ``update_mask`` ``[I, F]`` bool: frames that take a scheduler step at ``it``.
    * ``step_matrix`` ``[I, F]`` float64 or None: the timestep of each frame at ``it`` in model
      units, ``[PENDING_TIMESTEP] + timesteps + [FINISHED_TIMESTEP]`` indexed by
      ``step_index``; None unless ``timesteps`` were given.
    * ``timesteps`` ``[T]`` float64 or None: the template as given.

    ``valid_interval[it] = (start, end)`` frames the model sees at ``it`` (a multiple of
    ``chunk_frames``; the whole window whenever ``base_num_frames >= num_frames``).

    Chunk ``g`` covers frames ``[g * chunk_frames, (g + 1) * chunk_frames)``;
    :meth:`chunk_rows` gives its ``(ChunkState, step)`` with ``step = step_index - 1`` for an
    ACTIVE chunk.
    """

    ar_step: int = attrs.field()
    base_num_frames: int = attrs.field()
    num_pre_ready: int = attrs.field()
    step_index: np.ndarray = attrs.field(eq=False, repr=_array_repr)
    update_mask: np.ndarray = attrs.field(eq=False, repr=_array_repr)
    valid_interval: tuple[tuple[int, int], ...] = attrs.field(repr=False)
    timesteps: Optional[np.ndarray] = attrs.field(default=None, eq=False, repr=_array_repr)
    step_matrix: Optional[np.ndarray] = attrs.field(default=None, eq=False, repr=_array_repr)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        shape = (self.num_iterations, self.num_frames)
        for name in ("step_index", "update_mask"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != shape:
                _fail(f"DFSchedule.{name}", f"an ndarray of shape {shape}", _array_repr(a))
        if self.step_matrix is not None and self.step_matrix.shape != shape:
            _fail("DFSchedule.step_matrix", f"an ndarray of shape {shape}",
                  _array_repr(self.step_matrix))
        if len(self.valid_interval) != self.num_iterations:
            _fail("DFSchedule.valid_interval", f"{self.num_iterations} (start, end) pairs",
                  len(self.valid_interval))

    @property
    def causal_block_size(self) -> int:
        """Frames per chunk (SkyReels' ``causal_block_size``); same as ``chunk_frames``."""
        return self.chunk_frames

    def chunk_step_index(self) -> np.ndarray:
        """``step_index`` per chunk, ``[I, num_chunks]`` int64 (a read-only view)."""
        return self.step_index[:, :: self.chunk_frames]

    def chunk_update_mask(self) -> np.ndarray:
        """``update_mask`` per chunk, ``[I, num_chunks]`` bool (a read-only view)."""
        return self.update_mask[:, :: self.chunk_frames]

    def chunk_interval(self, iteration: int) -> tuple[int, int]:
        """``valid_interval[iteration]`` in chunks: ``(first chunk, one past the last)``."""
        s, e = self.valid_interval[iteration]
        return s // self.chunk_frames, e // self.chunk_frames

    def frame_timesteps(self, iteration: int) -> torch.Tensor:
        """The per-frame timesteps ``[F]`` (float64, a fresh tensor) of ``iteration``."""
        if self.step_matrix is None:
            _fail("timesteps", "the timestep list (diffusion_forcing_schedule(..., "
                  "timesteps=...))", None, "Pass the scheduler's timesteps to get step_matrix.")
        assert self.step_matrix is not None
        return torch.from_numpy(self.step_matrix[iteration].copy())


def df_num_iterations(num_chunks: int, num_steps: int, ar_step: int,
                      prefix_chunks: int = 0) -> int:
    """Iterations of a diffusion-forcing window: ``T + (n - 1 - p) * min(ar_step, T)``.

    ``n`` = chunks of the window, ``p`` = prefix chunks. The lag between consecutive chunks
    is ``ar_step`` iterations, except that a chunk never waits longer than until the chunk
    before it takes its last step, so the lag is capped at ``T``: with ``ar_step > T`` the
    matrix behaves as ``ar_step = T`` (fully sequential chunks). The usual statement
    ``T + (n - 1 - p) * ar_step`` (SkyReels' TeaCache ``num_steps``) holds for ``ar_step <= T``.
    ``ar_step = 0`` gives ``T`` (synchronous).
    """
    n = _int("num_chunks", num_chunks, 1)
    T = _int("num_steps", num_steps, 1)
    ar = _int("ar_step", ar_step, 0)
    p = _int("prefix_chunks", prefix_chunks, 0)
    if p >= n:
        _fail("prefix_chunks", f"< num_chunks={n}", p)
    return T + (n - 1 - p) * min(ar, T)


def _as_timesteps(timesteps: TimestepsLike, num_steps: int) -> np.ndarray:
    if isinstance(timesteps, torch.Tensor):
        arr = timesteps.detach().to("cpu", torch.float64).numpy().copy()
    else:
        try:
            arr = np.array(timesteps, dtype=np.float64)
        except (TypeError, ValueError):
            _fail("timesteps", f"a 1-D sequence of {num_steps} numbers", timesteps)
    if arr.ndim != 1 or arr.shape[0] != num_steps:
        _fail("timesteps", f"a 1-D sequence of num_steps={num_steps} numbers",
              f"shape {tuple(arr.shape)}",
              "Pass the scheduler's timesteps (one per step), e.g. "
              "flow_timesteps(num_steps, shift).")
    if not np.all(np.isfinite(arr)):
        _fail("timesteps", "finite values", arr.tolist())
    return arr


def diffusion_forcing_schedule(
    num_frames: int,
    num_steps: int,
    base_num_frames: Optional[int] = None,
    ar_step: int = 0,
    causal_block_size: int = 1,
    num_pre_ready: int = 0,
    *,
    timesteps: Optional[TimestepsLike] = None,
) -> DFSchedule:
    """The SkyReels-V2 diffusion-forcing step matrix of one window (``generate_timestep_matrix``).

    Reproduces diffusers' ``SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix``
    (``num_latent_frames, step_template, base_num_latent_frames, ar_step, num_pre_ready,
    causal_block_size``; SkyReels' own code spells it ``casual_block_size``) element for
    element on every input both accept. Per iteration, with ``r`` the template index of each
    chunk (0 = noise, ``T + 1`` = finished; prefix chunks start at ``T + 1``):
    chunk 0 advances by one; chunk ``g > 0`` advances by one if chunk ``g - 1`` was at
    ``r >= T`` before the iteration, else it trails the new value of chunk ``g - 1`` by
    ``ar_step``; values clamp to ``[0, T + 1]``; a chunk is updated iff its value changed and
    is not ``T + 1``. The loop runs until every chunk is at ``r >= T``
    (:func:`df_num_iterations` iterations).

    Args:
        num_frames: frames of the window (latent frames), a multiple of ``causal_block_size``.
        num_steps: denoising steps ``T`` each chunk takes (``len(timesteps)``), >= 1.
        base_num_frames: the most frames one model call may hold (latent frames); default
            ``num_frames``. Rounded down to whole chunks (it is a capacity, no frame is
            dropped). When smaller than ``num_frames`` the model sees the sliding
            ``valid_interval`` and SkyReels' rule ``ar_step >= T / (base chunks)`` applies.
        ar_step: iterations by which each chunk lags the one before it; 0 = synchronous
            (all chunks at the same timestep), 5 in the SkyReels-V2 paper runs.
        causal_block_size: frames per chunk (SkyReels ``causal_block_size``, 5 in the paper).
        num_pre_ready: leading clean frames (long-video overlap prefix), a multiple of
            ``causal_block_size`` and less than ``num_frames``.
        timesteps: optional ``[T]`` timesteps in model units (e.g. :func:`flow_timesteps`);
            gives ``step_matrix``.

    Differences from diffusers (documented, deliberate; never a different matrix):

    * ``num_frames`` not a multiple of ``causal_block_size`` is **refused**: diffusers floors
      the chunk count and returns a matrix for fewer frames, silently leaving the tail frames
      (diffusers#13609) undenoised.
    * ``num_pre_ready`` not a multiple of ``causal_block_size`` is refused (diffusers floors,
      so the tail of the prefix would be regenerated); ``num_pre_ready >= num_frames`` is
      refused (diffusers crashes on an empty matrix).
    * With ``base_num_frames < num_frames``, more prefix chunks than base chunks is refused:
      diffusers returns a matrix whose ``valid_interval`` never reaches the generated chunks,
      so its pipeline would never denoise them. (Any other input: ACTIVE chunks always lie
      inside ``valid_interval``; property-tested.)
    * ``valid_interval`` ends are clamped to ``num_frames`` (diffusers returns
      ``base_num_frames`` when it exceeds the window; slicing makes the two equivalent).
    * ``step_matrix`` keeps the timesteps' float values (diffusers casts them to int64).

    Raises:
        ConfigError: an argument out of range; the message says which and how to fix it.
    """
    cbs = _int("causal_block_size", causal_block_size, 1)
    F = _int("num_frames", num_frames, cbs,
             f"A window holds at least one chunk of causal_block_size={cbs} frames.")
    T = _int("num_steps", num_steps, 1)
    ar = _int("ar_step", ar_step, 0)
    pre = _int("num_pre_ready", num_pre_ready, 0)
    base = F if base_num_frames is None else _int(
        "base_num_frames", base_num_frames, cbs,
        f"The model must hold at least one chunk of causal_block_size={cbs} frames.")
    if F % cbs:
        _fail("num_frames", f"a multiple of causal_block_size={cbs} (latent frames)", F,
              f"Use num_frames={_round_options(F, cbs)}, or a causal_block_size that divides "
              f"{F}. cachekit refuses instead of dropping the {F % cbs} tail frame(s) the way "
              "diffusers' floor division does (diffusers#13609).")
    if pre % cbs:
        _fail("num_pre_ready", f"a multiple of causal_block_size={cbs}", pre,
              f"Use num_pre_ready={_round_options(pre, cbs)} (whole prefix chunks).")
    if pre >= F:
        _fail("num_pre_ready", f"< num_frames={F} (at least one chunk to generate)", pre,
              "Drop the window: every frame is already clean.")
    n = F // cbs
    base_n = base // cbs
    p = pre // cbs
    if base_n < n and ar * base_n < T:  # SkyReels: ar_step >= T / base_num_blocks
        _fail("ar_step", f">= num_steps / base chunks = {T}/{base_n} when base_num_frames="
              f"{base} < num_frames={F}", ar,
              f"Use ar_step >= {math.ceil(T / base_n)}, or base_num_frames >= {F}, or split "
              "the video into windows with plan_windows().")
    if base_n < n and p > base_n:
        # The reference's valid_interval only slides when the chunk at its end is updated;
        # with more prefix chunks than fit the model that chunk is a prefix chunk, so the
        # interval never moves and the generated chunks are never given to the model.
        _fail("num_pre_ready", f"<= base_num_frames rounded to chunks = {base_n * cbs} when "
              f"base_num_frames={base} < num_frames={F}", pre,
              f"Keep at most the last {base_n * cbs} prefix frames, or use base_num_frames >= "
              f"{F}. (SkyReels-V2 would never denoise the frames after this prefix.)")
    tmpl = None if timesteps is None else _as_timesteps(timesteps, T)

    # The loop of generate_timestep_matrix, on chunks, with the same unclamped-then-clamped
    # arithmetic. prev[g] is chunk g's template index before the iteration.
    done = T + 1
    prev = [done if g < p else 0 for g in range(n)]
    idx_rows: list[list[int]] = []
    upd_rows: list[list[bool]] = []
    max_iterations = T + n * (T + 1) + 1  # > df_num_iterations; guards against a bug looping
    while not all(v >= T for v in prev):
        new = [0] * n
        for g in range(n):
            if g == 0 or prev[g - 1] >= T:
                new[g] = prev[g] + 1
            else:
                new[g] = new[g - 1] - ar
        new = [min(max(v, 0), done) for v in new]
        upd_rows.append([a != b and a != done for a, b in zip(new, prev, strict=True)])
        idx_rows.append(new)
        prev = new
        if len(idx_rows) > max_iterations:  # pragma: no cover - would be a bug here
            raise RuntimeError("diffusion_forcing_schedule did not terminate")

    # valid_interval: a window of base_n chunks whose end follows the newest updated chunk.
    intervals = []
    terminal = base_n
    for upd in upd_rows:
        if terminal < n and upd[terminal]:
            terminal += 1
        intervals.append((max(terminal - base_n, 0) * cbs, min(terminal, n) * cbs))

    rows = []
    for new, upd in zip(idx_rows, upd_rows, strict=True):
        row = []
        for g in range(n):
            if g < p:
                row.append((ChunkState.PREFIX, T))
            elif upd[g]:
                row.append((ChunkState.ACTIVE, new[g] - 1))
            elif new[g] == done:
                row.append((ChunkState.FINISHED, T))
            elif new[g] == 0:
                row.append((ChunkState.PENDING, 0))
            else:  # pragma: no cover - impossible for this recurrence (property-tested)
                raise RuntimeError(f"chunk {g} at index {new[g]} without an update")
        rows.append(tuple(row))

    step_index = np.repeat(np.asarray(idx_rows, dtype=np.int64), cbs, axis=1)
    update_mask = np.repeat(np.asarray(upd_rows, dtype=bool), cbs, axis=1)
    step_matrix = None
    if tmpl is not None:
        full = np.concatenate([[PENDING_TIMESTEP], tmpl, [FINISHED_TIMESTEP]])
        step_matrix = _readonly(full[step_index])
        tmpl = _readonly(tmpl)
    return DFSchedule(
        num_steps=T, chunk_frames=cbs, num_chunks=n, num_prefix_chunks=p, rows=tuple(rows),
        ar_step=ar, base_num_frames=base, num_pre_ready=pre,
        step_index=_readonly(step_index), update_mask=_readonly(update_mask),
        valid_interval=tuple(intervals), timesteps=tmpl, step_matrix=step_matrix,
    )


# --------------------------------------------------------------------------------------------
# MAGI-1


@attrs.frozen(kw_only=True)
class MagiSchedule(ChunkSchedule):
    """A MAGI-1 sliding-window schedule (same rows as :class:`DFSchedule`).

    Stage ``s`` (``num_prefix_chunks <= s < num_chunks + window_size - 1``) runs
    ``steps_per_stage`` iterations; in each, the chunks ``window(it) = [lo, hi)`` with
    ``lo = max(prefix, s - window_size + 1)`` and ``hi = min(num_chunks, s + 1)`` are ACTIVE
    and chunk ``g`` is at step ``(s - g) * steps_per_stage + idx`` (``idx`` = iteration inside
    the stage): the oldest chunk of the window is the most advanced.
    """

    window_size: int = attrs.field()
    steps_per_stage: int = attrs.field()
    stages: tuple[int, ...] = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if len(self.stages) != self.num_iterations:
            _fail("MagiSchedule.stages", f"{self.num_iterations} stage indices", len(self.stages))

    def stage(self, iteration: int) -> int:
        """The stage (``s`` above) of ``iteration``."""
        return self.stages[iteration]

    def window(self, iteration: int) -> tuple[int, int]:
        """The ACTIVE chunks ``[lo, hi)`` of ``iteration``."""
        s = self.stages[iteration]
        return (max(self.num_prefix_chunks, s - self.window_size + 1), min(self.num_chunks, s + 1))


def magi_schedule(
    num_chunks: int,
    num_steps: int,
    window_size: int,
    prefix_chunks: int = 0,
    *,
    chunk_frames: int = 1,
) -> MagiSchedule:
    """The MAGI-1 schedule: a window of up to ``window_size`` chunks slides one chunk per stage.

    Every chunk takes ``num_steps`` updates spread over ``window_size`` stages of
    ``steps_per_stage = num_steps / window_size`` iterations; at most ``window_size`` chunks
    are ACTIVE at once. Total iterations:
    ``steps_per_stage * (num_chunks + window_size - 1 - prefix_chunks)`` (the spec's
    ``steps_per_stage * (C + 3 - prefix_chunks)`` for MAGI-1's ``window_size = 4``, with ``C``
    counting the prefix chunks).

    Args:
        num_chunks: chunks of the video, prefix chunks included (MAGI-1: 24 pixel frames =
            6 latent frames per chunk).
        num_steps: updates per chunk, a multiple of ``window_size`` (MAGI-1 paper: 64).
        window_size: chunks denoised together (MAGI-1: 4).
        prefix_chunks: leading clean chunks (image / video conditioning), ``< num_chunks``.
        chunk_frames: frames per chunk (informational; the rows are per chunk).

    Raises:
        ConfigError: an argument out of range, or ``num_steps`` not divisible by
            ``window_size``.
    """
    C = _int("num_chunks", num_chunks, 1)
    T = _int("num_steps", num_steps, 1)
    W = _int("window_size", window_size, 1)
    p = _int("prefix_chunks", prefix_chunks, 0)
    cf = _int("chunk_frames", chunk_frames, 1)
    if T % W:
        _fail("num_steps", f"a multiple of window_size={W} (each stage advances "
              "num_steps / window_size steps)", T, f"Use num_steps={_round_options(T, W)}.")
    if p >= C:
        _fail("prefix_chunks", f"< num_chunks={C} (at least one chunk to generate)", p)
    sps = T // W
    rows = []
    stages = []
    for s in range(p, C + W - 1):
        lo, hi = max(p, s - W + 1), min(C, s + 1)
        for idx in range(sps):
            row = []
            for g in range(C):
                if g < p:
                    row.append((ChunkState.PREFIX, T))
                elif g < lo:
                    row.append((ChunkState.FINISHED, T))
                elif g >= hi:
                    row.append((ChunkState.PENDING, 0))
                else:
                    row.append((ChunkState.ACTIVE, (s - g) * sps + idx))
            rows.append(tuple(row))
            stages.append(s)
    return MagiSchedule(num_steps=T, chunk_frames=cf, num_chunks=C, num_prefix_chunks=p,
                        rows=tuple(rows), window_size=W, steps_per_stage=sps,
                        stages=tuple(stages))


# --------------------------------------------------------------------------------------------
# long videos: overlapping windows


@attrs.frozen(kw_only=True)
class WindowPlan:
    """One window of a long video, in latent frames of the whole video.

    * ``[start, end)``: the frames the window denoises (``num_frames = end - start``).
    * ``prefix_frames``: the first ``prefix_frames`` frames of the window are clean copies
      of already generated frames (pass as ``num_pre_ready``); 0 for window 0.
    * ``[output_start, end)``: the frames this window adds to the video; local frames before
      ``keep_from = output_start - start`` are dropped (they overlap the previous window).
    """

    index: int = attrs.field()
    start: int = attrs.field()
    end: int = attrs.field()
    prefix_frames: int = attrs.field()
    output_start: int = attrs.field()

    def __attrs_post_init__(self) -> None:
        _int("WindowPlan.index", self.index, 0)
        _int("WindowPlan.start", self.start, 0)
        _int("WindowPlan.prefix_frames", self.prefix_frames, 0)
        if not self.start + self.prefix_frames <= self.output_start < self.end:
            _fail("WindowPlan", "start + prefix_frames <= output_start < end",
                  (self.start, self.prefix_frames, self.output_start, self.end))

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    @property
    def keep_from(self) -> int:
        """First local frame that goes into the output."""
        return self.output_start - self.start

    @property
    def num_new_frames(self) -> int:
        return self.end - self.output_start


def plan_windows(
    num_frames: int,
    base_num_frames: int,
    overlap_history: Optional[int],
    *,
    causal_block_size: int = 1,
) -> list[WindowPlan]:
    """Split a video into the overlapping windows of SkyReels-V2's long-video loop.

    All counts are **latent frames** (convert pixel counts with :func:`latent_frames`:
    SkyReels' 177 / 97 / 17 pixel frames are 45 / 25 / 5 latent frames).
    Window ``i`` covers ``[i * (base - overlap), min(num_frames, i * (base - overlap) + base))``;
    window ``i >= 1`` starts with ``overlap`` clean prefix frames (the last ``overlap`` frames
    generated so far) and contributes the frames after them. There are
    ``1 + ceil((num_frames - base) / (base - overlap))`` windows when ``num_frames > base``
    (diffusers' ``n_iter``), else one window of ``num_frames`` frames.

    SkyReels-V2 (and diffusers) re-encode the last ``overlap_history`` *pixel* frames as the
    prefix; in latent frames that is the last ``overlap`` latent frames, which is what this
    plan assumes.

    Args:
        num_frames: latent frames of the whole video, a multiple of ``causal_block_size``.
        base_num_frames: latent frames per window (the model's window), >= 1.
        overlap_history: latent frames of overlap, ``0 <= overlap < base_num_frames``; None
            only if the video fits one window. 0 makes windows independent (no continuity).
        causal_block_size: frames per chunk; with more than one window, base and overlap must
            be multiples of it, so every window is whole chunks and the prefix whole chunks.

    Raises:
        ConfigError: an argument out of range. Frames are never dropped: where diffusers would
            truncate a prefix or lose tail frames, this raises with the values that work.
    """
    cbs = _int("causal_block_size", causal_block_size, 1)
    L = _int("num_frames", num_frames, 1, "num_frames counts latent frames of the whole video.")
    base = _int("base_num_frames", base_num_frames, 1,
                "base_num_frames counts latent frames per window.")
    if L % cbs:
        _fail("num_frames", f"a multiple of causal_block_size={cbs} (latent frames)", L,
              f"Use num_frames={_round_options(L, cbs)} latent frames (pixel frames "
              f"{' or '.join(str(pixel_frames(v)) for v in _options(L, cbs))} with a 4x VAE); "
              "diffusers would drop the tail frames (diffusers#13609).")
    if overlap_history is None:
        if L > base:
            _fail("overlap_history", f"an int in [0, {base}) when num_frames={L} > "
                  f"base_num_frames={base}", None,
                  "Pass overlap_history (SkyReels recommends 17 or 37 pixel frames, i.e. 5 or "
                  "10 latent frames), or raise base_num_frames.")
        ovl = 0
    else:
        ovl = _int("overlap_history", overlap_history, 0)
        if ovl >= base:
            _fail("overlap_history", f"< base_num_frames={base} latent frames (each window "
                  "must add at least one new frame)", ovl,
                  f"Use an overlap below {base} (SkyReels-V2 uses 5 or 10 latent frames "
                  "with 25-frame windows).")
    if L <= base:
        return [WindowPlan(index=0, start=0, end=L, prefix_frames=0, output_start=0)]
    if base % cbs:
        _fail("base_num_frames", f"a multiple of causal_block_size={cbs}", base,
              f"Use base_num_frames={_round_options(base, cbs)} latent frames.")
    if ovl % cbs:
        _fail("overlap_history", f"a multiple of causal_block_size={cbs} latent frames", ovl,
              f"Use overlap_history={_round_options(ovl, cbs)} latent frames; diffusers would "
              "truncate the prefix and regenerate the remainder.")
    stride = base - ovl
    n_windows = 1 + -(-(L - base) // stride)
    plans = []
    for i in range(n_windows):
        start = i * stride
        end = min(L, start + base)
        prefix = 0 if i == 0 else ovl
        plans.append(WindowPlan(index=i, start=start, end=end, prefix_frames=prefix,
                                output_start=start + prefix))
    return plans


def latent_frames(pixel_frames: int, temporal_factor: int = 4, *, strict: bool = True) -> int:
    """Latent frames of ``pixel_frames`` video frames: ``(pixel_frames - 1) // factor + 1``.

    The causal video VAE of Wan / SkyReels-V2 keeps the first frame and compresses the rest by
    ``temporal_factor``: 97 -> 25, 177 -> 45, 17 -> 5. With ``strict`` (default) a count that
    is not ``k * factor + 1`` is refused, because its latents decode to fewer frames than
    asked; ``strict=False`` floors like SkyReels does.
    """
    f = _int("temporal_factor", temporal_factor, 1)
    p = _int("pixel_frames", pixel_frames, 1)
    if strict and (p - 1) % f:
        lo = (p - 1) // f * f + 1
        _fail("pixel_frames", f"k * {f} + 1 frames (the VAE keeps frame 0, then {f}x)", p,
              f"Use {lo} or {lo + f}, or pass strict=False to floor to {lo} like SkyReels-V2.")
    return (p - 1) // f + 1


def pixel_frames(latent_frames: int, temporal_factor: int = 4) -> int:
    """Video frames decoded from ``latent_frames`` latents: ``(latent_frames - 1) * factor + 1``."""
    f = _int("temporal_factor", temporal_factor, 1)
    n = _int("latent_frames", latent_frames, 1)
    return (n - 1) * f + 1


# --------------------------------------------------------------------------------------------
# flow-matching noise levels


def flow_sigmas(num_steps: int, shift: float, sigma_min: float = 0.0) -> torch.Tensor:
    """Shifted flow-matching noise levels: a float64 tensor ``[num_steps + 1]``.

    ``sigma = linspace(1, sigma_min, T + 1)[:-1]``, then ``sigma' = s*sigma / (1 + (s-1)*sigma)``
    (SkyReels-V2 / Wan: ``shift = 8`` for 540P), followed by a final ``0``. Entry ``k`` is
    the noise level of a chunk before its step ``k``, entry ``k + 1`` after it; an Euler step
    on velocity ``v`` is ``x <- x + (sigma[k+1] - sigma[k]) * v``. The last step (``k = T-1``)
    always lands on ``sigma = 0`` (clean), whatever ``sigma_min``: ``sigma_min`` only bends
    the grid (diffusers' UniPC uses ``sigma_min = 1/1000`` and ``final_sigmas_type="zero"``).
    ``shift > 1`` spends more steps at high noise; ``shift = 1`` is the plain linear grid.

    Differences from diffusers' UniPC: no ``1e-6`` nudge of ``sigma[0] = 1``; float64.
    """
    T = _int("num_steps", num_steps, 1)
    try:
        s = float(shift)
        smin = float(sigma_min)
    except (TypeError, ValueError):
        _fail("shift / sigma_min", "real numbers", (shift, sigma_min))
    if not (math.isfinite(s) and s > 0):
        _fail("shift", "a finite float > 0 (1 = no shift; SkyReels-V2 540P uses 8)", shift)
    if not (math.isfinite(smin) and 0.0 <= smin < 1.0):
        _fail("sigma_min", "a float in [0, 1)", sigma_min)
    sig = torch.linspace(1.0, smin, T + 1, dtype=torch.float64)[:-1]
    sig = s * sig / (1.0 + (s - 1.0) * sig)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def flow_timesteps(num_steps: int, shift: float, sigma_min: float = 0.0,
                   num_train_timesteps: int = 1000) -> torch.Tensor:
    """Model timesteps ``num_train_timesteps * sigma`` of the ``T`` steps: float64 ``[T]``.

    ``flow_sigmas(...)[:T]`` scaled (the final 0 is not a step). diffusers' UniPC truncates
    these to int64 after nudging ``sigma[0]`` to ``1 - 1e-6`` (its first timestep is 999, ours
    1000.0); every later entry equals ``.long()`` of ours up to float32 rounding.
    """
    n = _int("num_train_timesteps", num_train_timesteps, 1)
    return flow_sigmas(num_steps, shift, sigma_min)[:-1] * n
