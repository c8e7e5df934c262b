"""An example cachekit policy plugin (see cachekit's docs/writing-a-policy.md)."""

from .policy import EveryOtherConfig, EveryOtherPolicy, EveryOtherState

__all__ = ["EveryOtherConfig", "EveryOtherPolicy", "EveryOtherState"]
