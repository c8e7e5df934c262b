"""Cache statistics: one record per engine call, and a frozen summary of a run.

:class:`CallRecord` is written once per (branch, chunk, step) call. :class:`CacheStats` is what
``engine.summary()`` returns: decision counts, computed-token fraction (overall and per
(branch, chunk, step)), counted recomputes by reason, bytes held, and time spent inside the
model's blocks versus cachekit's own overhead. ``table()`` renders it for humans, ``to_dict()``
/ ``to_json()`` for machines.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import attrs

__all__ = ["CallRecord", "CacheStats", "RECOMPUTE_REASONS"]

#: Reasons a decision to reuse was overridden into a compute by the engine (always counted).
RECOMPUTE_REASONS = ("missing_residual", "nonfinite_residual")


@attrs.frozen(slots=True)
class CallRecord:
    """What one engine call did. ``computed``/``tokens`` count tokens of the call."""

    window: int
    iteration: int
    branch: str
    chunk: int
    step: int
    kind: str          # "compute" | "reuse" | "partial"
    computed: int
    tokens: int
    reason: str = ""   # the policy's reason, or an engine override reason
    block_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class CacheStats:
    """Frozen summary of a run (see module docstring)."""

    policy: str
    config: dict = attrs.field(factory=dict)
    tag: str = ""
    records: tuple[CallRecord, ...] = attrs.field(default=(), repr=False)
    recomputes: dict = attrs.field(factory=dict)
    evictions: int = 0
    peak_bytes: int = 0
    bytes_held: int = 0
    runtime_s: float = 0.0

    # -- aggregates ---------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def decisions(self) -> dict[str, int]:
        c = Counter(r.kind for r in self.records)
        return {k: c.get(k, 0) for k in ("compute", "reuse", "partial")}

    @property
    def computed_tokens(self) -> int:
        return sum(r.computed for r in self.records)

    @property
    def total_tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def computed_token_fraction(self) -> float:
        """Computed token-steps / token-steps the policy was asked about (1.0 = no reuse)."""
        total = self.total_tokens
        return self.computed_tokens / total if total else 1.0

    @property
    def block_time_s(self) -> float:
        return sum(r.block_s for r in self.records)

    @property
    def overhead_s(self) -> float:
        """Time inside engine calls that was not spent running blocks."""
        return sum(r.total_s - r.block_s for r in self.records)

    def per_step(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        """``{(branch, chunk, step): {"kinds": {...}, "fraction": f}}`` summed over windows."""
        acc: dict[tuple[str, int, int], list] = defaultdict(lambda: [Counter(), 0, 0])
        for r in self.records:
            a = acc[(r.branch, r.chunk, r.step)]
            a[0][r.kind] += 1
            a[1] += r.computed
            a[2] += r.tokens
        return {k: {"kinds": dict(v[0]), "fraction": v[1] / v[2] if v[2] else 1.0}
                for k, v in sorted(acc.items())}

    def per_chunk(self) -> dict[tuple[str, int], float]:
        """Computed-token fraction per (branch, chunk)."""
        acc: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for r in self.records:
            acc[(r.branch, r.chunk)][0] += r.computed
            acc[(r.branch, r.chunk)][1] += r.tokens
        return {k: (v[0] / v[1] if v[1] else 1.0) for k, v in sorted(acc.items())}

    # -- rendering ----------------------------------------------------------------------------
    def to_dict(self, *, records: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "policy": self.policy, "tag": self.tag, "config": self.config,
            "calls": self.calls, "decisions": self.decisions,
            "computed_tokens": self.computed_tokens, "total_tokens": self.total_tokens,
            "computed_token_fraction": self.computed_token_fraction,
            "recomputes": dict(self.recomputes), "evictions": self.evictions,
            "peak_bytes": self.peak_bytes, "bytes_held": self.bytes_held,
            "block_time_s": self.block_time_s, "overhead_s": self.overhead_s,
            "runtime_s": self.runtime_s,
            "per_chunk": [{"branch": b, "chunk": c, "computed_fraction": f}
                          for (b, c), f in self.per_chunk().items()],
        }
        if records:
            d["records"] = [r.as_dict() for r in self.records]
        return d

    def to_json(self, *, records: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(records=records), indent=indent, sort_keys=False)

    def table(self) -> str:
        """A human-readable summary table."""
        d = self.decisions
        lines = [
            f"cachekit summary: policy={self.policy} ({self.tag})",
            f"  calls                    {self.calls:>10d}",
            f"  compute / partial / reuse {d['compute']:>6d} / {d['partial']:d} / {d['reuse']:d}",
            f"  computed token fraction  {self.computed_token_fraction:>10.3f}",
            f"  forced recomputes        {sum(self.recomputes.values()):>10d} "
            f"{dict(self.recomputes) if self.recomputes else ''}",
            f"  evictions                {self.evictions:>10d}",
            f"  cache bytes (peak)       {self.peak_bytes:>10d}",
            f"  time in blocks [s]       {self.block_time_s:>10.3f}",
            f"  cachekit overhead [s]    {self.overhead_s:>10.4f}",
        ]
        per_chunk = self.per_chunk()
        if per_chunk:
            lines.append("  computed fraction per (branch, chunk):")
            for (b, c), f in per_chunk.items():
                lines.append(f"    {b:>8s} chunk {c:<3d} {f:6.3f}")
        return "\n".join(lines)
