"""Property tests for cachekit.schedule, and the cross-check against diffusers' SkyReels-V2 code."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cachekit.errors import ConfigError
from cachekit.schedule import (
    ChunkSchedule,
    df_num_iterations,
    diffusion_forcing_schedule,
    flow_timesteps,
    magi_schedule,
    plan_windows,
)
from cachekit.types import ChunkState

A, F, P, X = ChunkState.ACTIVE, ChunkState.FINISHED, ChunkState.PENDING, ChunkState.PREFIX

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def df_args(draw, sliding: bool = True):
    """Arguments both cachekit and diffusers accept (whole chunks, prefix < window).

    Three shapes: the windowed path (``base == frames``, what SkyReels' long-video loop
    uses), a sliding interval (``base < frames`` with an ``ar_step`` SkyReels allows), and a
    free mix that also hits the refusals (``ar_step`` too small, too many prefix chunks) and
    ``base`` above the window or not a whole number of chunks.
    """
    cbs = draw(st.integers(1, 4))
    n = draw(st.integers(1, 10))
    T = draw(st.integers(1, 50))
    mode = draw(st.sampled_from(["window", "sliding", "free"]) if sliding else st.just("window"))
    if mode == "sliding" and n >= 2:
        base_n = draw(st.integers(1, n - 1))
        ar = draw(st.integers(-(-T // base_n), T + 3))
        pre = draw(st.integers(0, min(base_n, n - 1)))
        base = base_n * cbs + draw(st.integers(0, cbs - 1))
    else:
        ar = draw(st.integers(0, T + 3))  # includes ar_step > T and 0 (synchronous)
        pre = draw(st.integers(0, n - 1))
        base = n * cbs
        if mode == "free":
            base = draw(st.integers(1, n + 2)) * cbs + draw(st.integers(0, cbs - 1))
    return dict(num_frames=n * cbs, num_steps=T, base_num_frames=base, ar_step=ar,
                causal_block_size=cbs, num_pre_ready=pre * cbs)


def refusal(args):
    """The setting cachekit refuses for these (whole-chunk) arguments, or None."""
    cbs = args["causal_block_size"]
    base_n, n = args["base_num_frames"] // cbs, args["num_frames"] // cbs
    if base_n < n and args["ar_step"] < args["num_steps"] / base_n:
        return "ar_step"  # SkyReels' own rule (diffusers raises ValueError too)
    if base_n < n and args["num_pre_ready"] // cbs > base_n:
        return "num_pre_ready"  # the reference's valid_interval would never reach the chunks
    return None


def build(args):
    """The schedule, or None (after checking the error) where cachekit refuses."""
    setting = refusal(args)
    if setting is not None:
        with pytest.raises(ConfigError, match=f"^{setting}"):
            diffusion_forcing_schedule(**args)
        return None
    return diffusion_forcing_schedule(**args)


def per_chunk_sequences(s: ChunkSchedule):
    return [[row[g] for row in s.chunk_rows()] for g in range(s.num_chunks)]


def check_chunk_contract(s: ChunkSchedule):
    """What any sampler loop relies on, for DF and MAGI alike."""
    T = s.num_steps
    for g, seq in enumerate(per_chunk_sequences(s)):
        if g < s.num_prefix_chunks:
            assert seq == [(X, T)] * len(seq)
            continue
        states = [st_ for st_, _ in seq]
        # PENDING* ACTIVE{T} FINISHED*, steps 0..T-1 in order while ACTIVE
        first = states.index(A)
        assert states[:first] == [P] * first and all(k == 0 for _, k in seq[:first])
        assert seq[first:first + T] == [(A, k) for k in range(T)]
        assert seq[first + T:] == [(F, T)] * (len(seq) - first - T)
    assert s.updates_per_chunk() == [0] * s.num_prefix_chunks + [T] * (
        s.num_chunks - s.num_prefix_chunks)
    # the last iteration finishes the last chunk
    assert s.row(s.num_iterations - 1)[-1] == (A, T - 1)


# --------------------------------------------------------------------------- diffusion forcing


@SETTINGS
@given(df_args())
def test_df_chunk_contract(args):
    s = build(args)
    if s is not None:
        check_chunk_contract(s)


@SETTINGS
@given(df_args())
def test_df_rows_advance_by_at_most_one_and_never_overtake(args):
    s = build(args)
    if s is None:
        return
    T = s.num_steps
    idx = s.chunk_step_index()
    upd = s.chunk_update_mask()
    start = np.array([T + 1] * s.num_prefix_chunks + [0] * (s.num_chunks - s.num_prefix_chunks))
    prev = np.vstack([start, idx[:-1]])
    delta = idx - prev
    assert set(np.unique(delta)) <= {0, 1}
    assert (upd == ((delta == 1) & (idx != T + 1))).all()
    # chunk g never ahead of chunk g - 1
    assert (idx[:, 1:] <= idx[:, :-1]).all()
    steps = np.array([s.steps(it) for it in range(s.num_iterations)])
    assert (steps[:, 1:] <= steps[:, :-1]).all()


@SETTINGS
@given(df_args())
def test_df_iteration_count(args):
    s = build(args)
    if s is None:
        return
    n, T, ar, p = s.num_chunks, s.num_steps, s.ar_step, s.num_prefix_chunks
    assert s.num_iterations == df_num_iterations(n, T, ar, p) == T + (n - 1 - p) * min(ar, T)
    if ar <= T:  # the formula as usually stated; for ar_step > T the lag caps at T
        assert s.num_iterations == T + (n - 1 - p) * ar
    # chunk g + 1 starts min(ar_step, T) iterations after chunk g
    starts = [s.states(it) for it in range(s.num_iterations)]
    first = [next(it for it, row in enumerate(starts) if row[g] is A) for g in range(p, n)]
    assert all(b - a == min(ar, T) for a, b in zip(first, first[1:], strict=False))


@SETTINGS
@given(df_args(sliding=False))
def test_df_synchronous_moves_together(args):
    args = dict(args, ar_step=0)
    s = diffusion_forcing_schedule(**args)
    assert s.num_iterations == s.num_steps
    p = s.num_prefix_chunks
    for it in range(s.num_iterations):
        assert set(s.row(it)[p:]) == {(A, it)}


@SETTINGS
@given(df_args())
def test_df_active_chunks_lie_in_valid_interval(args):
    s = build(args)
    if s is None:
        return
    cap = min(s.base_num_frames // s.chunk_frames, s.num_chunks)
    for it in range(s.num_iterations):
        lo, hi = s.chunk_interval(it)
        assert 0 <= lo < hi <= s.num_chunks and hi - lo == cap
        assert all(lo <= g < hi for g in s.active_chunks(it))
        assert s.valid_interval[it] == (lo * s.chunk_frames, hi * s.chunk_frames)


@SETTINGS
@given(df_args(), st.floats(1.0, 10.0))
def test_df_step_matrix_follows_the_steps(args, shift):
    ts = flow_timesteps(args["num_steps"], shift)
    if refusal(args) is not None:
        return
    s = diffusion_forcing_schedule(**args, timesteps=ts)
    cf = s.chunk_frames
    for it in range(s.num_iterations):
        for g, (state, k) in enumerate(s.row(it)):
            block = s.step_matrix[it, g * cf:(g + 1) * cf]
            want = {A: float(ts[k]) if state is A else None, P: 999.0, F: 0.0, X: 0.0}[state]
            assert np.all(block == want)


# --------------------------------------------------------------------------- vs diffusers


def _diffusers_generate_timestep_matrix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party import-time deprecations
        pytest.importorskip("diffusers", exc_type=ImportError,
                            reason="diffusers extra not importable "
                            "(pip install 'cachekit[diffusers]')")
        try:
            from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing import (
                SkyReelsV2DiffusionForcingPipeline,
            )
        except ImportError as e:  # an old diffusers without SkyReels-V2
            pytest.skip(f"diffusers has no SkyReelsV2DiffusionForcingPipeline: {e}")
    # An instance method that never reads self.
    fn = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix
    return lambda *a, **k: fn(None, *a, **k)


@pytest.fixture(scope="module")
def reference():
    return _diffusers_generate_timestep_matrix()


@pytest.mark.diffusers
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=df_args(), shift=st.floats(1.0, 10.0))
def test_df_matches_diffusers_generate_timestep_matrix(reference, args, shift):
    T = args["num_steps"]
    template = flow_timesteps(T, shift).long()  # what the pipeline passes (int64 timesteps)
    try:
        ref = reference(args["num_frames"], template, args["base_num_frames"], args["ar_step"],
                        args["num_pre_ready"], args["causal_block_size"])
    except ValueError:
        event("diffusers and cachekit both refuse ar_step")
        assert refusal(args) == "ar_step"
        with pytest.raises(ConfigError, match="^ar_step"):
            diffusion_forcing_schedule(**args, timesteps=template)
        return
    step_matrix, step_index, update_mask, valid_interval = ref
    if refusal(args) == "num_pre_ready":
        # diffusers returns a matrix here, but some updated frame never enters the interval
        # its pipeline feeds the model (and only frames inside it are stepped).
        outside = [(it, f) for it, (a, b) in enumerate(valid_interval)
                   for f in np.flatnonzero(update_mask[it].numpy()) if not a <= f < b]
        assert outside
        event("diffusers' valid_interval misses updated frames; cachekit refuses")
        with pytest.raises(ConfigError, match="^num_pre_ready"):
            diffusion_forcing_schedule(**args, timesteps=template)
        return
    s = diffusion_forcing_schedule(**args, timesteps=template)
    sliding = args["base_num_frames"] < args["num_frames"]
    event("compared element-wise" + (" (sliding interval)" if sliding else ""))
    event(f"iterations {'<' if s.num_iterations < 50 else '>='} 50")
    event(f"{'with' if s.num_prefix_chunks else 'no'} prefix, {'async' if s.ar_step else 'sync'}")
    assert s.num_iterations == step_index.shape[0]
    np.testing.assert_array_equal(s.step_index, step_index.numpy())
    np.testing.assert_array_equal(s.update_mask, update_mask.numpy())
    np.testing.assert_array_equal(s.step_matrix, step_matrix.numpy().astype(np.float64))
    # diffusers lets the interval end run past the window when base > frames; we clamp.
    nf = args["num_frames"]
    assert s.valid_interval == tuple((min(a, nf), min(b, nf)) for a, b in valid_interval)


@pytest.mark.diffusers
def test_diffusers_drops_tail_frames_where_we_refuse(reference):
    # diffusers#13609: 27 frames in blocks of 5 -> a matrix for 25 frames, 2 frames never
    # denoised. cachekit refuses with the fix instead.
    _, step_index, _, _ = reference(27, flow_timesteps(10, 5.0).long(), 27, 2, 0, 5)
    assert step_index.shape[1] == 25
    with pytest.raises(ConfigError, match="25 or 30"):
        diffusion_forcing_schedule(27, 10, 27, 2, 5, 0)


@pytest.mark.diffusers
def test_diffusers_never_denoises_chunks_after_a_prefix_longer_than_base(reference):
    # 3 one-frame chunks, 2 of them prefix, the model holds 1: diffusers' interval stays on
    # chunk 0 while chunk 2 is the one to update, so its pipeline never steps chunk 2.
    _, _, update_mask, valid_interval = reference(3, torch.tensor([500]), 1, 1, 2, 1)
    assert update_mask.tolist() == [[False, False, True]] and valid_interval == [(0, 1)]
    with pytest.raises(ConfigError, match="^num_pre_ready.*<= base_num_frames"):
        diffusion_forcing_schedule(3, 1, base_num_frames=1, ar_step=1, num_pre_ready=2)
    # one prefix chunk fewer is fine: the interval slides onto the generated chunk at once
    s = diffusion_forcing_schedule(2, 1, base_num_frames=1, ar_step=1, num_pre_ready=1)
    ref = reference(2, torch.tensor([500]), 1, 1, 1, 1)
    assert s.valid_interval == tuple(ref[3]) == ((1, 2),)


# --------------------------------------------------------------------------- MAGI


@st.composite
def magi_args(draw):
    W = draw(st.integers(1, 5))
    T = W * draw(st.integers(1, 8))
    C = draw(st.integers(1, 9))
    p = draw(st.integers(0, C - 1))
    return C, T, W, p


@SETTINGS
@given(magi_args())
def test_magi_chunk_contract_and_counts(args):
    C, T, W, p = args
    s = magi_schedule(C, T, W, prefix_chunks=p)
    check_chunk_contract(s)
    sps = T // W
    assert s.num_iterations == sps * (C + W - 1 - p)
    for it in range(s.num_iterations):
        active = s.active_chunks(it)
        assert 1 <= len(active) <= W
        assert active == list(range(*s.window(it)))  # contiguous window
        steps = [s.row(it)[g][1] for g in active]
        # the oldest chunk is the most advanced, one stage ahead of the next
        assert all(a - b == sps for a, b in zip(steps, steps[1:], strict=False))


# --------------------------------------------------------------------------- windows


@st.composite
def window_args(draw):
    cbs = draw(st.integers(1, 5))
    base = cbs * draw(st.integers(1, 8))
    ovl = cbs * draw(st.integers(0, base // cbs - 1))
    L = cbs * draw(st.integers(1, 40))
    return L, base, ovl, cbs


@SETTINGS
@given(window_args())
def test_windows_tile_the_video(args):
    L, base, ovl, cbs = args
    plans = plan_windows(L, base, ovl, causal_block_size=cbs)
    produced = 0
    for i, w in enumerate(plans):
        assert w.index == i and 0 < w.num_frames <= base and w.num_frames % cbs == 0
        # the prefix is already generated; the new frames continue the video
        assert w.start + w.prefix_frames <= produced == w.output_start
        assert w.prefix_frames == (0 if i == 0 else ovl) and w.prefix_frames % cbs == 0
        assert w.prefix_frames < w.num_frames
        produced = w.end
    assert produced == L
    if L > base:
        # diffusers' n_iter and prepare_latents' window length
        assert len(plans) == 1 + (L - base - 1) // (base - ovl) + 1
        for i, w in enumerate(plans[1:], start=1):
            finished = i * (base - ovl) + ovl
            assert w.num_frames == min(L - finished + ovl, base)
    else:
        assert len(plans) == 1 and plans[0].num_frames == L


@SETTINGS
@given(window_args(), st.integers(1, 12), st.integers(0, 6))
def test_windows_feed_df_schedules(args, T, ar):
    L, base, ovl, cbs = args
    for w in plan_windows(L, base, ovl, causal_block_size=cbs):
        s = diffusion_forcing_schedule(w.num_frames, T, ar_step=ar, causal_block_size=cbs,
                                       num_pre_ready=w.prefix_frames)
        check_chunk_contract(s)
        assert s.num_prefix_chunks * cbs == w.prefix_frames


def test_torch_is_not_needed_for_rows():
    # rows are plain Python values: cheap to hash, compare and log
    s = diffusion_forcing_schedule(4, 2, ar_step=1)
    assert hash(s.chunk_rows()) == hash(diffusion_forcing_schedule(4, 2, ar_step=1).chunk_rows())
    assert not any(isinstance(k, torch.Tensor) for row in s.chunk_rows() for _, k in row)
