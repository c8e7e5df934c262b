"""cachekit around diffusers' SkyReels-V2 diffusion-forcing transformer (imports diffusers).

What is patched, and how it is undone
-------------------------------------
* **The transformer**: one diffusers ``ModelHook`` named ``"cachekit"`` in the model's own
  ``HookRegistry`` (the mechanism diffusers' caches use). Its ``new_forward`` runs the **stock
  forward** (patch embedding, RoPE, block mask, time/text embeddings, output head: all
  diffusers code) with the ``blocks`` ModuleList swapped, for the duration of the call only,
  for a one-element stand-in that hands the block stack to the cache engine. The hook is
  *stateful*, so diffusers' ``cache_context("cond"/"uncond")`` sets its context: that context
  name is the **branch** (never call parity), and the ``reset_state`` diffusers calls at the
  end of every pipeline call (``maybe_free_model_hooks``) ends the cachekit run.
* **The pipeline** (optional): the instance attributes ``generate_timestep_matrix`` (captures
  each window's step matrix, update mask and valid intervals, and starts an engine window:
  long videos are several windows) and ``prepare_latents`` (``long_video_iter`` None or 0
  starts a new run).
* :func:`disable` removes exactly what :func:`enable` added (the hook, the two instance
  attributes, the registry and the instance ``forward`` if they did not exist before).

Execution modes
---------------
* ``vanilla``: the stock block loop, called once per transformer call through the engine as a
  ``Scope.WINDOW`` call (``teacache``, ``fixed_interval``, ``none``). Exact: ``none`` (or a
  threshold of 0) reproduces the uncached pipeline bit for bit.
* ``chunked``: chunk by chunk (``causal_block_size`` frames) in ascending order, each chunk
  through every block with the **block's own forward** (norms, ``scale_shift_table`` + the
  4-D DF temb sliced/gathered per token, cross-attention, FFN) and its self-attention
  processor replaced, for the call only, by :class:`_SlotAttention`: the same projections,
  QK-RMSNorm and RoPE as ``SkyReelsV2AttnProcessor``, writing K/V into per-branch, per-layer
  buffers of the window and attending to slots ``[0, end of chunk)``. ``flowcache`` and
  ``motioncache`` need it (per-chunk decisions, token subsets). Finished and prefix chunks
  are recomputed only when their block input or timestep changed (bit-compared), pending
  chunks and chunks after the last active one are never run.

  This equals the stock model **only when the stock model is block-causal**, which diffusers
  does exactly when ``transformer.config.num_frame_per_block > 1`` (the pipeline sets it from
  ``causal_block_size``; with ``causal_block_size`` None or 1 the stock model attends
  bidirectionally over the whole window). Chunked mode refuses the bidirectional case.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._compat import require_diffusers

require_diffusers()

from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402
from diffusers.hooks.hooks import BaseState, StateManager  # noqa: E402
from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: E402
from diffusers.models.transformers.transformer_skyreels_v2 import (  # noqa: E402
    SkyReelsV2AttnProcessor,
    SkyReelsV2Transformer3DModel,
)

from cachekit.engine import CacheEngine  # noqa: E402
from cachekit.errors import CacheContextError, ConfigError, invalid_value  # noqa: E402
from cachekit.types import ChunkCall, ChunkState, Probe, Scope, tensor_repr  # noqa: E402

from ._schedule import WindowSchedule  # noqa: E402

__all__ = ["SkyReelsV2Cache", "enable", "disable", "engine_of", "controller_of",
           "begin_window", "end_run", "execution_stats", "resolve_mode", "HOOK_NAME", "MODES",
           "DF_PIPELINES"]

HOOK_NAME = "cachekit"
PIPE_ATTR = "_cachekit_cache"
MODES = ("auto", "vanilla", "chunked")
_PIPELINE_METHODS = ("generate_timestep_matrix", "prepare_latents")
_MISSING = object()


def _df_pipeline_classes() -> tuple[type, ...]:
    import diffusers

    names = ("SkyReelsV2DiffusionForcingPipeline",
             "SkyReelsV2DiffusionForcingImageToVideoPipeline",
             "SkyReelsV2DiffusionForcingVideoToVideoPipeline")
    return tuple(getattr(diffusers, n) for n in names if hasattr(diffusers, n))


DF_PIPELINES = _df_pipeline_classes()


# --------------------------------------------------------------------------------------------
# mode
# --------------------------------------------------------------------------------------------
def resolve_mode(mode: str, policy: Any) -> str:
    """``auto`` -> ``chunked`` for chunk-scope policies, else ``vanilla``; checks the rest."""
    if mode not in MODES:
        raise ConfigError(invalid_value("mode", f"one of {list(MODES)}", mode))
    scope = getattr(policy, "scope", None)
    name = getattr(policy, "name", "?")
    if mode == "auto":
        return "chunked" if scope is Scope.CHUNK else "vanilla"
    if mode == "vanilla" and scope is Scope.CHUNK:
        raise ConfigError(invalid_value(
            "mode", f"'chunked' (or 'auto') for policy {name!r}, which decides per chunk",
            mode, "Chunk and token decisions need the chunk-by-chunk forward."))
    if mode == "chunked" and scope is Scope.WINDOW:
        raise ConfigError(invalid_value(
            "mode", f"'vanilla' (or 'auto') for policy {name!r}, which decides once per "
            f"window", mode))
    return mode


# --------------------------------------------------------------------------------------------
# the diffusers hook (branch from cache_context, end of run from reset_state)
# --------------------------------------------------------------------------------------------
class _NoState(BaseState):
    """diffusers' StateManager wants a state class; cachekit keeps its state in the engine."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _CachekitHook(ModelHook):
    """The ``"cachekit"`` hook on the transformer: hands each call to the controller."""

    _is_stateful = True

    def __init__(self, controller: "SkyReelsV2Cache") -> None:
        super().__init__()
        self.controller = controller
        # diffusers' _set_cache_context() finds StateManager attributes of stateful hooks
        # and sets the CacheContext on them: that is how the branch name reaches us.
        self.context = StateManager(_NoState)  # type: ignore[arg-type]

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx = self.context._context
        branch = None if ctx is None else ctx.name
        original = self.fn_ref.original_forward
        assert original is not None  # set by HookRegistry.register_hook for new_forward hooks
        return self.controller.forward(module, original, branch, args, kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        # DiffusionPipeline.maybe_free_model_hooks() -> _reset_stateful_cache(): end of call.
        self.controller.end_run()
        self.context.reset()
        return module

    def __repr__(self) -> str:
        c = self.controller
        return f"cachekit(policy={c.engine.policy.name!r}, mode={c.mode!r})"


# --------------------------------------------------------------------------------------------
# chunked execution: K/V-slot attention and the per-branch buffers
# --------------------------------------------------------------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """SkyReelsV2AttnProcessor's rotary embedding (same ops, same dtypes)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


class _SlotAttention:
    """Self-attention of one layer and branch through the window's K/V buffer.

    Same math as ``SkyReelsV2AttnProcessor`` for self-attention (``to_q/k/v`` or the fused
    ``to_qkv``, ``norm_q/norm_k``, RoPE of the tokens passed in, ``to_out``), except that the
    fresh K/V of the tokens at window positions ``pos`` (a slice, or an index for a token
    subset) are written into the buffers ``[B, N, heads, head_dim]`` and the queries attend to
    positions ``[0, end)``: earlier chunks plus the whole current chunk (fresh at ``pos``,
    whatever it held before elsewhere).
    """

    def __init__(self, batch: int, tokens: int) -> None:
        self.batch, self.tokens = batch, tokens
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.pos: Any = slice(0, 0)
        self.end = 0
        self._attention_backend = None
        self._parallel_config = None

    def adopt(self, original: Any) -> None:
        """Use the attention backend the replaced processor was set to."""
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 **kwargs: Any) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), \
                attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rope(query, *rotary_emb)
            key = _rope(key, *rotary_emb)
        if self.k is None:
            shape = (self.batch, self.tokens, *key.shape[2:])
            self.k, self.v = key.new_zeros(shape), value.new_zeros(shape)
        assert self.v is not None
        if isinstance(self.pos, slice):
            self.k[:, self.pos] = key
            self.v[:, self.pos] = value
        else:
            self.k.index_copy_(1, self.pos, key)
            self.v.index_copy_(1, self.pos, value)
        out = dispatch_attention_fn(query, self.k[:, :self.end], self.v[:, :self.end],
                                    attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class _BranchKV:
    """K/V buffers of one branch in the current window, plus what each context slot holds."""

    def __init__(self, num_layers: int, batch: int, tokens: int, enc: torch.Tensor) -> None:
        self.shape = (batch, tokens)
        self.procs = [_SlotAttention(batch, tokens) for _ in range(num_layers)]
        self.enc = enc.detach().clone()
        # chunk -> (block input, timestep) its slot was computed from, for FINISHED / PREFIX
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_condition(self, enc: torch.Tensor) -> None:
        """A changed prompt embedding (e.g. a step-end callback) invalidates the context."""
        if self.enc.shape != enc.shape or not torch.equal(self.enc, enc):
            self.memo.clear()
            self.enc = enc.detach().clone()

    def holds(self, g: int, h: torch.Tensor, t: torch.Tensor) -> bool:
        m = self.memo.get(g)
        return m is not None and torch.equal(m[0], h) and torch.equal(m[1], t)

    def remember(self, g: int, h: torch.Tensor, t: torch.Tensor) -> None:
        self.memo[g] = (h.detach().clone(), t.detach().clone())

    def forget(self, g: int) -> None:
        self.memo.pop(g, None)

    def nbytes(self) -> int:
        return sum(p.k.numel() * p.k.element_size() * 2 for p in self.procs if p.k is not None)


# --------------------------------------------------------------------------------------------
# the stand-in for `transformer.blocks` during one call
# --------------------------------------------------------------------------------------------
class _BlockStack(nn.Module):
    """Iterates as a single "block" that runs the whole stack through the controller.

    It is placed in ``transformer._modules["blocks"]`` only while a cached forward runs, so the
    stock ``for block in self.blocks: hidden_states = block(...)`` calls it once with the
    block inputs. The real blocks are its child, so ``.to()``/offload hooks that run during the
    call still reach them.
    """

    _controller: "SkyReelsV2Cache"

    def __init__(self, controller: "SkyReelsV2Cache", blocks: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_controller", controller)  # not a child module
        self.blocks = blocks

    def __iter__(self):
        yield self

    def __len__(self) -> int:
        return 1

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, rotary_emb: Any,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self._controller._run_stack(self.blocks, hidden_states, encoder_hidden_states,
                                           temb, rotary_emb, attention_mask)


class _CallInfo:
    __slots__ = ("branch", "row", "sched", "latent", "timestep", "enc_raw", "grid", "patch")

    def __init__(self, branch, row, sched, latent, timestep, enc_raw, grid, patch) -> None:
        self.branch, self.row, self.sched = branch, row, sched
        self.latent, self.timestep, self.enc_raw = latent, timestep, enc_raw
        self.grid, self.patch = grid, patch


def _frame_modulation(temb: torch.Tensor, frames: int, per_frame: int) -> torch.Tensor:
    """DF temb ``[B, 6, F*HW, D]`` (one row per token) -> per frame ``[B, F, 6, D]``."""
    return temb.unflatten(2, (frames, per_frame))[:, :, :, 0].transpose(1, 2)


# --------------------------------------------------------------------------------------------
# the controller
# --------------------------------------------------------------------------------------------
class SkyReelsV2Cache:
    """cachekit's state for one patched transformer (and optionally its pipeline).

    Owns the engine (decisions, residuals, statistics), the window schedule captured from the
    pipeline, the per-branch call counters that index its rows, and (chunked mode) the
    per-branch K/V buffers. Build it with :func:`enable`.
    """

    def __init__(self, transformer: Any, engine: CacheEngine, *, mode: str = "auto") -> None:
        self.transformer: Any = transformer
        self.engine = engine
        self.mode = resolve_mode(mode, engine.policy)
        self.pipeline: Any = None
        if self.mode == "chunked":
            _check_chunkable(transformer)
        self._blocks: Any = transformer._modules["blocks"]
        self._proxy = _BlockStack(self, self._blocks)
        self._sig = inspect.signature(type(transformer).forward)
        self._hook: Optional[_CachekitHook] = None
        self._saved: dict[str, Any] = {}
        self._in_run = False
        self._window = -1
        self._pending: Optional[tuple] = None
        self._schedule: Optional[WindowSchedule] = None
        self._rows: dict[str, int] = {}
        self._kv: dict[str, _BranchKV] = {}
        self._current: Optional[_CallInfo] = None
        self.counters = self._fresh_counters()

    @staticmethod
    def _fresh_counters() -> dict[str, Any]:
        return {"calls": 0, "windows": 0, "stock_block_tokens": 0, "run_block_tokens": 0,
                "context_block_tokens": 0, "peak_kv_bytes": 0}

    # -- install / uninstall ------------------------------------------------------------------
    def install(self, pipeline: Any = None) -> None:
        tr = self.transformer
        if controller_of(tr) is not None:
            raise CacheContextError(
                "cachekit is already enabled on this SkyReelsV2Transformer3DModel; call "
                "cachekit.disable_cache(...) first (one cache at a time).")
        if getattr(tr, "is_cache_enabled", False):
            raise CacheContextError(
                f"a diffusers cache ({type(tr._cache_config).__name__}) is enabled on this "
                f"transformer; call transformer.disable_cache() first: two caches around one "
                f"block stack would skip or apply residuals twice.")
        self._saved = {"registry": hasattr(tr, "_diffusers_hook"),
                       "forward": tr.__dict__.get("forward", _MISSING)}
        registry = HookRegistry.check_if_exists_or_initialize(tr)
        self._hook = _CachekitHook(self)
        registry.register_hook(self._hook, HOOK_NAME)
        registry.invalidate_child_registries_cache()
        if pipeline is not None:
            self.pipeline = pipeline
            saved = {}
            for name in _PIPELINE_METHODS:
                saved[name] = pipeline.__dict__.get(name, _MISSING)
                original = getattr(pipeline, name)
                wrap = self._wrap_timestep_matrix if name == "generate_timestep_matrix" \
                    else self._wrap_prepare_latents
                pipeline.__dict__[name] = wrap(original)
            self._saved["pipeline"] = saved
            pipeline.__dict__[PIPE_ATTR] = self

    def uninstall(self) -> None:
        self.end_run()
        tr = self.transformer
        registry = getattr(tr, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is self._hook:
            registry.remove_hook(HOOK_NAME, recurse=False)
            registry.invalidate_child_registries_cache()
            if not registry.hooks:
                if self._saved.get("forward", _MISSING) is _MISSING:
                    tr.__dict__.pop("forward", None)
                else:
                    tr.__dict__["forward"] = self._saved["forward"]
                if not self._saved.get("registry", True):
                    del tr._diffusers_hook
        pipe = self.pipeline
        if pipe is not None:
            for name, old in self._saved.get("pipeline", {}).items():
                if old is _MISSING:
                    pipe.__dict__.pop(name, None)
                else:
                    pipe.__dict__[name] = old
            pipe.__dict__.pop(PIPE_ATTR, None)
        self._hook = None
        self.pipeline = None
        self._kv.clear()

    # -- pipeline wrappers --------------------------------------------------------------------
    def _wrap_timestep_matrix(self, original: Callable) -> Callable:
        sig = inspect.signature(original)

        @functools.wraps(original)
        def generate_timestep_matrix(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            step_matrix, _index, update_mask, valid_interval = out
            # The I2V pipeline edits step_matrix/update_mask in place after this returns: keep
            # the tensors and read them at the window's first transformer call.
            self.begin_window(update_mask, int(bound.arguments["causal_block_size"]),
                              step_matrix=step_matrix, valid_interval=valid_interval)
            return out
        return generate_timestep_matrix

    def _wrap_prepare_latents(self, original: Callable) -> Callable:
        sig = inspect.signature(original)
        has_iter = "long_video_iter" in sig.parameters

        @functools.wraps(original)
        def prepare_latents(*args: Any, **kwargs: Any) -> Any:
            if has_iter:
                bound = sig.bind_partial(*args, **kwargs)
                it = bound.arguments.get("long_video_iter")
                if it is None or it == 0:
                    self.start_run()
            return original(*args, **kwargs)
        return prepare_latents

    # -- lifecycle ----------------------------------------------------------------------------
    def start_run(self, **info: Any) -> None:
        """Start a generation: a previous unfinished one is ended; statistics restart."""
        if self._in_run:
            self.end_run()
        tr = type(self.transformer).__name__
        pipe = None if self.pipeline is None else type(self.pipeline).__name__
        self.engine.begin_run(model=f"diffusers:{tr}", pipeline=pipe, mode=self.mode, **info)
        self._in_run = True
        self._window = -1
        self.counters = self._fresh_counters()

    def begin_window(self, step_update_mask: torch.Tensor, causal_block_size: int, *,
                     step_matrix: Optional[torch.Tensor] = None,
                     valid_interval: Any = None) -> None:
        """Start the next window of the run (a run is started if none is open)."""
        if not self._in_run:
            self.start_run()
        self._window += 1
        self._pending = (step_update_mask, int(causal_block_size), step_matrix, valid_interval)
        self._schedule = None
        self._rows = {}
        self._kv = {}
        self.counters["windows"] += 1
        self.engine.begin_window(self._window)

    def end_run(self) -> None:
        if self._in_run:
            self._in_run = False
            self.engine.end_run()
        self._pending = None
        self._schedule = None
        self._kv = {}

    def _window_schedule(self) -> WindowSchedule:
        if self._schedule is not None:
            return self._schedule
        if self._pending is None:
            raise CacheContextError(
                "cachekit: the SkyReels-V2 transformer was called without a window schedule. "
                "Enable the cache on the diffusion-forcing *pipeline* "
                "(cachekit.enable_cache(pipe, ...)), which captures each window's step matrix, "
                "or, when driving the transformer yourself, call "
                "cachekit_models.diffusers_skyreels.begin_window(transformer, step_update_mask, "
                "causal_block_size, step_matrix=...) before each window.")
        mask, cbs, step_matrix, valid = self._pending
        sched = WindowSchedule.from_tensors(mask, cbs, step_matrix=step_matrix,
                                            valid_interval=valid, window=self._window,
                                            strict=self.mode == "chunked")
        if self.mode == "chunked":
            self._check_chunked_window(sched)
        self._schedule = sched
        return sched

    def _check_chunked_window(self, sched: WindowSchedule) -> None:
        fpb = int(self.transformer.config.num_frame_per_block)
        name = self.engine.policy.name
        if fpb <= 1 or fpb != sched.causal_block_size:
            raise ConfigError(
                f"policy {name!r} runs the transformer chunk by chunk (mode='chunked'), which "
                f"equals the stock model only when the stock model attends block-causally. This "
                f"window has causal_block_size={sched.causal_block_size} and "
                f"transformer.config.num_frame_per_block={fpb}: diffusers builds no causal mask "
                f"then, every frame attends to every frame, and chunked execution would change "
                f"the model. Pass causal_block_size > 1 to the pipeline call (SkyReels-V2-DF "
                f"uses 5), or use a policy that runs the stock forward (teacache, "
                f"fixed_interval, none: mode='vanilla').")
        full = (0, sched.frames)
        bad = [i for i in range(sched.rows) if sched.interval(i) != full]
        if bad:
            raise ConfigError(invalid_value(
                "valid_interval", f"the whole window {full} in every row for mode='chunked'",
                sched.interval(bad[0]), "Rows that see a sub-window are only produced when "
                "base_num_frames < the window's frames; use mode='vanilla' there."))

    # -- one transformer call -----------------------------------------------------------------
    def forward(self, module: Any, original_forward: Callable, branch: Optional[str],
                args: tuple, kwargs: dict) -> Any:
        bound = self._sig.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        hs, ts = a["hidden_states"], a["timestep"]
        if branch is None:
            raise CacheContextError(
                "cachekit: SkyReels-V2 transformer called outside transformer.cache_context(name). "
                "The context name is the guidance branch ('cond', 'uncond', ...); cachekit never "
                "infers it from call parity. Wrap each call: `with transformer.cache_context("
                "'cond'): ...` (the diffusers pipelines do).")
        if not a["enable_diffusion_forcing"] or not isinstance(ts, torch.Tensor) or \
                ts.dim() != 2:
            raise CacheContextError(invalid_value(
                "transformer call", "a diffusion-forcing call (enable_diffusion_forcing=True, "
                "timestep [B, F])", f"enable_diffusion_forcing={a['enable_diffusion_forcing']}, "
                f"timestep {tensor_repr(ts)}", "cachekit's SkyReels-V2 adapter caches the "
                "diffusion-forcing pipelines; disable it for other pipelines."))
        sched = self._window_schedule()
        row = self._rows.get(branch, 0)
        if row >= sched.rows:
            raise CacheContextError(
                f"cachekit: transformer call {row + 1} in branch {branch!r} of window "
                f"{sched.window}, but the captured step matrix has {sched.rows} rows. Each row is "
                f"one call per branch; a pipeline that calls the transformer more often needs "
                f"begin_window() per window.")
        sched.check_timesteps(row, ts, branch)
        self._rows[branch] = row + 1
        p_t, p_h, p_w = module.config.patch_size
        _, _, f, hh, ww = hs.shape
        grid = (f // p_t, hh // p_h, ww // p_w)
        if self.mode == "chunked" and p_t != 1:
            raise ConfigError(invalid_value("patch_size[0]", "1 for mode='chunked' (one latent "
                                            "frame per token row)", p_t))
        latent = hs if p_t == 1 else None
        self._current = _CallInfo(branch, row, sched, latent, ts, a["encoder_hidden_states"],
                                  grid, (p_h, p_w))
        self.counters["calls"] += 1
        self.counters["stock_block_tokens"] += grid[0] * grid[1] * grid[2] * hs.shape[0]
        blocks = module._modules["blocks"]
        if blocks is not self._blocks:
            raise CacheContextError("transformer.blocks was replaced after cachekit was "
                                    "enabled; disable and enable the cache again.")
        module._modules["blocks"] = self._proxy
        try:
            return original_forward(*args, **kwargs)
        finally:
            module._modules["blocks"] = blocks
            self._current = None

    def _run_stack(self, blocks: nn.ModuleList, h: torch.Tensor, enc: torch.Tensor,
                   temb: torch.Tensor, rot: Any, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.mode == "vanilla":
            return self._run_window(blocks, h, enc, temb, rot, mask)
        return self._run_chunked(blocks, h, enc, temb, rot)

    # -- vanilla: the stock block loop as one window-scope engine call -----------------------
    def _run_window(self, blocks, h, enc, temb, rot, mask) -> torch.Tensor:
        c = self._current
        assert c is not None
        f, gh, gw = c.grid
        counters = self.counters

        def run(x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
            if tokens is not None:
                raise NotImplementedError(
                    "mode='vanilla' runs diffusers' stock forward over the whole window; token "
                    "subsets need mode='chunked' (block-causal models, causal_block_size > 1).")
            for block in blocks:
                x = block(x, enc, temb, rot, mask)
            counters["run_block_tokens"] += x.shape[0] * x.shape[1]
            return x

        call = ChunkCall(branch=c.branch, chunk=0, step=c.row, num_steps=c.sched.rows,
                         window=c.sched.window, iteration=c.row, frames=f,
                         tokens_per_frame=gh * gw, timestep=float(c.timestep.float().mean()),
                         scope=Scope.WINDOW)
        probe = Probe(modulation=_frame_modulation(temb, f, gh * gw), latent=c.latent,
                      grid=c.grid, patch=c.patch)
        return self.engine(call, h, run, probe)

    # -- chunked ------------------------------------------------------------------------------
    def _branch_kv(self, branch: str, h: torch.Tensor, enc_raw: torch.Tensor,
                   num_layers: int) -> _BranchKV:
        kv = self._kv.get(branch)
        b, n = h.shape[0], h.shape[1]
        if kv is None:
            kv = self._kv[branch] = _BranchKV(num_layers, b, n, enc_raw)
        elif kv.shape != (b, n):
            raise CacheContextError(invalid_value(
                f"block input of branch {branch!r}", f"[B, N] = {list(kv.shape)} as earlier in "
                f"window {self._window}", [b, n], "The window geometry changed without a new "
                "window (generate_timestep_matrix / begin_window)."))
        else:
            kv.check_condition(enc_raw)
        return kv

    def _blocks_through(self, blocks, procs, x, enc, temb, rot, pos, end) -> torch.Tensor:
        for block, proc in zip(blocks, procs):
            proc.pos, proc.end = pos, end
            x = block(x, enc, temb, rot, None)
        self.counters["run_block_tokens"] += x.shape[0] * x.shape[1]
        return x

    def _run_chunked(self, blocks, h, enc, temb, rot) -> torch.Tensor:
        c = self._current
        assert c is not None
        sched, row, branch = c.sched, c.row, c.branch
        f, gh, gw = c.grid
        hw = gh * gw
        cbs = sched.causal_block_size
        n = cbs * hw
        if f != sched.frames:
            raise CacheContextError(invalid_value(
                "latent frames of the call", f"{sched.frames} (the step matrix's frames)", f,
                "diffusers#13609: when the latent frames are not a multiple of "
                "causal_block_size the schedule drops the tail frames."))
        states, steps = sched.states(row), sched.steps(row)
        out = h.clone()   # frames that take no step keep their input (the pipeline ignores them)
        active = sched.active_chunks(row)
        if not active:
            return out
        last = active[-1]
        pending = [g for g in range(last) if states[g] is ChunkState.PENDING]
        if pending:
            raise ConfigError(invalid_value(
                "step_update_mask", "no pending chunk before an active one in mode='chunked'",
                f"row {row}: pending chunks {pending} before active chunk {last}",
                "Chunked execution never runs pending chunks, so later chunks would not see "
                "them; use mode='vanilla' for such schedules."))
        kv = self._branch_kv(branch, h, c.enc_raw, len(blocks))
        procs = kv.procs
        cos, sin = rot
        originals = [block.attn1.processor for block in blocks]
        for block, proc, orig in zip(blocks, procs, originals):
            proc.adopt(orig)
            block.attn1.processor = proc
        try:
            dirty = False  # a slot before this chunk was rewritten in this call
            for g in range(last + 1):
                lo, hi = g * n, (g + 1) * n
                fr = slice(g * cbs, (g + 1) * cbs)
                state = states[g]
                h_g = h[:, lo:hi]
                if state is not ChunkState.ACTIVE:
                    # context chunk: its K/V depends only on its input, its timestep and the
                    # slots before it
                    t_g = c.timestep[:, fr]
                    if not dirty and kv.holds(g, h_g, t_g):
                        continue
                    self._blocks_through(blocks, procs, h_g, enc, temb[:, :, lo:hi],
                                         (cos[:, lo:hi], sin[:, lo:hi]), slice(lo, hi), hi)
                    self.counters["context_block_tokens"] += h_g.shape[0] * n
                    kv.remember(g, h_g, t_g)
                    dirty = True
                    continue
                kv.forget(g)
                dirty = True
                temb_g = temb[:, :, lo:hi]
                cos_g, sin_g = cos[:, lo:hi], sin[:, lo:hi]

                def run(x: torch.Tensor, tokens: Optional[torch.Tensor] = None, lo: int = lo,
                        hi: int = hi, temb_g: torch.Tensor = temb_g, cos_g: torch.Tensor = cos_g,
                        sin_g: torch.Tensor = sin_g) -> torch.Tensor:
                    if tokens is None:
                        return self._blocks_through(blocks, procs, x, enc, temb_g,
                                                    (cos_g, sin_g), slice(lo, hi), hi)
                    idx = tokens.to(x.device)
                    return self._blocks_through(
                        blocks, procs, x, enc, temb_g.index_select(2, idx),
                        (cos_g.index_select(1, idx), sin_g.index_select(1, idx)), idx + lo, hi)

                call = ChunkCall(branch=branch, chunk=g, step=steps[g],
                                 num_steps=sched.num_steps(g), window=sched.window,
                                 iteration=row, frames=cbs, tokens_per_frame=hw,
                                 timestep=sched.timestep(row, g), scope=Scope.CHUNK)
                probe = Probe(modulation=_frame_modulation(temb_g, cbs, hw),
                              latent=None if c.latent is None else c.latent[:, :, fr],
                              grid=(cbs, gh, gw), patch=c.patch)
                out[:, lo:hi] = self.engine(call, h_g, run, probe)
        finally:
            for block, orig in zip(blocks, originals):
                block.attn1.processor = orig
        kv_bytes = sum(k.nbytes() for k in self._kv.values())
        self.counters["peak_kv_bytes"] = max(self.counters["peak_kv_bytes"], kv_bytes)
        return out

    # -- results ------------------------------------------------------------------------------
    def execution_stats(self) -> dict[str, Any]:
        """Model-side counts of the current (or last) run, next to the engine's summary.

        ``stock_block_tokens``: token passes through the block stack the stock forward makes
        (every frame, every call); ``run_block_tokens``: the ones cachekit ran (computed chunks
        and token subsets, context chunks included); ``context_block_tokens``: the part spent
        refreshing finished/prefix chunks' K/V in chunked mode.
        """
        d: dict[str, Any] = dict(self.counters)
        d["mode"] = self.mode
        stock = d["stock_block_tokens"]
        d["block_token_fraction"] = d["run_block_tokens"] / stock if stock else 1.0
        return d


def _check_chunkable(transformer: Any) -> None:
    for i, block in enumerate(transformer.blocks):
        attn = getattr(block, "attn1", None)
        proc = getattr(attn, "processor", None)
        if type(proc) is not SkyReelsV2AttnProcessor:
            raise ConfigError(invalid_value(
                f"transformer.blocks[{i}].attn1.processor",
                "diffusers' SkyReelsV2AttnProcessor for mode='chunked' (cachekit swaps in a "
                "K/V-slot version of the same math during each call)", type(proc).__name__,
                "Restore the default processor, or use a window policy (mode='vanilla')."))
        if getattr(attn, "add_k_proj", None) is not None:
            raise ConfigError(f"transformer.blocks[{i}].attn1 has added K/V projections; "
                              f"mode='chunked' supports plain self-attention only")
        if getattr(proc, "_parallel_config", None) is not None:
            raise ConfigError("mode='chunked' does not support diffusers context parallelism "
                              "(the K/V slots are per device); use mode='vanilla'.")


# --------------------------------------------------------------------------------------------
# module-level API used by the plugin and the package
# --------------------------------------------------------------------------------------------
def _transformer_of(target: Any) -> tuple[SkyReelsV2Transformer3DModel, Any]:
    if isinstance(target, SkyReelsV2Transformer3DModel):
        return target, None
    if DF_PIPELINES and isinstance(target, DF_PIPELINES):
        tr = getattr(target, "transformer", None)
        if not isinstance(tr, SkyReelsV2Transformer3DModel):
            raise ConfigError(invalid_value(
                f"{type(target).__name__}.transformer", "a SkyReelsV2Transformer3DModel",
                type(tr).__name__, "Enable cachekit before wrapping the transformer (e.g. "
                "torch.compile); compile the blocks regionally instead."))
        return tr, target
    raise ConfigError(invalid_value(
        "target", "a SkyReels-V2 diffusion-forcing pipeline "
        f"({', '.join(c.__name__ for c in DF_PIPELINES)}) or a SkyReelsV2Transformer3DModel",
        type(target).__name__))


def controller_of(target: Any) -> Optional[SkyReelsV2Cache]:
    """The controller enabled on ``target`` (pipeline or transformer), or None."""
    if isinstance(target, nn.Module):
        registry = getattr(target, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if registry is not None else None
        return hook.controller if isinstance(hook, _CachekitHook) else None
    ctl = getattr(target, "__dict__", {}).get(PIPE_ATTR)
    if ctl is not None:
        return ctl
    tr = getattr(target, "transformer", None)
    return controller_of(tr) if isinstance(tr, nn.Module) else None


def enable(target: Any, engine: CacheEngine, *, mode: str = "auto") -> Any:
    """Patch ``target`` (a DF pipeline or its transformer) with ``engine``; returns ``target``.

    Raises :class:`CacheContextError` if cachekit (or a diffusers cache) is already enabled.
    """
    transformer, pipeline = _transformer_of(target)
    if controller_of(target) is not None or controller_of(transformer) is not None:
        raise CacheContextError(
            f"cachekit is already enabled on this {type(target).__name__}"
            f"{' or its transformer' if pipeline is not None else ''}; call "
            f"cachekit.disable_cache(...) on the object it was enabled on first (one cache at "
            f"a time).")
    ctl = SkyReelsV2Cache(transformer, engine, mode=mode)
    ctl.install(pipeline)
    return target


def disable(target: Any) -> None:
    """Remove cachekit from ``target`` (restores the original methods and forward exactly)."""
    ctl = controller_of(target)
    if ctl is None:
        raise CacheContextError(f"cachekit is not enabled on this {type(target).__name__}; "
                                f"nothing to disable.")
    ctl.uninstall()


def engine_of(target: Any) -> Optional[CacheEngine]:
    ctl = controller_of(target)
    return None if ctl is None else ctl.engine


def _require(target: Any) -> SkyReelsV2Cache:
    ctl = controller_of(target)
    if ctl is None:
        raise CacheContextError(f"cachekit is not enabled on this {type(target).__name__}; "
                                f"call cachekit.enable_cache(...) first.")
    return ctl


def begin_window(target: Any, step_update_mask: torch.Tensor, causal_block_size: int, *,
                 step_matrix: Optional[torch.Tensor] = None, valid_interval: Any = None) -> None:
    """Start the next window when driving the transformer yourself (no pipeline wrapping).

    Pass what ``generate_timestep_matrix`` returned for the window: ``step_update_mask [R, F]``,
    ``causal_block_size``, and preferably ``step_matrix [R, F]`` (enables the per-call timestep
    check) and ``valid_interval``. Then make one call per branch and row, each inside
    ``transformer.cache_context(branch)``. The first window starts a run; :func:`end_run` (or
    ``transformer._reset_stateful_cache()``) ends it.
    """
    _require(target).begin_window(step_update_mask, causal_block_size, step_matrix=step_matrix,
                                  valid_interval=valid_interval)


def end_run(target: Any) -> None:
    """End the current run (statistics stay readable through ``summary``)."""
    _require(target).end_run()


def execution_stats(target: Any) -> dict[str, Any]:
    return _require(target).execution_stats()
