"""LUM pre-training throughput: packed rows vs the library's jagged batches vs padded batches.

The same users' ``<condition, item>`` sequences (ML-100K, genre, events before the
validation cutoff) through the same LUM forward + backward, laid out three ways:

- ``packed``: several users per fixed-length row (first-fit decreasing), block-diagonal
  causal mask (``LUM.loss``);
- ``jagged``: users in random order, token values + offsets (``LUM.loss_jagged``): norms,
  projections and FFN on the values only, attention per length bucket
  (``ops.jagged.jagged_causal_attention``);
- ``padded``: users in random order, each batch padded to its longest (``LUM.loss``).

``--encoder hstu`` runs LUM on the library's HSTU layers (jagged: the HSTU jagged kernel;
padded: ``HSTUEncoder.forward_padded``); HSTU takes no block mask, so it has no packed arm.

Every layout gets the same budget of token slots per step. Prints useful tokens/s, ratios
to padded, and the share of token slots (what the pointwise layers compute) and of causal
attention cells spent on padding or on other users.

    .venv/bin/python bench/lum_packing_bench.py --row-len 256 --batch-tokens 4096
    .venv/bin/python bench/lum_packing_bench.py --encoder hstu
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.datasets import resolve_store  # noqa: E402
from torchrec_genrec.data.lum import batch_by_tokens, condition_item_sequences, pack_sequences  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.modules.lum import LUM, LUMConfig  # noqa: E402
from torchrec_genrec.ops.jagged import JaggedAttentionPlan  # noqa: E402
from torchrec_genrec.train.content import behaviour_log  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="token slots per step")
    parser.add_argument("--max-events", type=int, default=100)
    parser.add_argument("--steps", type=int, default=0, help="0: one pass over every user")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is printed")
    parser.add_argument("--encoder", choices=["transformer", "hstu"], default="transformer",
                        help="hstu: the library's HSTU layers (no packed arm: they take no block mask)")
    args = parser.parse_args()
    torch.manual_seed(0)
    store = SequenceStore.open(resolve_store("movielens-100k"))
    seqs = condition_item_sequences(store, behaviour_log(store), "genre", args.max_events)
    lengths = seqs.lengths()
    users = np.nonzero(lengths)[0]
    model = LUM(LUMConfig(max_positions=max(args.row_len, int(lengths.max())), dropout=0.0, encoder=args.encoder),
                seqs.space)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    rows = pack_sequences(lengths, args.row_len)
    per = max(1, args.batch_tokens // args.row_len)
    packed = [seqs.packed_rows(rows[i:i + per], args.row_len) for i in range(0, len(rows), per)]

    def by_width(order):
        out, i = [], 0
        while i < len(order):
            j = i
            width = 0
            while j < len(order) and max(width, lengths[order[j]]) * (j - i + 1) <= args.batch_tokens:
                width = max(width, lengths[order[j]])
                j += 1
            j = max(j, i + 1)
            group = order[i:j]
            out.append(seqs.packed_rows([[s] for s in group], int(lengths[group].max())))
            i = j
        return out

    shuffled = np.random.default_rng(0).permutation(users)
    padded = by_width(shuffled)
    jagged = [seqs.jagged_batch(group) for group in batch_by_tokens(lengths, shuffled, args.batch_tokens)]
    useful = int(lengths.sum())
    useful_cells = float((lengths * (lengths + 1) // 2).sum())
    results = {}
    g = torch.Generator().manual_seed(0)
    step_fns = {
        # The bucket plan is built inside the step, as in training (it costs a host-side DP).
        "jagged": lambda b: (model.loss_jagged(b[0], b[1], g)[0], b[0].numel()),
        "packed": lambda b: (model.loss(b.tokens, b.segment, b.position, g)[0], int((b.segment >= 0).sum())),
    }
    step_fns["padded"] = step_fns["packed"]
    layouts = {"packed": packed, "jagged": jagged, "padded": padded}
    if args.encoder == "hstu":
        del layouts["packed"]
    rates = {name: [] for name in layouts}
    # Rounds interleave the layouts so a noisy neighbour slows all of them alike; medians.
    for _ in range(args.repeats):
        for name, layout in layouts.items():
            step = step_fns[name]
            chosen = layout[:args.steps] if args.steps else layout
            step(chosen[0])  # warm-up
            start = time.perf_counter()
            tokens = 0
            for b in chosen:
                loss, n = step(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tokens += n
            rates[name].append(tokens / (time.perf_counter() - start))
    for name, layout in layouts.items():
        if name == "jagged":
            slots = sum(t.numel() for t, _ in layout)
            # The transformer's buckets; HSTU's jagged kernel plans its own (not counted here).
            cells = sum(JaggedAttentionPlan(o).attention_cells()[0] for _, o in layout) \
                if args.encoder == "transformer" else float("nan")
        else:
            slots = sum(b.tokens.numel() for b in layout)
            cells = sum(b.tokens.shape[0] * b.tokens.shape[1] * (b.tokens.shape[1] + 1) / 2 for b in layout)
        results[name] = (float(np.median(rates[name])), 1 - useful / slots, 1 - useful_cells / cells, len(layout))
    print(f"{len(users)} users, {useful:,} tokens (longest {int(lengths.max())}); <= {args.batch_tokens} token "
          f"slots per step; {torch.get_num_threads()} threads; median of {args.repeats} interleaved passes; "
          f"encoder {args.encoder}")
    print("| layout | steps | useful tokens/s | vs padded | token slots wasted | attention cells wasted |")
    print("|---|---|---|---|---|---|")
    base = results["padded"][0]
    for name, (rate, token_waste, cell_waste, steps) in results.items():
        cells = "n/a" if cell_waste != cell_waste else f"{cell_waste:.1%}"
        print(f"| {name} | {steps} | {rate:,.0f} | {rate / base:.2f}x | {token_waste:.1%} | {cells} |")
    if "packed" in results:
        print(f"jagged / packed: {results['jagged'][0] / results['packed'][0]:.2f}x")


if __name__ == "__main__":
    main()
