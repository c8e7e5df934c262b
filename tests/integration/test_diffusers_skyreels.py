"""cachekit on diffusers' SkyReels-V2 diffusion-forcing pipeline, with the tiny test configs.

The components are diffusers' own test configs (reference/ecosystem.md §2.7), built from
configs with random weights (no hub): the pipeline gets ``prompt_embeds`` /
``negative_prompt_embeds`` directly (tokenizer and text encoder are None) and returns
latents (``output_type="latent"``). One deviation: the scheduler uses
``prediction_type="flow_prediction"``, as the released SkyReels-V2-DF checkpoints do. With
diffusers' test default (epsilon prediction on flow sigmas) the first step divides by
``alpha = 1 - sigma = 0`` and the latents reach ~1e6, where float reordering alone is ~3.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    SkyReelsV2DiffusionForcingImageToVideoPipeline,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2DiffusionForcingVideoToVideoPipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
)
from PIL import Image  # noqa: E402

import cachekit.integrations as ck  # noqa: E402
import cachekit_models.diffusers_plugin as diffusers_plugin  # noqa: E402
from cachekit.errors import CacheContextError, ConfigError, PluginError  # noqa: E402
from cachekit.plugins import Registry  # noqa: E402
from cachekit.types import Scope  # noqa: E402
from cachekit_models import diffusers_skyreels as dsk  # noqa: E402

pytestmark = pytest.mark.diffusers

#: The chunked forward equals the stock block-causal forward up to float reordering.
ATOL = 1e-5



@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry(autoload=True)
    if "diffusers_skyreels" not in reg.names("model_adapter"):  # until the entry point lands
        reg.add_plugin(diffusers_plugin)
    return reg


def make_pipe(cls=SkyReelsV2DiffusionForcingPipeline):
    """diffusers' tiny DF test pipeline (tests/pipelines/skyreels_v2/test_skyreels_v2_df.py)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction")
    pipe = cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int = 1):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 16, 32, generator=g), torch.randn(batch, 16, 32, generator=g)


#: One window of 4 latent frames = 2 chunks of 2 frames; ar_step 1 -> 7 iterations.
BASE = dict(num_inference_steps=6, guidance_scale=6.0, height=32, width=32, num_frames=13,
            causal_block_size=2, ar_step=1)
#: Long video: 8 latent frames in 3 windows of 4 (base 13 -> 4 latent frames, overlap 5 -> 2
#: prefix frames = 1 chunk), fresh prefix noise every iteration (addnoise_condition).
LONG = dict(num_inference_steps=4, guidance_scale=6.0, height=32, width=32, num_frames=29,
            base_num_frames=13, overlap_history=5, addnoise_condition=20, causal_block_size=2,
            ar_step=1)


