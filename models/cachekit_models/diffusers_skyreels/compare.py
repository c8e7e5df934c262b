"""Side-by-side comparison on one random-weight SkyReels-V2 DF pipeline (no hub, CPU is fine).

Rows: the uncached pipeline, cachekit's policies (stock forward and chunked), diffusers' own
block caches (FirstBlockCache, MagCache) and cache-dit's DBCache, each enabled on the same
pipeline, run, timed and removed again. A cache that cannot attach is a row
``not attachable: <its error>``; cache-dit missing is a row ``not installed``.

Fidelity is the PSNR of the final **latents** against the uncached run, with the reference
latents' value range as the peak (a random VAE's pixels say nothing more). Speedups on these
random models are overhead-bound and far from the real 1.3B model's (see docs/diffusers.md):
compare the rows with each other, and read the computed fractions as the portable figure.

Command: ``python scripts/compare_diffusers_caches.py --size small`` (or ``tiny``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ._compat import require_diffusers

__all__ = ["SIZES", "DEFAULT_CACHEKIT_ROWS", "build_pipeline", "compare_caches", "format_table"]

#: Pipeline sizes. ``tiny`` is diffusers' own DF test transformer (2 blocks, width 24);
#: ``small`` is larger so the blocks, not Python, dominate a call on one CPU thread.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256,
                            ffn_dim=32, num_layers=2, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "call": dict(num_inference_steps=8, guidance_scale=6.0, height=64, width=64,
                     num_frames=13, causal_block_size=2, ar_step=1),
    },
    "small": {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256,
                            ffn_dim=512, num_layers=8, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
        "call": dict(num_inference_steps=12, guidance_scale=6.0, height=128, width=128,
                     num_frames=21, causal_block_size=2, ar_step=2),
    },
}

#: ``(label, policy, mode, knobs)``. The random models' time embedding moves ~0.2-0.3
#: (rel. L1) per step, above the published thresholds (0.1), so the lossy rows use 0.5 and a
#: short warm-up to reuse anything within the few steps.
DEFAULT_CACHEKIT_ROWS: tuple[tuple[str, str, str, dict], ...] = (
    ("cachekit none (stock forward)", "none", "vanilla", {}),
    ("cachekit none (chunked: lossless layer)", "none", "chunked", {}),
    ("cachekit fixed_interval 2", "fixed_interval", "vanilla", {"interval": 2}),
    ("cachekit teacache 0.5", "teacache", "vanilla", {"threshold": 0.5, "warmup_steps": 2}),
    ("cachekit flowcache 0.5", "flowcache", "chunked", {"threshold": 0.5, "warmup_steps": 2}),
    ("cachekit motioncache 0.5", "motioncache", "chunked",
     {"threshold": 0.5, "warmup_steps": 2, "phase1_steps": 0}),
)


def build_pipeline(size: str = "small", *, seed: int = 0) -> Any:
    """A SkyReels-V2 DF pipeline with random weights from configs (no tokenizer/encoder)."""
    require_diffusers()
    from diffusers import (AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline,
                           SkyReelsV2Transformer3DModel, UniPCMultistepScheduler)

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(**SIZES[size]["transformer"])
    # flow_prediction as in the released DF checkpoints (epsilon on flow sigmas diverges)
    scheduler = UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
                                        prediction_type="flow_prediction")
    pipe: Any = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None,
                                                   transformer=transformer, vae=vae,
                                                   scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((out.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


@contextlib.contextmanager
def _quiet(prefix: str) -> Iterator[None]:
    """Raise the level of the loggers named ``prefix*`` to ERROR for the block."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefix)] + [prefix]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)


