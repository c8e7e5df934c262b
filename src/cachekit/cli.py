"""The ``cachekit`` command line.

Every subcommand is one :class:`Command` listed in :data:`COMMANDS`, the single place where
subcommands are registered. A command is a name, a one-line help text, a function that adds
its options to an argparse sub-parser and a function ``run(args) -> int`` that does the work
and returns the exit status. To add a subcommand, write those two functions and append a
``Command(...)`` to :data:`COMMANDS`; ``main`` builds the parser from that list.

Exit status and errors:

* ``0`` success;
* ``2`` a usage error (argparse) or an error cachekit raises on purpose
  (:class:`~cachekit.errors.CacheKitError`: a bad setting, an unknown policy, missing weights...).
  It is printed as one line ``cachekit: error: ...`` on stderr, without a traceback;
  ``cachekit --traceback ...`` shows the traceback as well;
* ``130`` interrupted (Ctrl-C).

Any other exception is a bug and propagates with its traceback.

Helpers shared by the commands that build an engine (``generate``, ``bench``, ...):
:func:`add_policy_options` / :func:`policy_config_from_args` (``--policy``, ``--preset``,
``--config``, ``--set``), :func:`add_engine_options` / :func:`engine_config_from_args`
(``--engine-config``, ``--engine-set``), :func:`build_engine` and :func:`registry_from_args`
(honours the global ``-p/--plugin MODULE``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from . import __version__
from .errors import CacheKitError, PluginError
from .plugins import DEFAULT_MODEL

if TYPE_CHECKING:  # imported lazily at run time: `cachekit --version` must not import torch
    from .engine import CacheEngine
    from .plugins import Registry

__all__ = [
    "COMMANDS",
    "Command",
    "add_engine_options",
    "add_policy_options",
    "build_engine",
    "build_parser",
    "engine_config_from_args",
    "format_table",
    "main",
    "policy_config_from_args",
    "registry_from_args",
]

from . import bench as _bench  # noqa: E402  (imports no torch at import time)

PROG = "cachekit"


@attrs.frozen
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = attrs.field(repr=False)
    run: Callable[[argparse.Namespace], int] = attrs.field(repr=False)
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def registry_from_args(args: argparse.Namespace) -> Registry:
    """The registry for this invocation (autoloaded plugins plus every ``-p MODULE``).

    Built once per invocation and cached on ``args``.
    """
    reg = getattr(args, "_registry", None)
    if reg is not None:
        return reg
    from .plugins import Registry

    modules = []
    for name in getattr(args, "plugin", None) or ():
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise PluginError(f"-p/--plugin: could not import plugin module {name!r} ({exc}). "
                              f"Give an importable module path such as 'mypkg.plugin'.") from exc
    reg = Registry(plugins=modules)
    args._registry = reg
    return reg


def add_policy_options(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--policy NAME``, ``--preset NAME``, ``--config FILE`` and repeatable ``--set K=V``."""
    g = parser.add_argument_group("policy")
    g.add_argument("--policy", default=default, required=default is None, metavar="NAME",
                   help="registered policy name (see `cachekit plugins`)"
                        + (f"; default {default}" if default else ""))
    g.add_argument("--preset", metavar="NAME",
                   help="a named preset of the policy's config (every policy has slow and fast)")
    g.add_argument("--config", metavar="FILE",
                   help="policy config file (.toml or .json); --set overrides its values")
    g.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one policy knob, e.g. --set interval=3 (repeatable)")