def run(pipe, batch: int = 1, **overrides) -> torch.Tensor:
    pe, ne = embeds(batch)
    args = dict(BASE, prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update(overrides)
    torch.manual_seed(123)  # addnoise_condition draws the prefix noise from the global RNG
    return pipe(**args).frames


# ------------------------------------------------------------------------ import & dispatch
def test_importing_cachekit_does_not_import_diffusers():
    code = ("import sys, cachekit, cachekit.integrations, cachekit_models.diffusers_plugin, "
            "cachekit_models.diffusers_skyreels\n"
            "from cachekit.plugins import Registry\n"
            "Registry(autoload=True)\n"
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_object_no_adapter_fits_lists_the_adapters_tried(registry):
    with pytest.raises(PluginError) as err:
        ck.enable_cache(torch.nn.Linear(2, 2), "none", registry=registry)
    msg = str(err.value)
    assert "torch.nn.modules.linear.Linear" in msg
    assert "diffusers_skyreels: handles only diffusers' SkyReelsV2DiffusionForcingPipeline" in msg
    assert "refdit: a sampler model" in msg
    with pytest.raises(PluginError, match="patches a diffusers pipeline in place"):
        registry.create_adapter("diffusers_skyreels")


# ------------------------------------------------------------------------------- exactness
EXACT = [  # (policy, knobs, mode) that never reuse
    ("none", {}, "auto"),
    ("teacache", {"threshold": 0.0}, "auto"),
    ("fixed_interval", {"interval": 1}, "auto"),
    ("none", {}, "chunked"),
    ("flowcache", {"threshold": 0.0}, "auto"),
    ("motioncache", {"threshold": 0.0, "warmup_steps": 1, "phase1_steps": 0}, "auto"),
]


@pytest.mark.parametrize("policy,knobs,mode", EXACT, ids=lambda v: str(v))
def test_lossless_settings_give_the_pipeline_output(registry, policy, knobs, mode):
    pipe = make_pipe()
    ref = run(pipe)
    ck.enable_cache(pipe, policy, mode=mode, registry=registry, **knobs)
    out = run(pipe)
    stats = ck.summary(pipe, registry=registry)
    ex = dsk.execution_stats(pipe)
    ck.disable_cache(pipe, registry=registry)
    assert stats.computed_token_fraction == 1.0 and stats.decisions["reuse"] == 0
    if ex["mode"] == "vanilla":
        # the stock forward through the engine: bit for bit
        assert torch.equal(out, ref)
        assert stats.calls == 2 * 7 and {r.branch for r in stats.records} == {"cond", "uncond"}
        assert ex["block_token_fraction"] == 1.0
    else:
        # chunk by chunk through K/V slots: float reordering only
        assert (out - ref).abs().max() <= ATOL
        assert stats.calls == 2 * 2 * 6   # branches x chunks x steps: every chunk 6 steps
        # the lossless layer alone skips the pending chunk (row 0) and reruns the finished one
        assert ex["block_token_fraction"] < 1.0


def test_disable_restores_the_never_patched_pipeline_bit_for_bit(registry):
    pipe = make_pipe()
    ref = run(pipe)
    tr = pipe.transformer
    pipe_keys, tr_keys = set(pipe.__dict__), set(tr.__dict__)
    ck.enable_cache(pipe, "motioncache", registry=registry, warmup_steps=1, phase1_steps=0,
                    threshold=0.3)
    assert "forward" in tr.__dict__ and "generate_timestep_matrix" in pipe.__dict__
    cached = run(pipe)
    assert not torch.equal(cached, ref)
    stats = ck.disable_cache(pipe, registry=registry)   # the last run's statistics
    assert stats.policy == "motioncache" and stats.decisions["reuse"] > 0
    assert set(pipe.__dict__) == pipe_keys and set(tr.__dict__) == tr_keys
    assert "forward" not in tr.__dict__ and not tr._diffusers_hook.hooks
    assert torch.equal(run(pipe), ref)
    assert not ck.is_cache_enabled(pipe, registry=registry)


def test_enable_twice_and_disable_unpatched_are_clear_errors(registry):
    pipe = make_pipe()
    ck.enable_cache(pipe, "teacache", registry=registry)
    with pytest.raises(CacheContextError, match="already enabled"):
        ck.enable_cache(pipe, "teacache", registry=registry)
    with pytest.raises(CacheContextError, match="already enabled"):
        dsk.enable_cache(pipe.transformer, "none")
    ck.disable_cache(pipe, registry=registry)
    with pytest.raises(CacheContextError, match="not enabled"):
        ck.disable_cache(pipe, registry=registry)
    with pytest.raises(ConfigError, match="needs mode='chunked'|'chunked'"):
        ck.enable_cache(pipe, "motioncache", mode="vanilla", registry=registry)
    assert not ck.is_cache_enabled(pipe, registry=registry)


# ------------------------------------------------------------------------- reuse happens
def test_motioncache_reuses_and_computes_token_subsets(registry):
    pipe = make_pipe()
    kw = dict(height=64, width=64, num_inference_steps=8)   # 16 tokens per frame
    ref = run(pipe, **kw)
    # A short warm-up so the token phase starts within 8 steps. tau = 0.3 instead of 0.1: the
    # random tiny model's time embedding moves ~0.2 (rel. L1) per step, more than the default
    # tau, so at 0.1 every step computes (a trained model's moves far less per step).
    ck.enable_cache(pipe, "motioncache", registry=registry, warmup_steps=1, phase1_steps=0,
                    threshold=0.3)
    out = run(pipe, **kw)
    stats = ck.summary(pipe, registry=registry)
    ex = dsk.execution_stats(pipe)
    ck.disable_cache(pipe, registry=registry)
    d = stats.decisions
    assert d["reuse"] > 0 and d["partial"] > 0 and d["compute"] > 0
    assert stats.computed_token_fraction < 0.8
    assert ex["run_block_tokens"] < 0.8 * ex["stock_block_tokens"]
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1.0


def test_teacache_reuses_whole_windows(registry):
    pipe = make_pipe()
    ref = run(pipe)
    ck.enable_cache(pipe, "teacache", registry=registry, threshold=0.3, warmup_steps=1)
    out = run(pipe)
    stats = ck.summary(pipe, registry=registry)
    ck.disable_cache(pipe, registry=registry)
    assert stats.decisions["reuse"] > 0 and stats.decisions["partial"] == 0
    assert all(r.tokens == 4 * 4 for r in stats.records)   # 4 frames x 2x2 tokens
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


# ------------------------------------------------------- schedules, windows, branches, batch
@pytest.mark.parametrize("policy,mode", [("none", "chunked"), ("teacache", "vanilla")])
def test_long_video_windows_are_exact_and_reset(registry, policy, mode):
    pipe = make_pipe()
    ref = run(pipe, **LONG)
    assert ref.shape[2] == 8
    knobs = {"threshold": 0.0} if policy == "teacache" else {}
    ck.enable_cache(pipe, policy, mode=mode, registry=registry, **knobs)
    out = run(pipe, **LONG)
    stats = ck.summary(pipe, registry=registry)
    ex = dsk.execution_stats(pipe)
    ck.disable_cache(pipe, registry=registry)
    assert ex["windows"] == 3 and {r.window for r in stats.records} == {0, 1, 2}
    if mode == "vanilla":
        assert torch.equal(out, ref)
        return
    assert (out - ref).abs().max() <= ATOL
    # window >= 1: chunk 0 is the clean prefix (never an engine call), chunk 1 takes 4 steps;
    # the engine state restarts per window, so every window counts steps 0..3 again
    for w in (1, 2):
        keys = {(r.branch, r.chunk, r.step) for r in stats.records if r.window == w}
        assert keys == {(b, 1, s) for b in ("cond", "uncond") for s in range(4)}
    # fresh prefix noise at every iteration -> the prefix K/V is refreshed at every call
    assert ex["context_block_tokens"] > 0


@pytest.mark.parametrize("ar_step", [0, 2])
def test_ar_step_variants_without_guidance(registry, ar_step):
    pipe = make_pipe()
    kw = dict(ar_step=ar_step, guidance_scale=1.0, num_inference_steps=4)
    ref = run(pipe, **kw)
    ck.enable_cache(pipe, "flowcache", registry=registry, threshold=0.0)
    out = run(pipe, **kw)
    stats = ck.summary(pipe, registry=registry)
    ck.disable_cache(pipe, registry=registry)
    assert (out - ref).abs().max() <= ATOL
    assert {r.branch for r in stats.records} == {"cond"}   # guidance <= 1: one branch only
    assert stats.calls == 2 * 4


def test_batch_two(registry):
    pipe = make_pipe()
    ref = run(pipe, batch=2)
    ck.enable_cache(pipe, "motioncache", registry=registry, threshold=0.0)
    out = run(pipe, batch=2)
    ck.disable_cache(pipe, registry=registry)
    assert out.shape[0] == 2 and (out - ref).abs().max() <= ATOL


def test_chunked_policy_on_a_bidirectional_model_is_refused(registry):
    pipe = make_pipe()   # fresh transformer: num_frame_per_block = 1, no causal mask
    ck.enable_cache(pipe, "motioncache", registry=registry)
    with pytest.raises(ConfigError, match="bidirectional|every frame attends"):
        run(pipe, causal_block_size=None, ar_step=0, num_frames=9)
    ck.disable_cache(pipe, registry=registry)
    # window policies run the stock forward and stay exact there
    ref = run(pipe, causal_block_size=None, ar_step=0, num_frames=9)
    ck.enable_cache(pipe, "teacache", registry=registry, threshold=0.0)
    out = run(pipe, causal_block_size=None, ar_step=0, num_frames=9)
    ck.disable_cache(pipe, registry=registry)
    assert torch.equal(out, ref)


def test_video_to_video_pipeline_two_windows(registry):
    pipe = make_pipe(SkyReelsV2DiffusionForcingVideoToVideoPipeline)
    video = [Image.new("RGB", (32, 32), color=(30 * i, 100, 200 - 20 * i)) for i in range(9)]
    # window 0: 2 prefix latent frames encoded from the video + 2 new; window 1: 2 + 2
    kw = dict(video=video, num_frames=21, base_num_frames=13, overlap_history=5,
              addnoise_condition=20, num_inference_steps=4)
    ref = run(pipe, **kw)
    ck.enable_cache(pipe, "motioncache", registry=registry, threshold=0.0)
    out = run(pipe, **kw)
    ex = dsk.execution_stats(pipe)
    ck.disable_cache(pipe, registry=registry)
    assert ex["windows"] == 2 and (out - ref).abs().max() <= ATOL


def test_image_to_video_pipeline(registry):
    pipe = make_pipe(SkyReelsV2DiffusionForcingImageToVideoPipeline)
    image = Image.new("RGB", (32, 32), color=(30, 100, 200))
    kw = dict(image=image, num_inference_steps=4)
    ref = run(pipe, **kw)
    ck.enable_cache(pipe, "flowcache", registry=registry, threshold=0.0)
    out = run(pipe, **kw)
    ck.disable_cache(pipe, registry=registry)
    assert (out - ref).abs().max() <= ATOL
    # last_image freezes one latent frame inside a causal block of 2: only the stock forward
    kw["last_image"] = Image.new("RGB", (32, 32), color=(200, 10, 20))
    ref = run(pipe, **kw)
    ck.enable_cache(pipe, "flowcache", registry=registry, threshold=0.0)
    with pytest.raises(ConfigError, match="last_image"):
        run(pipe, **kw)
    ck.disable_cache(pipe, registry=registry)
    ck.enable_cache(pipe, "teacache", registry=registry, threshold=0.0)
    out = run(pipe, **kw)
    ck.disable_cache(pipe, registry=registry)
    assert torch.equal(out, ref)


# ----------------------------------------------------------- the bare transformer and runner
def _schedule(pipe, frames: int = 4, cbs: int = 2, steps: int = 3, ar_step: int = 1):
    pipe.scheduler.set_timesteps(steps)
    m, _, mask, valid = pipe.generate_timestep_matrix(frames, pipe.scheduler.timesteps, frames,
                                                      ar_step, 0, cbs)
    return m, mask, valid


@pytest.mark.parametrize("frames,cbs,steps,ar_step,pre", [(4, 2, 3, 1, 0), (10, 2, 5, 2, 2),
                                                           (6, 3, 4, 0, 0), (4, 1, 2, 1, 1)])
def test_schedule_matches_the_pipelines_step_index(frames, cbs, steps, ar_step, pre):
    from cachekit.types import ChunkState
    from cachekit_models.diffusers_skyreels._schedule import WindowSchedule

    pipe = make_pipe()
    pipe.scheduler.set_timesteps(steps)
    m, index, mask, valid = pipe.generate_timestep_matrix(frames, pipe.scheduler.timesteps,
                                                          frames, ar_step, pre, cbs)
    sched = WindowSchedule.from_tensors(mask, cbs, step_matrix=m, valid_interval=valid)
    assert sched.rows == steps + (frames // cbs - pre // cbs - 1) * ar_step
    for i in range(sched.rows):
        for g, (state, step) in enumerate(zip(sched.states(i), sched.steps(i))):
            r = int(index[i, g * cbs])      # 0 = not started, T + 1 = done (see _schedule)
            want = (ChunkState.PREFIX if g < pre // cbs else ChunkState.ACTIVE
                    if bool(mask[i, g * cbs]) else ChunkState.PENDING if r == 0
                    else ChunkState.FINISHED)
            assert state is want
            if state is ChunkState.ACTIVE:
                assert step == r - 1 and sched.timestep(i, g) == float(m[i, g * cbs])
    assert all(sched.num_steps(g) == (0 if g < pre // cbs else steps)
               for g in range(sched.num_chunks))


def _drive(tr, step_matrix, branches, *, x, encs):
    outs = []
    for row in step_matrix:
        for b in branches:
            with torch.no_grad(), tr.cache_context(b):
                outs.append(tr(hidden_states=x, timestep=row[None].clone(),
                               encoder_hidden_states=encs[b], enable_diffusion_forcing=True,
                               return_dict=False)[0])
    return outs


def test_bare_transformer_keys_state_by_context_name_not_parity():
    pipe = make_pipe()
    tr = pipe.transformer
    tr._set_ar_attention(2)
    m, mask, valid = _schedule(pipe)
    x = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    branches = ("cond", "style", "uncond")    # three-way guidance
    encs = {b: torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(i))
            for i, b in enumerate(branches)}
    ref = _drive(tr, m, branches, x=x, encs=encs)
    dsk.enable_cache(tr, "flowcache", threshold=0.0)
    with pytest.raises(CacheContextError, match="without a window schedule"):
        with torch.no_grad(), tr.cache_context("cond"):
            tr(hidden_states=x, timestep=m[0][None], encoder_hidden_states=encs["cond"],
               enable_diffusion_forcing=True)
    dsk.begin_window(tr, mask, 2, step_matrix=m, valid_interval=valid)
    out = _drive(tr, m, branches, x=x, encs=encs)
    with pytest.raises(CacheContextError, match="cache_context"):
        with torch.no_grad():
            tr(hidden_states=x, timestep=m[0][None], encoder_hidden_states=encs["cond"],
               enable_diffusion_forcing=True)
    dsk.end_run(tr)
    stats = dsk.summary(tr)
    dsk.disable_cache(tr)
    assert {r.branch for r in stats.records} == set(branches)
    assert stats.calls == 3 * 2 * 3
    # outputs of the updating chunks equal the stock call's (other frames are ignored)
    for i, (a, b) in enumerate(zip(out, ref)):
        upd = mask[i // 3]
        assert (a[:, :, upd] - b[:, :, upd]).abs().max() <= ATOL


class _SubsetProbe:
    """Stands in for the engine: runs each chunk fully, then a token subset of the same input,
    and records how far the subset's outputs are from the full run's."""

    def __init__(self) -> None:
        self.policy = types.SimpleNamespace(name="subset_probe", scope=Scope.CHUNK)
        self.diffs: list[float] = []

    def begin_run(self, **info) -> None: ...
    def begin_window(self, window) -> None: ...
    def end_run(self) -> None: ...
    def summary(self) -> None: ...

    def __call__(self, call, h_in, run, probe):
        assert probe.modulation.shape[1:3] == (call.frames, 6)
        full = run(h_in)
        idx = torch.arange(1, call.num_tokens, 3)
        sub = run(h_in[:, idx], idx)
        self.diffs.append(float((sub - full[:, idx]).abs().max()))
        return full


def test_selective_forward_of_a_fresh_subset_equals_the_full_forward():
    pipe = make_pipe()
    tr = pipe.transformer
    tr._set_ar_attention(2)
    m, mask, valid = _schedule(pipe, ar_step=0)
    x = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    encs = {"cond": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(4))}
    probe_engine = _SubsetProbe()
    dsk.enable_cache(tr, engine=probe_engine, mode="chunked")
    dsk.begin_window(tr, mask, 2, step_matrix=m, valid_interval=valid)
    _drive(tr, m, ("cond",), x=x, encs=encs)
    dsk.disable_cache(tr)
    assert len(probe_engine.diffs) == 3 * 2 and max(probe_engine.diffs) <= 1e-5
