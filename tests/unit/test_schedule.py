"""Hand-checked cases for cachekit.schedule (reference/algorithms.md §1.1, §1.2, §1.5)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cachekit.errors import ConfigError
from cachekit.schedule import (
    FINISHED_TIMESTEP,
    PENDING_TIMESTEP,
    ChunkSchedule,
    DFSchedule,
    MagiSchedule,
    WindowPlan,
    df_num_iterations,
    diffusion_forcing_schedule,
    flow_sigmas,
    flow_timesteps,
    latent_frames,
    magi_schedule,
    pixel_frames,
    plan_windows,
)
from cachekit.types import ChunkState, IterationInfo

A, F, P, X = ChunkState.ACTIVE, ChunkState.FINISHED, ChunkState.PENDING, ChunkState.PREFIX


def paper_window0() -> DFSchedule:
    # SkyReels-V2 paper run: 25 latent frames, 5 chunks of 5, T = 50, ar_step = 5.
    return diffusion_forcing_schedule(25, 50, 25, ar_step=5, causal_block_size=5)


# --------------------------------------------------------------------------- §1.2 examples


def test_paper_window0_has_70_iterations_and_the_spec_rows():
    s = paper_window0()
    assert s.num_iterations == 70 == df_num_iterations(5, 50, 5)
    expected = {0: [1, 0, 0, 0, 0], 5: [6, 1, 0, 0, 0], 20: [21, 16, 11, 6, 1],
                50: [51, 46, 41, 36, 31], 69: [51, 51, 51, 51, 50]}
    for it, r in expected.items():
        assert s.chunk_step_index()[it].tolist() == r, it


def test_paper_window0_chunk_rows():
    s = paper_window0()
    assert s.row(0) == ((A, 0), (P, 0), (P, 0), (P, 0), (P, 0))
    assert s.row(5) == ((A, 5), (A, 0), (P, 0), (P, 0), (P, 0))
    assert s.row(20) == ((A, 20), (A, 15), (A, 10), (A, 5), (A, 0))
    assert s.row(49) == ((A, 49), (A, 44), (A, 39), (A, 34), (A, 29))
    assert s.row(50) == ((F, 50), (A, 45), (A, 40), (A, 35), (A, 30))  # chunk 0 done
    assert s.row(69) == ((F, 50), (F, 50), (F, 50), (F, 50), (A, 49))
    assert s.updates_per_chunk() == [50] * 5
    assert s.active_chunks(50) == [1, 2, 3, 4]
    assert s.states(50) == (F, A, A, A, A) and s.steps(50) == (50, 45, 40, 35, 30)


def test_window_with_one_prefix_chunk_has_65_iterations():
    s = diffusion_forcing_schedule(25, 50, 25, ar_step=5, causal_block_size=5, num_pre_ready=5)
    assert s.num_iterations == 65 == df_num_iterations(5, 50, 5, prefix_chunks=1)
    assert s.num_prefix_chunks == 1
    assert s.row(0) == ((X, 50), (A, 0), (P, 0), (P, 0), (P, 0))
    assert s.chunk_step_index()[0].tolist() == [51, 1, 0, 0, 0]
    assert s.row(64) == ((X, 50), (F, 50), (F, 50), (F, 50), (A, 49))
    assert s.updates_per_chunk() == [0, 50, 50, 50, 50]
    assert not s.update_mask[:, :5].any()


def test_frames_repeat_their_chunk():
    s = paper_window0()
    assert s.step_index.shape == s.update_mask.shape == (70, 25)
    for g in range(5):
        block = s.step_index[:, g * 5:(g + 1) * 5]
        assert (block == block[:, :1]).all()
    assert s.valid_interval == ((0, 25),) * 70  # base == frames: always the whole window


def test_step_matrix_uses_sentinels_and_the_timesteps():
    ts = flow_timesteps(50, 8.0)
    s = diffusion_forcing_schedule(25, 50, ar_step=5, causal_block_size=5, timesteps=ts)
    assert s.step_matrix.shape == (70, 25) and s.step_matrix.dtype == np.float64
    row = s.step_matrix[5]
    assert row[0] == pytest.approx(float(ts[5]))       # chunk 0 ACTIVE at step 5
    assert row[5] == pytest.approx(float(ts[0]))       # chunk 1 ACTIVE at step 0
    assert row[10] == PENDING_TIMESTEP                 # chunk 2 not started
    assert s.step_matrix[69][0] == FINISHED_TIMESTEP   # chunk 0 finished
    t = s.frame_timesteps(5)
    assert isinstance(t, torch.Tensor) and t.shape == (25,) and t.dtype == torch.float64
    t[:] = -1  # a fresh tensor: the schedule is unchanged
    assert s.step_matrix[5][0] == pytest.approx(float(ts[5]))


def test_frame_timesteps_needs_timesteps():
    with pytest.raises(ConfigError, match="timesteps"):
        paper_window0().frame_timesteps(0)


def test_arrays_are_read_only():
    s = diffusion_forcing_schedule(10, 4, causal_block_size=5, timesteps=[4, 3, 2, 1])
    for a in (s.step_index, s.update_mask, s.step_matrix, s.timesteps, s.chunk_step_index()):
        with pytest.raises(ValueError):
            a[0] = a[0]


def test_synchronous_schedule_moves_all_chunks_together():
    s = diffusion_forcing_schedule(6, 3, ar_step=0, causal_block_size=2)
    assert s.num_iterations == 3
    assert [s.row(it) for it in range(3)] == [((A, k),) * 3 for k in range(3)]


def test_ar_step_larger_than_num_steps_acts_as_num_steps():
    # A chunk starts at the latest right after the previous chunk's last step.
    big = diffusion_forcing_schedule(3, 4, ar_step=9)
    same = diffusion_forcing_schedule(3, 4, ar_step=4)
    assert big.num_iterations == same.num_iterations == 4 + 2 * 4 == df_num_iterations(3, 4, 9)
    assert big.rows == same.rows


def test_sliding_valid_interval_hand_checked():
    # 4 one-frame chunks, T = 2, the model holds 2 chunks, ar_step = 1 (= T / base chunks).
    s = diffusion_forcing_schedule(4, 2, base_num_frames=2, ar_step=1)
    assert s.chunk_step_index().tolist() == [
        [1, 0, 0, 0], [2, 1, 0, 0], [3, 2, 1, 0], [3, 3, 2, 1], [3, 3, 3, 2]]
    assert s.chunk_update_mask().tolist() == [
        [True, False, False, False], [True, True, False, False], [False, True, True, False],
        [False, False, True, True], [False, False, False, True]]
    assert s.valid_interval == ((0, 2), (0, 2), (1, 3), (2, 4), (2, 4))
    assert s.chunk_interval(2) == (1, 3)


def test_base_larger_than_window_is_clamped_to_the_window():
    s = diffusion_forcing_schedule(10, 3, base_num_frames=25, ar_step=1, causal_block_size=5)
    assert set(s.valid_interval) == {(0, 10)}


def test_rows_feed_iteration_info():
    s = diffusion_forcing_schedule(25, 6, ar_step=2, causal_block_size=5, num_pre_ready=5)
    for it in range(s.num_iterations):
        info = IterationInfo(window=1, iteration=it, num_iterations=s.num_iterations,
                             branch="cond", num_steps=s.num_steps, chunk_frames=s.chunk_frames,
                             states=s.states(it), steps=s.steps(it))
        assert info.num_frames == 25


# --------------------------------------------------------------------------- DF errors


@pytest.mark.parametrize(
    ("kwargs", "setting", "hint"),
    [
        (dict(num_frames=27, num_steps=50, causal_block_size=5), "num_frames", "25 or 30"),
        (dict(num_frames=3, num_steps=50, causal_block_size=5), "num_frames", "at least one chunk"),
        (dict(num_frames=25, num_steps=0), "num_steps", "int >= 1"),
        (dict(num_frames=25, num_steps=50, ar_step=-1), "ar_step", "int >= 0"),
        (dict(num_frames=25, num_steps=5, causal_block_size=5, num_pre_ready=3),
         "num_pre_ready", "5"),
        (dict(num_frames=25, num_steps=5, causal_block_size=5, num_pre_ready=25),
         "num_pre_ready", "< num_frames"),
        (dict(num_frames=25, num_steps=50, base_num_frames=10, ar_step=2, causal_block_size=5),
         "ar_step", ">= 25"),
        (dict(num_frames=25, num_steps=50, base_num_frames=3, causal_block_size=5),
         "base_num_frames", "at least one chunk"),
        (dict(num_frames=25, num_steps=4, base_num_frames=10, ar_step=2, causal_block_size=5,
              num_pre_ready=15), "num_pre_ready", "<= base_num_frames"),
        (dict(num_frames=25.0, num_steps=50), "num_frames", "int"),
        (dict(num_frames=True, num_steps=50), "num_frames", "int"),
        (dict(num_frames=4, num_steps=2, timesteps=[1.0]), "timesteps", "num_steps=2"),
        (dict(num_frames=4, num_steps=2, timesteps=[1.0, float("nan")]), "timesteps", "finite"),
    ],
)
def test_df_errors_name_setting_expectation_value(kwargs, setting, hint):
    with pytest.raises(ConfigError) as e:
        diffusion_forcing_schedule(**kwargs)
    msg = str(e.value)
    assert msg.startswith(setting) and "expected" in msg and "got" in msg and hint in msg


def test_df_accepts_numpy_and_torch_ints_and_timesteps():
    s = diffusion_forcing_schedule(np.int64(10), torch.tensor(2).item(), ar_step=np.int32(1),
                                   causal_block_size=5, timesteps=torch.tensor([900, 400]))
    assert s.num_iterations == 3 and s.timesteps.tolist() == [900.0, 400.0]


def test_chunk_schedule_rejects_inconsistent_rows():
    with pytest.raises(ConfigError, match="rows"):
        ChunkSchedule(num_steps=2, chunk_frames=1, num_chunks=1, num_prefix_chunks=0,
                      rows=(((A, 2),),))
    with pytest.raises(ConfigError, match="rows"):
        ChunkSchedule(num_steps=2, chunk_frames=1, num_chunks=1, num_prefix_chunks=0,
                      rows=(((X, 2),),))  # PREFIX beyond num_prefix_chunks


# --------------------------------------------------------------------------- MAGI (§1.5)


def test_magi_hand_checked_rows():
    s = magi_schedule(3, 4, window_size=2)
    assert isinstance(s, MagiSchedule) and isinstance(s, ChunkSchedule)
    assert s.steps_per_stage == 2 and s.num_iterations == 2 * (3 + 2 - 1)
    assert list(s.chunk_rows()) == [
        ((A, 0), (P, 0), (P, 0)),
        ((A, 1), (P, 0), (P, 0)),
        ((A, 2), (A, 0), (P, 0)),
        ((A, 3), (A, 1), (P, 0)),
        ((F, 4), (A, 2), (A, 0)),
        ((F, 4), (A, 3), (A, 1)),
        ((F, 4), (F, 4), (A, 2)),
        ((F, 4), (F, 4), (A, 3)),
    ]
    assert [s.stage(it) for it in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert s.window(4) == (1, 3)


def test_magi_paper_config():
    # MAGI-1 4.5B-distill paper run: 168 frames = 7 chunks of 6, 64 steps, window 4.
    s = magi_schedule(7, 64, 4, chunk_frames=6)
    assert s.steps_per_stage == 16
    assert s.num_iterations == 16 * (7 + 3) == 160
    assert s.num_frames == 42
    assert max(len(s.active_chunks(it)) for it in range(s.num_iterations)) == 4
    assert s.updates_per_chunk() == [64] * 7


def test_magi_with_prefix_starts_at_the_first_generated_chunk():
    s = magi_schedule(4, 4, 2, prefix_chunks=1)
    assert s.num_iterations == 2 * (4 + 2 - 1 - 1)
    assert s.row(0) == ((X, 4), (A, 0), (P, 0), (P, 0))
    assert s.row(2) == ((X, 4), (A, 2), (A, 0), (P, 0))
    assert s.updates_per_chunk() == [0, 4, 4, 4]


@pytest.mark.parametrize(
    ("args", "setting", "hint"),
    [
        ((7, 63, 4), "num_steps", "60 or 64"),
        ((7, 64, 0), "window_size", "int >= 1"),
        ((3, 4, 2, 3), "prefix_chunks", "< num_chunks=3"),
        ((0, 4, 2), "num_chunks", "int >= 1"),
    ],
)
def test_magi_errors(args, setting, hint):
    with pytest.raises(ConfigError) as e:
        magi_schedule(*args)
    assert str(e.value).startswith(setting) and hint in str(e.value)


# --------------------------------------------------------------------------- windows (§1.1)


def test_paper_long_video_windows():
    # 177 / 97 / 17 pixel frames -> 45 / 25 / 5 latent frames -> 2 windows.
    L, base, ovl = latent_frames(177), latent_frames(97), latent_frames(17)
    assert (L, base, ovl) == (45, 25, 5)
    w = plan_windows(L, base, ovl, causal_block_size=5)
    assert w == [
        WindowPlan(index=0, start=0, end=25, prefix_frames=0, output_start=0),
        WindowPlan(index=1, start=20, end=45, prefix_frames=5, output_start=25),
    ]
    assert [x.num_frames for x in w] == [25, 25] and w[1].keep_from == 5
    assert w[1].num_new_frames == 20
    s1 = diffusion_forcing_schedule(w[1].num_frames, 50, ar_step=5, causal_block_size=5,
                                    num_pre_ready=w[1].prefix_frames)
    assert s1.num_iterations == 65


def test_three_windows_last_one_short():
    w = plan_windows(50, 25, 5, causal_block_size=5)
    assert [(x.start, x.end, x.prefix_frames, x.output_start) for x in w] == [
        (0, 25, 0, 0), (20, 45, 5, 25), (40, 50, 5, 45)]


def test_short_video_is_one_window():
    assert plan_windows(20, 25, None, causal_block_size=5) == [
        WindowPlan(index=0, start=0, end=20, prefix_frames=0, output_start=0)]
    assert len(plan_windows(25, 25, 5, causal_block_size=5)) == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "setting", "hint"),
    [
        ((46, 25, 5), dict(causal_block_size=5), "num_frames", "45 or 50"),
        ((45, 25, 25), {}, "overlap_history", "< base_num_frames=25"),
        ((45, 25, 30), {}, "overlap_history", "< base_num_frames=25"),
        ((45, 25, None), {}, "overlap_history", "Pass overlap_history"),
        ((45, 25, 3), dict(causal_block_size=5), "overlap_history", "5"),
        ((48, 24, 4), dict(causal_block_size=5), "num_frames", "45 or 50"),
        ((45, 24, 5), dict(causal_block_size=5), "base_num_frames", "20 or 25"),
        ((45, 25, -1), {}, "overlap_history", "int >= 0"),
        ((0, 25, 5), {}, "num_frames", "int >= 1"),
    ],
)
def test_plan_windows_errors(args, kwargs, setting, hint):
    with pytest.raises(ConfigError) as e:
        plan_windows(*args, **kwargs)
    assert str(e.value).startswith(setting) and hint in str(e.value)


def test_pixel_latent_conversion():
    assert [latent_frames(p) for p in (1, 5, 17, 37, 97, 177)] == [1, 2, 5, 10, 25, 45]
    assert [pixel_frames(n) for n in (1, 2, 5, 10, 25, 45)] == [1, 5, 17, 37, 97, 177]
    assert latent_frames(18, strict=False) == 5  # SkyReels floors
    assert latent_frames(9, temporal_factor=8) == 2
    with pytest.raises(ConfigError, match="17 or 21"):
        latent_frames(18)
    with pytest.raises(ConfigError, match="pixel_frames"):
        latent_frames(0)


# --------------------------------------------------------------------------- flow sigmas


def test_flow_sigmas_linear_without_shift():
    s = flow_sigmas(4, 1.0)
    assert s.dtype == torch.float64 and s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert flow_timesteps(4, 1.0).tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_flow_sigmas_shift_and_final_zero():
    s = flow_sigmas(50, 8.0)
    assert s.shape == (51,) and s[0] == 1.0 and s[-1] == 0.0
    raw = torch.linspace(1, 0, 51, dtype=torch.float64)[:-1]
    assert torch.allclose(s[:-1], 8 * raw / (1 + 7 * raw))
    assert (s[1:] < s[:-1]).all()
    assert float(s[-2]) == pytest.approx(8 * 0.02 / (1 + 7 * 0.02))  # the last Euler step's σ
    t = flow_timesteps(50, 8.0)
    assert torch.allclose(t, 1000 * s[:-1])


def test_flow_sigmas_sigma_min_bends_the_grid_but_ends_at_zero():
    s = flow_sigmas(3, 1.0, sigma_min=0.4)
    assert torch.allclose(s, torch.tensor([1.0, 0.8, 0.6, 0.0], dtype=torch.float64))
    assert flow_sigmas(1, 5.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("args", "setting"), [
    ((0, 1.0), "num_steps"), ((4, 0.0), "shift"), ((4, float("inf")), "shift"),
    ((4, 1.0, 1.0), "sigma_min"), ((4, 1.0, -0.1), "sigma_min"), ((4, "x"), "shift"),
])
def test_flow_sigmas_errors(args, setting):
    with pytest.raises(ConfigError) as e:
        flow_sigmas(*args)
    assert setting in str(e.value)


@pytest.mark.diffusers
@pytest.mark.parametrize(("steps", "shift"), [(50, 8.0), (30, 5.0), (7, 1.0), (1, 3.0)])
def test_flow_sigmas_match_diffusers_unipc(steps, shift):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party import-time deprecations
        diffusers = pytest.importorskip("diffusers", exc_type=ImportError,
                                        reason="diffusers extra not importable")
        sched = diffusers.UniPCMultistepScheduler(
            use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    sched.set_timesteps(steps)
    ours = flow_sigmas(steps, shift, sigma_min=1 / 1000)
    ref = sched.sigmas.double()
    # diffusers nudges sigma[0] = 1 down by 1e-6 and works in float32.
    assert torch.allclose(ours, ref, atol=2e-6)
    # diffusers truncates 1000*sigma to int64 (so its first timestep is 999, ours 1000.0).
    diff = flow_timesteps(steps, shift, sigma_min=1 / 1000) - sched.timesteps.double()
    assert diff.min() > -1e-3 and diff.max() < 1 + 1e-3
