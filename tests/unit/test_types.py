"""Frozen boundary values: validation messages and derived properties."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cachekit.errors import ConfigError
from cachekit.testing import strategies as cks
from cachekit.types import (
    ChunkCall,
    ChunkState,
    Decision,
    DecisionKind,
    IterationInfo,
    ModelSpec,
    Probe,
    Scope,
    tensor_repr,
)

A, F, P, X = ChunkState.ACTIVE, ChunkState.FINISHED, ChunkState.PENDING, ChunkState.PREFIX


def call_kwargs(**kw):
    base = dict(branch="cond", chunk=0, step=0, num_steps=4)
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------- ChunkCall
@pytest.mark.parametrize("kw,needles", [
    ({"branch": ""}, ["branch", "non-empty string", "never infers"]),
    ({"branch": None}, ["branch", "None"]),
    ({"chunk": -1}, ["chunk", "int >= 0", "-1"]),
    ({"chunk": True}, ["chunk", "True"]),
    ({"chunk": 1.0}, ["chunk", "1.0"]),
    ({"step": 4}, ["step", "< num_steps=4", "4"]),
    ({"num_steps": 0, "step": 0}, ["num_steps", "int >= 1", "0"]),
    ({"frames": 0}, ["frames", "int >= 1"]),
    ({"tokens_per_frame": -3}, ["tokens_per_frame", "-3"]),
    ({"window": -1}, ["window", "int >= 0"]),
    ({"iteration": -1}, ["iteration", "int >= 0"]),
    ({"scope": "chunk"}, ["scope", "Scope", "'chunk'"]),
])
def test_chunk_call_validation(kw, needles):
    with pytest.raises(ConfigError) as ei:
        ChunkCall(**call_kwargs(**kw))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_chunk_call_properties_and_conversion():
    c = ChunkCall(**call_kwargs(frames=3, tokens_per_frame=5, timestep=7, branch="uncond",
                                chunk=2))
    assert c.num_tokens == 15 and c.key == ("uncond", 2)
    assert isinstance(c.timestep, float) and c.timestep == 7.0
    assert c.scope is Scope.CHUNK and c.window == 0 and c.iteration == 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.step = 1  # type: ignore[misc]
    assert c == ChunkCall(**call_kwargs(frames=3, tokens_per_frame=5, timestep=7.0,
                                        branch="uncond", chunk=2))
    assert hash(c) == hash(attrs.evolve(c))


@settings(max_examples=50, deadline=None)
@given(c=cks.chunk_calls())
def test_chunk_calls_strategy_gives_valid_calls(c):
    assert 0 <= c.step < c.num_steps and c.num_tokens >= 1 and c.branch
    assert attrs.evolve(c) == c  # re-validates


@settings(max_examples=20, deadline=None)
@given(c=cks.chunk_calls(scope=Scope.WINDOW))
def test_window_calls_strategy(c):
    assert c.scope is Scope.WINDOW and c.chunk == 0


# ------------------------------------------------------------------------------ IterationInfo
def info_kwargs(**kw):
    base = dict(window=0, iteration=1, num_iterations=4, branch="cond", num_steps=3,
                chunk_frames=2, states=[F, A, P], steps=[3, 1, 0])
    base.update(kw)
    return base


def test_iteration_info_properties():
    info = IterationInfo(**info_kwargs())
    assert info.states == (F, A, P) and info.steps == (3, 1, 0)  # converted to tuples
    assert info.num_chunks == 3 and info.num_frames == 6 and info.active_chunks() == [1]
    info2 = IterationInfo(**info_kwargs(states=[X, A, A], steps=[3, 2, 0]))
    assert info2.active_chunks() == [1, 2]


@pytest.mark.parametrize("kw,needles", [
    ({"steps": [3, 1]}, ["IterationInfo.steps", "one entry per chunk (3 states)"]),
    ({"states": [], "steps": []}, ["IterationInfo.steps"]),
    ({"iteration": 4}, ["iteration", "< num_iterations=4", "4"]),
    ({"states": [F, "active", P]}, ["IterationInfo.states[1]", "ChunkState", "'active'"]),
    ({"steps": [4, 1, 0]}, ["IterationInfo.steps[0]", "0..num_steps=3", "4"]),
    ({"steps": [3, -1, 0]}, ["IterationInfo.steps[1]", "-1"]),
    ({"steps": [3, 3, 0]}, ["IterationInfo.steps[1]", "ACTIVE", "3"]),
    ({"branch": ""}, ["branch", "never infers"]),
    ({"num_iterations": 0}, ["num_iterations", "int >= 1"]),
    ({"chunk_frames": 0}, ["chunk_frames", "int >= 1"]),
])
def test_iteration_info_validation(kw, needles):
    with pytest.raises(ConfigError) as ei:
        IterationInfo(**info_kwargs(**kw))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


# ---------------------------------------------------------------------------------------- Probe
def test_probe_defaults_and_shapes():
    p = Probe()
    assert p.grid == (1, 1, 1) and p.patch == (1, 1)
    m = torch.zeros(2, 3, 6, 8)
    lat = torch.zeros(2, 4, 3, 8, 8)
    p = Probe(modulation=m, latent=lat, grid=[3, 4, 4], patch=[2, 2])
    assert p.grid == (3, 4, 4) and p.patch == (2, 2)
    assert "Tensor(2, 3, 6, 8):float32" in repr(p)  # shapes, not values


@pytest.mark.parametrize("kw,needles", [
    ({"grid": (1, 1)}, ["Probe.grid", "(F, H_tokens, W_tokens)"]),
    ({"grid": (1, 0, 1)}, ["Probe.grid", "positive"]),
    ({"patch": (1,)}, ["Probe.patch", "(ph, pw)"]),
    ({"patch": (1, 0)}, ["Probe.patch"]),
    ({"modulation": torch.zeros(1, 2, 6)}, ["Probe.modulation", "[B, F=1, M, D]",
                                            "Tensor(1, 2, 6)"]),
    ({"modulation": torch.zeros(1, 2, 6, 4)}, ["Probe.modulation", "F=1"]),
    ({"latent": torch.zeros(1, 4, 2, 8, 8)}, ["Probe.latent", "[B, C, F=1, H, W]"]),
    ({"latent": torch.zeros(4, 1, 8, 8)}, ["Probe.latent"]),
])
def test_probe_validation(kw, needles):
    with pytest.raises(ConfigError) as ei:
        Probe(**kw)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


# ------------------------------------------------------------------------------------- Decision
def test_decision_constructors():
    assert Decision.compute("w").kind is DecisionKind.COMPUTE and Decision.compute("w").reason == "w"
    assert Decision.reuse().kind is DecisionKind.REUSE and Decision.reuse().tokens is None
    d = Decision.subset([3, 1 + 0, 2], 5, "why")
    assert d.kind is DecisionKind.PARTIAL and d.reason == "why"
    assert d.tokens.dtype == torch.long and d.tokens.tolist() == [3, 1, 2]
    assert d.num_computed(5) == 3
    assert Decision.compute().num_computed(7) == 7 and Decision.reuse().num_computed(7) == 0


@pytest.mark.parametrize("tokens,n,kind", [([], 4, DecisionKind.REUSE),
                                           (torch.empty(0, dtype=torch.long), 4,
                                            DecisionKind.REUSE),
                                           ([0, 1, 2, 3], 4, DecisionKind.COMPUTE),
                                           ([[0, 1], [2, 3]], 4, DecisionKind.COMPUTE),
                                           ([2], 4, DecisionKind.PARTIAL),
                                           (torch.tensor([0, 2], dtype=torch.int32), 4,
                                            DecisionKind.PARTIAL)])
def test_subset_collapses_to_compute_or_reuse(tokens, n, kind):
    d = Decision.subset(tokens, n, "r")
    assert d.kind is kind and d.reason == "r"
    if kind is DecisionKind.PARTIAL:
        assert d.tokens.dtype == torch.long and d.tokens.dim() == 1
    else:
        assert d.tokens is None


@pytest.mark.parametrize("kind,tokens,needle", [
    (DecisionKind.PARTIAL, None, "non-empty 1-D int64"),
    (DecisionKind.PARTIAL, torch.empty(0, dtype=torch.long), "non-empty"),
    (DecisionKind.PARTIAL, torch.tensor([[0, 1]]), "1-D"),
    (DecisionKind.PARTIAL, torch.tensor([0, 1], dtype=torch.int32), "int64"),
    (DecisionKind.COMPUTE, torch.tensor([0]), "None unless kind is PARTIAL"),
    (DecisionKind.REUSE, torch.tensor([0]), "None unless kind is PARTIAL"),
    ("compute", None, "DecisionKind"),
])
def test_decision_validation(kind, tokens, needle):
    with pytest.raises(ConfigError, match="Decision") as ei:
        Decision(kind, tokens)
    assert needle in str(ei.value)


def test_decision_repr_shows_shape_only():
    d = Decision.subset(torch.arange(100), 1000)
    assert "Tensor(100,):int64" in repr(d) and "99" not in repr(d)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 20), data=st.data())
def test_token_subsets_strategy(n, data):
    t = data.draw(cks.token_subsets(n))
    assert t.dtype == torch.long and t.dim() == 1 and t.numel() <= n
    assert t.tolist() == sorted(set(t.tolist())) and all(0 <= i < n for i in t.tolist())
    d = Decision.subset(t, n)
    assert d.num_computed(n) == t.numel()


# ------------------------------------------------------------------------------------ ModelSpec
def spec_kwargs(**kw):
    base = dict(name="m", channels=4, height=8, width=12, patch=(2, 2), chunk_frames=2,
                max_frames=8, hidden=16, num_blocks=2)
    base.update(kw)
    return base


def test_model_spec_properties():
    s = ModelSpec(**spec_kwargs(patch=[2, 4]))
    assert s.patch == (2, 4) and s.token_grid == (4, 3) and s.tokens_per_frame == 12
    assert s.modulation_vectors == 6


@pytest.mark.parametrize("kw,needles", [
    ({"patch": (3, 2)}, ["ModelSpec.patch", "height=8", "(3, 2)"]),
    ({"patch": (2, 5)}, ["ModelSpec.patch", "width=12"]),
    ({"patch": (2,)}, ["ModelSpec.patch", "(ph, pw)"]),
    ({"patch": (0, 2)}, ["ModelSpec.patch"]),
    ({"max_frames": 7}, ["ModelSpec.max_frames", "multiple of chunk_frames=2", "7"]),
    ({"channels": 0}, ["channels", "int >= 1"]),
    ({"hidden": 2.5}, ["hidden", "2.5"]),
    ({"num_blocks": -1}, ["num_blocks"]),
    ({"modulation_vectors": 0}, ["modulation_vectors"]),
])
def test_model_spec_validation(kw, needles):
    with pytest.raises(ConfigError) as ei:
        ModelSpec(**spec_kwargs(**kw))
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_tensor_repr():
    assert tensor_repr(None) == "None"
    assert tensor_repr(torch.zeros(2, 3, dtype=torch.bfloat16)) == "Tensor(2, 3):bfloat16"
    assert tensor_repr([1]) == "[1]"


def test_timestep_conversion_error_names_the_field():
    with pytest.raises(ConfigError, match="timestep"):
        ChunkCall(**call_kwargs(timestep="noisy"))


def test_partial_decisions_with_different_tokens_differ():
    assert Decision.subset([1], 4) != Decision.subset([2], 4)
