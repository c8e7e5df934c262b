"""Exceptions raised by cachekit.

Every error names the setting involved, what was expected, what was received and how to fix
it (house rule 5). Helpers here build those messages uniformly so that validators, adapters and
the engine all speak the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CacheKitError",
    "ConfigError",
    "PluginError",
    "CacheContextError",
    "ResidualShapeError",
    "BudgetExceededError",
    "WeightsError",
    "DecisionError",
    "invalid_value",
    "field_converter",
]


class CacheKitError(Exception):
    """Base class of every error cachekit raises on purpose."""


class ConfigError(CacheKitError, ValueError):
    """A configuration value is out of range, of the wrong type, or inconsistent."""


class PluginError(CacheKitError):
    """A plugin could not be registered or found (duplicate name, unknown name, bad hook)."""


class CacheContextError(CacheKitError, RuntimeError):
    """The engine was used outside a run/window, or with an inconsistent call context."""


class ResidualShapeError(CacheKitError, ValueError):
    """A cached residual does not fit the tensor it would be added to."""


class BudgetExceededError(CacheKitError, MemoryError):
    """The residual store would exceed its byte budget and is configured to raise."""


class WeightsError(CacheKitError, OSError):
    """Model weights are missing, truncated or fail their checksum."""


class DecisionError(CacheKitError, ValueError):
    """A policy returned a decision the engine cannot apply (token index out of the chunk...)."""


def field_converter(fn: Any) -> Any:
    """Wrap an attrs converter so a failed conversion raises :class:`ConfigError` naming the
    class and field, the expected type and the value (a bare ``int('two')`` says neither)."""
    import attrs

    if fn is None or isinstance(fn, attrs.Converter):
        return fn
    named = {"to_bool": "true or false", "optional_int": "an integer or none",
             "_optional_float": "a number or none"}
    expected = {int: "an integer", float: "a number", bool: "true or false",
                str: "a string"}.get(fn) or named.get(getattr(fn, "__name__", ""),
                                                     f"a value accepted by {fn!r}")

    def convert(value: Any, inst: Any, field: Any) -> Any:
        try:
            if fn is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")  # int(2.7) would silently give 2
            return fn(value)
        except (TypeError, ValueError) as exc:
            name = f"{type(inst).__name__}.{field.name}"
            raise ConfigError(invalid_value(name, expected, value)) from exc

    return attrs.Converter(convert, takes_self=True, takes_field=True)


def invalid_value(setting: str, expected: str, got: Any, fix: str | None = None) -> str:
    """Format the standard message: ``setting: expected ..., got ...; fix``."""
    msg = f"{setting}: expected {expected}, got {got!r}"
    if fix:
        msg += f". {fix}"
    return msg
