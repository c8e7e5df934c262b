"""Shared fixtures: registries, the toy model, a scripted test policy and schedule drivers.

Fixtures that hypothesis tests use are session-scoped (``@given`` refuses function-scoped
ones); they hand out classes and pure helpers, never mutable state.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import pytest
import torch

from cachekit.plugins import Registry
from cachekit.testing import ToyModel
from cachekit.types import ChunkCall, ChunkState, Decision, IterationInfo, Probe, Scope

# ------------------------------------------------------------------------------ test policy
class ScriptedPolicy:
    """A test policy that plays back decisions and records everything it sees.

    ``script`` is either a dict ``{(branch, chunk, step): Decision}`` (missing keys give
    ``default``) or a callable ``script(call, state, memory) -> Decision``. ``scope``,
    ``needs_residual`` and ``reuse_space`` are instance attributes so one class covers every
    case.
    """

    name = "scripted"

    def __init__(self, script: Any = None, *, scope: Scope = Scope.CHUNK,
                 needs_residual: bool = True, default: Optional[Decision] = None,
                 reuse_space: str = "residual") -> None:
        self.script = script if script is not None else {}
        self.scope = scope
        self.needs_residual = needs_residual
        self.reuse_space = reuse_space
        self.default = default if default is not None else Decision.compute("default")
        self.config = None
        self.states_made: list[dict] = []
        self.decided: list[tuple[ChunkCall, Decision]] = []
        self.observed: list[tuple[ChunkCall, Any]] = []

    def new_state(self, call: ChunkCall) -> dict:
        state = {"key": call.key, "window": call.window, "calls": 0}
        self.states_made.append(state)
        return state

    def decide(self, call: ChunkCall, probe: Probe, state: dict, memory: dict) -> Decision:
        state["calls"] += 1
        if callable(self.script):
            d = self.script(call, state, memory)
        else:
            d = self.script.get((call.branch, call.chunk, call.step), self.default)
        self.decided.append((call, d))
        return d

    def observe(self, call, probe, state, outcome, memory) -> None:
        self.observed.append((call, outcome))


class TokenwiseRunner:
    """A block runner applying ``fn`` token by token (so subset outputs are well defined).

    Records the token index of every run (None for a full run) in ``calls``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.calls: list[Optional[list[int]]] = []

    def __call__(self, h: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.calls.append(None if tokens is None else tokens.tolist())
        return self.fn(h)


def make_call(branch: str = "cond", chunk: int = 0, step: int = 0, *, num_steps: int = 8,
              frames: int = 1, tokens_per_frame: int = 4, window: int = 0, iteration: int = 0,
              scope: Scope = Scope.CHUNK) -> ChunkCall:
    return ChunkCall(branch=branch, chunk=chunk, step=step, num_steps=num_steps, window=window,
                     iteration=iteration, frames=frames, tokens_per_frame=tokens_per_frame,
                     scope=scope)


def grid_tensor(shape: Sequence[int], seed: int = 0, bound: int = 16) -> torch.Tensor:
    """Values on a 1/8 grid (exact under the affine runners the tests use)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-bound, bound + 1, tuple(shape), generator=g).float() / 8


# ------------------------------------------------------------------------------ schedules
def df_rows(num_chunks: int, num_steps: int, ar_step: int, branch: str, *, window: int = 0,
            chunk_frames: int = 2, prefix: int = 0) -> list[IterationInfo]:
    """A hand-built diffusion-forcing step matrix: chunk ``g`` (after ``prefix`` PREFIX
    chunks) starts at iteration ``(g - prefix) * ar_step`` and takes ``num_steps`` steps."""
    starts = [None] * prefix + [(g - prefix) * ar_step for g in range(prefix, num_chunks)]
    num_iter = (num_chunks - prefix - 1) * ar_step + num_steps
    rows = []
    for it in range(num_iter):
        states, steps = [], []
        for g in range(num_chunks):
            s0 = starts[g]
            if s0 is None:
                states.append(ChunkState.PREFIX)
                steps.append(num_steps)
            elif it < s0:
                states.append(ChunkState.PENDING)
                steps.append(0)
            elif it < s0 + num_steps:
                states.append(ChunkState.ACTIVE)
                steps.append(it - s0)
            else:
                states.append(ChunkState.FINISHED)
                steps.append(num_steps)
        rows.append(IterationInfo(window=window, iteration=it, num_iterations=num_iter,
                                  branch=branch, num_steps=num_steps, chunk_frames=chunk_frames,
                                  states=states, steps=steps))
    return rows


def drive(session: Any, rows_by_branch: dict[str, list[IterationInfo]], *, batch: int = 1,
          seed: int = 0, engine: Any = None, window: int = 0) -> list[torch.Tensor]:
    """Drive ``session`` through the rows, iteration by iteration, each branch in dict order.

    Inputs are deterministic per iteration (the same for every call with the same seed), so
    two drives with the same arguments see identical latents. Calls ``begin_window`` on the
    session (and on ``engine`` if given). Returns the velocities in call order.
    """
    m = session.m
    s = m.spec
    branches = list(rows_by_branch)
    rows0 = rows_by_branch[branches[0]]
    n_iter = len(rows0)
    frames = rows0[0].num_frames
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, s.channels, frames, s.height, s.width, generator=g)
    conds = {b: (m.encode_condition(torch.full((batch,), 3 + i)) if b != "uncond"
                 else m.null_condition(batch)) for i, b in enumerate(branches)}
    session.begin_window(window, frames)
    if engine is not None:
        engine.begin_window(window)
    out = []
    for it in range(n_iter):
        x = x0 * (1.0 - 0.05 * it)
        for b in branches:
            info = rows_by_branch[b][it]
            sigma = torch.tensor([[1.0 - st / info.num_steps for st in info.steps
                                   for _ in range(info.chunk_frames)]] * batch)
            out.append(session.velocity(x, sigma, conds[b], info))
    return out


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def registry() -> Registry:
    """The autoloaded registry (built-in policies and models). Do not add plugins to it."""
    return Registry(autoload=True)


@pytest.fixture
def fresh_registry() -> Registry:
    """A private autoloaded registry, for tests that add plugins."""
    return Registry(autoload=True)


@pytest.fixture(scope="session")
def toy() -> ToyModel:
    return ToyModel(seed=0)


@pytest.fixture(scope="session")
def scripted() -> type[ScriptedPolicy]:
    return ScriptedPolicy


@pytest.fixture(scope="session")
def runner() -> type[TokenwiseRunner]:
    return TokenwiseRunner


@pytest.fixture(scope="session")
def call() -> Callable[..., ChunkCall]:
    return make_call


@pytest.fixture(scope="session")
def grid() -> Callable[..., torch.Tensor]:
    return grid_tensor


@pytest.fixture(scope="session")
def rows() -> Callable[..., list[IterationInfo]]:
    return df_rows


@pytest.fixture(scope="session")
def driver() -> Callable[..., list[torch.Tensor]]:
    return drive


@pytest.fixture(scope="session")
def probe() -> Probe:
    return Probe()


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """Every test uses small tensors: torch's intra-op threads only add contention on the
    2-core CI machine (up to 15x slower while another process is busy). One thread for all."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
