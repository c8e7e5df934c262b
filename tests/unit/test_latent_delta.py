"""``latent_delta`` reuse (MAGI-1 variant): the engine wraps the latent update, not the blocks.

A reused token must move by exactly the update it had at its last computed step; computed
tokens must get the fresh update; threshold 0 must reproduce the uncached video; every
mismatch between what the policy reuses and what the adapter wraps is an error.
"""

from __future__ import annotations


import pytest
import torch

from cachekit.engine import CacheEngine
from cachekit.errors import CacheContextError, ConfigError
from cachekit.sampling import SamplerConfig, generate
from cachekit.types import ChunkState, Decision, IterationInfo, Scope
from cachekit_models.refdit.adapter import RefDiTAdapter
from cachekit_models.synthetic import Condition
from cachekit_policies.motioncache import MotionCacheConfig, MotionCachePolicy

from conftest import ScriptedPolicy
from test_refdit import BATCH, TINY, tiny_model


def _scripted(steps, reuse_space="latent_delta", scope=Scope.CHUNK):
    """The shared test policy playing ``{step: "compute" | "reuse" | tokens}`` on chunk 0
    (every other chunk computes)."""
    def play(call, state, memory):
        what = steps.get(call.step, "compute") if call.chunk == 0 else "compute"
        if what == "compute":
            return Decision.compute("script")
        if what == "reuse":
            return Decision.reuse("script")
        return Decision.subset(torch.tensor(what), call.num_tokens, "script")
    return ScriptedPolicy(play, scope=scope, reuse_space=reuse_space)


def _drive(policy_script, step_sizes=(-0.3, -0.2), reuse_space="latent_delta", mode="chunked"):
    """Two iterations of a one-chunk-active window; returns the velocities of chunk 0."""
    model = tiny_model(4)
    adapter = RefDiTAdapter(model)
    # any scope: in vanilla mode the space check is what is tested
    engine = CacheEngine(_scripted(policy_script, reuse_space, scope=None))
    sess = adapter.session(batch=BATCH, mode=mode, hook=engine)
    cfg = model.cfg
    n_chunks = cfg.max_frames // cfg.chunk_frames
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, cfg.max_frames, cfg.height, cfg.width, generator=gen)
    cond = adapter.encode_condition([Condition()] * BATCH)
    engine.begin_run()
    engine.begin_window(0)
    sess.begin_window(0, cfg.max_frames)
    sigma_now = 1.0
    vs = []
    for it, ds in enumerate(step_sizes):
        states = (ChunkState.ACTIVE,) + (ChunkState.PENDING,) * (n_chunks - 1)
        steps = (it,) + (0,) * (n_chunks - 1)
        sizes = (ds,) + (0.0,) * (n_chunks - 1) if ds is not None else None
        info = IterationInfo(window=0, iteration=it, num_iterations=len(step_sizes),
                             branch="cond", num_steps=4, chunk_frames=cfg.chunk_frames,
                             states=states, steps=steps, step_sizes=sizes)
        sigma = torch.ones(BATCH, cfg.max_frames)
        sigma[:, :cfg.chunk_frames] = sigma_now
        v = sess.velocity(x, sigma, cond, info)
        vs.append(v[:, :, :cfg.chunk_frames].clone())
        x[:, :, :cfg.chunk_frames] += (ds or 0.0) * v[:, :, :cfg.chunk_frames]
        sigma_now += ds or 0.0
    engine.end_window()
    return vs, engine, model


def test_full_reuse_repeats_the_previous_latent_update():
    (v0, v1), engine, _ = _drive({1: "reuse"}, step_sizes=(-0.3, -0.2))
    # the update of step 1 (ds=-0.2) equals the update of step 0 (ds=-0.3)
    torch.testing.assert_close(-0.2 * v1, -0.3 * v0, atol=1e-5, rtol=1e-5)
    assert engine.summary().computed_token_fraction < 1.0


def test_partial_reuse_fresh_where_computed_and_repeated_elsewhere():
    cfg = TINY
    n = cfg.chunk_frames * cfg.tokens_per_frame
    tokens = list(range(0, n, 3))
    (v0, v1), _, model = _drive({1: tokens})
    (_, v1_full), _, _ = _drive({})                 # the same step, everything computed
    upd0, upd1, upd1_full = (model.patchify(-0.3 * v0), model.patchify(-0.2 * v1),
                             model.patchify(-0.2 * v1_full))
    sel = torch.zeros(n, dtype=torch.bool)
    sel[tokens] = True
    torch.testing.assert_close(upd1[:, ~sel], upd0[:, ~sel], atol=1e-5, rtol=1e-5)
    # computed tokens attend to fresh K/V at the subset and cached K/V elsewhere, so they
    # differ slightly from a full recompute, but they are the fresh update, not the old one
    assert not torch.allclose(upd1[:, sel], upd0[:, sel], atol=1e-3)
    assert float((upd1[:, sel] - upd1_full[:, sel]).abs().max()) < \
        float((upd0[:, sel] - upd1_full[:, sel]).abs().max())


