"""CacheEngine: one test per known silent failure, plus lifecycle, hooks and summary.

Runners here are tokenwise affine maps on values of a 1/8 grid, so every expected output is
exact and compared with ``torch.equal``: a residual applied twice, aliased, or taken from the
wrong branch/window cannot hide inside a tolerance.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cachekit.config import EngineConfig
from cachekit.engine import CacheEngine
from cachekit.errors import CacheContextError, DecisionError, ResidualShapeError
from cachekit.hookspecs import hookimpl
from cachekit.plugins import Registry
from cachekit.stats import RECOMPUTE_REASONS, CacheStats
from cachekit.types import ChunkState, Decision, DecisionKind, IterationInfo, Scope

C, R = Decision.compute, Decision.reuse
KEY = ("cond", 0)


def f(h, tokens=None):
    """The tokenwise 'block stack' of most tests (also a runner: ``tokens`` is ignored)."""
    return 2 * h + 1


def never(h, tokens=None):
    raise AssertionError("the blocks ran although the decision was a full reuse")


def engine(policy, registry, **cfg) -> CacheEngine:
    eng = CacheEngine(policy, config=EngineConfig(**cfg), registry=registry)
    eng.begin_run()
    eng.begin_window(0)
    return eng


def P(tokens):
    """A PARTIAL decision built directly (bypassing Decision.subset's collapsing)."""
    return Decision(DecisionKind.PARTIAL, torch.tensor(tokens, dtype=torch.long), "test")


# ------------------------------------------------------------------ (a) in-place blocks
def test_in_place_block_gets_a_snapshot_residual(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry)
    h0 = grid((2, 4, 3), seed=1)

    def in_place(h, tokens=None):
        h.mul_(2).add_(1)  # works on its input, like a block with `x += attn(x)`
        return h

    out0 = eng(call(step=0), h0.clone(), in_place, probe)
    assert torch.equal(out0, f(h0))
    # the residual is f(h0) - h0 = h0 + 1, not f(h0) - f(h0) = 0
    assert torch.equal(eng.store.get(KEY), h0 + 1)
    # the policy observed the true block input, not the mutated tensor
    assert torch.equal(pol.observed[0][1].h_in, h0)
    # reuse for the same input gives exactly what compute gave
    out1 = eng(call(step=1), h0.clone(), never, probe)
    assert torch.equal(out1, out0)


def test_in_place_selective_block_gets_a_snapshot_residual(registry, scripted, call, grid,
                                                           probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): P([1, 2]),
                    ("cond", 0, 2): R()})
    eng = engine(pol, registry)
    h0, h1 = grid((1, 4, 2), seed=1), grid((1, 4, 2), seed=2)

    def in_place(h, tokens=None):
        return h.mul_(2).add_(1)

    eng(call(step=0), h0.clone(), in_place, probe)
    out1 = eng(call(step=1), h1.clone(), in_place, probe)
    expected_r = h0 + 1
    expected_r[:, [1, 2]] = h1[:, [1, 2]] + 1
    assert torch.equal(eng.store.get(KEY), expected_r)
    exp1 = h1 + (h0 + 1)
    exp1[:, [1, 2]] = f(h1[:, [1, 2]])
    assert torch.equal(out1, exp1)


# ----------------------------------------------------------------- (b) applied exactly once
def test_residual_is_applied_exactly_once(registry, scripted, runner, call, grid, probe):
    plan = [C(), R(), R(), C(), R(), R(), R()]
    pol = scripted({("cond", 0, k): d for k, d in enumerate(plan)})
    eng = engine(pol, registry)
    run = runner(f)
    last_res = None
    for k, d in enumerate(plan):
        h = grid((1, 4, 3), seed=10 + k)
        out = eng(call(step=k), h, run, probe)
        if d.kind is DecisionKind.COMPUTE:
            last_res = f(h) - h
            assert torch.equal(out, f(h))
        else:
            assert torch.equal(out, h + last_res), f"step {k}: residual not applied once"
            assert not torch.equal(out, h + 2 * last_res)
    assert run.calls == [None, None]


