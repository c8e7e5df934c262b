"""The policy contract suite: the checks every registered policy must pass, built-in or not.

Use it from your own pytest file (10 lines; ``pytest -rs`` lists skipped checks and why)::

    # tests/test_contract.py of your plugin
    from cachekit.plugins import Registry
    from cachekit.testing.contract import policy_contract_tests, run_policy_contract

    # one test per (policy, check), e.g. test_policy_contract[my_policy-lossless]; the policy
    # comes from your installed entry point (or pass registry=lambda: Registry(plugins=[...]))
    test_policy_contract = policy_contract_tests(["my_policy"], registry=Registry)

    def test_all_at_once():  # or: every check, one readable report on failure
        run_policy_contract("my_policy")

Hints. Checks that need to know a policy's knobs read ``contract`` on the policy class::

    class MyPolicy:
        contract: ClassVar[PolicyContract] = PolicyContract(
            lossless={"threshold": 0.0}, speed_knob="threshold",
            speed_values=(0.0, 0.05, 0.1, 0.3), warmup_knob="warmup_steps")

Without hints those checks are *skipped with a reason*, never passed. Every check is a plain
function ``check_x(name, *, registry=None, contract=None)`` raising :class:`AssertionError` with
a message that names the policy, the setting and the (window, branch, chunk, step) involved;
:class:`ContractSkip` when it cannot apply. :data:`CHECKS` lists them in order:

``protocol``     the policy object has ``name`` (= registered name), ``scope``,
                 ``needs_residual``, ``config``, ``new_state/decide/observe``; hints are valid.
``presets``      presets ``slow`` and ``fast`` exist, build, validate, round-trip through
                 dict/TOML/JSON, and have distinct filename-safe tags.
``preset_order`` on the fixed replayed trajectory, ``fast`` computes no more tokens than ``slow``.
``lossless``     at the ``lossless`` settings every decision computes every token and the video
                 is bit-identical to the uncached one (= the ``none`` policy) through
                 :func:`cachekit.sampling.generate`: 2 branches, 2 windows, ``ar_step=1``.
``monotonic``    on the fixed replayed trajectory, larger ``speed_knob`` values never compute
                 more tokens in total (per call too with ``per_call_monotonic=True``).
``warmup``       steps ``< warmup`` always decide COMPUTE (the policy's own decision, before
                 any engine override), for several warm-up lengths at the fastest speed.
``isolation``    the decisions of each (window, branch, chunk) are the same when replayed
                 alone (fresh engine, same policy object), with branches in reverse order,
                 and in a second run of the same engine (state kept on ``self`` fails here).
``token_subsets`` PARTIAL token subsets are 1-D int64, sorted, unique, ``0 < K < N``, inside the
                 chunk: checked on the decision, in a wrapped block runner and in the records.
``one_decision`` exactly one decision and one record per (window, branch, chunk, step).
``stats``        ``engine.summary()`` agrees with the decisions: calls, kinds, computed tokens,
                 fraction, forced recomputes, JSON export.
``state``        ``new_state`` objects are None or have ``reset()``/``check_valid()``, are never
                 shared between keys or windows, ``check_valid()`` holds after every call, and
                 ``reset()`` leaves a valid state.

Scenario and modes: :class:`~cachekit.testing.ToyModel` ``(seed=0)``, 12 frames in 2 overlapping
windows, chunks of 2 frames, 8 steps, ``ar_step=1``, ``cond`` + ``uncond``
(:func:`cachekit.testing.replay.default_sampler_config`; ``PolicyContract.sampler`` overrides
it). A ``Scope.CHUNK`` policy runs in chunked mode, ``Scope.WINDOW`` in vanilla mode, a
scope-agnostic one (``scope = None``) in both unless ``PolicyContract.mode`` picks one. The
monotonic, warm-up and isolation checks replay one recorded uncached trajectory
(:mod:`cachekit.testing.replay`), so every setting sees the same inputs. Every engine run
wraps the policy in a :class:`DecisionSpy`, so a bad decision or state fails any check that
meets it. A policy that writes window memory (to compare neighbouring chunks) is isolated per
(window, branch) instead of per chunk. Runs use one CPU thread: bit-exact and about a second
per policy.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import tempfile
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs
import torch

from ..config import ConfigBase
from ..engine import CacheEngine
from ..errors import CacheKitError
from ..plugins import Registry, get_registry
from ..protocols import Policy, PolicyWrapper
from ..stats import RECOMPUTE_REASONS, CacheStats
from ..types import ChunkCall, Decision, DecisionKind, Scope, tensor_repr
from .replay import Trajectory, record_trajectory, replay

__all__ = [
    "PolicyContract",
    "ContractSkip",
    "CheckResult",
    "ContractReport",
    "DecisionSpy",
    "CHECKS",
    "contract_for",
    "run_policy_contract",
    "run_check",
    "policy_contract_tests",
    "check_protocol",
    "check_presets",
    "check_preset_order",
    "check_lossless",
    "check_monotonic",
    "check_warmup",
    "check_isolation",
    "check_token_subsets",
    "check_one_decision",
    "check_stats",
    "check_state",
]

_MODES = ("chunked", "vanilla")
_MODE_OF_SCOPE = {Scope.CHUNK: "chunked", Scope.WINDOW: "vanilla"}
_TAG_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
#: Warm-up lengths the warm-up check tries (plus the knob's default), within the step count.
_WARMUP_TRIES = (1, 2, 3)


Notes = list


from ..protocols import PolicyContract  # noqa: E402  (defined in the core; re-exported)


class ContractSkip(Exception):
    """A check does not apply to this policy (the message says why and how to enable it)."""


# --------------------------------------------------------------------------------------------
# Decision spy
# --------------------------------------------------------------------------------------------
def _where(policy_name: str, call: ChunkCall) -> str:
    return (f"policy {policy_name!r} at (window={call.window}, branch={call.branch!r}, "
            f"chunk={call.chunk}, step={call.step})")


def _assert_subset(tokens: Any, n: int, where: str) -> None:
    assert isinstance(tokens, torch.Tensor) and tokens.dim() == 1 and \
        tokens.dtype == torch.long, (
            f"{where}: a PARTIAL token subset must be a 1-D int64 tensor, got "
            f"{tensor_repr(tokens)}. Build it with Decision.subset(idx, call.num_tokens).")
    k = int(tokens.numel())
    assert 0 < k < n, (f"{where}: a PARTIAL subset needs 0 < K < N={n} tokens, got K={k}. "
                       f"Decision.subset() collapses K=0 to REUSE and K=N to COMPUTE.")
    lo, hi = int(tokens.min()), int(tokens.max())
    assert lo >= 0 and hi < n, (
        f"{where}: token subset leaves the chunk: indices {lo}..{hi}, the call has N={n} tokens "
        f"(frames x tokens_per_frame, indices 0..{n - 1})")
    assert k == 1 or bool((tokens[1:] > tokens[:-1]).all()), (
        f"{where}: token subset must be sorted and duplicate-free, got {tokens.tolist()[:16]}"
        f"{'...' if k > 16 else ''}. Use torch.unique(idx) (sorted) before Decision.subset().")


def _decision_sig(d: Decision) -> tuple:
    """A comparable summary of a decision: kind and token subset."""
    return (d.kind.value, None if d.tokens is None else tuple(d.tokens.tolist()))


class DecisionSpy(PolicyWrapper):
    """Wraps a policy for the engine: validates every decision and state, records them.

    Runs exactly as the wrapped policy (:class:`cachekit.protocols.PolicyWrapper`; the
    policy is ``spy.policy``). Records ``decisions``
    (``(call, decision)`` as the policy returned it, before any engine override), asserts token
    subsets lie inside the chunk, that ``new_state`` returns None or a fresh object with
    ``reset()``/``check_valid()``, and calls ``check_valid()`` after ``new_state``, ``decide``
    and ``observe``. ``memory_used`` tells whether the policy wrote to the window memory.
    """

    def __init__(self, policy: Any) -> None:
        super().__init__(policy)
        self.policy = policy
        self.clear()

    def clear(self) -> None:
        """Forget what was recorded (the wrapped policy is untouched)."""
        self.decisions: list[tuple[ChunkCall, Decision]] = []
        self.states: list[tuple[ChunkCall, Any]] = []   # every non-None state issued, kept alive
        self.memory_used = False
        self.observed = 0

    def log(self) -> dict[tuple, tuple]:
        """``{(window, branch, chunk, step): (kind, tokens)}`` of the recorded decisions."""
        return {(c.window, c.branch, c.chunk, c.step): _decision_sig(d)
                for c, d in self.decisions}

    def _valid(self, state: Any, call: ChunkCall, when: str) -> None:
        if state is None:
            return
        try:
            state.check_valid()
        except Exception as exc:  # any failure of check_valid is a violation
            raise AssertionError(
                f"{_where(self.name, call)}: state.check_valid() failed {when}: "
                f"{type(exc).__name__}: {exc}") from exc

    def new_state(self, call: ChunkCall) -> Any:
        state = self.inner.new_state(call)
        if state is not None:
            where = _where(self.name, call)
            missing = [m for m in ("reset", "check_valid")
                       if not callable(getattr(state, m, None))]
            assert not missing, (
                f"{where}: new_state() returned a {type(state).__name__} without "
                f"{' and '.join(m + '()' for m in missing)}. State classes need reset() and "
                f"check_valid() (house rule 2), or return None for a stateless policy.")
            for prev_call, prev in self.states:
                assert prev is not state, (
                    f"{where}: new_state() returned the same object it returned for "
                    f"(window={prev_call.window}, branch={prev_call.branch!r}, "
                    f"chunk={prev_call.chunk}): state is shared across (branch, chunk) keys or "
                    f"windows. Return a fresh object on every call.")
            self.states.append((call, state))
            self._valid(state, call, "right after new_state()")
        return state

    def decide(self, call: ChunkCall, probe: Any, state: Any, memory: dict) -> Decision:
        d = self.inner.decide(call, probe, state, memory)
        where = _where(self.name, call)
        assert isinstance(d, Decision), (
            f"{where}: decide() returned {d!r}; expected a cachekit.types.Decision "
            f"(Decision.compute(), Decision.reuse() or Decision.subset(idx, n))")
        if d.kind is DecisionKind.PARTIAL:
            _assert_subset(d.tokens, call.num_tokens, where)
        self.decisions.append((call, d))
        self._valid(state, call, "after decide()")
        if memory:
            self.memory_used = True
        return d

    def observe(self, call: ChunkCall, probe: Any, state: Any, outcome: Any, memory: dict) -> None:
        self.inner.observe(call, probe, state, outcome, memory)
        self.observed += 1
        self._valid(state, call, "after observe()")
        if memory:
            self.memory_used = True


class _CheckingHook:
    """Sits between the model and the engine in :func:`generate`: counts calls and wraps the
    model's block runner to check every token subset it is asked to run."""

    def __init__(self, engine: CacheEngine, policy_name: str) -> None:
        self.engine = engine
        self.policy_name = policy_name
        self.calls: list[ChunkCall] = []
        self.subsets = 0

    def begin_run(self, **info: Any) -> None:
        self.engine.begin_run(**info)

    def begin_window(self, window: int) -> None:
        self.engine.begin_window(window)

    def end_window(self) -> None:
        self.engine.end_window()

    def end_run(self) -> CacheStats:
        return self.engine.end_run()

    def __call__(self, call, h_in, run, probe):
        self.calls.append(call)
        where = _where(self.policy_name, call) + " (block runner)"

        def checked(h, tokens=None):
            if tokens is None:
                assert h.shape == h_in.shape, (
                    f"{where}: run(h) with h {tuple(h.shape)}, expected {tuple(h_in.shape)}")
                return run(h)
            _assert_subset(tokens, call.num_tokens, where)
            assert h.shape[1] == tokens.numel(), (
                f"{where}: run(h_sub, tokens) with {h.shape[1]} rows for {tokens.numel()} tokens")
            self.subsets += 1
            return run(h, tokens)

        return self.engine(call, h_in, checked, probe)