def test_engine_sees_latent_tokens():
    model = tiny_model(1)
    adapter = RefDiTAdapter(model)
    policy = _scripted({})
    engine = CacheEngine(policy)
    captured = {}
    real_call = engine.__call__

    def hook(call, h_in, run, probe):
        captured["h_in"] = h_in
        return real_call(call, h_in, run, probe)

    hook.reuse_space = "latent_delta"   # what the adapter reads
    sess = adapter.session(batch=BATCH, mode="chunked", hook=hook)
    cfg = model.cfg
    engine.begin_run()
    engine.begin_window(0)
    sess.begin_window(0, cfg.max_frames)
    n_chunks = cfg.max_frames // cfg.chunk_frames
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=4,
                         chunk_frames=cfg.chunk_frames,
                         states=(ChunkState.ACTIVE,) + (ChunkState.PENDING,) * (n_chunks - 1),
                         steps=(0,) * n_chunks, step_sizes=(-0.25,) + (0.0,) * (n_chunks - 1))
    x = torch.randn(BATCH, 3, cfg.max_frames, cfg.height, cfg.width)
    sess.velocity(x, torch.ones(BATCH, cfg.max_frames),
                  adapter.encode_condition([Condition()] * BATCH), info)
    assert [c.space for c, _ in policy.decided] == ["latent_delta"]
    torch.testing.assert_close(captured["h_in"], model.patchify(x[:, :, :cfg.chunk_frames]))


def _generate_latent_delta(guidance: float, steps: int, **motioncache):
    """(uncached video, MotionCache latent_delta result) of the tiny model, same seed."""
    adapter = RefDiTAdapter(tiny_model(3))
    cfg = SamplerConfig(num_frames=TINY.max_frames, num_steps=steps, ar_step=1, shift=2.0,
                        guidance_scale=guidance)
    cond = adapter.encode_condition([Condition()] * BATCH)
    unc = adapter.null_condition(BATCH) if guidance != 1.0 else None
    ref = generate(adapter, cond, uncond=unc, config=cfg, seed=1).video
    pol = MotionCachePolicy(MotionCacheConfig(reuse_space="latent_delta", **motioncache))
    return ref, generate(adapter, cond, uncond=unc, config=cfg, seed=1,
                         engine=CacheEngine(pol))


def test_threshold_zero_reproduces_the_uncached_video():
    ref, res = _generate_latent_delta(2.0, 6, threshold=0.0)
    torch.testing.assert_close(res.video, ref, atol=1e-5, rtol=1e-5)
    assert res.stats.computed_token_fraction == 1.0


def test_large_threshold_reuses_and_stays_finite():
    ref, res = _generate_latent_delta(1.0, 8, threshold=1e6, warmup_steps=1, phase1_steps=0)
    assert res.stats.computed_token_fraction < 0.9
    assert bool(torch.isfinite(res.video).all())
    assert not torch.allclose(res.video, ref)


def test_vanilla_mode_refuses_latent_delta():
    with pytest.raises(CacheContextError, match="latent_delta"):
        _drive({}, mode="vanilla")


def test_scripted_residual_policy_rejects_latent_calls():
    model = tiny_model(1)
    engine = CacheEngine(_scripted({}, reuse_space="residual"))
    from cachekit.types import ChunkCall, Probe
    engine.begin_run()
    engine.begin_window(0)
    call = ChunkCall(branch="cond", chunk=0, step=0, num_steps=2, frames=1,
                     tokens_per_frame=4, space="latent_delta")
    with pytest.raises(CacheContextError, match="'residual' space"):
        engine(call, torch.zeros(1, 4, 3), lambda h, t=None: h, Probe(grid=(1, 2, 2)))
    del model


def test_missing_step_sizes_is_a_clear_error():
    with pytest.raises(ConfigError, match="step_sizes"):
        _drive({}, step_sizes=(None,))


@pytest.mark.parametrize("bad", [(-0.1,), (0.1, 0.0, 0.0, 0.0), (-0.1, -0.1, 0.0, 0.0),
                                 (float("nan"), 0.0, 0.0, 0.0)])
def test_step_sizes_are_validated(bad):
    with pytest.raises(ConfigError, match="step_sizes"):
        IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=4,
                      chunk_frames=2, states=(ChunkState.ACTIVE,) + (ChunkState.PENDING,) * 3,
                      steps=(0,) * 4, step_sizes=bad)


def test_unknown_reuse_space_is_refused_by_the_engine():
    with pytest.raises(ConfigError, match="reuse_space"):
        CacheEngine(_scripted({}, reuse_space="pixels"))
    with pytest.raises(ConfigError, match="reuse_space"):
        MotionCacheConfig(reuse_space="pixels")


def test_policy_wrappers_keep_the_reuse_space():
    """The bench's recorder and the contract suite's spy must run a latent_delta policy as
    latent_delta (a wrapper that dropped the attribute would make the engine refuse every
    call, or cache the wrong quantity)."""
    from cachekit.bench import RecordingPolicy
    from cachekit.testing.contract import DecisionSpy

    pol = MotionCachePolicy(MotionCacheConfig(reuse_space="latent_delta"))
    for wrapper in (RecordingPolicy(pol), DecisionSpy(pol)):
        assert CacheEngine(wrapper).reuse_space == "latent_delta"
        assert wrapper.name == "motioncache" and wrapper.config is pol.config
    ref, res = _generate_latent_delta(1.0, 8, threshold=1e6, warmup_steps=1, phase1_steps=0)
    adapter = RefDiTAdapter(tiny_model(3))
    cfg = SamplerConfig(num_frames=TINY.max_frames, num_steps=8, ar_step=1, shift=2.0,
                        guidance_scale=1.0)
    wrapped = RecordingPolicy(MotionCachePolicy(MotionCacheConfig(
        reuse_space="latent_delta", threshold=1e6, warmup_steps=1, phase1_steps=0)))
    out = generate(adapter, adapter.encode_condition([Condition()] * BATCH), config=cfg, seed=1,
                   engine=CacheEngine(wrapped))
    assert torch.equal(out.video, res.video) and wrapped.log