# ----------------------------------------------------------------------- (c) wrong shapes
def test_reused_residual_of_the_wrong_shape_raises(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    eng.store.put(KEY, torch.zeros(1, 4, 3))  # as if the geometry changed under the key
    with pytest.raises(ResidualShapeError) as ei:
        eng(call(step=1), grid((1, 4, 2)), never, probe)
    msg = str(ei.value)
    assert "(1, 4, 2)" in msg and "(1, 4, 3)" in msg and "begin_window" in msg


def test_same_key_with_more_tokens_without_begin_window_raises(registry, scripted, call, grid,
                                                               probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry)
    eng(call(step=0, frames=1), grid((1, 4, 2)), f, probe)
    with pytest.raises(ResidualShapeError):
        eng(call(step=1, frames=2), grid((1, 8, 2)), never, probe)


def test_partial_with_a_wrong_shaped_residual_raises(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): P([0])})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    eng.store.put(KEY, torch.zeros(2, 4, 2))
    with pytest.raises(ResidualShapeError):
        eng(call(step=1), grid((1, 4, 2)), never, probe)


def test_block_output_of_the_wrong_shape_raises(registry, scripted, call, grid, probe):
    eng = engine(scripted(), registry)
    with pytest.raises(ResidualShapeError, match="block output"):
        eng(call(step=0), grid((1, 4, 2)), lambda h, t=None: h[:, :3], probe)
    with pytest.raises(ResidualShapeError, match="block output"):
        eng(call(step=1), grid((1, 4, 2)), lambda h, t=None: "not a tensor", probe)


def test_selective_output_of_the_wrong_shape_raises(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): P([0, 2])})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    with pytest.raises(ResidualShapeError, match="selective block output"):
        eng(call(step=1), grid((1, 4, 2)), lambda h, t=None: f(h)[:, :1], probe)


def test_block_input_not_matching_the_call_raises(registry, scripted, call, grid, probe):
    pol = scripted()
    eng = engine(pol, registry)
    with pytest.raises(CacheContextError, match=r"h_in: expected \[B, N=8, D\]"):
        eng(call(step=0, frames=2), grid((1, 4, 2)), f, probe)
    with pytest.raises(CacheContextError):
        eng(call(step=0), grid((4, 2)), f, probe)
    assert pol.decided == [] and eng.summary().calls == 0


# ------------------------------------------------------------------ (d) non-finite residuals
def test_nonfinite_residual_is_not_stored_and_reuse_recomputes(registry, scripted, runner, call,
                                                               grid, probe, caplog):
    pol = scripted({("cond", 0, 0): C("first"), ("cond", 0, 1): R("try reuse")})
    eng = engine(pol, registry)
    h0, h1 = grid((1, 4, 2), seed=0), grid((1, 4, 2), seed=1)
    with caplog.at_level(logging.DEBUG, logger="cachekit"):
        out0 = eng(call(step=0), h0, lambda h, t=None: h * float("nan"), probe)
        assert torch.isnan(out0).all()  # the model's output is returned as is
        assert KEY not in eng.store and eng.store.nbytes == 0
        run = runner(f)
        out1 = eng(call(step=1), h1, run, probe)
    assert torch.equal(out1, f(h1))  # recomputed, not h1 + NaN
    assert run.calls == [None]
    rec = eng.summary().records[1]
    assert (rec.kind, rec.computed, rec.reason) == ("compute", 4, "nonfinite_residual")
    assert eng.summary().recomputes == {"nonfinite_residual": 1}
    assert KEY in eng.store  # the recompute stored a finite residual
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("nonfinite_residual" in r.getMessage() and "('cond', 0)" in r.getMessage()
               for r in warnings)
    # the policy saw the override
    assert pol.observed[1][1].decision.kind is DecisionKind.COMPUTE


def test_nonfinite_residual_counts_one_forced_recompute(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), lambda h, t=None: h / 0.0, probe)
    eng(call(step=1), grid((1, 4, 2), seed=1), f, probe)
    s = eng.summary()
    overridden = [r for r in s.records if r.reason in RECOMPUTE_REASONS]
    assert len(overridden) == 1
    assert sum(s.recomputes.values()) == len(overridden)  # "forced recomputes" in table()
    assert overridden[0].reason == "nonfinite_residual"


def test_nonfinite_partial_update_drops_the_residual(registry, scripted, runner, call, grid,
                                                    probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): P([1]), ("cond", 0, 2): R()})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    eng(call(step=1), grid((1, 4, 2), seed=1), lambda h, t=None: h + float("inf"), probe)
    assert KEY not in eng.store
    run = runner(f)
    h2 = grid((1, 4, 2), seed=2)
    assert torch.equal(eng(call(step=2), h2, run, probe), f(h2))
    assert run.calls == [None]
    assert eng.summary().records[-1].reason == "nonfinite_residual"


