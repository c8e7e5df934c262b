"""Entry point of the diffusers integration (group ``cachekit``): the ``diffusers_skyreels`` patcher.

Loaded whenever a registry autoloads, so it must stay cheap and must not import diffusers: the
patcher recognises targets by class name and imports
:mod:`cachekit_models.diffusers_skyreels` (and diffusers) only to enable a cache.

The registered factory *is* the patcher (a :class:`cachekit.integrations.ModelPatcher`):
:func:`cachekit.enable_cache` asks every registered model adapter whose factory has
``handles``/``enable`` whether it handles the object. It is not a sampler model:
``registry.create_adapter("diffusers_skyreels")`` raises a message pointing to
``cachekit.enable_cache``.
"""

from __future__ import annotations

from typing import Any, Optional

from cachekit.errors import PluginError
from cachekit.hookspecs import hookimpl

__all__ = ["SkyReelsV2DiffusersPatcher", "PATCHER"]

_PIPELINES = ("SkyReelsV2DiffusionForcingPipeline",
              "SkyReelsV2DiffusionForcingImageToVideoPipeline",
              "SkyReelsV2DiffusionForcingVideoToVideoPipeline")
_TRANSFORMERS = ("SkyReelsV2Transformer3DModel",)


def _class_names(obj: Any) -> list[tuple[str, str]]:
    return [(c.__module__, c.__name__) for c in type(obj).__mro__]


def _is_diffusers(obj: Any, names: tuple[str, ...]) -> bool:
    return any(mod.split(".")[0] == "diffusers" and name in names
               for mod, name in _class_names(obj))


class SkyReelsV2DiffusersPatcher:
    """Patches diffusers' SkyReels-V2 diffusion-forcing pipelines (and their transformer)."""

    name = "diffusers_skyreels"

    def __call__(self, **options: Any) -> Any:
        raise PluginError(
            "model adapter 'diffusers_skyreels' patches a diffusers pipeline in place; it is "
            "not a model cachekit's sampler can drive. Use cachekit.enable_cache(pipe, "
            "policy=...) on a SkyReelsV2DiffusionForcingPipeline (see docs/diffusers.md).")

    # -- ModelPatcher -------------------------------------------------------------------------
    def handles(self, target: Any) -> bool:
        return _is_diffusers(target, _PIPELINES + _TRANSFORMERS)

    def explain(self, target: Any) -> str:
        if _is_diffusers(target, ("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline")):
            return ("a SkyReels-V2 pipeline without diffusion forcing (one timestep for all "
                    "frames); use a SkyReelsV2DiffusionForcing* pipeline")
        return (f"handles only diffusers' {', '.join(_PIPELINES + _TRANSFORMERS)}, not a "
                f"{type(target).__module__}.{type(target).__name__}")

    def enable(self, target: Any, engine: Any, *, mode: str = "auto", **options: Any) -> Any:
        if options:
            from cachekit.errors import ConfigError

            raise ConfigError(f"diffusers_skyreels: unknown option(s) {sorted(options)}; "
                              f"valid: mode")
        from .diffusers_skyreels import _runtime

        return _runtime.enable(target, engine, mode=mode)

    def disable(self, target: Any) -> None:
        from .diffusers_skyreels import _runtime

        _runtime.disable(target)

    def engine_of(self, target: Any) -> Optional[Any]:
        if not self.handles(target):
            return None
        from .diffusers_skyreels import _runtime

        return _runtime.engine_of(target)

    def __repr__(self) -> str:
        return "SkyReelsV2DiffusersPatcher()"


PATCHER = SkyReelsV2DiffusersPatcher()


@hookimpl
def register_model_adapters(register):
    register("diffusers_skyreels", PATCHER,
             description="diffusers' SkyReels-V2 diffusion-forcing pipelines (T2V, I2V, V2V) "
                         "patched in place by cachekit.enable_cache(pipe); needs "
                         "pip install 'cachekit[diffusers]'.")
