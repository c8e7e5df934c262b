"""Hypothesis strategies for cachekit's values, for plugin authors and cachekit's own tests.

Test a policy, store or model adapter plugin with the same generators cachekit uses::

    from hypothesis import given, settings
    from cachekit.testing import strategies as cks

    @settings(deadline=None, max_examples=50)
    @given(call=cks.chunk_calls(), data=st.data())
    def test_my_policy_decisions_fit_the_chunk(call, data):
        decision = MyPolicy().decide(call, probe, state, memory={})
        ...

What is here (every strategy draws *valid* values; build invalid ones by hand in your tests):

* :func:`branch_names` -- guidance branch names (``cond``, ``uncond``, any other string).
* :func:`chunk_geometries` -- :class:`ChunkGeometry` ``(batch, frames, tokens_per_frame, hidden)``.
* :func:`chunk_calls` -- :class:`~cachekit.types.ChunkCall` values (optionally for one geometry).
* :func:`token_subsets` -- sorted, duplicate-free ``int64`` token indices for a chunk of ``N``
  tokens (what :meth:`Decision.subset <cachekit.types.Decision.subset>` expects).
* :func:`decisions` -- :class:`~cachekit.types.Decision` values for a chunk of ``N`` tokens
  (PARTIAL decisions always have ``0 < K < N`` tokens).
* :func:`residuals` -- finite residual tensors of a given shape and dtype (optionally with
  values on a 1/8 grid, so that sums, doublings and half-precision storage are exact).
* :func:`storage_dtypes`, :func:`engine_configs` -- valid :class:`~cachekit.config.EngineConfig`.
* :func:`store_keys`, :func:`store_operations` -- ``(branch, chunk)`` keys and sequences of
  :class:`StoreOp` (put / update / get / discard / clear) whose updates match the shape last
  put for their key: feed them to a :class:`~cachekit.protocols.ResidualStore` and to a plain
  dict, and compare (see ``tests/property/test_store_machine.py``).

All strategies are cheap enough for ``max_examples`` in the hundreds; tensors with more than
``max_drawn`` elements are generated from a drawn seed instead of element by element (they
still reproduce, they just shrink less well).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attrs
import torch
from hypothesis import strategies as st

from ..config import EngineConfig
from ..types import ChunkCall, Decision, Scope

__all__ = [
    "ChunkGeometry",
    "StoreOp",
    "branch_names",
    "chunk_geometries",
    "chunk_calls",
    "token_subsets",
    "decisions",
    "residuals",
    "storage_dtypes",
    "engine_configs",
    "store_keys",
    "store_operations",
    "GRID",
]

#: Spacing of the "exact" value grid of :func:`residuals`: multiples of 1/8 in a small range
#: are exact in float16, bfloat16 and float32, and stay exact under a few additions/doublings.
GRID = 0.125

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


@attrs.frozen
class ChunkGeometry:
    """The shape of one chunk call: ``h_in`` is ``[batch, frames * tokens_per_frame, hidden]``."""

    batch: int
    frames: int
    tokens_per_frame: int
    hidden: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, N, D)``."""
        return (self.batch, self.num_tokens, self.hidden)


@attrs.frozen
class StoreOp:
    """One residual-store operation drawn by :func:`store_operations`.

    ``kind`` is ``"put"`` (``tensor`` is the full residual ``[B, N, D]``), ``"update"``
    (``tokens`` ``[K]`` and ``tensor`` ``[B, K, D]``), ``"get"``, ``"discard"`` or ``"clear"``
    (``key`` is None).
    """

    kind: str
    key: Optional[tuple[str, int]] = None
    tensor: Optional[torch.Tensor] = attrs.field(default=None, eq=False)
    tokens: Optional[torch.Tensor] = attrs.field(default=None, eq=False)

    def __repr__(self) -> str:  # shapes only: values would flood hypothesis' falsifying example
        extra = ""
        if self.tensor is not None:
            extra += f", tensor={tuple(self.tensor.shape)}:{str(self.tensor.dtype)[6:]}"
        if self.tokens is not None:
            extra += f", tokens={self.tokens.tolist()}"
        return f"StoreOp({self.kind!r}, {self.key!r}{extra})"


# ----------------------------------------------------------------------------------- scalars
def branch_names(*, extra: bool = True) -> st.SearchStrategy[str]:
    """Guidance branch names: ``cond``/``uncond`` and (``extra=True``) other non-empty names,
    as a pipeline with three-way or custom guidance would pass them."""
    common = st.sampled_from(["cond", "uncond"])
    if not extra:
        return common
    other = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
    return st.one_of(common, other)


