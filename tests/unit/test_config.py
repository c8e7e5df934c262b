"""Config values: validation messages, TOML/JSON round trip, tags, --set parsing, presets."""

from __future__ import annotations

import json
import re
from typing import ClassVar

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.config import (
    ConfigBase,
    EngineConfig,
    in_range,
    knob,
    one_of,
    optional_int,
    parse_overrides,
    to_bool,
)
from cachekit.errors import ConfigError
from cachekit.testing import strategies as cks
from cachekit_policies.baseline import FixedIntervalConfig

SAFE = re.compile(r"[A-Za-z0-9._+-]+")


@attrs.frozen(kw_only=True)
class DemoConfig(ConfigBase):
    """A config with one knob of each kind a policy uses."""

    tag_prefix: ClassVar[str] = "demo"
    presets: ClassVar[dict] = {"slow": {"threshold": 0.05}, "fast": {"threshold": 0.3,
                                                                      "mode": "b"}}

    threshold: float = knob(0.1, converter=float, validator=in_range(0, 1, hi_open=True),
                            doc="d", trade="t")
    warmup_steps: int = knob(2, converter=int, validator=in_range(0), doc="d")
    mode: str = knob("a", validator=one_of("a", "b", "a_b"), doc="d")
    flag: bool = knob(False, converter=to_bool, doc="d")
    limit: int | None = knob(None, converter=optional_int,
                             validator=attrs.validators.optional(in_range(1)), doc="d")


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs,needles", [
    ({"on_budget": "x"}, ["EngineConfig.on_budget", "['evict', 'error']", "'x'"]),
    ({"budget_bytes": -1}, ["EngineConfig.budget_bytes", "[0, inf]", "-1"]),
    ({"store_dtype": "int8"}, ["EngineConfig.store_dtype", "bfloat16", "'int8'"]),
])
def test_engine_config_errors_name_field_range_and_value(kwargs, needles):
    with pytest.raises(ConfigError) as ei:
        EngineConfig(**kwargs)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


@pytest.mark.parametrize("kwargs,needles", [
    ({"threshold": 1.0}, ["DemoConfig.threshold", "[0, 1)", "1.0"]),
    ({"threshold": float("nan")}, ["DemoConfig.threshold", "finite", "nan"]),
    ({"threshold": -0.5}, ["DemoConfig.threshold", "-0.5"]),
    ({"warmup_steps": -2}, ["DemoConfig.warmup_steps", "[0, inf]", "-2"]),
    ({"mode": "c"}, ["DemoConfig.mode", "['a', 'b', 'a_b']", "'c'"]),
    ({"limit": 0}, ["DemoConfig.limit", "[1, inf]", "0"]),
])
def test_knob_validators_name_field_range_and_value(kwargs, needles):
    with pytest.raises(ConfigError) as ei:
        DemoConfig(**kwargs)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_fixed_interval_validation():
    with pytest.raises(ConfigError, match=r"FixedIntervalConfig\.interval.*\[1, inf\].*0"):
        FixedIntervalConfig(interval=0)
    with pytest.raises(ConfigError, match=r"FixedIntervalConfig\.warmup_steps"):
        FixedIntervalConfig(warmup_steps=-1)


@pytest.mark.parametrize("cls,field,value", [(EngineConfig, "check_finite", "maybe"),
                                             (EngineConfig, "budget_bytes", "lots"),
                                             (FixedIntervalConfig, "interval", "two")])
def test_converter_errors_name_the_field(cls, field, value):
    with pytest.raises(ConfigError) as ei:
        cls(**{field: value})
    assert field in str(ei.value) and repr(value) in str(ei.value)


def test_converters():
    assert [to_bool(v) for v in (True, 1, "yes", " ON ", "true")] == [True] * 5
    assert [to_bool(v) for v in (False, 0, "no", "off", "False")] == [False] * 5
    for bad in (2, "maybe", None):
        with pytest.raises(ConfigError):
            to_bool(bad)
    assert optional_int("none") is None and optional_int("") is None
    assert optional_int("12") == 12 and optional_int(None) is None


def test_string_values_are_converted():
    c = EngineConfig(budget_bytes="1024", check_finite="false", sync_timing="1")
    assert c.budget_bytes == 1024 and c.check_finite is False and c.sync_timing is True
    assert DemoConfig(threshold="0.25").threshold == 0.25


