"""The engine lifecycle as a hypothesis state machine.

Rules call begin_run / begin_window / a chunk call / end_window / end_run in any order, plus
calls that must be refused (a repeated step, a wrong scope, a wrong input shape). A small model
tracks whether a run and a window are open, which keys have state in the window and how many
calls succeeded. Invariants: a refused call raises :class:`CacheContextError` and changes
nothing; records count only successful calls; after ``begin_window`` no state, residual or
window memory is left.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cachekit.engine import CacheEngine
from cachekit.errors import CacheContextError
from cachekit.plugins import Registry
from cachekit.testing import strategies as cks
from cachekit.types import ChunkCall, Decision, Probe, Scope

BRANCHES = ("cond", "uncond")
CHUNKS = (0, 1, 2)
NUM_STEPS = 6
PROBE = Probe()
REGISTRY = Registry(autoload=False)


def tokens_per_frame(chunk: int) -> int:
    return chunk + 1  # chunks of different sizes: a residual of one never fits another


class NextDecision:
    """Decides whatever the rule put in ``next`` (and remembers it in the key's state)."""

    name = "next_decision"
    scope = Scope.CHUNK
    needs_residual = True
    config = None

    def __init__(self) -> None:
        self.next = Decision.compute()

    def new_state(self, call):
        return {"key": call.key, "window": call.window, "steps": []}

    def decide(self, call, probe, state, memory):
        assert state["key"] == call.key and state["window"] == call.window
        state["steps"].append(call.step)
        memory.setdefault("calls", []).append(call.key)
        return self.next

    def observe(self, call, probe, state, outcome, memory):
        pass


def runner(h, tokens=None):
    return 2 * h + 1


class EngineLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.policy = NextDecision()
        self.engine = CacheEngine(self.policy, registry=REGISTRY)
        self.in_run = False
        self.window: int | None = None
        self.last_window = -1
        self.next_step: dict[tuple[str, int], int] = {}  # keys with state in this window
        self.records = 0

    # -- helpers ------------------------------------------------------------------------------
    def snapshot(self):
        e = self.engine
        return (len(e.summary().records), sorted(e.store.keys()), e.store.nbytes,
                {k: (e.state(*k) or {}).get("steps", [])[:] for k in self.all_keys()},
                e._window)

    @staticmethod
    def all_keys():
        return [(b, c) for b in BRANCHES for c in CHUNKS]

    def make_call(self, branch, chunk, step, *, scope=Scope.CHUNK):
        return ChunkCall(branch=branch, chunk=chunk, step=step, num_steps=NUM_STEPS,
                         window=max(self.window or 0, 0), frames=1,
                         tokens_per_frame=tokens_per_frame(chunk), scope=scope)

    def refused(self, fn):
        before = self.snapshot()
        with pytest.raises(CacheContextError):
            fn()
        assert self.snapshot() == before, "a refused call changed the engine"

    # -- rules --------------------------------------------------------------------------------
    @initialize()
    def start(self):
        # most examples should spend their steps inside a window
        self.begin_run({})
        self.begin_window()

    def begin_run(self, info):
        self.engine.begin_run(**info)
        self.in_run, self.window, self.records = True, None, 0
        self.next_step.clear()
        self.last_window = -1

    def begin_window(self):
        if not self.in_run:
            self.refused(lambda: self.engine.begin_window(0))
            return
        self.last_window += 1
        self.engine.begin_window(self.last_window)
        self.window = self.last_window
        self.next_step.clear()
        # nothing of the previous window is left
        for b, c in self.all_keys():
            assert self.engine.state(b, c) is None
        assert len(self.engine.store) == 0 and self.engine.store.nbytes == 0
        assert len(self.engine._memory) == 0

    def end_window(self):
        self.engine.end_window()
        self.window = None

    def end_run(self):
        summary = self.engine.end_run()
        assert summary.calls == self.records
        self.in_run, self.window = False, None

    # one rule for the lifecycle, so that calls (two rules) dominate the steps
    @rule(action=st.sampled_from(["begin_run", "begin_window", "begin_window", "end_window",
                                  "end_run"]),
          info=st.dictionaries(st.sampled_from(["seed", "model"]), st.integers(0, 9)))
    def lifecycle(self, action, info):
        if action == "begin_run":
            self.begin_run(info)
        else:
            getattr(self, action)()

    @rule(branch=st.sampled_from(BRANCHES), chunk=st.sampled_from(CHUNKS), data=st.data())
    def call(self, branch, chunk, data):
        key = (branch, chunk)
        step = self.next_step.get(key, 0)
        n = tokens_per_frame(chunk)
        h = data.draw(cks.residuals((1, n, 2), exact=True))
        if self.window is None or step >= NUM_STEPS:
            if self.window is None:
                self.refused(lambda: self.engine(self.make_call(branch, chunk, min(step, 5)), h,
                                                 runner, PROBE))
            return
        self.policy.next = data.draw(cks.decisions(n))
        out = self.engine(self.make_call(branch, chunk, step), h, runner, PROBE)
        assert out.shape == h.shape
        self.next_step[key] = step + 1
        self.records += 1

    call_again = rule(branch=st.sampled_from(BRANCHES), chunk=st.sampled_from(CHUNKS),
                      data=st.data())(lambda self, branch, chunk, data:
                                      self.call(branch, chunk, data))

    @precondition(lambda self: self.window is not None and bool(self.next_step))
    @rule(data=st.data(), back=st.integers(1, 3))
    def repeated_step(self, data, back):
        key = data.draw(st.sampled_from(sorted(self.next_step)))
        step = max(self.next_step[key] - back, 0)
        h = torch.zeros(1, tokens_per_frame(key[1]), 2)
        self.refused(lambda: self.engine(self.make_call(*key, step), h, runner, PROBE))

    @precondition(lambda self: self.window is not None)
    @rule(branch=st.sampled_from(BRANCHES), chunk=st.sampled_from(CHUNKS))
    def wrong_scope_or_shape(self, branch, chunk):
        step = min(self.next_step.get((branch, chunk), 0), NUM_STEPS - 1)
        n = tokens_per_frame(chunk)
        self.refused(lambda: self.engine(
            self.make_call(branch, 0, step, scope=Scope.WINDOW), torch.zeros(1, 1, 2), runner,
            PROBE))
        self.refused(lambda: self.engine(self.make_call(branch, chunk, step),
                                         torch.zeros(1, n + 1, 2), runner, PROBE))

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def records_count_successful_calls(self):
        s = self.engine.summary()
        assert s.calls == self.records
        assert s.decisions["compute"] + s.decisions["reuse"] + s.decisions["partial"] == s.calls

    @invariant()
    def state_only_for_keys_called_in_this_window(self):
        for key in self.all_keys():
            state = self.engine.state(*key)
            if key in self.next_step:
                assert state is not None and state["steps"] == list(range(self.next_step[key]))
            else:
                assert state is None
        assert set(self.engine.store.keys()) <= set(self.next_step)
        self.engine.store.check_valid()


EngineLifecycle.TestCase.settings = settings(max_examples=50, stateful_step_count=30,
                                             deadline=None)
TestEngineLifecycle = EngineLifecycle.TestCase
