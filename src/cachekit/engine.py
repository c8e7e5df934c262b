"""The cache engine: applies one policy decision per (branch, chunk, step) around a block stack.

A model adapter calls the engine (a :data:`~cachekit.types.ChunkHook`) instead of running its
block stack directly::

    h_out = engine(call, h_in, run, probe)

The engine then

1. looks up the state of ``call.key = (branch, chunk)`` (made fresh on first use in a window);
2. asks the policy for a :class:`~cachekit.types.Decision`;
3. applies exactly one of: compute all tokens (``run(h_in)``), reuse all (``h_in + R``), or
   compute a token subset (``run(h_in[:, S], S)``, the rest ``h_in + R``);
4. stores the residual ``R = h_out - h_in`` (all tokens, or the subset), lets the policy
   observe the outcome, records statistics and notifies ``on_step_end`` plugins.

An adapter that runs several chunks of one iteration (of one or several guidance branches)
as a single forward calls :meth:`CacheEngine.run_chunks` instead: steps 1-2 for every chunk,
one block-stack run for all of them, then steps 3-4 for every chunk, in order (same results
as one call per chunk; a policy that needs strict per-chunk order sets
``batch_chunks = False``).

Guards against the silent failures caching libraries keep hitting (each has a test):

* the block input is **snapshotted** before the blocks run, so a block that works in place
  cannot alias it (a zero residual, a NaN distance, a cache that never fires);
* a residual is applied **exactly once**, to the whole block stack's output;
* a residual of the **wrong shape** raises :class:`~cachekit.errors.ResidualShapeError`;
* a **non-finite** residual is not stored; the next reuse finds nothing and recomputes
  (counted as ``missing_residual`` / ``nonfinite_residual`` in the summary, logged);
* calls outside ``begin_run``/``begin_window`` raise :class:`~cachekit.errors.CacheContextError`;
  the branch always comes from the caller; a (branch, chunk, step) decided twice in a window
  is an error (a missing ``begin_window`` or a mislabelled branch).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Optional, Sequence

import torch

from .config import EngineConfig
from .errors import (CacheContextError, ConfigError, DecisionError, ResidualShapeError,
                     invalid_value)
from .plugins import Registry, get_registry
from .protocols import Outcome, WindowMemory, reuse_space_of
from .stats import CacheStats, CallRecord
from .types import (REUSE_SPACES, BlockRunner, ChunkCall, Decision, DecisionKind, GroupRunner,
                    Probe, tensor_repr)

__all__ = ["CacheEngine"]

log = logging.getLogger("cachekit")

_perf = time.perf_counter


class CacheEngine:
    """Runs a policy around a model's block stack; see the module docstring.

    Build with a policy object, or by name with :meth:`from_name`. Drive with
    :meth:`begin_run` / :meth:`begin_window` / calls / :meth:`end_window` / :meth:`end_run`
    (or the :meth:`run` and :meth:`window` context managers).
    """

    def __init__(self, policy: Any, *, config: EngineConfig | None = None,
                 store: Any = None, registry: Registry | None = None) -> None:
        self.policy = policy
        # read once: a policy's reuse space is fixed (its config is frozen), and every call
        # is checked against it
        self._reuse_space = space = reuse_space_of(policy)
        if space not in REUSE_SPACES:
            raise ConfigError(invalid_value(
                f"reuse_space of policy {getattr(policy, 'name', policy)!r}",
                f"one of {REUSE_SPACES}", space))
        self.config = config or EngineConfig()
        self.registry = registry if registry is not None else get_registry()
        self.store = store if store is not None else self.registry.create_store(
            self.config.store, self.config)
        self._states: dict[tuple[str, int], Any] = {}
        self._last_step: dict[tuple[str, int], int] = {}
        self._memory = WindowMemory()
        self._records: list[CallRecord] = []
        self._recomputes: dict[str, int] = {}
        # key -> why its residual is absent (a dropped non-finite one); used to name the
        # forced recompute when a reuse finds nothing
        self._dropped: dict[tuple[str, int], str] = {}
        self._warned: set[str] = set()
        self._in_run = False
        self._window: Optional[int] = None
        self._run_t0 = 0.0
        self._runtime = 0.0
        self._sync = self.config.sync_timing and torch.cuda.is_available()
        self._on_step_end = None

    @classmethod
    def from_name(cls, policy: str, *, config: Any = None, preset: str | None = None,
                  engine_config: EngineConfig | None = None, registry: Registry | None = None,
                  **knobs: Any) -> "CacheEngine":
        """Build the policy registered as ``policy`` (config / preset / knobs) and an engine."""
        registry = registry if registry is not None else get_registry()
        pol = registry.create_policy(policy, config, preset=preset, **knobs)
        return cls(pol, config=engine_config, registry=registry)

    # -- lifecycle ----------------------------------------------------------------------------
    def begin_run(self, **info: Any) -> None:
        """Start a generation: drops every state, residual, record and counter (a window left
        open by an interrupted run is closed first, so ``on_window_end`` still fires)."""
        if self._window is not None:
            self.end_window()
        self._reset_window_state()
        self.store.peak_nbytes = 0
        self.store.evictions = 0
        if hasattr(self.store, "rejected"):
            self.store.rejected = 0
        self._records = []
        self._recomputes = {}
        self._warned = set()
        self._window = None
        self._in_run = True
        self._run_t0 = _perf()
        hook = self.registry.hook
        self._on_step_end = hook.on_step_end if hook.on_step_end.get_hookimpls() else None
        hook.on_run_start(engine=self, info=dict(info))

    def end_run(self) -> CacheStats:
        if self._window is not None:
            self.end_window()
        self._in_run = False
        self._runtime = _perf() - self._run_t0
        summary = self.summary()
        self.registry.hook.on_run_end(engine=self, summary=summary)
        return summary

    def begin_window(self, window: int) -> None:
        """Start window ``window``: per-(branch, chunk) state, residuals and memory reset."""
        if not self._in_run:
            raise CacheContextError("begin_window() called outside a run; call "
                                    "engine.begin_run() first (or use `with engine.run():`).")
        if self._window is not None:
            self.end_window()
        self._reset_window_state()
        self._window = int(window)
        self.registry.hook.on_window_start(engine=self, window=self._window)

    def end_window(self) -> None:
        if self._window is None:
            return
        self.registry.hook.on_window_end(engine=self, window=self._window)
        self._window = None

    @contextlib.contextmanager
    def run(self, **info: Any) -> Iterator["CacheEngine"]:
        self.begin_run(**info)
        try:
            yield self
        finally:
            self.end_run()

    @contextlib.contextmanager
    def window(self, window: int) -> Iterator["CacheEngine"]:
        self.begin_window(window)
        try:
            yield self
        finally:
            self.end_window()

    # -- the hook -----------------------------------------------------------------------------
    def __call__(self, call: ChunkCall, h_in: torch.Tensor, run: BlockRunner,
                 probe: Probe) -> torch.Tensor:
        t0 = _perf()
        p = self._plan(call, h_in, probe)
        out, block_s = None, 0.0
        if p.args is not None:
            tb = self._tick()
            out = run(*p.args)
            block_s = self._tick() - tb
        return self._finish(p, out, block_s, (_perf() - t0) - block_s)

    def run_chunks(self, calls: Sequence[ChunkCall], h_ins: Sequence[torch.Tensor],
                   run: GroupRunner, probes: Sequence[Probe]) -> list[torch.Tensor]:
        """The hook for several chunks of one iteration run as ONE forward.

        The calls may belong to several guidance branches (an adapter that stacks cond and
        uncond, e.g. the bundled model's ``velocities``): state stays per (branch, chunk), so
        that is the same as one ``run_chunks`` per branch. Same result as calling the engine
        once per call in the given order (``engine(call, h, run_g, probe)`` for each), but the
        blocks run once: the policy decides every call first (in order), ``run(parts)``
        computes what the decisions ask for, and then each call's outcome is stored and
        observed (in order). ``parts`` lists
        ``(i, h, tokens)`` for each chunk ``i`` (an index into ``calls``) that computes:
        ``tokens`` is None for all tokens, else the sorted subset and ``h`` its inputs; ``run``
        returns one output per part, same shapes. Chunks that reuse everything are not in
        ``parts``.

        The difference a policy can see: chunk ``g``'s ``decide`` comes before chunk
        ``g - 1``'s ``observe`` of the same iteration. A policy whose ``decide`` reads what an
        earlier chunk's ``observe`` wrote in the same iteration sets ``batch_chunks = False``
        (see :attr:`batch_chunks`); adapters then call the engine chunk by chunk.

        Block time is shared among the computing chunks by their computed token count in the
        per-call records (the forward cannot be split after the fact).
        """
        if not (len(calls) == len(h_ins) == len(probes)) or not calls:
            raise CacheContextError(invalid_value(
                "run_chunks(calls, h_ins, probes)", "three non-empty sequences of one length",
                (len(calls), len(h_ins), len(probes))))
        plans = []
        for call, h_in, probe in zip(calls, h_ins, probes):
            t0 = _perf()
            plans.append(self._plan(call, h_in, probe))
            plans[-1].spent = _perf() - t0
        parts = [(i, *p.args) for i, p in enumerate(plans) if p.args is not None]
        outs: dict[int, torch.Tensor] = {}
        shares: dict[int, float] = {}
        if parts:
            tb = self._tick()
            results = run(parts)
            block_s = self._tick() - tb
            if not isinstance(results, (list, tuple)) or len(results) != len(parts):
                raise ResidualShapeError(invalid_value(
                    "group runner result", f"a list of {len(parts)} tensors (one per part)",
                    type(results).__name__ if not isinstance(results, (list, tuple))
                    else f"{len(results)} items"))
            tokens = [part[1].shape[1] for part in parts]
            total = max(sum(tokens), 1)
            for (i, _h, _t), out, k in zip(parts, results, tokens):
                outs[i] = out
                shares[i] = block_s * k / total
        return [self._finish(p, outs.get(i), shares.get(i, 0.0), p.spent)
                for i, p in enumerate(plans)]

    @property
    def batch_chunks(self) -> bool:
        """May a model adapter run several chunks of an iteration as one forward through
        :meth:`run_chunks`? The policy's ``batch_chunks`` attribute (default True)."""
        return bool(getattr(self.policy, "batch_chunks", True))

    def _plan(self, call: ChunkCall, h_in: torch.Tensor, probe: Probe) -> "_Plan":
        """Validate the call, ask the policy, fetch the residual; what to run is ``args``."""
        if self._window is None:
            raise CacheContextError(
                f"engine called for {call.key} step {call.step} outside a window. The sampler "
                f"must call engine.begin_run() and engine.begin_window(i) before the model runs.")
        policy = self.policy
        if policy.scope is not None and call.scope is not policy.scope:
            raise CacheContextError(
                f"policy {policy.name!r} decides per {policy.scope.value}, but the model called "
                f"the engine per {call.scope.value}. Run the model with "
                f"mode={'vanilla' if policy.scope.value == 'window' else 'chunked'!r}.")
        if call.space != self._reuse_space:
            raise CacheContextError(
                f"policy {policy.name!r} reuses in the {self.reuse_space!r} space, but the model "
                f"adapter wrapped the {call.space!r} space for {call.key} step {call.step}. Use "
                f"an adapter (and execution mode) that supports {self.reuse_space!r} reuse, or "
                f"set the policy's reuse_space to {call.space!r}.")
        if h_in.dim() != 3 or h_in.shape[1] != call.num_tokens:
            raise CacheContextError(invalid_value(
                "h_in", f"[B, N={call.num_tokens}, D] for {call.frames} frames x "
                f"{call.tokens_per_frame} tokens", tensor_repr(h_in)))
        key = call.key
        last = self._last_step.get(key)
        if last is not None and call.step <= last:
            raise CacheContextError(
                f"{key}: step {call.step} after step {last} in window {self._window}. Each "
                f"(branch, chunk, step) is decided once per window: call begin_window() between "
                f"windows and pass the right branch name for each guidance pass.")
        self._last_step[key] = call.step
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = policy.new_state(call)
        memory = self._memory.branch(call.branch)

        decision = policy.decide(call, probe, state, memory)
        kind = decision.kind
        n = call.num_tokens
        if kind is DecisionKind.PARTIAL:
            # validated before anything else, so a bad subset never passes silently
            self._check_tokens(decision.tokens, n, key)
        residual = None
        if kind is not DecisionKind.COMPUTE:
            if not policy.needs_residual:
                raise DecisionError(f"policy {policy.name!r} declares needs_residual=False but "
                                    f"returned {kind.value} for {key}")
            residual = self.store.get(key)
            if residual is None:
                # Never stored because it was non-finite, or evicted under a budget.
                reason = self._dropped.pop(key, "missing_residual")
                self._count_recompute(reason, key, call)
                decision = Decision.compute(reason)
            elif residual.shape != h_in.shape:
                raise ResidualShapeError(invalid_value(
                    f"cached residual for {key}", f"shape {tuple(h_in.shape)} (the block input)",
                    tuple(residual.shape), "The window geometry changed without begin_window(), "
                    "or the adapter passed a different token layout."))
        p = _Plan(call, probe, state, memory, decision, residual, h_in)
        if decision.kind is DecisionKind.COMPUTE:
            # Snapshot: an in-place block must not turn the residual into zero.
            p.h_ref = h_in.clone() if policy.needs_residual else h_in
            p.args = (h_in, None)
        elif decision.kind is DecisionKind.PARTIAL:
            idx = decision.tokens
            assert idx is not None
            if idx.device != h_in.device:
                idx = idx.to(h_in.device)
            h_sub = h_in.index_select(1, idx)  # a copy: the snapshot of the subset
            p.h_ref = h_sub.clone()
            p.args = (h_sub, idx)
        return p

    def _finish(self, p: "_Plan", out: Optional[torch.Tensor], block_s: float,
                spent: float) -> torch.Tensor:
        """Apply the decision given the blocks' output ``out`` (None when nothing ran): store
        the residual, let the policy observe, record. ``spent``: engine time so far."""
        t0 = _perf()
        call, key, decision = p.call, p.call.key, p.decision
        kind, h_in, n = decision.kind, p.h_in, call.num_tokens
        if kind is DecisionKind.COMPUTE:
            assert out is not None and p.h_ref is not None
            h_out = out
            self._check_out(h_out, p.h_ref, key)
            if self.policy.needs_residual:
                self._store_full(key, h_out - p.h_ref, call)
            computed = n
            h_in_seen = p.h_ref
        elif kind is DecisionKind.REUSE:
            assert p.residual is not None
            h_out = h_in + p.residual
            computed = 0
            h_in_seen = h_in
        else:
            assert out is not None and p.h_ref is not None and p.args is not None
            h_sub_ref, idx = p.h_ref, p.args[1]
            if not isinstance(out, torch.Tensor) or out.shape != h_sub_ref.shape:
                raise ResidualShapeError(invalid_value(
                    f"selective block output for {key}", f"shape {tuple(h_sub_ref.shape)}",
                    tensor_repr(out)))
            assert p.residual is not None and idx is not None
            h_out = h_in + p.residual
            h_out.index_copy_(1, idx, out)
            delta = out - h_sub_ref
            if self.config.check_finite and not bool(torch.isfinite(delta).all()):
                self._drop_nonfinite(key, call)
            else:
                self.store.update(key, idx, delta)
            computed = int(idx.numel())
            h_in_seen = h_in

        self.policy.observe(call, p.probe, p.state,
                            Outcome(decision=decision, h_in=h_in_seen, h_out=h_out,
                                    computed_tokens=computed, num_tokens=n), p.memory)
        window = self._window
        assert window is not None  # _plan refused calls outside a window
        record = CallRecord(window, call.iteration, call.branch, call.chunk, call.step,
                            kind.value, computed, n, decision.reason, block_s,
                            spent + block_s + (_perf() - t0))
        self._records.append(record)
        if self._on_step_end is not None:
            self._on_step_end(engine=self, call=call, record=record)
        return h_out

    @property
    def reuse_space(self) -> str:
        """What the policy's cached quantity is (:data:`cachekit.types.REUSE_SPACES`): the
        policy's ``reuse_space`` attribute, ``"residual"`` when it has none. Model adapters
        read it to decide what to wrap (see :attr:`cachekit.types.ChunkCall.space`)."""
        return self._reuse_space

    # -- helpers ------------------------------------------------------------------------------
    def _reset_window_state(self) -> None:
        """Drop everything that lives for one window: policy states, step bookkeeping, window
        memory, residuals and the reasons of dropped residuals."""
        self._states.clear()
        self._last_step.clear()
        self._memory.clear()
        self.store.clear()
        self._dropped.clear()

    def _tick(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return _perf()

    def _store_full(self, key: tuple[str, int], residual: torch.Tensor, call: ChunkCall) -> None:
        if self.config.check_finite and not bool(torch.isfinite(residual).all()):
            self._drop_nonfinite(key, call)
            return
        self._dropped.pop(key, None)
        self.store.put(key, residual)

    def _drop_nonfinite(self, key: tuple[str, int], call: ChunkCall) -> None:
        """A computed residual holds NaN/Inf: do not keep it. The model's own output is used
        as computed; the next reuse of ``key`` finds nothing and recomputes, counted then as
        ``nonfinite_residual`` (no recompute happens here, so nothing is counted yet)."""
        self.store.discard(key)
        self._dropped[key] = "nonfinite_residual"
        log.warning("cachekit: non-finite residual for %s at step %d (window %s) not stored; "
                    "the next reuse of this chunk recomputes", key, call.step, self._window)

    @staticmethod
    def _check_out(h_out: torch.Tensor, h_ref: torch.Tensor, key) -> None:
        if not isinstance(h_out, torch.Tensor) or h_out.shape != h_ref.shape:
            raise ResidualShapeError(invalid_value(
                f"block output for {key}", f"a tensor of shape {tuple(h_ref.shape)}",
                tensor_repr(h_out)))

    @staticmethod
    def _check_tokens(idx: torch.Tensor, n: int, key) -> None:
        k = idx.numel()
        if k == 0 or k >= n:
            raise DecisionError(f"{key}: a PARTIAL decision needs 0 < K < N={n} tokens, got {k}; "
                                f"use Decision.subset() which collapses the extremes")
        if int(idx[0]) < 0 or int(idx[-1]) >= n or (k > 1 and bool((idx[1:] <= idx[:-1]).any())):
            raise DecisionError(invalid_value(
                f"token subset for {key}", f"sorted, duplicate-free indices in [0, {n})",
                f"{k} indices from {int(idx.min())} to {int(idx.max())}"))

    def _count_recompute(self, reason: str, key, call: ChunkCall) -> None:
        self._recomputes[reason] = self._recomputes.get(reason, 0) + 1
        msg = (f"cachekit: {reason} for {key} at step {call.step} (window {self._window}); "
               f"recomputing (counted in summary().recomputes)")
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(msg + "; further occurrences are logged at DEBUG level")
        else:
            log.debug(msg)

    # -- results ------------------------------------------------------------------------------
    def summary(self) -> CacheStats:
        """Frozen statistics of the current (or last) run."""
        cfg = getattr(self.policy, "config", None)
        runtime = self._runtime if not self._in_run else _perf() - self._run_t0
        return CacheStats(
            policy=self.policy.name,
            config=cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {},
            tag=cfg.tag() if cfg is not None and hasattr(cfg, "tag") else self.policy.name,
            records=tuple(self._records),
            recomputes=dict(self._recomputes),
            evictions=int(getattr(self.store, "evictions", 0)),
            peak_bytes=int(getattr(self.store, "peak_nbytes", 0)),
            bytes_held=int(getattr(self.store, "nbytes", 0)),
            runtime_s=runtime,
        )

    def state(self, branch: str, chunk: int) -> Any:
        """The policy state of (branch, chunk) in the current window (for tests/debugging)."""
        return self._states.get((branch, chunk))


class _Plan:
    """One chunk call between the policy's decision and its outcome (engine-internal)."""

    __slots__ = ("call", "probe", "state", "memory", "decision", "residual", "h_in", "h_ref",
                 "args", "spent")

    def __init__(self, call: ChunkCall, probe: Probe, state: Any, memory: dict,
                 decision: Decision, residual: Optional[torch.Tensor],
                 h_in: torch.Tensor) -> None:
        self.call, self.probe, self.state, self.memory = call, probe, state, memory
        self.decision, self.residual, self.h_in = decision, residual, h_in
        # the snapshot the residual is taken against (all tokens, or the subset)
        self.h_ref: Optional[torch.Tensor] = None
        # what to run: (h, None) for all tokens, (h_sub, tokens) for a subset, None for nothing
        self.args: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self.spent = 0.0