def test_configs_are_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        EngineConfig().on_budget = "error"  # type: ignore[misc]


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("cfg", [
    EngineConfig(),
    EngineConfig(budget_bytes=4096, store_dtype="bfloat16", on_budget="error",
                 check_finite=False, sync_timing=True),
    FixedIntervalConfig(interval=5, warmup_steps=0, compute_last=False),
    DemoConfig(threshold=0.123456789, mode="a_b", flag=True, limit=3),
])
def test_save_load_round_trip(tmp_path, cfg, suffix):
    path = cfg.save(tmp_path / f"cfg{suffix}")
    assert path.is_file()
    loaded = type(cfg).load(path)
    assert loaded == cfg and loaded.to_dict() == cfg.to_dict()
    if suffix == ".json":
        assert json.loads(path.read_text()) == {k: v for k, v in cfg.to_dict().items()
                                                if v is not None}


def test_load_and_save_errors(tmp_path):
    with pytest.raises(ConfigError, match="existing"):
        EngineConfig.load(tmp_path / "missing.toml")
    bad = tmp_path / "cfg.yaml"
    bad.write_text("x: 1")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        EngineConfig.load(bad)
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        EngineConfig().save(tmp_path / "cfg.yaml")


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as ei:
        EngineConfig.from_dict({"budget": 1, "on_budget": "evict", "zzz": 2})
    msg = str(ei.value)
    assert "['budget', 'zzz']" in msg and "budget_bytes" in msg and "on_budget" in msg
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"intervall": 3}))
    with pytest.raises(ConfigError, match="intervall"):
        FixedIntervalConfig.load(p)
    with pytest.raises(ConfigError, match="mapping"):
        EngineConfig.from_dict([("a", 1)])  # type: ignore[arg-type]


def test_evolve_validates_and_rejects_unknown_names():
    c = FixedIntervalConfig()
    assert c.evolve(interval=4) == FixedIntervalConfig(interval=4)
    assert c.interval == 2  # unchanged
    with pytest.raises(ConfigError, match="interval"):
        c.evolve(interval=0)
    with pytest.raises(ConfigError, match="unknown setting"):
        c.evolve(intervall=4)


# ------------------------------------------------------------------------------------ tags
def test_tag_is_the_prefix_for_defaults():
    assert EngineConfig().tag() == "engine"
    assert FixedIntervalConfig().tag() == "fixed"
    assert DemoConfig().tag() == "demo"


@pytest.mark.parametrize("cfg", [
    EngineConfig(budget_bytes=10, store_dtype="float16", on_budget="error", check_finite=False),
    FixedIntervalConfig(interval=7, compute_last=False),
    DemoConfig(threshold=0.5, mode="a_b", flag=True, limit=4, warmup_steps=0),
])
def test_tag_is_filename_safe_and_names_changed_settings(cfg):
    tag = cfg.tag()
    assert SAFE.fullmatch(tag), tag
    assert tag.startswith(cfg.tag_prefix + "_")
    assert tag != type(cfg)().tag()


def test_tag_differs_per_setting():
    tags = {FixedIntervalConfig(**kw).tag() for kw in (
        {}, {"interval": 3}, {"interval": 4}, {"warmup_steps": 3}, {"compute_last": False},
        {"interval": 3, "warmup_steps": 3})}
    assert len(tags) == 6


def test_a_path_setting_is_tagged_by_its_file_content(tmp_path):
    from cachekit_policies.flowcache import FlowCacheConfig

    a, b, c = (tmp_path / "one" / "cal.json", tmp_path / "two" / "cal.json",
               tmp_path / "three" / "cal.json")
    body = ('{"format": "cachekit.calibration/1", "model": "m", "indicator": "modulation", '
            '"coefficients": [1.0, 0.0], "x_range": [0.0, 1.0]}')
    for p, text in ((a, body), (b, body), (c, body.replace("[1.0, 0.0]", "[2.0, 0.0]"))):
        p.parent.mkdir()
        p.write_text(text)
    tag = {p: FlowCacheConfig(coefficients_file=str(p)).tag() for p in (a, b, c)}
    assert tag[a] == tag[b] != tag[c]          # two copies are one setting, an edit is another
    assert "cal.json" in tag[a] and str(tmp_path) not in tag[a]
    gone = FlowCacheConfig(coefficients_file=str(tmp_path / "x" / "cal.json"))
    assert gone.tag() != tag[a]


@pytest.mark.parametrize("a,b", [({"threshold": 0.1234567}, {"threshold": 0.1234568}),
                                 ({"mode": "a_b"}, {"mode": "ab"}),
                                 ({"coeffs": (1.0, 20.0)}, {"coeffs": (1.02, 0.0)})])
