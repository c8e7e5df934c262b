"""The engine against a reference model, over random decisions and chunk geometries.

The "model" is a tokenwise affine runner ``h -> 2h + 1``: the output of a token subset is
well defined, so the expected output of every call (compute, reuse, partial) can be written
down in a few lines here and compared with ``torch.equal``. Inputs lie on a 1/8 grid, so
storing residuals in half precision is exact as well (the rounding model is applied anyway).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.config import EngineConfig
from cachekit.engine import CacheEngine
from cachekit.plugins import Registry
from cachekit.testing import strategies as cks
from cachekit.types import ChunkCall, Decision, DecisionKind, Probe, Scope

SETTINGS = settings(max_examples=50, deadline=None)
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
PROBE = Probe()


def f(h: torch.Tensor) -> torch.Tensor:
    return 2 * h + 1


class Runner:
    def __init__(self, calls: list | None = None, nan: bool = False) -> None:
        self.calls: list = [] if calls is None else calls
        self.nan = nan

    def __call__(self, h, tokens=None):
        self.calls.append(None if tokens is None else tokens.tolist())
        return f(h) * float("nan") if self.nan else f(h)


class Playback:
    """Plays back a fixed decision per (window, branch, chunk, step)."""

    name = "playback"
    scope = Scope.CHUNK
    needs_residual = True
    config = None

    def __init__(self, script: dict) -> None:
        self.script = script

    def new_state(self, call):
        return {}

    def decide(self, call, probe, state, memory):
        return self.script[(call.window, call.branch, call.chunk, call.step)]

    def observe(self, call, probe, state, outcome, memory):
        pass


@st.composite
def scenarios(draw):
    """Windows of interleaved calls: per window, a random order of (branch, chunk) calls in
    which each key's steps increase; per call, a drawn decision and input."""
    batch = draw(st.integers(1, 2))
    hidden = draw(st.integers(1, 3))
    num_chunks = draw(st.integers(1, 3))
    geoms = [(draw(st.integers(1, 2)), draw(st.integers(1, 3))) for _ in range(num_chunks)]
    branches = draw(st.lists(st.sampled_from(["cond", "uncond", "neg"]), min_size=1,
                             max_size=2, unique=True))
    num_steps = draw(st.integers(1, 5))
    windows = []
    for w in range(draw(st.integers(1, 2))):
        slots = [(b, c) for b in branches for c in range(num_chunks)
                 for _ in range(draw(st.integers(1, num_steps)))]
        order = draw(st.permutations(slots))
        nxt: dict = {}
        calls = []
        for b, c in order:
            k = nxt.get((b, c), 0)
            nxt[(b, c)] = k + 1
            frames, tpf = geoms[c]
            n = frames * tpf
            call = ChunkCall(branch=b, chunk=c, step=k, num_steps=num_steps, window=w,
                             frames=frames, tokens_per_frame=tpf)
            d = draw(cks.decisions(n))
            h = draw(cks.residuals((batch, n, hidden), exact=True, bound=8.0))
            calls.append((call, d, h))
        windows.append(calls)
    return windows


def reference(windows, present_at_call, storage, nan_calls=frozenset()):
    """Expected outputs, effective kinds, computed tokens and override reasons, call by call.

    ``present_at_call[i]`` says whether the store held the key's residual right before call
    ``i`` (always true after a finite compute without a budget; under a budget the store may
    have dropped it, and the engine must then compute). Calls in ``nan_calls`` run blocks that
    return NaN: their residual is never kept, and the next reuse of the key recomputes,
    counted as ``nonfinite_residual``.
    """
    def rnd(x):
        return x.to(storage).to(x.dtype) if storage is not None else x

    def g(x, i):
        return f(x) * float("nan") if i in nan_calls else f(x)

    outs, kinds, computed, reasons = [], [], [], []
    i = 0
    for calls in windows:
        res: dict = {}
        dropped: dict = {}
        for call, d, h in calls:
            key = call.key
            kind = d.kind
            reason = d.reason
            if kind is not DecisionKind.COMPUTE and not present_at_call[i]:
                kind = DecisionKind.COMPUTE
                reason = dropped.pop(key, "missing_residual")
            if kind is DecisionKind.COMPUTE:
                out = g(h, i)
                if i in nan_calls:
                    res.pop(key, None)
                    dropped[key] = "nonfinite_residual"
                else:
                    res[key] = rnd(f(h) - h)
                    dropped.pop(key, None)
                computed.append(call.num_tokens)
            elif kind is DecisionKind.REUSE:
                out = h + res[key]
                computed.append(0)
            else:
                idx = d.tokens
                out = h + res[key]
                out[:, idx] = g(h[:, idx], i)
                if i in nan_calls:
                    del res[key]
                    dropped[key] = "nonfinite_residual"
                else:
                    r = res[key].clone()
                    r[:, idx] = rnd(f(h[:, idx]) - h[:, idx])
                    res[key] = r
                computed.append(int(idx.numel()))
            outs.append(out)
            kinds.append(kind.value)
            reasons.append(reason)
            i += 1
    return outs, kinds, computed, reasons


