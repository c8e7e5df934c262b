"""The reference video DiT: a small Wan / SkyReels-V2-style diffusion-forcing transformer.

Pixel space, flow matching. A window ``x`` ``[B, C, F, H, W]`` (RGB in [-1, 1]) with one noise
level per frame ``sigma`` ``[B, F]`` (``x_sigma = (1 - sigma) x0 + sigma eps``, 1 = pure noise)
maps to the velocity ``v = eps - x0`` of the same shape. The pieces follow Wan 2.1:

* patch embedding: temporal patch 1, spatial ``p x p`` (a linear map of each patch);
* per-frame timestep embedding: ``1000 sigma`` -> sinusoid -> MLP -> ``e`` ``[B, F, D]``; a time
  projection gives six modulation vectors per frame ``e0`` ``[B, F, 6, D]``; each block adds its
  own learned ``[6, D]`` modulation (shift/scale/gate for attention and for the FFN);
* self-attention with RMSNorm on queries and keys and 3-D RoPE (head dim split in t/h/w
  parts; the temporal position is the frame index within the window); block-causal across
  chunks of ``chunk_frames`` frames (chunk ``i`` sees chunks ``<= i``);
* cross-attention (LayerNorm on the query stream) to condition tokens: one token per condition
  attribute, ``value embedding + attribute-type embedding`` through an MLP; a learned null
  condition for classifier-free guidance;
* GELU FFN; output head: LayerNorm, adaLN from ``e`` (two vectors), linear, unpatchify.
  With ``cfg.prediction == "x0"`` (the shipped model) the head predicts the clean patch and
  :meth:`RefDiT.token_velocity` turns it into the velocity; callers only ever see velocities.

Every token's modulation is gathered by its frame index, so a block can run on any token
subset (``tokens`` index) with the right per-frame modulation and true RoPE positions; the
execution modes in :mod:`.adapter` build on :meth:`RefDiTBlock.forward`'s ``kv_fn`` hook, which
lets the caller decide where keys/values come from (the current tokens only, or a K/V cache).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RefDiTConfig

__all__ = ["RefDiT", "RefDiTBlock", "KVFn", "apply_rope", "sinusoidal_embedding"]

#: ``kv_fn(k, v) -> (k_all, v_all)``: given the keys/values of the tokens being computed
#: (``[B, heads, N, head_dim]``, RoPE applied), return the keys/values to attend to. Identity for
#: a plain forward; a K/V cache writes them into a slot and returns the visible prefix.
KVFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _identity_kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return k, v


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``t`` (any shape, float) -> ``[..., dim]`` (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.to(torch.float64)[..., None] * freqs.to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def frame_rows(t: Tensor, frame_of_token: Optional[Tensor]) -> Tensor:
    """Per-frame rows ``t`` ``[B, F, ...]`` for each token: gathered to ``[B, N, ...]`` by
    ``frame_of_token`` ``[N]``, or, with None (tokens in frame-major order, the same number
    per frame), ``[B, F, 1, ...]`` to broadcast over :func:`by_frame` views (no copy)."""
    return t[:, :, None] if frame_of_token is None else t[:, frame_of_token]


def by_frame(x: Tensor, frames: int, frame_of_token: Optional[Tensor]) -> Tensor:
    """``x`` ``[B, N, ...]`` as ``[B, F, N/F, ...]`` for frame-major tokens (None), else as is."""
    return x.unflatten(1, (frames, -1)) if frame_of_token is None else x


def by_token(x: Tensor, frame_of_token: Optional[Tensor]) -> Tensor:
    """Inverse of :func:`by_frame`."""
    return x.flatten(1, 2) if frame_of_token is None else x


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x`` ``[B, N, H, d]`` by angles given as ``cos/sin`` ``[N, d/2]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)          # [B, N, H, d/2] each
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


class _QKNormAttention(nn.Module):
    """Projections shared by both attentions: q, k, v, o and RMSNorm on q and k over the full
    width (as Wan)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)


