"""Per-window chunk states and steps, derived from a diffusion-forcing step matrix (no diffusers).

diffusers' ``SkyReelsV2DiffusionForcing*Pipeline.generate_timestep_matrix`` returns, per window,
``step_matrix [R, F]`` (per-frame timesteps of each of the ``R`` iterations),
``step_index``, ``step_update_mask [R, F]`` (which frames take a scheduler step in iteration
``i``) and ``valid_interval`` (``R`` pairs ``(start, end)`` of frames the transformer sees).
Frames come in causal blocks of ``causal_block_size``; every frame of a block shares its
column. :class:`WindowSchedule` turns the update mask into what the cache engine needs for
row ``i`` and chunk (block) ``g``:

* ``ACTIVE`` when the block updates in row ``i``; its **step** is the number of updates it had
  in rows ``< i`` (0..T-1), so every chunk walks steps 0..T-1 whatever ``ar_step`` is;
* ``PREFIX`` when the block never updates in the window (clean long-video prefix, or an I2V
  last-image block whose mask the pipeline clears);
* ``PENDING`` when it has not updated yet (pure noise), ``FINISHED`` when it has updated
  before but not now (all its steps done).

Only the update mask decides; the step matrix is kept for the informational ``timestep`` of a
call and for a consistency check against the timesteps the transformer actually receives.
The mask is read **lazily** (:meth:`WindowSchedule.from_tensors` is called at the first model
call of the window) because the I2V pipeline edits it in place after the function returns.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from cachekit.errors import CacheContextError, ConfigError, invalid_value
from cachekit.types import ChunkState, tensor_repr

__all__ = ["WindowSchedule"]


def _block_aligned(mask: torch.Tensor, cbs: int) -> bool:
    """Every frame of each block of ``cbs`` frames has its block's update pattern."""
    rows, frames = mask.shape
    if frames % cbs:
        return False
    blocks = mask.view(rows, frames // cbs, cbs)
    return bool((blocks == blocks[:, :, :1]).all())


class WindowSchedule:
    """Chunk states, steps and timesteps of one window (see module docstring).

    Build with :meth:`from_tensors`. ``rows`` iterations, ``num_chunks`` blocks of
    ``causal_block_size`` frames; ``frames = num_chunks * causal_block_size``.
    """

    __slots__ = ("window", "causal_block_size", "rows", "num_chunks", "frames", "_states",
                 "_steps", "_totals", "_timesteps", "_intervals", "_step_matrix",
                 "_frame_mask")

    def __init__(self, *, window: int, causal_block_size: int,
                 states: list[tuple[ChunkState, ...]], steps: list[tuple[int, ...]],
                 totals: tuple[int, ...], timesteps: Optional[list[tuple[float, ...]]],
                 intervals: list[tuple[int, int]], step_matrix: Optional[torch.Tensor],
                 frame_mask: torch.Tensor) -> None:
        self.window = window
        self.causal_block_size = causal_block_size
        self.rows = len(states)
        self.num_chunks = len(totals)
        self.frames = self.num_chunks * causal_block_size
        self._states, self._steps, self._totals = states, steps, totals
        self._timesteps, self._intervals = timesteps, intervals
        self._step_matrix, self._frame_mask = step_matrix, frame_mask

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, step_update_mask: torch.Tensor, causal_block_size: int, *,
                     step_matrix: Optional[torch.Tensor] = None,
                     valid_interval: Optional[Sequence[Sequence[int]]] = None,
                     window: int = 0, strict: bool = True) -> "WindowSchedule":
        """Derive the schedule from the pipeline's ``step_update_mask [R, F]`` (bool).

        ``causal_block_size`` is the block size the pipeline used (frames per chunk);
        ``step_matrix [R, F]`` and ``valid_interval`` (``R`` pairs) are optional.
        ``strict=False`` (window-scope execution, which needs rows but no chunks) derives the
        states per frame instead of raising when the mask is not block-aligned.
        """
        cbs = causal_block_size
        if not (isinstance(cbs, int) and not isinstance(cbs, bool) and cbs >= 1):
            raise ConfigError(invalid_value("causal_block_size", "an int >= 1", cbs))
        if not isinstance(step_update_mask, torch.Tensor) or step_update_mask.dim() != 2 \
                or step_update_mask.shape[0] < 1:
            raise ConfigError(invalid_value("step_update_mask", "a [R, F] boolean tensor "
                                            "with R >= 1", tensor_repr(step_update_mask)))
        # copies: the pipeline owns (and the I2V pipeline edits) these tensors
        mask = step_update_mask.detach().to("cpu", torch.bool).clone()
        rows, frames = mask.shape
        if not strict and cbs > 1 and (frames % cbs != 0 or not _block_aligned(mask, cbs)):
            cbs = 1
        if frames % cbs != 0:
            raise ConfigError(invalid_value(
                "step_update_mask", f"a frame count divisible by causal_block_size={cbs}",
                frames, "The pipeline builds the mask from whole blocks; a partial block "
                "usually means the latent frames are not a multiple of causal_block_size "
                "(diffusers#13609: the tail frames are dropped)."))
        blocks = mask.view(rows, frames // cbs, cbs)
        if not _block_aligned(mask, cbs):
            raise ConfigError(invalid_value(
                "step_update_mask", f"the same value for every frame of a causal block of "
                f"{cbs} frames", "a block whose frames update at different iterations",
                "Pass the causal_block_size the pipeline used. (The I2V pipeline's last_image "
                "freezes its last latent frames inside a block when their count is not a "
                "multiple of causal_block_size; use a window policy, mode='vanilla', there.)"))
        m = blocks[:, :, 0].to(torch.int64)                 # [R, G]
        before = m.cumsum(0) - m                            # updates before row i
        totals = tuple(int(t) for t in m.sum(0))
        active = m.bool().tolist()
        before_l = before.tolist()
        states: list[tuple[ChunkState, ...]] = []
        steps: list[tuple[int, ...]] = []
        for i in range(rows):
            st, sp = [], []
            for g, total in enumerate(totals):
                b = before_l[i][g]
                if active[i][g]:
                    st.append(ChunkState.ACTIVE)
                    sp.append(b)
                elif total == 0:
                    st.append(ChunkState.PREFIX)
                    sp.append(0)
                elif b == 0:
                    st.append(ChunkState.PENDING)
                    sp.append(0)
                else:
                    st.append(ChunkState.FINISHED)
                    sp.append(b)
            states.append(tuple(st))
            steps.append(tuple(sp))

        timesteps = None
        sm = None
        if step_matrix is not None:
            if not isinstance(step_matrix, torch.Tensor) or \
                    tuple(step_matrix.shape) != (rows, frames):
                raise ConfigError(invalid_value("step_matrix", f"a [{rows}, {frames}] tensor "
                                                "(the shape of step_update_mask)",
                                                tensor_repr(step_matrix)))
            sm = step_matrix.detach().to("cpu").clone()
            timesteps = [tuple(float(v) for v in row) for row in sm[:, ::cbs].tolist()]
        if valid_interval is None:
            intervals = [(0, frames)] * rows
        else:
            intervals = [(int(s), int(e)) for s, e in valid_interval]
            if len(intervals) != rows or any(not 0 <= s < e <= frames for s, e in intervals):
                raise ConfigError(invalid_value(
                    "valid_interval", f"{rows} pairs (start, end) with 0 <= start < end <= "
                    f"{frames}", intervals[:4]))
        return cls(window=window, causal_block_size=cbs, states=states, steps=steps,
                   totals=totals, timesteps=timesteps, intervals=intervals, step_matrix=sm,
                   frame_mask=mask)

    # -- queries ------------------------------------------------------------------------------
    def states(self, row: int) -> tuple[ChunkState, ...]:
        return self._states[row]

    def steps(self, row: int) -> tuple[int, ...]:
        return self._steps[row]

    def num_steps(self, chunk: int) -> int:
        """Updates chunk ``chunk`` takes in this window (T; 0 for a prefix chunk)."""
        return self._totals[chunk]

    @property
    def max_steps(self) -> int:
        return max(self._totals) if self._totals else 0

    def interval(self, row: int) -> tuple[int, int]:
        """Frames ``[start, end)`` of the window the transformer sees in row ``row``."""
        return self._intervals[row]

    def timestep(self, row: int, chunk: int) -> float:
        """The chunk's timestep in row ``row`` (0.0 if no step matrix was captured)."""
        return 0.0 if self._timesteps is None else self._timesteps[row][chunk]

    def active_chunks(self, row: int) -> list[int]:
        return [g for g, s in enumerate(self._states[row]) if s is ChunkState.ACTIVE]

    def check_timesteps(self, row: int, timestep: torch.Tensor, branch: str) -> None:
        """Check the call's per-frame timesteps ``[B, F']`` against row ``row`` on the frames
        that update (prefix frames may carry ``addnoise_condition`` instead). Raises
        :class:`CacheContextError` when a call does not belong to the row it is counted as."""
        if self._step_matrix is None:
            return
        s, e = self._intervals[row]
        if timestep.dim() != 2 or timestep.shape[1] != e - s:
            raise CacheContextError(invalid_value(
                f"timestep of {branch!r} call {row} in window {self.window}",
                f"[B, {e - s}] (frames {s}..{e} of the step matrix row)",
                tensor_repr(timestep)))
        upd = self._frame_mask[row, s:e]
        if not bool(upd.any()):
            return
        want = self._step_matrix[row, s:e][upd].to(torch.float64)
        got = timestep[0].detach().to("cpu", torch.float64)[upd]
        if not torch.equal(want, got):
            raise CacheContextError(
                f"cachekit: the {branch!r} transformer call counted as row {row} of window "
                f"{self.window} got timesteps {got.tolist()[:8]} on its updating frames, but "
                f"that row of the captured step matrix says {want.tolist()[:8]}. The pipeline "
                f"made more or fewer transformer calls in branch {branch!r} than the step "
                f"matrix has rows, or it calls the transformer outside "
                f"transformer.cache_context(...). cachekit counts calls per branch name, never "
                f"by parity.")
