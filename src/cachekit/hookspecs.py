"""The plugin manual: every hook cachekit calls, when, with what, and what a return means.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specs below (pluggy checks the names and argument names; a misspelled hook is an error when
the plugin is loaded). Plugins are found through the ``cachekit`` entry-point group (built-ins
too), or registered explicitly with :meth:`cachekit.plugins.Registry.add_plugin`.

Two kinds of hooks:

* **Discovery hooks** (``register_*``) are called once, when a :class:`~cachekit.plugins.Registry`
  loads. Each receives a ``register`` callback; call it once per thing you provide. The host
  records which plugin and distribution provided each name and rejects duplicates, naming both
  providers. Return values are ignored.
* **Lifecycle hooks** (``on_*``) are notifications for telemetry, logging and calibration
  recorders. They are called per run, window or chunk step, never per token. Return values
  are ignored; an exception propagates (a broken recorder should not pass silently).

Hook arguments are keyword arguments; an implementation may accept any subset of them.
"""

from __future__ import annotations

import pluggy

PROJECT = "cachekit"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator for plugin hook implementations: ``@cachekit.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Discovery hooks
# --------------------------------------------------------------------------------------------
@hookspec
def register_policies(register):
    """Register reuse policies.

    Called once when the registry loads.

    :param register: ``register(name, factory, *, config, description="")``.
        ``name`` is the public policy name (``[a-z][a-z0-9_]*``). ``config`` is the policy's
        config class (a frozen attrs :class:`~cachekit.config.ConfigBase`); ``factory(config,
        registry)`` returns an object satisfying :class:`~cachekit.protocols.Policy` (the
        registry lets a policy build the motion estimator its config names).
    :return: ignored.
    """


@hookspec
def register_motion_estimators(register):
    """Register motion estimators (per-token motion weights for motion-aware policies).

    Called once when the registry loads.

    :param register: ``register(name, factory, *, description="")``; ``factory(**options)``
        returns a :class:`~cachekit.protocols.MotionEstimator`.
    :return: ignored.
    """


@hookspec
def register_residual_stores(register):
    """Register residual stores (where cached residuals live).

    Called once when the registry loads.

    :param register: ``register(name, factory, *, description="")``; ``factory(config)`` with
        an :class:`~cachekit.config.EngineConfig` returns a
        :class:`~cachekit.protocols.ResidualStore`.
    :return: ignored.
    """


@hookspec
def register_model_adapters(register):
    """Register model adapters (models the samplers and the engine can drive).

    Called once when the registry loads.

    :param register: ``register(name, factory, *, description="")``; ``factory(**options)``
        returns a :class:`~cachekit.protocols.ModelAdapter` (for example the bundled model,
        loading its weights) or an object that patches a third-party model.
    :return: ignored.
    """


# --------------------------------------------------------------------------------------------
# Lifecycle hooks
# --------------------------------------------------------------------------------------------
@hookspec
def on_run_start(engine, info):
    """A generation run starts (:meth:`CacheEngine.begin_run`); all engine state is fresh.

    :param engine: the :class:`~cachekit.engine.CacheEngine`.
    :param info: a dict the caller passed to ``begin_run`` (model, seed, settings, ...).
    :return: ignored.
    """


@hookspec
def on_window_start(engine, window):
    """A window starts (:meth:`CacheEngine.begin_window`); per-window state was just reset.

    :param engine: the engine.
    :param window: the window index (0-based) within the run.
    :return: ignored.
    """


@hookspec
def on_step_end(engine, call, record):
    """One engine call finished: a (branch, chunk, step) was computed, reused or mixed.

    Called once per chunk step (or once per window step for window-scope policies), after the
    policy observed the outcome.

    :param engine: the engine.
    :param call: the :class:`~cachekit.types.ChunkCall`.
    :param record: the :class:`~cachekit.stats.CallRecord` just recorded (decision kind,
        computed tokens, reason, timings).
    :return: ignored.
    """


@hookspec
def on_window_end(engine, window):
    """A window ended (:meth:`CacheEngine.end_window`), before its state is dropped.

    :param engine: the engine.
    :param window: the window index.
    :return: ignored.
    """


@hookspec
def on_run_end(engine, summary):
    """A run ended (:meth:`CacheEngine.end_run`).

    :param engine: the engine.
    :param summary: the final :class:`~cachekit.stats.CacheStats`.
    :return: ignored.
    """
