"""``cachekit bench``, ``cachekit metrics`` and ``cachekit report``: the benchmark harness.

``cachekit bench`` runs every policy setting (``--presets`` or a ``--sweep`` of knob values)
for every seed and schedule and measures it against the **uncached** generation of the same
seed (reference/algorithms.md §8):

* **wall time**: the median over ``--repeats`` of the whole ``generate`` call. Each repeat runs
  the uncached *vanilla* execution (the whole window every iteration, as stock SkyReels-V2),
  the uncached *chunked* execution (the lossless layer: chunk by chunk with context K/V) and
  the policy, back to back in one process, in an order that rotates every repeat, so drift
  and noise hit all three alike. Speedups are the median of the per-repeat ratios, against
  both baselines. Window-level policies (``teacache``) run in vanilla execution, so their
  speedup against chunked is usually below 1: reported as measured.
* **analytic FLOPs** of the run and of both baselines (:func:`cachekit.metrics.generation_flops`:
  the engine's per-call records on the schedule's rows; the model's ``block_flops`` when it
  has one, else a generic transformer estimate, named in the output), the FLOP speedups and
  the **computed-token fraction** (token-steps the policy computed / token-steps it decided);
* **efficiency** = wall speedup / FLOP speedup, both against the uncached run of the policy's
  own execution (chunked; vanilla for window policies): 1 = every saved FLOP became saved
  time; the engine's ``block_time_s`` and ``overhead_s`` say where time went;
* **memory**: the residual store's peak bytes (``peak_cache_bytes``) and the process's
  resident set, sampled every 20 ms during each run (``rss_peak_delta_mb``: peak minus the
  value when the run started; includes allocator behaviour and the K/V buffers, so it is
  coarse) and the process's high-water mark ``max_rss_mb`` (``getrusage``; includes the
  model and every earlier run);
* **PSNR, SSIM** against the uncached *vanilla* video of the same seed (the papers'
  reference), LPIPS ``null`` with the reason (:data:`cachekit.metrics.LPIPS_UNAVAILABLE`);
  the lossless layer's own PSNR (chunked vs vanilla, uncached) is reported per row;
* **recompute maps**: a wrapper around the policy (:class:`RecordingPolicy`, same name,
  scope, config) records which tokens each call computed; ``heatmap_<tag>.png`` shows, per
  chunk and frame, how often each token was recomputed (over steps, branches, windows and
  seeds); ``overlays/<tag>.gif`` tints the first seed's video by it.

Results go to ``--out`` (default ``out/bench``): ``rows.jsonl`` (one finished row per line,
appended as rows finish), ``results.json`` (settings, the command lines, environment, rows
and per-setting summary), ``results.csv``, ``pareto.png``, ``heatmap_<tag>.png``,
``recompute/*.npz``, ``videos/*.npy`` and ``overlays/*.gif``. A run is **resumable**: rows
already in ``--out``, keyed by (policy, setting tag, seed, schedule), are not recomputed; a
directory holding a run with other model or sampler settings is refused (``--fresh`` starts
over). Seeds default to 0, 1, 2; calibration uses 100 and up (never tune on these).

``cachekit report DIR`` (or ``cachekit bench --report-only``) regenerates the figures, the
README's results table (only between ``<!-- bench:start -->`` and ``<!-- bench:end -->``)
and ``docs/benchmarks.md`` from ``DIR/results.json``, each with the command that made it.

``cachekit metrics A B`` prints PSNR and SSIM of video A against reference B.

The module imports nothing heavy at import time (the CLI builds every parser at start-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import attrs

from .plugins import DEFAULT_MODEL
from .wrapping import PolicyWrapper
from .errors import ConfigError, invalid_value

if TYPE_CHECKING:  # pragma: no cover
    from .plugins import Registry

__all__ = [
    "add_bench_arguments", "run_bench", "add_metrics_arguments", "run_metrics",
    "add_report_arguments", "run_report",
    "BenchOptions", "Setting", "RecordingPolicy", "expand_settings", "run_benchmark",
    "load_results", "summarize", "write_figures", "write_report", "replace_between_markers",
    "README_START", "README_END", "DEFAULT_POLICIES",
]

DEFAULT_POLICIES = ("none", "fixed_interval", "teacache", "flowcache", "motioncache")
DEFAULT_PRESETS = ("slow", "fast")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_REPEATS = 3
DEFAULT_OUT = "out/bench"
#: ``--quick``: one seed, one repeat, the ``fast`` presets (frames and steps unchanged: the
#: bundled model's window is already small; pass --frames/--steps to shrink further).
QUICK_SEEDS = (0,)
QUICK_REPEATS = 1
QUICK_PRESETS = ("fast",)
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
#: The hand-written reading of the results in docs/benchmarks.md lives between these markers;
#: `cachekit report` keeps it (everything else on that page is generated).
READING_START = "<!-- reading:start -->"
READING_END = "<!-- reading:end -->"
_READING_PLACEHOLDER = ("*No reading written yet: edit the text between the `reading` markers "
                        "in this file; `cachekit report` keeps it when it regenerates the "
                        "page.*")
SCHEMA = 1
RESULTS_JSON, ROWS_JSONL, RESULTS_CSV = "results.json", "rows.jsonl", "results.csv"
PARETO_PNG = "pareto.png"
_RUNS = ("vanilla", "chunked", "policy")
_RSS_INTERVAL_S = 0.02


# =============================================================================================
# argument parsing (light: no torch)
# =============================================================================================
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise ConfigError(invalid_value(option, "comma-separated integers", text)) from None


def _add_report_targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report targets")
    g.add_argument("--readme", default="README.md", metavar="FILE",
                   help="README whose results table (between the markers "
                        f"{README_START} and {README_END}) is rewritten; default README.md")
    g.add_argument("--docs", default="docs/benchmarks.md", metavar="FILE",
                   help="benchmark page to regenerate (figures are copied next to it, into "
                        "a folder of the same name); default docs/benchmarks.md")
    g.add_argument("--no-readme", action="store_true", help="leave the README alone")
    g.add_argument("--no-docs", action="store_true", help="do not write the benchmark page")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cachekit bench``."""
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help="registered model adapter (default: refdit, the bundled model)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), metavar="LIST",
                   help=f"comma-separated policy names; default {','.join(DEFAULT_POLICIES)}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--presets", metavar="LIST",
                   help="comma-separated presets run for every policy; default slow,fast "
                        "(--quick: fast)")
    g.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run these values of a knob instead of presets (repeatable: the "
                        "product); policies without the knob run once with their defaults")
    p.add_argument("--set", dest="set", action="append", default=[],
                   metavar="[POLICY.]KEY=VALUE",
                   help="override a knob on top of presets/sweeps, for one policy "
                        "(motioncache.weight_floor=0.5) or every policy that has it")
    p.add_argument("--seeds", metavar="LIST",
                   help="comma-separated seeds (prompt and noise); default 0,1,2 (--quick: 0)")
    p.add_argument("--schedule", default="skyreels", metavar="LIST",
                   help="skyreels, magi or both (comma-separated); default skyreels")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed repeats of each row (median); default 3 (--quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="one seed, one repeat, fast presets (about a minute on the bundled "
                        "model)")
    s = p.add_argument_group("sampling")
    s.add_argument("--frames", type=int, metavar="N", help="frames of each video")
    s.add_argument("--steps", type=int, metavar="N", help="denoising steps per chunk")
    s.add_argument("--sampler-set", dest="sampler_set", action="append", default=[],
                   metavar="KEY=VALUE", help="any other SamplerConfig setting (repeatable)")
    s.add_argument("--engine-set", dest="engine_set", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="engine setting for the policy runs, e.g. store_dtype=bfloat16")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads (default: torch's own default)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"results folder; default {DEFAULT_OUT}")
    p.add_argument("--fresh", action="store_true",
                   help="discard rows already in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true",
                   help="only regenerate figures, README table and docs page from --out")
    _add_report_targets(p)


def add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cachekit metrics``."""
    p.add_argument("video", metavar="A", help="video to score (.npy, .gif, .mp4, ...)")
    p.add_argument("reference", metavar="B", help="reference video (e.g. the uncached one)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cachekit report``."""
    p.add_argument("dir", metavar="DIR", help="a `cachekit bench --out` folder")
    _add_report_targets(p)


# =============================================================================================
# settings
# =============================================================================================
@attrs.frozen(kw_only=True)
class Setting:
    """One policy configuration to benchmark: ``label`` names it for people (``fast``,
    ``threshold=0.2``), ``tag`` (the config's :meth:`~cachekit.config.ConfigBase.tag`) keys it."""

    policy: str
    label: str
    config: Any = attrs.field(eq=False, repr=False)
    tag: str
    mode: str  # "chunked" or "vanilla" (window-scope policies)


def _parse_value(text: str) -> Any:
    from .config import _coerce_from_string

    return _coerce_from_string(text)


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    out = []
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(invalid_value("--sweep", "KEY=V1,V2,...", item,
                                            "Write e.g. --sweep threshold=0.05,0.1,0.2"))
        key, values = item.split("=", 1)
        vals = [_parse_value(v) for v in _csv_list(values)]
        if not vals:
            raise ConfigError(invalid_value("--sweep", f"at least one value for {key}", item))
        out.append((key.strip(), vals))
    return out


def parse_policy_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["motioncache.weight_floor=0.5", "warmup_steps=2"]`` -> ``{policy or "*": {k: v}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(invalid_value("--set", "[POLICY.]KEY=VALUE", item))
        key, value = item.split("=", 1)
        policy, _, knob = key.strip().rpartition(".")
        if not knob:
            raise ConfigError(invalid_value("--set", "[POLICY.]KEY=VALUE", item))
        out.setdefault(policy or "*", {})[knob] = _parse_value(value)
    return out


def expand_settings(registry: Registry, policies: Sequence[str], *,
                    presets: Optional[Sequence[str]] = None,
                    sweeps: Sequence[tuple[str, list[Any]]] = (),
                    overrides: Optional[dict[str, dict[str, Any]]] = None,
                    adapter: Any = None) -> list[Setting]:
    """The settings to run, in order, without duplicates (presets that give the same config,
    e.g. ``none``'s slow and fast, are one setting labelled ``slow/fast``).

    With an ``adapter``, indicator policies that name no coefficients get the adapter's
    shipped calibration, exactly as ``cachekit generate`` does
    (:func:`cachekit.generation.model_calibration`), so a benchmarked setting is the setting a
    user runs; the file is part of the config and its tag."""
    import itertools

    from .generation import model_calibration
    from .types import Scope

    overrides = overrides or {}
    # A POLICY.KEY override for a registered policy that is not benchmarked is ignored (one
    # command line can serve several --policies lists); an unknown policy is an error.
    unknown = set(overrides) - {"*"} - set(registry.names("policy"))
    if unknown:
        raise ConfigError(invalid_value("--set", "POLICY.KEY=VALUE with a registered policy "
                                        f"among {registry.names('policy')}", sorted(unknown)))
    wildcard = overrides.get("*", {})
    used_wild: set[str] = set()
    settings: dict[tuple[str, str], Setting] = {}
    for name in policies:
        reg = registry.get("policy", name)
        fields = set(reg.config.field_names())  # type: ignore[union-attr]
        extra = {k: v for k, v in wildcard.items() if k in fields}
        used_wild |= set(extra)
        extra.update(overrides.get(name, {}))
        candidates: list[tuple[str, Any]] = []
        if sweeps:
            keys = [(k, vals) for k, vals in sweeps if k in fields]
            if not keys:
                candidates.append(("default", registry.policy_config(name, **extra)))
            for combo in (itertools.product(*[vals for _, vals in keys]) if keys else ()):
                knobs = dict(zip([k for k, _ in keys], combo))
                label = ",".join(f"{k}={v}" for k, v in knobs.items())
                candidates.append((label, registry.policy_config(name, **{**knobs, **extra})))
        else:
            for preset in presets or DEFAULT_PRESETS:
                candidates.append((preset, registry.policy_config(name, preset=preset,
                                                                  **extra)))
        for label, config in candidates:
            if adapter is not None:
                config = model_calibration(config, reg.factory, adapter)
            tag = config.tag()
            key = (name, tag)
            if key in settings:
                old = settings[key]
                if label not in old.label.split("/"):
                    settings[key] = attrs.evolve(old, label=f"{old.label}/{label}")
                continue
            scope = getattr(registry.create_policy(name, config), "scope", None)
            mode = "vanilla" if scope is Scope.WINDOW else "chunked"
            settings[key] = Setting(policy=name, label=label, config=config, tag=tag, mode=mode)
    missing = set(wildcard) - used_wild
    if missing:
        raise ConfigError(invalid_value("--set", "knobs some benchmarked policy has",
                                        sorted(missing)))
    return list(settings.values())


# =============================================================================================
# instrumentation
# =============================================================================================
class RecordingPolicy(PolicyWrapper):
    """Wraps a policy and records which tokens each call actually computed.

    Runs exactly as the wrapped policy (:class:`cachekit.protocols.PolicyWrapper`). The record
    comes from :meth:`observe`'s ``Outcome`` (so an engine override, e.g. a missing residual
    forcing a compute, is recorded as what happened): compute = every token, reuse = none,
    partial = ``decision.tokens``. Logging is a list append per call; :meth:`frequency`
    aggregates after the run.
    """

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.log: list[tuple[int, int, int, Any]] = []

    def reset(self) -> None:
        self.log = []

    def observe(self, call: Any, probe: Any, state: Any, outcome: Any, memory: Any) -> None:
        self.inner.observe(call, probe, state, outcome, memory)
        c, n = outcome.computed_tokens, outcome.num_tokens
        tokens: Any = True if c == n else (False if c == 0 else outcome.decision.tokens)
        self.log.append((call.chunk, call.frames, call.tokens_per_frame, tokens))

    def frequency(self, chunk_frames: int) -> tuple[Any, Any]:
        """``(freq [chunks, chunk_frames * tokens_per_frame], calls [chunks])``: how often each
        token of each (window-local) chunk was computed, over every recorded call. A
        whole-window call (vanilla execution) counts for every chunk of the window."""
        import numpy as np

        counts: dict[int, Any] = {}
        calls: dict[int, int] = {}
        for chunk, frames, tpf, tokens in self.log:
            n_chunk = chunk_frames * tpf
            n = frames * tpf
            mask = np.zeros(n)
            if tokens is True:
                mask[:] = 1.0
            elif tokens is not False:
                mask[np.asarray(tokens.detach().cpu())] = 1.0
            if frames == chunk_frames:
                parts = [(chunk, mask)]
            else:  # one call for the whole window: split it into its chunks
                parts = [(j, mask[j * n_chunk:(j + 1) * n_chunk]) for j in range(n // n_chunk)]
            for g, m in parts:
                if g not in counts:
                    counts[g] = np.zeros(n_chunk)
                    calls[g] = 0
                counts[g] += m
                calls[g] += 1
        if not counts:
            return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
        g_max = max(counts) + 1
        width = max(len(c) for c in counts.values())
        freq = np.zeros((g_max, width))
        ncalls = np.zeros(g_max, dtype=np.int64)
        for g, c in counts.items():
            freq[g, :len(c)] = c / calls[g]
            ncalls[g] = calls[g]
        return freq, ncalls


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _PeakRss:
    """Samples the resident set every 20 ms in a thread (Linux ``/proc``; else no value).

    Each wake-up takes the GIL: about 1-2% of wall time on the toy model, less on real blocks
    (torch releases the GIL), and the same for all three runs of a repeat.
    """

    def __init__(self) -> None:
        import threading

        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) \
            if self.start is not None else None

    def _loop(self) -> None:
        while not self._stop.wait(_RSS_INTERVAL_S):
            v = _rss_bytes()
            if v is not None and self.peak is not None and v > self.peak:
                self.peak = v

    def __enter__(self) -> "_PeakRss":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            v = _rss_bytes()
            if v is not None and self.peak is not None:
                self.peak = max(self.peak, v)

    @property
    def delta_mb(self) -> Optional[float]:
        if self.start is None or self.peak is None:
            return None
        return (self.peak - self.start) / 2 ** 20


def _max_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2 ** 20


# =============================================================================================
# the runner
# =============================================================================================
def _as_tuple(value: Iterable[Any]) -> tuple:
    """attrs converter (typed; cachekit.types.as_tuple would import torch)."""
    return tuple(value)


@attrs.frozen(kw_only=True)
class BenchOptions:
    """Everything ``cachekit bench`` needs (the parsed command line, resolved)."""

    model: str = DEFAULT_MODEL
    policies: tuple = attrs.field(default=DEFAULT_POLICIES, converter=_as_tuple)
    presets: Optional[tuple] = attrs.field(default=None)
    sweeps: tuple = attrs.field(default=(), converter=_as_tuple)
    overrides: dict = attrs.field(factory=dict)
    seeds: tuple = attrs.field(default=DEFAULT_SEEDS, converter=_as_tuple)
    schedules: tuple = attrs.field(default=("skyreels",), converter=_as_tuple)
    repeats: int = DEFAULT_REPEATS
    quick: bool = False
    frames: Optional[int] = None
    steps: Optional[int] = None
    sampler_set: dict = attrs.field(factory=dict)
    engine_set: dict = attrs.field(factory=dict)
    threads: Optional[int] = None
    out: str = DEFAULT_OUT
    fresh: bool = False
    progress: bool = True
    command: str = ""

    def __attrs_post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(invalid_value("--repeats", "an int >= 1", self.repeats))
        if not self.seeds:
            raise ConfigError(invalid_value("--seeds", "at least one seed", self.seeds))
        if not self.policies:
            raise ConfigError(invalid_value("--policies", "at least one policy", self.policies))
        for s in self.schedules:
            if s not in ("skyreels", "magi"):
                raise ConfigError(invalid_value("--schedule", "skyreels and/or magi", s))


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_restore(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_restore(v) for v in value]
    return value


def row_key(row: dict) -> tuple[str, str, int, str]:
    """A row's identity: (policy, setting tag, seed, schedule)."""
    return (row["policy"], row["tag"], int(row["seed"]), row["schedule"])


def row_id(policy: str, tag: str, seed: int, schedule: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "", f"{schedule}__{policy}__{tag}__s{seed}")
    return safe


def _median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _generate(adapter: Any, cond: Any, uncond: Any, config: Any, engine: Any, seed: int) -> Any:
    """One generation (tests patch this to count model runs)."""
    from .sampling import generate

    return generate(adapter, cond, uncond=uncond, config=config, engine=engine, seed=seed)


def _environment() -> dict[str, Any]:
    import platform

    import torch

    from . import __version__

    commit = None
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cachekit": __version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": commit, "cuda": torch.cuda.is_available()}


class _Context:
    """Per-invocation state of the runner: adapter, samplers, conditions, baseline FLOPs."""

    def __init__(self, opts: BenchOptions, registry: Registry, adapter: Any) -> None:
        from .config import EngineConfig
        from .metrics import block_cost
        from .sampling import SamplerConfig

        self.opts, self.registry, self.adapter = opts, registry, adapter
        default = getattr(adapter, "default_sampler", None)
        # Without the adapter's own defaults: one window of the model's longest length.
        base = default() if default is not None else \
            SamplerConfig(num_frames=adapter.spec.max_frames)
        changes: dict[str, Any] = dict(opts.sampler_set)
        if opts.frames is not None:
            changes["num_frames"] = opts.frames
        if opts.steps is not None:
            changes["num_steps"] = opts.steps
        base = base.evolve(**changes) if changes else base
        self.samplers = {s: base.evolve(schedule=s) for s in opts.schedules}
        self.engine_config = EngineConfig().evolve(**opts.engine_set) if opts.engine_set \
            else EngineConfig()
        self.cost, self.flops_source = block_cost(adapter)
        self._conds: dict[int, tuple] = {}
        self._baseline_flops: dict[tuple[str, str], Any] = {}
        self.warm: set[str] = set()

    def cond(self, seed: int) -> tuple:
        if seed not in self._conds:
            self._conds[seed] = self.adapter.encode_prompt(None, seed=seed, batch=1)
        return self._conds[seed]

    def branches(self, cfg: Any, uncond: Any) -> list[str]:
        return ["cond"] if (uncond is None or cfg.guidance_scale == 1.0) else ["cond", "uncond"]

    def baseline_flops(self, schedule: str, mode: str, uncond: Any) -> Any:
        from .metrics import generation_flops

        key = (schedule, mode)
        if key not in self._baseline_flops:
            cfg = self.samplers[schedule]
            self._baseline_flops[key] = generation_flops(
                self.adapter.spec, cfg, self.cost, branches=self.branches(cfg, uncond),
                mode=mode)
        return self._baseline_flops[key]


def _bench_row(ctx: _Context, setting: Setting, seed: int, schedule: str,
               tick: Callable[[], None]) -> tuple[dict, dict]:
    """Run one row; returns (row, artefacts) where artefacts hold frames and recompute maps."""
    import numpy as np

    from .engine import CacheEngine
    from .metrics import compare_videos, generation_flops

    opts, adapter, spec = ctx.opts, ctx.adapter, ctx.adapter.spec
    cfg = ctx.samplers[schedule]
    cond, uncond, prompt = ctx.cond(seed)
    rec = RecordingPolicy(ctx.registry.create_policy(setting.policy, setting.config))
    engine = CacheEngine(rec, config=ctx.engine_config, registry=ctx.registry)
    cfgs = {"vanilla": cfg.evolve(mode="vanilla"), "chunked": cfg.evolve(mode="chunked"),
            "policy": cfg.evolve(mode=setting.mode)}
    if schedule not in ctx.warm:  # untimed warm-up: first-call allocations, lazy caches
        for name in ("chunked", "vanilla"):
            _generate(adapter, cond, uncond, cfgs[name], None, seed)
        ctx.warm.add(schedule)

    times: dict[str, list[float]] = {k: [] for k in _RUNS}
    rss: dict[str, list[Optional[float]]] = {k: [] for k in _RUNS}
    results: dict[str, Any] = {}
    for r in range(opts.repeats):
        order = _RUNS[r % 3:] + _RUNS[:r % 3]   # rotate: no run always goes first
        for name in order:
            if name == "policy":
                rec.reset()
            with _PeakRss() as mem:
                t0 = time.perf_counter()
                res = _generate(adapter, cond, uncond, cfgs[name],
                                engine if name == "policy" else None, seed)
                dt = time.perf_counter() - t0
            times[name].append(dt)
            rss[name].append(mem.delta_mb)
            results[name] = res
            tick()

    stats = results["policy"].stats
    frames = {k: np.asarray(adapter.decode(v.video))[0] for k, v in results.items()}
    fid = compare_videos(frames["policy"], frames["vanilla"])
    lossless = compare_videos(frames["chunked"], frames["vanilla"])
    fl_v = ctx.baseline_flops(schedule, "vanilla", uncond)
    fl_c = ctx.baseline_flops(schedule, "chunked", uncond)
    branches = sorted({r.branch for r in stats.records}) or ctx.branches(cfg, uncond)
    fl_p = generation_flops(spec, cfgs["policy"], ctx.cost, branches=branches,
                            mode=setting.mode, records=stats.records)
    sp_c = _median(c / p for c, p in zip(times["chunked"], times["policy"]))
    sp_v = _median(v / p for v, p in zip(times["vanilla"], times["policy"]))
    flop_sp_c = _ratio(fl_c.flops, fl_p.flops)
    flop_sp_v = _ratio(fl_v.flops, fl_p.flops)
    # Efficiency against the uncached run of the policy's own execution (chunked for chunk
    # policies: the reuse layer alone; vanilla for window policies such as teacache).
    own = (sp_c, flop_sp_c) if setting.mode == "chunked" else (sp_v, flop_sp_v)
    cbs = cfg.causal_block_size or spec.chunk_frames
    freq, calls = rec.frequency(cbs)

    def peak(xs: list[Optional[float]]) -> Optional[float]:
        vals = [x for x in xs if x is not None]
        return max(vals) if vals else None

    row = {
        "policy": setting.policy, "setting": setting.label, "tag": setting.tag,
        "config": setting.config.to_dict(), "mode": setting.mode, "schedule": schedule,
        "seed": seed, "prompt": prompt, "repeats": opts.repeats,
        "wall_s": _median(times["policy"]), "chunked_s": _median(times["chunked"]),
        "vanilla_s": _median(times["vanilla"]),
        "wall_s_all": times["policy"], "chunked_s_all": times["chunked"],
        "vanilla_s_all": times["vanilla"],
        "speedup_vs_chunked": sp_c, "speedup_vs_vanilla": sp_v,
        "chunked_speedup_vs_vanilla": _median(
            v / c for v, c in zip(times["vanilla"], times["chunked"])),
        "flops": fl_p.flops, "flops_chunked": fl_c.flops, "flops_vanilla": fl_v.flops,
        "flops_context": fl_p.context_flops, "token_passes": fl_p.tokens,
        "flop_speedup_vs_chunked": flop_sp_c,
        "flop_speedup_vs_vanilla": flop_sp_v,
        "flops_source": ctx.flops_source,
        "computed_token_fraction": stats.computed_token_fraction,
        "decisions": stats.decisions, "recomputes": dict(stats.recomputes),
        "evictions": stats.evictions,
        "efficiency": _ratio(*own),
        "block_time_s": stats.block_time_s, "overhead_s": stats.overhead_s,
        "engine_runtime_s": stats.runtime_s,
        "peak_cache_bytes": stats.peak_bytes,
        "rss_peak_delta_mb": peak(rss["policy"]),
        "rss_peak_delta_mb_chunked": peak(rss["chunked"]),
        "rss_peak_delta_mb_vanilla": peak(rss["vanilla"]),
        "max_rss_mb": _max_rss_mb(),
        "psnr": fid["psnr"], "ssim": fid["ssim"], "lpips": None,
        "mse": fid["mse"], "max_abs_diff": fid["max_abs_diff"],
        "ssim_window": fid["ssim_window"],
        "lossless_psnr": lossless["psnr"], "lossless_max_abs_diff": lossless["max_abs_diff"],
        "command": opts.command,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return row, {"frames": frames, "freq": freq, "calls": calls, "cbs": cbs}


def _setting_order(opts: BenchOptions, settings: Sequence[Setting]) -> list[tuple]:
    return [(sch, seed, s) for sch in opts.schedules for seed in opts.seeds for s in settings]


def _check_compatible(meta: dict, new: dict, out: Path) -> None:
    problems = []
    if meta.get("model") != new["model"]:
        problems.append(f"model {meta.get('model')!r} (now {new['model']!r})")
    for sch, cfg in new["samplers"].items():
        old = meta.get("samplers", {}).get(sch)
        if old is not None and old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            problems.append(f"{sch} sampler settings {diff}")
    if meta.get("engine") not in (None, new["engine"]):
        problems.append("engine settings")
    if problems:
        raise ConfigError(
            f"--out {out}: it holds a benchmark with other {', '.join(problems)}; its rows "
            f"cannot be resumed. Use another --out, or --fresh to discard them.")


def load_results(out: str | Path) -> dict:
    """``{"meta", "rows", ...}`` of a bench folder (rows from rows.jsonl when present)."""
    out = Path(out)
    doc: dict[str, Any] = {"meta": {}, "rows": []}
    if (out / RESULTS_JSON).is_file():
        doc = _json_restore(json.loads((out / RESULTS_JSON).read_text()))
    if (out / ROWS_JSONL).is_file():
        rows = {}
        for line in (out / ROWS_JSONL).read_text().splitlines():
            if line.strip():
                row = _json_restore(json.loads(line))
                rows[row_key(row)] = row  # a later line replaces an earlier one
        doc["rows"] = list(rows.values())
    return doc


def _write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    doc = {"schema": SCHEMA, "meta": meta, "rows": rows, "summary": summarize(rows, meta)}
    tmp = out / (RESULTS_JSON + ".tmp")
    tmp.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    tmp.replace(out / RESULTS_JSON)
    _write_csv(out / RESULTS_CSV, rows)


_CSV_COLUMNS = [
    "schedule", "policy", "setting", "tag", "mode", "seed", "repeats", "wall_s", "chunked_s",
    "vanilla_s", "speedup_vs_vanilla", "speedup_vs_chunked", "chunked_speedup_vs_vanilla",
    "flops", "flops_chunked", "flops_vanilla", "flop_speedup_vs_vanilla",
    "flop_speedup_vs_chunked", "flops_source", "computed_token_fraction", "efficiency",
    "block_time_s", "overhead_s", "peak_cache_bytes", "rss_peak_delta_mb", "max_rss_mb",
    "psnr", "ssim", "lpips", "lossless_psnr", "prompt",
]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_CSV_COLUMNS)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in _CSV_COLUMNS])


