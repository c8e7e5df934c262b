"""Train the reference DiT on synthetic videos (CPU), with diffusion-forcing noise.

Usage::

    python -m cachekit_models.refdit.train --out runs/refdit [--minutes M] [--steps N]
                                           [--resume] [--seed S]

* Data: an endless, fixed stream of synthetic videos; sample ``i`` of step ``s`` uses seed
  ``seed * 1_000_003 + s * batch + i`` for both its condition and its rendering, and the
  noise of step ``s`` comes from a generator seeded with ``(seed, s)``. So a resumed run sees
  exactly the batches and noise an uninterrupted run would have seen (and, when the step
  budget binds, the same learning rates; with a binding time budget the LR follows wall time).
* Noise (diffusion forcing): an independent sigma per chunk, or all chunks at one sigma, or
  sigmas sorted along time (as the DF schedule produces), or clean prefix chunks (sigma = 0,
  excluded from the loss) followed by noisy ones. Condition dropped with p = 0.1 (CFG).
* Optimiser: AdamW, linear warm-up then cosine decay to 10% over the budget (``--steps`` or
  ``--minutes``, whichever binds first); EMA of the weights (the EMA is what gets exported).
* Budget: stops at ``--steps`` or after ``--minutes`` of training wall time (summed over
  resumes), whichever first; checkpoints every ``--ckpt-minutes``; then exports
  ``weights/refdit.safetensors`` + ``weights/refdit.json`` and ``card/loss.png`` +
  ``card/samples.png`` into the package (or ``--export-dir``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..synthetic import Condition, make_video, sample_condition
from .config import RefDiTConfig
from .loading import sha256_file
from .model import RefDiT

Tensor = torch.Tensor
PACKAGE_DIR = Path(__file__).resolve().parent
SEED_STRIDE = 1_000_003          # separates the data streams of different --seed values
CFG_DROP_P = 0.1                 # probability of training a sample on the null condition
EMA_DECAY = 0.999


# ---------------------------------------------------------------------------------------------
# data and noise
# ---------------------------------------------------------------------------------------------

def video_batch(cfg: RefDiTConfig, seed: int, step: int, batch: int, frames: int):
    """Batch ``step`` of the data stream: ``x0`` ``[B, C, F, H, W]`` in [-1, 1], ids ``[B, L]``."""
    videos, ids = [], []
    for i in range(batch):
        s = seed * SEED_STRIDE + step * batch + i
        cond = sample_condition(s)
        video, _ = make_video(cond, s, frames, cfg.height, cfg.width)
        videos.append(video)
        ids.append(cond.ids())
    x0 = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3) * 2.0 - 1.0
    return x0.contiguous(), torch.tensor(ids, dtype=torch.long)


def _sample_sigma(n: int, gen: torch.Generator) -> Tensor:
    """Half logit-normal (mass in the middle, where flow matching learns most), half uniform."""
    u = torch.rand(n, generator=gen)
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, ln, u)



def df_sigmas(batch: int, chunks: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-chunk sigmas ``[B, chunks]`` and a loss mask ``[B, chunks]`` (False = clean prefix).

    Modes per sample (diffusion forcing): independent 35%, sorted non-decreasing along time 25%
    (what a DF schedule with ``ar_step > 0`` feeds), all equal 20%, clean prefix of 1..chunks-1
    chunks at sigma 0 followed by sorted noisy chunks 20%.
    """
    sig = _sample_sigma(batch * chunks, gen).view(batch, chunks)
    mode = torch.rand(batch, generator=gen)
    loss_mask = torch.ones(batch, chunks, dtype=torch.bool)
    for b in range(batch):
        m = float(mode[b])
        if m < 0.35:
            continue
        if m < 0.60:
            sig[b] = sig[b].sort().values
        elif m < 0.80:
            sig[b] = sig[b, 0]
        elif chunks > 1:
            k = int(torch.randint(1, chunks, (1,), generator=gen))
            sig[b] = sig[b].sort().values
            sig[b, :k] = 0.0
            loss_mask[b, :k] = False
    return sig, loss_mask


# ---------------------------------------------------------------------------------------------
# preview sampler (all chunks at one sigma; the DF sampler lives in cachekit core)
# ---------------------------------------------------------------------------------------------

