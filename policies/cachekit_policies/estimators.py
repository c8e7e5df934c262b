"""Built-in motion estimators: per-token motion weights ``[N]`` for ``motioncache``.

Each estimator turns one chunk's signals into a motion map ``[F, HW]`` (pure functions in
:mod:`cachekit.motion`), normalises it per frame and returns it flattened, frame-major:

* ``frame_diff`` (default; MotionCache-SkyReels, §5.5): relative inter-frame difference of the
  chunk's block-stack **output** hidden states. Needs the output, so the policy calls it after
  a step (``uses_output = True``) and uses the weights at the next step (one step stale, as
  the reference).
* ``latent_diff`` (MotionCache-MAGI, §6.2): absolute inter-frame difference of the chunk's
  input **latent**, channel-mean, average-pooled to the token grid.
* ``flow_proxy``: normal-flow speed ``|dI/dt| / |grad I|`` of the channel-mean latent, pooled
  to tokens (:func:`cachekit.motion.flow_proxy_map`).

The two latent estimators read only the probe (``uses_output = False``): the policy calls them
*before* the step, on the latent this step denoises, i.e. the latent right after the previous
update, which is when MAGI-1 computes its weights.

Previous-chunk frame
--------------------
Frame 0 of chunk ``g`` is compared with the last frame of chunk ``g-1`` **at the same step**
``s`` (same noise level; the reference compares with ``g-1``'s latest step, §7.5). The estimator
publishes its chunk's last frame in the branch's window memory under
``("motion", name, chunk, step)`` and the next chunk pops it when it reaches that step. Memory
stays bounded: a consumer deletes the entry it reads and every older one of that chunk, and a
publisher keeps at most ``memory_steps`` of its own entries (enough while the schedule's
``ar_step < memory_steps``; otherwise the late chunk falls back as below). When no frame is
available (chunk 0, a previous chunk that is a clean prefix, a previous chunk that did not
publish at that step), frame 0 takes frame 1's map. The window memory is cleared by the
engine at every window start, so nothing is compared across windows or branches.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from cachekit.errors import ConfigError, invalid_value
from cachekit.motion import (
    NORM_MODES,
    flow_proxy_map,
    frame_diff_map,
    latent_diff_map,
    normalize_weights,
)
from cachekit.types import ChunkCall, Probe, tensor_repr

__all__ = [
    "FrameDiffEstimator",
    "LatentDiffEstimator",
    "FlowProxyEstimator",
    "ESTIMATORS",
    "memory_key",
]

#: Default number of own steps a chunk keeps published for the next chunk.
DEFAULT_MEMORY_STEPS = 8


def memory_key(name: str, chunk: int, step: int) -> tuple[str, str, int, int]:
    """Window-memory key of chunk ``chunk``'s last frame at step ``step``."""
    return ("motion", name, chunk, step)


def _entries(memory: dict, name: str, chunk: int) -> list[tuple]:
    return [k for k in memory if isinstance(k, tuple) and len(k) == 4 and k[0] == "motion"
            and k[1] == name and k[2] == chunk]


def take_previous(memory: dict, name: str, chunk: int, step: int) -> Optional[torch.Tensor]:
    """Pop chunk ``chunk-1``'s frame at ``step`` (None if absent) and drop its older ones."""
    if chunk == 0:
        return None
    prev = memory.pop(memory_key(name, chunk - 1, step), None)
    for k in _entries(memory, name, chunk - 1):
        if k[3] < step:  # chunk `chunk` is past those steps: nobody will read them
            del memory[k]
    return prev


def publish(memory: dict, name: str, chunk: int, step: int, frame: torch.Tensor,
            keep: int) -> None:
    """Store ``frame`` (a copy: never a view keeping the whole output alive) for chunk+1."""
    memory[memory_key(name, chunk, step)] = frame.detach().clone()
    for k in _entries(memory, name, chunk):
        if k[3] <= step - keep:
            del memory[k]


