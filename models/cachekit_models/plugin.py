"""Entry point of the bundled model adapters (group ``cachekit``)."""

from __future__ import annotations

from cachekit.hookspecs import hookimpl


def _refdit(**options):
    # Imported lazily: listing plugins must not load weights.
    from .refdit.adapter import load_adapter

    return load_adapter(**options)


@hookimpl
def register_model_adapters(register):
    register("refdit", _refdit,
             description="The bundled reference model: a small Wan-style diffusion-forcing "
                         "video DiT trained by cachekit on synthetic sprite videos.")
