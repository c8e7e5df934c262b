"""Side-by-side micro-benchmarks of the engine itself (not of reuse policies).

``python -m cachekit.microbench overhead``
    Wall time of the same generation without any engine and through the engine with the
    ``none`` policy, interleaved (A, B, A, B, ...) in one process so drift and noise hit both
    alike. Prints the median per-pair ratio; the engine's overhead is ``1 - plain/engine``.
    Also checks that both videos are bit-identical.

``python -m cachekit.microbench structure [--case KEY=VALUE,... ...]``
    The lossless layer: ``vanilla`` execution (the whole window every iteration, as stock
    SkyReels-V2) against ``chunked`` (chunk by chunk with context K/V; finished and pending
    chunks never run), interleaved, uncached, at the adapter's default sampler settings
    changed by each ``--case``. Prints the analytic FLOP ratio (the most this schedule lets
    the layer save), the measured speedup and the max abs difference of the two videos; with
    the bundled model also chunked with one call per chunk instead of one batched forward per
    iteration. Several ``--case`` options print a table.

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
from .errors import ConfigError, invalid_value
from .metrics import block_cost, generation_flops
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


def _default_sampler(adapter: Any) -> SamplerConfig:
    fn = getattr(adapter, "default_sampler", None)
    return fn() if callable(fn) else SamplerConfig(num_frames=adapter.spec.max_frames,
                                                   num_steps=10, ar_step=2)


def structure(model: str = DEFAULT_MODEL, repeats: int = 3, sampler: SamplerConfig | None = None,
              **overrides: Any) -> dict:
    """Uncached ``vanilla`` vs ``chunked`` execution of one sampler setting, interleaved.

    ``sampler`` defaults to the adapter's ``default_sampler()``; ``overrides`` are
    :class:`SamplerConfig` fields applied on top. When the adapter has the ``chunk_batching``
    and ``branch_batching`` switches (the bundled model), chunked runs three ways: with both
    (one forward per iteration holding every chunk that runs and both guidance branches, the
    default), one forward per guidance branch (``chunked_per_branch``), and one call per chunk
    and branch (``chunked_per_chunk``); and vanilla runs twice: with the adapter's defaults
    (its branches stacked too, so ``speedup_median`` compares the execution structures
    alone) and with one call per branch as stock SkyReels-V2 runs CFG (``vanilla_per_branch``;
    ``speedup_vs_stock_median`` = that over the default chunked run). ``flop_ratio`` is the
    analytic block-stack FLOPs of vanilla over chunked for this schedule: what the lossless
    layer can save at best. ``variants_max_abs_diff`` is the largest difference of any variant
    from its mode's default run.
    """
    adapter = get_registry().create_adapter(model)
    cond, uncond, _ = adapter.encode_prompt(None, seed=0, batch=1)
    sampler = (sampler or _default_sampler(adapter)).evolve(**overrides)
    switches = [k for k in ("chunk_batching", "branch_batching")
                if isinstance(getattr(adapter, k, None), bool)]
    saved = {k: getattr(adapter, k) for k in switches}

    def run(mode: str, **flags: bool) -> Any:
        for k in switches:
            setattr(adapter, k, flags.get(k, saved[k]))
        return generate(adapter, cond, uncond=uncond, config=sampler.evolve(mode=mode), seed=0)

    # name -> (mode, switches); the first of each mode is its default run
    runs: dict[str, tuple[str, dict[str, bool]]] = {"vanilla": ("vanilla", {}),
                                                     "chunked": ("chunked", {})}
    if "branch_batching" in switches:
        runs["vanilla_per_branch"] = ("vanilla", {"branch_batching": False})
        runs["chunked_per_branch"] = ("chunked", {"branch_batching": False})
    if "chunk_batching" in switches:
        runs["chunked_per_chunk"] = ("chunked", {"chunk_batching": False,
                                                 "branch_batching": False})
    fns: dict[str, Callable[[], Any]] = {
        name: functools.partial(run, mode, **flags) for name, (mode, flags) in runs.items()}
    try:
        with torch.inference_mode():
            out = interleaved(fns, repeats)
    finally:
        for k, v in saved.items():
            setattr(adapter, k, v)
    t = out["times"]
    res = out["results"]
    cost, _src = block_cost(adapter)
    branches = ["cond", "uncond"] if sampler.guidance_scale != 1.0 else ["cond"]
    flops = {m: generation_flops(adapter.spec, sampler, cost, branches=branches, mode=m).flops
             for m in ("vanilla", "chunked")}

    def speedup(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(t[slow], t[fast]))

    r: dict[str, Any] = {"model": model, "repeats": repeats, "sampler": sampler.tag(),
                         "flop_ratio": flops["vanilla"] / flops["chunked"]}
    r.update({f"{name}_s": statistics.median(t[name]) for name in runs})
    r["speedup_median"] = speedup("vanilla", "chunked")
    if "vanilla_per_branch" in runs:
        r["speedup_vs_stock_median"] = speedup("vanilla_per_branch", "chunked")
    r["max_abs_diff"] = float((res["vanilla"].video - res["chunked"].video).abs().max())
    variants = [(name, mode) for name, (mode, _f) in runs.items() if name != mode]
    if variants:
        r["variants_max_abs_diff"] = max(
            float((res[mode].video - res[name].video).abs().max()) for name, mode in variants)
    return r


def _parse_case(text: str) -> dict[str, str]:
    """``"num_steps=30,ar_step=5"`` -> ``{"num_steps": "30", "ar_step": "5"}``."""
    case: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(invalid_value("--case", "comma-separated KEY=VALUE sampler "
                                            "settings, e.g. num_steps=30,ar_step=5", text))
        case[key.strip()] = value.strip()
    return case


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachekit.microbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["overhead", "structure"])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=16, help="overhead only")
    p.add_argument("--steps", type=int, default=10, help="overhead only")
    p.add_argument("--ar-step", type=int, default=2, help="overhead only")
    p.add_argument("--case", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="structure: sampler settings over the adapter's defaults (repeat the "
                        "option for a table), e.g. --case num_frames=40,overlap_history=4")
    a = p.parse_args(argv)
    try:
        if a.which == "overhead":
            sampler = SamplerConfig(num_frames=a.frames, num_steps=a.steps, ar_step=a.ar_step)
            rows = [overhead(a.model, a.repeats, sampler)]
        else:
            cases: list[dict[str, Any]] = [_parse_case(c) for c in a.case] or [{}]
            rows = [structure(a.model, a.repeats, **case) for case in cases]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(rows) == 1:
        for k, v in rows[0].items():
            print(f"{k:36s} {v:.4f}" if isinstance(v, float) else f"{k:36s} {v}")
        return 0
    cols = [k for k in rows[0] if k not in ("model", "repeats")]
    print(f"model `{a.model}`, {a.repeats} interleaved repeat(s), torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
