"""One generation end to end: adapter by name, engine by policy name, sampler, outputs on disk.

:func:`run_generation` is what ``cachekit generate`` runs; benchmarks reuse it. An adapter used
here provides, besides :class:`~cachekit.protocols.ModelAdapter`:

* ``encode_prompt(prompt: str | None, *, seed: int, batch: int) -> (cond, uncond, text)``: the
  encoded condition of the ``cond`` branch, of the ``uncond`` branch (or None), and the prompt
  text actually used (a model may draw a prompt from ``seed`` when ``prompt`` is None);
* ``decode(x) -> numpy [B, F, H, W, 3]`` in ``[0, 1]`` from the sampler's model-space video.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .config import EngineConfig
from .engine import CacheEngine
from .errors import ConfigError
from .io import contact_sheet, save_video
from .plugins import DEFAULT_MODEL, Registry, get_registry
from .sampling import GenerationResult, SamplerConfig, generate

__all__ = ["GenerationOutput", "run_generation", "build_engine"]


@attrs.frozen(kw_only=True)
class GenerationOutput:
    """Frames ``[F, H, W, 3]`` in [0, 1] of the first batch item, the raw result, the summary."""

    frames: np.ndarray = attrs.field(eq=False, repr=lambda a: f"array{a.shape}")
    result: GenerationResult = attrs.field(repr=False)
    summary: dict = attrs.field(factory=dict)
    files: dict = attrs.field(factory=dict)


def model_calibration(config: Any, policy_cls: Any, adapter: Any) -> Any:
    """Use the adapter's shipped calibration when the config names no coefficients.

    Indicator policies (configs with ``coefficients`` and ``coefficients_file``) measure drift
    in the units of their rescale polynomial. A model adapter may ship the polynomial that
    ``cachekit calibrate`` fitted on it (``adapter.calibration_file(scope) -> path | None``,
    scope ``"chunk"`` or ``"window"``). When the user set neither knob, that file is used;
    the chosen file is part of the config, so ``summary.json`` and the printed summary show it.
    """
    fields: dict[str, Any] = getattr(config, "to_dict", lambda: {})()
    if "coefficients_file" not in fields or "coefficients" not in fields:
        return config
    if fields["coefficients_file"] is not None or tuple(fields["coefficients"]) != ():
        return config
    finder = getattr(adapter, "calibration_file", None)
    scope = getattr(getattr(policy_cls, "scope", None), "value", None)
    path = finder(scope) if (finder is not None and scope is not None) else None
    return config.evolve(coefficients_file=str(path)) if path is not None else config


def build_engine(policy: str, *, registry: Registry, policy_config: Any = None,
                 preset: str | None = None, knobs: dict | None = None,
                 engine_config: EngineConfig | None = None, adapter: Any = None) -> CacheEngine:
    """An engine for policy ``policy`` from a config object, a preset and/or knobs; with an
    ``adapter``, indicator policies default to its shipped calibration
    (:func:`model_calibration`)."""
    config = registry.policy_config(policy, policy_config, preset=preset, **(knobs or {}))
    if adapter is not None:
        config = model_calibration(config, registry.get("policy", policy).factory, adapter)
    pol = registry.create_policy(policy, config)
    return CacheEngine(pol, config=engine_config, registry=registry)


def _check_adapter(adapter: Any, name: str) -> None:
    missing = [m for m in ("encode_prompt", "decode", "session") if not hasattr(adapter, m)]
    if missing:
        raise ConfigError(f"model adapter {name!r} cannot run `generate`: it lacks {missing}. "
                          "See docs/writing-a-model-adapter.md (encode_prompt, decode).")


def run_generation(*, model: str = DEFAULT_MODEL, policy: str = "none", preset: str | None = None,
                   knobs: dict | None = None, policy_config: Any = None,
                   sampler: SamplerConfig | None = None,
                   seed: int = 0, prompt: str | None = None, out: str | Path | None = None,
                   progress: bool = False, registry: Registry | None = None,
                   adapter: Any = None, engine_config: EngineConfig | None = None,
                   use_engine: bool = True) -> GenerationOutput:
    """Generate one video and (with ``out``) write ``video.mp4``/``.gif``, ``video.npy``,
    ``contact_sheet.png`` and ``summary.json`` into ``out``.

    ``use_engine=False`` runs the model without any engine (the plain reference); otherwise
    the policy runs through a :class:`CacheEngine` (``none`` = uncached through the engine).
    """
    registry = registry or get_registry()
    if adapter is None:
        adapter = registry.create_adapter(model)
    _check_adapter(adapter, model)
    sampler = sampler or getattr(adapter, "default_sampler", lambda: SamplerConfig())()
    engine = build_engine(policy, registry=registry, policy_config=policy_config, preset=preset,
                          knobs=knobs, engine_config=engine_config,
                          adapter=adapter) if use_engine else None
    scope = engine.policy.scope if engine is not None else None
    if scope is not None and scope.value == "window" and sampler.mode != "vanilla":
        sampler = sampler.evolve(mode="vanilla")
    cond, uncond, text = adapter.encode_prompt(prompt, seed=seed, batch=1)
    t0 = time.perf_counter()
    result = generate(adapter, cond, uncond=uncond, config=sampler, engine=engine, seed=seed,
                      progress=progress, run_info={"model": model, "seed": seed, "prompt": text})
    wall = time.perf_counter() - t0
    frames = np.asarray(adapter.decode(result.video))[0]
    stats = result.stats
    summary = {
        "model": model,
        "policy": policy if use_engine else None,
        "preset": preset,
        "settings": engine.policy.config.to_dict() if engine is not None else {},
        "tag": engine.policy.config.tag() if engine is not None else "no-engine",
        "sampler": sampler.to_dict(),
        "seed": seed,
        "prompt": text,
        "wall_s": wall,
        "model_calls": result.model_calls,
        "iterations": result.iterations,
        "computed_token_fraction": stats.computed_token_fraction if stats else 1.0,
        "cache": stats.to_dict(records=False) if stats else None,
    }
    files: dict[str, str] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files["video"] = str(save_video(frames, out / "video.mp4"))
        files["npy"] = str(save_video(frames, out / "video.npy"))
        files["contact_sheet"] = str(contact_sheet([frames], out / "contact_sheet.png"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        files["summary"] = str(out / "summary.json")
        if stats is not None:
            (out / "cache_records.json").write_text(stats.to_json(records=True))
            files["records"] = str(out / "cache_records.json")
    return GenerationOutput(frames=frames, result=result, summary=summary, files=files)

