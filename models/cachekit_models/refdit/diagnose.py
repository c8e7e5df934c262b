"""Does the model use its context? Two checks of a refdit model's use of earlier chunks.

``python -m cachekit_models.refdit.diagnose context [--weights FILE | --checkpoint FILE]``
    One forward per video: the first three chunks clean, the last chunk noised to ``sigma``.
    Prints the x0 MSE of the last chunk with its own context and with the first three chunks
    of another video. A model that reads its context has a much lower error with its own.
    (The background dominates the pixels, so this mostly measures the background.)

``python -m cachekit_models.refdit.diagnose continue [--weights FILE | --checkpoint FILE] --out PNG``
    Diffusion-forcing sampling (the core schedule with a clean prefix, the adapter's default
    steps, ar_step, shift and CFG, chunked execution) that continues the first one or two
    chunks of a real video from the data generator, for a few fast-motion conditions. Each
    group of rows: the continuation from 4 real frames, from 8, then the real video (dark
    frame). A model that tracks the sprite continues it from where the prefix left it.

``python -m cachekit_models.refdit.diagnose guidance [--scales 2,3] [--seeds 0-5] --out PNG``
    The default sampler (core ``generate``, chunked) at each guidance scale, for the random
    conditions of a few seeds (what ``cachekit generate --seed N`` draws): one block of rows
    per scale, one row per seed, a label on each row. How the default CFG was chosen.

``python -m cachekit_models.refdit.diagnose samples --out PNG``
    Redraw the model card's ``samples_df.png`` (what the trainer's export draws: the card's
    conditions through the core sampler with the adapter's default settings, next to real
    videos) for given weights, e.g. after a change of the default sampler.

Without ``--weights``/``--checkpoint`` the bundled weights are used; ``--checkpoint`` reads
the EMA weights of a training checkpoint (``train.py --out DIR`` writes ``DIR/ckpt.pt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from cachekit import schedule as sched
from cachekit.sampling import chunk_levels, window_rows
from cachekit.types import ChunkState, IterationInfo

from .adapter import RefDiTAdapter
from .config import RefDiTConfig
from .model import RefDiT

__all__ = ["context_errors", "continue_prefix", "main"]

FAST_PROMPTS = ("shape=triangle,color=yellow,motion=fast,background=gradient,tint=cool",
                "shape=diamond,color=magenta,motion=fast,background=stripes,tint=neutral",
                "shape=cross,color=yellow,motion=fast,background=checker,tint=neutral")


def _video(cond, seed: int, cfg: RefDiTConfig, frames: int) -> torch.Tensor:
    from cachekit_models.synthetic import make_video

    v, _ = make_video(cond, seed, frames=frames, height=cfg.height, width=cfg.width)
    return torch.from_numpy(v).permute(3, 0, 1, 2)[None] * 2 - 1      # [1, C, F, H, W]


@torch.no_grad()
def context_errors(model: RefDiT, sigmas: Sequence[float] = (0.3, 0.6, 0.9), videos: int = 24,
                   seed: int = 0) -> dict[float, tuple[float, float]]:
    """``{sigma: (mse with its own context, mse with another video's context)}`` of the last
    chunk's x0 prediction (the model returns velocities; ``x0 = x - sigma v``)."""
    from cachekit_models.synthetic import sample_condition

    cfg = model.cfg
    frames = cfg.max_frames
    last = frames - cfg.chunk_frames
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sig in sigmas:
        own, other = [], []
        for i in range(videos):
            cond = sample_condition(seed * 7919 + 1000 + i)
            x0 = _video(cond, seed * 7919 + 5000 + i, cfg, frames)
            foreign = _video(sample_condition(seed * 7919 + 2000 + i), seed * 7919 + 7000 + i,
                             cfg, frames)
            eps = torch.randn(x0.shape, generator=gen)
            sigma = torch.zeros(1, frames)
            sigma[:, last:] = sig
            xt = x0.clone()
            xt[:, :, last:] = (1 - sig) * x0[:, :, last:] + sig * eps[:, :, last:]
            ctx = model.encode_condition(torch.tensor([cond.ids()]))
            for x_in, acc in ((xt, own), (torch.cat([foreign[:, :, :last], xt[:, :, last:]],
                                                     dim=2), other)):
                x0_hat = x_in - sig * model(x_in, sigma, ctx)
                acc.append(float((x0_hat[:, :, last:] - x0[:, :, last:]).pow(2).mean()))
        out[float(sig)] = (float(np.mean(own)), float(np.mean(other)))
    return out


@torch.no_grad()
def continue_prefix(adapter: RefDiTAdapter, cond, real: torch.Tensor, prefix_frames: int,
                    seed: int = 0) -> torch.Tensor:
    """Sample a window whose first ``prefix_frames`` frames are ``real``'s (clean, the PREFIX
    chunks of the diffusion-forcing schedule); returns the window ``[1, C, F, H, W]``."""
    cfg = adapter.model.cfg
    sampler = adapter.default_sampler()
    frames, cf = cfg.max_frames, cfg.chunk_frames
    rows = window_rows(sampler, frames, cf, prefix_frames)
    sig = sched.flow_sigmas(sampler.num_steps, sampler.shift)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(real.shape, generator=gen)
    x[:, :, :prefix_frames] = real[:, :, :prefix_frames]
    conds = {"cond": adapter.encode_condition([cond]), "uncond": adapter.null_condition(1)}
    sess = adapter.session(batch=1, mode="chunked")
    sess.begin_window(1, frames)
    for it, (states, steps) in enumerate(rows):
        levels, sizes = chunk_levels(states, steps, sig, cf)
        sigma = levels[None]
        v = {}
        for b, c in conds.items():
            info = IterationInfo(window=1, iteration=it, num_iterations=len(rows), branch=b,
                                 num_steps=sampler.num_steps, chunk_frames=cf, states=states,
                                 steps=steps, step_sizes=sizes)
            v[b] = sess.velocity(x, sigma, c, info)
        vel = v["uncond"] + sampler.guidance_scale * (v["cond"] - v["uncond"])
        for g, st in enumerate(states):
            if st is ChunkState.ACTIVE:
                fs = slice(g * cf, (g + 1) * cf)
                x[:, :, fs] = x[:, :, fs] + sizes[g] * vel[:, :, fs]
    return x


def continuation_sheet(adapter: RefDiTAdapter, path: Path,
                       prompts: Sequence[str] = FAST_PROMPTS) -> Path:
    """The ``continue`` check as a PNG (rows: from 4 real frames, from 8, the real video)."""
    from PIL import Image

    from cachekit_models.synthetic import Condition

    cfg = adapter.model.cfg
    rows = []

    def strip(frames: np.ndarray, border: float) -> np.ndarray:
        return np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=border)
                               for f in frames], axis=1)

    for k, prompt in enumerate(prompts):
        cond = Condition.parse(prompt)
        real = _video(cond, 3 + k, cfg, cfg.max_frames)
        for pre in (cfg.chunk_frames, 2 * cfg.chunk_frames):
            rows.append(strip(adapter.decode(continue_prefix(adapter, cond, real, pre,
                                                             seed=3 + k))[0], 1.0))
        rows.append(strip(adapter.decode(real)[0], 0.0))
    img = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path)
    return path


