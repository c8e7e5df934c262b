"""The reference residual store: residuals in memory, with byte accounting and a budget.

:class:`MemoryStore` keeps one residual ``[B, N, D]`` per ``(branch, chunk)`` key.

* **Byte accounting**: ``nbytes`` is what it holds now, ``peak_nbytes`` the maximum ever held.
* **Storage dtype**: with ``store_dtype`` set (e.g. ``bfloat16``), residuals are stored in that
  dtype and returned converted back to the dtype they were put with. This halves memory and
  adds rounding error to reused tokens; it never changes which tokens are reused.
* **Budget**: with ``budget_bytes`` set, a ``put`` that would exceed it either raises
  :class:`~cachekit.errors.BudgetExceededError` (``on_budget='error'``) or evicts least recently
  used entries (``on_budget='evict'``, counted in ``evictions``). An entry larger than the whole
  budget is not stored (also counted). A later ``get`` of a dropped key returns None and the
  engine recomputes that chunk, counting it: results never change silently.

Ownership: ``put`` takes ownership of the tensor it is given (no copy unless it is a view or
needs a dtype change) and ``get`` returns the stored tensor itself; callers (the engine) pass
fresh tensors and never modify what ``get`` returns.

It is registered by the core under the name ``memory`` (:mod:`cachekit._core_plugin`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from .config import EngineConfig
from .errors import BudgetExceededError, ResidualShapeError, invalid_value

__all__ = ["MemoryStore"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryStore:
    """In-memory residual store (see module docstring)."""

    name = "memory"

    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.budget = config.budget_bytes
        self.on_budget = config.on_budget
        self.storage_dtype = _DTYPES[config.store_dtype] if config.store_dtype else None
        # key -> (stored tensor, dtype it was put with); order = recency (last = most recent)
        self._data: "OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.dtype]]" = OrderedDict()
        self.nbytes = 0
        self.peak_nbytes = 0
        self.evictions = 0
        self.rejected = 0

    # -- queries ------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[tuple[str, int]]:
        return list(self._data)

    def get(self, key: tuple[str, int]) -> Optional[torch.Tensor]:
        """The residual for ``key`` in the dtype it was put with, or None if absent/dropped."""
        entry = self._data.get(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        stored, dtype = entry
        return stored if stored.dtype == dtype else stored.to(dtype)

    # -- mutation -----------------------------------------------------------------------------
    def put(self, key: tuple[str, int], residual: torch.Tensor) -> None:
        """Store a full residual for ``key`` (replacing any previous one)."""
        if not isinstance(residual, torch.Tensor) or residual.dim() != 3:
            raise ResidualShapeError(invalid_value(f"residual for {key}", "a [B, N, D] tensor",
                                                   getattr(residual, "shape", residual)))
        dtype = residual.dtype
        stored = residual.detach()
        if self.storage_dtype is not None and stored.dtype != self.storage_dtype:
            stored = stored.to(self.storage_dtype)
        elif not stored.is_contiguous() or \
                stored.untyped_storage().nbytes() > _nbytes(stored):
            # a view would keep its whole base tensor alive: hold (and count) only our bytes
            stored = stored.clone(memory_format=torch.contiguous_format)
        size = _nbytes(stored)
        self.discard(key)
        if self.budget is not None and size > self.budget and self.on_budget == "evict":
            # larger than the whole budget: reject it without evicting anything else
            self.rejected += 1
            return
        if self.budget is not None and self.nbytes + size > self.budget:
            if self.on_budget == "error":
                raise BudgetExceededError(
                    f"residual store budget_bytes={self.budget}: storing {key} ({size} bytes) "
                    f"would hold {self.nbytes + size} bytes. Raise budget_bytes, set "
                    f"store_dtype='bfloat16', or set on_budget='evict' to recompute instead.")
            while self._data and self.nbytes + size > self.budget:
                old_key, (old, _) = self._data.popitem(last=False)
                self.nbytes -= _nbytes(old)
                self.evictions += 1
            if self.nbytes + size > self.budget:
                self.rejected += 1
                return
        self._data[key] = (stored, dtype)
        self.nbytes += size
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def update(self, key: tuple[str, int], tokens: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the residual of ``key`` at token indices ``tokens`` (dim 1) in place."""
        entry = self._data.get(key)
        if entry is None:
            raise KeyError(f"no residual stored for {key}; put() a full residual first")
        stored, _ = entry
        if values.dim() != 3 or values.shape[0] != stored.shape[0] or \
                values.shape[2] != stored.shape[2] or values.shape[1] != tokens.numel():
            raise ResidualShapeError(invalid_value(
                f"token update for {key}",
                f"[B={stored.shape[0]}, K={tokens.numel()}, D={stored.shape[2]}]",
                tuple(values.shape)))
        stored.index_copy_(1, tokens.to(stored.device), values.detach().to(stored.dtype))
        self._data.move_to_end(key)

    def discard(self, key: tuple[str, int]) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            self.nbytes -= _nbytes(entry[0])

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0

    def check_valid(self) -> None:
        """Assert internal invariants (used by tests and ``--debug`` runs)."""
        total = sum(_nbytes(t) for t, _ in self._data.values())
        assert total == self.nbytes, f"byte accounting drifted: {total} != {self.nbytes}"
        assert self.nbytes <= self.peak_nbytes
        if self.budget is not None:
            assert self.nbytes <= self.budget, f"holding {self.nbytes} > budget {self.budget}"
        for key, (t, _) in self._data.items():
            assert t.dim() == 3, f"{key}: stored tensor is not [B, N, D]"
            if self.storage_dtype is not None:
                assert t.dtype == self.storage_dtype

