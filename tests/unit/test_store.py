"""MemoryStore: byte accounting, storage dtype, budget (error / evict), token updates."""

from __future__ import annotations

import pytest
import torch

from cachekit.config import EngineConfig
from cachekit.errors import BudgetExceededError, ResidualShapeError
from cachekit.protocols import ResidualStore
from cachekit.store import MemoryStore

K0, K1, K2 = ("cond", 0), ("cond", 1), ("uncond", 0)


def t(*shape, value=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if value is not None:
        return torch.full(shape, float(value), dtype=dtype)
    return (torch.randint(-16, 17, shape, generator=g).float() / 8).to(dtype)


def store(**cfg) -> MemoryStore:
    return MemoryStore(EngineConfig(**cfg))


def test_satisfies_the_protocol_and_starts_empty():
    s = MemoryStore()
    assert isinstance(s, ResidualStore)
    assert (len(s), s.nbytes, s.peak_nbytes, s.evictions, s.rejected) == (0, 0, 0, 0, 0)
    assert s.get(K0) is None
    s.check_valid()


def test_byte_accounting_and_peak():
    s = store()
    a = t(1, 4, 2)           # 8 floats = 32 bytes
    b = t(2, 3, 2, seed=1)   # 12 floats = 48 bytes
    s.put(K0, a)
    assert s.nbytes == 32 and s.peak_nbytes == 32
    s.put(K1, b)
    assert s.nbytes == 80 and s.peak_nbytes == 80
    s.put(K0, t(1, 1, 2))    # replacing K0 frees its old bytes
    assert s.nbytes == 8 + 48 and s.peak_nbytes == 80
    s.discard(K1)
    assert s.nbytes == 8 and s.peak_nbytes == 80
    s.discard(K1)            # discarding a missing key is a no-op
    assert s.nbytes == 8
    s.clear()
    assert s.nbytes == 0 and len(s) == 0 and s.peak_nbytes == 80
    s.check_valid()


def test_get_returns_the_values_put_per_key():
    s = store()
    a, b = t(1, 4, 2, seed=1), t(1, 4, 2, seed=2)
    s.put(K0, a)
    s.put(K2, b)
    assert torch.equal(s.get(K0), a) and torch.equal(s.get(K2), b)
    assert s.get(K1) is None
    assert set(s.keys()) == {K0, K2} and K0 in s and K1 not in s


@pytest.mark.parametrize("sd,bytes_per", [("float16", 2), ("bfloat16", 2), ("float64", 8),
                                          ("float32", 4)])
def test_storage_dtype_sets_bytes_and_get_returns_the_put_dtype(sd, bytes_per):
    s = store(store_dtype=sd)
    r = t(2, 5, 3)  # float32, values on a 1/8 grid: exact in every storage dtype
    s.put(K0, r)
    assert s.nbytes == r.numel() * bytes_per
    got = s.get(K0)
    assert got.dtype == torch.float32
    assert torch.equal(got, r)
    s.check_valid()


def test_half_storage_halves_bytes_and_rounds():
    full, half = store(), store(store_dtype="bfloat16")
    r = torch.full((1, 4, 4), 1.0 + 2 ** -12)  # not representable in bfloat16
    full.put(K0, r)
    half.put(K0, r)
    assert half.nbytes * 2 == full.nbytes
    assert torch.equal(full.get(K0), r)
    got = half.get(K0)
    assert got.dtype == torch.float32 and not torch.equal(got, r)
    torch.testing.assert_close(got, r, rtol=2 ** -8, atol=0)


def test_budget_error_raises_with_a_helpful_message():
    s = store(budget_bytes=40, on_budget="error")
    s.put(K0, t(1, 4, 2))  # 32 bytes
    with pytest.raises(BudgetExceededError) as ei:
        s.put(K1, t(1, 1, 4))  # 16 more bytes -> 48 > 40
    msg = str(ei.value)
    for needle in ("budget_bytes=40", "48", "16 bytes", "on_budget='evict'", "store_dtype"):
        assert needle in msg, (needle, msg)
    assert isinstance(ei.value, MemoryError)
    assert K1 not in s and K0 in s and s.evictions == 0
    s.check_valid()


def test_budget_error_replacing_a_key_counts_only_the_new_size():
    s = store(budget_bytes=32, on_budget="error")
    s.put(K0, t(1, 4, 2))
    s.put(K0, t(1, 4, 2, seed=3))  # same size: replaces, does not double count
    assert s.nbytes == 32
    s.check_valid()


def test_budget_evicts_least_recently_used_and_counts():
    s = store(budget_bytes=64, on_budget="evict")
    s.put(K0, t(1, 4, 2, seed=0))  # 32
    s.put(K1, t(1, 4, 2, seed=1))  # 32 -> full
    assert s.get(K0) is not None   # K0 is now the most recently used
    s.put(K2, t(1, 4, 2, seed=2))  # evicts K1 (LRU), not K0
    assert K1 not in s and K0 in s and K2 in s
    assert s.evictions == 1 and s.rejected == 0
    s.update(K0, torch.tensor([0]), t(1, 1, 2, value=5))  # an update also counts as a use
    s.put(K1, t(1, 4, 2, seed=4))  # evicts K2
    assert set(s.keys()) == {K0, K1} and s.evictions == 2
    assert s.nbytes <= 64
    s.check_valid()


def test_budget_evict_may_drop_several_entries_for_one_put():
    s = store(budget_bytes=64)
    s.put(K0, t(1, 2, 2))  # 16
    s.put(K1, t(1, 2, 2))  # 16
    s.put(K2, t(1, 4, 2))  # 32 -> 64
    s.put(("x", 9), t(1, 6, 2))  # 48: must drop K0, K1 (LRU) and K2
    assert s.keys() == [("x", 9)] and s.evictions == 3
    s.check_valid()


def test_single_entry_larger_than_the_budget_is_rejected_and_counted():
    s = store(budget_bytes=16)
    s.put(K0, t(1, 8, 2))  # 64 bytes > 16
    assert K0 not in s and s.get(K0) is None
    assert s.rejected == 1 and s.nbytes == 0
    s.check_valid()


def test_rejected_oversized_entry_does_not_evict_others():
    s = store(budget_bytes=40)
    s.put(K0, t(1, 4, 2))  # 32 bytes, fits
    s.put(K1, t(1, 8, 2))  # 64 bytes: can never fit
    assert s.rejected == 1
    assert K0 in s and s.evictions == 0  # K0 was evicted for nothing


def test_zero_budget_rejects_everything():
    s = store(budget_bytes=0)
    s.put(K0, t(1, 1, 1))
    assert len(s) == 0 and s.rejected == 1
    s.check_valid()


def test_update_writes_token_subset_in_place():
    s = store()
    r = t(2, 5, 3)
    s.put(K0, r.clone())
    idx = torch.tensor([1, 3])
    vals = t(2, 2, 3, value=7)
    s.update(K0, idx, vals)
    expected = r.clone()
    expected[:, [1, 3]] = 7
    assert torch.equal(s.get(K0), expected)
    assert s.nbytes == r.numel() * 4
    s.check_valid()


def test_update_rounds_to_storage_dtype_and_returns_put_dtype():
    s = store(store_dtype="float16")
    r = t(1, 3, 2)
    s.put(K0, r)
    s.update(K0, torch.tensor([2]), torch.full((1, 1, 2), 1.0 + 2 ** -13))
    got = s.get(K0)
    assert got.dtype == torch.float32
    assert torch.equal(got[:, :2], r[:, :2])
    assert torch.equal(got[:, 2], torch.full((1, 2), 1.0))  # rounded in float16
    s.check_valid()


def test_update_of_missing_key_raises_keyerror_naming_the_key():
    s = store()
    with pytest.raises(KeyError, match="put"):
        s.update(K0, torch.tensor([0]), t(1, 1, 2))


@pytest.mark.parametrize("vals_shape", [(1, 2, 2), (2, 1, 2), (1, 1, 3), (1, 2)])
def test_update_shape_errors(vals_shape):
    s = store()
    r = t(1, 4, 2)
    s.put(K0, r.clone())
    with pytest.raises(ResidualShapeError, match=r"token update for \('cond', 0\)"):
        s.update(K0, torch.tensor([1]), torch.zeros(vals_shape))
    assert torch.equal(s.get(K0), r)  # unchanged


@pytest.mark.parametrize("bad", [torch.zeros(4, 2), torch.zeros(1, 2, 3, 4), "nope"])
def test_put_shape_errors(bad):
    s = store()
    with pytest.raises(ResidualShapeError, match=r"\[B, N, D\]"):
        s.put(K0, bad)
    assert len(s) == 0 and s.nbytes == 0


def test_put_noncontiguous_is_stored_contiguous():
    s = store()
    r = t(3, 4, 2).transpose(0, 1).contiguous().transpose(0, 1)  # [3,4,2], non-contiguous
    assert not r.is_contiguous()
    s.put(K0, r)
    assert torch.equal(s.get(K0), r) and s.get(K0).is_contiguous()


def test_check_valid_detects_drift():
    s = store()
    s.put(K0, t(1, 2, 2))
    s.nbytes += 4
    with pytest.raises(AssertionError, match="drifted"):
        s.check_valid()
    s.nbytes -= 4
    s.check_valid()
    s.peak_nbytes = 0
    with pytest.raises(AssertionError):
        s.check_valid()


def test_check_valid_detects_over_budget_and_wrong_storage_dtype():
    s = store(budget_bytes=64, store_dtype="float16")
    s.put(K0, t(1, 2, 2))
    s.budget = 4
    with pytest.raises(AssertionError, match="budget"):
        s.check_valid()
    s.budget = 64
    s._data[K0] = (torch.zeros(1, 2, 2), torch.float32)  # float32 where float16 is promised
    s.nbytes = 16
    s.peak_nbytes = 16
    with pytest.raises(AssertionError):
        s.check_valid()


def test_registered_as_memory(registry):
    reg = registry.get("residual_store", "memory")
    assert reg.factory is MemoryStore and reg.provider == "cachekit.core"
    s = registry.create_store("memory", EngineConfig(budget_bytes=8))
    assert isinstance(s, MemoryStore) and s.budget == 8


def test_a_view_is_accounted_for_what_it_holds():
    s = store(budget_bytes=64)
    base = torch.zeros(1, 1000, 4)
    s.put(K0, base[:, :2])  # 32 bytes of view, 16000 bytes of storage
    held = s._data[K0][0].untyped_storage().nbytes()
    assert held <= 64, f"holding {held} bytes under a 64-byte budget"
