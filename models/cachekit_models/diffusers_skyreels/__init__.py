"""cachekit on diffusers' SkyReels-V2 diffusion-forcing pipelines (``pip install 'cachekit[diffusers]'``).

::

    import cachekit
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(...)
    cachekit.enable_cache(pipe, policy="motioncache")        # or teacache, flowcache, ...
    video = pipe(prompt, causal_block_size=5, ar_step=5, ...).frames[0]
    print(cachekit.summary(pipe).table())
    cachekit.disable_cache(pipe)                              # exactly the original pipeline

The functions here do the same without the registry dispatch (``enable_cache`` builds the
engine from a policy name). Importing this package does not import diffusers; the functions
do, and raise :class:`MissingDiffusersError` naming the extra when it is missing. See
``docs/diffusers.md`` for what runs chunked and what runs the stock forward.
"""

from __future__ import annotations

from typing import Any, Optional

from ._compat import MissingDiffusersError, require_diffusers

__all__ = ["enable_cache", "disable_cache", "summary", "is_enabled", "begin_window", "end_run",
           "execution_stats", "engine_of", "MissingDiffusersError", "require_diffusers"]


def _rt():
    from . import _runtime

    return _runtime


def enable_cache(target: Any, policy: str = "motioncache", *, config: Any = None,
                 preset: Optional[str] = None, mode: str = "auto", engine: Any = None,
                 engine_config: Any = None, registry: Any = None, **knobs: Any) -> Any:
    """Enable cachekit on a SkyReels-V2 DF pipeline or its transformer; returns ``target``.

    ``policy``/``config``/``preset``/``knobs`` build the policy (as
    :meth:`cachekit.engine.CacheEngine.from_name`), or pass a ready ``engine``. ``mode``:
    ``"auto"`` (chunk-scope policies run chunked, the others the stock forward),
    ``"vanilla"`` or ``"chunked"``.
    """
    rt = _rt()
    if engine is None:
        from cachekit.engine import CacheEngine

        engine = CacheEngine.from_name(policy, config=config, preset=preset,
                                       engine_config=engine_config, registry=registry, **knobs)
    elif config is not None or preset is not None or knobs:
        from cachekit.errors import ConfigError

        raise ConfigError("enable_cache: pass either engine=... or a policy with "
                          "config/preset/knobs, not both")
    return rt.enable(target, engine, mode=mode)


def disable_cache(target: Any) -> Any:
    """Remove cachekit from ``target`` (the pipeline and transformer are exactly as before);
    returns the last run's :class:`cachekit.stats.CacheStats`."""
    rt = _rt()
    engine = rt._require(target).engine
    rt.disable(target)
    return engine.summary()


def summary(target: Any) -> Any:
    """The :class:`cachekit.stats.CacheStats` of the current or last run on ``target``."""
    return _rt()._require(target).engine.summary()


def is_enabled(target: Any) -> bool:
    return _rt().controller_of(target) is not None


def engine_of(target: Any) -> Any:
    return _rt().engine_of(target)


def begin_window(target: Any, step_update_mask: Any, causal_block_size: int, *,
                 step_matrix: Any = None, valid_interval: Any = None) -> None:
    """Start a window when driving the transformer yourself; see ``_runtime.begin_window``."""
    _rt().begin_window(target, step_update_mask, causal_block_size, step_matrix=step_matrix,
                       valid_interval=valid_interval)


def end_run(target: Any) -> None:
    _rt().end_run(target)


def execution_stats(target: Any) -> dict:
    """Model-side token passes of the last run (stock vs run, context refreshes)."""
    return _rt().execution_stats(target)