def test_recompute_reason_is_the_latest_cause(registry, scripted, call, grid, probe):
    """A key once dropped as non-finite, then stored fine and evicted, recomputes as
    missing_residual (the eviction), not as nonfinite_residual (a stale cause)."""
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): C(), ("cond", 1, 0): C(),
                    ("cond", 0, 2): R()})
    eng = engine(pol, registry, budget_bytes=40)  # one 32-byte residual fits
    eng(call(step=0), grid((1, 4, 2)), lambda h, t=None: h * float("nan"), probe)
    eng(call(step=1), grid((1, 4, 2)), f, probe)
    eng(call(chunk=1, step=0), grid((1, 4, 2)), f, probe)  # evicts chunk 0
    eng(call(step=2), grid((1, 4, 2)), f, probe)
    s = eng.summary()
    assert s.records[-1].reason == "missing_residual"
    assert s.recomputes == {"missing_residual": 1}


def test_check_finite_off_stores_nonfinite_residuals(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry, check_finite=False)
    eng(call(step=0), grid((1, 4, 2)), lambda h, t=None: h * float("inf"), probe)
    assert KEY in eng.store
    eng(call(step=1), grid((1, 4, 2)), never, probe)
    assert eng.summary().recomputes == {}


def test_repeated_recompute_warns_once_then_debug(registry, scripted, call, grid, probe, caplog):
    pol = scripted(lambda c, s, m: C() if c.step == 0 else R())
    eng = engine(pol, registry, budget_bytes=0)  # nothing is ever stored
    with caplog.at_level(logging.DEBUG, logger="cachekit"):
        for k in range(4):
            eng(call(step=k), grid((1, 4, 2), seed=k), f, probe)
    mine = [r for r in caplog.records if "missing_residual" in r.getMessage()]
    assert [r.levelno for r in mine] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert eng.summary().recomputes == {"missing_residual": 3}


# --------------------------------------------------------------------- (e) context and branch
def test_calls_outside_run_or_window_raise_and_change_nothing(registry, scripted, call, grid,
                                                              probe):
    pol = scripted()
    eng = CacheEngine(pol, registry=registry)
    h = grid((1, 4, 2))
    with pytest.raises(CacheContextError, match="begin_window"):
        eng(call(step=0), h, f, probe)
    with pytest.raises(CacheContextError, match="begin_run"):
        eng.begin_window(0)
    eng.begin_run()
    with pytest.raises(CacheContextError, match="outside a window"):
        eng(call(step=0), h, f, probe)
    with eng.window(0):
        eng(call(step=0), h, f, probe)
    with pytest.raises(CacheContextError):
        eng(call(step=1), h, f, probe)
    eng.end_run()
    with pytest.raises(CacheContextError):
        eng(call(step=2), h, f, probe)
    with pytest.raises(CacheContextError):
        eng.begin_window(1)
    assert len(pol.decided) == 1 and eng.summary().calls == 1


@pytest.mark.parametrize("second", [0, 1])
def test_repeated_or_earlier_step_in_a_window_raises(registry, scripted, call, grid, probe,
                                                     second):
    pol = scripted()
    eng = engine(pol, registry)
    eng(call(step=1), grid((1, 4, 2)), f, probe)
    with pytest.raises(CacheContextError) as ei:
        eng(call(step=second), grid((1, 4, 2)), f, probe)
    msg = str(ei.value)
    assert "begin_window" in msg and "branch" in msg and "('cond', 0)" in msg
    assert len(pol.decided) == 1 and eng.summary().calls == 1
    # the same step on another branch or chunk is fine
    eng(call("uncond", step=1), grid((1, 4, 2)), f, probe)
    eng(call(chunk=1, step=1), grid((1, 4, 2)), f, probe)


