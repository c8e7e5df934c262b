"""Does motion predict residual instability? NDCG of each estimator's token ranking.

MotionCache refreshes a token when its accumulated ``drift x motion weight`` crosses the
threshold, betting that tokens with high motion weight are the ones whose residual changes most
at the next step (the paper reports NDCG 0.97 between the two rankings). This measures that bet
on any model:

For every (branch, chunk, step t) of uncached generations, each registered estimator's weights
``w_t`` (computed at step t, as MotionCache would use them at step t + 1) are compared with the
true per-token residual change of the next step, ``||R_{t+1} - R_t||_2`` over the hidden
dimension, by NDCG over all tokens of the chunk (gains = the true changes). A random ranking is
the baseline. ``python -m cachekit.analysis --model refdit --seeds 200,201`` prints the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, ClassVar, Sequence

import torch

from .sampling import SamplerConfig, generate
from .types import ChunkCall, Decision, Probe, Scope

__all__ = ["ndcg", "MotionRankingRecorder", "motion_ranking", "main"]


def ndcg(scores: torch.Tensor, gains: torch.Tensor) -> float:
    """NDCG of ranking items by ``scores`` (descending) when item ``i`` is worth ``gains[i]``
    (>= 0), over all items. 1.0 = the ideal order; ties in ``scores`` are broken by index."""
    gains = gains.double().clamp_min(0)
    discount = 1.0 / torch.log2(torch.arange(2, gains.numel() + 2, dtype=torch.float64))
    ideal = float((gains.sort(descending=True).values * discount).sum())
    if ideal <= 0:
        return 1.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return float((gains[order] * discount).sum()) / ideal


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties); 0.0 when either
    is constant. Unlike NDCG with all-positive gains, a random order scores about 0."""
    from scipy.stats import spearmanr

    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    if x.min() == x.max() or y.min() == y.max():
        return 0.0
    return float(spearmanr(x, y).statistic)


class MotionRankingRecorder:
    """A pseudo-policy that always computes and scores every estimator (see module doc)."""

    name: ClassVar[str] = "motion_ranking_recorder"
    scope: ClassVar[Scope] = Scope.CHUNK
    needs_residual: ClassVar[bool] = True

    def __init__(self, estimators: dict[str, Any], seed: int = 0) -> None:
        self.config = None
        self.estimators = estimators
        self.scores: dict[str, list[float]] = {n: [] for n in [*estimators, "random"]}
        self.rho: dict[str, list[float]] = {n: [] for n in [*estimators, "random"]}
        self._gen = torch.Generator().manual_seed(seed)

    def new_state(self, call: ChunkCall) -> dict:
        return {"r": None, "w": None}

    def decide(self, call: ChunkCall, probe: Probe, state: dict, memory: dict) -> Decision:
        return Decision.compute("analysis")

    def observe(self, call, probe, state, outcome, memory) -> None:
        r = (outcome.h_out - outcome.h_in).detach().float()          # [B, N, D]
        if state["r"] is not None and state["w"] is not None:
            change = (r - state["r"]).norm(dim=-1).mean(0)              # [N]
            rnd = torch.rand(change.numel(), generator=self._gen)
            for name, w in [*state["w"].items(), ("random", rnd)]:
                self.scores[name].append(ndcg(w, change))
                self.rho[name].append(spearman(w, change))
        state["r"] = r
        state["w"] = {name: est.weights(call, probe, outcome.h_out, memory).detach().float()
                      for name, est in self.estimators.items()}


def motion_ranking(adapter: Any, *, seeds: Sequence[int], sampler: SamplerConfig,
                   registry: Any, estimators: Sequence[str] | None = None) -> dict[str, dict]:
    """Mean / min NDCG per estimator over uncached generations of ``seeds``."""
    from .engine import CacheEngine

    names = list(estimators or registry.names("motion_estimator"))
    rec = MotionRankingRecorder({n: registry.create_estimator(n) for n in names})
    engine = CacheEngine(rec, registry=registry)
    for seed in seeds:
        cond, uncond, _ = adapter.encode_prompt(None, seed=seed, batch=1)
        with torch.inference_mode():
            generate(adapter, cond, uncond=uncond, config=sampler.evolve(mode="chunked"),
                     engine=engine, seed=seed)
    out = {}
    for name, vals in rec.scores.items():
        if vals:
            rho = rec.rho[name]
            out[name] = {"mean": sum(vals) / len(vals), "min": min(vals), "n": len(vals),
                         "spearman": sum(rho) / len(rho)}
    return out


def main(argv: list[str] | None = None) -> int:
    from .plugins import DEFAULT_MODEL, get_registry

    p = argparse.ArgumentParser(prog="python -m cachekit.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seeds", default="200,201", help="comma-separated seeds (default 200,201)")
    p.add_argument("--steps", type=int, default=None, help="steps per chunk (model default)")
    a = p.parse_args(argv)
    registry = get_registry()
    adapter = registry.create_adapter(a.model)
    sampler = getattr(adapter, "default_sampler", SamplerConfig)()
    if a.steps:
        sampler = sampler.evolve(num_steps=a.steps)
    res = motion_ranking(adapter, seeds=[int(s) for s in a.seeds.split(",")], sampler=sampler,
                         registry=registry)
    print(f"NDCG of token rankings vs next-step residual change, model={a.model}, "
          f"seeds={a.seeds}, steps={sampler.num_steps}")
    print(f"{'estimator':12s} {'NDCG':>7s} {'min':>7s} {'Spearman':>9s} {'pairs':>6s}")
    for name, r in sorted(res.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:12s} {r['mean']:7.4f} {r['min']:7.4f} {r['spearman']:9.4f} {r['n']:6d}")
    return 0 if all(math.isfinite(r["mean"]) for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