def test_tag_differs_for_close_floats_and_stripped_strings(a, b):
    @attrs.frozen(kw_only=True)
    class Tagged(ConfigBase):
        tag_prefix: ClassVar[str] = "t"
        threshold: float = knob(0.1, converter=float, doc="d")
        mode: str = knob("x", doc="d")
        coeffs: tuple = knob((), converter=tuple, doc="d")

    assert Tagged(**a).tag() != Tagged(**b).tag()


FIXED = st.builds(FixedIntervalConfig, interval=st.integers(1, 10 ** 6),
                  warmup_steps=st.integers(0, 10 ** 6), compute_last=st.booleans())


@settings(max_examples=60, deadline=None)
@given(cfg=FIXED, suffix=st.sampled_from([".toml", ".json"]))
def test_fixed_interval_round_trip_property(tmp_path_factory, cfg, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    assert FixedIntervalConfig.load(cfg.save(path)) == cfg
    assert FixedIntervalConfig.from_dict(cfg.to_dict()) == cfg
    assert SAFE.fullmatch(cfg.tag())


@settings(max_examples=60, deadline=None)
@given(a=FIXED, b=FIXED)
def test_fixed_interval_tags_differ_when_settings_differ(a, b):
    assert (a.tag() == b.tag()) == (a == b)


@settings(max_examples=40, deadline=None)
@given(cfg=cks.engine_configs())
def test_engine_config_round_trip_property(tmp_path_factory, cfg):
    d = tmp_path_factory.mktemp("eng")
    for suffix in (".toml", ".json"):
        assert EngineConfig.load(cfg.save(d / f"e{suffix}")) == cfg
    assert SAFE.fullmatch(cfg.tag())


# ------------------------------------------------------------------------- --set parsing
def test_parse_overrides_values():
    got = parse_overrides(["a=1", "b=true", "c=hello", "d=[1, 2]", "e=none", "f= 0.5 ",
                           "g=x=y", " h =False", "i=null", "j=1e-3", "k="])
    assert got == {"a": 1, "b": True, "c": "hello", "d": [1, 2], "e": None, "f": 0.5,
                   "g": "x=y", "h": False, "i": None, "j": 0.001, "k": ""}
    assert isinstance(got["a"], int) and isinstance(got["f"], float)


@pytest.mark.parametrize("item,needle", [("threshold", "KEY=VALUE"), ("=3", "non-empty KEY")])
def test_parse_overrides_errors(item, needle):
    with pytest.raises(ConfigError) as ei:
        parse_overrides([item])
    assert needle in str(ei.value) and "--set" in str(ei.value) and repr(item) in str(ei.value)


def test_overrides_feed_a_config():
    cfg = FixedIntervalConfig().evolve(**parse_overrides(["interval=4", "compute_last=false"]))
    assert cfg == FixedIntervalConfig(interval=4, compute_last=False)


# -------------------------------------------------------------------------------- presets
def test_presets_of_builtin_policies_load(registry):
    names = registry.names("policy")
    assert {"none", "fixed_interval"} <= set(names)
    for name in names:
        reg = registry.get("policy", name)
        cls = reg.config
        assert issubclass(cls, ConfigBase)
        for preset, values in cls.presets.items():
            cfg = cls.from_preset(preset)
            assert isinstance(cfg, cls)
            for k, v in values.items():
                assert cfg.to_dict()[k] == cls.from_dict({k: v}).to_dict()[k]
            assert registry.policy_config(name, preset=preset) == cfg


def test_from_preset_errors_and_overrides():
    assert FixedIntervalConfig.from_preset("fast") == FixedIntervalConfig(interval=3)
    assert FixedIntervalConfig.from_preset("fast", warmup_steps=0).warmup_steps == 0
    with pytest.raises(ConfigError) as ei:
        FixedIntervalConfig.from_preset("turbo")
    assert "['fast', 'slow']" in str(ei.value) and "'turbo'" in str(ei.value)


def test_knob_docs_rows():
    rows = {r["name"]: r for r in DemoConfig.knob_docs()}
    assert list(rows) == ["threshold", "warmup_steps", "mode", "flag", "limit"]
    assert rows["threshold"] == {"name": "threshold", "default": 0.1, "doc": "d", "trade": "t"}
    for r in EngineConfig.knob_docs():
        assert r["doc"], f"EngineConfig.{r['name']} has no doc"