def test_branches_keep_separate_residuals(registry, scripted, call, grid, probe):
    """Interleaved, skipped and three-way guidance: the residual always comes from the branch
    named in the call, never from call parity."""
    fns = {"cond": f, "uncond": lambda h: 3 * h - 1, "extra": lambda h: -h + 0.5}
    order = [("cond", 0), ("uncond", 0), ("extra", 0),           # three-way at step 0
             ("cond", 1), ("cond", 2), ("uncond", 1),            # uncond skipped once
             ("extra", 1), ("uncond", 2), ("cond", 3)]
    pol = scripted(lambda c, s, m: C() if c.step == 0 else R())
    eng = engine(pol, registry)
    h0 = grid((1, 4, 2), seed=0)
    res = {b: fn(h0) - h0 for b, fn in fns.items()}
    for b, _ in order[:3]:
        eng(call(b, step=0), h0, lambda h, t=None, b=b: fns[b](h), probe)
    for i, (b, k) in enumerate(order[3:]):
        h = grid((1, 4, 2), seed=i + 1)
        out = eng(call(b, step=k), h, never, probe)
        assert torch.equal(out, h + res[b]), f"{b} step {k} used another branch's residual"
    assert {key[0] for key in eng.store.keys()} == set(fns)


# ------------------------------------------------------------------ (f) windows and runs
def test_begin_window_drops_state_residuals_and_memory(registry, scripted, call, grid, probe):
    def script(c, state, memory):
        memory.setdefault("seen", []).append((c.window, c.step))
        return C() if c.step == 0 else R()

    pol = scripted(script)
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    assert eng.state("cond", 0) is not None and KEY in eng.store
    eng.begin_window(1)
    assert eng.state("cond", 0) is None and len(eng.store) == 0
    h = grid((1, 4, 2), seed=3)
    # step 1 of window 1 must not reuse window 0's residual: it recomputes (counted)
    out = eng(call(step=1, window=1), h, f, probe)
    assert torch.equal(out, f(h))
    assert eng.summary().records[-1].reason == "missing_residual"
    # fresh state and fresh memory in the new window; steps restart
    assert len(pol.states_made) == 2 and pol.states_made[1]["calls"] == 1
    assert pol.decided and eng.state("cond", 0) is pol.states_made[1]
    eng(call(step=2, window=1), h, f, probe)
    eng.begin_window(2)
    eng(call(step=0, window=2), h, f, probe)  # step 0 again: allowed in a new window


def test_window_memory_is_per_branch_and_per_window(registry, scripted, call, grid, probe):
    seen = []

    def script(c, state, memory):
        seen.append((c.branch, c.window, sorted(memory)))
        memory[(c.branch, c.chunk, c.step)] = True
        return C()

    eng = engine(scripted(script), registry)
    eng(call("cond", step=0), grid((1, 4, 2)), f, probe)
    eng(call("uncond", step=0), grid((1, 4, 2)), f, probe)
    eng(call("cond", chunk=1, step=0), grid((1, 4, 2)), f, probe)
    eng.begin_window(1)
    eng(call("cond", step=0, window=1), grid((1, 4, 2)), f, probe)
    assert seen == [("cond", 0, []), ("uncond", 0, []), ("cond", 0, [("cond", 0, 0)]),
                    ("cond", 1, [])]


def _one_run(eng, call, grid, probe):
    out = []
    with eng.run(seed=1):
        for w in range(2):
            with eng.window(w):
                for k in range(4):
                    for b in ("cond", "uncond"):
                        for ch in range(2):
                            h = grid((1, 4, 2), seed=100 * w + 10 * k + ch)
                            out.append(eng(call(b, ch, k, window=w), h, f, probe))
    return out, eng.summary()


def test_second_run_gives_identical_records_and_outputs(registry, scripted, call, grid, probe):
    plan = {0: C(), 1: R(), 2: P([0, 3]), 3: R()}
    pol = scripted(lambda c, s, m: plan[c.step])
    eng = CacheEngine(pol, config=EngineConfig(budget_bytes=64), registry=registry)
    out1, s1 = _one_run(eng, call, grid, probe)
    out2, s2 = _one_run(eng, call, grid, probe)

    def strip(s):
        return [r.as_dict() | {"block_s": 0, "total_s": 0} for r in s.records]

    assert strip(s1) == strip(s2) and len(s1.records) == 32
    assert s1.recomputes == s2.recomputes and s1.evictions == s2.evictions
    assert s1.peak_bytes == s2.peak_bytes
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))