def shifted_sigmas(steps: int, shift: float) -> Tensor:
    """``steps + 1`` sigmas from 1 to 0 with the flow-matching timestep shift ``s sigma / (1 + (s-1) sigma)``."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def preview_sample(model: RefDiT, conds: list[Condition], frames: int, steps: int = 24,
                   guidance: float = 3.0, shift: float = 2.0, seed: int = 0) -> Tensor:
    """Euler on the velocity with CFG, every frame at the same sigma -> ``[B, F, H, W, 3]`` in [0,1]."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    b = len(conds)
    x = torch.randn(b, cfg.channels, frames, cfg.height, cfg.width, generator=gen)
    ids = torch.tensor([c.ids() for c in conds], dtype=torch.long)
    ctx = torch.cat([model.encode_condition(ids), model.null_condition(b)])
    sig = shifted_sigmas(steps, shift)
    for i in range(steps):
        s = torch.full((2 * b, frames), float(sig[i]))
        v_c, v_u = model(torch.cat([x, x]), s, ctx).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        x = x + (sig[i + 1] - sig[i]) * v
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)


# ---------------------------------------------------------------------------------------------
# card figures (Pillow only)
# ---------------------------------------------------------------------------------------------

def draw_loss_png(rows: list[tuple[int, float]], path: Path, size=(640, 360)) -> None:
    """Loss curve (log y) with a running mean, drawn with Pillow."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 15, 25, 40
    if len(rows) < 2:
        d.text((10, 10), "not enough loss points", fill="black")
        img.save(path)
        return
    steps = np.array([r[0] for r in rows], dtype=np.float64)
    loss = np.log10(np.maximum(np.array([r[1] for r in rows], dtype=np.float64), 1e-8))
    win = max(1, len(loss) // 40)
    smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
    lo, hi = float(np.floor(loss.min() * 4) / 4), float(np.ceil(loss.max() * 4) / 4)
    hi = max(hi, lo + 0.25)
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

    def px(s, lv):
        return (left + (s - x0) / (x1 - x0) * (w - left - right),
                top + (hi - lv) / (hi - lo) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in np.arange(lo, hi + 1e-9, 0.25):
        _, y = px(x0, k)
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{10 ** k:.3g}", fill="black")
    for frac in np.linspace(0, 1, 5):
        s = x0 + frac * (x1 - x0)
        x, _ = px(s, lo)
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 12, h - bottom + 8), f"{int(s)}", fill="black")
    d.line([px(s, lv) for s, lv in zip(steps, loss)], fill=(170, 190, 230), width=1)
    d.line([px(s, lv) for s, lv in zip(steps[win - 1:], smooth)], fill=(200, 30, 30), width=2)
    d.text((left, 5), "training loss (MSE on velocity, log scale) vs step", fill="black")
    img.save(path)


def draw_samples_png(videos: Tensor, labels: list[str], path: Path, scale: int = 3,
                     real: Optional[Tensor] = None) -> None:
    """Contact sheet: one row per condition (frames left to right), label above each row.

    ``videos`` ``[B, F, H, W, 3]`` in [0, 1]; ``real`` (optional, same shape) is drawn under each
    generated row as a reference from the data generator (a different seed).
    """
    b, f, hh, ww, _ = videos.shape
    label_h, gap = 14, 4
    rows_per = 2 if real is not None else 1
    cell_h = hh * scale
    row_h = label_h + rows_per * cell_h + gap
    img = Image.new("RGB", (f * ww * scale, b * row_h), "white")
    d = ImageDraw.Draw(img)
    for i in range(b):
        y = i * row_h
        d.text((2, y + 1), labels[i], fill="black")
        sets = [videos[i]] + ([real[i]] if real is not None else [])
        for r, vid in enumerate(sets):
            strip = (vid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            strip = np.concatenate(list(strip), axis=1)  # [H, F*W, 3]
            tile = Image.fromarray(strip).resize((f * ww * scale, cell_h), Image.NEAREST)
            img.paste(tile, (0, y + label_h + r * cell_h))
    img.save(path)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def export(model: RefDiT, export_dir: Path, meta: dict, loss_rows, frames: int) -> None:
    """Write weights + json + card figures for ``model`` (the EMA copy)."""
    from safetensors.torch import save_file

    wdir, cdir = export_dir / "weights", export_dir / "card"
    wdir.mkdir(parents=True, exist_ok=True)
    cdir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    st = wdir / "refdit.safetensors"
    save_file(tensors, str(st), metadata={"format": "pt", "model": "refdit"})
    os.chmod(st, 0o644)  # safetensors writes 0600; the file ships in the package
    info = dict(meta, config=model.cfg.to_dict(), sha256=sha256_file(st),
                params=model.num_params(), file="refdit.safetensors")
    (wdir / "refdit.json").write_text(json.dumps(info, indent=2) + "\n")
    draw_loss_png(loss_rows, cdir / "loss.png")
    conds, real = card_videos(model.cfg, frames)
    vids = preview_sample(model, conds, frames, seed=meta.get("seed", 0))
    draw_samples_png(vids, [str(c) for c in conds], cdir / "samples.png", real=real)
    draw_df_samples(model, conds, real, cdir / "samples_df.png")


def card_videos(cfg: RefDiTConfig, frames: int) -> tuple[list[Condition], Tensor]:
    """The card's sample conditions and, for comparison, a real video of each."""
    conds = [Condition.parse(t) for t in SAMPLE_CONDITIONS]
    real = torch.stack([torch.from_numpy(make_video(c, 10_000 + i, frames, cfg.height,
                                                    cfg.width)[0])
                        for i, c in enumerate(conds)])
    return conds, real


