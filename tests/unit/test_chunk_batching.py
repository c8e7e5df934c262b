"""Chunk batching: an iteration's chunks run as one forward, with the same video as one call
per chunk, through the engine's ``run_chunks`` for every built-in policy and reuse space."""

from __future__ import annotations

import pytest
import torch

from cachekit.engine import CacheEngine
from cachekit.errors import CacheContextError, ConfigError, ResidualShapeError
from cachekit.plugins import Registry
from cachekit.sampling import SamplerConfig, generate
from cachekit.types import ChunkCall, Decision, Probe
from cachekit_models.refdit.adapter import RefDiTAdapter
from cachekit_models.synthetic import Condition
from cachekit_policies.baseline import FixedIntervalConfig, FixedIntervalPolicy, NonePolicy
from cachekit_policies.flowcache import FlowCacheConfig, FlowCachePolicy
from cachekit_policies.motioncache import MotionCacheConfig, MotionCachePolicy

from conftest import ScriptedPolicy
from test_refdit import BATCH, TINY, run_schedule, tiny_model

SAMPLER = SamplerConfig(num_frames=12, base_num_frames=TINY.max_frames, overlap_history=4,
                        num_steps=6, ar_step=1, shift=2.0, guidance_scale=2.5)


def _generate(policy, batching: bool, sampler: SamplerConfig = SAMPLER, model_seed: int = 4):
    adapter = RefDiTAdapter(tiny_model(model_seed), chunk_batching=batching)
    cond = adapter.encode_condition([Condition(), Condition.parse("color=blue,motion=fast")])
    engine = None if policy is None else CacheEngine(policy)
    return generate(adapter, cond, uncond=adapter.null_condition(BATCH), config=sampler,
                    seed=2, engine=engine)


def _count_forwards(model):
    sizes: list[int] = []
    handles = [model.blocks[0].register_forward_pre_hook(
        lambda mod, args: sizes.append(args[0].shape[1]))]
    return sizes, handles


def test_uncached_batched_equals_one_call_per_chunk_and_vanilla():
    a = _generate(None, True)
    b = _generate(None, False)
    v = generate(RefDiTAdapter(tiny_model(4)), RefDiTAdapter(tiny_model(4)).encode_condition(
        [Condition(), Condition.parse("color=blue,motion=fast")]),
        uncond=tiny_model(4).null_condition(BATCH).detach(),
        config=SAMPLER.evolve(mode="vanilla"), seed=2)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.video, v.video, atol=1e-4, rtol=1e-4)


def test_batched_runs_one_forward_per_iteration_and_branch():
    model = tiny_model(5)
    sizes, handles = _count_forwards(model)
    try:
        worst = run_schedule(model, modes=("chunked",), num_steps=4, ar_step=1)
    finally:
        for h in handles:
            h.remove()
    rows = 4 + 3 * 1
    assert worst == 0.0
    # one block-stack forward per iteration and branch, never more
    assert len(sizes) == 2 * rows
    n_chunk = TINY.chunk_frames * TINY.tokens_per_frame
    assert all(n % n_chunk == 0 and n >= n_chunk for n in sizes)
    assert max(sizes) > n_chunk  # several chunks did share a forward


def test_schedule_through_batched_and_one_by_one_sessions_agree():
    # the adapter with batching vs without, same latents (run_schedule feeds both modes
    # with vanilla's velocity, so use vanilla as the common reference)
    for prefix in (0, 1):
        assert run_schedule(tiny_model(6), num_steps=4, ar_step=2, prefix=prefix) <= 1e-4


