"""LUM group query: one pass with N conditions after a shared history vs N passes.

    .venv/bin/python bench/lum_query_bench.py --prefix 200 --n 1 4 16
    .venv/bin/python bench/lum_query_bench.py --encoder hstu
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.muse_bench import timed  # noqa: E402
from torchrec_genrec.modules.lum import LUM, LUMConfig  # noqa: E402
from torchrec_genrec.tokens import TokenSpace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=200, help="history tokens")
    parser.add_argument("--n", nargs="+", type=int, default=[1, 4, 16], help="conditions per query")
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--encoder", choices=["transformer", "hstu"], default="transformer",
                        help="hstu: the group query is HSTU's target-aware pass (O(N * P))")
    args = parser.parse_args()
    torch.manual_seed(0)
    space = TokenSpace.build(num_items=args.items, contexts={"condition": 32})
    model = LUM(LUMConfig(embedding_dim=args.dim, num_layers=args.layers, max_positions=args.prefix + 1,
                          dropout=0.0, encoder=args.encoder), space).eval()
    prefix = space.to_tokens("item", torch.randint(0, args.items, (args.prefix,)))
    print(f"encoder {args.encoder}, prefix {args.prefix} tokens, D {args.dim}, {args.layers} layers, "
          f"{torch.get_num_threads()} threads")
    print("| N | one pass ms | N passes ms | N passes / one pass |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for n in args.n:
            conds = space.to_tokens("condition", torch.arange(n) % 32)
            one = timed(lambda: model.query(prefix, conds), args.repeats)
            many = timed(lambda: [model.query(prefix, c.view(1)) for c in conds], max(1, args.repeats // 2))
            print(f"| {n} | {one * 1e3:.2f} | {many * 1e3:.2f} | {many / one:.2f}x |")


if __name__ == "__main__":
    main()