def draw_df_samples(model: RefDiT, conds: list[Condition], real: Tensor, path: Path) -> None:
    """Contact sheet of what ``cachekit generate --policy none`` produces: the core sampler
    with the adapter's default settings (diffusion-forcing schedule, chunked mode, CFG)."""
    from cachekit.sampling import generate

    from .adapter import RefDiTAdapter

    adapter = RefDiTAdapter(model)
    cfg = adapter.default_sampler()
    res = generate(adapter, adapter.encode_condition(conds),
                   uncond=adapter.null_condition(len(conds)), config=cfg, seed=0)
    vids = adapter.decode(res.video)
    vids = vids if isinstance(vids, Tensor) else torch.as_tensor(vids)
    label = f"DF {cfg.num_steps} steps, ar_step {cfg.ar_step}, CFG {cfg.guidance_scale:g}"
    draw_samples_png(vids, [f"{label}: {c}" for c in conds], path, real=real)


#: Conditions shown on the card's sample sheet (one of each motion class).
SAMPLE_CONDITIONS = (
    "shape=circle,color=red,motion=static,background=stripes,tint=neutral",
    "shape=square,color=blue,motion=slow,background=checker,tint=warm",
    "shape=triangle,color=yellow,motion=fast,background=gradient,tint=cool",
    "shape=cross,color=green,motion=pan,background=noise,tint=neutral",
    "shape=diamond,color=magenta,motion=fast,background=stripes,tint=neutral",
)


# ---------------------------------------------------------------------------------------------
# training loop
# ---------------------------------------------------------------------------------------------