def test_begin_run_resets_records_counters_and_store(registry, scripted, call, grid, probe):
    pol = scripted(lambda c, s, m: R() if c.step else C())
    eng = engine(pol, registry, budget_bytes=16)
    eng(call(step=0), grid((1, 4, 2)), f, probe)          # 32 bytes: rejected
    eng(call(step=1), grid((1, 4, 2)), f, probe)          # missing residual
    assert eng.summary().recomputes and eng.summary().calls == 2
    eng.end_run()
    eng.begin_run()
    s = eng.summary()
    assert (s.calls, s.recomputes, s.evictions, s.peak_bytes, s.bytes_held) == (0, {}, 0, 0, 0)
    assert len(eng.store) == 0


# --------------------------------------------------------------------------- (g) scope
def test_window_call_with_a_chunk_policy_names_the_fix(registry, scripted, call, grid, probe):
    eng = engine(scripted(scope=Scope.CHUNK), registry)
    with pytest.raises(CacheContextError) as ei:
        eng(call(step=0, scope=Scope.WINDOW), grid((1, 4, 2)), f, probe)
    msg = str(ei.value)
    assert "'scripted'" in msg and "per chunk" in msg and "per window" in msg
    assert "mode='chunked'" in msg


def test_chunk_call_with_a_window_policy_names_the_fix(registry, scripted, call, grid, probe):
    eng = engine(scripted(scope=Scope.WINDOW), registry)
    with pytest.raises(CacheContextError, match="mode='vanilla'"):
        eng(call(step=0), grid((1, 4, 2)), f, probe)
    eng(call(step=0, scope=Scope.WINDOW), grid((1, 4, 2)), f, probe)


def test_vanilla_toy_with_a_chunk_policy_raises(registry, toy, rows, driver, scripted):
    eng = CacheEngine(scripted(scope=Scope.CHUNK), registry=registry)
    with eng.run():
        with pytest.raises(CacheContextError, match="mode='chunked'"):
            driver(toy.session(batch=1, mode="vanilla", hook=eng), {"cond": rows(2, 2, 1, "cond")},
                   engine=eng)


# -------------------------------------------------------------------- (h) PARTIAL decisions
@pytest.mark.parametrize("tokens,what", [([0, 4], "out of range"), ([-1, 2], "negative"),
                                         ([2, 1], "unsorted"), ([1, 1], "duplicate"),
                                         ([0, 1, 2, 3], "all tokens")])
def test_invalid_partial_decisions_raise(registry, scripted, call, grid, probe, tokens, what):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): P(tokens)})
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    before = eng.store.get(KEY).clone()
    with pytest.raises(DecisionError, match=r"\('cond', 0\)"):
        eng(call(step=1), grid((1, 4, 2), seed=1), never, probe)
    assert torch.equal(eng.store.get(KEY), before), what
    assert eng.summary().calls == 1


def test_invalid_partial_decision_raises_even_without_a_residual(registry, scripted, call, grid,
                                                                 probe):
    eng = engine(scripted({("cond", 0, 0): P([0, 9])}), registry)
    with pytest.raises(DecisionError):
        eng(call(step=0), grid((1, 4, 2)), f, probe)


def test_partial_computes_exactly_the_subset(registry, scripted, runner, call, grid, probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): Decision.subset([0, 3, 5], 6),
                    ("cond", 0, 2): R()})
    eng = engine(pol, registry)
    run = runner(f)
    h0, h1, h2 = (grid((2, 6, 3), seed=s) for s in range(3))
    eng(call(step=0, frames=2, tokens_per_frame=3), h0, run, probe)
    out1 = eng(call(step=1, frames=2, tokens_per_frame=3), h1, run, probe)
    assert run.calls == [None, [0, 3, 5]]
    idx = [0, 3, 5]
    rest = [1, 2, 4]
    assert torch.equal(out1[:, idx], f(h1[:, idx]))
    assert torch.equal(out1[:, rest], h1[:, rest] + (h0[:, rest] + 1))
    # the stored residual is fresh at the subset, unchanged elsewhere
    stored = eng.store.get(KEY)
    assert torch.equal(stored[:, idx], h1[:, idx] + 1)
    assert torch.equal(stored[:, rest], h0[:, rest] + 1)
    out2 = eng(call(step=2, frames=2, tokens_per_frame=3), h2, never, probe)
    assert torch.equal(out2, h2 + stored)
    rec = eng.summary().records[1]
    assert (rec.kind, rec.computed, rec.tokens) == ("partial", 3, 6)
    outcome = pol.observed[1][1]
    assert outcome.computed_tokens == 3 and outcome.num_tokens == 6
    assert torch.equal(outcome.h_out, out1)


