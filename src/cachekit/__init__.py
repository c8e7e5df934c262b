"""cachekit: plugin-driven reuse of cached computation for chunk-by-chunk video diffusion transformers."""

__version__ = "0.1.0"
