"""Hypothesis properties of ``teacache``, ``flowcache`` and ``motioncache`` against shadow models.

The policies are driven call by call (decide, then observe, as the engine does) with a
*scripted indicator*: the distance of each step is drawn by hypothesis (multiples of 1/8, so
float32 sums are exact) and encoded in the probe, and motion weights come from a stub
estimator. Each policy's decisions must equal a plain-Python transcription of its rule
(reference/algorithms.md §2, §4.1, §5.3, §5.6), and its structural invariants must hold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from cachekit_policies.flowcache import FlowCacheConfig, FlowCachePolicy
from cachekit_policies.motioncache import MotionCacheConfig, MotionCachePolicy
from cachekit_policies.teacache import TeaCacheConfig, TeaCachePolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.protocols import Outcome
from cachekit.types import ChunkCall, DecisionKind, Probe, Scope

SETTINGS = settings(max_examples=100, deadline=None)



EIGHTHS = st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
QUARTERS = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
THRESHOLDS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0])


class ScriptedIndicator:
    """Distances by step: the probe's modulation holds the step index in every element."""

    def __init__(self, per_step: list[list[float]]):
        self.per_step = per_step

    def _step(self, cur: torch.Tensor) -> int:
        return int(cur.flatten()[0])

    def distance(self, cur, prev) -> float:
        return self.per_step[self._step(cur)][0]

    def frame_distance(self, cur, prev) -> torch.Tensor:
        return torch.tensor(self.per_step[self._step(cur)], dtype=torch.float32)


class StubEstimator:
    name = "stub"

    def __init__(self, weights: list[torch.Tensor], uses_output: bool):
        self.w, self.uses_output = weights, uses_output

    def weights(self, call, probe, h_out, memory):
        return self.w[call.step]


class StubRegistry:
    def __init__(self, est):
        self.est = est

    def create_estimator(self, name, **options):
        return self.est


def drive(policy, num_steps: int, frames: int, hw: int, *,
          scope=Scope.CHUNK) -> list[tuple[Any, Any, Any]]:
    """decide/observe for steps 0..num_steps-1 of one chunk; returns (decision, state snapshot
    before the decision, acc after) per step."""
    n = frames * hw
    state = None
    memory: dict = {}
    out = []
    for s in range(num_steps):
        call = ChunkCall(branch="cond", chunk=0, step=s, num_steps=num_steps, frames=frames,
                         tokens_per_frame=hw, scope=scope)
        if state is None:
            state = policy.new_state(call)
        mod = torch.full((1, frames, 1, 1), float(s))
        probe = Probe(modulation=mod, grid=(frames, hw, 1))
        before = _snapshot(state)
        d = policy.decide(call, probe, state, memory)
        after_decide = _snapshot(state)
        policy.observe(call, probe, state, Outcome(
            decision=d, h_in=torch.zeros(1, n, 2), h_out=torch.zeros(1, n, 2),
            computed_tokens=d.num_computed(n), num_tokens=n), memory)
        if hasattr(state, "check_valid"):
            state.check_valid()
        out.append((d, before, after_decide))
    return out


def _snapshot(state) -> dict:
    snap = {}
    for name in ("acc", "p1_done", "p1_count", "chunk_acc"):
        if hasattr(state, name):
            v = getattr(state, name)
            snap[name] = v.clone() if isinstance(v, torch.Tensor) else v
    return snap


def as_tuple(d, n: int) -> tuple:
    return (d.kind.value, d.num_computed(n), d.reason)


# -------------------------------------------------------------------- teacache / flowcache
def shadow_scalar(ds: list[float], warmup: int, threshold: float,
                  compute_last: bool) -> list[tuple[str, str]]:
    acc, out = 0.0, []
    t = len(ds)
    for s, d in enumerate(ds):
        if s < warmup:
            acc, dec = 0.0, ("compute", "warmup")
        elif compute_last and s == t - 1:
            acc, dec = 0.0, ("compute", "last_step")
        elif s == 0:
            acc, dec = 0.0, ("compute", "no_previous")
        elif math.isnan(d):
            acc, dec = 0.0, ("compute", "nonfinite_distance")
        elif acc + d < threshold:
            acc, dec = acc + d, ("reuse", "below_threshold")
        else:
            acc, dec = 0.0, ("compute", "threshold")
        out.append(dec)
    return out


@SETTINGS
@given(name=st.sampled_from(["teacache", "flowcache"]),
       ds=st.lists(st.one_of(EIGHTHS, st.just(float("nan"))), min_size=1, max_size=14),
       warmup=st.integers(0, 4), threshold=THRESHOLDS, compute_last=st.booleans())