def test_reuse_by_a_policy_without_residuals_is_an_error(registry, scripted, call, grid, probe):
    pol = scripted({("cond", 0, 1): R()}, needs_residual=False)
    eng = engine(pol, registry)
    eng(call(step=0), grid((1, 4, 2)), f, probe)
    assert len(eng.store) == 0 and eng.store.nbytes == 0  # nothing stored for it
    with pytest.raises(DecisionError, match="needs_residual=False"):
        eng(call(step=1), grid((1, 4, 2)), f, probe)


def test_evictions_under_a_budget_become_counted_recomputes(registry, scripted, runner, call,
                                                            grid, probe):
    # 32-byte residuals, budget for one: chunk 1's put evicts chunk 0, and so on
    pol = scripted(lambda c, s, m: C() if c.step == 0 else R())
    eng = engine(pol, registry, budget_bytes=40)
    run = runner(f)
    for ch in (0, 1):
        eng(call(chunk=ch, step=0), grid((1, 4, 2), seed=ch), run, probe)
    assert eng.store.keys() == [("cond", 1)] and eng.store.evictions == 1
    h = grid((1, 4, 2), seed=5)
    out0 = eng(call(chunk=0, step=1), h, run, probe)      # evicted -> recompute, evicts chunk 1
    assert torch.equal(out0, f(h))
    out1 = eng(call(chunk=1, step=1), h, run, probe)      # evicted as well -> recompute
    assert torch.equal(out1, f(h))
    s = eng.summary()
    assert s.recomputes == {"missing_residual": 2}
    assert [r.reason for r in s.records[2:]] == ["missing_residual"] * 2
    assert s.evictions == eng.store.evictions == 3
    assert s.peak_bytes <= 40 and s.decisions == {"compute": 4, "reuse": 0, "partial": 0}


def test_budget_error_propagates(registry, scripted, call, grid, probe):
    from cachekit.errors import BudgetExceededError
    eng = engine(scripted(), registry, budget_bytes=40, on_budget="error")
    eng(call(chunk=0, step=0), grid((1, 4, 2)), f, probe)
    with pytest.raises(BudgetExceededError, match="budget_bytes=40"):
        eng(call(chunk=1, step=0), grid((1, 4, 2)), f, probe)


def test_storage_dtype_reuse_is_rounded_but_returns_compute_dtype(registry, scripted, call,
                                                                  probe):
    pol = scripted({("cond", 0, 0): C(), ("cond", 0, 1): R()})
    eng = engine(pol, registry, store_dtype="bfloat16")
    h = torch.full((1, 4, 2), 1 / 3)
    eng(call(step=0), h, f, probe)
    out = eng(call(step=1), h, never, probe)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, f(h), rtol=1e-2, atol=1e-2)
    assert eng.store.nbytes == 4 * 2 * 2


# ------------------------------------------------------------- (i) `none` is bit-identical
@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_none_through_the_engine_is_bit_identical(registry, toy, rows, driver, mode):
    branches = {"cond": rows(3, 3, 1, "cond"), "uncond": rows(3, 3, 1, "uncond")}
    ref = driver(toy.session(batch=2, mode=mode), branches, batch=2)
    eng = CacheEngine.from_name("none", registry=registry)
    with eng.run():
        out = driver(toy.session(batch=2, mode=mode, hook=eng), branches, batch=2, engine=eng)
    assert len(out) == len(ref) == 2 * 5
    for i, (a, b) in enumerate(zip(ref, out)):
        assert torch.equal(a, b), f"call {i} differs"
    s = eng.summary()
    assert s.calls == (2 * 3 * 3 if mode == "chunked" else 2 * 5)
    assert s.decisions["compute"] == s.calls and s.computed_token_fraction == 1.0
    assert s.peak_bytes == 0  # `none` stores nothing


@pytest.mark.parametrize("mode", ["chunked", "vanilla"])
def test_always_compute_with_residuals_is_bit_identical(registry, toy, rows, driver, scripted,
                                                         mode):
    """Snapshotting and storing residuals must not perturb a computed output."""
    scope = Scope.CHUNK if mode == "chunked" else Scope.WINDOW
    branches = {"cond": rows(2, 3, 2, "cond"), "uncond": rows(2, 3, 2, "uncond")}
    ref = driver(toy.session(batch=1, mode=mode), branches)
    eng = CacheEngine(scripted(scope=scope), registry=registry)
    with eng.run():
        out = driver(toy.session(batch=1, mode=mode, hook=eng), branches, engine=eng)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert eng.summary().peak_bytes > 0


