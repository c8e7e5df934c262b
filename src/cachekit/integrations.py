"""Accelerate third-party pipelines in place: ``enable_cache`` / ``disable_cache`` / ``summary``.

::

    import cachekit
    cachekit.enable_cache(pipe, policy="motioncache", threshold=0.15)
    out = pipe(...)
    print(cachekit.summary(pipe).table())
    cachekit.disable_cache(pipe)

Which code patches ``pipe`` is found through the registry, not through an ``isinstance``
chain: every registered model adapter whose factory is a :class:`ModelPatcher` (it has
``handles`` and ``enable``) is asked whether it handles the object, in registry order. The
first that does gets a :class:`~cachekit.engine.CacheEngine` built from the policy name,
config, preset and knobs. When none does, the error lists every adapter tried and why it
declined. Sampler models (adapters whose factory builds a model for
:func:`cachekit.sampling.generate`) are listed as such and never built here.

A patcher is a plugin's object; cachekit only calls the methods of :class:`ModelPatcher`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

from .engine import CacheEngine
from .errors import CacheContextError, ConfigError, PluginError
from .plugins import Registry, get_registry
from .stats import CacheStats

__all__ = ["ModelPatcher", "enable_cache", "disable_cache", "summary", "is_cache_enabled",
           "find_patcher"]


@runtime_checkable
class ModelPatcher(Protocol):
    """What a model adapter registers to patch a third-party object in place.

    Register the patcher object itself as the adapter's factory
    (``register("my_model", PATCHER, description=...)``). Methods:

    * ``handles(target) -> bool``: cheap, must not import heavy modules; True if this
      patcher can accelerate ``target``.
    * ``explain(target) -> str``: why it does not (shown in the "no adapter fits" error).
    * ``enable(target, engine, *, mode="auto", **options) -> target``: install the engine
      around the model's block stack; raise :class:`~cachekit.errors.CacheContextError` if a
      cache is already enabled. ``mode``: ``"auto"``, ``"vanilla"`` or ``"chunked"``.
    * ``disable(target) -> None``: restore exactly what ``enable`` changed.
    * ``engine_of(target) -> CacheEngine | None``: the engine enabled on ``target``.
    """

    name: str

    def handles(self, target: Any) -> bool: ...

    def explain(self, target: Any) -> str: ...

    def enable(self, target: Any, engine: CacheEngine, *, mode: str = "auto",
               **options: Any) -> Any: ...

    def disable(self, target: Any) -> None: ...

    def engine_of(self, target: Any) -> Optional[CacheEngine]: ...


def _patchers(registry: Registry) -> list[tuple[str, Optional[ModelPatcher], str]]:
    """``(name, patcher or None, note)`` for every registered model adapter."""
    out: list[tuple[str, Optional[ModelPatcher], str]] = []
    for reg in registry.items():
        if reg.kind != "model_adapter":
            continue
        factory = reg.factory
        if isinstance(factory, ModelPatcher):
            out.append((reg.name, factory, ""))
        else:
            out.append((reg.name, None, "a sampler model for cachekit.sampling.generate, "
                        "not a patcher"))
    return out


def _describe(target: Any) -> str:
    t = type(target)
    return f"{t.__module__}.{t.__qualname__}"


def find_patcher(target: Any, *, registry: Registry | None = None,
                 adapter: str | None = None) -> tuple[str, ModelPatcher]:
    """The ``(name, patcher)`` that handles ``target`` (or the one named ``adapter``).

    Raises :class:`~cachekit.errors.PluginError` listing every adapter tried and why.
    """
    registry = registry if registry is not None else get_registry()
    tried: list[str] = []
    for name, patcher, note in _patchers(registry):
        if adapter is not None and name != adapter:
            continue
        if patcher is None:
            tried.append(f"{name}: {note}")
            continue
        try:
            ok = bool(patcher.handles(target))
        except Exception as exc:  # a broken plugin must not hide the others
            tried.append(f"{name}: handles() raised {type(exc).__name__}: {exc}")
            continue
        if ok:
            return name, patcher
        try:
            why = patcher.explain(target)
        except Exception as exc:
            why = f"explain() raised {type(exc).__name__}: {exc}"
        tried.append(f"{name}: {why}")
    if adapter is not None and not tried:
        raise PluginError(f"unknown model adapter {adapter!r}; registered: "
                          f"{registry.names('model_adapter')}")
    listing = "; ".join(tried) if tried else "no model adapters are registered"
    raise PluginError(
        f"no cachekit model adapter handles a {_describe(target)}. Tried: {listing}. "
        f"Install the plugin for this model (diffusers SkyReels-V2: "
        f"pip install 'cachekit[diffusers]'), or write one (docs/writing-a-model-adapter.md).")


def _enabled(target: Any, registry: Registry) -> Optional[tuple[str, ModelPatcher, CacheEngine]]:
    for name, patcher, _ in _patchers(registry):
        if patcher is None:
            continue
        try:
            engine = patcher.engine_of(target)
        except Exception:
            continue
        if engine is not None:
            return name, patcher, engine
    return None


def enable_cache(target: Any, policy: str = "motioncache", *, config: Any = None,
                 preset: str | None = None, mode: str = "auto", engine: CacheEngine | None = None,
                 engine_config: Any = None, registry: Registry | None = None,
                 adapter: str | None = None, adapter_options: Mapping[str, Any] | None = None,
                 **knobs: Any) -> Any:
    """Enable cachekit on ``target`` (e.g. a diffusers pipeline); returns ``target``.

    :param policy: registered policy name (default ``motioncache``).
    :param config: the policy's config object or a dict; ``preset``: a named preset;
        ``knobs``: single settings on top (``threshold=0.15``). Unknown names are errors.
    :param mode: ``"auto"`` (chunk-scope policies run chunk by chunk, the others the model's
        stock forward), ``"vanilla"`` or ``"chunked"``.
    :param engine: a ready :class:`CacheEngine` instead of ``policy``/``config``/``knobs``.
    :param engine_config: :class:`~cachekit.config.EngineConfig` (residual store, budget...).
    :param adapter: use this registered adapter instead of asking each one.
    :param adapter_options: extra keyword options for the adapter's ``enable``.
    :raises PluginError: no adapter handles ``target`` (lists those tried and why).
    :raises CacheContextError: a cache is already enabled on ``target``.
    """
    registry = registry if registry is not None else get_registry()
    name, patcher = find_patcher(target, registry=registry, adapter=adapter)
    if patcher.engine_of(target) is not None:
        raise CacheContextError(f"cachekit is already enabled on this {_describe(target)} "
                                f"(adapter {name!r}); call cachekit.disable_cache(...) first.")
    if engine is None:
        engine = CacheEngine.from_name(policy, config=config, preset=preset,
                                       engine_config=engine_config, registry=registry, **knobs)
    elif config is not None or preset is not None or knobs or engine_config is not None:
        raise ConfigError("enable_cache: pass either engine=... or policy settings "
                          "(config, preset, engine_config, knobs), not both")
    patcher.enable(target, engine, mode=mode, **dict(adapter_options or {}))
    return target


def disable_cache(target: Any, *, registry: Registry | None = None) -> CacheStats:
    """Remove cachekit from ``target``, restoring exactly what ``enable_cache`` changed.

    Returns the statistics of the last run (``summary`` is unavailable once disabled).
    """
    registry = registry if registry is not None else get_registry()
    found = _enabled(target, registry)
    if found is None:
        raise CacheContextError(f"cachekit is not enabled on this {_describe(target)}; "
                                f"nothing to disable.")
    _, patcher, engine = found
    patcher.disable(target)
    return engine.summary()


def summary(target: Any, *, registry: Registry | None = None) -> CacheStats:
    """Statistics of the current or last run on ``target`` (see :class:`CacheStats`)."""
    registry = registry if registry is not None else get_registry()
    found = _enabled(target, registry)
    if found is None:
        raise CacheContextError(f"cachekit is not enabled on this {_describe(target)}; call "
                                f"cachekit.enable_cache(...) first.")
    return found[2].summary()


def is_cache_enabled(target: Any, *, registry: Registry | None = None) -> bool:
    registry = registry if registry is not None else get_registry()
    return _enabled(target, registry) is not None
