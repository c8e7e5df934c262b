"""The core's own plugin: the reference residual store and the toy model adapter.

Registered on every :class:`~cachekit.plugins.Registry` (also with autoload disabled): an engine
always needs a store, and the toy model lets anyone try a policy without the bundled weights.
Policies and real models come only from entry-point plugins.
"""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_residual_stores(register):
    from .store import MemoryStore

    register("memory", MemoryStore,
             description="In-memory residuals with byte accounting, storage dtype and budget.")


def _toy(**options):
    from .testing.toy import ToyModel

    return ToyModel(**options)


@hookimpl
def register_model_adapters(register):
    register("toy", _toy, description="A tiny random-weight block-causal model for fast tests "
             "(cachekit.testing.ToyModel); not a generative model.")