class _Estimator:
    """Shared options, validation, memory protocol and sanitising of the built-ins."""

    name: ClassVar[str] = ""
    uses_output: ClassVar[bool] = True

    def __init__(self, *, norm: str = "max_rescale", floor: float = 0.6, power: float = 1.0,
                 memory_steps: int = DEFAULT_MEMORY_STEPS) -> None:
        if norm not in NORM_MODES:
            raise ConfigError(invalid_value(f"{self.name} estimator norm",
                                            f"one of {list(NORM_MODES)}", norm))
        floor, power = float(floor), float(power)
        if not 0.0 <= floor <= 1.0:
            raise ConfigError(invalid_value(f"{self.name} estimator floor", "a number in [0, 1]",
                                            floor))
        if not (power > 0.0 and power < float("inf")):
            raise ConfigError(invalid_value(f"{self.name} estimator power", "a finite number > 0",
                                            power))
        if int(memory_steps) < 1:
            raise ConfigError(invalid_value(f"{self.name} estimator memory_steps", "an int >= 1",
                                            memory_steps))
        self.norm, self.floor, self.power = norm, floor, power
        self.memory_steps = int(memory_steps)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(norm={self.norm!r}, floor={self.floor}, "
                f"power={self.power}, memory_steps={self.memory_steps})")

    def _map(self, call: ChunkCall, probe: Probe, h_out: Optional[torch.Tensor],
             prev: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the motion map ``[F, HW]`` and this chunk's last frame to publish."""
        raise NotImplementedError

    def weights(self, call: ChunkCall, probe: Probe, h_out: Optional[torch.Tensor],
                memory: dict) -> torch.Tensor:
        """Per-token weights ``[N]`` (finite, ``>= 0``), frame-major; see the module docs."""
        prev = take_previous(memory, self.name, call.chunk, call.step)
        d, last = self._map(call, probe, h_out, prev)
        publish(memory, self.name, call.chunk, call.step, last, self.memory_steps)
        w = normalize_weights(d, self.norm, self.floor, self.power).reshape(-1)
        if w.numel() != call.num_tokens:
            raise ConfigError(invalid_value(
                f"{self.name} weights for {call.key}", f"{call.num_tokens} tokens "
                f"({call.frames} frames x {call.tokens_per_frame})", w.numel(),
                "probe.grid must match the call's frames and tokens per frame"))
        # NaN/Inf in the signal (a diverging sample) must not poison accumulators: fall back
        # to uniform weights for this chunk and step.
        if not bool(torch.isfinite(w).all()):
            return torch.ones_like(w)
        return w.clamp_min(0.0)


class FrameDiffEstimator(_Estimator):
    """Relative inter-frame difference of the output hidden states (§5.5)."""

    name: ClassVar[str] = "frame_diff"
    uses_output: ClassVar[bool] = True

    def _map(self, call, probe, h_out, prev):
        if h_out is None:
            raise ConfigError("frame_diff needs the chunk's block-stack output h_out; call it "
                              "after the step (uses_output=True)")
        f, hh, ww = probe.grid
        b, n, dim = h_out.shape
        if n != f * hh * ww:
            raise ConfigError(invalid_value("frame_diff h_out", f"[B, {f * hh * ww}, D] for "
                                            f"probe.grid {probe.grid}", tensor_repr(h_out)))
        hidden = h_out.reshape(b, f, hh * ww, dim)
        if prev is not None and prev.shape != (b, hh * ww, dim):
            prev = None  # geometry changed (cannot happen within a window); compare inside
        return frame_diff_map(hidden, prev), hidden[:, -1]


class _LatentEstimator(_Estimator):
    uses_output: ClassVar[bool] = False

    def _latent(self, probe: Probe) -> torch.Tensor:
        if probe.latent is None:
            raise ConfigError(f"motion estimator {self.name!r} needs probe.latent "
                              f"[B, C, F, H, W], but the model adapter passed None. Use "
                              f"estimator='frame_diff' with this adapter.")
        return probe.latent

    def _prev_ok(self, prev: Optional[torch.Tensor], latent: torch.Tensor):
        want = (latent.shape[0], latent.shape[1], latent.shape[3], latent.shape[4])
        return prev if prev is not None and tuple(prev.shape) == want else None


class LatentDiffEstimator(_LatentEstimator):
    """Absolute inter-frame latent difference, pooled to tokens (§6.2)."""

    name: ClassVar[str] = "latent_diff"

    def _map(self, call, probe, h_out, prev):
        x = self._latent(probe)
        return latent_diff_map(x, self._prev_ok(prev, x), probe.patch), x[:, :, -1]


class FlowProxyEstimator(_LatentEstimator):
    """Normal-flow speed on the latent, pooled to tokens (see :func:`flow_proxy_map`)."""

    name: ClassVar[str] = "flow_proxy"

    def __init__(self, *, blur: int = 3, eps: float = 1e-3, **options: Any) -> None:
        super().__init__(**options)
        if int(blur) < 1 or int(blur) % 2 == 0:
            raise ConfigError(invalid_value("flow_proxy estimator blur", "an odd int >= 1", blur))
        if not float(eps) > 0:
            raise ConfigError(invalid_value("flow_proxy estimator eps", "a number > 0", eps))
        self.blur, self.eps = int(blur), float(eps)

    def _map(self, call, probe, h_out, prev):
        x = self._latent(probe)
        return (flow_proxy_map(x, self._prev_ok(prev, x), probe.patch, blur=self.blur,
                               eps=self.eps), x[:, :, -1])


#: name -> (factory, description), registered by :mod:`cachekit_policies.plugin`.
ESTIMATORS: dict[str, tuple[type, str]] = {
    "frame_diff": (FrameDiffEstimator, (
        "Relative inter-frame difference of the chunk's output hidden states "
        "(MotionCache-SkyReels).")),
    "latent_diff": (LatentDiffEstimator, (
        "Absolute inter-frame difference of the input latent, pooled to tokens "
        "(MotionCache-MAGI).")),
    "flow_proxy": (FlowProxyEstimator, (
        "Normal-flow speed |dI/dt| / |grad I| of the latent, pooled to tokens (a cheap "
        "optical-flow proxy).")),
}