def test_fixed_interval_on_the_toy_skips_exactly_the_reused_block_runs(registry, toy, rows,
                                                                       driver):
    branches = {"cond": rows(2, 6, 2, "cond"), "uncond": rows(2, 6, 2, "uncond")}
    ref_sess = toy.session(batch=1)
    ref = driver(ref_sess, branches)
    eng = CacheEngine.from_name("fixed_interval", registry=registry, interval=2, warmup_steps=1)
    with eng.run():
        sess = toy.session(batch=1, hook=eng)
        out = driver(sess, branches, engine=eng)
    s = eng.summary()
    # per (branch, chunk): step 0 warm-up, 1 and 3 on the interval, 5 the last: 2 reuses
    assert s.decisions == {"compute": 16, "reuse": 8, "partial": 0}
    assert ref_sess.block_calls - sess.block_calls == 8  # a reuse runs no block
    assert any(not torch.equal(a, b) for a, b in zip(ref, out))  # something was reused
    assert all(torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------- (j) lifecycle hooks
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def on_run_start(self, engine, info):
        self.events.append(("run_start", engine, info))

    @hookimpl
    def on_window_start(self, engine, window):
        self.events.append(("window_start", engine, window))

    @hookimpl
    def on_step_end(self, call, record):  # a subset of the arguments is allowed
        self.events.append(("step_end", call, record))

    @hookimpl
    def on_window_end(self, engine, window):
        self.events.append(("window_end", engine, window))

    @hookimpl
    def on_run_end(self, engine, summary):
        self.events.append(("run_end", engine, summary))


def test_lifecycle_hooks_fire_in_order_with_arguments(scripted, call, grid, probe):
    reg = Registry(autoload=True)
    rec = Recorder()
    reg.add_plugin(rec, name="recorder")
    eng = CacheEngine(scripted(), registry=reg)
    calls = [call(step=0), call(chunk=1, step=0), call(step=0, window=1)]
    eng.begin_run(seed=7, model="toy")
    eng.begin_window(0)
    eng(calls[0], grid((1, 4, 2)), f, probe)
    eng(calls[1], grid((1, 4, 2)), f, probe)
    eng.begin_window(1)  # ends window 0 first
    eng(calls[2], grid((1, 4, 2)), f, probe)
    summary = eng.end_run()  # ends window 1 first
    names = [e[0] for e in rec.events]
    assert names == ["run_start", "window_start", "step_end", "step_end", "window_end",
                     "window_start", "step_end", "window_end", "run_end"]
    ev = rec.events
    assert ev[0][1] is eng and ev[0][2] == {"seed": 7, "model": "toy"}
    assert [e[2] for e in ev if e[0] in ("window_start", "window_end")] == [0, 0, 1, 1]
    steps = [e for e in ev if e[0] == "step_end"]
    assert [s[1] for s in steps] == calls
    assert tuple(s[2] for s in steps) == summary.records
    assert ev[-1][2] is summary and summary.calls == 3
    assert all(e[1] is eng for e in ev if e[0] != "step_end")


def test_hook_exception_propagates(scripted, call, grid, probe):
    class Broken:
        @hookimpl
        def on_step_end(self, record):
            raise RuntimeError("broken recorder")

    reg = Registry(autoload=False, plugins=[Broken()])
    eng = engine(scripted(), reg)
    with pytest.raises(RuntimeError, match="broken recorder"):
        eng(call(step=0), grid((1, 4, 2)), f, probe)


def test_no_step_hook_means_no_hook_call(scripted, call, grid, probe, registry):
    eng = engine(scripted(), registry)
    assert eng._on_step_end is None  # the hot path skips pluggy when nobody listens


# ------------------------------------------------------------------------------ (k) summary
def test_summary_fields(registry, scripted, call, grid, probe):
    plan = {0: C(), 1: P([1, 2]), 2: R(), 3: C()}
    pol = scripted(lambda c, s, m: plan[c.step])
    eng = CacheEngine(pol, registry=registry)
    eng.begin_run()
    eng.begin_window(0)
    for k in range(4):
        for b in ("cond", "uncond"):
            eng(call(b, step=k, iteration=k), grid((1, 4, 2), seed=k), f, probe)
    s = eng.end_run()
    assert isinstance(s, CacheStats) and s.policy == "scripted" and s.tag == "scripted"
    assert s.calls == 8
    assert s.decisions == {"compute": 4, "reuse": 2, "partial": 2}
    assert s.computed_tokens == 4 * 4 + 2 * 2 and s.total_tokens == 32
    assert s.computed_token_fraction == pytest.approx(20 / 32)
    ps = s.per_step()
    assert set(ps) == {(b, 0, k) for b in ("cond", "uncond") for k in range(4)}
    assert ps[("cond", 0, 1)] == {"kinds": {"partial": 1}, "fraction": 0.5}
    assert ps[("uncond", 0, 2)] == {"kinds": {"reuse": 1}, "fraction": 0.0}
    assert s.per_chunk() == {("cond", 0): 10 / 16, ("uncond", 0): 10 / 16}
    assert s.block_time_s >= 0 and s.overhead_s >= 0 and s.runtime_s > 0
    assert all(r.total_s >= r.block_s >= 0 for r in s.records)
    assert all(r.block_s == 0 for r in s.records if r.kind == "reuse")
    assert s.peak_bytes == 2 * 32 and s.bytes_held == 2 * 32 and s.evictions == 0
    assert [r.iteration for r in s.records] == [0, 0, 1, 1, 2, 2, 3, 3]
    table = s.table()
    assert "policy=scripted" in table and "4 / 2 / 2" in table and "0.625" in table
    assert "uncond chunk 0" in table
    d = json.loads(s.to_json())
    assert d["calls"] == 8 and d["decisions"] == s.decisions
    assert d["computed_token_fraction"] == s.computed_token_fraction
    assert len(d["records"]) == 8 and d["records"][1]["kind"] == "compute"
    assert d["records"][3] == s.records[3].as_dict()
    assert "records" not in json.loads(s.to_json(records=False))
    # frozen after end_run: the runtime does not keep growing
    assert eng.summary().runtime_s == s.runtime_s


def test_summary_of_a_configured_policy(registry, call, grid, probe):
    eng = CacheEngine.from_name("fixed_interval", registry=registry, interval=3)
    assert eng.policy.config.interval == 3
    with eng.run():
        with eng.window(0):
            eng(call(step=0), grid((1, 4, 2)), f, probe)
    s = eng.summary()
    assert s.policy == "fixed_interval"
    assert s.config == eng.policy.config.to_dict() and s.config["interval"] == 3
    assert s.tag == eng.policy.config.tag() and "interval3" in s.tag
    eng2 = CacheEngine.from_name("fixed_interval", registry=registry, preset="fast")
    assert eng2.policy.config.interval == 3


def test_engine_builds_its_store_from_the_config(registry, scripted):
    eng = CacheEngine(scripted(), config=EngineConfig(budget_bytes=123, store_dtype="float16"),
                      registry=registry)
    assert eng.store.budget == 123 and eng.store.storage_dtype == torch.float16
    custom = object()
    assert CacheEngine(scripted(), store=custom, registry=registry).store is custom


def test_drive_helper_matches_its_schedule(rows):
    """The hand-built rows the toy tests use are a valid DF step matrix."""
    rs = rows(3, 2, 1, "cond", prefix=1)
    assert len(rs) == (3 - 1 - 1) * 1 + 2
    assert all(isinstance(r, IterationInfo) for r in rs)
    assert rs[0].states == (ChunkState.PREFIX, ChunkState.ACTIVE, ChunkState.PENDING)
    assert rs[-1].states == (ChunkState.PREFIX, ChunkState.FINISHED, ChunkState.ACTIVE)
    assert [r.steps[1] for r in rs] == [0, 1, 2]


def test_begin_run_closes_a_window_left_open(registry):
    events = []

    class Recorder:
        @hookimpl
        def on_window_end(self, engine, window):
            events.append(("end", window))

    reg = Registry(autoload=True)
    reg.add_plugin(Recorder())
    eng = CacheEngine(reg.create_policy("none"), registry=reg)
    eng.begin_run()
    eng.begin_window(3)
    eng.begin_run()  # an interrupted run: the open window is closed, then all state dropped
    assert events == [("end", 3)]
    assert eng.summary().calls == 0
