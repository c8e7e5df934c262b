"""The plugin registry: built-ins through entry points, explicit plugins, loud failures."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from cachekit import hookspecs
from cachekit.config import ConfigBase
from cachekit.errors import ConfigError, PluginError
from cachekit.hookspecs import hookimpl
from cachekit.plugins import AUTOLOAD_ENV, KINDS, Registry, get_registry
from cachekit_policies.baseline import FixedIntervalConfig, FixedIntervalPolicy, NoneConfig


def entry_point_name(module: str) -> str:
    """The name under which the ``cachekit`` entry-point group declares ``module``."""
    names = {ep.name for ep in entry_points(group="cachekit") if ep.value == module}
    assert len(names) == 1, f"{module} declared as {names}"
    return names.pop()


class DemoPolicy:
    name = "demo"
    scope = None
    needs_residual = False

    def __init__(self, config, registry) -> None:
        self.config, self.registry = config, registry


class DemoPlugin:
    """A third-party plugin providing one of each kind."""

    @hookimpl
    def register_policies(self, register):
        register("demo", DemoPolicy, config=NoneConfig, description="a demo policy")

    @hookimpl
    def register_motion_estimators(self, register):
        register("demo_motion", lambda **o: ("estimator", o))

    @hookimpl
    def register_residual_stores(self, register):
        register("demo_store", lambda cfg: ("store", cfg))

    @hookimpl
    def register_model_adapters(self, register):
        register("demo_model", lambda **o: ("adapter", o))


# ------------------------------------------------------------------------------- built-ins
def test_builtins_are_registered_with_provider_and_distribution(registry):
    pol_ep = entry_point_name("cachekit_policies.plugin")
    for name, cfg in (("none", NoneConfig), ("fixed_interval", FixedIntervalConfig)):
        reg = registry.get("policy", name)
        assert reg.kind == "policy" and reg.name == name and reg.config is cfg
        assert reg.provider == pol_ep
        assert reg.distribution is not None and reg.distribution.startswith("cachekit ")
        assert reg.description
    assert registry.get("policy", "fixed_interval").factory is FixedIntervalPolicy
    store = registry.get("residual_store", "memory")
    assert store.provider == "cachekit.core" and store.distribution.startswith("cachekit ")
    model_ep = entry_point_name("cachekit_models.plugin")
    assert registry.get("model_adapter", "refdit").provider == model_ep
    d = registry.get("policy", "none").as_dict()
    assert d["config"] == "cachekit_policies.baseline.NoneConfig" and d["provider"] == pol_ep


def test_items_are_grouped_by_kind_and_sorted(registry):
    items = registry.items()
    kinds = [r.kind for r in items]
    assert kinds == sorted(kinds, key=list(KINDS).index)
    for kind in KINDS:
        names = [r.name for r in items if r.kind == kind]
        assert names == sorted(names) == registry.names(kind)


def test_autoload_disabled_by_env_leaves_only_the_core(monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reg = Registry()
    assert reg.names("policy") == []
    assert reg.names("residual_store") == ["memory"]
    assert "refdit" not in reg.names("model_adapter")
    assert {r.provider for r in reg.items()} == {"cachekit.core"}
    with pytest.raises(PluginError) as ei:
        reg.get("policy", "none")
    assert AUTOLOAD_ENV in str(ei.value)  # the error says why built-ins are missing


def test_autoload_false_argument(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    assert Registry(autoload=False).names("policy") == []
    monkeypatch.setenv(AUTOLOAD_ENV, "0")
    assert "none" in Registry().names("policy")
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "none" in Registry(autoload=True).names("policy")  # the argument wins


# ------------------------------------------------------------------------ explicit plugins
def test_add_plugin_registers_every_kind():
    reg = Registry(autoload=False)
    pname = reg.add_plugin(DemoPlugin(), name="demo_plugin")
    assert pname == "demo_plugin"
    for kind, name in (("policy", "demo"), ("motion_estimator", "demo_motion"),
                       ("residual_store", "demo_store"), ("model_adapter", "demo_model")):
        r = reg.get(kind, name)
        assert r.provider == "demo_plugin" and r.distribution is None
    pol = reg.create_policy("demo")
    assert isinstance(pol, DemoPolicy) and pol.registry is reg
    assert isinstance(pol.config, NoneConfig)
    assert reg.create_estimator("demo_motion", k=1) == ("estimator", {"k": 1})
    assert reg.create_store("demo_store", "cfg") == ("store", "cfg")
    assert reg.create_adapter("demo_model", seed=3) == ("adapter", {"seed": 3})


def test_plugins_argument_and_module_plugins():
    import types

    mod = types.ModuleType("my_module_plugin")

    @hookimpl
    def register_policies(register):
        register("mod_policy", DemoPolicy, config=NoneConfig)

    mod.register_policies = register_policies
    reg = Registry(autoload=False, plugins=[mod])
    assert reg.get("policy", "mod_policy").provider == "my_module_plugin"


def test_duplicate_name_rejected_naming_both_providers(fresh_registry):
    class Dup:
        @hookimpl
        def register_policies(self, register):
            register("none", DemoPolicy, config=NoneConfig)

    with pytest.raises(PluginError) as ei:
        fresh_registry.add_plugin(Dup(), name="dup_plugin")
    msg = str(ei.value)
    pol_ep = entry_point_name("cachekit_policies.plugin")
    assert "'none'" in msg and f"'{pol_ep}'" in msg and "'dup_plugin'" in msg
    assert "registered explicitly" in msg and "cachekit 0" in msg
    # the original stays
    assert fresh_registry.get("policy", "none").provider == pol_ep


def test_duplicate_store_name_against_the_core():
    class Dup:
        @hookimpl
        def register_residual_stores(self, register):
            register("memory", lambda cfg: None)

    with pytest.raises(PluginError, match="'cachekit.core'"):
        Registry(autoload=False, plugins=[Dup()])


def test_misspelled_hook_is_rejected_listing_valid_hooks():
    class Typo:
        @hookimpl
        def register_policys(self, register):  # sic
            register("typo", DemoPolicy, config=NoneConfig)

    reg = Registry(autoload=False)
    with pytest.raises(PluginError) as ei:
        reg.add_plugin(Typo(), name="typo_plugin")
    msg = str(ei.value)
    assert "register_policys" in msg and "register_policies" in msg
    for hook in Registry.hook_names():
        assert hook in msg
    assert "typo" not in reg.names("policy")


def test_a_rejected_plugin_does_not_poison_the_registry():
    class Typo:
        @hookimpl
        def register_policys(self, register):  # sic
            pass

    reg = Registry(autoload=False)
    with pytest.raises(PluginError):
        reg.add_plugin(Typo(), name="typo_plugin")
    reg.add_plugin(DemoPlugin(), name="fine")  # fails today: the typo is still pending
    assert "demo" in reg.names("policy")
    assert reg.pm.get_plugin("typo_plugin") is None


def test_hook_with_wrong_arguments_is_rejected():
    class WrongArgs:
        @hookimpl
        def register_policies(self, register, extra):
            pass

    with pytest.raises(PluginError) as ei:
        Registry(autoload=False).add_plugin(WrongArgs())
    assert "Valid hooks" in str(ei.value) and "extra" in str(ei.value)


def test_same_plugin_twice_is_rejected():
    reg = Registry(autoload=False)
    p = DemoPlugin()
    reg.add_plugin(p, name="once")
    with pytest.raises(PluginError, match="could not be registered"):
        reg.add_plugin(p, name="twice")


def test_unknown_names_list_the_registered_ones(registry):
    with pytest.raises(PluginError) as ei:
        registry.get("policy", "teacash")
    msg = str(ei.value)
    assert "'teacash'" in msg and str(registry.names("policy")) in msg
    assert "add_plugin" in msg
    with pytest.raises(PluginError, match="plugin kind"):
        registry.get("policies", "none")


@pytest.mark.parametrize("kwargs,needle", [
    ({"config": None}, "needs config="),
    ({"name": "Bad-Name"}, "lower_snake_case"),
    ({"name": "9lives"}, "lower_snake_case"),
    ({"factory": "not callable"}, "a callable"),
])
def test_bad_registrations_are_rejected(kwargs, needle):
    args = {"name": "ok_name", "factory": DemoPolicy, "config": NoneConfig} | kwargs

    class Bad:
        @hookimpl
        def register_policies(self, register):
            register(args["name"], args["factory"], config=args["config"])

    with pytest.raises(PluginError) as ei:
        Registry(autoload=False).add_plugin(Bad(), name="bad_plugin")
    msg = str(ei.value)
    assert needle in msg and repr(args["name"]) in msg


def test_stores_and_estimators_need_no_config():
    class P:
        @hookimpl
        def register_residual_stores(self, register):
            register("plain_store", lambda cfg: cfg)

    reg = Registry(autoload=False, plugins=[P()])
    assert reg.get("residual_store", "plain_store").config is None


# ---------------------------------------------------------------------- policy configuration
def test_policy_config_from_dict_preset_overrides(registry):
    assert registry.policy_config("fixed_interval") == FixedIntervalConfig()
    assert registry.policy_config("fixed_interval", {"interval": 5}).interval == 5
    assert registry.policy_config("fixed_interval", preset="fast", warmup_steps=0) == \
        FixedIntervalConfig(interval=3, warmup_steps=0)
    pol = registry.create_policy("fixed_interval", FixedIntervalConfig(interval=4))
    assert isinstance(pol, FixedIntervalPolicy) and pol.config.interval == 4
    with pytest.raises(ConfigError, match="either config or preset"):
        registry.policy_config("fixed_interval", {"interval": 5}, preset="fast")
    with pytest.raises(ConfigError, match="FixedIntervalConfig or a dict"):
        registry.policy_config("fixed_interval", NoneConfig())
    with pytest.raises(ConfigError, match="unknown setting"):
        registry.policy_config("fixed_interval", intervall=3)


def test_every_registered_policy_has_a_config_base(registry):
    for name in registry.names("policy"):
        cfg = registry.policy_config(name)
        assert isinstance(cfg, ConfigBase)


def test_get_registry_is_cached_and_refreshable():
    a = get_registry()
    assert get_registry() is a
    b = get_registry(refresh=True)
    assert b is not a and get_registry() is b


def test_hook_names_match_the_specs():
    specs = {n for n, fn in vars(hookspecs).items() if hasattr(fn, "cachekit_spec")}
    assert set(Registry.hook_names()) == specs
    assert set(KINDS.values()) <= specs