_REG = None


def registry() -> Registry:
    global _REG
    if _REG is None:
        _REG = Registry(autoload=False)
    return _REG


def run_engine(windows, cfg, nan_calls=frozenset()):
    script = {(c.window, c.branch, c.chunk, c.step): d for calls in windows for c, d, _ in calls}
    eng = CacheEngine(Playback(script), config=cfg, registry=registry())
    run = Runner()
    outs, present = [], []
    eng.begin_run()
    i = 0
    for w, calls in enumerate(windows):
        eng.begin_window(w)
        for call, _, h in calls:
            present.append(call.key in eng.store)
            outs.append(eng(call, h.clone(), Runner(run.calls, nan=i in nan_calls), PROBE))
            eng.store.check_valid()
            # a non-finite residual is never kept
            assert all(bool(torch.isfinite(eng.store.get(k)).all()) for k in eng.store.keys())
            i += 1
    summary = eng.end_run()
    return outs, present, summary, run, eng


@SETTINGS
@given(windows=scenarios(), store_dtype=cks.storage_dtypes())
def test_engine_equals_the_reference_model(windows, store_dtype):
    cfg = EngineConfig(store_dtype=store_dtype)
    outs, present, s, run, _ = run_engine(windows, cfg)
    exp, kinds, computed, _ = reference(windows, present, _TORCH.get(store_dtype))
    flat = [c for calls in windows for c in calls]
    for i, (a, b) in enumerate(zip(outs, exp)):
        assert torch.equal(a, b), f"call {i}: {flat[i][0]} {flat[i][1]}"
    # without a budget, a residual is missing only before a key's first compute in a window
    missing = sum(1 for k, (c, d, _) in zip(kinds, flat) if d.kind.value != k)
    assert s.recomputes.get("missing_residual", 0) == missing
    assert s.calls == len(flat)
    assert [r.kind for r in s.records] == kinds
    assert [r.computed for r in s.records] == computed
    assert s.computed_tokens == sum(computed)
    assert s.total_tokens == sum(c.num_tokens for c, _, _ in flat)
    # the blocks ran once per computed call, on exactly the subset of each partial one
    expected_runs = [None if k == "compute" else d.tokens.tolist()
                     for k, (c, d, _) in zip(kinds, flat) if k != "reuse"]
    assert run.calls == expected_runs
    assert s.evictions == 0


@SETTINGS
@given(windows=scenarios(), budget=st.integers(0, 400), store_dtype=cks.storage_dtypes())
def test_engine_under_a_budget_recomputes_what_was_dropped(windows, budget, store_dtype):
    cfg = EngineConfig(store_dtype=store_dtype, budget_bytes=budget, on_budget="evict")
    outs, present, s, run, eng = run_engine(windows, cfg)
    exp, kinds, computed, _ = reference(windows, present, _TORCH.get(store_dtype))
    for a, b in zip(outs, exp):
        assert torch.equal(a, b)
    flat = [c for calls in windows for c in calls]
    overridden = [i for i, (k, (c, d, _)) in enumerate(zip(kinds, flat)) if d.kind.value != k]
    assert s.recomputes.get("missing_residual", 0) == len(overridden)
    assert all(s.records[i].reason == "missing_residual" for i in overridden)
    assert s.computed_tokens == sum(computed)
    assert s.peak_bytes <= budget and s.evictions == eng.store.evictions


@SETTINGS
@given(call=cks.chunk_calls(), data=st.data())
def test_one_call_per_drawn_decision(call, data):
    """Any valid call and decision: output = compute / reuse / mix of the step-0 residual."""
    n = call.num_tokens
    d = data.draw(cks.decisions(n))
    h0 = data.draw(cks.residuals((1, n, 2), exact=True))
    h1 = data.draw(cks.residuals((1, n, 2), exact=True))
    first = ChunkCall(branch=call.branch, chunk=call.chunk, step=0, num_steps=call.num_steps + 1,
                      window=call.window, frames=call.frames,
                      tokens_per_frame=call.tokens_per_frame)
    second = ChunkCall(branch=call.branch, chunk=call.chunk, step=1,
                       num_steps=call.num_steps + 1, window=call.window, frames=call.frames,
                       tokens_per_frame=call.tokens_per_frame)
    eng = CacheEngine(Playback({(call.window, call.branch, call.chunk, 0): Decision.compute(),
                                (call.window, call.branch, call.chunk, 1): d}),
                      registry=registry())
    with eng.run():
        with eng.window(call.window):
            eng(first, h0, Runner(), PROBE)
            out = eng(second, h1, Runner(), PROBE)
    expected = h1 + (h0 + 1)
    if d.kind is DecisionKind.COMPUTE:
        expected = f(h1)
    elif d.kind is DecisionKind.PARTIAL:
        expected[:, d.tokens] = f(h1[:, d.tokens])
    assert torch.equal(out, expected)
    assert eng.summary().computed_tokens == n + d.num_computed(n)