class ThreadTuner:
    """Pick the faster of 1 and ``max_threads`` intra-op threads, re-probed every 100 steps.

    On a shared machine another busy process turns 2 torch threads on 2 cores into heavy
    oversubscription (each parallel region waits for a descheduled thread), often slower than
    one thread; when the machine is idle 2 threads win. Thread count changes only float
    reduction order, not the data or noise stream.
    """

    PERIOD, PROBE = 100, 8

    def __init__(self, max_threads: int):
        self.max_threads = max_threads
        self.times: dict[int, list[float]] = {}
        self.choice = max_threads
        torch.set_num_threads(max_threads)

    def record(self, step: int, seconds: float) -> None:
        phase = step % self.PERIOD
        candidates = sorted({1, self.max_threads})
        if len(candidates) == 1:
            return
        if phase < self.PROBE * len(candidates):
            n = candidates[phase // self.PROBE]
            # skip the first step after a switch (thread pool warm-up)
            if phase % self.PROBE:
                self.times.setdefault(n, []).append(seconds)
            nxt = phase + 1
            if nxt < self.PROBE * len(candidates):
                torch.set_num_threads(candidates[nxt // self.PROBE])
            else:
                # a resume can start mid-probe: an untimed candidate never wins
                self.choice = min(candidates, key=lambda c: float(np.median(
                    self.times.get(c) or [float("inf")])))
                self.times.clear()
                torch.set_num_threads(self.choice)

    def __repr__(self) -> str:
        return f"threads={torch.get_num_threads()}"


def lr_at(progress: float, step: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to ``0.1 base``.

    ``progress`` in [0, 1] is how much of the budget is used: the larger of the step fraction
    and the wall-time fraction, so the schedule completes whichever budget binds (on a shared
    CPU the step rate is not known in advance).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, max(0.0, progress))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_step(model: RefDiT, x0: Tensor, ids: Tensor, gen: torch.Generator,
               weight_cap: Optional[float] = None) -> Tensor:
    """One diffusion-forcing flow-matching loss on a batch.

    The loss is the velocity MSE. For an x0-predicting model that is the x0 error weighted
    by ``1 / sigma^2``, which puts almost all the weight on nearly clean frames: where a
    sprite sits at high noise (the part that must come from the earlier chunks) hardly
    counts. ``weight_cap`` C caps that weight: each frame's velocity error is multiplied by
    ``min(1, C sigma^2)``, i.e. the x0 error weight becomes ``min(1 / sigma^2, C)``. None
    keeps the plain velocity loss.
    """
    cfg = model.cfg
    b, _, frames = x0.shape[:3]
    chunks = frames // cfg.chunk_frames
    sig_c, mask_c = df_sigmas(b, chunks, gen)
    sigma = sig_c.repeat_interleave(cfg.chunk_frames, dim=1)         # [B, F]
    frame_mask = mask_c.repeat_interleave(cfg.chunk_frames, dim=1)   # [B, F]
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma[:, None, :, None, None]
    xt = (1 - s) * x0 + s * eps
    ctx = model.encode_condition(ids)
    drop = torch.rand(b, generator=gen) < CFG_DROP_P
    ctx = torch.where(drop[:, None, None], model.null_condition(b), ctx)
    v = model(xt, sigma, ctx)
    err = (v - (eps - x0)).pow(2).mean(dim=(1, 3, 4))                 # [B, F]
    if weight_cap is not None:
        err = err * (weight_cap * sigma.pow(2)).clamp(max=1.0)
    return (err * frame_mask).sum() / frame_mask.sum().clamp(min=1)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run dir (checkpoints, loss.csv)")
    p.add_argument("--minutes", type=float, default=70.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=4000, help="step budget (LR schedule length)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--extend-steps", type=int, default=None,
                   help="with --resume: raise the step budget to N (a warm restart: the LR "
                        "schedule is recomputed over the new budget, so the run is no longer "
                        "identical to an uninterrupted one)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step without changing the LR schedule (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weight-cap", type=float, default=None,
                   help="cap the x0-error weight 1/sigma^2 of the velocity loss at C (see "
                        "train_step); default: the plain velocity loss")
    p.add_argument("--config", type=str, default="",
                   help="config overrides as JSON, e.g. '{\"hidden\": 128}'")
    p.add_argument("--export-dir", type=Path, default=PACKAGE_DIR,
                   help="where weights/ and card/ go (default: the package)")
    p.add_argument("--no-export", action="store_true", help="skip export (speed tests)")
    p.add_argument("--export-only", action="store_true",
                   help="export the EMA of OUT/ckpt.pt (weights + card) without training")
    p.add_argument("--overfit", action="store_true", help="debug: repeat batch 0 forever")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    log_path = args.out / "loss.csv"

    cfg = RefDiTConfig(**json.loads(args.config)) if args.config else RefDiTConfig()
    step, wall_before = 0, 0.0
    args.resume = args.resume or args.export_only
    if args.resume:
        if not ckpt_path.exists():
            print(f"--resume: no checkpoint at {ckpt_path}", file=sys.stderr)
            return 2
        ck = torch.load(ckpt_path, weights_only=False)
        cfg = RefDiTConfig.from_dict(ck["config"])
        # the schedule-defining settings come from the checkpoint, so a resume is exact
        args.seed, args.batch, args.steps = ck["seed"], ck["batch"], ck["total_steps"]
        if args.extend_steps is not None:
            args.steps = max(args.steps, args.extend_steps)
        args.lr, args.warmup = ck.get("lr", args.lr), ck.get("warmup", args.warmup)
        args.weight_cap = ck.get("weight_cap", args.weight_cap)
    torch.manual_seed(args.seed)
    model = RefDiT(cfg)
    ema = RefDiT(cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0.01)
    if args.resume:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, wall_before = ck["step"], ck["wall"]
        torch.set_rng_state(ck["torch_rng"])
        # drop log rows written after the checkpoint so the CSV stays one curve
        if log_path.exists() and not args.export_only:
            with open(log_path) as fh:
                kept = [r for r in csv.reader(fh)]
            with open(log_path, "w", newline="") as fh:
                csv.writer(fh).writerows([kept[0]] + [r for r in kept[1:] if int(r[0]) <= step])
        print(f"resumed at step {step} (wall {wall_before / 60:.1f} min)", flush=True)
    else:
        with open(log_path, "w", newline="") as fh:
            csv.writer(fh).writerow(["step", "loss", "lr", "wall_s", "steps_per_s"])
    print(f"config {cfg.to_dict()} params {model.num_params() / 1e6:.2f}M "
          f"batch {args.batch} steps {args.steps}", flush=True)

    def checkpoint(wall: float) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "step": step, "wall": wall,
                    "torch_rng": torch.get_rng_state(), "config": cfg.to_dict(),
                    "seed": args.seed, "batch": args.batch, "total_steps": args.steps,
                    "lr": args.lr, "warmup": args.warmup, "weight_cap": args.weight_cap}, tmp)
        os.replace(tmp, ckpt_path)

    # SIGTERM/SIGINT: finish the current step, checkpoint, exit without exporting (resume later).
    stop = {"requested": False}

    def request_stop(signum, _frame):
        stop["requested"] = True
        print(f"signal {signum}: checkpointing and stopping", flush=True)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    threads = ThreadTuner(args.threads)

    frames = cfg.max_frames
    t_start = time.time()
    last_ckpt = t_start
    window: list[float] = []
    t_log = time.time()
    loss_val = float("nan")
    while step < args.steps and not args.export_only:
        wall = wall_before + time.time() - t_start
        if wall > args.minutes * 60 or (args.stop_at is not None and step >= args.stop_at) \
                or stop["requested"]:
            break
        t_step = time.time()
        progress = max((step - args.warmup) / max(1, args.steps - args.warmup),
                       wall / (args.minutes * 60))
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, step, args.lr, args.warmup)
        data_step = 0 if args.overfit else step
        x0, ids = video_batch(cfg, args.seed, data_step, args.batch, frames)
        gen = torch.Generator().manual_seed(args.seed * SEED_STRIDE + data_step)
        loss = train_step(model, x0, ids, gen, args.weight_cap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        threads.record(step, time.time() - t_step)
        step += 1
        window.append(float(loss.detach()))
        if step % 10 == 0:
            now = time.time()
            loss_val = sum(window) / len(window)
            rate = len(window) / (now - t_log)
            with open(log_path, "a", newline="") as fh:
                csv.writer(fh).writerow([step, f"{loss_val:.6f}", f"{opt.param_groups[0]['lr']:.3e}",
                                         f"{wall_before + now - t_start:.1f}", f"{rate:.3f}"])
            if step % 50 == 0:
                print(f"step {step} loss {loss_val:.4f} {rate:.2f} it/s {threads} "
                      f"wall {(wall_before + now - t_start) / 60:.1f} min", flush=True)
            window, t_log = [], now
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint(wall_before + time.time() - t_start)
            last_ckpt = time.time()
    wall = wall_before + time.time() - t_start
    if args.export_only:
        wall = wall_before
    else:
        checkpoint(wall)
    if stop["requested"]:
        print(f"stopped by signal at step {step}; continue with --resume", flush=True)
        return 0
    print(f"stopped at step {step}, wall {wall / 60:.1f} min", flush=True)
    if args.no_export:
        return 0
    with open(log_path) as fh:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
    meta = {"steps": step, "wall_s": round(wall, 1), "final_loss": rows[-1][1] if rows else None,
            "seed": args.seed, "batch": args.batch, "lr": args.lr, "frames": frames,
            "weight_cap": args.weight_cap,
            "torch": torch.__version__}
    ema.eval()
    export(ema, args.export_dir, meta, rows, frames)
    print(f"exported to {args.export_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
