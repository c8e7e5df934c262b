"""Model adapter for the reference DiT: the contract the core sampler and cache engine rely on.

Two execution modes of one window:

* ``vanilla``: the whole window is one sequence with the block-causal mask, every chunk
  (finished, prefix and pending ones too) is recomputed at every call, as stock SkyReels-V2.
  A hook sees the window as one unit (``Scope.WINDOW``) and may only run all tokens.
* ``chunked``: chunk by chunk in ascending order through per-branch, per-layer K/V buffers
  sized to the window (slot ``g`` = chunk ``g``'s tokens), as the FlowCache / MotionCache
  SkyReels transformers do. Pending chunks and chunks after the last active chunk are never
  run; finished and prefix chunks run once (blocks only) to fill their slot; active chunks go
  through the hook (``Scope.CHUNK``). Because attention is block-causal and a finished chunk's
  latent and sigma no longer change, this equals vanilla on the active chunks up to float
  reordering (the lossless layer of DESIGN.md section 2).

The hook protocol is ``hook(call, h_in, run, probe) -> h_out`` (:data:`cachekit.types.ChunkHook`);
``run`` is a :class:`cachekit.types.BlockRunner` that can also run a sorted token subset.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from cachekit.errors import CacheContextError, ConfigError, invalid_value
from cachekit.protocols import reuse_space_of
from cachekit.types import (ChunkCall, ChunkHook, ChunkState, IterationInfo, ModelSpec, Probe,
                            Scope)

from ..synthetic import Condition, sample_condition
from .model import RefDiT

__all__ = ["RefDiTAdapter", "RefDiTSession", "MODES", "load_adapter"]

MODES = ("chunked", "vanilla")
_VANILLA_SUBSET = ("refdit vanilla mode runs the whole window as one sequence; token-level "
                   "reuse (run(h, tokens)) needs mode='chunked'.")
# Sampler defaults for the bundled model: 50 steps and ar_step 5 as the MotionCache paper's
# SkyReels-V2 run (caching results depend on the step count: the warm-up and phase-1 steps are
# fixed counts); shift 2 and CFG 2 chosen by eye for the shipped weights on sheets like
# `python -m cachekit_models.refdit.diagnose guidance --scales 1.5,2,2.5,3 --seeds 0-9` (and
# CFG 5, shift 1 and 4 on seeds 0-5): CFG 3 and above make sprite outlines ragged ("burnt"),
# CFG 1.5 lets fast sprites lose pieces; the shift changed little.
DEFAULT_STEPS, DEFAULT_AR_STEP, DEFAULT_SHIFT, DEFAULT_GUIDANCE = 50, 5, 2.0, 2.0
_CONTEXT_STATES = (ChunkState.FINISHED, ChunkState.PREFIX)


class RefDiTAdapter:
    """Wraps a :class:`RefDiT` (default: the bundled weights) for the sampler and engine."""

    name = "refdit"

    def __init__(self, model: Optional[RefDiT] = None, *, chunk_batching: bool = True,
                 branch_batching: bool = True):
        if model is None:
            from .loading import load_refdit
            model = load_refdit()
        for name, value in (("chunk_batching", chunk_batching),
                            ("branch_batching", branch_batching)):
            if not isinstance(value, bool):
                raise ConfigError(invalid_value(name, "True or False", value))
        self.model = model.eval()
        self.spec: ModelSpec = model.cfg.spec(self.name)
        #: chunked mode: run an iteration's chunks as one forward (True) or one call per chunk
        self.chunk_batching = chunk_batching
        #: run the guidance branches of an iteration as one batch (True) or one after the other
        self.branch_batching = branch_batching

    # -- conditions ------------------------------------------------------------------------------
    def parse_condition(self, text: str) -> Condition:
        return Condition.parse(text)

    def sample_condition(self, seed: int) -> Condition:
        return sample_condition(seed)

    @torch.no_grad()
    def encode_condition(self, conds: Sequence[Union[Condition, str]]) -> Tensor:
        """Condition tokens ``[B, L, D]`` (L = one token per attribute); strings are parsed."""
        conds = [c if isinstance(c, Condition) else Condition.parse(c) for c in conds]
        if not conds:
            raise ConfigError(invalid_value("conds", "at least one condition", conds))
        ids = torch.tensor([c.ids() for c in conds], dtype=torch.long)
        dev = next(self.model.parameters()).device
        return self.model.encode_condition(ids.to(dev))

    @torch.no_grad()
    def null_condition(self, batch: int) -> Tensor:
        """The learned unconditional tokens ``[B, L, D]`` for the CFG ``uncond`` branch."""
        return self.model.null_condition(batch).clone()

    def encode_prompt(self, prompt: Optional[str], *, seed: int,
                      batch: int) -> tuple[Tensor, Tensor, str]:
        """``(cond [B,L,D], uncond [B,L,D], text)`` for ``cachekit generate``.

        ``prompt`` is a condition string (``"shape=circle,color=red,motion=fast"``; unnamed
        attributes keep their defaults); None draws a random condition from ``seed``.
        """
        cond = self.parse_condition(prompt) if prompt else self.sample_condition(seed)
        return self.encode_condition([cond] * batch), self.null_condition(batch), str(cond)

    def decode(self, x: Tensor):
        """Model space ``[B, C, F, H, W]`` ([-1, 1] RGB) -> numpy ``[B, F, H, W, 3]`` in [0, 1]."""
        return ((x.detach().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()

    def calibration_file(self, scope: str):
        """The indicator polynomial `cachekit calibrate` fitted on these weights for ``scope``
        (``"chunk"`` or ``"window"``), shipped next to them; None if there is none. Indicator
        policies use it when no coefficients are given (see cachekit.generation)."""
        from .loading import DEFAULT_WEIGHTS

        path = DEFAULT_WEIGHTS.parent / f"calibration-{scope}.json"
        return path if path.is_file() else None

    def default_sampler(self):
        """Sampler settings the bundled model was checked with (one 16-frame window)."""
        from cachekit.sampling import SamplerConfig  # core sampler; imported lazily
        return SamplerConfig(num_frames=self.spec.max_frames, num_steps=DEFAULT_STEPS,
                             ar_step=DEFAULT_AR_STEP, shift=DEFAULT_SHIFT,
                             guidance_scale=DEFAULT_GUIDANCE)

    # -- execution -------------------------------------------------------------------------------
    def session(self, *, batch: int, mode: str = "chunked",
                hook: Optional[ChunkHook] = None) -> "RefDiTSession":
        """A generation session (owns the per-branch K/V buffers of the current window)."""
        return RefDiTSession(self.model, batch=batch, mode=mode, hook=hook,
                             chunk_batching=self.chunk_batching,
                             branch_batching=self.branch_batching)


def load_adapter(path=None, *, verify: bool = True, device: str = "cpu",
                 chunk_batching: bool = True, branch_batching: bool = True) -> RefDiTAdapter:
    """The plugin factory: an adapter around :func:`~.loading.load_refdit` (``path`` default:
    the bundled weights)."""
    from .loading import load_refdit
    return RefDiTAdapter(load_refdit(path, verify=verify, device=device),
                         chunk_batching=chunk_batching, branch_batching=branch_batching)


class RefDiTSession:
    """Per-generation state of the adapter: K/V buffers per branch, reset by ``begin_window``."""

    def __init__(self, model: RefDiT, *, batch: int, mode: str = "chunked",
                 hook: Optional[ChunkHook] = None, chunk_batching: bool = True,
                 branch_batching: bool = True):
        if mode not in MODES:
            raise ConfigError(invalid_value("mode", f"one of {', '.join(MODES)}", mode))
        if not (isinstance(batch, int) and batch >= 1):
            raise ConfigError(invalid_value("batch", "an int >= 1", batch))
        self.model = model
        self.cfg = model.cfg
        self.batch = batch
        self.mode = mode
        self.hook = hook
        # what the hook caches (ChunkCall.space); fixed for the session's hook
        self._space = reuse_space_of(hook) if hook is not None else "residual"
        # Chunked mode runs all chunks of an iteration that need the blocks (active ones and
        # context refreshes) as ONE forward when it can: without a hook, or with a hook that
        # offers run_chunks (the engine) and allows it (the policy's batch_chunks). Same video
        # as one call per chunk (block-causal attention inside the forward), fewer and larger
        # matrix products: on a CPU the per-call cost of 64-token chunks otherwise exceeds
        # the work chunked execution saves.
        hook_groups = hook is None or (callable(getattr(hook, "run_chunks", None))
                                       and bool(getattr(hook, "batch_chunks", False)))
        self._grouped = chunk_batching and hook_groups
        # velocities(): the guidance branches of an iteration stacked along the batch (one
        # forward for cond and uncond) where their work is the same; see velocities()
        self._joint = branch_batching and hook_groups and (mode == "vanilla" or chunk_batching)
        self._window: Optional[int] = None
        self._frames = 0
        # branch -> per layer (K, V) buffers [B, heads, frames*tokens_per_frame, head_dim]
        self._kv: dict[str, list[tuple[Tensor, Tensor]]] = {}
        # velocities(): (branch names, per layer (K, V) [branches*B, ...]); each branch's
        # buffers in _kv are row blocks of these, so stacked and single-branch runs share them
        self._kv_joint: Optional[tuple[tuple[str, ...], list[tuple[Tensor, Tensor]]]] = None
        # branch -> per chunk: the ChunkState in which its K/V slot was last written (None: never)
        self._slot_state: dict[str, list[Optional[ChunkState]]] = {}
        # (noise level, shape) -> (e, e0) of a chunk whose frames share one level: a diffusion-
        # forcing window visits each of its num_steps + 1 levels once per chunk and branch, so
        # the timestep MLP runs once per level instead of at every call (same numbers: the
        # cached tensors are what the MLP returned for that input, and nobody writes to them)
        self._temb: dict[tuple[float, tuple[int, ...]], tuple[Tensor, Tensor]] = {}
        # (chunks, sizes, device) -> the block-causal mask of a grouped forward (_group_mask)
        self._masks: dict[tuple, Tensor] = {}

    # -- window lifecycle ------------------------------------------------------------------------
    def begin_window(self, window: int, num_frames: int) -> None:
        """Start window ``window`` of ``num_frames`` frames; clears every branch's K/V buffers."""
        cf = self.cfg.chunk_frames
        if not (isinstance(num_frames, int) and num_frames >= cf and num_frames % cf == 0):
            raise ConfigError(invalid_value("num_frames", f"a positive multiple of "
                                            f"chunk_frames={cf}", num_frames))
        self._window = window
        self._frames = num_frames
        self._kv.clear()
        self._kv_joint = None
        self._slot_state.clear()
        self._temb.clear()
        self._masks.clear()

    # -- one model call --------------------------------------------------------------------------
    @torch.no_grad()
    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor, info: IterationInfo) -> Tensor:
        """Velocity of the window for one guidance branch.

        ``x`` ``[B, C, F, H, W]`` in model space ([-1, 1] pixels); ``sigma`` ``[B, F]`` per-frame
        flow-matching sigma (1 = noise); ``cond`` ``[B, L, D]`` condition tokens of branch
        ``info.branch`` (encoded or null). Returns ``[B, C, F, H, W]``: every frame in vanilla
        mode, only the ACTIVE chunks' frames in chunked mode (zeros elsewhere).
        """
        self._check_call(x, sigma, cond, info)
        if self.mode == "vanilla":
            return self._vanilla(x, sigma, cond, info)
        return self._chunked(x, sigma, cond, info)

    @torch.no_grad()
    def velocities(self, x: Tensor, sigma: Tensor, conds: Mapping[str, Tensor],
                   infos: Mapping[str, IterationInfo]) -> dict[str, Tensor]:
        """Velocities of several guidance branches of one iteration: ``{branch: velocity}``.

        ``conds`` and ``infos`` map each branch name (in the order the sampler runs them) to
        its condition tokens and :class:`IterationInfo`; the infos of one iteration share
        iteration, states, steps and step sizes. The result equals one :meth:`velocity` call
        per branch in that order (up to float reordering), but the branches' block-stack
        work runs as ONE forward with the branches stacked along the batch wherever it is the
        same work: the same chunks and, with a hook, the same decisions (every uncached run;
        most iterations of the chunk-level policies). Where it differs (one branch reuses a
        chunk the other computes, or different token subsets), each branch runs its own
        forward. Policy decisions stay per (branch, chunk): a hook sees one call per branch
        and chunk through ``run_chunks`` (cond's chunks first). Off with
        ``RefDiTAdapter(branch_batching=False)``, with ``chunk_batching=False`` in chunked
        mode, or when the hook cannot group calls (no ``run_chunks`` or ``batch_chunks``
        false); then the branches run one after the other.
        """
        branches = list(conds)
        if not branches or set(branches) != set(infos):
            raise ConfigError(invalid_value(
                "velocities(conds, infos)", "one IterationInfo per branch of conds, same names",
                (branches, list(infos))))
        first = infos[branches[0]]
        for b in branches:
            info = infos[b]
            if info.branch != b:
                raise ConfigError(invalid_value(f"infos[{b!r}].branch", repr(b), info.branch))
            if (info.iteration, info.states, info.steps, info.step_sizes) != (
                    first.iteration, first.states, first.steps, first.step_sizes):
                raise ConfigError(invalid_value(
                    f"infos[{b!r}]", f"the iteration, states, steps and step sizes of "
                    f"infos[{branches[0]!r}] (the branches of one iteration)",
                    (info.iteration, info.steps)))
            self._check_call(x, sigma, conds[b], info)
        if not (self._joint and len(branches) > 1):
            one = self._vanilla if self.mode == "vanilla" else self._chunked
            return {b: one(x, sigma, conds[b], infos[b]) for b in branches}
        if self.mode == "vanilla":
            return self._vanilla_joint(x, sigma, conds, infos)
        return self._chunked_grouped(x, sigma, conds, infos)

    def _check_call(self, x: Tensor, sigma: Tensor, cond: Tensor, info: IterationInfo) -> None:
        if self._window is None:
            raise CacheContextError("RefDiTSession.velocity: expected begin_window() first, got "
                                    "no open window. Call session.begin_window(window, frames).")
        cfg = self.cfg
        want = (self.batch, cfg.channels, self._frames, cfg.height, cfg.width)
        if tuple(x.shape) != want:
            raise ConfigError(invalid_value("x", f"shape [B, C, F, H, W] = {list(want)}",
                                            list(x.shape)))
        if tuple(sigma.shape) != (self.batch, self._frames):
            raise ConfigError(invalid_value("sigma", f"shape [B, F] = [{self.batch}, "
                                            f"{self._frames}]", list(sigma.shape)))
        if cond.dim() != 3 or cond.shape[0] != self.batch or cond.shape[2] != cfg.hidden:
            raise ConfigError(invalid_value("cond", f"shape [B={self.batch}, L, D={cfg.hidden}]",
                                            list(cond.shape)))
        if info.chunk_frames != cfg.chunk_frames or info.num_frames != self._frames:
            raise ConfigError(invalid_value(
                "IterationInfo", f"chunk_frames={cfg.chunk_frames} and "
                f"{self._frames // cfg.chunk_frames} chunks", (info.chunk_frames, info.num_chunks)))
        if info.window != self._window:
            raise CacheContextError(invalid_value(
                "IterationInfo.window", f"the open window {self._window}", info.window,
                "Call begin_window() for each new window."))

    # -- vanilla ---------------------------------------------------------------------------------
    def _window_inputs(self, x: Tensor, sigma: Tensor):
        m = self.model
        frames = x.shape[2]
        e, e0 = m.time_embedding(sigma)
        cos, sin = (t.to(x.device) for t in m.rope(frames))
        mask = m.block_causal_mask(frames).to(x.device)
        # frame_of_token None: the whole window, frame-major (modulation broadcast per frame)
        return e, e0, None, cos, sin, mask

    def _window_call(self, x: Tensor, sigma: Tensor, e0: Tensor,
                     info: IterationInfo) -> tuple[ChunkCall, Probe]:
        cfg = self.cfg
        frames = x.shape[2]
        ht, wt = cfg.grid
        call = ChunkCall(branch=info.branch, chunk=0, step=info.iteration,
                         num_steps=info.num_iterations, window=info.window,
                         iteration=info.iteration, frames=frames,
                         tokens_per_frame=cfg.tokens_per_frame,
                         timestep=float(sigma.mean()) * 1000.0, scope=Scope.WINDOW)
        probe = Probe(modulation=e0, latent=x, grid=(frames, ht, wt),
                      patch=(cfg.patch, cfg.patch))
        return call, probe

    def _vanilla(self, x: Tensor, sigma: Tensor, cond: Tensor, info: IterationInfo) -> Tensor:
        m = self.model
        e, e0, fidx, cos, sin, mask = self._window_inputs(x, sigma)

        def run(h: Tensor, tokens: Optional[Tensor] = None) -> Tensor:
            if tokens is not None:
                raise NotImplementedError(_VANILLA_SUBSET)
            return m.run_blocks(h, e0, fidx, cos, sin, cond, mask)

        h_in = m.embed(x)
        if self.hook is None:
            h_out = run(h_in)
        else:
            call, probe = self._window_call(x, sigma, e0, info)
            h_out = self.hook(call, h_in, run, probe)
        return m.output(h_out, e, fidx, x, sigma)

    def _vanilla_joint(self, x: Tensor, sigma: Tensor, conds: Mapping[str, Tensor],
                       infos: Mapping[str, IterationInfo]) -> dict[str, Tensor]:
        """:meth:`velocities` in vanilla mode: the branches that compute, stacked."""
        m = self.model
        branches = list(conds)
        e, e0, fidx, cos, sin, mask = self._window_inputs(x, sigma)
        h_in = m.embed(x)

        def run_stacked(which: list[int], hs: list[Tensor]) -> list[Tensor]:
            ctx = _cat([conds[branches[i]] for i in which])
            out = m.run_blocks(_cat(hs), _repeat_batch(e0, len(hs)), fidx, cos, sin, ctx, mask)
            return list(out.split(self.batch))

        if self.hook is None:
            h_outs = run_stacked(list(range(len(branches))), [h_in] * len(branches))
        else:
            calls, probes = zip(*(self._window_call(x, sigma, e0, infos[b]) for b in branches))

            def group(parts: list[tuple[int, Tensor, Optional[Tensor]]]) -> list[Tensor]:
                if any(t is not None for _i, _h, t in parts):
                    raise NotImplementedError(_VANILLA_SUBSET)
                return run_stacked([i for i, _h, _t in parts], [h for _i, h, _t in parts])

            h_outs = self.hook.run_chunks(list(calls), [h_in] * len(branches), group,
                                          list(probes))
        return {b: m.output(h, e, fidx, x, sigma) for b, h in zip(branches, h_outs)}

    # -- chunked ---------------------------------------------------------------------------------
    def _buffers(self, branch: str, like: Tensor) -> list[tuple[Tensor, Tensor]]:
        if branch not in self._kv:
            cfg = self.cfg
            shape = (self.batch, cfg.heads, self._frames * cfg.tokens_per_frame, cfg.head_dim)
            self._kv[branch] = [(like.new_zeros(shape), like.new_zeros(shape))
                                for _ in range(cfg.num_blocks)]
            self._slot_state[branch] = [None] * (self._frames // cfg.chunk_frames)
        return self._kv[branch]

    def _joint_buffers(self, branches: Sequence[str], like: Tensor) -> None:
        """Allocate the K/V buffers of ``branches`` as one stacked set (rows branch-major),
        unless some branch already has its own this window (then they stay separate and
        :meth:`_run_branches` runs branch by branch)."""
        key = tuple(branches)
        if self._kv_joint is not None or any(b in self._kv for b in key):
            return
        cfg = self.cfg
        b = self.batch
        shape = (b * len(key), cfg.heads, self._frames * cfg.tokens_per_frame, cfg.head_dim)
        layers = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(cfg.num_blocks)]
        self._kv_joint = (key, layers)
        for i, branch in enumerate(key):
            self._kv[branch] = [(k[i * b:(i + 1) * b], v[i * b:(i + 1) * b]) for k, v in layers]
            self._slot_state[branch] = [None] * (self._frames // cfg.chunk_frames)

    def _active_and_todo(self, info: IterationInfo) -> tuple[list[int], list[int]]:
        """The active chunks, and the chunks whose blocks run now: the active ones and the
        context chunks whose K/V slot does not hold their current (unchanging) state yet.
        Needs the branch's buffers (for its slot states)."""
        active = info.active_chunks()
        if not active:
            return active, []
        last = active[-1]
        pending = [g for g in range(last) if info.states[g] is ChunkState.PENDING]
        if pending:
            raise ConfigError(invalid_value(
                "IterationInfo.states", "no PENDING chunk before an ACTIVE one (chunked "
                "execution never runs pending chunks, so later chunks could not see them)",
                [s.value for s in info.states], "Use mode='vanilla' for such schedules."))
        slot_state = self._slot_state[info.branch]
        todo = [g for g in range(last + 1)
                if not (info.states[g] in _CONTEXT_STATES and slot_state[g] is info.states[g])]
        return active, todo

    def _chunked(self, x: Tensor, sigma: Tensor, cond: Tensor, info: IterationInfo) -> Tensor:
        out = torch.zeros_like(x)
        if not info.active_chunks():
            return out
        if self._grouped:
            return self._chunked_grouped(x, sigma, {info.branch: cond}, {info.branch: info})[
                info.branch]
        self._buffers(info.branch, x)
        _active, todo = self._active_and_todo(info)
        for g in todo:
            self._chunked_one(x, sigma, cond, info, g, out)
        return out

    def _chunk_view(self, x: Tensor, sigma: Tensor, g: int) -> tuple[Tensor, Tensor]:
        fs = slice(g * self.cfg.chunk_frames, (g + 1) * self.cfg.chunk_frames)
        return x[:, :, fs], sigma[:, fs]

    def _call_and_probe(self, info: IterationInfo, g: int, xg: Tensor, sg: Tensor,
                        e0: Tensor) -> tuple[ChunkCall, Probe]:
        cfg = self.cfg
        ht, wt = cfg.grid
        call = ChunkCall(branch=info.branch, chunk=g, step=info.steps[g],
                         num_steps=info.num_steps, window=info.window,
                         iteration=info.iteration, frames=cfg.chunk_frames,
                         tokens_per_frame=cfg.tokens_per_frame,
                         timestep=float(sg[:, 0].mean()) * 1000.0, scope=Scope.CHUNK,
                         space=self._space)
        probe = Probe(modulation=e0, latent=xg, grid=(cfg.chunk_frames, ht, wt),
                      patch=(cfg.patch, cfg.patch))
        return call, probe

    def _step_size(self, info: IterationInfo, g: int) -> float:
        ds = None if info.step_sizes is None else info.step_sizes[g]
        if ds is None:
            raise ConfigError(invalid_value(
                "IterationInfo.step_sizes", "the per-chunk Euler step sizes (latent_delta "
                "reuse turns latent updates into velocities with them)", None,
                "Use cachekit.sampling.generate, or pass step_sizes in IterationInfo."))
        return ds

    def _euler(self, x_tok: Tensor, h: Tensor, tokens: Optional[Tensor], e: Tensor,
               sg: Tensor, ds: float) -> Tensor:
        """latent_delta: the chunk's latent tokens (all, or the subset ``tokens``) after this
        step's Euler update, from the blocks' output ``h``."""
        ft = None
        if tokens is not None:
            fidx = self.model.frame_index(self.cfg.chunk_frames).to(x_tok.device)
            ft = fidx[tokens.to(fidx.device)]
        return x_tok + ds * self.model.token_velocity(h, e, ft, x_tok, sg)

    def _chunked_one(self, x: Tensor, sigma: Tensor, cond: Tensor, info: IterationInfo, g: int,
                     out: Tensor) -> None:
        """Chunk ``g`` on its own: one block-stack call (and one hook call if active)."""
        m, cfg = self.model, self.cfg
        n_chunk = cfg.chunk_frames * cfg.tokens_per_frame
        cos_all, sin_all = (t.to(x.device) for t in m.rope(self._frames))
        fidx = m.frame_index(cfg.chunk_frames).to(x.device)     # token -> frame within the chunk
        state = info.states[g]
        fs = slice(g * cfg.chunk_frames, (g + 1) * cfg.chunk_frames)
        xg, sg = self._chunk_view(x, sigma, g)
        e, e0 = self._chunk_time_embedding(sg)
        run = _ChunkRunner(self, self._kv[info.branch], self._slot_state[info.branch], g, state,
                           e0, fidx, cos_all[g * n_chunk:(g + 1) * n_chunk],
                           sin_all[g * n_chunk:(g + 1) * n_chunk], cond)
        if state is not ChunkState.ACTIVE:
            run(m.embed(xg))  # context only: fill slot g, the head output is never used
            return
        if self.hook is None:
            out[:, :, fs] = m.output(run(m.embed(xg)), e, None, xg, sg)
            return
        call, probe = self._call_and_probe(info, g, xg, sg, e0)
        if self._space == "latent_delta":
            ds = self._step_size(info, g)
            x_tok = m.patchify(xg)

            def run_latent(xt: Tensor, tokens: Optional[Tensor] = None) -> Tensor:
                return self._euler(xt, run(m.patch_embed(xt), tokens), tokens, e, sg, ds)

            x_new = self.hook(call, x_tok, run_latent, probe)
            out[:, :, fs] = m.unpatchify((x_new - x_tok) / ds, cfg.chunk_frames)
        else:
            out[:, :, fs] = m.output(self.hook(call, m.embed(xg), run, probe), e, None, xg, sg)

    def _chunked_grouped(self, x: Tensor, sigma: Tensor, conds: Mapping[str, Tensor],
                         infos: Mapping[str, IterationInfo]) -> dict[str, Tensor]:
        """Chunked mode with chunk batching, for one branch (:meth:`velocity`) or several
        (:meth:`velocities`): every chunk of the iteration that needs the blocks, of every
        branch, through one :meth:`_run_branches` (one forward, the branches stacked where
        their work agrees).

        Context chunks (refreshes) join with all their tokens and their output is dropped;
        active chunks go through the hook's ``run_chunks`` (one call per branch and chunk,
        branch-major) or run whole without a hook. In ``latent_delta`` space the hook sees
        latent tokens and the runner wraps embedding, head and Euler update around the
        shared forward, as the one-by-one path does. The output head runs once for all
        active chunks of all branches (:meth:`_heads`).
        """
        m, cfg = self.model, self.cfg
        cf = cfg.chunk_frames
        branches = list(conds)
        info = infos[branches[0]]
        outs = {b: torch.zeros_like(x) for b in branches}
        if not info.active_chunks():
            return outs
        if len(branches) > 1:
            self._joint_buffers(branches, x)
        for b in branches:
            self._buffers(b, x)
        active = info.active_chunks()
        todo = {b: self._active_and_todo(infos[b])[1] for b in branches}
        chunks = sorted(set().union(*todo.values()))
        views = {g: self._chunk_view(x, sigma, g) for g in chunks}
        temb = {g: self._chunk_time_embedding(views[g][1]) for g in chunks}
        latent = self.hook is not None and self._space == "latent_delta"
        # block inputs, once per chunk (the same for every branch; nothing writes to them)
        embedded = {g: m.embed(views[g][0]) for g in chunks
                    if not (latent and info.states[g] is ChunkState.ACTIVE)}
        refresh = {b: [(g, embedded[g], None) for g in todo[b]
                       if info.states[g] is not ChunkState.ACTIVE] for b in branches}

        def by_chunk(items):
            return sorted(items, key=lambda p: p[0])

        if self.hook is None:
            hs = self._run_branches(info, {b: by_chunk([(g, embedded[g], None) for g in active]
                                                       + refresh[b]) for b in branches},
                                    temb, conds)
            self._heads(x, sigma, temb, {(b, g): hs[b][g] for b in branches for g in active},
                        branches, active, outs)
            return outs
        if latent:  # refuse missing step sizes before any policy decides
            for g in active:
                self._step_size(info, g)
        calls, probes, ins, where = [], [], [], []
        for b in branches:
            for g in active:
                xg, sg = views[g]
                call, probe = self._call_and_probe(infos[b], g, xg, sg, temb[g][1])
                calls.append(call)
                probes.append(probe)
                ins.append(m.patchify(xg) if latent else embedded[g])
                where.append((b, g))

        def group(parts: list[tuple[int, Tensor, Optional[Tensor]]]) -> list[Tensor]:
            per: dict[str, list] = {b: [] for b in branches}
            for i, h, t in parts:
                b, g = where[i]
                per[b].append((g, m.patch_embed(h) if latent else h, t))
            hs = self._run_branches(info, {b: by_chunk(per[b] + refresh[b]) for b in branches},
                                    temb, conds)
            res = []
            for i, h, t in parts:
                b, g = where[i]
                o = hs[b][g]
                res.append(self._euler(h, o, t, temb[g][0], views[g][1],
                                       self._step_size(info, g)) if latent else o)
            return res

        results = self.hook.run_chunks(calls, ins, group, probes)
        if not latent:
            self._heads(x, sigma, temb, dict(zip(where, results)), branches, active, outs)
            return outs
        for (b, g), x_in, r in zip(where, ins, results):
            fs = slice(g * cf, (g + 1) * cf)
            outs[b][:, :, fs] = m.unpatchify((r - x_in) / self._step_size(info, g), cf)
        return outs

    def _heads(self, x: Tensor, sigma: Tensor, temb: dict, hs: dict[tuple[str, int], Tensor],
               branches: list[str], active: list[int], outs: dict[str, Tensor]) -> None:
        """The output head (velocity) of every active chunk of every branch, written into
        ``outs``: one head call over the chunks' tokens with the branches stacked when the
        active chunks are consecutive (as every diffusion-forcing schedule makes them),
        else one call per chunk and branch."""
        m, cf, n = self.model, self.cfg.chunk_frames, self.batch
        g0, g1 = active[0], active[-1]
        if active != list(range(g0, g1 + 1)):
            for (b, g), h in hs.items():
                xg, sg = self._chunk_view(x, sigma, g)
                outs[b][:, :, g * cf:(g + 1) * cf] = m.output(h, temb[g][0], None, xg, sg)
            return
        fs = slice(g0 * cf, (g1 + 1) * cf)
        nb = len(branches)
        h = _cat([_cat([hs[b, g] for g in active], dim=1) for b in branches])
        e = _cat([temb[g][0] for g in active], dim=1)
        v = m.output(h, _repeat_batch(e, nb), None, _repeat_batch(x[:, :, fs], nb),
                     _repeat_batch(sigma[:, fs], nb))
        for b, vb in zip(branches, v.split(n)):
            outs[b][:, :, fs] = vb

    def _run_branches(self, info: IterationInfo,
                      parts: dict[str, list[tuple[int, Tensor, Optional[Tensor]]]],
                      temb: dict, conds: Mapping[str, Tensor]) -> dict[str, dict[int, Tensor]]:
        """:meth:`_run_group` for several branches: ``{branch: {g: h_out}}``.

        One forward with the branches stacked along the batch when every branch has the same
        parts (chunks, and token subsets) and the branches share stacked K/V buffers; else
        one forward per branch (each exactly as :meth:`_chunked` would run it).
        """
        branches = list(parts)
        joint = self._kv_joint
        first = parts[branches[0]]
        if len(branches) > 1 and joint is not None and joint[0] == tuple(branches) \
                and all(_same_parts(first, parts[b]) for b in branches[1:]) and first:
            stacked = [(g, _cat([parts[b][j][1] for b in branches]), t)
                       for j, (g, _h, t) in enumerate(first)]
            hs = self._run_group(info, stacked, temb, _cat([conds[b] for b in branches]),
                                 joint[1], [self._slot_state[b] for b in branches])
            split = {g: h.split(self.batch) for g, h in hs.items()}
            return {b: {g: hb[i] for g, hb in split.items()} for i, b in enumerate(branches)}
        return {b: self._run_group(info, parts[b], temb, conds[b], self._kv[b],
                                   [self._slot_state[b]]) for b in branches if parts[b]}

    def _run_group(self, info: IterationInfo, parts: list[tuple[int, Tensor, Optional[Tensor]]],
                   temb: dict, cond: Tensor, kv: list[tuple[Tensor, Tensor]],
                   slot_states: list[list[Optional[ChunkState]]]) -> dict[int, Tensor]:
        """The block stack on the tokens of several chunks at once; returns ``{g: h_out}``.

        ``parts`` ``(g, h, tokens)`` sorted by chunk: all tokens (``tokens`` None) or a subset.
        Every token uses its frame's modulation and its true RoPE position, writes its keys
        and values into chunk ``g``'s slot of ``kv``, and attends to every slot ``<= g``
        (block-causal): exactly what running the chunks one by one in chunk order does. The
        batch of ``h``, ``cond`` and ``kv`` may hold several branches stacked (their slot
        states are all in ``slot_states``).
        """
        m, cfg = self.model, self.cfg
        cf, n_chunk = cfg.chunk_frames, cfg.chunk_frames * cfg.tokens_per_frame
        dev = parts[0][1].device
        cos_all, sin_all = (t.to(dev) for t in m.rope(self._frames))
        chunks = [g for g, _h, _t in parts]
        whole = all(t is None for _g, _h, t in parts)
        hs, e0s, sizes = [], [], []
        for g, h, tokens in parts:
            if tokens is None:
                if h.shape[1] != n_chunk:
                    raise ConfigError(invalid_value(f"h of chunk {g}", f"[B, N={n_chunk}, D]",
                                                    list(h.shape)))
            else:
                _check_subset(h, tokens, n_chunk)
            hs.append(h)
            e0s.append(temb[g][1])
            sizes.append(h.shape[1])
        h = _cat(hs, dim=1)
        e0 = _cat(e0s, dim=1)
        e0 = _repeat_batch(e0, h.shape[0] // e0.shape[0])
        end = (chunks[-1] + 1) * n_chunk
        span: Optional[slice] = None
        if whole and chunks == list(range(chunks[0], chunks[-1] + 1)):
            # consecutive whole chunks (every uncached iteration): one slice of positions,
            # frame-major tokens (modulation broadcast), slice writes into the K/V slots
            span = slice(chunks[0] * n_chunk, end)
            pos_all, f_all = None, None
            cos, sin = cos_all[span], sin_all[span]
        else:
            local = torch.arange(n_chunk, device=dev)
            fidx_chunk = m.frame_index(cf).to(dev)
            toks = [local if t is None else t.to(dev) for _g, _h, t in parts]
            pos_all = torch.cat([g * n_chunk + t for g, t in zip(chunks, toks)])
            # rows of the stacked e0; whole chunks only: every stacked frame in order
            f_all = None if whole else torch.cat([j * cf + fidx_chunk[t]
                                                  for j, t in enumerate(toks)])
            cos, sin = cos_all[pos_all], sin_all[pos_all]
        mask = self._group_mask(chunks, sizes, end, dev) if len(parts) > 1 else None
        for block, (kbuf, vbuf) in zip(m.blocks, kv):
            def kv_fn(k: Tensor, v: Tensor, kbuf=kbuf, vbuf=vbuf):
                if span is not None:
                    kbuf[:, :, span] = k
                    vbuf[:, :, span] = v
                else:
                    kbuf.index_copy_(2, pos_all, k)
                    vbuf.index_copy_(2, pos_all, v)
                return kbuf[:, :, :end], vbuf[:, :, :end]
            h = block(h, e0, f_all, cos, sin, cond, kv_fn=kv_fn, mask=mask)
        for slot_state in slot_states:
            for g in chunks:
                slot_state[g] = info.states[g]
        return dict(zip(chunks, h.split(sizes, dim=1)))

    def _group_mask(self, chunks: list[int], sizes: list[int], end: int,
                    dev: torch.device) -> Tensor:
        """Block-causal mask ``[sum(sizes), end]`` of a grouped forward: a query of chunk
        ``g`` sees key slots ``0..g``. Memoised per window by (chunks, sizes): a window
        repeats the same few groups at every step."""
        key = (tuple(chunks), tuple(sizes), str(dev))
        mask = self._masks.get(key)
        if mask is None:
            n_chunk = self.cfg.chunk_frames * self.cfg.tokens_per_frame
            q_end = torch.cat([torch.full((k,), (g + 1) * n_chunk, device=dev)
                               for g, k in zip(chunks, sizes)])
            mask = self._masks[key] = torch.arange(end, device=dev)[None, :] < q_end[:, None]
        return mask

    def _chunk_time_embedding(self, sg: Tensor) -> tuple[Tensor, Tensor]:
        """``model.time_embedding(sg)``, memoised per window when every frame of the chunk (and
        every sample) is at one noise level."""
        first = sg.reshape(-1)[0]
        if not bool((sg == first).all()):
            return self.model.time_embedding(sg)
        key = (float(first), tuple(sg.shape))
        hit = self._temb.get(key)
        if hit is None:
            hit = self._temb[key] = self.model.time_embedding(sg)
        return hit


def _same_parts(a: list[tuple[int, Tensor, Optional[Tensor]]],
                b: list[tuple[int, Tensor, Optional[Tensor]]]) -> bool:
    """Do two branches' parts run the same chunks at the same tokens?"""
    return len(a) == len(b) and all(
        ga == gb and (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb))
        for (ga, _ha, ta), (gb, _hb, tb) in zip(a, b))


def _cat(ts: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` that returns a lone tensor as it is (no copy)."""
    return torch.cat(list(ts), dim=dim) if len(ts) > 1 else ts[0]


def _repeat_batch(e0: Tensor, n: int) -> Tensor:
    """Per-sample modulation ``[B, ...]`` for ``n`` branches stacked along the batch: a batch
    of one broadcasts as it is; larger batches are repeated (branch-major, like the inputs)."""
    if n == 1 or e0.shape[0] == 1:
        return e0
    return e0.repeat(n, *([1] * (e0.dim() - 1)))


def _check_subset(h: Tensor, tokens: Tensor, n: int) -> None:
    """A selective forward's token index: 1-D int64, sorted, unique, in ``[0, n)``, one per
    row of ``h`` ``[B, K, D]``."""
    if not (isinstance(tokens, Tensor) and tokens.dim() == 1 and tokens.dtype == torch.long
            and 0 < tokens.numel() <= n):
        raise ConfigError(invalid_value("tokens", f"a 1-D int64 index of 1..{n} tokens",
                                        tokens if not isinstance(tokens, Tensor)
                                        else f"{tokens.dtype} {list(tokens.shape)}"))
    if int(tokens.min()) < 0 or int(tokens.max()) >= n or \
            (tokens.numel() > 1 and not bool((tokens[1:] > tokens[:-1]).all())):
        raise ConfigError(invalid_value("tokens", f"sorted unique indices in [0, {n})",
                                        "an unsorted, duplicate or out-of-range index"))
    if h.shape[1] != tokens.numel():
        raise ConfigError(invalid_value("h", f"[B, K={tokens.numel()}, D] for K tokens",
                                        list(h.shape)))


class _ChunkRunner:
    """The :class:`cachekit.types.BlockRunner` of chunk ``g`` in chunked mode.

    ``run(h)`` runs all blocks on the chunk's ``N`` tokens, writes the whole K/V slot ``g`` of
    each layer and attends to slots ``0..g``. ``run(h_sub, tokens)`` does the same for a sorted
    token subset: modulation and RoPE rows are gathered at the tokens' true frames/positions,
    their K/V is written into slot ``g`` at those positions (the rest of the slot keeps what it
    had), and the subset queries attend to slots ``< g`` plus the whole slot ``g``.
    """

    def __init__(self, session: RefDiTSession, kv, slot_state, g: int, state: ChunkState,
                 e0: Tensor, fidx: Tensor, cos: Tensor, sin: Tensor, cond: Tensor):
        self.session = session
        self.kv, self.slot_state = kv, slot_state
        self.g, self.state = g, state
        self.e0, self.fidx, self.cos, self.sin, self.cond = e0, fidx, cos, sin, cond
        self.num_tokens = fidx.numel()
        self.start = g * self.num_tokens

    @torch.no_grad()
    def __call__(self, h: Tensor, tokens: Optional[Tensor] = None) -> Tensor:
        end = self.start + self.num_tokens
        if tokens is None:
            if h.shape[1] != self.num_tokens:
                raise ConfigError(invalid_value("h", f"[B, N={self.num_tokens}, D]",
                                                list(h.shape)))
            fidx, cos, sin = None, self.cos, self.sin   # the whole chunk, frame-major

            def write(buf: Tensor, new: Tensor) -> None:
                buf[:, :, self.start:end] = new
        else:
            _check_subset(h, tokens, self.num_tokens)
            tokens = tokens.to(h.device)
            fidx, cos, sin = self.fidx[tokens], self.cos[tokens], self.sin[tokens]
            pos = tokens + self.start

            def write(buf: Tensor, new: Tensor) -> None:
                buf.index_copy_(2, pos, new)

        for block, (kbuf, vbuf) in zip(self.session.model.blocks, self.kv):
            def kv_fn(k: Tensor, v: Tensor, kbuf=kbuf, vbuf=vbuf):
                write(kbuf, k)
                write(vbuf, v)
                return kbuf[:, :, :end], vbuf[:, :, :end]
            h = block(h, self.e0, fidx, cos, sin, self.cond, kv_fn=kv_fn, mask=None)
        self.slot_state[self.g] = self.state
        return h
