"""cachekit: plugin-driven reuse of cached computation for chunk-by-chunk video diffusion transformers.

The main entry points:

* :class:`cachekit.engine.CacheEngine` applies a reuse policy around a model's block stack;
* :func:`cachekit.sampling.generate` samples a video (SkyReels-V2 diffusion forcing or a
  MAGI-1-style chunk pipeline) through a model adapter, optionally with an engine;
* :func:`cachekit.plugins.get_registry` lists/builds policies, estimators, stores and adapters;
* :data:`cachekit.hookimpl` marks plugin hook implementations (see ``docs/plugin-hooks.md``);
* :func:`cachekit.enable_cache` / :func:`cachekit.disable_cache` / :func:`cachekit.summary`
  attach a policy to a third-party model or pipeline (diffusers SkyReels-V2, see
  ``docs/diffusers.md``).
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "enable_cache", "disable_cache", "summary",
           "is_cache_enabled"]

_INTEGRATIONS = {"enable_cache", "disable_cache", "summary", "is_cache_enabled"}


def __getattr__(name: str):
    # enable_cache & co. import torch and the engine: load them on first use only, so that
    # `import cachekit` (and `cachekit --version`) stays light.
    if name in _INTEGRATIONS:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'cachekit' has no attribute {name!r}")