def compare_caches(size: str = "small", *, repeats: int = 3, seed: int = 0,
                   cachekit_rows: Sequence[tuple[str, str, str, dict]] = DEFAULT_CACHEKIT_ROWS,
                   diffusers_hooks: bool = True, with_cache_dit: bool = True,
                   cache_dit_config: Optional[dict] = None,
                   progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Run every row on one pipeline and return one dict per row.

    Keys: ``name``, ``status`` (``ok`` / ``not attachable: ...`` / ``not installed: ...`` /
    ``failed: ...``), ``wall_s`` (best of ``repeats`` timed runs after one warm-up),
    ``speedup`` (uncached best / row best), ``psnr_db`` (latents vs uncached),
    ``max_abs`` (latents), ``computed`` (fraction of the work the cache asked the model to do:
    token-steps for cachekit, transformer calls not served from cache for cache-dit) and
    ``blocks`` (cachekit: token passes through the blocks / the stock forward's).
    """
    from . import _runtime

    say = progress or (lambda msg: None)
    pipe = build_pipeline(size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    pe, ne = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    call = dict(SIZES[size]["call"], prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne,
                output_type="latent")

    def once() -> torch.Tensor:
        torch.manual_seed(seed + 2)
        return pipe(**call, generator=torch.Generator().manual_seed(seed)).frames

    def timed() -> tuple[torch.Tensor, float]:
        out = once()   # warm-up (and the output compared)
        walls = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            once()
            walls.append(time.perf_counter() - t0)
        return out, min(walls)   # best of N: least disturbed by other load

    rows: list[dict[str, Any]] = []
    say("uncached")
    ref, base = timed()

    def add(name: str, status: str, out: Optional[torch.Tensor] = None,
            wall: Optional[float] = None, computed: Optional[float] = None,
            blocks: Optional[float] = None) -> None:
        row: dict[str, Any] = {"name": name, "status": status, "wall_s": wall,
                               "speedup": None if wall is None else base / wall,
                               "psnr_db": None, "max_abs": None, "computed": computed,
                               "blocks": blocks}
        if out is not None:
            row["psnr_db"] = _psnr(out, ref)
            row["max_abs"] = float((out - ref).abs().max())
        rows.append(row)

    add("uncached pipeline", "ok", ref, base, 1.0, 1.0)

    from cachekit.engine import CacheEngine

    for label, policy, mode, knobs in cachekit_rows:
        say(label)
        try:
            engine = CacheEngine.from_name(policy, **knobs)
            _runtime.enable(pipe, engine, mode=mode)
        except Exception as exc:
            add(label, f"not attachable: {type(exc).__name__}: {exc}")
            continue
        try:
            out, wall = timed()
            stats = engine.summary()
            ex = _runtime.execution_stats(pipe)
            add(label, "ok", out, wall, stats.computed_token_fraction,
                ex["block_token_fraction"])
        except Exception as exc:
            add(label, f"failed: {type(exc).__name__}: {exc}")
        finally:
            _runtime.disable(pipe)

    if diffusers_hooks:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig

        steps = call["num_inference_steps"]
        for label, cfg in (
                ("diffusers FirstBlockCache 0.05", FirstBlockCacheConfig(threshold=0.05)),
                ("diffusers MagCache (ratios 1)",
                 MagCacheConfig(mag_ratios=torch.ones(steps), num_inference_steps=steps))):
            say(label)
            tr = pipe.transformer
            try:
                tr.enable_cache(cfg)
            except Exception as exc:
                add(label, f"not attachable: {type(exc).__name__}: {exc}")
                continue
            try:
                out, wall = timed()
                add(label, "ok", out, wall)
            except Exception as exc:
                add(label, f"failed: {type(exc).__name__}: {exc}")
            finally:
                tr.disable_cache()

    if with_cache_dit:
        label = "cache-dit DBCache"
        say(label)
        try:
            import cache_dit
            from cache_dit import DBCacheConfig
        except ImportError as exc:
            add(label, f"not installed: {exc} (pip install cache-dit; check with pip install "
                       f"--dry-run that it pulls no torch/CUDA packages)")
        else:
            layers = len(pipe.transformer.blocks)
            opts = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2,
                        residual_diff_threshold=0.12)
            opts.update(cache_dit_config or {})
            label = (f"cache-dit DBCache F{opts['Fn_compute_blocks']}B{opts['Bn_compute_blocks']}"
                     f" W{opts['max_warmup_steps']} R{opts['residual_diff_threshold']}")
            with _quiet("cache_dit"):
                try:
                    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(**opts))
                except Exception as exc:
                    add(label, f"not attachable: {type(exc).__name__}: {exc}")
                else:
                    try:
                        out, wall = timed()
                        computed = None
                        try:
                            st = cache_dit.summary(pipe)[0]
                            calls = st.accumulated_transformer_executed_steps
                            cached = st.accumulated_cached_steps + st.cfg_accumulated_cached_steps
                            # a cached call still runs the first Fn + last Bn blocks
                            kept = (opts["Fn_compute_blocks"] + opts["Bn_compute_blocks"]) / layers
                            computed = (calls - cached * (1 - kept)) / calls if calls else None
                        except Exception:
                            pass
                        add(label, "ok", out, wall, computed)
                    except Exception as exc:
                        add(label, f"failed: {type(exc).__name__}: {exc}")
                    finally:
                        cache_dit.disable_cache(pipe)
    # every cache above was removed again: the pipeline must give the reference once more
    after = once()
    if not torch.equal(after, ref):
        rows.append({"name": "(check) pipeline after all rows", "status":
                     "differs from the first uncached run: a cache was not removed cleanly",
                     "wall_s": None, "speedup": None, "psnr_db": _psnr(after, ref),
                     "max_abs": float((after - ref).abs().max()), "computed": None,
                     "blocks": None})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table; ``computed`` is the cache's own work fraction (see above)."""
    def f(v: Any, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        if v is None:
            return "-".rjust(width)
        if isinstance(v, float) and math.isinf(v):
            return "inf".rjust(width)
        return format(v, fmt)

    head = (f"{'row':44s} {'wall s':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'max|d|':>9s} "
            f"{'computed':>9s} {'blocks':>7s}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name'][:44]:44s} {f(r['wall_s'], '8.3f')} {f(r['speedup'], '8.2f')} "
                     f"{f(r['psnr_db'], '8.1f')} {f(r['max_abs'], '9.2e')} "
                     f"{f(r['computed'], '9.3f')} {f(r['blocks'], '7.3f')}  {r['status']}")
    return "\n".join(lines)
