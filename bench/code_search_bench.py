"""Constrained beam search over a large catalogue's semantic IDs: table build time and
search latency per request at several beam widths, the model replaced by random
log-probabilities (so this is the search's own cost, the floor under a real decoder's).

Usage::

    .venv/bin/python bench/code_search_bench.py --items 10000000 --levels 3 --codebook-size 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.modules.semantic_ids import disambiguate  # noqa: E402
from torchrec_genrec.ops.code_search import CodeTable, constrained_beam_search  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--beams", default="10,50,100")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, args.codebook_size, (args.items, args.levels), generator=g)
    start = time.perf_counter()
    codes = disambiguate(codes)
    sizes = [args.codebook_size] * args.levels + [int(codes[:, -1].max()) + 1]
    table = CodeTable(codes, sizes)
    build = time.perf_counter() - start
    kept = sum(k.numel() * 8 for k in table.prefix_keys) + table.item_by_key.numel() * 8
    print(f"{args.items:,} items, {args.levels}+1 levels ({sizes}): table built in {build:.1f} s "
          f"(disambiguation included), {kept / 2**20:,.0f} MiB; {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'beam':>5} {'ms per call':>12} {'ms per request':>15}")
    for batch in (int(b) for b in args.batches.split(",")):
        for beam in (int(b) for b in args.beams.split(",")):
            def step(level, prefix):
                return torch.log_softmax(torch.randn(*prefix.shape[:-1], sizes[level], generator=g), dim=-1)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                items, _ = constrained_beam_search(step, table, batch, beam, min(10, beam))
                best = min(best, time.perf_counter() - t0)
            assert (items >= 0).all()
            print(f"{batch:>6} {beam:>5} {best * 1e3:>12.2f} {best * 1e3 / batch:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