def policy_config_from_args(args: argparse.Namespace, registry: Registry) -> Any:
    """The validated policy config from ``--policy/--preset/--config/--set``."""
    from .config import parse_overrides
    from .errors import ConfigError

    if args.preset and args.config:
        raise ConfigError("--preset and --config both give a whole policy config; pass one "
                          "(use --set to change single knobs)")
    reg = registry.get("policy", args.policy)
    config = reg.config.load(args.config) if args.config else None  # type: ignore[union-attr]
    overrides = parse_overrides(args.set)
    return registry.policy_config(args.policy, config, preset=args.preset, **overrides)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--engine-config FILE`` and repeatable ``--engine-set K=V`` (:class:`EngineConfig`)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--engine-config", metavar="FILE",
                   help="engine config file (.toml or .json): store, store_dtype, budget_bytes...")
    g.add_argument("--engine-set", dest="engine_set", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override one engine setting, e.g. --engine-set store_dtype=bfloat16")


def engine_config_from_args(args: argparse.Namespace) -> Any:
    """The validated :class:`~cachekit.config.EngineConfig` from the engine options."""
    from .config import EngineConfig, parse_overrides

    path = getattr(args, "engine_config", None)
    cfg = EngineConfig.load(path) if path else EngineConfig()
    overrides = parse_overrides(getattr(args, "engine_set", None) or [])
    return cfg.evolve(**overrides) if overrides else cfg


def build_engine(args: argparse.Namespace) -> CacheEngine:
    """A :class:`~cachekit.engine.CacheEngine` from the policy and engine options."""
    from .engine import CacheEngine

    registry = registry_from_args(args)
    config = policy_config_from_args(args, registry)
    engine_config = engine_config_from_args(args) if hasattr(args, "engine_set") else None
    return CacheEngine.from_name(args.policy, config=config, engine_config=engine_config,
                                 registry=registry)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# cachekit plugins
# ---------------------------------------------------------------------------------------------
def _plugins_arguments(p: argparse.ArgumentParser) -> None:
    from .plugins import KINDS

    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--kind", choices=sorted(KINDS), help="list only this kind")


def _loaded_plugins(registry: Registry) -> list[dict[str, Any]]:
    """Every plugin the registry's plugin manager holds, with its distribution and hooks."""
    pm = registry.pm
    dists = {id(plugin): f"{dist.project_name} {dist.version}"
             for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist = dists.get(id(plugin))
        if dist is None and name == "cachekit.core":
            dist = f"cachekit {__version__}"
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        out.append({"name": name, "distribution": dist, "hooks": hooks})
    return sorted(out, key=lambda d: d["name"])


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import AUTOLOAD_ENV, _autoload_disabled

    registry = registry_from_args(args)
    items = [r for r in registry.items() if args.kind is None or r.kind == args.kind]
    plugins = _loaded_plugins(registry)
    autoload = not _autoload_disabled()
    if args.json:
        doc = {"cachekit": __version__, "autoload": autoload,
               "items": [r.as_dict() for r in items], "plugins": plugins}
        print(json.dumps(doc, indent=2))
        return 0
    rows = [(r.kind, r.name, r.provider, r.distribution or "(registered explicitly)",
             r.description) for r in items]
    print(format_table(rows, ("KIND", "NAME", "PROVIDER", "DISTRIBUTION", "DESCRIPTION"))
          if rows else "(nothing registered)")
    print()
    print(format_table([(p["name"], p["distribution"] or "(registered explicitly)",
                         ", ".join(p["hooks"])) for p in plugins],
                       ("PLUGIN", "DISTRIBUTION", "HOOKS")))
    if not autoload:
        print(f"\nnote: {AUTOLOAD_ENV} is set; installed plugins were not loaded.")
    return 0



# ---------------------------------------------------------------------------------------------
# generate / calibrate
# ---------------------------------------------------------------------------------------------
def _add_sampler_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help="registered model adapter (default: refdit, the bundled model)")
    g.add_argument("--seed", type=int, default=0, help="noise and prompt seed (default 0)")
    g.add_argument("--frames", type=int, metavar="N", help="frames of the video")
    g.add_argument("--steps", type=int, metavar="N", help="denoising steps per chunk")
    g.add_argument("--schedule", choices=["skyreels", "magi"], help="sampling schedule")
    g.add_argument("--ar-step", type=int, metavar="N", help="diffusion-forcing ar_step")
    g.add_argument("--overlap", type=int, metavar="N",
                   help="overlap_history in frames for videos longer than one window")
    g.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale")
    g.add_argument("--mode", choices=["chunked", "vanilla"], help="execution mode")
    g.add_argument("--sampler-set", dest="sampler_set", action="append", default=[],
                   metavar="KEY=VALUE", help="any other SamplerConfig setting (repeatable)")


def _sampler_from_args(args: argparse.Namespace, adapter: Any) -> Any:
    from .config import parse_overrides
    from .sampling import SamplerConfig

    base = getattr(adapter, "default_sampler", SamplerConfig)()
    flags = {"num_frames": args.frames, "num_steps": args.steps, "schedule": args.schedule,
             "ar_step": args.ar_step, "overlap_history": args.overlap,
             "guidance_scale": args.guidance, "mode": args.mode}
    changes = {k: v for k, v in flags.items() if v is not None}
    changes.update(parse_overrides(args.sampler_set))
    return base.evolve(**changes) if changes else base


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    add_policy_options(p, default="none")
    add_engine_options(p)
    _add_sampler_options(p)
    p.add_argument("--prompt", help="the model's condition text (refdit: e.g. "
                                    "'shape=circle,color=red,motion=fast,background=stripes'); "
                                    "default: drawn from --seed")
    p.add_argument("--out", default="out/generate", metavar="DIR",
                   help="output folder (video.mp4 or .gif, video.npy, contact_sheet.png, "
                        "summary.json); default out/generate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import run_generation

    registry = registry_from_args(args)
    adapter = registry.create_adapter(args.model)
    sampler = _sampler_from_args(args, adapter)
    config = policy_config_from_args(args, registry)
    out = run_generation(model=args.model, policy=args.policy, policy_config=config,
                         sampler=sampler, seed=args.seed, prompt=args.prompt, out=args.out,
                         progress=not args.no_progress, registry=registry, adapter=adapter,
                         engine_config=engine_config_from_args(args))
    if out.result.stats is not None:
        print(out.result.stats.table())
    print(f"prompt: {out.summary['prompt']}")
    print(f"wall time: {out.summary['wall_s']:.2f} s for {out.result.model_calls} model calls")
    for key, path in out.files.items():
        print(f"{key:14s} {path}")
    return 0


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    _add_sampler_options(p)
    p.add_argument("--scope", choices=["chunk", "window"], default="chunk",
                   help="chunk: per-chunk indicator (flowcache, motioncache); window: per-window "
                        "indicator (teacache, vanilla execution). Default chunk.")
    p.add_argument("--seeds", default="100,101,102,103", metavar="LIST",
                   help="comma-separated seeds (prompts and noise) to record; default "
                        "100,101,102,103 (kept apart from the benchmark's seeds)")
    p.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4)")
    p.add_argument("--out", metavar="FILE", help="output JSON (default "
                   "calibration-MODEL-SCOPE.json)")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import shlex

    from .calibration import calibrate, save_calibration
    from .errors import ConfigError

    registry = registry_from_args(args)
    adapter = registry.create_adapter(args.model)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
    data = calibrate(adapter, seeds=seeds, sampler=_sampler_from_args(args, adapter),
                     scope=args.scope, degree=args.degree, model=args.model,
                     registry=registry)
    data["command"] = "cachekit calibrate " + " ".join(
        shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else ""
    path = save_calibration(data, args.out or f"calibration-{args.model}-{args.scope}.json")
    print(f"{data['num_pairs']} pairs, x in [{data['x_range'][0]:.4g}, {data['x_range'][1]:.4g}],"
          f" R^2 = {data['r2']:.3f}")
    print("coefficients (highest degree first): "
          + ", ".join(f"{c:.6g}" for c in data["coefficients"]))
    for problem in data["problems"]:
        print(f"warning: {problem}")
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# The command table: the one place where subcommands are registered.
# ---------------------------------------------------------------------------------------------
COMMANDS: list[Command] = [
    Command("plugins", "list registered policies, motion estimators, stores and model adapters",
            _plugins_arguments, _cmd_plugins,
            description="List everything cachekit can build by name, with the plugin and the "
                        "installed distribution that provided it, then the loaded plugins and "
                        "the hooks each implements."),
    Command("generate", "generate a video (bundled model by default) and print the cache summary",
            _generate_arguments, _cmd_generate,
            description="Sample one video with a model adapter through a cache policy; write "
                        "video.mp4 (or .gif without the video extra), video.npy, "
                        "contact_sheet.png and summary.json, and print the cache summary."),
    Command("calibrate", "fit the indicator's rescale polynomial on a model",
            _calibrate_arguments, _cmd_calibrate,
            description="Record (modulation change, residual change) pairs of uncached "
                        "generations and fit the rescale polynomial policies take through "
                        "coefficients_file. Writes JSON with provenance."),
    Command("bench", "benchmark policies against the uncached model (wall time, FLOPs, "
            "PSNR/SSIM)", _bench.add_bench_arguments, _bench.run_bench),
    Command("metrics", "PSNR/SSIM of video A against reference B",
            _bench.add_metrics_arguments, _bench.run_metrics),
    Command("report", "regenerate figures, the README table and docs/benchmarks.md from a "
            "bench folder", _bench.add_report_arguments, _bench.run_report),
]


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The argparse parser with one sub-parser per entry of ``commands`` (default COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plugin-driven cache engine for chunk-by-chunk video diffusion transformers.",
        epilog="Run `cachekit COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE",
                        help="also load this plugin module (importable path; repeatable)")
    parser.add_argument("--traceback", action="store_true",
                        help="on a cachekit error, show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in commands if commands is not None else COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cachekit`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CacheKitError as exc:
        if args.traceback:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` & co.: stop quietly (and keep Python from complaining
        # again while flushing stdout at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