POLICIES = {
    "none": lambda: NonePolicy(),
    "fixed_interval": lambda: FixedIntervalPolicy(FixedIntervalConfig(interval=2,
                                                                      warmup_steps=1)),
    "flowcache": lambda: FlowCachePolicy(FlowCacheConfig(threshold=3.0, warmup_steps=1)),
    # thresholds picked on this tiny model so that token subsets (and whole reuses) occur
    "motioncache": lambda: MotionCachePolicy(MotionCacheConfig(
        threshold=2.0, warmup_steps=1, phase1_steps=0)),
    "motioncache_latent": lambda: MotionCachePolicy(MotionCacheConfig(
        threshold=2.0, warmup_steps=1, phase1_steps=0, reuse_space="latent_delta")),
    "motioncache_latent_diff": lambda: MotionCachePolicy(MotionCacheConfig(
        threshold=0.5, warmup_steps=1, phase1_steps=0, estimator="latent_diff")),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_gives_the_same_video_and_decisions_batched(name):
    a = _generate(POLICIES[name](), True)
    b = _generate(POLICIES[name](), False)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    ka = [(r.window, r.iteration, r.branch, r.chunk, r.kind, r.computed, r.reason)
          for r in a.stats.records]
    kb = [(r.window, r.iteration, r.branch, r.chunk, r.kind, r.computed, r.reason)
          for r in b.stats.records]
    assert ka == kb
    if name != "none":
        assert a.stats.computed_token_fraction < 1.0  # the check is not vacuous
    if name.startswith("motioncache"):
        assert "partial" in {r.kind for r in a.stats.records}


def test_policy_can_opt_out_of_batching():
    class Sequential(ScriptedPolicy):
        batch_chunks = False

    seen = []
    pol = Sequential(lambda call, state, memory: Decision.compute("x"))
    engine = CacheEngine(pol)
    assert engine.batch_chunks is False
    orig = engine.run_chunks
    engine.run_chunks = lambda *a, **k: seen.append(1) or orig(*a, **k)
    adapter = RefDiTAdapter(tiny_model(1))
    cond = adapter.encode_condition([Condition()] * BATCH)
    generate(adapter, cond, config=SAMPLER.evolve(guidance_scale=1.0), engine=engine)
    assert seen == [] and len(pol.decided) > 0

    pol2 = ScriptedPolicy(lambda call, state, memory: Decision.compute("x"))
    engine2 = CacheEngine(pol2)
    assert engine2.batch_chunks is True
    orig2 = engine2.run_chunks
    engine2.run_chunks = lambda *a, **k: seen.append(1) or orig2(*a, **k)
    generate(adapter, cond, config=SAMPLER.evolve(guidance_scale=1.0), engine=engine2)
    assert len(seen) > 0


def test_chunk_batching_option_is_validated():
    with pytest.raises(ConfigError, match="chunk_batching"):
        RefDiTAdapter(tiny_model(1), chunk_batching="yes")


# --- the engine's run_chunks on its own --------------------------------------------------------

def _engine(script):
    return CacheEngine(ScriptedPolicy(script), registry=Registry(autoload=False))


def _calls(step, chunks=(0, 1, 2), n=4):
    return [ChunkCall(branch="cond", chunk=c, step=step, num_steps=4, frames=1,
                      tokens_per_frame=n) for c in chunks]


def test_run_chunks_equals_calls_one_by_one():
    script = {("cond", 0, 1): Decision.reuse("r"), ("cond", 1, 1): Decision.subset(
        torch.tensor([1, 3]), 4, "p"), ("cond", 2, 2): Decision.subset(torch.tensor([0]), 4)}
    torch.manual_seed(0)
    hs = [[torch.randn(1, 4, 3) for _ in range(3)] for _ in range(3)]
    seq, grp = _engine(script), _engine(script)
    parts_seen = []

    def run_one(h, tokens=None):
        return 2 * h + 1

    def run_group(parts):
        parts_seen.append([(i, None if t is None else t.tolist()) for i, h, t in parts])
        return [2 * h + 1 for _i, h, _t in parts]

    for eng in (seq, grp):
        eng.begin_run()
        eng.begin_window(0)
    for step in range(3):
        calls = _calls(step)
        outs_seq = [seq(c, h.clone(), run_one, Probe()) for c, h in zip(calls, hs[step])]
        outs_grp = grp.run_chunks(calls, [h.clone() for h in hs[step]], run_group,
                                  [Probe()] * 3)
        for a, b in zip(outs_seq, outs_grp):
            assert torch.equal(a, b)
    s1, s2 = seq.end_run(), grp.end_run()
    key = [(r.chunk, r.step, r.kind, r.computed, r.reason) for r in s1.records]
    assert key == [(r.chunk, r.step, r.kind, r.computed, r.reason) for r in s2.records]
    # step 1: chunk 0 reused (not in the group), chunk 1 a subset, chunk 2 whole
    assert parts_seen[1] == [(1, [1, 3]), (2, None)]
    # block time is shared out: every record's total covers its share
    assert all(r.total_s >= r.block_s >= 0.0 for r in s2.records)


def test_run_chunks_checks_its_arguments_and_the_runner():
    eng = _engine({})
    eng.begin_run()
    eng.begin_window(0)
    with pytest.raises(CacheContextError, match="run_chunks"):
        eng.run_chunks(_calls(0), [torch.zeros(1, 4, 2)] * 2, lambda p: [], [Probe()] * 3)
    with pytest.raises(ResidualShapeError, match="group runner"):
        eng.run_chunks(_calls(0), [torch.zeros(1, 4, 2)] * 3, lambda p: [p[0][1]],
                       [Probe()] * 3)


def test_run_chunks_outside_a_window_is_refused():
    eng = _engine({})
    with pytest.raises(CacheContextError, match="outside a window"):
        eng.run_chunks(_calls(0), [torch.zeros(1, 4, 2)] * 3, lambda p: [h for _, h, _ in p],
                       [Probe()] * 3)


@pytest.mark.parametrize("batching", [True, False])
def test_latent_delta_without_step_sizes_fails_before_any_decision(batching):
    from cachekit.types import ChunkState, IterationInfo

    model = tiny_model(4)
    adapter = RefDiTAdapter(model, chunk_batching=batching)
    policy = ScriptedPolicy(lambda call, state, memory: Decision.compute("x"),
                            reuse_space="latent_delta")
    engine = CacheEngine(policy)
    sess = adapter.session(batch=BATCH, mode="chunked", hook=engine)
    cfg = model.cfg
    n_chunks = cfg.max_frames // cfg.chunk_frames
    engine.begin_run()
    engine.begin_window(0)
    sess.begin_window(0, cfg.max_frames)
    info = IterationInfo(window=0, iteration=0, num_iterations=1, branch="cond", num_steps=4,
                         chunk_frames=cfg.chunk_frames,
                         states=(ChunkState.ACTIVE,) * 2 + (ChunkState.PENDING,) * (n_chunks - 2),
                         steps=(1, 0) + (0,) * (n_chunks - 2), step_sizes=None)
    with pytest.raises(ConfigError, match="step_sizes"):
        sess.velocity(torch.zeros(BATCH, 3, cfg.max_frames, cfg.height, cfg.width),
                      torch.ones(BATCH, cfg.max_frames),
                      adapter.encode_condition([Condition()] * BATCH), info)
    assert policy.decided == []