def chunk_geometries(*, max_batch: int = 2, max_frames: int = 3, max_tokens_per_frame: int = 4,
                     max_hidden: int = 4, min_tokens: int = 1) -> st.SearchStrategy[ChunkGeometry]:
    """Small chunk geometries; ``min_tokens=2`` guarantees PARTIAL decisions are possible."""
    return st.builds(
        ChunkGeometry,
        batch=st.integers(1, max_batch),
        frames=st.integers(1, max_frames),
        tokens_per_frame=st.integers(1, max_tokens_per_frame),
        hidden=st.integers(1, max_hidden),
    ).filter(lambda g: g.num_tokens >= min_tokens)


@st.composite
def chunk_calls(draw: Any, *, branches: Optional[st.SearchStrategy[str]] = None,
                max_chunk: int = 7, max_steps: int = 10,
                geometry: Optional[ChunkGeometry] = None, max_frames: int = 3,
                max_tokens_per_frame: int = 4, scope: Scope = Scope.CHUNK,
                window: Optional[int] = None) -> ChunkCall:
    """A valid :class:`~cachekit.types.ChunkCall` (``step < num_steps``).

    ``geometry`` fixes ``frames``/``tokens_per_frame``; ``scope=Scope.WINDOW`` draws window
    calls (``chunk`` 0, as the vanilla execution mode makes them).
    """
    branch = draw(branches if branches is not None else branch_names())
    num_steps = draw(st.integers(1, max_steps))
    step = draw(st.integers(0, num_steps - 1))
    if geometry is None:
        frames = draw(st.integers(1, max_frames))
        tpf = draw(st.integers(1, max_tokens_per_frame))
    else:
        frames, tpf = geometry.frames, geometry.tokens_per_frame
    chunk = 0 if scope is Scope.WINDOW else draw(st.integers(0, max_chunk))
    return ChunkCall(
        branch=branch, chunk=chunk, step=step, num_steps=num_steps,
        window=draw(st.integers(0, 3)) if window is None else window,
        iteration=draw(st.integers(0, 4 * max_steps)), frames=frames, tokens_per_frame=tpf,
        timestep=draw(st.floats(0.0, 1000.0, allow_nan=False)), scope=scope)


