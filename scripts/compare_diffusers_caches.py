#!/usr/bin/env python
"""Compare cachekit's policies with diffusers' block caches and cache-dit on one pipeline.

Builds a random-weight SkyReels-V2 diffusion-forcing pipeline from configs (no hub access),
runs it uncached and with every cache in turn, and prints speedup and fidelity side by side
(see cachekit_models.diffusers_skyreels.compare). Needs ``pip install 'cachekit[diffusers]'``;
cache-dit is optional (its row says "not installed" without it).

    nice -n 19 python scripts/compare_diffusers_caches.py --size small --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "small"], default="small",
                   help="tiny: diffusers' test transformer; small: 8 blocks, width 128 "
                        "(default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache-dit", action="store_true", help="skip the cache-dit row")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from cachekit_models.diffusers_skyreels.compare import compare_caches, format_table

    rows = compare_caches(args.size, repeats=args.repeats, seed=args.seed,
                          with_cache_dit=not args.no_cache_dit,
                          progress=lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    print(f"size={args.size} threads={args.threads} repeats={args.repeats} "
          f"torch={torch.__version__}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
