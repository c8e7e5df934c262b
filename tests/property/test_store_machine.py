"""MemoryStore against a shadow dict ("a dict with losses"), as a hypothesis state machine.

The shadow holds, per key, exactly what a correct store must return: the last residual put
with token updates applied, each value rounded through the storage dtype (what a storage dtype
is allowed to change) and converted back to the dtype it was put with. Under a budget the store
may drop entries (the shadow follows, checking that only least recently used keys went and that
every drop was counted), but what it returns is never stale, never another key's, never of the
wrong shape or dtype.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cachekit.config import EngineConfig
from cachekit.errors import BudgetExceededError, ResidualShapeError
from cachekit.store import MemoryStore
from cachekit.testing import strategies as cks

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3))
PUT_DTYPES = st.sampled_from([torch.float32, torch.float64])
KEYS = cks.store_keys(branches=("cond", "uncond"), max_chunk=2)


def rounded(values: torch.Tensor, storage, put_dtype) -> torch.Tensor:
    """What a store may return for ``values``: through the storage dtype, back to put dtype."""
    through = storage if storage is not None else put_dtype
    return values.to(through).to(put_dtype)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store: MemoryStore | None = None
        # key -> expected tensor (already rounded, in the put dtype); order = recency
        self.shadow: "OrderedDict[tuple[str, int], torch.Tensor]" = OrderedDict()

    @initialize(cfg=cks.engine_configs(budgets=st.one_of(st.none(), st.integers(0, 8), st.integers(32, 160)),
                                       store_dtypes=cks.storage_dtypes(),
                                       on_budget=("evict", "evict", "error")))
    def make_store(self, cfg: EngineConfig) -> None:
        note(f"config: {cfg}")
        self.cfg = cfg
        self.store = MemoryStore(cfg)
        self.storage = _TORCH[cfg.store_dtype] if cfg.store_dtype else None

    # -- rules --------------------------------------------------------------------------------
    @rule(key=KEYS, shape=SHAPES, dtype=PUT_DTYPES, data=st.data())
    def put(self, key, shape, dtype, data):
        if data.draw(st.integers(0, 9)) == 0:  # now and then, a tensor that is not [B, N, D]
            return self.put_wrong_rank(key, data.draw(st.sampled_from([1, 2, 4])))
        r = data.draw(cks.residuals(shape, dtype=dtype, bound=64.0))
        s = self.store
        before_ev, before_rej = s.evictions, s.rejected
        others = [k for k in self.shadow if k != key]  # recency order, oldest first
        size = r.numel() * (self.storage.itemsize if self.storage else r.element_size())
        try:
            s.put(key, r)
        except BudgetExceededError as exc:
            assert self.cfg.on_budget == "error"
            assert self.cfg.budget_bytes is not None
            assert f"budget_bytes={self.cfg.budget_bytes}" in str(exc)
            self.shadow.pop(key, None)  # the old value of key was replaced by nothing
            assert s.evictions == before_ev
            return
        lost = [k for k in others if k not in s]
        # only the least recently used entries go, and each one is counted
        assert lost == others[:len(lost)], (lost, others)
        assert s.evictions - before_ev == len(lost)
        if lost:
            assert self.cfg.budget_bytes is not None and self.cfg.on_budget == "evict"
        for k in lost:
            del self.shadow[k]
        self.shadow.pop(key, None)
        if key in s:
            assert s.rejected == before_rej
            self.shadow[key] = rounded(r, self.storage, dtype)
        else:  # rejected: larger than the whole budget
            assert self.cfg.budget_bytes is not None and size > self.cfg.budget_bytes
            assert s.rejected == before_rej + 1

    # puts drive everything else (evictions, updates, gets): give them more weight
    put_again = rule(key=KEYS, shape=SHAPES, dtype=PUT_DTYPES, data=st.data())(
        lambda self, key, shape, dtype, data: self.put(key, shape, dtype, data))

    @rule(key=KEYS)
    def update_missing(self, key):
        if key not in self.shadow:
            with pytest.raises(KeyError):
                self.store.update(key, torch.tensor([0]), torch.zeros(1, 1, 1))

    @precondition(lambda self: len(self.shadow) > 0)
    @rule(data=st.data())
    def update(self, data):
        s = self.store
        key = data.draw(st.sampled_from(sorted(self.shadow)))
        exp = self.shadow[key]
        b, n, d = exp.shape
        idx = data.draw(cks.token_subsets(n, min_size=1))
        vdtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        vals = data.draw(cks.residuals((b, int(idx.numel()), d), dtype=vdtype, bound=64.0))
        s.update(key, idx, vals)
        new = exp.clone()
        # the store keeps one tensor in the storage dtype (or the put dtype): values round there
        new[:, idx] = rounded(vals, self.storage or exp.dtype, exp.dtype)
        self.shadow[key] = new
        self.shadow.move_to_end(key)

    @precondition(lambda self: len(self.shadow) > 0)
    @rule(data=st.data(), extra=st.integers(1, 3))
    def update_wrong_shape(self, data, extra):
        key = data.draw(st.sampled_from(sorted(self.shadow)))
        b, n, d = self.shadow[key].shape
        with pytest.raises(ResidualShapeError):
            self.store.update(key, torch.tensor([0]), torch.zeros(b, 1, d + extra))
        # a refused update changes nothing (the invariants compare contents and recency)

    def put_wrong_rank(self, key, ndim):
        before = (self.store.keys(), self.store.nbytes)
        with pytest.raises(ResidualShapeError):
            self.store.put(key, torch.zeros((2,) * ndim))
        assert (self.store.keys(), self.store.nbytes) == before

    @rule(key=KEYS)
    def get(self, key):
        got = self.store.get(key)
        exp = self.shadow.get(key)
        if exp is None:
            assert got is None, f"{key}: store returned a value the shadow does not have"
            return
        assert got is not None, f"{key}: dropped without an eviction being counted"
        assert got.dtype == exp.dtype and got.shape == exp.shape
        assert torch.equal(got, exp), f"{key}: stale or corrupted residual"
        self.shadow.move_to_end(key)

    @rule(key=KEYS)
    def discard(self, key):
        self.store.discard(key)
        self.shadow.pop(key, None)

    @precondition(lambda self: len(self.shadow) > 0)
    @rule()
    def clear(self):
        peak = self.store.peak_nbytes
        self.store.clear()
        self.shadow.clear()
        assert self.store.nbytes == 0 and self.store.peak_nbytes == peak

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def valid(self):
        if self.store is None:
            return
        s = self.store
        s.check_valid()
        assert set(s.keys()) == set(self.shadow), (s.keys(), list(self.shadow))
        # recency: the store's LRU order is the shadow's
        assert s.keys() == list(self.shadow)
        if self.cfg.budget_bytes is not None:
            assert s.nbytes <= self.cfg.budget_bytes
        assert s.nbytes <= s.peak_nbytes

    @invariant()
    def contents_match(self):
        if self.store is None:
            return
        for key, exp in self.shadow.items():
            stored, dtype = self.store._data[key]  # peek without touching recency
            assert dtype == exp.dtype
            if self.storage is not None:
                assert stored.dtype == self.storage
            assert torch.equal(stored.to(dtype), exp), f"{key}: corrupted"


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                          deadline=None)
TestStoreMachine = StoreMachine.TestCase


# --------------------------------------------------------------- the public op-sequence strategy
@settings(max_examples=60, deadline=None)
@given(ops=cks.store_operations(dtypes=(torch.float32, torch.float64)),
       store_dtype=cks.storage_dtypes())
def test_store_operations_against_a_dict(ops, store_dtype):
    """Unbounded store + ops from :func:`store_operations`: get is always the dict's value."""
    s = MemoryStore(EngineConfig(store_dtype=store_dtype))
    storage = _TORCH[store_dtype] if store_dtype else None
    shadow: dict = {}
    for op in ops:
        if op.kind == "put":
            s.put(op.key, op.tensor)
            shadow[op.key] = rounded(op.tensor, storage, op.tensor.dtype)
        elif op.kind == "update":
            s.update(op.key, op.tokens, op.tensor)
            exp = shadow[op.key].clone()
            exp[:, op.tokens] = rounded(op.tensor, storage or exp.dtype, exp.dtype)
            shadow[op.key] = exp
        elif op.kind == "get":
            got = s.get(op.key)
            if op.key in shadow:
                assert got is not None and torch.equal(got, shadow[op.key])
            else:
                assert got is None
        elif op.kind == "discard":
            s.discard(op.key)
            shadow.pop(op.key, None)
        else:
            s.clear()
            shadow.clear()
        s.check_valid()
        assert set(s.keys()) == set(shadow)
    assert s.evictions == 0 and s.rejected == 0
