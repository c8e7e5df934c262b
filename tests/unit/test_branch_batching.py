"""Branch batching: the guidance branches of an iteration (cond, uncond) run as one forward,
stacked along the batch, with the same video and the same per-(branch, chunk) decisions as one
forward per branch, for every built-in policy, both execution modes and both reuse spaces."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.engine import CacheEngine
from cachekit.errors import ConfigError
from cachekit.sampling import generate
from cachekit.types import ChunkState, Decision, IterationInfo
from cachekit_models.refdit.adapter import RefDiTAdapter
from cachekit_models.synthetic import Condition
from cachekit_policies.teacache import TeaCacheConfig, TeaCachePolicy

from conftest import ScriptedPolicy
from test_chunk_batching import POLICIES, SAMPLER
from test_refdit import BATCH, TINY, tiny_model

CONDS = [Condition(), Condition.parse("color=blue,motion=fast")]
ALL = dict(POLICIES, teacache=lambda: TeaCachePolicy(TeaCacheConfig(threshold=1.0,
                                                                     warmup_steps=1)))
WINDOW_SCOPE = {"teacache"}


def _run(policy, branch_batching: bool, *, mode: str = "chunked", model_seed: int = 4,
         chunk_batching: bool = True, sizes: list | None = None):
    model = tiny_model(model_seed)
    handle = None
    if sizes is not None:  # record the batch and length of every block-stack forward
        handle = model.blocks[0].register_forward_pre_hook(
            lambda mod, args: sizes.append(tuple(args[0].shape[:2])))
    adapter = RefDiTAdapter(model, chunk_batching=chunk_batching,
                            branch_batching=branch_batching)
    try:
        return generate(adapter, adapter.encode_condition(CONDS),
                        uncond=adapter.null_condition(BATCH), config=SAMPLER.evolve(mode=mode),
                        seed=2, engine=None if policy is None else CacheEngine(policy))
    finally:
        if handle is not None:
            handle.remove()


def _records(result):
    return [(r.window, r.iteration, r.branch, r.chunk, r.kind, r.computed, r.reason)
            for r in result.stats.records]


@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_uncached_stacked_equals_one_forward_per_branch(mode):
    a_sizes: list = []
    b_sizes: list = []
    a = _run(None, True, mode=mode, sizes=a_sizes)
    b = _run(None, False, mode=mode, sizes=b_sizes)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    # every forward holds both branches: half as many forwards, each of twice the batch
    assert len(b_sizes) == 2 * len(a_sizes) > 0
    assert {n for n, _ in a_sizes} == {2 * BATCH} and {n for n, _ in b_sizes} == {BATCH}
    assert sorted(t for _, t in a_sizes) == sorted(t for _, t in b_sizes[::2])


def test_stacked_chunked_still_equals_vanilla():
    a = _run(None, True)
    v = _run(None, False, mode="vanilla")
    torch.testing.assert_close(a.video, v.video, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_policy_gives_the_same_video_and_decisions_stacked(name):
    mode = "vanilla" if name in WINDOW_SCOPE else "chunked"
    a = _run(ALL[name](), True, mode=mode)
    b = _run(ALL[name](), False, mode=mode)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    assert _records(a) == _records(b)
    if name != "none":
        assert a.stats.computed_token_fraction < 1.0  # the check is not vacuous


def test_branches_that_disagree_run_separately_and_agree_elsewhere():
    # cond reuses chunk 1 at odd steps, uncond always computes: those iterations cannot be
    # stacked (different work), the others can; the video is the same either way
    def script(call, state, memory):
        if call.branch == "cond" and call.chunk == 1 and call.step % 2 == 1:
            return Decision.reuse("scripted")
        return Decision.compute("scripted")

    sizes: list = []
    a = _run(ScriptedPolicy(script), True, sizes=sizes)
    b = _run(ScriptedPolicy(script), False)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    assert _records(a) == _records(b)
    batches = {n for n, _ in sizes}
    assert batches == {BATCH, 2 * BATCH}  # both kinds of forward happened


def test_token_subsets_that_differ_by_branch_run_separately():
    def script(call, state, memory):
        if call.step >= 2:
            first = 0 if call.branch == "cond" else 1
            n = call.num_tokens
            return Decision.subset(torch.arange(first, n, 2), n, "scripted")
        return Decision.compute("scripted")

    sizes: list = []
    a = _run(ScriptedPolicy(script), True, sizes=sizes)
    b = _run(ScriptedPolicy(script), False)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    assert "partial" in {r.kind for r in a.stats.records}
    assert {n for n, _ in sizes} == {BATCH, 2 * BATCH}


def test_off_when_chunk_batching_is_off_or_the_policy_opts_out():
    sizes: list = []
    _run(None, True, chunk_batching=False, sizes=sizes)
    assert {n for n, _ in sizes} == {BATCH}

    class Sequential(ScriptedPolicy):
        batch_chunks = False

    sizes = []
    _run(Sequential(lambda call, state, memory: Decision.compute("x")), True, sizes=sizes)
    assert {n for n, _ in sizes} == {BATCH}


def test_batch_of_one_broadcasts_modulation():
    # B = 1 takes the broadcast path of the per-sample modulation; B = 2 (above) the repeat
    model = tiny_model(3)
    out = {}
    for flag in (True, False):
        adapter = RefDiTAdapter(model, branch_batching=flag)
        out[flag] = generate(adapter, adapter.encode_condition(CONDS[1:]),
                             uncond=adapter.null_condition(1), config=SAMPLER, seed=5).video
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


# --- the session's velocities() on its own -------------------------------------------------------

def _session_and_inputs(mode="chunked"):
    adapter = RefDiTAdapter(tiny_model(2))
    sess = adapter.session(batch=BATCH, mode=mode)
    sess.begin_window(0, TINY.max_frames)
    n_chunks = TINY.max_frames // TINY.chunk_frames
    states = (ChunkState.ACTIVE,) * n_chunks
    infos = {b: IterationInfo(window=0, iteration=0, num_iterations=2, branch=b, num_steps=4,
                              chunk_frames=TINY.chunk_frames, states=states,
                              steps=(0,) * n_chunks) for b in ("cond", "uncond")}
    x = torch.randn(BATCH, TINY.channels, TINY.max_frames, TINY.height, TINY.width)
    sigma = torch.ones(BATCH, TINY.max_frames)
    conds = {"cond": adapter.encode_condition(CONDS), "uncond": adapter.null_condition(BATCH)}
    return adapter, sess, x, sigma, conds, infos


@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_velocities_equals_velocity_per_branch(mode):
    adapter, sess, x, sigma, conds, infos = _session_and_inputs(mode)
    joint = sess.velocities(x, sigma, conds, infos)
    ref = adapter.session(batch=BATCH, mode=mode)
    ref.begin_window(0, TINY.max_frames)
    for b in ("cond", "uncond"):
        torch.testing.assert_close(joint[b], ref.velocity(x, sigma, conds[b], infos[b]),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.equal(joint["cond"], joint["uncond"])  # the branches did differ


def test_velocities_after_a_single_branch_call_in_the_window():
    # a window that started with per-branch buffers keeps them; the result is unchanged
    adapter, sess, x, sigma, conds, infos = _session_and_inputs()
    first = sess.velocity(x, sigma, conds["cond"], infos["cond"])
    nxt = {b: attrs.evolve(i, iteration=1, steps=(1,) * len(i.states))
           for b, i in infos.items()}
    ref = adapter.session(batch=BATCH)
    ref.begin_window(0, TINY.max_frames)
    torch.testing.assert_close(first, ref.velocity(x, sigma, conds["cond"], infos["cond"]))
    joint = sess.velocities(x, sigma, conds, nxt)
    ref.velocity(x, sigma, conds["uncond"], infos["uncond"])
    for b in ("cond", "uncond"):
        torch.testing.assert_close(joint[b], ref.velocity(x, sigma, conds[b], nxt[b]),
                                   atol=1e-5, rtol=1e-5)


def test_velocities_refuses_mismatched_infos():
    _adapter, sess, x, sigma, conds, infos = _session_and_inputs()
    with pytest.raises(ConfigError, match="one IterationInfo per branch"):
        sess.velocities(x, sigma, conds, {"cond": infos["cond"]})
    with pytest.raises(ConfigError, match=r"infos\['uncond'\].branch"):
        sess.velocities(x, sigma, conds, {"cond": infos["cond"], "uncond": infos["cond"]})
    other = dict(infos)
    u = infos["uncond"]
    other["uncond"] = IterationInfo(window=0, iteration=1, num_iterations=2, branch="uncond",
                                    num_steps=4, chunk_frames=u.chunk_frames, states=u.states,
                                    steps=u.steps)
    with pytest.raises(ConfigError, match="the branches of one iteration"):
        sess.velocities(x, sigma, conds, other)


def test_branch_batching_option_is_validated():
    with pytest.raises(ConfigError, match="branch_batching"):
        RefDiTAdapter(tiny_model(1), branch_batching=1)


# --- property: random decisions per (branch, chunk, step) --------------------------------------

def _random_script(seed: int, p_reuse: float, p_subset: float):
    """A scripted policy drawing, per (branch, chunk, step), compute / reuse / a random token
    subset from ``seed`` (a pure function of the key, so both runs see the same decisions)."""
    def script(call, state, memory):
        if call.step == 0:
            return Decision.compute("first")
        g = torch.Generator().manual_seed(
            seed * 7919 + call.step * 31 + call.chunk * 5 + (call.branch == "uncond"))
        u = float(torch.rand(1, generator=g))
        if u < p_reuse:
            return Decision.reuse("scripted")
        if u < p_reuse + p_subset:
            n = call.num_tokens
            keep = torch.rand(n, generator=g) < 0.5
            return Decision.subset(torch.nonzero(keep).flatten(), n, "scripted")
        return Decision.compute("scripted")
    return script


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), p_reuse=st.floats(0.0, 0.6),
       p_subset=st.floats(0.0, 0.4), latent=st.booleans())
def test_stacked_equals_one_forward_per_branch_over_random_decisions(seed, p_reuse, p_subset,
                                                                      latent):
    space = "latent_delta" if latent else "residual"
    script = _random_script(seed, p_reuse, p_subset)
    a = _run(ScriptedPolicy(script, reuse_space=space), True, model_seed=seed % 5)
    b = _run(ScriptedPolicy(script, reuse_space=space), False, model_seed=seed % 5)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)
    assert _records(a) == _records(b)


def test_sampler_refuses_a_velocities_result_without_every_branch():
    adapter = RefDiTAdapter(tiny_model(1))
    real = adapter.session

    def session(**kw):
        sess = real(**kw)
        sess.velocities = lambda x, sigma, conds, infos: {"cond": torch.zeros_like(x)}
        return sess

    adapter.session = session
    with pytest.raises(ConfigError, match=r"velocities\(\) result"):
        generate(adapter, adapter.encode_condition(CONDS), uncond=adapter.null_condition(BATCH),
                 config=SAMPLER, seed=0)
