"""The one place that imports diffusers, with the error users see when it is missing."""

from __future__ import annotations

from typing import Any

from cachekit.errors import CacheKitError

__all__ = ["require_diffusers", "MissingDiffusersError", "MIN_DIFFUSERS"]

MIN_DIFFUSERS = (0, 42)


class MissingDiffusersError(CacheKitError, ImportError):
    """diffusers (or a new enough one) is not installed."""


def require_diffusers() -> Any:
    """Import and return :mod:`diffusers`; a clear error naming the extra when it is missing."""
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDiffusersError(
            "cachekit's diffusers integration (SkyReels-V2 diffusion forcing) needs diffusers "
            ">= 0.42 and transformers: pip install 'cachekit[diffusers]'") from exc
    parts = []
    for p in diffusers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_DIFFUSERS:
        raise MissingDiffusersError(
            f"cachekit's diffusers integration needs diffusers >= 0.42 (the SkyReels-V2 "
            f"diffusion-forcing pipelines and CacheContext), found {diffusers.__version__}: "
            f"pip install -U 'cachekit[diffusers]'")
    return diffusers