class SelfAttention(_QKNormAttention):
    """Multi-head self-attention with q/k RMSNorm and RoPE."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_fn: KVFn,
                mask: Optional[Tensor]) -> Tensor:
        """``x`` ``[B, N, D]`` -> ``[B, N, D]``; ``mask`` ``[N, Nk]`` bool (True = attend) or None."""
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q = apply_rope(self.norm_q(self.q(x)).view(shape), cos, sin).transpose(1, 2)
        k = apply_rope(self.norm_k(self.k(x)).view(shape), cos, sin).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        k_all, v_all = kv_fn(k, v)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(_QKNormAttention):
    """Attention from video tokens to condition tokens (q/k RMSNorm, as Wan)."""

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        """``x`` ``[B, N, D]``, ``ctx`` ``[B, L, D]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        hd = d // self.heads
        q = self.norm_q(self.q(x)).view(b, n, self.heads, hd).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).view(b, -1, self.heads, hd).transpose(1, 2)
        v = self.v(ctx).view(b, -1, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class RefDiTBlock(nn.Module):
    """One Wan-style block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: RefDiTConfig):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)  # cross-attn query norm
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_mult * d, d))
        # Wan: each block owns a learned [6, D] offset added to the shared time modulation.
        self.modulation = nn.Parameter(torch.randn(6, d) / d ** 0.5)

    def forward(self, x: Tensor, e0: Tensor, frame_of_token: Optional[Tensor], cos: Tensor,
                sin: Tensor, ctx: Tensor, kv_fn: KVFn = _identity_kv,
                mask: Optional[Tensor] = None) -> Tensor:
        """Run the block on ``N`` tokens.

        ``x`` ``[B, N, D]``; ``e0`` ``[B, F, 6, D]`` per-frame modulation; ``frame_of_token``
        ``[N]`` long (index into ``e0``'s frames for each token; gathered, never sliced, so any
        token subset gets its own frame's modulation), or None when the tokens are all of
        ``e0``'s frames in frame-major order (the modulation then broadcasts per frame: the
        same numbers without gathering a ``[B, N, 6, D]`` copy); ``cos/sin``
        ``[N, head_dim/2]`` RoPE at the tokens' true positions; ``ctx`` ``[B, L, D]``
        condition tokens; ``kv_fn`` and ``mask`` select what the tokens attend to. Returns a
        new ``[B, N, D]`` (no in-place update of ``x``).
        """
        fot, frames = frame_of_token, e0.shape[1]
        mod = frame_rows(e0 + self.modulation, fot)         # [B, N, 6, D] or [B, F, 1, 6, D]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(-2)

        def modulate(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
            return by_token(by_frame(t, frames, fot) * (1 + scale) + shift, fot)

        def gated(t: Tensor, gate: Tensor) -> Tensor:
            return by_token(by_frame(t, frames, fot) * gate, fot)

        y = self.self_attn(modulate(self.norm1(x), scale_a, shift_a), cos, sin, kv_fn, mask)
        x = x + gated(y, gate_a)
        x = x + self.cross_attn(self.norm3(x), ctx)
        y = self.ffn(modulate(self.norm2(x), scale_f, shift_f))
        return x + gated(y, gate_f)


class RefDiT(nn.Module):
    """The reference diffusion-forcing video DiT (see the module docstring)."""

    def __init__(self, cfg: RefDiTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RefDiTConfig()
        d = cfg.hidden
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        # Condition tokens: one per attribute. Values of all attributes share one table
        # (offset by attribute), plus an attribute-type embedding, then an MLP.
        offsets = torch.tensor([0] + list(cfg.cond_vocab[:-1])).cumsum(0)
        self.register_buffer("cond_offsets", offsets, persistent=False)
        self.cond_value = nn.Embedding(sum(cfg.cond_vocab), d)
        self.cond_type = nn.Embedding(cfg.cond_tokens, d)
        self.cond_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"),
                                       nn.Linear(d, d))
        self.null_cond = nn.Parameter(torch.randn(cfg.cond_tokens, d) * 0.02)
        self.blocks = nn.ModuleList(RefDiTBlock(cfg) for _ in range(cfg.num_blocks))
        self.head_norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(2, d) / d ** 0.5)
        self.head = nn.Linear(d, cfg.patch_dim)
        self._rope_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._init_weights()

    # -- initialisation ------------------------------------------------------------------------
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cond_value.weight, std=0.5)
        nn.init.normal_(self.cond_type.weight, std=0.5)
        # Like Wan: a zero output head, so the untrained model predicts v = 0.
        nn.init.zeros_(self.head.weight)

    # -- geometry --------------------------------------------------------------------------------
    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, F, H, W]`` -> tokens ``[B, F*Ht*Wt, C*p*p]`` (frame-major, then row, col)."""
        b, c, f, h, w = x.shape
        p = self.cfg.patch
        x = x.reshape(b, c, f, h // p, p, w // p, p)
        return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: Tensor, frames: int) -> Tensor:
        """Inverse of :meth:`patchify`: ``[B, F*Ht*Wt, C*p*p]`` -> ``[B, C, F, H, W]``."""
        b = tokens.shape[0]
        cfg, p = self.cfg, self.cfg.patch
        ht, wt = cfg.grid
        x = tokens.reshape(b, frames, ht, wt, cfg.channels, p, p)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, cfg.channels, frames, ht * p, wt * p)

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding: ``[B, C, F, H, W]`` -> ``h`` ``[B, F*Ht*Wt, D]``."""
        return self.patch_embed(self.patchify(x))

    def time_embedding(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``sigma`` ``[B, F]`` -> ``(e [B, F, D], e0 [B, F, 6, D])``; timestep = 1000 sigma."""
        e = self.time_embed(sinusoidal_embedding(sigma * 1000.0, self.cfg.freq_dim))
        e0 = self.time_proj(e).unflatten(-1, (6, self.cfg.hidden))
        return e, e0

    def rope(self, frames: int) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` ``[frames*Ht*Wt, head_dim/2]`` for frames ``0..frames-1``.

        The head dim is split as in Wan: ``2*(d//6)`` dims each for rows and columns, the rest
        (the largest part) for time. Cached per frame count.
        """
        if frames not in self._rope_cache:
            cfg = self.cfg
            d = cfg.head_dim
            dh = dw = 2 * (d // 6)
            dt = d - dh - dw
            ht, wt = cfg.grid

            def freqs(dim: int) -> Tensor:
                return 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

            ft, fh, fw = torch.meshgrid(torch.arange(frames), torch.arange(ht), torch.arange(wt),
                                        indexing="ij")
            ang = torch.cat([ft.reshape(-1, 1) * freqs(dt), fh.reshape(-1, 1) * freqs(dh),
                             fw.reshape(-1, 1) * freqs(dw)], dim=1)
            self._rope_cache[frames] = (torch.cos(ang).float(), torch.sin(ang).float())
        return self._rope_cache[frames]

    def block_causal_mask(self, frames: int) -> Tensor:
        """``[N, N]`` bool (True = may attend): token of chunk i sees every token of chunks <= i."""
        chunk = torch.arange(frames).repeat_interleave(self.cfg.tokens_per_frame) \
            // self.cfg.chunk_frames
        return chunk[None, :] <= chunk[:, None]

    def frame_index(self, frames: int) -> Tensor:
        """``[frames*tokens_per_frame]`` long: the frame of each token (frame-major order)."""
        return torch.arange(frames).repeat_interleave(self.cfg.tokens_per_frame)

    # -- condition -------------------------------------------------------------------------------
    def encode_condition(self, ids: Tensor) -> Tensor:
        """Condition ids ``[B, L]`` long (``Condition.ids()``) -> tokens ``[B, L, D]``."""
        types = torch.arange(self.cfg.cond_tokens, device=ids.device)
        h = self.cond_value(ids + self.cond_offsets) + self.cond_type(types)
        return self.cond_proj(h)

    def null_condition(self, batch: int) -> Tensor:
        """The learned unconditional tokens ``[B, L, D]`` (classifier-free guidance)."""
        return self.null_cond[None].expand(batch, -1, -1)

    # -- forward ---------------------------------------------------------------------------------
    def run_head(self, h: Tensor, e: Tensor, frame_of_token: Optional[Tensor]) -> Tensor:
        """Output head on tokens: ``h`` ``[B, N, D]``, ``e`` ``[B, F, D]`` -> ``[B, N, C*p*p]``
        (``frame_of_token`` as in :meth:`RefDiTBlock.forward`)."""
        mod = frame_rows(self.head_modulation + e[:, :, None, :], frame_of_token)
        shift, scale = mod.unbind(-2)
        hf = by_frame(self.head_norm(h), e.shape[1], frame_of_token)
        return self.head(by_token(hf * (1 + scale) + shift, frame_of_token))

    def token_velocity(self, h: Tensor, e: Tensor, frame_of_token: Optional[Tensor],
                       x_tokens: Tensor, sigma: Tensor) -> Tensor:
        """Velocity per token ``[B, N, C*p*p]`` from final hidden states ``h`` ``[B, N, D]``.

        ``x_tokens`` ``[B, N, C*p*p]`` are the same tokens of the noisy input (patchified),
        ``sigma`` ``[B, F]`` the frames' noise levels, ``e`` and ``frame_of_token`` as in
        :meth:`run_head` (any token subset works: everything is gathered by frame index).
        """
        out = self.run_head(h, e, frame_of_token)
        if self.cfg.prediction == "v":
            return out
        s = frame_rows(sigma, frame_of_token).clamp(min=self.cfg.sigma_min)[..., None]
        frames = sigma.shape[1]
        diff = by_frame(x_tokens - out, frames, frame_of_token)
        return by_token(diff / s, frame_of_token)

    def output(self, h: Tensor, e: Tensor, frame_of_token: Optional[Tensor], x: Tensor,
               sigma: Tensor) -> Tensor:
        """:meth:`token_velocity` for every token of ``x`` ``[B, C, F, H, W]``, as a video
        ``[B, C, F, H, W]``."""
        v = self.token_velocity(h, e, frame_of_token, self.patchify(x), sigma)
        return self.unpatchify(v, x.shape[2])

    def run_blocks(self, h: Tensor, e0: Tensor, frame_of_token: Optional[Tensor], cos: Tensor,
                   sin: Tensor, ctx: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The block stack on ``h`` ``[B, N, D]`` with a plain attention mask (no cache)."""
        for block in self.blocks:
            h = block(h, e0, frame_of_token, cos, sin, ctx, mask=mask)
        return h

    def forward(self, x: Tensor, sigma: Tensor, ctx: Tensor) -> Tensor:
        """Whole window as one sequence, block-causal: ``x`` ``[B, C, F, H, W]``, ``sigma``
        ``[B, F]``, ``ctx`` ``[B, L, D]`` -> velocity ``[B, C, F, H, W]``."""
        frames = x.shape[2]
        e, e0 = self.time_embedding(sigma)
        cos, sin = (t.to(x.device) for t in self.rope(frames))
        # frame_of_token None: every frame's tokens in order (modulation broadcast per frame)
        h = self.run_blocks(self.embed(x), e0, None, cos, sin, ctx,
                            self.block_causal_mask(frames).to(x.device))
        return self.output(h, e, None, x, sigma)

    # -- cost model ------------------------------------------------------------------------------
    def block_flops(self, q_tokens: int, kv_tokens: int, batch: int = 1) -> int:
        """Analytic FLOPs (multiply-add = 2) of the block stack for one forward.

        ``q_tokens`` tokens are computed (projections, cross-attention, FFN) and attend to
        ``kv_tokens`` keys (including themselves). Cached context K/V costs nothing here; norms,
        modulation and softmax are ignored (< 1% at these widths). Per block:
        self-attn q/k/v/o projections ``8 q D^2``, scores and weighted sum ``4 q kv D``,
        cross-attn ``4 q D^2 + 4 L D^2 + 4 q L D``, FFN ``4 m q D^2``.
        """
        cfg = self.cfg
        d, q, kv, ln = cfg.hidden, q_tokens, kv_tokens, cfg.cond_tokens
        per_block = (8 * q * d * d + 4 * q * kv * d
                     + 4 * q * d * d + 4 * ln * d * d + 4 * q * ln * d
                     + 4 * cfg.ffn_mult * q * d * d)
        return int(batch * cfg.num_blocks * per_block)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
