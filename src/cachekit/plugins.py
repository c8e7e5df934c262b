"""Plugin manager: discovery through entry points, explicit loading, name registries.

``Registry()`` loads every plugin of the ``cachekit`` entry-point group (the built-in policies
and models are such plugins; the core never imports them), unless the environment variable
``CACHEKIT_DISABLE_PLUGIN_AUTOLOAD=1`` is set or ``autoload=False`` is passed. Plugins can also
be added explicitly with :meth:`Registry.add_plugin` (a module or an object with hookimpls).

The discovery hooks are called per plugin with a ``register`` callback bound to that plugin, so
the registry knows which plugin (and which installed distribution) provided every name, and a
duplicate name is rejected naming both providers.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Optional

import attrs
import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError, invalid_value

__all__ = ["Registry", "Registered", "get_registry", "KINDS", "AUTOLOAD_ENV", "DEFAULT_MODEL"]

AUTOLOAD_ENV = "CACHEKIT_DISABLE_PLUGIN_AUTOLOAD"
#: The model adapter commands and runners use when none is named: the bundled model, looked
#: up in the registry by this name like any other adapter (the core never imports it).
DEFAULT_MODEL = "refdit"
ENTRY_POINT_GROUP = "cachekit"

#: kind -> discovery hook name
KINDS = {
    "policy": "register_policies",
    "motion_estimator": "register_motion_estimators",
    "residual_store": "register_residual_stores",
    "model_adapter": "register_model_adapters",
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@attrs.frozen
class Registered:
    """One registered factory and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any] = attrs.field(eq=False, repr=False)
    provider: str
    distribution: Optional[str]
    description: str = ""
    config: Optional[type] = attrs.field(default=None, eq=False)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "provider": self.provider,
                "distribution": self.distribution, "description": self.description,
                "config": None if self.config is None else
                f"{self.config.__module__}.{self.config.__qualname__}"}


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class Registry:
    """Everything cachekit can build by name: policies, estimators, stores, model adapters."""

    def __init__(self, *, autoload: bool | None = None, plugins: Iterable[Any] = ()) -> None:
        from . import __version__, _core_plugin

        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._items: dict[str, dict[str, Registered]] = {k: {} for k in KINDS}
        self._dists: dict[str, str] = {}
        # The core's own reference store is always there (an engine needs one even with
        # autoload off); policies and models come only from plugins.
        self.pm.register(_core_plugin, name="cachekit.core")
        self._dists["cachekit.core"] = f"cachekit {__version__}"
        if autoload is None:
            autoload = not _autoload_disabled()
        if autoload:
            try:
                self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except pluggy.PluginValidationError as exc:
                raise PluginError(self._explain_validation(exc)) from exc
            except ValueError as exc:  # the same module under two entry-point names
                raise PluginError(
                    f"loading the {ENTRY_POINT_GROUP!r} entry points failed: {exc}. An installed "
                    f"distribution declares the same plugin twice (often stale metadata: "
                    f"reinstall it).") from exc
            for plugin, dist in self.pm.list_plugin_distinfo():
                name = self.pm.get_name(plugin)
                if name is not None:
                    self._dists[name] = f"{dist.project_name} {dist.version}"
        self._check_pending()
        for plugin_name in list(self._dists):
            self._discover(plugin_name)
        for p in plugins:
            self.add_plugin(p)

    # -- loading ------------------------------------------------------------------------------
    def add_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module explicitly and run its discovery hooks.

        All or nothing: a plugin that fails validation or provides a duplicate name is
        unregistered again, and whatever it had registered is removed.
        """
        try:
            plugin_name = self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(self._explain_validation(exc)) from exc
        except ValueError as exc:
            raise PluginError(f"plugin {name or plugin!r} could not be registered: {exc}") from exc
        if plugin_name is None:  # blocked
            raise PluginError(f"plugin {name or plugin!r} is blocked")
        before = {kind: dict(items) for kind, items in self._items.items()}
        try:
            self._check_pending()
            self._discover(plugin_name)
        except BaseException:
            self.pm.unregister(name=plugin_name)
            self._items = before
            raise
        return plugin_name

    def _explain_validation(self, exc: pluggy.PluginValidationError) -> str:
        return (f"plugin {getattr(exc, 'plugin', '?')!r} failed validation: {exc}. "
                f"Valid hooks: {sorted(self.hook_names())}")

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"{exc}. Hook names are fixed by cachekit.hookspecs; valid hooks: "
                f"{sorted(self.hook_names())}. Check the spelling of the function name.") from exc

    @staticmethod
    def hook_names() -> list[str]:
        return [n for n in dir(hookspecs) if n.startswith(("register_", "on_"))]

    def _discover(self, plugin_name: str) -> None:
        plugin = self.pm.get_plugin(plugin_name)
        dist = self._dists.get(plugin_name)
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                impl.function(register=self._make_register(kind, plugin_name, dist))

    def _make_register(self, kind: str, provider: str, dist: Optional[str]):
        def register(name: str, factory: Callable[..., Any], *, config: type | None = None,
                     description: str = "") -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise PluginError(invalid_value(f"{kind} name from plugin {provider!r}",
                                                "lower_snake_case matching [a-z][a-z0-9_]*", name))
            if not callable(factory):
                raise PluginError(invalid_value(f"{kind} {name!r} factory", "a callable", factory))
            if kind == "policy" and config is None:
                raise PluginError(f"policy {name!r} from plugin {provider!r}: register(...) needs "
                                  "config=<its ConfigBase class>")
            existing = self._items[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"duplicate {kind} name {name!r}: provided by plugin {existing.provider!r} "
                    f"({existing.distribution or 'registered explicitly'}) and by plugin "
                    f"{provider!r} ({dist or 'registered explicitly'}). Rename one of them or "
                    f"unregister one plugin.")
            self._items[kind][name] = Registered(kind, name, factory, provider, dist,
                                                 description, config)
        return register

    # -- lookup -------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> Registered:
        if kind not in self._items:
            raise PluginError(invalid_value("plugin kind", f"one of {sorted(KINDS)}", kind))
        try:
            return self._items[kind][name]
        except KeyError:
            hint = ""
            if _autoload_disabled():
                hint = f" ({AUTOLOAD_ENV} is set, so installed plugins were not loaded)"
            raise PluginError(
                f"unknown {kind} {name!r}; registered: {self.names(kind)}{hint}. Install the "
                f"plugin that provides it, or register it with Registry.add_plugin().") from None

    def items(self) -> list[Registered]:
        return [r for kind in KINDS for r in sorted(self._items[kind].values(),
                                                      key=lambda r: r.name)]

    # -- factories ----------------------------------------------------------------------------
    def policy_config(self, name: str, config: Any = None, *, preset: str | None = None,
                      **overrides: Any) -> Any:
        """Build (and validate) the config of policy ``name`` from a config, preset or dict."""
        reg = self.get("policy", name)
        cls = reg.config
        if config is not None and not isinstance(config, cls):  # type: ignore[arg-type]
            if isinstance(config, dict):
                config = cls.from_dict(config)  # type: ignore[union-attr]
            else:
                raise ConfigError(invalid_value(f"config of policy {name!r}",
                                                f"a {cls.__name__} or a dict", config))  # type: ignore[union-attr]
        if config is None:
            config = cls.from_preset(preset) if preset else cls()  # type: ignore[misc, union-attr]
        elif preset:
            raise ConfigError(f"policy {name!r}: pass either config or preset, not both")
        if overrides:
            config = config.evolve(**overrides)
        return config

    def create_policy(self, name: str, config: Any = None, *, preset: str | None = None,
                      **overrides: Any) -> Any:
        cfg = self.policy_config(name, config, preset=preset, **overrides)
        return self.get("policy", name).factory(cfg, self)

    def create_estimator(self, name: str, **options: Any) -> Any:
        return self.get("motion_estimator", name).factory(**options)

    def create_store(self, name: str, config: Any) -> Any:
        return self.get("residual_store", name).factory(config)

    def create_adapter(self, name: str, **options: Any) -> Any:
        return self.get("model_adapter", name).factory(**options)

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        return self.pm.hook


_DEFAULT: Optional[Registry] = None


def get_registry(*, refresh: bool = False) -> Registry:
    """The process-wide default registry (autoloaded once; ``refresh=True`` reloads)."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = Registry()
    return _DEFAULT
