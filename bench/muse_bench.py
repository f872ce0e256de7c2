"""MUSE GSU + ESU throughput on synthetic lifelong sequences, vs full target attention.

Each user has L behaviours (L = 1k, 10k, 100k) over a catalogue of ``--items`` items with
content vectors (``--content-dim``) and ID embeddings (``--dim``). Per user and target:

- ``gsu+esu``: content lookup of all L behaviours, cosine top-K (``gsu_top_k``), then ID
  lookups of the K retrieved behaviours only, SimTier and SA-TA over them (MUSE);
- ``full sa-ta``: SA-TA over all L behaviours (ID lookups + similarity for every one);
- ``full din``: DIN's MLP target attention over all L behaviours (what an ESU over the
  whole sequence costs with an MLP scorer).

Prints users/s per method and length, the ratio gsu+esu / full, and how each cost grows
per 10x length. One process; run alone (the machine has 2 cores).

    .venv/bin/python bench/muse_bench.py
    .venv/bin/python bench/muse_bench.py --lengths 1000 10000 --users 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.modules.muse import SimilarityAwareTargetAttention, SimTier, gsu_top_k  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--users", type=int, default=8, help="users (one target each) per batch")
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--content-dim", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    content = nn.functional.normalize(torch.randn(args.items, args.content_dim), dim=-1)
    ids = torch.randn(args.items, args.dim) * 0.1
    tier, sata = SimTier(), SimilarityAwareTargetAttention(args.dim)
    din = nn.Sequential(nn.Linear(4 * args.dim, 64), nn.SiLU(), nn.Linear(64, 1))
    b = args.users
    rows = {}
    print(f"{b} users per batch, {args.items:,} items, content dim {args.content_dim}, ID dim {args.dim}, "
          f"top-K {args.top_k}; {torch.get_num_threads()} threads")
    with torch.no_grad():
        for length in args.lengths:
            history = torch.randint(0, args.items, (b * length,))
            lengths = torch.full((b,), length)
            targets = torch.randint(0, args.items, (b,))
            request = torch.arange(b)

            def gsu_esu():
                top = gsu_top_k(content[targets], content[history], lengths, request, args.top_k)
                tier(top.similarity, top.valid)
                # Only the K retrieved behaviours' ID embeddings are looked up.
                return sata(ids[targets], ids[history[top.index]], top.similarity, top.valid)

            def full_sata():
                behaviours = ids[history].view(b, length, -1)
                sims = torch.einsum("bd,bld->bl", content[targets], content[history].view(b, length, -1))
                return sata(ids[targets], behaviours, sims, torch.ones(b, length, dtype=torch.bool))

            def full_din():
                keys = ids[history].view(b, length, -1)
                q = ids[targets].unsqueeze(1).expand_as(keys)
                w = din(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
                return (w.unsqueeze(-1) * keys).sum(1)

            for name, fn in (("gsu+esu", gsu_esu), ("full sa-ta", full_sata), ("full din", full_din)):
                rows[(name, length)] = b / timed(fn, args.repeats)
    header = ["L", "gsu+esu users/s", "full sa-ta users/s", "full din users/s", "gsu+esu / full sa-ta",
              "gsu+esu / full din"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for length in args.lengths:
        g, s, d = rows[("gsu+esu", length)], rows[("full sa-ta", length)], rows[("full din", length)]
        print(f"| {length:,} | {g:,.1f} | {s:,.1f} | {d:,.1f} | {g / s:.2f}x | {g / d:.2f}x |")
    if len(args.lengths) > 1:
        print("cost growth per step of length (time ratio / length ratio):")
        for name in ("gsu+esu", "full sa-ta", "full din"):
            steps = []
            for a, c in zip(args.lengths[:-1], args.lengths[1:]):
                steps.append(f"{a:,}->{c:,}: {rows[(name, a)] / rows[(name, c)]:.1f}x time for {c / a:.0f}x length")
            print(f"  {name}: " + "; ".join(steps))


if __name__ == "__main__":
    main()
