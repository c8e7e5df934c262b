"""Entry point of the example plugin (group ``cachekit``): registers ``every_other``."""

from __future__ import annotations

from cachekit.hookspecs import hookimpl

from .policy import EveryOtherConfig, EveryOtherPolicy


@hookimpl
def register_policies(register):
    register("every_other", EveryOtherPolicy, config=EveryOtherConfig,
             description="Alternate compute and reuse per chunk after a warm-up (example).")