def guidance_sheet(adapter: RefDiTAdapter, path: Path, scales: Sequence[float] = (2.0, 3.0),
                   seeds: Sequence[int] = tuple(range(6))) -> Path:
    """The ``guidance`` check as a PNG: for each scale, one row per seed's random condition,
    sampled with the adapter's default sampler at that guidance scale (seed = noise seed)."""
    from cachekit.io import contact_sheet
    from cachekit.sampling import generate

    rows, labels = [], []
    for g in scales:
        sampler = adapter.default_sampler().evolve(guidance_scale=float(g))
        for seed in seeds:
            cond, uncond, _text = adapter.encode_prompt(None, seed=seed, batch=1)
            video = generate(adapter, cond, uncond=uncond, config=sampler, seed=seed).video
            rows.append(adapter.decode(video)[0])
            labels.append(f"cfg {g:g} seed {seed}")
    return contact_sheet(rows, path, upscale=2, labels=labels)


def _numbers(text: str, kind=float) -> list:
    """``"2,3"`` -> [2.0, 3.0]; ``"0-5"`` -> [0, ..., 5] (ints)."""
    if kind is int and "-" in text:
        lo, _, hi = text.partition("-")
        return list(range(int(lo), int(hi) + 1))
    return [kind(t) for t in text.split(",") if t.strip()]


def _load(weights: Optional[str], checkpoint: Optional[str]) -> RefDiTAdapter:
    if checkpoint:
        ck = torch.load(checkpoint, weights_only=False)
        model = RefDiT(RefDiTConfig.from_dict(ck["config"]))
        model.load_state_dict(ck["ema"])
        print(f"checkpoint {checkpoint}: step {ck['step']} (EMA weights)")
        return RefDiTAdapter(model)
    from .loading import load_refdit

    return RefDiTAdapter(load_refdit(weights))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachekit_models.refdit.diagnose",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["context", "continue", "guidance", "samples"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a refdit safetensors file (default: the bundled one)")
    src.add_argument("--checkpoint", help="a train.py checkpoint (its EMA weights)")
    p.add_argument("--out", default="out/diagnose/continue.png", help="continue: the PNG")
    p.add_argument("--videos", type=int, default=24, help="context: videos per sigma")
    p.add_argument("--scales", default="2,3", help="guidance: comma-separated CFG scales")
    p.add_argument("--seeds", default="0-5", help="guidance: seeds, 'A-B' or comma-separated")
    a = p.parse_args(argv)
    adapter = _load(a.weights, a.checkpoint)
    if a.which == "context":
        print("sigma  x0 MSE own context  x0 MSE other video's context")
        for sig, (own, other) in context_errors(adapter.model, videos=a.videos).items():
            print(f"{sig:5.2f}  {own:18.4f}  {other:28.4f}")
    elif a.which == "samples":
        from .train import card_videos, draw_df_samples

        conds, real = card_videos(adapter.model.cfg, adapter.model.cfg.max_frames)
        draw_df_samples(adapter.model, conds, real, Path(a.out))
        print(f"wrote {a.out}")
    elif a.which == "guidance":
        path = guidance_sheet(adapter, Path(a.out), _numbers(a.scales), _numbers(a.seeds, int))
        print(f"wrote {path}")
    else:
        print(f"wrote {continuation_sheet(adapter, Path(a.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