@SETTINGS
@given(n=st.integers(1, 12), data=st.data())
def test_decisions_strategy_yields_valid_partials(n, data):
    d = data.draw(cks.decisions(n))
    if d.kind is DecisionKind.PARTIAL:
        t = d.tokens
        assert 0 < t.numel() < n and t.dtype == torch.long
        assert bool((t[1:] > t[:-1]).all()) and int(t.min()) >= 0 and int(t.max()) < n
    assert 0 <= d.num_computed(n) <= n


@settings(max_examples=1, deadline=None)
@given(data=st.data())
def test_decisions_strategy_refuses_impossible_kinds(data):
    with pytest.raises(ValueError, match="num_tokens=1"):
        data.draw(cks.decisions(1, kinds=("partial",)))


@SETTINGS
@given(windows=scenarios(), data=st.data())
def test_nonfinite_blocks_are_never_reused_and_counted_once(windows, data):
    n_calls = sum(len(c) for c in windows)
    flags = data.draw(st.lists(st.sampled_from([False, False, True]), min_size=n_calls,
                               max_size=n_calls))
    nan_calls = frozenset(i for i, bad in enumerate(flags) if bad)
    budget = data.draw(st.one_of(st.none(), st.integers(0, 400)))
    outs, present, s, _, _ = run_engine(windows, EngineConfig(budget_bytes=budget), nan_calls)
    exp, kinds, computed, reasons = reference(windows, present, None, nan_calls)
    for a, b in zip(outs, exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    flat = [c for calls in windows for c in calls]
    assert [r.kind for r in s.records] == kinds
    assert [r.reason for r in s.records] == reasons
    overridden = [r for (k, (c, d, _)), r in zip(zip(kinds, flat), reasons) if d.kind.value != k]
    expected = {}
    for r in overridden:
        expected[r] = expected.get(r, 0) + 1
    assert s.recomputes == expected  # each forced recompute counted once, with its reason


@st.composite
def grouped_iterations(draw):
    """Iterations of one window: each a random non-empty set of chunks (ascending) of one
    branch, with a drawn decision and input per chunk."""
    n_chunks = draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 3))
    num_steps = draw(st.integers(1, 5))
    step = [0] * n_chunks
    its = []
    for _ in range(draw(st.integers(1, 6))):
        chunks = [c for c in range(n_chunks) if step[c] < num_steps and draw(st.booleans())]
        if not chunks:
            continue
        items = []
        for c in chunks:
            call = ChunkCall(branch="cond", chunk=c, step=step[c], num_steps=num_steps,
                             frames=1, tokens_per_frame=n)
            step[c] += 1
            items.append((call, draw(cks.decisions(n)),
                          draw(cks.residuals((1, n, hidden), exact=True, bound=8.0))))
        its.append(items)
    return its


@SETTINGS
@given(its=grouped_iterations())
def test_run_chunks_equals_one_call_per_chunk(its):
    script = {(0, c.branch, c.chunk, c.step): d for items in its for c, d, _ in items}
    seq = CacheEngine(Playback(script), registry=registry())
    grp = CacheEngine(Playback(script), registry=registry())
    one_by_one: list = []
    grouped: list = []

    def group(parts):
        grouped.append([None if t is None else t.tolist() for _i, _h, t in parts])
        return [f(h) for _i, h, _t in parts]

    for eng in (seq, grp):
        eng.begin_run()
        eng.begin_window(0)
    for items in its:
        a = [seq(c, h.clone(), Runner(one_by_one), PROBE) for c, _d, h in items]
        b = grp.run_chunks([c for c, _d, _h in items], [h.clone() for _c, _d, h in items],
                           group, [PROBE] * len(items))
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    s1, s2 = seq.end_run(), grp.end_run()
    fields = [(r.chunk, r.step, r.kind, r.computed, r.reason) for r in s1.records]
    assert fields == [(r.chunk, r.step, r.kind, r.computed, r.reason) for r in s2.records]
    # the group runner saw exactly the block runs of the one-by-one engine, one call per
    # iteration that computed anything
    assert [t for g in grouped for t in g] == one_by_one
    assert all(g for g in grouped)
