"""Side-by-side micro-benchmarks of the engine itself (not of reuse policies).

``python -m cachekit.microbench overhead``
    Wall time of the same generation without any engine and through the engine with the
    ``none`` policy, interleaved (A, B, A, B, ...) in one process so drift and noise hit both
    alike. Prints the median per-pair ratio; the engine's overhead is ``1 - plain/engine``.
    Also checks that both videos are bit-identical.

``python -m cachekit.microbench structure``
    The lossless layer: ``vanilla`` execution (the whole window every iteration, as stock
    SkyReels-V2) against ``chunked`` (chunk by chunk with context K/V; finished and pending
    chunks never run), interleaved, uncached. Prints the speedup and the max abs difference
    of the two videos.

Both default to the bundled model (``--model refdit``); ``--model toy`` runs in seconds.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .engine import CacheEngine
from .plugins import DEFAULT_MODEL, get_registry
from .sampling import SamplerConfig, generate

__all__ = ["interleaved", "overhead", "structure", "main"]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict:
    """Time each callable ``repeats`` times, alternating between them; returns per-name lists
    of seconds and the last result of each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, Any] = {}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {"times": times, "results": results}


def _setup(model: str, sampler: SamplerConfig):
    adapter = get_registry().create_adapter(model)
    cond, uncond, _ = adapter.encode_prompt(None, seed=0, batch=1)
    return adapter, cond, uncond


def overhead(model: str = DEFAULT_MODEL, repeats: int = 5, sampler: SamplerConfig | None = None) -> dict:
    sampler = sampler or SamplerConfig(num_frames=16, num_steps=10, ar_step=2)
    adapter, cond, uncond = _setup(model, sampler)
    engine = CacheEngine.from_name("none")

    def plain():
        return generate(adapter, cond, uncond=uncond, config=sampler, seed=0)

    def with_engine():
        return generate(adapter, cond, uncond=uncond, config=sampler, seed=0, engine=engine)

    with torch.inference_mode():
        out = interleaved({"plain": plain, "engine": with_engine}, repeats)
    t = out["times"]
    ratios = [e / p for p, e in zip(t["plain"], t["engine"])]
    res = out["results"]
    stats = res["engine"].stats
    return {
        "model": model, "repeats": repeats, "sampler": sampler.tag(),
        "plain_s": statistics.median(t["plain"]), "engine_s": statistics.median(t["engine"]),
        "ratio_median": statistics.median(ratios),
        "overhead_fraction": 1.0 - 1.0 / statistics.median(ratios),
        "engine_self_overhead_fraction": stats.overhead_s / max(stats.runtime_s, 1e-12),
        "bit_identical": bool(torch.equal(res["plain"].video, res["engine"].video)),
    }


def structure(model: str = DEFAULT_MODEL, repeats: int = 3, sampler: SamplerConfig | None = None) -> dict:
    sampler = sampler or SamplerConfig(num_frames=16, num_steps=10, ar_step=2)
    adapter, cond, uncond = _setup(model, sampler)
    fns: dict[str, Callable[[], Any]] = {
        mode: functools.partial(generate, adapter, cond, uncond=uncond,
                                config=sampler.evolve(mode=mode), seed=0)
        for mode in ("vanilla", "chunked")}
    with torch.inference_mode():
        out = interleaved(fns, repeats)
    t = out["times"]
    res = out["results"]
    return {
        "model": model, "repeats": repeats, "sampler": sampler.tag(),
        "vanilla_s": statistics.median(t["vanilla"]), "chunked_s": statistics.median(t["chunked"]),
        "speedup_median": statistics.median(v / c for v, c in zip(t["vanilla"], t["chunked"])),
        "max_abs_diff": float((res["vanilla"].video - res["chunked"].video).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachekit.microbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["overhead", "structure"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ar-step", type=int, default=2)
    a = p.parse_args(argv)
    sampler = SamplerConfig(num_frames=a.frames, num_steps=a.steps, ar_step=a.ar_step)
    fn = overhead if a.which == "overhead" else structure
    r = fn(a.model, a.repeats, sampler)
    for k, v in r.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
