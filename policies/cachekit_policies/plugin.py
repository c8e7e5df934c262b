"""Entry point of the built-in policies and motion estimators (group ``cachekit``)."""

from __future__ import annotations

from cachekit.hookspecs import hookimpl

from .baseline import FixedIntervalConfig, FixedIntervalPolicy, NoneConfig, NonePolicy
from .estimators import ESTIMATORS
from .flowcache import FlowCacheConfig, FlowCachePolicy
from .motioncache import MotionCacheConfig, MotionCachePolicy
from .teacache import TeaCacheConfig, TeaCachePolicy


@hookimpl
def register_policies(register):
    register("none", NonePolicy, config=NoneConfig,
             description="Always compute (the uncached reference through the engine).")
    register("fixed_interval", FixedIntervalPolicy, config=FixedIntervalConfig,
             description="Compute every k-th step of each chunk after a warm-up (FORA-style).")
    register("teacache", TeaCachePolicy, config=TeaCacheConfig,
             description="One accumulate-and-reset decision per window on the modulation drift "
                         "(SkyReels-V2 TeaCache; vanilla mode).")
    register("flowcache", FlowCachePolicy, config=FlowCacheConfig,
             description="Independent TeaCache-style reuse per (branch, chunk) (FlowCache).")
    register("motioncache", MotionCachePolicy, config=MotionCacheConfig,
             description="Motion-weighted token-wise reuse per (branch, chunk) (MotionCache).")


@hookimpl
def register_motion_estimators(register):
    for name, (factory, description) in ESTIMATORS.items():
        register(name, factory, description=description)
