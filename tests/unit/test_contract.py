"""The policy contract suite over every registered policy, and proof that it catches bugs.

* ``test_registered_policy``: every check on every policy in ``Registry()`` (one test per
  (policy, check); checks whose hints a policy lacks are skipped with the reason).
* ``test_baseline_hints``: the hints proposed for ``none`` / ``fixed_interval`` make every
  check run and pass (skipped once the classes declare their own ``contract``).
* A correct third-party policy registered through a plugin passes everything; deliberately
  broken variants of it each fail the check that targets their bug.
* The replay harness: replays reproduce the recorded run, selections and reorderings.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs
import pytest
import torch

from cachekit.config import ConfigBase, in_range, knob
from cachekit.engine import CacheEngine
from cachekit.hookspecs import hookimpl
from cachekit.plugins import Registry
from cachekit.testing.contract import (
    CHECKS,
    ContractSkip,
    PolicyContract,
    _one_thread,
    contract_for,
    policy_contract_tests,
    run_check,
    run_policy_contract,
)
from cachekit.testing.replay import record_trajectory, replay
from cachekit.types import ChunkCall, Decision, DecisionKind, Probe, Scope

# ------------------------------------------------------------------ every registered policy
REGISTRY = Registry(autoload=True)

test_registered_policy = policy_contract_tests(REGISTRY.names("policy"), registry=REGISTRY)

#: The hints proposed for the baseline policies (to be added to their classes).
BASELINE_HINTS = {
    "none": PolicyContract(lossless={}),
    "fixed_interval": PolicyContract(lossless={"interval": 1}, speed_knob="interval",
                                     speed_values=(1, 2, 3, 4), warmup_knob="warmup_steps"),
}


@pytest.mark.parametrize("name", sorted(BASELINE_HINTS))
def test_baseline_hints(name: str) -> None:
    if contract_for(name, REGISTRY) is not None:
        pytest.skip(f"{name} declares its own PolicyContract; test_registered_policy covers it")
    report = run_policy_contract(name, REGISTRY, contract=BASELINE_HINTS[name])
    expected_skips = {"monotonic", "warmup"} if name == "none" else set()
    assert {r.check for r in report.skipped} == expected_skips, str(report)
    assert all("=None (no such setting)" in r.message for r in report.skipped)


def test_registry_has_the_built_in_policies() -> None:
    assert {"none", "fixed_interval"} <= set(REGISTRY.names("policy"))


# ------------------------------------------------------- a third-party policy and its bugs
@attrs.frozen(kw_only=True)
class PeriodicConfig(ConfigBase):
    """Settings of the test policies (a FORA-style periodic rule)."""

    tag_prefix: ClassVar[str] = "periodic"
    presets: ClassVar[dict] = {"slow": {"interval": 2}, "fast": {"interval": 3}}

    interval: int = knob(2, converter=int, validator=in_range(1),
                         doc="Compute one step in `interval`.", trade="larger = faster")
    warmup_steps: int = knob(2, converter=int, validator=in_range(0),
                             doc="Always-computed first steps.", trade="larger = slower")


@attrs.define
class PeriodicState:
    """Per-(branch, chunk) state: steps seen."""

    seen: int = 0

    def reset(self) -> None:
        self.seen = 0

    def check_valid(self) -> None:
        assert self.seen >= 0


class Periodic:
    """A correct policy: compute every `interval`-th step after the warm-up, else reuse;
    every other reuse is a token subset (the first half of the chunk)."""

    name: ClassVar[str] = "periodic"
    scope: ClassVar[Scope] = Scope.CHUNK
    needs_residual: ClassVar[bool] = True
    contract: ClassVar[PolicyContract] = PolicyContract(
        lossless={"interval": 1}, speed_knob="interval", speed_values=(1, 2, 3),
        warmup_knob="warmup_steps", per_call_monotonic=False)

    def __init__(self, config: PeriodicConfig | None = None, registry: Any = None) -> None:
        self.config = config or PeriodicConfig()

    def new_state(self, call: ChunkCall) -> PeriodicState:
        return PeriodicState()

    def in_warmup(self, call: ChunkCall) -> bool:
        return call.step < self.config.warmup_steps

    def decide(self, call: ChunkCall, probe: Probe, state: PeriodicState, memory) -> Decision:
        c = self.config
        state.seen += 1
        if self.in_warmup(call) or (call.step - c.warmup_steps) % c.interval == 0:
            return Decision.compute("periodic")
        if call.step % 2:
            return self.subset(call)
        return Decision.reuse("periodic")

    def subset(self, call: ChunkCall) -> Decision:
        return Decision.subset(torch.arange(call.num_tokens // 2), call.num_tokens, "half")

    def observe(self, call, probe, state, outcome, memory) -> None:
        return None


class LeakySelf(Periodic):
    """BUG: a counter on `self` shared by all chunks, branches, windows and runs."""

    name: ClassVar[str] = "leaky_self"

    def __init__(self, config=None, registry=None) -> None:
        super().__init__(config, registry)
        self.calls = 0

    def decide(self, call, probe, state, memory) -> Decision:
        self.calls += 1
        d = super().decide(call, probe, state, memory)
        if d.kind is not DecisionKind.COMPUTE and self.calls % 2:
            return Decision.compute("leaky")
        return d


class EagerWarmup(Periodic):
    """BUG: off-by-one warm-up, reuses at step warmup_steps - 1."""

    name: ClassVar[str] = "eager_warmup"

    def in_warmup(self, call: ChunkCall) -> bool:
        return call.step < self.config.warmup_steps - 1


class StrayTokens(Periodic):
    """BUG: the token subset runs past the end of the chunk."""

    name: ClassVar[str] = "stray_tokens"

    def subset(self, call: ChunkCall) -> Decision:
        n = call.num_tokens
        return Decision(DecisionKind.PARTIAL, torch.arange(n // 2, n + 2), "stray")


class UnsortedTokens(Periodic):
    """BUG: the token subset is in descending order."""

    name: ClassVar[str] = "unsorted_tokens"

    def subset(self, call: ChunkCall) -> Decision:
        return Decision(DecisionKind.PARTIAL, torch.arange(call.num_tokens // 2).flip(0), "desc")


class LossyLossless(Periodic):
    """BUG: always reuses the last step, even at interval=1 (the lossless setting)."""

    name: ClassVar[str] = "lossy_lossless"

    def decide(self, call, probe, state, memory) -> Decision:
        if call.step == call.num_steps - 1:
            return Decision.reuse("last")
        return super().decide(call, probe, state, memory)


class InplaceObserver(Periodic):
    """BUG: never reuses at interval=1, but scales the block output in place while
    observing it: every decision is COMPUTE and yet the video changes."""

    name: ClassVar[str] = "inplace_observer"

    def observe(self, call, probe, state, outcome, memory) -> None:
        outcome.h_out.mul_(1.0 + 1e-3)


class SharedState(Periodic):
    """BUG: one state object for every (branch, chunk) key."""

    name: ClassVar[str] = "shared_state"

    def __init__(self, config=None, registry=None) -> None:
        super().__init__(config, registry)
        self.state = PeriodicState()

    def new_state(self, call):
        return self.state


class InvertedKnob(Periodic):
    """BUG: the speed knob works backwards (larger interval = more computes)."""

    name: ClassVar[str] = "inverted_knob"
    contract: ClassVar[PolicyContract] = attrs.evolve(Periodic.contract, lossless=None)

    def decide(self, call, probe, state, memory) -> Decision:
        c = self.config
        if self.in_warmup(call) or (call.step - c.warmup_steps) % c.interval != 0:
            return Decision.compute("inverted")
        return Decision.reuse("inverted")


class MemoryPeek(Periodic):
    """BUG: decides from a branch-wide call counter in the window memory, so a chunk's
    decisions depend on how many calls later chunks made."""

    name: ClassVar[str] = "memory_peek"

    def decide(self, call, probe, state, memory) -> Decision:
        memory["calls"] = memory.get("calls", 0) + 1
        d = super().decide(call, probe, state, memory)
        if d.kind is not DecisionKind.COMPUTE and memory["calls"] % 3 == 0:
            return Decision.compute("peek")
        return d


class NoHints(Periodic):
    """Correct, but declares no contract hints."""

    name: ClassVar[str] = "no_hints"
    contract = None  # type: ignore[assignment]


POLICIES = [Periodic, LeakySelf, EagerWarmup, StrayTokens, UnsortedTokens, LossyLossless,
            InplaceObserver, SharedState, InvertedKnob, MemoryPeek, NoHints]


class TestPlugin:
    """A third-party plugin registering the policies above."""

    __test__ = False

    @hookimpl
    def register_policies(self, register):
        for cls in POLICIES:
            register(cls.name, cls, config=PeriodicConfig, description=cls.__doc__ or "")


@pytest.fixture(scope="module")
def plugin_registry() -> Registry:
    return Registry(autoload=False, plugins=[TestPlugin()])


def test_correct_third_party_policy_passes(plugin_registry: Registry) -> None:
    report = run_policy_contract("periodic", plugin_registry)
    assert report.ok and not report.skipped, str(report)
    notes = " ".join(n for r in report.results for n in r.notes)
    assert "returned no token subsets" not in notes  # the subset checks had work to do


# (policy, the check that must fail, words its message must contain)
BROKEN = [
    ("leaky_self", "isolation", "in the reference run"),
    ("eager_warmup", "warmup", "steps < warmup_steps must always COMPUTE"),
    ("stray_tokens", "token_subsets", "leaves the chunk"),
    ("unsorted_tokens", "token_subsets", "sorted and duplicate-free"),
    ("lossy_lossless", "lossless", "at the lossless settings"),
    ("inplace_observer", "lossless", "bit-identical"),
    ("shared_state", "state", "same object"),
    ("inverted_knob", "monotonic", "must never compute more"),
    ("memory_peek", "isolation", "without the chunks after it"),
]


@pytest.mark.parametrize(("name", "check", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_policy_fails_its_check(plugin_registry: Registry, name: str, check: str,
                                       words: str) -> None:
    report = run_policy_contract(name, plugin_registry, raise_on_failure=False)
    failed = {r.check: r.message for r in report.failed}
    assert check in failed, str(report)
    assert re.search(words, failed[check]), failed[check]


def test_a_failing_contract_raises_with_the_report(plugin_registry: Registry) -> None:
    with pytest.raises(AssertionError, match=r"(?s)stray_tokens.*FAILED  token_subsets"):
        run_policy_contract("stray_tokens", plugin_registry, checks=["presets", "token_subsets"])
    with pytest.raises(AssertionError, match="leaves the chunk"):
        run_check("token_subsets", "stray_tokens", registry=plugin_registry)


def test_no_hints_skips_with_reason_never_passes(plugin_registry: Registry) -> None:
    report = run_policy_contract("no_hints", plugin_registry)
    skipped = {r.check: r.message for r in report.skipped}
    assert set(skipped) == {"lossless", "monotonic", "warmup"}
    assert all("declares no PolicyContract, so" in m for m in skipped.values())
    with pytest.raises(ContractSkip, match="lossless"):
        run_check("lossless", "no_hints", registry=plugin_registry)
    # explicit hints enable the checks
    report = run_policy_contract("no_hints", plugin_registry, contract=Periodic.contract)
    assert not report.skipped


def test_bad_hints_are_reported(plugin_registry: Registry) -> None:
    with pytest.raises(AssertionError, match="not a setting of PeriodicConfig"):
        run_check("protocol", "periodic", registry=plugin_registry,
                  contract=PolicyContract(speed_knob="threshold", speed_values=(0.1, 0.2)))
    with pytest.raises(AssertionError, match="mode='vanilla' but the policy's scope"):
        run_check("protocol", "periodic", registry=plugin_registry,
                  contract=PolicyContract(mode="vanilla"))
    with pytest.raises(ValueError, match="strictly increasing"):
        PolicyContract(speed_knob="interval", speed_values=(3, 2))


def test_checks_are_listed_in_order() -> None:
    assert list(CHECKS)[:2] == ["protocol", "presets"]
    with pytest.raises(ValueError, match="unknown contract check"):
        run_check("nope", "none", registry=REGISTRY)


# --------------------------------------------------------------------------- replay harness
@pytest.fixture(scope="module")
def trajectory():
    with _one_thread():  # tiny tensors: one thread is far faster on a busy machine
        yield record_trajectory(mode="chunked")


def test_recorded_trajectory_matches_the_uncached_run(trajectory) -> None:
    from cachekit.sampling import generate
    from cachekit.testing import ToyModel
    from cachekit.testing.replay import default_sampler_config

    m = ToyModel(seed=0)
    res = generate(m, m.encode_condition(torch.tensor([3])), uncond=m.null_condition(1),
                   config=default_sampler_config("chunked"))
    assert torch.equal(res.video, trajectory.video)
    assert trajectory.windows == (0, 1) and trajectory.branches == ("cond", "uncond")
    assert len({rc.key for rc in trajectory}) == len(trajectory)


def test_replay_of_none_reproduces_the_recorded_outputs(trajectory) -> None:
    result = replay(CacheEngine.from_name("none", registry=REGISTRY), trajectory)
    assert result.stats.calls == len(trajectory)
    for rc, out in zip(trajectory, result.outputs):
        assert torch.equal(out, rc.h_out)


def test_replay_answers_token_subsets_from_the_recording(trajectory,
                                                         plugin_registry: Registry) -> None:
    engine = CacheEngine(plugin_registry.create_policy("periodic"), registry=plugin_registry)
    result = replay(engine, trajectory)
    partial = [(rc, out, runs) for rc, out, runs in zip(result.calls, result.outputs,
                                                        result.runs)
               if runs and runs[0] is not None]
    assert partial
    rc, out, (idx,) = partial[0]
    assert torch.equal(out[:, idx], rc.h_out[:, idx])


def test_selection_and_reordering(trajectory) -> None:
    alone = trajectory.select(lambda c: c.key == ("uncond", 1) and c.window == 0)
    assert [rc.call.step for rc in alone] == list(range(8))
    assert {(rc.call.window, rc.call.key) for rc in alone} == {(0, ("uncond", 1))}
    rev = trajectory.branches_reversed()
    assert sorted(rc.index for rc in rev) == list(range(len(trajectory)))
    assert rev.calls[0].call.branch == "uncond"
    # inside a branch the chunk order is kept
    first_iter = [rc.call for rc in rev if (rc.call.window, rc.call.iteration) == (0, 3)]
    assert [(c.branch, c.chunk) for c in first_iter] == \
        [("uncond", g) for g in range(4)] + [("cond", g) for g in range(4)]


def test_replay_catches_in_place_writes_to_the_probe(trajectory, scripted) -> None:
    def script(call, state, memory):
        return Decision.compute()

    policy = scripted(script, needs_residual=False)
    original = policy.decide

    def decide(call, probe, state, memory):
        probe.latent.zero_()
        return original(call, probe, state, memory)

    policy.decide = decide
    with pytest.raises(AssertionError, match="probe.latent was modified in place"):
        replay(CacheEngine(policy, registry=REGISTRY), trajectory)