def test_scalar_policies_follow_the_teacache_rule(name, ds, warmup, threshold, compute_last):
    if name == "teacache":
        pol = TeaCachePolicy(TeaCacheConfig(warmup_steps=warmup, threshold=threshold,
                                            compute_last=compute_last))
        scope = Scope.WINDOW
    else:
        pol = FlowCachePolicy(FlowCacheConfig(warmup_steps=warmup, threshold=threshold,
                                              compute_last=compute_last))
        scope = Scope.CHUNK
    pol.indicator = ScriptedIndicator([[d] for d in ds])
    got = [(d.kind.value, d.reason) for d, _, _ in drive(pol, len(ds), 1, 2, scope=scope)]
    assert got == shadow_scalar(ds, warmup, threshold, compute_last)
    # structural: forced steps compute, threshold 0 never reuses
    for s, (kind, _) in enumerate(got):
        if s < warmup or threshold == 0.0 or (compute_last and s == len(ds) - 1):
            assert kind == "compute"


@SETTINGS
@given(ds=st.lists(EIGHTHS, min_size=2, max_size=14), warmup=st.integers(0, 3),
       t1=THRESHOLDS, t2=THRESHOLDS)
def test_scalar_larger_threshold_never_computes_more(ds, warmup, t1, t2):
    lo, hi = sorted((t1, t2))

    def computes(t):
        pol = FlowCachePolicy(FlowCacheConfig(warmup_steps=warmup, threshold=t))
        pol.indicator = ScriptedIndicator([[d] for d in ds])
        return sum(d.kind is DecisionKind.COMPUTE for d, _, _ in drive(pol, len(ds), 1, 2))

    assert computes(hi) <= computes(lo)


# --------------------------------------------------------------------------- motioncache
def shadow_motion(c: MotionCacheConfig, ds: list[list[float]], ws: list[list[float]],
                  frames: int, hw: int, uses_output: bool) -> list[tuple]:
    """Plain-Python MotionCache (§5.3, §5.6, §6.1 chunk-wise phase)."""
    n = frames * hw
    t = len(ds)
    acc, cacc, p1c, p1, w = [0.0] * n, 0.0, 0, False, None
    start = c.warmup_steps + 1 + c.chunk_wise_only_steps
    out = []
    for s in range(t):
        if s < c.warmup_steps:
            acc, cacc, dec = [0.0] * n, 0.0, ("compute", n, "warmup")
        elif s == c.warmup_steps:
            acc, cacc, p1c, dec = [0.0] * n, 0.0, 0, ("compute", n, "boundary")
        elif c.compute_last and s == t - 1:
            acc, cacc, dec = [0.0] * n, 0.0, ("compute", n, "last_step")
        elif s < start:
            acc = [0.0] * n
            thr = c.threshold if c.chunk_wise_threshold is None else c.chunk_wise_threshold
            if cacc + ds[s][0] < thr:
                cacc, dec = cacc + ds[s][0], ("reuse", 0, "chunk_wise")
            else:
                cacc, dec = 0.0, ("compute", n, "chunk_wise")
        else:
            if p1 and not uses_output:
                w = ws[s]
            ww = w if (p1 and w is not None) else [1.0] * n
            d = [ds[s][0] if c.distance_mode == "global" else ds[s][i // hw] for i in range(n)]
            a = [acc[i] + d[i] * ww[i] for i in range(n)]
            need = [x >= c.threshold for x in a]
            if c.temporal_vote and frames > 1:
                for p in range(hw):
                    on = sum(need[f * hw + p] for f in range(frames)) / frames > c.vote_threshold
                    for f in range(frames):
                        need[f * hw + p] = on
            k = sum(need)
            phase = "phase2" if p1 else "phase1"
            if 0 < k and k / n < c.min_update_ratio:
                acc, dec = a, ("reuse", 0, "min_update_ratio")
            else:
                acc = [0.0 if need[i] else a[i] for i in range(n)]
                kind = "compute" if k == n else ("reuse" if k == 0 else "partial")
                dec = (kind, k, phase)
        computed = dec[1]
        if computed == n:
            acc, cacc = [0.0] * n, 0.0
        if not p1:
            if s >= start and computed > 0:
                p1c += 1
                p1 = p1c >= c.phase1_steps
            elif s == start - 1 and c.phase1_steps == 0:
                p1 = True
        if p1 and uses_output:
            w = ws[s]
        out.append(dec)
    return out


@st.composite
def motion_cases(draw):
    frames = draw(st.integers(1, 3))
    hw = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 12))
    n = frames * hw
    cfg = MotionCacheConfig(
        threshold=draw(THRESHOLDS),
        warmup_steps=draw(st.integers(0, 3)),
        phase1_steps=draw(st.integers(0, 3)),
        chunk_wise_only_steps=draw(st.integers(0, 2)),
        chunk_wise_threshold=draw(st.one_of(st.none(), THRESHOLDS)),
        distance_mode=draw(st.sampled_from(["global", "token"])),
        temporal_vote=draw(st.booleans()),
        vote_threshold=draw(st.sampled_from([0.3, 0.5, 0.7])),
        min_update_ratio=draw(st.sampled_from([0.0, 0.2, 0.4, 0.7])),
        compute_last=draw(st.booleans()),
    )
    ds = [draw(st.lists(EIGHTHS, min_size=frames, max_size=frames)) for _ in range(steps)]
    ws = [draw(st.lists(QUARTERS, min_size=n, max_size=n)) for _ in range(steps)]
    return cfg, frames, hw, ds, ws, draw(st.booleans())