def run_benchmark(opts: BenchOptions, *, registry: Optional[Registry] = None,
                  adapter: Any = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a benchmark into ``opts.out``; returns the results document.

    ``adapter`` overrides the registry's adapter for ``opts.model`` (e.g. a model built in
    Python); it is still recorded under ``opts.model``.
    """
    import torch

    from .plugins import get_registry

    registry = registry if registry is not None else get_registry()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if adapter is None:
        adapter = registry.create_adapter(opts.model)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(opts, registry, adapter)
    settings = expand_settings(registry, opts.policies, presets=opts.presets,
                               sweeps=opts.sweeps, overrides=opts.overrides, adapter=adapter)
    meta_new: dict[str, Any] = {
        "model": opts.model, "policies": list(opts.policies),
        "samplers": {s: c.to_dict() for s, c in ctx.samplers.items()},
        "engine": ctx.engine_config.to_dict(), "flops_source": ctx.flops_source,
        "lpips_reason": _lpips_reason(),
    }
    if opts.fresh:
        for name in (ROWS_JSONL, RESULTS_JSON, RESULTS_CSV):
            (out / name).unlink(missing_ok=True)
    old = load_results(out)
    if old.get("meta") and old.get("rows"):
        _check_compatible(old["meta"], meta_new, out)
    elif not old.get("rows"):
        old = {"meta": {}, "rows": []}
    rows = {row_key(r): r for r in old.get("rows", [])}
    meta = dict(old.get("meta") or {})
    meta.update({k: v for k, v in meta_new.items() if k != "samplers"})
    meta["samplers"] = {**meta.get("samplers", {}), **meta_new["samplers"]}
    meta["policies"] = list(dict.fromkeys(list(meta.get("policies", [])) + list(opts.policies)))
    meta["environment"] = _environment()
    meta["schema"] = SCHEMA
    invocation = {"command": opts.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "seeds": list(opts.seeds), "schedules": list(opts.schedules),
                  "repeats": opts.repeats, "quick": opts.quick,
                  "settings": [{"policy": s.policy, "label": s.label, "tag": s.tag,
                                "mode": s.mode} for s in settings]}
    meta["invocations"] = list(meta.get("invocations", [])) + [invocation]
    meta["command"] = opts.command

    todo = [(sch, seed, s) for sch, seed, s in _setting_order(opts, settings)
            if (s.policy, s.tag, seed, sch) not in rows]
    skipped = len(_setting_order(opts, settings)) - len(todo)
    if skipped:
        log(f"resuming: {skipped} finished row(s) in {out} are kept, {len(todo)} to run")
    bar = None
    if opts.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * opts.repeats * len(_RUNS), unit="run", desc="bench",
                   file=sys.stderr, leave=False)
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)
    _write_results(out, meta, list(rows.values()))
    new_rows = 0
    try:
        with torch.inference_mode():
            for sch, seed, setting in todo:
                rid = row_id(setting.policy, setting.tag, seed, sch)
                if bar is not None:
                    bar.set_postfix_str(rid, refresh=False)
                row, art = _bench_row(ctx, setting, seed, sch, tick)
                row["id"] = rid
                _save_artefacts(out, row, art, first_seed=(seed == opts.seeds[0]), ctx=ctx)
                rows[row_key(row)] = row
                with open(out / ROWS_JSONL, "a") as fh:
                    fh.write(json.dumps(_json_safe(row)) + "\n")
                new_rows += 1
                _write_results(out, meta, _ordered(list(rows.values()), meta))
    finally:
        if bar is not None:
            bar.close()
    invocation["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    invocation["rows_added"] = new_rows
    ordered = _ordered(list(rows.values()), meta)
    _write_results(out, meta, ordered)
    write_figures(out, load_results(out))
    return load_results(out)


def _save_artefacts(out: Path, row: dict, art: dict, *, first_seed: bool, ctx: _Context) -> None:
    import numpy as np

    from .plots import recompute_overlay_gif

    spec = ctx.adapter.spec
    frames = art["frames"]
    (out / "videos").mkdir(exist_ok=True)
    np.save(out / "videos" / f"{row['id']}.npy", frames["policy"].astype(np.float32))
    ref = out / "videos" / f"ref_{row['schedule']}_s{row['seed']}_vanilla.npy"
    if not ref.exists():
        np.save(ref, frames["vanilla"].astype(np.float32))
        np.save(out / "videos" / f"ref_{row['schedule']}_s{row['seed']}_chunked.npy",
                frames["chunked"].astype(np.float32))
    row["video"] = f"videos/{row['id']}.npy"
    row["reference"] = f"videos/ref_{row['schedule']}_s{row['seed']}_vanilla.npy"
    freq, calls, cbs = art["freq"], art["calls"], art["cbs"]
    ht, wt = spec.token_grid
    row["recompute"] = None
    if freq.size and freq.shape[1] == cbs * ht * wt:
        (out / "recompute").mkdir(exist_ok=True)
        grid = freq.reshape(freq.shape[0], cbs, ht, wt)
        np.savez_compressed(out / "recompute" / f"{row['id']}.npz", freq=grid, calls=calls)
        row["recompute"] = f"recompute/{row['id']}.npz"
        # Overlay on the video: only where model frames are video frames (one window, no
        # temporal VAE) and tokens tile the decoded pixels.
        video = frames["policy"]
        f, h, w = video.shape[:3]
        if first_seed and f == grid.shape[0] * cbs and h % ht == 0 and w % wt == 0:
            per_frame = grid.reshape(-1, ht, wt).repeat(h // ht, axis=1).repeat(w // wt, axis=2)
            name = f"{row['tag']}" + ("" if row["schedule"] == "skyreels"
                                      else f"_{row['schedule']}")
            recompute_overlay_gif(out / "overlays" / f"{name}.gif", video, per_frame,
                                  upscale=max(1, 128 // max(h, w)))
            row["overlay"] = f"overlays/{name}.gif"


def _ordered(rows: list[dict], meta: dict) -> list[dict]:
    """Rows by schedule, policy (as listed), setting (as first run: presets or sweep values in
    the order given) and seed."""
    pol = {p: i for i, p in enumerate(meta.get("policies", []))}
    order: dict[tuple[str, str], int] = {}
    for inv in meta.get("invocations", []):
        for s in inv.get("settings", []):
            order.setdefault((s["policy"], s["tag"]), len(order))
    return sorted(rows, key=lambda r: (r["schedule"], pol.get(r["policy"], len(pol)),
                                       order.get((r["policy"], r["tag"]), len(order)),
                                       r["tag"], r["seed"]))


def _lpips_reason() -> str:
    from .metrics import LPIPS_UNAVAILABLE

    return LPIPS_UNAVAILABLE


# =============================================================================================
# aggregation
# =============================================================================================
def _mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    if any(math.isinf(x) for x in xs):
        return (math.inf if all(math.isinf(x) for x in xs) else
                statistics.mean(x for x in xs if math.isfinite(x))), None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict], meta: Optional[dict] = None) -> list[dict]:
    """One entry per (schedule, policy, tag): means over seeds (PSNR, SSIM: mean and std;
    speedups and efficiency: median over seeds of the per-seed medians)."""
    groups: dict[tuple, list[dict]] = {}
    for r in _ordered(rows, meta or {}):
        groups.setdefault((r["schedule"], r["policy"], r["tag"]), []).append(r)
    out = []
    for (sch, pol, tag), rs in groups.items():
        psnr_m, psnr_s = _mean_std([r["psnr"] for r in rs])
        ssim_m, ssim_s = _mean_std([r["ssim"] for r in rs])
        finite_psnr = [r["psnr"] for r in rs if math.isfinite(r["psnr"])]
        out.append({
            "schedule": sch, "policy": pol, "tag": tag, "setting": rs[0]["setting"],
            "mode": rs[0]["mode"], "seeds": [r["seed"] for r in rs],
            "speedup_vs_vanilla": _median(r["speedup_vs_vanilla"] for r in rs),
            "speedup_vs_chunked": _median(r["speedup_vs_chunked"] for r in rs),
            "chunked_speedup_vs_vanilla": _median(r["chunked_speedup_vs_vanilla"] for r in rs),
            "flop_speedup_vs_vanilla": _median(r["flop_speedup_vs_vanilla"] for r in rs),
            "flop_speedup_vs_chunked": _median(r["flop_speedup_vs_chunked"] for r in rs),
            "computed_token_fraction": statistics.mean(r["computed_token_fraction"] for r in rs),
            "efficiency": _median(r["efficiency"] for r in rs),
            "wall_s": _median(r["wall_s"] for r in rs),
            "block_time_s": _median(r["block_time_s"] for r in rs),
            "overhead_s": _median(r["overhead_s"] for r in rs),
            "peak_cache_bytes": max(r["peak_cache_bytes"] for r in rs),
            "rss_peak_delta_mb": max((r["rss_peak_delta_mb"] for r in rs
                                      if r.get("rss_peak_delta_mb") is not None), default=None),
            "psnr": psnr_m, "psnr_std": psnr_s, "psnr_min": min(finite_psnr, default=None),
            "ssim": ssim_m, "ssim_std": ssim_s, "lpips": None,
            "lossless_psnr": _mean_std([r["lossless_psnr"] for r in rs])[0],
            "flops_source": rs[0]["flops_source"],
        })
    return out


# =============================================================================================
# figures
# =============================================================================================
def _heatmap_name(tag: str, schedule: str) -> str:
    return f"heatmap_{tag}.png" if schedule == "skyreels" else f"heatmap_{tag}_{schedule}.png"


def write_figures(out: str | Path, doc: dict) -> list[Path]:
    """``pareto.png`` (one per schedule beyond skyreels) and ``heatmap_<tag>.png`` per
    setting, from the rows and their ``recompute/*.npz``; returns the files written."""
    import numpy as np

    from .plots import PALETTE, Marker, Series, recompute_heatmap, xy_plot

    out = Path(out)
    rows, meta = doc.get("rows", []), doc.get("meta", {})
    summary = summarize(rows, meta)
    written = []
    model = meta.get("model", "?")
    for sch in sorted({s["schedule"] for s in summary}):
        ss = [s for s in summary if s["schedule"] == sch]
        series = []
        for i, pol in enumerate(dict.fromkeys(s["policy"] for s in ss)):
            # joined in setting order (presets or sweep values as given), not sorted by speed
            pts = [(s["speedup_vs_vanilla"], s["psnr"], s["setting"]) for s in ss
                   if s["policy"] == pol]
            series.append(Series(pol, [(x, y) for x, y, _ in pts], PALETTE[i % len(PALETTE)],
                                 labels=[lab for _, _, lab in pts]))
        c_sp = _median(s["chunked_speedup_vs_vanilla"] for s in ss)
        lossless = _median(s["lossless_psnr"] for s in ss if s["lossless_psnr"] is not None)
        markers = [Marker(1.0, math.inf, "uncached vanilla (reference)", (0, 0, 0)),
                   Marker(c_sp, lossless if lossless == lossless else math.inf,
                          "uncached chunked", (160, 160, 160))]
        cfg = meta.get("samplers", {}).get(sch, {})
        notes = [f"model {model}, schedule {sch}, {cfg.get('num_frames')} frames, "
                 f"{cfg.get('num_steps')} steps; speedup = median wall-time ratio, PSNR = "
                 f"mean over seeds vs uncached vanilla",
                 "points above the dashed line: PSNR = inf (identical videos)"]
        name = PARETO_PNG if sch == "skyreels" else f"pareto_{sch}.png"
        written.append(xy_plot(out / name, series, markers=markers,
                               title="Wall-time speedup vs fidelity",
                               xlabel="wall-time speedup vs uncached vanilla (x)",
                               ylabel="PSNR vs uncached (dB)", notes=notes, x_min=0.0))
    # heatmaps: aggregate the recompute maps of every seed of a setting
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("recompute") and (out / r["recompute"]).is_file():
            groups.setdefault((r["schedule"], r["tag"]), []).append(r)
    for (sch, tag), rs in groups.items():
        acc = None
        total = None
        for r in rs:
            with np.load(out / r["recompute"]) as z:
                freq, calls = z["freq"], z["calls"]
            weighted = freq * calls[:, None, None, None]
            if acc is None or acc.shape != weighted.shape:
                if acc is not None:
                    continue  # another geometry; keep the first
                acc, total = weighted.copy(), calls.astype(float).copy()
            else:
                acc += weighted
                total += calls
        assert acc is not None and total is not None
        freq = acc / np.maximum(total, 1)[:, None, None, None]
        r0 = rs[0]
        title = f"Recompute frequency: {r0['policy']} {r0['setting']} ({tag})"
        sub = (f"{model}, {sch}; seeds {sorted(r['seed'] for r in rs)}; fraction of calls "
               f"(steps x branches x windows x seeds) in which each token ran; computed-token "
               f"fraction {statistics.mean(r['computed_token_fraction'] for r in rs):.3f}")
        written.append(recompute_heatmap(out / _heatmap_name(tag, sch), freq, title=title,
                                         subtitle=sub, calls=[int(c) for c in total]))
    return written


# =============================================================================================
# report (README table, docs page)
# =============================================================================================
def replace_between_markers(text: str, body: str, *, start: str = README_START,
                            end: str = README_END, name: str = "README") -> str:
    """``text`` with everything between the ``start`` and ``end`` markers replaced by
    ``body``; the markers and everything outside them are kept byte for byte."""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0 or text.count(start) != 1 or text.count(end) != 1:
        raise ConfigError(invalid_value(
            f"{name} markers", f"exactly one {start} followed by one {end}",
            f"{text.count(start)} start and {text.count(end)} end marker(s)",
            "Add the two markers on their own lines where the results table belongs."))
    return text[:i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]


def _x(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}x"


def _f(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary_table(summary: list[dict], *, std: bool = False) -> str:
    """The main table of one schedule: the two uncached baselines, then every setting."""
    header = ["policy", "setting", "execution", "wall speedup vs vanilla",
              "wall speedup vs chunked", "FLOP speedup vs vanilla", "FLOP speedup vs chunked",
              "computed tokens", "PSNR (dB)", "SSIM", "efficiency"]
    c_sp = _median(s["chunked_speedup_vs_vanilla"] for s in summary)
    fl_cv = _median(s["flop_speedup_vs_vanilla"] / s["flop_speedup_vs_chunked"]
                    for s in summary if s["flop_speedup_vs_chunked"])
    lossless = _median(s["lossless_psnr"] for s in summary if s["lossless_psnr"] is not None)
    rows = [["uncached", "-", "vanilla", _x(1.0), _x(_ratio(1.0, c_sp)), _x(1.0),
             _x(_ratio(1.0, fl_cv)), "1.000", "reference", "1.0000", "-"],
            ["uncached", "-", "chunked", _x(c_sp), _x(1.0), _x(fl_cv), _x(1.0), "1.000",
             _f(lossless), "-", "-"]]
    for s in summary:
        psnr = _f(s["psnr"]) + (f" ± {s['psnr_std']:.2f}" if std and s["psnr_std"] else "")
        ssim = _f(s["ssim"], 4) + (f" ± {s['ssim_std']:.4f}" if std and s["ssim_std"] else "")
        rows.append([f"`{s['policy']}`", s["setting"], s["mode"], _x(s["speedup_vs_vanilla"]),
                     _x(s["speedup_vs_chunked"]), _x(s["flop_speedup_vs_vanilla"]),
                     _x(s["flop_speedup_vs_chunked"]), _f(s["computed_token_fraction"], 3),
                     psnr, ssim, _f(s["efficiency"])])
    return _md_table(header, rows, "lllrrrrrrrr")


def _setup_line(meta: dict, schedule: str) -> str:
    cfg = meta.get("samplers", {}).get(schedule, {})
    inv = (meta.get("invocations") or [{}])[-1]
    env = meta.get("environment", {})
    seeds = sorted({s for i in meta.get("invocations", []) for s in i.get("seeds", [])})
    return (f"model `{meta.get('model')}`, schedule `{schedule}`, {cfg.get('num_frames')} "
            f"frames, {cfg.get('num_steps')} steps, ar_step {cfg.get('ar_step')}, guidance "
            f"{cfg.get('guidance_scale')}; seeds {seeds}, {inv.get('repeats')} repeat(s); "
            f"torch {env.get('torch')} on {env.get('cpu_count')} CPU core(s), "
            f"{env.get('torch_threads')} thread(s)")


def _commands(meta: dict, rows: list[dict]) -> list[str]:
    cmds = [str(r["command"]) for r in rows if r.get("command")]
    return list(dict.fromkeys(cmds)) or [meta.get("command") or "(unknown)"]


def _toy_note(meta: dict) -> str:
    if meta.get("model") == "toy":
        return ("\n**These numbers come from the `toy` model (random weights, 4x4-pixel frames): "
                "they show the format only, not what caching does on a real model.**\n")
    return ""


def readme_section(doc: dict, *, docs_link: str = "docs/benchmarks.md",
                   report_dir: str = "out/bench") -> str:
    meta, rows = doc.get("meta", {}), doc.get("rows", [])
    summary = summarize(rows, meta)
    if not summary:
        return ("No benchmark rows yet: run `cachekit bench`, then "
                f"`cachekit report {report_dir}`.")
    parts = ["<!-- generated by `cachekit report`; edits between the markers are overwritten -->",
             _toy_note(meta)]
    for sch in dict.fromkeys(s["schedule"] for s in summary):
        ss = [s for s in summary if s["schedule"] == sch]
        parts.append(f"{_setup_line(meta, sch)}.\n")
        parts.append(_summary_table(ss))
        parts.append("")
    cmds = _commands(meta, rows)
    parts.append("Made by " + "; ".join(f"`{c}`" for c in cmds) +
                 f" (table: `cachekit report {report_dir}`). Wall speedups are medians of "
                 "per-repeat ratios, each repeat timing the policy and both uncached executions "
                 "back to back; FLOPs are analytic (source: "
                 f"{summary[0]['flops_source']}); PSNR/SSIM are against the uncached vanilla "
                 "video of the same seed; efficiency = wall speedup / FLOP speedup, both against "
                 "the uncached run of the same execution. LPIPS is not computed (it needs downloaded weights). Figures, "
                 f"per-seed rows and the protocol: [{docs_link}]({docs_link}).")
    return "\n".join(p for p in parts if p is not None)


def _time_table(summary: list[dict]) -> str:
    rows = []
    for s in summary:
        other = s["wall_s"] - s["block_time_s"] - s["overhead_s"]
        rows.append([f"`{s['policy']}`", s["setting"], _f(s["wall_s"], 3),
                     _f(s["block_time_s"], 3), _f(s["overhead_s"], 4), _f(other, 3),
                     _f(100 * s["overhead_s"] / s["wall_s"] if s["wall_s"] else None, 1),
                     _f(s["efficiency"])])
    return _md_table(["policy", "setting", "wall (s)", "in blocks (s)", "cachekit overhead (s)",
                      "rest: embed, head, sampler (s)", "overhead (% of wall)", "efficiency"],
                     rows, "llrrrrrr")


def _rows_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append([f"`{r['policy']}`", r["setting"], str(r["seed"]), _f(r["wall_s"], 3),
                    _f(r["chunked_s"], 3), _f(r["vanilla_s"], 3), _x(r["speedup_vs_chunked"]),
                    _x(r["flop_speedup_vs_chunked"]), _f(r["computed_token_fraction"], 3),
                    _f(r["psnr"]), _f(r["ssim"], 4), _f(r["lossless_psnr"]),
                    _f(r["peak_cache_bytes"] / 2 ** 20, 2),
                    _f(r.get("rss_peak_delta_mb"), 1), _f(r.get("max_rss_mb"), 0)])
    return _md_table(["policy", "setting", "seed", "wall (s)", "chunked (s)", "vanilla (s)",
                      "wall x chunked", "FLOPs x chunked", "computed tokens", "PSNR", "SSIM",
                      "lossless PSNR", "peak cache (MiB)", "RSS peak delta (MiB)",
                      "max RSS (MiB)"], out, "lllrrrrrrrrrrrr")


def extract_reading(text: str) -> Optional[str]:
    """The hand-written text between the reading markers of an existing page (None if the
    page has no such block)."""
    i = text.find(READING_START)
    j = text.find(READING_END, i + len(READING_START)) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[i + len(READING_START):j].strip("\n")


def docs_page(doc: dict, *, figures: dict[str, str], report_dir: str,
              reading: Optional[str] = None) -> str:
    """The text of ``docs/benchmarks.md``; ``figures`` maps figure file names to the links
    the page uses; ``reading`` is the hand-written interpretation kept between the reading
    markers (a placeholder when None)."""
    meta, rows = doc.get("meta", {}), doc.get("rows", [])
    summary = summarize(rows, meta)
    env = meta.get("environment", {})
    cmds = _commands(meta, rows)
    report_cmd = f"cachekit report {report_dir}"
    made = "; ".join(f"`{c}`" for c in cmds)
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by `cachekit report`; do not edit by hand -->",
        f"Generated by `{report_cmd}` from `{report_dir}/results.json`. Rows were produced by "
        f"{made}; running that command again reproduces every number and figure here "
        "(finished rows in the folder are kept, so use a fresh `--out`).",
        _toy_note(meta),
        "## Setup",
        "",
        f"* cachekit {env.get('cachekit')} (git {env.get('git_commit')}), torch "
        f"{env.get('torch')}, Python {env.get('python')}, {env.get('platform')}",
        f"* {env.get('cpu_count')} CPU core(s), {env.get('torch_threads')} torch thread(s), "
        f"CUDA {'yes' if env.get('cuda') else 'no'}",
    ]
    for sch in dict.fromkeys(s["schedule"] for s in summary):
        lines.append(f"* {_setup_line(meta, sch)}")
    lines += [
        "",
        "## Reading",
        "",
        READING_START,
        (reading or _READING_PLACEHOLDER).strip("\n"),
        READING_END,
        "",
        "## How it is measured",
        "",
        "* **Reference**: the uncached *vanilla* generation (the whole window every iteration, "
        "as stock SkyReels-V2) of the same seed and prompt, as in FlowCache's and "
        "MotionCache's `tools/video_metrics.py`.",
        "* **Wall time**: the whole `generate` call, median over repeats. Every repeat runs "
        "uncached vanilla, uncached chunked and the policy back to back in one process, in a "
        "rotating order; a speedup is the median of the per-repeat ratios. One untimed "
        "warm-up generation per schedule comes first. Speedup *vs vanilla* includes the "
        "lossless chunked layer; *vs chunked* is the policy's own gain. `teacache` decides per "
        "window and runs in vanilla execution, so its speedup vs chunked is usually below 1.",
        "* **FLOPs**: analytic (multiply-add = 2), from the engine's per-call records on the "
        "schedule's rows (`cachekit.metrics.generation_flops`). Vanilla: every chunk of the "
        "window at every iteration (dense masked attention). Chunked: the computed tokens of "
        "each active chunk over the keys of chunks up to it, plus one context K/V refresh of "
        "a finished or prefix chunk whenever its state changes. Per-forward cost: "
        f"**{(summary[0]['flops_source'] if summary else '?')}** (`model` = the model's own "
        "`block_flops`; `generic` = `num_blocks * (24 q D^2 + 4 q kv D)` from the ModelSpec). "
        "Embedding, head and norms are not counted.",
        "* **Computed tokens**: token-steps the policy computed / token-steps it decided "
        "(context refreshes excluded).",
        "* **Efficiency** = wall speedup / FLOP speedup, both against the uncached run of the "
        "policy's own execution (chunked; vanilla for `teacache`): 1 means every saved FLOP "
        "became saved time.",
        "* **PSNR**: one MSE over all frames, pixels and channels, data range 1. **SSIM**: "
        "11x11 Gaussian window (sigma 1.5), torchmetrics' default, averaged over frames "
        "(smaller frames use the largest odd window that fits). Both on the decoded float "
        "frames (no 8-bit mp4 round trip, unlike the papers). Mean ± std over seeds. "
        f"**LPIPS**: not computed. {meta.get('lpips_reason', '')}.",
        "* **Memory**: `peak cache` = the residual store's peak bytes; `RSS peak delta` = "
        "the resident set sampled every 20 ms during the policy run, peak minus start (coarse: "
        "allocator caching shows up here); `max RSS` = the process high-water mark "
        "(`getrusage`), which includes the model and every earlier run.",
        "* **Lossless PSNR**: uncached chunked vs uncached vanilla; it checks the lossless "
        "layer (float reordering only).",
        "",
    ]
    for sch in dict.fromkeys(s["schedule"] for s in summary):
        ss = [s for s in summary if s["schedule"] == sch]
        rs = [r for r in rows if r["schedule"] == sch]
        pareto = PARETO_PNG if sch == "skyreels" else f"pareto_{sch}.png"
        lines += [f"## Results: `{sch}` schedule", "", _summary_table(ss, std=True), ""]
        if pareto in figures:
            lines += [f"![speedup vs PSNR]({figures[pareto]})", "",
                      f"Figure: wall-time speedup vs PSNR per setting, one curve per policy "
                      f"joining its settings in the order given (stars: the uncached "
                      f"executions). Made by {made} "
                      f"(redrawn by `{report_cmd}`).", ""]
        lines += ["### Where the time goes", "",
                  "Median over seeds of the policy run: time inside the model's blocks "
                  "(`CacheStats.block_time_s`), cachekit's own per-call overhead "
                  "(`overhead_s`: decisions, residual bookkeeping, gathers) and the rest "
                  "(embedding, head, sampler).", "", _time_table(ss), ""]
        lines += ["### Recompute maps", ""]
        for s in ss:
            name = _heatmap_name(s["tag"], sch)
            if name in figures:
                lines += [f"**`{s['policy']}` {s['setting']}** (`{s['tag']}`):", "",
                          f"![recompute frequency {s['tag']}]({figures[name]})", ""]
        lines += [f"Each panel: one frame of one chunk, its token grid coloured by the fraction "
                  f"of calls in which the token was recomputed (steps x branches x windows x "
                  f"seeds). Made by {made} (redrawn by `{report_cmd}`); the overlay GIFs are "
                  f"in `{report_dir}/overlays/`.", "",
                  "### Per-seed rows", "", _rows_table(rs), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: str | Path, *, readme: Optional[str | Path] = "README.md",
                 docs: Optional[str | Path] = "docs/benchmarks.md",
                 report_dir: Optional[str] = None) -> dict[str, Path]:
    """Regenerate figures, the README table (between the markers) and the docs page from
    ``out/results.json``. Figures are copied into ``<docs folder>/<docs stem>/``."""
    import shutil

    out = Path(out)
    if not (out / RESULTS_JSON).is_file() and not (out / ROWS_JSONL).is_file():
        raise ConfigError(invalid_value("report folder", f"a `cachekit bench --out` folder "
                                        f"with {RESULTS_JSON}", str(out)))
    doc = load_results(out)
    report_dir = report_dir or str(out)
    written: dict[str, Path] = {}
    figs = write_figures(out, doc)
    for f in figs:
        written[f.name] = f
    docs_path = Path(docs) if docs else None
    if readme:
        readme_path = Path(readme)
        if not readme_path.is_file():
            raise ConfigError(invalid_value("--readme", "an existing README file",
                                            str(readme_path),
                                            "Run from the repository root or pass --readme."))
        link = os.path.relpath(docs_path, readme_path.parent) if docs_path else \
            "docs/benchmarks.md"
        text = readme_path.read_text()
        new = replace_between_markers(text, readme_section(doc, docs_link=link.replace(
            os.sep, "/"), report_dir=report_dir), name=str(readme_path))
        readme_path.write_text(new)
        written["readme"] = readme_path
    if docs_path is not None:
        fig_dir = docs_path.parent / docs_path.stem
        fig_dir.mkdir(parents=True, exist_ok=True)
        # figures of an earlier report that this run does not make would be orphans the page
        # no longer links (and look current): remove the ones with the names reports write
        names = {f.name for f in figs}
        for old in [*fig_dir.glob("heatmap_*.png"), *fig_dir.glob("pareto*.png")]:
            if old.name not in names:
                old.unlink()
        links = {}
        for f in figs:
            shutil.copyfile(f, fig_dir / f.name)
            links[f.name] = f"{docs_path.stem}/{f.name}"
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        reading = extract_reading(docs_path.read_text()) if docs_path.is_file() else None
        docs_path.write_text(docs_page(doc, figures=links, report_dir=report_dir,
                                       reading=reading))
        written["docs"] = docs_path
    return written


# =============================================================================================
# commands
# =============================================================================================
def _bench_command(args: argparse.Namespace) -> str:
    """The canonical command line of a parsed ``bench`` invocation (stored with the rows)."""
    parts = ["cachekit"]
    for mod in getattr(args, "plugin", None) or []:
        parts += ["-p", mod]
    parts += ["bench", "--model", args.model, "--policies", args.policies]
    if args.presets:
        parts += ["--presets", args.presets]
    for item in args.sweep or []:
        parts += ["--sweep", item]
    for item in args.set or []:
        parts += ["--set", item]
    if args.seeds:
        parts += ["--seeds", args.seeds]
    parts += ["--schedule", args.schedule]
    if args.repeats is not None:
        parts += ["--repeats", str(args.repeats)]
    if args.quick:
        parts.append("--quick")
    if args.frames is not None:
        parts += ["--frames", str(args.frames)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    for item in args.sampler_set or []:
        parts += ["--sampler-set", item]
    for item in args.engine_set or []:
        parts += ["--engine-set", item]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", args.out]
    return shlex.join(parts)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    from .config import parse_overrides

    quick = bool(args.quick)
    presets = tuple(_csv_list(args.presets)) if args.presets else \
        (QUICK_PRESETS if quick and not args.sweep else None)
    seeds = tuple(_int_list(args.seeds, "--seeds")) if args.seeds else \
        (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    repeats = args.repeats if args.repeats is not None else \
        (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    return BenchOptions(
        model=args.model, policies=tuple(_csv_list(args.policies)), presets=presets,
        sweeps=tuple(parse_sweeps(args.sweep or [])),
        overrides=parse_policy_overrides(args.set or []), seeds=seeds,
        schedules=tuple(_csv_list(args.schedule)), repeats=repeats, quick=quick,
        frames=args.frames, steps=args.steps,
        sampler_set=parse_overrides(args.sampler_set or []),
        engine_set=parse_overrides(args.engine_set or []), threads=args.threads,
        out=args.out, fresh=bool(args.fresh), progress=not args.no_progress,
        command=_bench_command(args))


def _print_summary(doc: dict) -> None:
    from .cli import format_table

    summary = summarize(doc.get("rows", []), doc.get("meta", {}))
    rows = [(s["schedule"], s["policy"], s["setting"], s["mode"], _x(s["speedup_vs_vanilla"]),
             _x(s["speedup_vs_chunked"]), _x(s["flop_speedup_vs_chunked"]),
             _f(s["computed_token_fraction"], 3), _f(s["psnr"]), _f(s["ssim"], 4),
             _f(s["efficiency"]), _f(s["block_time_s"], 3), _f(s["overhead_s"], 4))
            for s in summary]
    print(format_table(rows, ("SCHEDULE", "POLICY", "SETTING", "EXEC", "xVANILLA", "xCHUNKED",
                              "FLOPSxCHUNKED", "TOKENS", "PSNR", "SSIM", "EFFICIENCY",
                              "BLOCK_S", "OVERHEAD_S")))


def _report_targets(args: argparse.Namespace) -> tuple[Optional[str], Optional[str]]:
    return (None if args.no_readme else args.readme, None if args.no_docs else args.docs)


def run_bench(args: argparse.Namespace) -> int:
    """``cachekit bench``: run (or resume) the benchmark, print the summary table."""
    if args.report_only:
        readme, docs = _report_targets(args)
        for name, path in write_report(args.out, readme=readme, docs=docs).items():
            print(f"wrote {path}")
        return 0
    from .cli import registry_from_args

    opts = options_from_args(args)
    doc = run_benchmark(opts, registry=registry_from_args(args))
    _print_summary(doc)
    meta = doc.get("meta", {})
    print(f"FLOPs: {meta.get('flops_source')} cost model"
          + (" (generic transformer estimate from the ModelSpec: the model has no "
             "block_flops)" if meta.get("flops_source") == "generic" else " (the model's "
             "block_flops)"))
    print(f"LPIPS: null. {meta.get('lpips_reason')}")
    out = Path(opts.out)
    print(f"wrote {out / RESULTS_JSON}, {out / RESULTS_CSV}, the pareto plot and recompute "
          f"heatmaps in {out}; `cachekit report {out}` updates README.md and "
          f"docs/benchmarks.md")
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    """``cachekit metrics A B``: PSNR and SSIM of A against reference B."""
    from .io import load_video
    from .metrics import compare_videos

    a, b = load_video(args.video), load_video(args.reference)
    res = compare_videos(a, b)
    if args.json:
        print(json.dumps(_json_safe(res), indent=2))
        return 0
    print(f"frames {res['frames']} x {res['height']}x{res['width']}")
    print(f"PSNR   {_f(res['psnr'], 3)} dB" + ("  (identical videos)"
                                               if math.isinf(res["psnr"]) else ""))
    print(f"SSIM   {res['ssim']:.5f}  (Gaussian window {res['ssim_window']}x"
          f"{res['ssim_window']}, sigma 1.5)")
    print(f"MSE    {res['mse']:.6g}   max |A-B| {res['max_abs_diff']:.6g}")
    print(f"LPIPS  unavailable: {res['lpips_reason']}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """``cachekit report DIR``: figures, README table and docs page from DIR/results.json."""
    readme, docs = _report_targets(args)
    written = write_report(args.dir, readme=readme, docs=docs)
    _print_summary(load_results(args.dir))
    for path in written.values():
        print(f"wrote {path}")
    return 0