# ------------------------------------------------------------------------ decisions / tokens
@st.composite
def token_subsets(draw: Any, num_tokens: int, *, min_size: int = 0,
                  max_size: Optional[int] = None) -> torch.Tensor:
    """Sorted, duplicate-free ``int64`` token indices in ``[0, num_tokens)`` (1-D)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens: expected >= 0, got {num_tokens}")
    hi = num_tokens if max_size is None else min(max_size, num_tokens)
    if min_size > hi:
        raise ValueError(f"min_size={min_size} > max_size={hi} for num_tokens={num_tokens}")
    picked = draw(st.sets(st.integers(0, num_tokens - 1), min_size=min_size, max_size=hi)
                  if num_tokens else st.just(set()))
    return torch.tensor(sorted(picked), dtype=torch.long)


@st.composite
def decisions(draw: Any, num_tokens: int,
              kinds: Sequence[str] = ("compute", "reuse", "partial")) -> Decision:
    """A :class:`~cachekit.types.Decision` for a chunk of ``num_tokens`` tokens.

    ``kinds`` limits the kinds drawn; PARTIAL needs ``num_tokens >= 2`` (a subset strictly
    between none and all) and is skipped otherwise. The reason names the kind drawn.
    """
    allowed = [k for k in kinds if k != "partial" or num_tokens >= 2]
    if not allowed:
        raise ValueError(f"no decision kind of {list(kinds)} fits num_tokens={num_tokens}")
    kind = draw(st.sampled_from(allowed))
    if kind == "compute":
        return Decision.compute("drawn compute")
    if kind == "reuse":
        return Decision.reuse("drawn reuse")
    idx = draw(token_subsets(num_tokens, min_size=1, max_size=num_tokens - 1))
    return Decision.subset(idx, num_tokens, "drawn partial")


# ----------------------------------------------------------------------------------- tensors
@st.composite
def residuals(draw: Any, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
              bound: float = 4.0, exact: bool = False, max_drawn: int = 256) -> torch.Tensor:
    """A finite tensor of ``shape`` and ``dtype`` with values in ``[-bound, bound]``.

    ``exact=True`` draws multiples of :data:`GRID` (1/8): such values survive float16 /
    bfloat16 storage unchanged (for ``bound <= 16``) and make ``h + (f(h) - h)`` exact for
    simple affine ``f``, so tests can compare with ``torch.equal``.
    """
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if numel <= max_drawn:
        if exact:
            steps = int(bound / GRID)
            vals = draw(st.lists(st.integers(-steps, steps), min_size=numel, max_size=numel))
            t = torch.tensor(vals, dtype=torch.float64) * GRID
        else:
            vals = draw(st.lists(st.floats(-bound, bound, allow_nan=False, allow_infinity=False,
                                           width=32), min_size=numel, max_size=numel))
            t = torch.tensor(vals, dtype=torch.float64)
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        t = (torch.rand(numel, generator=g, dtype=torch.float64) * 2 - 1) * bound
        if exact:
            t = torch.round(t / GRID) * GRID
    return t.reshape(shape).to(dtype)


def storage_dtypes(*, allow_none: bool = True) -> st.SearchStrategy[Optional[str]]:
    """Values of ``EngineConfig.store_dtype`` (None keeps the compute dtype)."""
    names = st.sampled_from(list(_DTYPE_NAMES))
    return st.one_of(st.none(), names) if allow_none else names


@st.composite
def engine_configs(draw: Any, *, budgets: Optional[st.SearchStrategy[Optional[int]]] = None,
                   store_dtypes: Optional[st.SearchStrategy[Optional[str]]] = None,
                   on_budget: Sequence[str] = ("evict", "error"),
                   check_finite: Optional[bool] = None) -> EngineConfig:
    """A valid :class:`~cachekit.config.EngineConfig` for the ``memory`` store.

    ``budgets`` defaults to None or a small byte count (0..4096), so that tiny test residuals
    actually hit the budget; pass ``st.none()`` for unbounded stores.
    """
    budget = draw(budgets if budgets is not None else
                  st.one_of(st.none(), st.integers(0, 4096)))
    return EngineConfig(
        store="memory",
        store_dtype=draw(store_dtypes if store_dtypes is not None else storage_dtypes()),
        budget_bytes=budget,
        on_budget=draw(st.sampled_from(list(on_budget))),
        check_finite=draw(st.booleans()) if check_finite is None else check_finite,
        sync_timing=False,
    )


# ------------------------------------------------------------------------------ store ops
def store_keys(*, branches: Sequence[str] = ("cond", "uncond"),
               max_chunk: int = 3) -> st.SearchStrategy[tuple[str, int]]:
    """``(branch, chunk)`` keys from a small pool, so operations collide on purpose."""
    return st.tuples(st.sampled_from(list(branches)), st.integers(0, max_chunk))


@st.composite
def store_operations(draw: Any, *, keys: Optional[st.SearchStrategy[tuple[str, int]]] = None,
                     shapes: Optional[st.SearchStrategy[tuple[int, int, int]]] = None,
                     dtypes: Sequence[torch.dtype] = (torch.float32,),
                     min_ops: int = 1, max_ops: int = 30, exact: bool = True) -> list[StoreOp]:
    """A sequence of :class:`StoreOp` for a :class:`~cachekit.protocols.ResidualStore`.

    Updates are drawn only for keys put before (and not discarded/cleared since), with token
    indices and values matching the shape last put, so every op is valid for a store without
    a budget; a store with a budget may have dropped the key (its ``update`` then raises
    ``KeyError``, which the consumer should expect exactly when ``get`` returns None).
    """
    key_st = keys if keys is not None else store_keys()
    shape_st = shapes if shapes is not None else st.tuples(
        st.integers(1, 2), st.integers(1, 6), st.integers(1, 4))
    n = draw(st.integers(min_ops, max_ops))
    live: dict[tuple[str, int], tuple[tuple[int, int, int], torch.dtype]] = {}
    ops: list[StoreOp] = []
    for _ in range(n):
        choices = ["put", "get", "discard", "clear"] + (["update", "update"] if live else [])
        kind = draw(st.sampled_from(choices))
        if kind == "put":
            key = draw(key_st)
            shape = draw(shape_st)
            dtype = draw(st.sampled_from(list(dtypes)))
            ops.append(StoreOp("put", key, draw(residuals(shape, dtype=dtype, exact=exact))))
            live[key] = (shape, dtype)
        elif kind == "update":
            key = draw(st.sampled_from(sorted(live)))
            (b, n_tok, d), dtype = live[key]
            idx = draw(token_subsets(n_tok, min_size=1))
            vals = draw(residuals((b, int(idx.numel()), d), dtype=dtype, exact=exact))
            ops.append(StoreOp("update", key, vals, idx))
        elif kind == "get":
            ops.append(StoreOp("get", draw(key_st)))
        elif kind == "discard":
            key = draw(key_st)
            live.pop(key, None)
            ops.append(StoreOp("discard", key))
        else:
            live.clear()
            ops.append(StoreOp("clear"))
    return ops
