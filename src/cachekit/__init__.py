"""cachekit: plugin-driven reuse of cached computation for chunk-by-chunk video diffusion transformers.

The main entry points:

* :class:`cachekit.engine.CacheEngine` applies a reuse policy around a model's block stack;
* :func:`cachekit.sampling.generate` samples a video (SkyReels-V2 diffusion forcing or a
  MAGI-1-style chunk pipeline) through a model adapter, optionally with an engine;
* :func:`cachekit.plugins.get_registry` lists/builds policies, estimators, stores and adapters;
* :data:`cachekit.hookimpl` marks plugin hook implementations (see ``docs/plugin-hooks.md``).
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl"]
