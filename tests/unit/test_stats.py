"""CacheStats built from hand-made records: aggregates, rendering, JSON."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.stats import RECOMPUTE_REASONS, CacheStats, CallRecord


def rec(window=0, it=0, branch="cond", chunk=0, step=0, kind="compute", computed=4, tokens=4,
        reason="", block_s=0.0, total_s=0.0):
    return CallRecord(window, it, branch, chunk, step, kind, computed, tokens, reason, block_s,
                      total_s)


RECORDS = (
    rec(step=0, kind="compute", computed=4, block_s=0.25, total_s=0.5),
    rec(step=1, kind="reuse", computed=0, total_s=0.125),
    rec(step=2, kind="partial", computed=1, block_s=0.125, total_s=0.25),
    rec(branch="uncond", step=0, kind="compute", computed=4, block_s=0.25, total_s=0.25),
    rec(window=1, step=0, kind="compute", computed=4, reason="missing_residual"),
    rec(window=1, chunk=1, step=0, kind="reuse", computed=0, tokens=8),
)


def stats(**kw) -> CacheStats:
    base = dict(policy="demo", config={"k": 1}, tag="demo_k1", records=RECORDS,
                recomputes={"missing_residual": 1}, evictions=2, peak_bytes=128,
                bytes_held=64, runtime_s=1.5)
    base.update(kw)
    return CacheStats(**base)


def test_empty_stats():
    s = CacheStats(policy="none")
    assert s.calls == 0 and s.decisions == {"compute": 0, "reuse": 0, "partial": 0}
    assert s.computed_token_fraction == 1.0  # nothing asked: nothing reused
    assert s.per_step() == {} and s.per_chunk() == {}
    assert s.block_time_s == 0 and s.overhead_s == 0
    assert "policy=none" in s.table()
    assert json.loads(s.to_json())["records"] == []


def test_aggregates():
    s = stats()
    assert s.calls == 6
    assert s.decisions == {"compute": 3, "reuse": 2, "partial": 1}
    assert s.computed_tokens == 13 and s.total_tokens == 28
    assert s.computed_token_fraction == pytest.approx(13 / 28)
    assert s.block_time_s == pytest.approx(0.625)
    assert s.overhead_s == pytest.approx(1.125 - 0.625)


def test_per_step_sums_over_windows():
    ps = stats().per_step()
    assert list(ps) == sorted(ps)
    # (cond, 0, 0) happened in window 0 and window 1
    assert ps[("cond", 0, 0)] == {"kinds": {"compute": 2}, "fraction": 1.0}
    assert ps[("cond", 0, 1)] == {"kinds": {"reuse": 1}, "fraction": 0.0}
    assert ps[("cond", 0, 2)] == {"kinds": {"partial": 1}, "fraction": 0.25}
    assert ps[("cond", 1, 0)] == {"kinds": {"reuse": 1}, "fraction": 0.0}
    assert set(ps) == {("cond", 0, 0), ("cond", 0, 1), ("cond", 0, 2), ("uncond", 0, 0),
                       ("cond", 1, 0)}


def test_per_chunk():
    assert stats().per_chunk() == {("cond", 0): 9 / 16, ("cond", 1): 0.0, ("uncond", 0): 1.0}


def test_to_dict_and_json_round_trip():
    s = stats()
    d = json.loads(s.to_json())
    assert d == json.loads(json.dumps(s.to_dict()))
    for key, value in (("policy", "demo"), ("tag", "demo_k1"), ("config", {"k": 1}),
                       ("calls", 6), ("computed_tokens", 13), ("total_tokens", 28),
                       ("recomputes", {"missing_residual": 1}), ("evictions", 2),
                       ("peak_bytes", 128), ("bytes_held", 64), ("runtime_s", 1.5)):
        assert d[key] == value, key
    assert d["decisions"] == {"compute": 3, "reuse": 2, "partial": 1}
    assert d["computed_token_fraction"] == pytest.approx(13 / 28)
    assert {"branch": "cond", "chunk": 1, "computed_fraction": 0.0} in d["per_chunk"]
    assert [CallRecord(**r) for r in d["records"]] == list(RECORDS)
    slim = json.loads(s.to_json(records=False, indent=None))
    assert "records" not in slim and slim["calls"] == 6


def test_table_shows_the_numbers():
    t = stats().table()
    assert "policy=demo (demo_k1)" in t
    assert "3 / 1 / 2" in t            # compute / partial / reuse
    assert "0.464" in t                # 13/28
    assert "forced recomputes" in t and "missing_residual" in t
    assert "cond chunk 1" in t and "uncond chunk 0" in t
    lines = t.splitlines()
    assert any(line.split()[-1] == "2" for line in lines if "evictions" in line)


def test_records_are_frozen_values():
    r = rec()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        r.kind = "reuse"  # type: ignore[misc]
    assert r.as_dict()["kind"] == "compute" and set(r.as_dict()) == {
        "window", "iteration", "branch", "chunk", "step", "kind", "computed", "tokens",
        "reason", "block_s", "total_s"}
    assert RECOMPUTE_REASONS == ("missing_residual", "nonfinite_residual")


RECORD = st.builds(
    rec, window=st.integers(0, 2), it=st.integers(0, 9),
    branch=st.sampled_from(["cond", "uncond"]), chunk=st.integers(0, 2), step=st.integers(0, 4),
    kind=st.sampled_from(["compute", "reuse", "partial"]), computed=st.integers(0, 8),
    tokens=st.integers(8, 8), block_s=st.floats(0, 1), total_s=st.floats(1, 2))


@settings(max_examples=50, deadline=None)
@given(records=st.lists(RECORD, max_size=20))
def test_aggregates_are_consistent(records):
    s = CacheStats(policy="p", records=tuple(records))
    assert sum(s.decisions.values()) == s.calls == len(records)
    assert 0.0 <= s.computed_token_fraction <= 1.0
    ps = s.per_step()
    assert sum(sum(v["kinds"].values()) for v in ps.values()) == s.calls
    pc = s.per_chunk()
    # the overall fraction is the token-weighted mean of the per-chunk fractions
    weights = {k: sum(r.tokens for r in records if (r.branch, r.chunk) == k) for k in pc}
    if records:
        mean = sum(pc[k] * w for k, w in weights.items()) / sum(weights.values())
        assert mean == pytest.approx(s.computed_token_fraction)
    assert s.overhead_s >= 0
    assert json.loads(s.to_json())["calls"] == s.calls
