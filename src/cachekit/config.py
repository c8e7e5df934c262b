"""Configuration values: frozen attrs classes validated at construction, TOML/JSON round-trip.

Every config class in cachekit (and in plugins) derives from :class:`ConfigBase`:

* fields are ``attrs.field(converter=..., validator=...)`` with a ``metadata`` dict holding
  ``doc`` (what it does, default, unit) and ``trade`` (which way it trades speed for fidelity);
* a bad value raises :class:`~cachekit.errors.ConfigError` naming the field, the expected range
  and the value;
* ``to_dict`` / ``from_dict`` / ``save`` / ``load`` (``.toml`` or ``.json``) round-trip exactly;
* ``tag()`` is a short filename-safe summary (only fields that differ from the defaults);
* ``presets`` (a class-level dict) name ready-made settings (``slow``, ``fast``, ...).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, TypeVar

import attrs

from .errors import ConfigError, field_converter, invalid_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

__all__ = [
    "ConfigBase",
    "knob",
    "in_range",
    "one_of",
    "parse_overrides",
    "EngineConfig",
    "to_bool",
    "optional_int",
]

C = TypeVar("C", bound="ConfigBase")


def to_bool(value: Any) -> bool:
    """Converter accepting bools and the strings true/false/1/0/yes/no (for ``--set``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int,)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(invalid_value("boolean setting", "true or false", value))


def optional_int(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    return int(value)


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False):
    """Validator: a finite number in [lo, hi] (or open ends). Message names field and range."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    desc = f"a finite number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def validator(inst, attribute, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise ConfigError(invalid_value(f"{type(inst).__name__}.{attribute.name}", desc, value))
    return validator


def one_of(*choices: Any):
    def validator(inst, attribute, value):
        if value not in choices:
            raise ConfigError(invalid_value(f"{type(inst).__name__}.{attribute.name}",
                                            f"one of {list(choices)}", value))
    return validator


def knob(default: Any, *, doc: str, trade: str = "", converter: Any = None,
         validator: Any = None) -> Any:
    """An attrs field for a config knob; ``doc`` and ``trade`` feed the policy reference."""
    return attrs.field(default=default, converter=field_converter(converter), validator=validator,
                       metadata={"doc": doc, "trade": trade})


def _abbrev(name: str) -> str:
    """``warmup_steps`` -> ``ws`` (initials); a single word stays whole (``threshold``)."""
    parts = [p for p in name.split("_") if p]
    return "".join(p[0] for p in parts) if len(parts) > 1 else name


def _fmt(value: Any) -> str:
    """Filename-safe (``[A-Za-z0-9._+-]``) and injective: floats keep every digit (``repr``);
    in strings every other character, ``+`` included, becomes ``+hex+``; sequences are
    ``+l...+r`` with ``+s`` between items, so two different settings never share a tag. A
    path is its file name plus a hash of the file's content (of the path if there is no
    such file): two copies of one file are one setting."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "+l" + "+s".join(_fmt(v) for v in value) + "+r"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        # a path: its file name plus a short hash of the file's *content* when it exists (the
        # same calibration gives the same tag in every checkout, an edited one a new tag),
        # else of the path itself
        import hashlib
        from pathlib import Path

        stem = re.sub(r"[^A-Za-z0-9.-]", "-", value.replace("\\", "/").rsplit("/", 1)[-1])
        p = Path(value)
        data = p.read_bytes() if p.is_file() else value.encode()
        return f"{stem}.{hashlib.sha1(data).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9.-]", lambda m: f"+{ord(m.group()):x}+", str(value))


