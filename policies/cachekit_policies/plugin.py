"""Entry point of the built-in policies and motion estimators (group ``cachekit``)."""

from __future__ import annotations

from cachekit.hookspecs import hookimpl

from .baseline import FixedIntervalConfig, FixedIntervalPolicy, NoneConfig, NonePolicy


@hookimpl
def register_policies(register):
    register("none", NonePolicy, config=NoneConfig,
             description="Always compute (the uncached reference through the engine).")
    register("fixed_interval", FixedIntervalPolicy, config=FixedIntervalConfig,
             description="Compute every k-th step of each chunk after a warm-up (FORA-style).")
