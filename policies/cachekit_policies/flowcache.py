"""``flowcache``: independent TeaCache-style reuse per (branch, chunk) (FlowCache-SkyReels, §4.1).

Runs on the chunked execution (finished and pending chunks are never run; that part is the
engine's lossless structure, not this policy). For every ACTIVE chunk, in its own step count:

* steps ``< warmup_steps`` compute (the reference's ``ret_steps``: 5 of 50), and the chunk's
  last step computes when ``compute_last`` (the reference's ``cutoff = T - 1``);
* otherwise the chunk's modulation ``[B, F, M, D]`` (its frames only) is compared with its own
  previous step: ``d = max(0, poly(rel_l1))``, accumulated and reset with the TeaCache rule.

The accumulator, the previous modulation (per frame) and the residual live per
``(branch, chunk)`` in the engine and are dropped at every window. Prefix chunks never reach
the engine (the adapter fills their context K/V once).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import attrs

from cachekit.config import ConfigBase, in_range, knob, to_bool
from cachekit.types import Scope

from ._indicator import (
    AccumulateResetPolicy,
    check_coefficient_settings,
    coefficients_file_knob,
    coefficients_knob,
    coefficients_range_knob,
    threshold_knob,
)

__all__ = ["FlowCacheConfig", "FlowCachePolicy"]


@attrs.frozen(kw_only=True)
class FlowCacheConfig(ConfigBase):
    """Settings of ``flowcache`` (per-chunk TeaCache, chunked execution)."""

    tag_prefix: ClassVar[str] = "flowcache"
    # run_flowcache_slow.sh / run_flowcache_fast.sh (§4.1): 0.10 / 0.15 (with Wan's polynomial).
    presets: ClassVar[dict] = {"slow": {"threshold": 0.10}, "fast": {"threshold": 0.15}}

    threshold: float = threshold_knob(
        0.1, doc="Accumulated (rescaled) rel_l1 drift of the chunk's modulation below which the "
                 "chunk reuses its residual. Unitless (the polynomial's output). Default 0.1.")
    warmup_steps: int = knob(
        5, converter=int, validator=in_range(0),
        doc="First steps of each chunk that always compute (ret_steps). Unit: the chunk's "
            "steps. Default 5.",
        trade="larger = more faithful, slower")
    compute_last: bool = knob(
        True, converter=to_bool,
        doc="Always compute each chunk's last step (the reference's cutoff = T - 1). "
            "Default on.",
        trade="on = cleaner final frames, one more compute per chunk and branch")
    coefficients: tuple = coefficients_knob()
    coefficients_file: Optional[str] = coefficients_file_knob()
    coefficients_x_range: tuple = coefficients_range_knob()

    def __attrs_post_init__(self) -> None:
        check_coefficient_settings(self)


class FlowCachePolicy(AccumulateResetPolicy):
    """Per-chunk accumulate-and-reset reuse (see module docstring)."""

    name: ClassVar[str] = "flowcache"
    scope: ClassVar[Scope] = Scope.CHUNK
    config_cls: ClassVar[type] = FlowCacheConfig
    indicator_scope: ClassVar[str] = "chunk"