def build_motion(cfg, ds, ws, uses_output):
    est = StubEstimator([torch.tensor(w) for w in ws], uses_output)
    pol = MotionCachePolicy(cfg, StubRegistry(est))
    pol.indicator = ScriptedIndicator(ds)
    return pol


@settings(max_examples=120, deadline=None)
@given(case=motion_cases())
def test_motioncache_matches_shadow_and_invariants(case):
    cfg, frames, hw, ds, ws, uses_output = case
    n = frames * hw
    rows = drive(build_motion(cfg, ds, ws, uses_output), len(ds), frames, hw)
    got = [as_tuple(d, n) for d, _, _ in rows]
    assert got == shadow_motion(cfg, ds, ws, frames, hw, uses_output)

    start = cfg.token_phase_start
    for s, (d, before, after) in enumerate(rows):
        # the first W + 1 steps compute
        if s <= cfg.warmup_steps:
            assert d.kind is DecisionKind.COMPUTE
        # subsets are sorted, unique, int64, strictly inside the chunk, at least rho of it
        if d.kind is DecisionKind.PARTIAL:
            idx = d.tokens
            assert idx.dtype == torch.int64 and 0 < idx.numel() < n
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            assert bool((idx[1:] > idx[:-1]).all())
            assert idx.numel() / n >= cfg.min_update_ratio
            if cfg.temporal_vote and frames > 1:   # whole columns only
                mask = torch.zeros(n, dtype=torch.bool)
                mask[idx] = True
                grid = mask.reshape(frames, hw)
                assert bool((grid == grid[0]).all())
        # phase 1 (and the chunk-wise phase) is all-or-nothing when the drift is uniform over
        # the chunk (always for 'global'; for 'token' when every frame drifts alike, as under
        # diffusion forcing)
        if not before["p1_done"] and (cfg.distance_mode == "global" or len(set(ds[s])) == 1):
            assert d.kind is not DecisionKind.PARTIAL
        # accumulators: finite, >= 0, zero where computed, untouched growth on a rho skip
        acc = after["acc"]
        assert bool(torch.isfinite(acc).all()) and bool((acc >= 0).all())
        if d.kind is DecisionKind.PARTIAL:
            assert bool((acc[d.tokens] == 0).all())
        if d.reason == "min_update_ratio":
            assert bool((acc >= before["acc"]).all())      # kept (grown), never reset
        if s < start:
            assert bool((acc == 0).all())
        if cfg.threshold == 0.0 and not cfg.chunk_wise_threshold:
            assert d.kind is DecisionKind.COMPUTE


@settings(max_examples=60, deadline=None)
@given(case=motion_cases(), t1=THRESHOLDS, t2=THRESHOLDS)
def test_motioncache_larger_threshold_never_computes_more_per_token(case, t1, t2):
    """Provable when the weights do not depend on the decisions and nothing couples tokens:
    phase 2 from the start (P1 = 0, no chunk-wise phase), no vote, no min update ratio."""
    cfg, frames, hw, ds, ws, uses_output = case
    cfg = cfg.evolve(phase1_steps=0, chunk_wise_only_steps=0, temporal_vote=False,
                     min_update_ratio=0.0)
    lo, hi = sorted((t1, t2))
    n = frames * hw

    def per_token(t):
        counts = [0] * n
        for d, _, _ in drive(build_motion(cfg.evolve(threshold=t), ds, ws, uses_output),
                             len(ds), frames, hw):
            if d.kind is DecisionKind.COMPUTE:
                counts = [c + 1 for c in counts]
            elif d.kind is DecisionKind.PARTIAL:
                for i in d.tokens.tolist():
                    counts[i] += 1
        return counts

    assert all(a <= b for a, b in zip(per_token(hi), per_token(lo)))
