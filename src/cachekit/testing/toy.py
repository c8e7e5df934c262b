"""A toy model adapter for fast tests: a few-thousand-parameter block-causal attention stack.

It honours the same contract as real adapters (:class:`~cachekit.protocols.ModelAdapter`):
``vanilla`` mode runs the window as one sequence under a block-causal mask and calls the hook
once per window; ``chunked`` mode runs ACTIVE chunks one by one with per-branch K/V slots,
fills FINISHED/PREFIX slots once, never runs PENDING chunks, and supports the selective
(token-subset) forward. Weights are random but seeded, so tests are exact and fast. Use it to
test a policy plugin without the bundled model's weights.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
from torch import nn

from ..types import ChunkCall, ChunkHook, ChunkState, IterationInfo, ModelSpec, Probe, Scope

__all__ = ["ToyModel", "ToySession"]


def _time_features(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``1000*sigma``: ``[..., dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = (1000.0 * sigma.float())[..., None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class ToyModel(nn.Module):
    """Tiny video model; ``ToyModel(seed=0)`` is deterministic."""

    name: ClassVar[str] = "toy"

    def __init__(self, *, channels: int = 2, height: int = 4, width: int = 4, patch: int = 1,
                 chunk_frames: int = 2, max_frames: int = 8, hidden: int = 16,
                 num_blocks: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.spec = ModelSpec(name="toy", channels=channels, height=height, width=width,
                              patch=(patch, patch), chunk_frames=chunk_frames,
                              max_frames=max_frames, hidden=hidden, num_blocks=num_blocks)
        g = torch.Generator().manual_seed(seed)
        d, p = hidden, patch

        def param(*shape, scale=1.0):
            return nn.Parameter(torch.randn(*shape, generator=g) * scale / math.sqrt(shape[0]))

        self.embed = param(channels * p * p, d)
        self.pos = nn.Parameter(torch.randn(max_frames * self.spec.tokens_per_frame, d,
                                            generator=g) * 0.1)
        self.time = param(d, 6 * d, scale=0.5)
        self.cond_proj = param(d, d, scale=0.5)
        self.wq = nn.ParameterList([param(d, d) for _ in range(num_blocks)])
        self.wk = nn.ParameterList([param(d, d) for _ in range(num_blocks)])
        self.wv = nn.ParameterList([param(d, d) for _ in range(num_blocks)])
        self.wo = nn.ParameterList([param(d, d, scale=0.5) for _ in range(num_blocks)])
        self.head = param(d, channels * p * p)
        self.requires_grad_(False)

    # -- helpers used by the session ----------------------------------------------------------
    def modulation(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-frame modulation ``[B, F, 6, D]`` from per-frame sigma ``[B, F]``."""
        e = _time_features(sigma, self.spec.hidden)
        return torch.tanh(e @ self.time).unflatten(-1, (6, self.spec.hidden))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        p = self.spec.patch[0]
        x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, t: torch.Tensor, frames: int) -> torch.Tensor:
        b = t.shape[0]
        s = self.spec
        p = s.patch[0]
        hh, ww = s.token_grid
        t = t.reshape(b, frames, hh, ww, s.channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return t.reshape(b, s.channels, frames, s.height, s.width)

    def encode_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Condition "tokens" ``[B, 1, D]`` from integer labels ``[B]`` (a toy prompt)."""
        base = _time_features(labels.float() / 7.0, self.spec.hidden)
        return (base @ self.cond_proj)[:, None, :]

    def null_condition(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1, self.spec.hidden)

    def encode_prompt(self, prompt: Optional[str], *, seed: int, batch: int):
        """``prompt`` is an integer label (a string); None draws one from ``seed``."""
        label = int(prompt) if prompt is not None else seed % 7
        cond = self.encode_condition(torch.full((batch,), label))
        return cond, self.null_condition(batch), str(label)

    def decode(self, x: torch.Tensor):
        """Model space ``[B, C, F, H, W]`` to ``[B, F, H, W, 3]`` in [0, 1] (first 3 channels,
        padded by repetition when C < 3)."""
        rgb = x[:, [c % x.shape[1] for c in range(3)]]
        return ((rgb.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()

    def session(self, *, batch: int, mode: str = "chunked",
                hook: Optional[ChunkHook] = None) -> "ToySession":
        return ToySession(self, batch=batch, mode=mode, hook=hook)


class ToySession:
    """Per-generation state of :class:`ToyModel` (per-branch K/V slots)."""

    def __init__(self, model: ToyModel, *, batch: int, mode: str, hook: Optional[ChunkHook]):
        if mode not in ("vanilla", "chunked"):
            raise ValueError(f"mode: expected 'vanilla' or 'chunked', got {mode!r}")
        self.m, self.batch, self.mode, self.hook = model, batch, mode, hook
        self.block_calls = 0          # number of block-stack runs (full or selective)
        self._kv: dict[str, list[list[torch.Tensor]]] = {}
        self._slot_state: dict[tuple[str, int], ChunkState] = {}
        self._frames = 0

    def begin_window(self, window: int, num_frames: int) -> None:
        self._kv.clear()
        self._slot_state.clear()
        self._frames = num_frames

    # -- block stack --------------------------------------------------------------------------
    def _blocks(self, h: torch.Tensor, mod: torch.Tensor, cond: torch.Tensor,
                kv: Optional[list[list[torch.Tensor]]], lo: int, hi: int,
                tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Run all blocks on ``h`` (``[B, K, D]``): tokens ``lo..hi`` of the window, or the
        subset ``lo + tokens``. ``mod`` is per token ``[B, K, 6, D]``. With ``kv`` the layer
        K/V slots are written at those positions and the queries attend to ``[0, hi)``."""
        self.block_calls += 1
        m = self.m
        d = m.spec.hidden
        pos = torch.arange(lo, hi) if tokens is None else lo + tokens
        x = h + m.pos[pos]
        for i in range(m.spec.num_blocks):
            y = x * (1 + mod[:, :, 1]) + mod[:, :, 0]
            q, k, v = y @ m.wq[i], y @ m.wk[i], y @ m.wv[i]
            if kv is not None:
                kk, vv = kv[i]
                if tokens is None:
                    kk[:, lo:hi] = k
                    vv[:, lo:hi] = v
                else:
                    kk.index_copy_(1, pos, k)
                    vv.index_copy_(1, pos, v)
                k, v = kk[:, :hi], vv[:, :hi]
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) +
                                (0 if mask is None else mask), dim=-1)
            x = x + torch.tanh(att @ v @ m.wo[i]) * (1 + mod[:, :, 2]) + 0.1 * cond
        return x

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                 info: IterationInfo) -> torch.Tensor:
        m = self.m
        s = m.spec
        n_f = s.tokens_per_frame
        cf = info.chunk_frames
        f = x.shape[2]
        tokens = m.patchify(x) @ m.embed                      # [B, F*n_f, D]
        mod = m.modulation(sigma)                             # [B, F, 6, D]
        mod_tok = mod.repeat_interleave(n_f, dim=1)           # [B, F*n_f, 6, D]
        out = torch.zeros_like(tokens)
        grid = (cf, *s.token_grid)
        if self.mode == "vanilla":
            n = f * n_f
            chunk_of = torch.arange(n) // (cf * n_f)
            mask = torch.where(chunk_of[None, :] <= chunk_of[:, None], 0.0, float("-inf"))

            def run_window(h, idx=None):
                if idx is not None:
                    raise NotImplementedError("token-level reuse needs mode='chunked'")
                return self._blocks(h, mod_tok, cond, None, 0, n, None, mask)

            call = ChunkCall(branch=info.branch, chunk=0, step=info.iteration,
                             num_steps=info.num_iterations, window=info.window,
                             iteration=info.iteration, frames=f, tokens_per_frame=n_f,
                             timestep=float(sigma.mean()) * 1000, scope=Scope.WINDOW)
            probe = Probe(modulation=mod, latent=x, grid=(f, *s.token_grid), patch=s.patch)
            h = self.hook(call, tokens, run_window, probe) if self.hook else run_window(tokens)
            return m.unpatchify(h @ m.head, f)

        kv = self._kv.get(info.branch)
        if kv is None:
            kv = self._kv[info.branch] = [
                [torch.zeros(x.shape[0], f * n_f, s.hidden) for _ in range(2)]
                for _ in range(s.num_blocks)]
        active = info.active_chunks()
        last = max(active) if active else -1
        for g in range(last + 1):
            state = info.states[g]
            lo, hi = g * cf * n_f, (g + 1) * cf * n_f
            if state is ChunkState.PENDING:
                continue
            h_in, mod_g = tokens[:, lo:hi], mod_tok[:, lo:hi]
            if state is not ChunkState.ACTIVE:
                if self._slot_state.get((info.branch, g)) is not state:
                    self._blocks(h_in, mod_g, cond, kv, lo, hi, None, None)
                    self._slot_state[(info.branch, g)] = state
                continue
            self._slot_state[(info.branch, g)] = state

            def run(h, idx=None, lo=lo, hi=hi, mod_g=mod_g):
                if idx is None:
                    return self._blocks(h, mod_g, cond, kv, lo, hi, None, None)
                return self._blocks(h, mod_g.index_select(1, idx), cond, kv, lo, hi, idx, None)

            call = ChunkCall(branch=info.branch, chunk=g, step=info.steps[g],
                             num_steps=info.num_steps, window=info.window,
                             iteration=info.iteration, frames=cf, tokens_per_frame=n_f,
                             timestep=float(sigma[:, g * cf].mean()) * 1000)
            probe = Probe(modulation=mod[:, g * cf:(g + 1) * cf],
                          latent=x[:, :, g * cf:(g + 1) * cf], grid=grid, patch=s.patch)
            out[:, lo:hi] = self.hook(call, h_in, run, probe) if self.hook else run(h_in)
        return m.unpatchify(out @ m.head, f)
