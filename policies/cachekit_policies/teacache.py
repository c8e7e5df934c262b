"""``teacache``: one reuse decision per window call, as SkyReels-V2's TeaCache port (§3.2).

The whole window (every frame: active, finished, pending and prefix) is computed or reused as
one unit, on the vanilla (full-window) execution (``mode="vanilla"``). The indicator is the
relative L1 drift of the window's per-frame modulation ``[B, F, M, D]`` against the same
branch's previous iteration, rescaled by the configured polynomial and accumulated with the
TeaCache rule (``_indicator.py``).

Differences from the reference, on purpose (reference/algorithms.md §7.19):

* warm-up and the optional forced last iteration count *iterations of the window*
  (``call.step`` / ``call.num_steps``), not model calls, so nothing wraps mid-window (S-T1);
* state is per branch, owned by the engine and dropped at every window (never call parity,
  never carried into the next window).
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

__all__ = ["TeaCacheConfig", "TeaCachePolicy"]


@attrs.frozen(kw_only=True)
class TeaCacheConfig(ConfigBase):
    """Settings of ``teacache`` (window-level TeaCache, vanilla execution)."""

    tag_prefix: ClassVar[str] = "teacache"
    # The official SkyReels-V2 help text: "0.1 for 2.0x speedup, 0.2 for 3.0x" (with its
    # polynomial); the paper's TeaCache-slow/fast thresholds are not published (§3.2).
    presets: ClassVar[dict] = {"slow": {"threshold": 0.1}, "fast": {"threshold": 0.2}}

    threshold: float = threshold_knob(
        0.1, doc="Accumulated (rescaled) rel_l1 drift of the window modulation below which the "
                 "window reuses its residual. Unitless (the polynomial's output). Default 0.1.")
    warmup_steps: int = knob(
        5, converter=int, validator=in_range(0),
        doc="First iterations of each window that always compute (the reference's "
            "ret_steps: 5 iterations = 10 calls with CFG). Unit: iterations. Default 5.",
        trade="larger = more faithful, slower")
    compute_last: bool = knob(
        False, converter=to_bool,
        doc="Always compute the window's last iteration (off with ret_steps in the reference: "
            "cutoff = all calls). Default off.",
        trade="on = more faithful final iteration, one more compute per window and branch")
    coefficients: tuple = coefficients_knob()
    coefficients_file: Optional[str] = coefficients_file_knob()
    coefficients_x_range: tuple = coefficients_range_knob()

    def __attrs_post_init__(self) -> None:
        check_coefficient_settings(self)


class TeaCachePolicy(AccumulateResetPolicy):
    """Window-level accumulate-and-reset reuse (see module docstring)."""

    name: ClassVar[str] = "teacache"
    scope: ClassVar[Scope] = Scope.WINDOW
    config_cls: ClassVar[type] = TeaCacheConfig
    indicator_scope: ClassVar[str] = "window"