# --------------------------------------------------------------------------------------------
# Context: the policy under test and the scenario
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_thread():
    # Tiny tensors: intra-op threads only add contention (30x slower on a busy 2-core box),
    # and one thread makes repeated runs bit-identical.
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


@functools.lru_cache(maxsize=8)
def _scenario(mode: str, sampler_items: tuple) -> tuple[Any, Any, Any, Any, Trajectory]:
    """(model, cond, uncond, sampler config, uncached trajectory) of the contract scenario."""
    from .replay import default_sampler_config
    from .toy import ToyModel

    model = ToyModel(seed=0)
    cond = model.encode_condition(torch.tensor([3]))
    uncond = model.null_condition(1)
    cfg = default_sampler_config(mode)
    if sampler_items:
        cfg = cfg.evolve(**dict(sampler_items))
    traj = record_trajectory(model, config=cfg, cond=cond, uncond=uncond, seed=0)
    return model, cond, uncond, cfg, traj


@attrs.define
class _Ctx:
    name: str
    registry: Registry
    contract: Optional[PolicyContract]
    config_cls: Any
    scope: Optional[Scope]
    modes: tuple[str, ...]
    mode: str = "chunked"     # the mode of the current pass of a per-mode check

    @property
    def hints(self) -> PolicyContract:
        return self.contract or PolicyContract()

    def scenario(self):
        items = tuple(sorted((self.hints.sampler or {}).items()))
        return _scenario(self.mode, items)

    @property
    def trajectory(self) -> Trajectory:
        return self.scenario()[4]

    def config(self, preset: Optional[str] = None, **overrides: Any) -> Any:
        try:
            base = self.config_cls.from_preset(preset) if preset else self.config_cls()
            return base.evolve(**overrides) if overrides else base
        except (CacheKitError, TypeError, ValueError) as exc:
            raise AssertionError(
                f"policy {self.name!r}: could not build its config "
                f"(preset={preset!r}, overrides={overrides}): {exc}") from exc

    def policy(self, config: Any = None) -> Any:
        return self.registry.create_policy(self.name, config)

    def fastest(self) -> Any:
        """The ``fast`` preset (or defaults) with the ``stress`` overrides, at the largest
        speed value if hinted."""
        preset = "fast" if "fast" in getattr(self.config_cls, "presets", {}) else None
        h = self.hints
        over = dict(h.stress or {})
        if h.speed_knob:
            over[h.speed_knob] = h.speed_values[-1]
        return self.config(preset, **over)

    def replay(self, policy: Any, traj: Optional[Trajectory] = None, engine: Any = None):
        """Replay ``traj`` (default: the scenario) with ``policy`` (spied); returns
        (result, spy, engine)."""
        spy = policy if isinstance(policy, DecisionSpy) else DecisionSpy(policy)
        if engine is None:
            engine = CacheEngine(spy, registry=self.registry)
        else:
            engine.policy = spy
        try:
            result = replay(engine, self.trajectory if traj is None else traj)
        except CacheKitError as exc:
            raise AssertionError(f"policy {self.name!r}: the engine rejected a decision in a "
                                 f"replay: {type(exc).__name__}: {exc}") from exc
        return result, spy, engine

    def generate(self, policy: Any):
        """Sample the scenario with ``policy`` (spied) through the engine and a checking hook;
        returns (result, spy, hook)."""
        from ..sampling import generate

        model, cond, uncond, cfg, _ = self.scenario()
        spy = DecisionSpy(policy)
        hook = _CheckingHook(CacheEngine(spy, registry=self.registry), self.name)
        try:
            result = generate(model, cond, uncond=uncond, config=cfg, engine=hook, seed=0)
        except CacheKitError as exc:
            raise AssertionError(f"policy {self.name!r}: generation through the engine failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return result, spy, hook


# Runs of (policy, config, mode) shared by the checks that only read them (token_subsets,
# one_decision, stats, state): a generation is the expensive part of the suite. One bounded
# LRU for the process, only for hashable configs. A stored run holds its engine and so its
# registry, so the registry's id in the key cannot be reused while the entry lives.
_RUNS: OrderedDict = OrderedDict()
_RUNS_MAX = 32


def _observed(ctx: _Ctx, cfg: Any, kind: str) -> tuple:
    """``kind='generate'``: (result, spy, hook, policy); ``'replay'``: (result, spy, policy)."""
    try:
        key: Optional[tuple] = (id(ctx.registry), ctx.name, ctx.contract, ctx.mode, cfg, kind)
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _RUNS:
        _RUNS.move_to_end(key)
        return _RUNS[key][1]
    policy = ctx.policy(cfg)
    if kind == "generate":
        out = (*ctx.generate(policy), policy)
    else:
        result, spy, _ = ctx.replay(policy)
        out = (result, spy, policy)
    if key is not None:
        _RUNS[key] = (ctx.registry, out)   # the registry pins its id (see above)
        while len(_RUNS) > _RUNS_MAX:
            _RUNS.popitem(last=False)
    return out


def contract_for(name: str, registry: Registry | None = None) -> Optional[PolicyContract]:
    """The :class:`PolicyContract` declared by the policy registered as ``name`` (on its
    factory, or on the class of the object the factory builds), or None."""
    registry = registry if registry is not None else get_registry()
    reg = registry.get("policy", name)
    hint = getattr(reg.factory, "contract", None)
    if hint is None:
        hint = getattr(registry.create_policy(name), "contract", None)
    if hint is not None and not isinstance(hint, PolicyContract):
        raise AssertionError(f"policy {name!r}: `contract` must be a "
                             f"cachekit.testing.contract.PolicyContract, got {hint!r}")
    return hint


def _context(name: str, registry: Registry | None,
             contract: Optional[PolicyContract]) -> _Ctx:
    registry = registry if registry is not None else get_registry()
    reg = registry.get("policy", name)
    if contract is None:
        contract = contract_for(name, registry)
    policy = registry.create_policy(name)
    scope = getattr(policy, "scope", None)
    assert scope is None or isinstance(scope, Scope), (
        f"policy {name!r}: `scope` must be a cachekit.types.Scope (CHUNK or WINDOW) or None "
        f"(either), got {scope!r}")
    hinted = contract.mode if contract is not None else None
    if scope is None:
        # Scope-agnostic: run in both modes unless the hint picks one.
        modes = (hinted,) if hinted else _MODES
    else:
        modes = (_MODE_OF_SCOPE[scope],)
        if hinted is not None and hinted != modes[0]:
            raise AssertionError(
                f"policy {name!r}: PolicyContract.mode={hinted!r} but the policy's scope is "
                f"{scope} (runs in mode {modes[0]!r}). Fix the hint or the scope.")
    return _Ctx(name, registry, contract, reg.config, scope, tuple(modes), modes[0])


def _check(*, per_mode: bool) -> Callable[[Callable[[_Ctx], Notes]], Callable[..., Notes]]:
    """Turn ``fn(ctx) -> notes`` into the public ``check(name, *, registry, contract)``;
    per-mode checks run once per execution mode the policy supports."""
    def deco(fn: Callable[[_Ctx], Notes]) -> Callable[..., Notes]:
        @functools.wraps(fn)
        def check(name: str, *, registry: Registry | None = None,
                  contract: Optional[PolicyContract] = None) -> Notes:
            with _one_thread():
                ctx = _context(name, registry, contract)
                if not per_mode:
                    return list(fn(ctx) or [])
                notes: Notes = []
                for mode in ctx.modes:
                    try:
                        out = fn(attrs.evolve(ctx, mode=mode))
                    except AssertionError as exc:
                        raise AssertionError(f"[mode={mode}] {exc}") from exc
                    notes.extend(f"[{mode}] {n}" for n in (out or []))
                return notes
        return check
    return deco


def _need(ctx: _Ctx, field: str, what: str) -> Any:
    value = getattr(ctx.hints, field)
    if value is None:
        if ctx.contract is None:
            raise ContractSkip(
                f"policy {ctx.name!r} declares no PolicyContract, so {what} cannot be checked. "
                f"Add `contract: ClassVar[PolicyContract] = PolicyContract({field}=...)` to the "
                f"policy class (see cachekit.testing.contract).")
        raise ContractSkip(f"policy {ctx.name!r} has PolicyContract.{field}=None (no such "
                           f"setting), so {what} does not apply")
    return value


def _records_key(r) -> tuple:
    return (r.window, r.branch, r.chunk, r.step)


def _strip_timing(records) -> list[tuple]:
    return [(r.window, r.iteration, r.branch, r.chunk, r.step, r.kind, r.computed, r.tokens,
             r.reason) for r in records]


def _computed_by_call(spy: DecisionSpy) -> dict[tuple, int]:
    return {(c.window, c.branch, c.chunk, c.step): d.num_computed(c.num_tokens)
            for c, d in spy.decisions}


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
@_check(per_mode=False)
def check_protocol(ctx: "_Ctx") -> Notes:
    """The policy object and its hints have the shape the engine and this suite rely on."""
    name = ctx.name
    cls = ctx.config_cls
    assert isinstance(cls, type) and issubclass(cls, ConfigBase) and attrs.has(cls), (
        f"policy {name!r}: its registered config {cls!r} must be an attrs class deriving from "
        f"cachekit.config.ConfigBase")
    policy = ctx.policy()
    assert getattr(policy, "name", None) == name, (
        f"policy registered as {name!r} has name={getattr(policy, 'name', None)!r}; the engine "
        f"reports stats under policy.name, so they must match")
    assert isinstance(getattr(policy, "needs_residual", None), bool), (
        f"policy {name!r}: needs_residual must be a bool, got "
        f"{getattr(policy, 'needs_residual', None)!r}")
    for m in ("new_state", "decide", "observe"):
        assert callable(getattr(policy, m, None)), f"policy {name!r}: missing method {m}()"
    assert isinstance(policy, Policy), f"policy {name!r} does not satisfy cachekit.protocols.Policy"
    assert isinstance(getattr(policy, "config", None), cls), (
        f"policy {name!r}: policy.config must be the {cls.__name__} it was built with, got "
        f"{type(getattr(policy, 'config', None)).__name__}")
    notes: Notes = []
    h = ctx.contract
    if h is None:
        notes.append(f"policy {name!r} declares no PolicyContract: the lossless, monotonic and "
                     f"warmup checks are skipped")
        return notes
    fields = ctx.config_cls.field_names()
    for label, knob in (("speed_knob", h.speed_knob), ("warmup_knob", h.warmup_knob)):
        assert knob is None or knob in fields, (
            f"policy {name!r}: PolicyContract.{label}={knob!r} is not a setting of "
            f"{cls.__name__}; settings are {fields}")
    if h.lossless is not None:
        unknown = sorted(set(h.lossless) - set(fields))
        assert not unknown, (f"policy {name!r}: PolicyContract.lossless names unknown settings "
                             f"{unknown}; settings are {fields}")
        ctx.config(**h.lossless)
    for v in h.speed_values:
        ctx.config(**{str(h.speed_knob): v})
    return notes


@_check(per_mode=False)
def check_presets(ctx: "_Ctx") -> Notes:
    """Presets ``slow`` and ``fast`` exist, build, validate, round-trip, have distinct tags."""
    name = ctx.name
    cls = ctx.config_cls
    presets = getattr(cls, "presets", {}) or {}
    missing = [p for p in ("slow", "fast") if p not in presets]
    assert not missing, (f"policy {name!r}: {cls.__name__}.presets lacks {missing}; it has "
                         f"{sorted(presets)}. Every policy offers 'slow' and 'fast'.")
    notes: Notes = []
    configs = {"default": ctx.config()}
    for p in ("slow", "fast"):
        configs[p] = ctx.config(p)
        pol = ctx.registry.create_policy(name, preset=p)
        assert pol.config == configs[p], (
            f"policy {name!r}: create_policy(preset={p!r}).config = {pol.config!r}, expected "
            f"{configs[p]!r}")
    with tempfile.TemporaryDirectory(prefix="cachekit-contract-") as tmp:
        for label, cfg in configs.items():
            back = cls.from_dict(cfg.to_dict())
            assert back == cfg, (f"policy {name!r}: {label} config does not round-trip "
                                 f"through to_dict/from_dict: {cfg!r} -> {back!r}")
            for suffix in (".toml", ".json"):
                path = cfg.save(Path(tmp) / f"{label}{suffix}")
                back = cls.load(path)
                assert back == cfg, (
                    f"policy {name!r}: {label} config does not round-trip through "
                    f"{suffix}: saved {cfg.to_dict()}, loaded {back.to_dict()}. (Settings whose "
                    f"value is None are not written; their default must then be None.)")
    tags = {label: cfg.tag() for label, cfg in configs.items()}
    for label, tag in tags.items():
        assert isinstance(tag, str) and _TAG_RE.match(tag), (
            f"policy {name!r}: tag() of the {label} config is {tag!r}; expected a filename-safe "
            f"string of [A-Za-z0-9._+-]")
    if not cls.field_names():
        notes.append(f"{cls.__name__} has no settings: slow and fast are necessarily the same "
                     f"(tag {tags['slow']!r})")
    else:
        assert tags["slow"] != tags["fast"], (
            f"policy {name!r}: presets slow and fast have the same tag {tags['slow']!r} "
            f"(slow={presets['slow']}, fast={presets['fast']}); they must differ")
    return notes


@_check(per_mode=True)
def check_preset_order(ctx: "_Ctx") -> Notes:
    """On the fixed replayed trajectory ``fast`` computes no more tokens than ``slow``."""
    name = ctx.name
    presets = getattr(ctx.config_cls, "presets", {}) or {}
    if not {"slow", "fast"} <= set(presets):
        raise ContractSkip(f"policy {name!r} lacks the slow/fast presets (see check 'presets')")
    totals = {}
    for p in ("slow", "fast"):
        _, spy, _ = ctx.replay(ctx.policy(ctx.config(p)))
        totals[p] = sum(_computed_by_call(spy).values())
    assert totals["fast"] <= totals["slow"], (
        f"policy {name!r}: on the same replayed trajectory preset 'fast' computes "
        f"{totals['fast']} tokens, more than 'slow' ({totals['slow']}). Swap or retune the "
        f"presets (fast={presets['fast']}, slow={presets['slow']}).")
    notes: Notes = [f"tokens computed on the trajectory: slow {totals['slow']}, fast "
                    f"{totals['fast']} of {ctx.trajectory.total_tokens}"]
    if totals["fast"] == totals["slow"] and ctx.config_cls.field_names():
        notes.append("slow and fast compute the same number of tokens on the toy trajectory")
    return notes


@_check(per_mode=True)
def check_lossless(ctx: "_Ctx") -> Notes:
    """At the lossless settings: no reuse, and the video equals the uncached one bit for bit."""
    name = ctx.name
    lossless = dict(_need(ctx, "lossless", "lossless settings"))
    traj = ctx.trajectory
    bases = [None] + (["fast"] if "fast" in (getattr(ctx.config_cls, "presets", {}) or {})
                      else [])
    notes: Notes = []
    for base in bases:
        cfg = ctx.config(base, **lossless)
        label = f"{'defaults' if base is None else 'preset ' + repr(base)} + {lossless}"
        result, spy, hook = ctx.generate(ctx.policy(cfg))
        for call, d in spy.decisions:
            assert d.kind is DecisionKind.COMPUTE, (
                f"{_where(name, call)}: decided {d.kind.value} ({d.reason!r}) at the lossless "
                f"settings ({label}); lossless settings must never reuse")
        stats = result.stats
        assert stats.calls == len(hook.calls) > 0, (
            f"policy {name!r}: {stats.calls} records for {len(hook.calls)} engine calls")
        assert stats.computed_token_fraction == 1.0, (
            f"policy {name!r}: computed_token_fraction={stats.computed_token_fraction} at the "
            f"lossless settings ({label}); expected 1.0 (decisions {stats.decisions})")
        assert traj.video is not None
        diff = (result.video - traj.video).abs().max().item()
        assert torch.equal(result.video, traj.video), (
            f"policy {name!r}: at the lossless settings ({label}) the video differs from the "
            f"uncached one (the `none` policy) by up to {diff:g}; it must be bit-identical "
            f"(mode={ctx.mode}, 2 branches, windows {traj.windows})")
    notes.append(f"{len(traj)} calls in {len(traj.windows)} windows, branches {traj.branches}")
    return notes


@_check(per_mode=True)
def check_monotonic(ctx: "_Ctx") -> Notes:
    """Larger speed values never compute more tokens on the fixed replayed trajectory."""
    name = ctx.name
    knob = _need(ctx, "speed_knob", "monotonicity in a speed knob")
    values = ctx.hints.speed_values
    stress = {k: v for k, v in (ctx.hints.stress or {}).items() if k != knob}
    notes: Notes = []
    for base in ([{}, stress] if stress else [{}]):
        label = f"defaults + {base}" if base else "defaults"
        per_value = []
        for v in values:
            _, spy, _ = ctx.replay(ctx.policy(ctx.config(**{**base, knob: v})))
            per_value.append((v, _computed_by_call(spy)))
        totals = [(v, sum(c.values())) for v, c in per_value]
        notes.append(f"{label}: {knob} " + ", ".join(f"{v!r} -> {t}" for v, t in totals)
                     + f" computed tokens of {ctx.trajectory.total_tokens}")
        for (va, ta), (vb, tb) in zip(totals, totals[1:]):
            assert tb <= ta, (
                f"policy {name!r} ({label}): {knob}={vb!r} computes {tb} tokens on the fixed "
                f"replayed trajectory, more than {knob}={va!r} ({ta}); a larger {knob} must "
                f"never compute more (all totals: {totals})")
        violations = []
        for (va, ca), (vb, cb) in zip(per_value, per_value[1:]):
            for key, n in cb.items():
                if n > ca[key]:
                    violations.append((key, va, ca[key], vb, n))
        if violations:
            key, va, na, vb, nb = violations[0]
            msg = (f"{len(violations)} calls compute more tokens at a larger {knob}; first: "
                   f"(window, branch, chunk, step)={key}: {knob}={va!r} computes {na}, "
                   f"{knob}={vb!r} computes {nb}")
            assert not ctx.hints.per_call_monotonic, (
                f"policy {name!r} ({label}): {msg} (per_call_monotonic=True)")
            notes.append(f"{label}: {msg} (allowed: per_call_monotonic=False)")
        if totals[0][1] == totals[-1][1]:
            notes.append(f"{label}: the sweep of {knob} did not change the computed tokens")
    return notes


@_check(per_mode=True)
def check_warmup(ctx: "_Ctx") -> Notes:
    """Steps ``< warmup`` always decide COMPUTE (at the fastest hinted settings)."""
    name = ctx.name
    knob = _need(ctx, "warmup_knob", "the warm-up")
    traj = ctx.trajectory
    max_steps = min(rc.call.num_steps for rc in traj)
    default = getattr(ctx.config_cls(), knob)
    tries = sorted({w for w in (*_WARMUP_TRIES, default)
                    if isinstance(w, int) and 1 <= w < max_steps})
    assert tries, f"policy {name!r}: no warm-up length to try below {max_steps} steps"
    fast = ctx.fastest()
    notes: Notes = []
    reused_after = 0
    for w in tries:
        cfg = ctx.config(**{**fast.to_dict(), knob: w})
        _, spy, _ = ctx.replay(ctx.policy(cfg))
        for call, d in spy.decisions:
            if call.step < w:
                assert d.kind is DecisionKind.COMPUTE, (
                    f"{_where(name, call)}: decided {d.kind.value} ({d.reason!r}) with "
                    f"{knob}={w}; steps < {knob} must always COMPUTE (config {cfg.to_dict()})")
            elif d.kind is not DecisionKind.COMPUTE:
                reused_after += 1
    notes.append(f"{knob} tried: {tries} at {fast.tag()}")
    if not reused_after:
        notes.append("the policy never reused after the warm-up on the trajectory, so the "
                     "warm-up check could not tell warm-up from a policy that never reuses")
    return notes


@_check(per_mode=True)
def check_isolation(ctx: "_Ctx") -> Notes:
    """Decisions per (window, branch, chunk) do not depend on other keys, windows or runs."""
    name = ctx.name
    traj = ctx.trajectory
    policy = ctx.policy(ctx.fastest())      # one object for every run below, as in production
    spy = DecisionSpy(policy)
    first, _, engine = ctx.replay(spy)
    ref = spy.log()
    ref_records = _strip_timing(first.stats.records)
    memory_used = spy.memory_used

    def compare(log: dict, what: str, hint: str) -> None:
        for key, sig in log.items():
            if ref[key] != sig:
                raise AssertionError(
                    f"policy {name!r} at (window, branch, chunk, step)={key}: decided "
                    f"{sig[0]} {what}, but {ref[key][0]} in the reference run "
                    f"(all calls in sampler order, fresh engine). {hint}")

    state_hint = ("Keep per-chunk state only in the object new_state() returns; nothing on "
                  "`self`, in globals or in closures.")
    # 1. a second run of the same engine
    spy.clear()
    second, _, _ = ctx.replay(spy, engine=engine)
    compare(spy.log(), "in a second run of the same engine", state_hint)
    assert _strip_timing(second.stats.records) == ref_records, (
        f"policy {name!r}: a second run of the same engine produced different records "
        f"(state leaks across runs). {state_hint}")
    # 2. guidance branches in reverse order
    spy.clear()
    ctx.replay(spy, traj.branches_reversed())
    compare(spy.log(), "with the guidance branches in reverse order",
            "State must be keyed by (branch, chunk), never by call order or parity.")
    # 3. each (window, branch, chunk) alone; each (window, branch) alone if the policy uses
    #    the window memory (a chunk may then legitimately read its neighbours' entries).
    groups: list[tuple]
    if memory_used:
        groups = list(dict.fromkeys((w, b) for w, b, _ in traj.keys()))
        alone = "with only its own branch in a fresh engine"
    else:
        groups = list(traj.keys())
        alone = "alone (only this (window, branch, chunk), fresh engine)"

    def in_group(group: tuple) -> Callable[[ChunkCall], bool]:
        return lambda c: (c.window, c.branch, c.chunk)[:len(group)] == group

    def causal_prefix(w: int, b: str, c: int) -> Callable[[ChunkCall], bool]:
        return lambda x: (x.window, x.branch) == (w, b) and x.chunk <= c

    for group in groups:
        spy.clear()
        ctx.replay(spy, traj.select(in_group(group)))
        compare(spy.log(), alone, state_hint + " A new window must start from fresh state.")
    if memory_used:
        # Causality: chunk c may read what earlier chunks left in the memory, never later ones.
        for w, b, c in traj.keys():
            spy.clear()
            ctx.replay(spy, traj.select(causal_prefix(w, b, c)))
            compare({k: v for k, v in spy.log().items() if k[2] == c},
                    "without the chunks after it (same branch, fresh engine)",
                    "A chunk may read window memory written by earlier chunks, never by later "
                    "ones (the model is block-causal).")
    unit = "(window, branch)" if memory_used else "(window, branch, chunk)"
    notes: Notes = [f"{len(groups)} {unit} groups replayed alone at {ctx.fastest().tag()}"]
    if memory_used:
        notes.append("the policy writes window memory: chunks were isolated per branch, and "
                     "each chunk from the chunks after it")
    if all(sig[0] == "compute" for sig in ref.values()):
        notes.append("the policy never reused in these runs: only COMPUTE decisions were "
                     "compared (add a larger speed value to the hints to exercise reuse)")
    return notes


@_check(per_mode=True)
def check_token_subsets(ctx: "_Ctx") -> Notes:
    """Token subsets lie inside the chunk, sorted, unique (decisions, runner, records)."""
    name = ctx.name
    notes: Notes = []
    partial = 0
    for preset in _run_presets(ctx):
        cfg = ctx.config(preset) if preset != "fastest" else ctx.fastest()
        # The spy checks each decision, the hook's runner each subset the model is asked to run.
        result, spy, hook, _ = _observed(ctx, cfg, "generate")
        rep, _, _ = _observed(ctx, cfg, "replay")    # the ReplayRunner checks subsets too
        for stats in (result.stats, rep.stats):
            for r in stats.records:
                if r.kind == "partial":
                    partial += 1
                    assert 0 < r.computed < r.tokens, (
                        f"policy {name!r}: record {_records_key(r)} is partial with "
                        f"{r.computed} of {r.tokens} tokens computed")
        ran = sum(1 for runs in rep.runs for t in runs if t is not None)
        notes.append(f"{preset}: {hook.subsets + ran} token-subset block runs checked")
    if not partial:
        notes.append("the policy returned no token subsets on the trajectory")
    return notes


def _run_presets(ctx: _Ctx) -> list[str]:
    presets = getattr(ctx.config_cls, "presets", {}) or {}
    out = [p for p in ("slow", "fast") if p in presets]
    if ctx.hints.speed_knob:
        out.append("fastest")
    return out or [None]  # type: ignore[list-item]


@_check(per_mode=True)
def check_one_decision(ctx: "_Ctx") -> Notes:
    """Exactly one decision and one record per (window, branch, chunk, step)."""
    name = ctx.name
    traj = ctx.trajectory
    for preset in _run_presets(ctx):
        cfg = ctx.config(preset) if preset != "fastest" else ctx.fastest()
        result, spy, hook, _ = _observed(ctx, cfg, "generate")
        recs = result.stats.records
        assert len(spy.decisions) == len(hook.calls) == len(recs), (
            f"policy {name!r} ({preset}): {len(spy.decisions)} decide() calls and {len(recs)} "
            f"records for {len(hook.calls)} engine calls; expected exactly one each")
        seen: set = set()
        for call, (dcall, _), r in zip(hook.calls, spy.decisions, recs):
            key = (call.window, call.branch, call.chunk, call.step)
            assert key not in seen, f"policy {name!r}: {key} decided twice"
            seen.add(key)
            assert (dcall.window, dcall.branch, dcall.chunk, dcall.step) == key == \
                _records_key(r), (
                    f"policy {name!r}: engine call {key}, decision for "
                    f"{(dcall.window, dcall.branch, dcall.chunk, dcall.step)}, record "
                    f"{_records_key(r)}: they must match one to one")
        assert len(seen) == len(traj), (
            f"policy {name!r}: {len(seen)} (window, branch, chunk, step) decided, the scenario "
            f"has {len(traj)} calls")
        rep, rspy, _ = _observed(ctx, cfg, "replay")
        assert [_records_key(r) for r in rep.stats.records] == [rc.key for rc in traj] == \
            [(c.window, c.branch, c.chunk, c.step) for c, _ in rspy.decisions], (
                f"policy {name!r} ({preset}): replay records/decisions do not match the "
                f"trajectory's calls one to one")
    return []


def _check_summary(name: str, label: str, stats: CacheStats, spy: DecisionSpy,
                   num_calls: int) -> None:
    recs = stats.records
    assert stats.calls == len(recs) == len(spy.decisions) == num_calls, (
        f"policy {name!r} ({label}): summary.calls={stats.calls}, {len(recs)} records, "
        f"{len(spy.decisions)} decisions, {num_calls} engine calls; all must be equal")
    forced = 0
    for (call, d), r in zip(spy.decisions, recs):
        key = _records_key(r)
        assert r.tokens == call.num_tokens, (
            f"policy {name!r} ({label}): record {key} has tokens={r.tokens}, the call has "
            f"{call.num_tokens}")
        expected = {"compute": r.tokens, "reuse": 0}.get(r.kind)
        assert r.kind in ("compute", "reuse", "partial"), f"record {key}: kind {r.kind!r}"
        if expected is not None:
            assert r.computed == expected, (
                f"policy {name!r} ({label}): record {key} kind {r.kind} with computed="
                f"{r.computed} of {r.tokens}")
        if r.reason in RECOMPUTE_REASONS and r.kind == "compute" and \
                d.kind is not DecisionKind.COMPUTE:
            forced += 1   # the engine overrode a reuse it could not serve (counted)
            continue
        assert r.kind == d.kind.value and r.computed == d.num_computed(call.num_tokens), (
            f"policy {name!r} ({label}): record {key} says {r.kind} with {r.computed} tokens, "
            f"the policy decided {d.kind.value} with {d.num_computed(call.num_tokens)}")
    assert forced == sum(stats.recomputes.get(k, 0) for k in ("missing_residual",)), (
        f"policy {name!r} ({label}): {forced} reuses overridden into computes, summary "
        f"recomputes={stats.recomputes}")
    total = sum(r.tokens for r in recs)
    computed = sum(r.computed for r in recs)
    assert stats.total_tokens == total and stats.computed_tokens == computed, (
        f"policy {name!r} ({label}): summary tokens {stats.computed_tokens}/"
        f"{stats.total_tokens}, records {computed}/{total}")
    assert abs(stats.computed_token_fraction - computed / total) < 1e-12
    assert sum(stats.decisions.values()) == stats.calls, (
        f"policy {name!r} ({label}): decision counts {stats.decisions} do not sum to "
        f"{stats.calls} calls")
    data = json.loads(stats.to_json())
    assert data["calls"] == stats.calls and data["computed_tokens"] == computed and \
        len(data["records"]) == stats.calls, (
            f"policy {name!r} ({label}): to_json() disagrees with the summary")


@_check(per_mode=True)
def check_stats(ctx: "_Ctx") -> Notes:
    """``engine.summary()`` is consistent with the decisions the policy made."""
    name = ctx.name
    notes: Notes = []
    for preset in _run_presets(ctx):
        cfg = ctx.config(preset) if preset != "fastest" else ctx.fastest()
        result, spy, hook, _ = _observed(ctx, cfg, "generate")
        _check_summary(name, f"{preset}, generate", result.stats, spy, len(hook.calls))
        rep, rspy, _ = _observed(ctx, cfg, "replay")
        _check_summary(name, f"{preset}, replay", rep.stats, rspy, len(ctx.trajectory))
        notes.append(f"{preset}: computed fraction {result.stats.computed_token_fraction:.3f} "
                     f"(generate), {rep.stats.computed_token_fraction:.3f} (replay)")
    return notes


@_check(per_mode=True)
def check_state(ctx: "_Ctx") -> Notes:
    """State objects: None or fresh objects with ``reset()``/``check_valid()``, valid after
    every call (checked by :class:`DecisionSpy`), valid after ``reset()``."""
    name = ctx.name
    issued = uncomparable = 0
    for preset in _run_presets(ctx):
        cfg = ctx.config(preset) if preset != "fastest" else ctx.fastest()
        _, spy, _, policy = _observed(ctx, cfg, "generate")
        _, rspy, rpolicy = _observed(ctx, cfg, "replay")
        # (The states are the ones left at the end of each run; resetting them is harmless.)
        for call, state, pol in [(c, st, policy) for c, st in spy.states] + \
                [(c, st, rpolicy) for c, st in rspy.states]:
            issued += 1
            where = _where(name, call)
            try:
                state.reset()
                state.check_valid()
            except Exception as exc:  # any failure is a violation
                raise AssertionError(f"{where}: reset() then check_valid() failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            if type(state).__eq__ is not object.__eq__:
                fresh = pol.new_state(call)
                try:
                    same = bool(state == fresh)
                except (RuntimeError, TypeError, ValueError):
                    same = None  # e.g. tensor fields compared by value: not comparable
                if same is None:
                    uncomparable += 1
                else:
                    assert same, (
                        f"{where}: after reset() the state {state!r} differs from a fresh "
                        f"new_state() {fresh!r}; reset() must restore the initial state")
    if not issued:
        return ["new_state() returned None everywhere: the policy keeps no per-chunk state"]
    notes = [f"{issued} state objects checked"]
    if uncomparable:
        notes.append(f"{uncomparable} reset states could not be compared with a fresh one "
                     f"(== raised); only check_valid() was verified for them")
    return notes


#: The checks in the order :func:`run_policy_contract` runs them.
CHECKS: dict[str, Callable[..., Notes]] = {
    "protocol": check_protocol,
    "presets": check_presets,
    "preset_order": check_preset_order,
    "lossless": check_lossless,
    "monotonic": check_monotonic,
    "warmup": check_warmup,
    "isolation": check_isolation,
    "token_subsets": check_token_subsets,
    "one_decision": check_one_decision,
    "stats": check_stats,
    "state": check_state,
}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@attrs.frozen
class CheckResult:
    """The outcome of one check: ``status`` is ``passed``, ``failed`` or ``skipped``."""

    check: str
    status: str
    message: str = ""
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)


def _results(items: Iterable[CheckResult]) -> tuple[CheckResult, ...]:
    return tuple(items)


@attrs.frozen
class ContractReport:
    """All check results for one policy. ``str(report)`` is a readable table."""

    policy: str
    results: tuple[CheckResult, ...] = attrs.field(converter=_results)

    def _by(self, status: str) -> list[CheckResult]:
        return [r for r in self.results if r.status == status]

    @property
    def failed(self) -> list[CheckResult]:
        return self._by("failed")

    @property
    def skipped(self) -> list[CheckResult]:
        return self._by("skipped")

    @property
    def passed(self) -> list[CheckResult]:
        return self._by("passed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"policy contract for {self.policy!r}: {len(self.passed)} passed, "
                 f"{len(self.failed)} failed, {len(self.skipped)} skipped"]
        for r in self.results:
            lines.append(f"  {r.status.upper():8s}{r.check}" +
                         (f": {r.message}" if r.message else ""))
            lines.extend(f"            - {n}" for n in r.notes)
        return "\n".join(lines)


def run_check(check: str, name: str, *, registry: Registry | None = None,
              contract: Optional[PolicyContract] = None) -> Notes:
    """Run one check by its :data:`CHECKS` name on one thread; returns its notes, raises
    :class:`AssertionError` on a violation and :class:`ContractSkip` when it does not apply."""
    try:
        fn = CHECKS[check]
    except KeyError:
        raise ValueError(f"unknown contract check {check!r}; checks are {list(CHECKS)}") from None
    with _one_thread():
        return list(fn(name, registry=registry, contract=contract) or [])


def run_policy_contract(name: str, registry: Registry | None = None, *,
                        contract: Optional[PolicyContract] = None,
                        checks: Iterable[str] | None = None,
                        raise_on_failure: bool = True) -> ContractReport:
    """Run every check (or ``checks``) on the policy registered as ``name``.

    :param registry: where the policy is registered; default the process-wide registry.
    :param contract: hints to use instead of the class's ``contract`` attribute.
    :return: a :class:`ContractReport`. With ``raise_on_failure`` (default) an
        :class:`AssertionError` carrying the report is raised if any check failed. Skipped
        checks are listed with their reason; they never count as passed.
    """
    results = []
    for check in (list(checks) if checks is not None else list(CHECKS)):
        try:
            notes = run_check(check, name, registry=registry, contract=contract)
            results.append(CheckResult(check, "passed", "", notes))
        except ContractSkip as exc:
            results.append(CheckResult(check, "skipped", str(exc)))
        except AssertionError as exc:
            results.append(CheckResult(check, "failed", str(exc)))
        except Exception as exc:  # a crash is a failure of the contract too
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append(CheckResult(check, "failed", f"raised {tb}"))
    report = ContractReport(name, tuple(results))
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report


def policy_contract_tests(names: Iterable[str] | None = None, *,
                          registry: Registry | Callable[[], Registry] | None = None,
                          contracts: Mapping[str, PolicyContract] | None = None,
                          checks: Iterable[str] | None = None) -> Callable[..., None]:
    """A pytest test function parametrized over (policy, check); assign it to a ``test_*`` name.

    :param names: policy names; default every policy registered in ``registry``.
    :param registry: a :class:`Registry`, a zero-argument callable returning one (built at
        collection), or None for the process-wide registry.
    :param contracts: hints per policy name, used instead of the classes' ``contract``.
    :param checks: a subset of :data:`CHECKS` names.

    Checks that do not apply call ``pytest.skip`` with the reason; notes are printed (shown by
    ``pytest -rA`` or on failure).
    """
    import pytest

    reg = registry() if callable(registry) and not isinstance(registry, Registry) else registry
    if reg is None:
        reg = get_registry()
    names = list(names) if names is not None else reg.names("policy")
    selected = list(checks) if checks is not None else list(CHECKS)
    contracts = dict(contracts or {})
    params = [pytest.param(n, c, id=f"{n}-{c}") for n in names for c in selected]

    @pytest.mark.parametrize(("policy_name", "check"), params)
    def test_policy_contract(policy_name: str, check: str) -> None:
        try:
            notes = run_check(check, policy_name, registry=reg,
                              contract=contracts.get(policy_name))
        except ContractSkip as exc:
            pytest.skip(str(exc))
        for note in notes:
            print(f"[{policy_name}/{check}] {note}")

    return test_policy_contract
