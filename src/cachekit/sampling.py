"""Model-agnostic samplers: SkyReels-V2 diffusion forcing and a MAGI-1-style chunk pipeline.

Both drive a :class:`~cachekit.protocols.ModelAdapter` through the same loop: a schedule gives,
per iteration, each chunk's state (PENDING / ACTIVE / FINISHED / PREFIX) and step; every ACTIVE
chunk takes one flow-matching Euler step ``x <- x + (sigma_next - sigma) * v`` with classifier-free
guidance ``v = v_uncond + g * (v_cond - v_uncond)``. The engine (if any) is the hook the model
calls around its block stack; the sampler opens the run and each window on it.

Conventions (documented differences from the reference pipelines):

* sigma runs from 1 (noise) to 0 (clean) for both schedules (MAGI-1 counts t the other way; the
  update is the same Euler step on velocity). ``timestep = 1000 * sigma``.
* Frame counts are model (latent) frames: one frame of the bundled pixel-space model is one
  video frame. Adapters with a temporal VAE convert with :func:`cachekit.schedule.latent_frames`.
* ``addnoise_condition`` re-noises the clean prefix of a long-video window, as SkyReels-V2
  does, but with noise drawn **once per window** instead of at every iteration, so that the
  chunked execution (which computes the prefix K/V once) equals the vanilla one exactly.
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Optional, Sequence

import attrs
import torch

from . import schedule as sched
from .config import ConfigBase, in_range, knob, one_of, optional_int
from .errors import ConfigError, invalid_value
from .stats import CacheStats
from .types import ChunkState, IterationInfo, tensor_repr

__all__ = ["SamplerConfig", "GenerationResult", "generate", "window_rows", "plan_generation",
           "chunk_levels"]


@attrs.frozen(kw_only=True)
class SamplerConfig(ConfigBase):
    """How to sample a video: length, steps, schedule and guidance."""

    tag_prefix: ClassVar[str] = "sampler"

    num_frames: int = knob(16, converter=int, validator=in_range(1),
                           doc="Frames of the output video (model frames).")
    num_steps: int = knob(20, converter=int, validator=in_range(1),
                          doc="Denoising steps of every chunk.",
                          trade="more = slower, finer samples")
    schedule: str = knob("skyreels", validator=one_of("skyreels", "magi"),
                         doc="'skyreels' (diffusion forcing with ar_step, overlapping windows) or "
                             "'magi' (sliding window of window_size chunks).")
    base_num_frames: Optional[int] = knob(
        None, converter=optional_int, doc="Frames of one window (SkyReels); None = the model's "
        "max_frames.", validator=attrs.validators.optional(in_range(1)))
    causal_block_size: Optional[int] = knob(
        None, converter=optional_int, doc="Frames per chunk; None = the model's chunk_frames.",
        validator=attrs.validators.optional(in_range(1)))
    ar_step: int = knob(2, converter=int, validator=in_range(0),
                        doc="Iterations by which each chunk starts after the previous one "
                            "(0 = synchronous).")
    overlap_history: Optional[int] = knob(
        None, converter=optional_int, doc="Frames of a long video's previous window reused as "
        "the clean prefix of the next window (a multiple of causal_block_size).",
        validator=attrs.validators.optional(in_range(1)))
    addnoise_condition: float = knob(0.0, converter=float, validator=in_range(0, 1000),
                                     doc="Noise level (timestep units, 0..1000) added to the "
                                         "clean prefix of windows >= 1.")
    shift: float = knob(3.0, converter=float, validator=in_range(0, lo_open=True),
                        doc="Timestep shift of the flow-matching sigmas.")
    guidance_scale: float = knob(4.0, converter=float, validator=in_range(0),
                                 doc="Classifier-free guidance scale; 1 disables the uncond "
                                     "branch.")
    window_size: int = knob(4, converter=int, validator=in_range(1),
                            doc="MAGI schedule: chunks denoised together.")
    mode: str = knob("chunked", validator=one_of("chunked", "vanilla"),
                     doc="'chunked' (chunk by chunk with context K/V, finished and pending chunks "
                         "never run) or 'vanilla' (the whole window every iteration).")


@attrs.frozen(kw_only=True)
class GenerationResult:
    """A sampled video in model space ``[B, C, F, H, W]`` and what it cost."""

    video: torch.Tensor = attrs.field(eq=False, repr=tensor_repr)
    stats: Optional[CacheStats] = attrs.field(default=None, repr=False)
    wall_s: float = 0.0
    model_calls: int = 0
    iterations: int = 0


def window_rows(cfg: SamplerConfig, num_frames: int, chunk_frames: int,
                prefix_frames: int) -> list[tuple[tuple[ChunkState, ...], tuple[int, ...]]]:
    """Per-iteration ``(states, steps)`` of one window (see :class:`~cachekit.types.IterationInfo`)."""
    if num_frames % chunk_frames:
        raise ConfigError(invalid_value(
            "num_frames", f"a multiple of causal_block_size={chunk_frames}", num_frames))
    s: sched.ChunkSchedule
    if cfg.schedule == "magi":
        s = sched.magi_schedule(num_frames // chunk_frames, cfg.num_steps, cfg.window_size,
                                prefix_chunks=prefix_frames // chunk_frames,
                                chunk_frames=chunk_frames)
    else:
        s = sched.diffusion_forcing_schedule(num_frames, cfg.num_steps, num_frames, cfg.ar_step,
                                             chunk_frames, prefix_frames)
    return [(tuple(st for st, _ in row), tuple(k for _, k in row)) for row in s.chunk_rows()]


def chunk_levels(states: Sequence[ChunkState], steps: Sequence[int], sigmas: torch.Tensor,
                 chunk_frames: int, prefix_sigma: float = 0.0
                 ) -> tuple[torch.Tensor, tuple[float, ...]]:
    """One iteration's per-frame noise levels ``[F]`` and per-chunk Euler step sizes.

    ACTIVE chunks sit at ``sigmas[step]`` and move by ``sigmas[step + 1] - sigmas[step]``;
    PENDING chunks are pure noise (1), FINISHED ones clean (0), PREFIX ones at
    ``prefix_sigma``; only ACTIVE chunks move.
    """
    fixed = {ChunkState.PENDING: 1.0, ChunkState.PREFIX: prefix_sigma}
    per_chunk = [float(sigmas[s]) if st is ChunkState.ACTIVE else fixed.get(st, 0.0)
                 for st, s in zip(states, steps)]
    levels = torch.tensor(per_chunk, dtype=torch.float32).repeat_interleave(chunk_frames)
    sizes = tuple(float(sigmas[s + 1] - sigmas[s]) if st is ChunkState.ACTIVE else 0.0
                  for st, s in zip(states, steps))
    return levels, sizes


def plan_generation(cfg: SamplerConfig, spec: Any) -> list[tuple[Any, list]]:
    """``[(WindowPlan, rows)]`` of a generation: its windows and each window's per-iteration
    ``(states, steps)`` rows, exactly as :func:`generate` runs them. Validates the geometry
    against the model's ``spec`` (``max_frames``)."""
    cbs = cfg.causal_block_size or spec.chunk_frames
    base = cfg.base_num_frames or spec.max_frames
    if cfg.schedule == "magi":
        if cfg.num_frames > spec.max_frames:
            raise ConfigError(invalid_value(
                "num_frames", f"<= {spec.max_frames} (the model's max_frames) for schedule='magi'",
                cfg.num_frames, "The MAGI schedule runs one sliding window over the whole video; "
                "use schedule='skyreels' with overlap_history for longer videos."))
        plans = [sched.WindowPlan(index=0, start=0, end=cfg.num_frames, prefix_frames=0,
                                   output_start=0)]
    else:
        if base > spec.max_frames:
            raise ConfigError(invalid_value("base_num_frames", f"<= {spec.max_frames}", base))
        plans = sched.plan_windows(cfg.num_frames, min(base, cfg.num_frames), cfg.overlap_history,
                                   causal_block_size=cbs)
    return [(p, window_rows(cfg, p.end - p.start, cbs, p.prefix_frames)) for p in plans]