def _coerce_from_string(text: str) -> Any:
    """Parse a ``--set`` value: JSON if it parses (numbers, bools, lists), else the string."""
    t = text.strip()
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        low = t.lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "none":
            return None
        return t


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` (the CLI's ``--set``) into a dict, with clear errors."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(invalid_value("--set", "KEY=VALUE", item,
                                            "Write e.g. --set threshold=0.1"))
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(invalid_value("--set", "a non-empty KEY in KEY=VALUE", item))
        out[k] = _coerce_from_string(v)
    return out


class ConfigBase:
    """Mixin for frozen attrs config classes (see module docstring)."""

    #: Named presets: ``{"slow": {field: value}, "fast": {...}}``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Short prefix of :meth:`tag`.
    tag_prefix: ClassVar[str] = ""

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [a.name for a in attrs.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown keys are an error listing the valid ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(invalid_value(cls.__name__, "a mapping of settings", data))
        names = cls.field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown setting(s) {unknown}; valid settings are {names}")
        try:
            return cls(**dict(data))  # type: ignore[call-arg]
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{cls.__name__}: {exc}") from exc

    @classmethod
    def from_preset(cls: type[C], name: str, **overrides: Any) -> C:
        if name not in cls.presets:
            raise ConfigError(invalid_value(f"{cls.__name__} preset", f"one of {sorted(cls.presets)}",
                                            name))
        data = dict(cls.presets[name])
        data.update(overrides)
        return cls.from_dict(data)

    def evolve(self: C, **changes: Any) -> C:
        """A copy with some settings changed (validated); unknown names are an error."""
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_dict(merged)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=True)  # type: ignore[call-overload, arg-type]

    def save(self, path: str | Path) -> Path:
        """Write ``.toml`` or ``.json`` (chosen by the suffix)."""
        path = Path(path)
        data = {k: v for k, v in self.to_dict().items() if v is not None}
        if path.suffix == ".toml":
            path.write_text(tomli_w.dumps(data))
        elif path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            raise ConfigError(invalid_value("config path", "a .toml or .json file", str(path)))
        return path

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(invalid_value("config path", "an existing .toml or .json file",
                                            str(path)))
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(invalid_value("config path", "a .toml or .json file", str(path)))
        return cls.from_dict(data)

    def tag(self) -> str:
        """Short filename-safe tag: prefix plus only the settings that differ from defaults."""
        parts = [self.tag_prefix or type(self).__name__.replace("Config", "").lower()]
        for a in attrs.fields(type(self)):  # type: ignore[arg-type]
            value = getattr(self, a.name)
            default = a.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            if value != default:
                parts.append(f"{_abbrev(a.name)}{_fmt(value)}")
        return "_".join(parts)

    @classmethod
    def knob_docs(cls) -> list[dict[str, Any]]:
        """Rows ``{name, default, doc, trade}`` for the policy reference docs."""
        rows = []
        for a in attrs.fields(cls):  # type: ignore[arg-type]
            default = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default  # type: ignore[arg-type]
            rows.append({"name": a.name, "default": default, "doc": a.metadata.get("doc", ""),
                         "trade": a.metadata.get("trade", "")})
        return rows


@attrs.frozen(kw_only=True)
class EngineConfig(ConfigBase):
    """Settings of the engine itself (not of a policy)."""

    tag_prefix: ClassVar[str] = "engine"

    store: str = knob("memory", doc="Name of the residual store plugin.")
    store_dtype: str | None = knob(
        None, doc="Storage dtype of residuals (e.g. 'bfloat16', 'float16'); None keeps the "
        "compute dtype.", trade="lower precision saves memory, adds rounding error to reused "
        "tokens", validator=attrs.validators.optional(one_of("float32", "float16", "bfloat16",
                                                             "float64")))
    budget_bytes: int | None = knob(
        None, doc="Byte budget of the residual store; None = unbounded.",
        trade="a smaller budget saves memory, costs counted recomputes (on_budget='evict')",
        converter=optional_int,
        validator=attrs.validators.optional(in_range(0)))
    on_budget: str = knob("evict", doc="What an over-budget put does: 'evict' (drop the "
                          "least recently used entries, counted; a reuse without residual "
                          "recomputes, counted) or 'error' (raise BudgetExceededError).",
                          validator=one_of("evict", "error"))
    check_finite: bool = knob(True, doc="Check stored residuals for NaN/Inf; a non-finite "
                              "residual is not stored and the next step recomputes (counted).",
                              trade="off saves one reduction per computed chunk",
                              converter=to_bool)
    sync_timing: bool = knob(False, doc="Synchronize the accelerator around block runs so "
                             "block time vs overhead is exact (costs a sync per call).",
                             converter=to_bool)