def _branches(cfg: SamplerConfig, uncond: Optional[torch.Tensor]) -> list[str]:
    return ["cond"] if (uncond is None or cfg.guidance_scale == 1.0) else ["cond", "uncond"]


def generate(adapter: Any, cond: torch.Tensor, *, config: SamplerConfig | None = None,
             uncond: Optional[torch.Tensor] = None, engine: Any = None, seed: int = 0,
             progress: bool | Callable[[int, int], None] = False,
             run_info: dict | None = None) -> GenerationResult:
    """Sample a video with ``adapter`` (optionally through a cache ``engine``).

    :param cond: encoded condition for the ``cond`` branch (e.g. ``adapter.encode_condition``).
    :param uncond: encoded null condition; with ``guidance_scale != 1`` it runs as the
        ``uncond`` branch.
    :param engine: a :class:`~cachekit.engine.CacheEngine` or None (no cache, no hook).
        With guidance, a session that has ``velocities`` (see :class:`cachekit.protocols.
        ModelSession`) gets both branches of an iteration in one call.
    :param progress: True for a tqdm bar, or a callable ``(done, total)``.
    :return: the video ``[B, C, F, H, W]`` in model space and, with an engine, its summary.
    """
    cfg = config or SamplerConfig()
    spec = adapter.spec
    cbs = cfg.causal_block_size or spec.chunk_frames
    batch = cond.shape[0]
    branches = _branches(cfg, uncond)
    conds = {"cond": cond, "uncond": uncond}

    planned = plan_generation(cfg, spec)
    plans = [p for p, _ in planned]
    rows_per_window = [rows for _, rows in planned]
    total = sum(len(r) for r in rows_per_window)
    sigmas = sched.flow_sigmas(cfg.num_steps, cfg.shift)  # [T+1], last = 0

    gen = torch.Generator().manual_seed(int(seed))
    shape = (batch, spec.channels, cfg.num_frames, spec.height, spec.width)
    # latents, noise levels and video in the condition's (i.e. the model's) float dtype
    dtype = cond.dtype if cond.is_floating_point() else torch.get_default_dtype()
    noise = torch.randn(shape, generator=gen, dtype=dtype)
    video = torch.zeros(shape, dtype=dtype)
    session = adapter.session(batch=batch, mode=cfg.mode, hook=engine)
    # a session that can run the guidance branches of an iteration together (ModelSession)
    joint = getattr(session, "velocities", None) if len(branches) > 1 else None

    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="sampling", unit="it", leave=False)
    t0 = time.perf_counter()
    if engine is not None:
        engine.begin_run(**(run_info or {}))
    calls = 0
    done = 0
    try:
        for plan, rows in zip(plans, rows_per_window):
            f = plan.end - plan.start
            x = noise[:, :, plan.start:plan.end].clone()
            pre = plan.prefix_frames
            sig_prefix = 0.0
            if pre:
                clean = video[:, :, plan.start:plan.start + pre]
                a = cfg.addnoise_condition / 1000.0
                eps = torch.randn(clean.shape, generator=gen, dtype=dtype)
                x[:, :, :pre] = clean * (1 - a) + eps * a
                sig_prefix = a
            session.begin_window(plan.index, f)
            if engine is not None:
                engine.begin_window(plan.index)
            for it, (states, steps) in enumerate(rows):
                levels, step_sizes = chunk_levels(states, steps, sigmas, cbs, sig_prefix)
                sigma = levels[None].expand(batch, -1).to(dtype).contiguous()
                infos = {b: IterationInfo(window=plan.index, iteration=it,
                                          num_iterations=len(rows), branch=b,
                                          num_steps=cfg.num_steps, chunk_frames=cbs,
                                          states=states, steps=steps, step_sizes=step_sizes)
                         for b in branches}
                if joint is not None:
                    vs = joint(x, sigma, {b: conds[b] for b in branches}, infos)
                    if not isinstance(vs, dict) or set(vs) != set(branches):
                        raise ConfigError(invalid_value(
                            f"{type(session).__name__}.velocities() result",
                            f"a dict with one velocity per branch {branches}",
                            sorted(vs) if isinstance(vs, dict) else type(vs).__name__))
                else:
                    vs = {b: session.velocity(x, sigma, conds[b], infos[b]) for b in branches}
                calls += len(branches)
                v = vs["cond"] if len(branches) == 1 else \
                    vs["uncond"] + cfg.guidance_scale * (vs["cond"] - vs["uncond"])
                for g, (st, s) in enumerate(zip(states, steps)):
                    if st is ChunkState.ACTIVE:
                        fr = slice(g * cbs, (g + 1) * cbs)
                        x[:, :, fr] = x[:, :, fr] + step_sizes[g] * v[:, :, fr]
                done += 1
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(done, total)
            if engine is not None:
                engine.end_window()
            video[:, :, plan.output_start:plan.end] = x[:, :, plan.keep_from:]
    finally:
        if bar is not None:
            bar.close()
    stats = engine.end_run() if engine is not None else None
    return GenerationResult(video=video, stats=stats, wall_s=time.perf_counter() - t0,
                            model_calls=calls, iterations=total)
