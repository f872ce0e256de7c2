"""HSTU benchmark: one layer's forward + backward on long-tailed jagged batches, the whole
retrieval model's training rate against SASRec, and the achieved FLOP/s.

Figures, all measured in one run on this machine:

1. **fp32 matmul rate**: best of square ``torch.mm`` calls, the ceiling the FLOP/s figures
   are a fraction of.
2. **HSTU layer** (:class:`HSTULayer`: LayerNorm, the uvqk projection, attention, gated
   output; forward + backward) on ``--batch`` sequences with lognormal lengths (mean
   ``--mean-len``, one sequence at ``--max-len``), three ways, with identical weights:

   - ``reference``: the padded PyTorch attention (every sequence padded to the longest),
   - ``bucketed``: plain length-bucketed padding (power-of-two groups, the reference
     per group; ``bench/hstu_attention_bench.py``),
   - ``jagged``: the library's fast path (the default kernel).

   Tokens/s count real tokens only. Useful FLOPs count the causal pairs of real tokens
   (what an ideal kernel must compute), forward ``2 T D (2 H dv + 2 H dqk) + 2 T H dv D
   + 2 P H (dqk + dv)`` with ``P = sum L (L + 1) / 2``, backward twice that.
3. **Whole model**: training steps of :class:`GenerativeRetrieval` (token table under
   DistributedModelParallel with its fused optimiser, encoder, sampled-softmax loss,
   AdamW) with the HSTU and the SASRec encoder at equal width and depth, on a synthetic
   store with the same long-tailed lengths. Tokens/s count real tokens.

Every figure is printed beside its ratio (fast vs reference, HSTU vs SASRec).

Usage::

    .venv/bin/python bench/hstu_bench.py [--batch 128] [--mean-len 100] [--max-len 1024]
        [--dim 128] [--heads 2] [--repeats 2] [--no-reference] [--model-steps 4]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from typing import Dict, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import torchrec_genrec.modules.hstu as hstu_module  # noqa: E402
from hstu_attention_bench import bucketed_padding_attention, long_tailed_lengths  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402
from torchrec_genrec.modules.hstu import HSTUConfig, HSTULayer  # noqa: E402

#: The aim of the issue: the jagged layer at least this many times the padded reference.
AIM_JAGGED_OVER_REFERENCE = 1.5


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an ``n x n @ n x n`` matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@contextlib.contextmanager
def bucketed_attention() -> Iterator[None]:
    """Runs HSTU layers with the plain bucketed-padding attention instead of their kernel."""
    original = hstu_module.hstu_attention

    def bucketed(max_seq_len, q, k, v, offsets, timestamps=None, pos_weights=None, ts_weights=None, kernel=None):
        return bucketed_padding_attention(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)

    hstu_module.hstu_attention = bucketed
    try:
        yield
    finally:
        hstu_module.hstu_attention = original


def time_layer(layer: HSTULayer, x: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor,
               grad: torch.Tensor, repeats: int) -> float:
    """Best seconds of a forward + backward over ``repeats`` calls, after one warm-up."""
    best = float("inf")
    for i in range(repeats + 1):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        layer(x, offsets, timestamps).backward(grad)
        elapsed = time.perf_counter() - t0
        if i > 0:
            best = min(best, elapsed)
    return best


def layer_flops(lengths: np.ndarray, c: HSTUConfig) -> float:
    """Useful forward + backward FLOPs of one HSTU layer on these lengths (see module doc)."""
    t = float(lengths.sum())
    pairs = float((lengths * (lengths + 1) // 2).sum())
    h, d = c.num_heads, c.embedding_dim
    forward = (2 * t * d * h * (2 * c.linear_dim + 2 * c.attention_dim) + 2 * t * h * c.linear_dim * d
               + 2 * pairs * h * (c.attention_dim + c.linear_dim))
    return 3.0 * forward


def bench_layer(args: argparse.Namespace, matmul_rate: float) -> None:
    lengths = long_tailed_lengths(args.batch, args.mean_len, args.max_len, 1.0, args.seed)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    t = int(offsets[-1])
    per_head = args.dim // args.heads
    config = HSTUConfig(embedding_dim=args.dim, num_blocks=1, num_heads=args.heads, attention_dim=per_head,
                        linear_dim=per_head, max_seq_len=args.max_len, dropout=0.0)
    torch.manual_seed(args.seed)
    jagged = HSTULayer(config)
    reference = copy.deepcopy(jagged)
    reference.kernel = hstu_module.HSTUAttentionKernel.PYTORCH
    x = torch.randn(t, args.dim, requires_grad=True)
    timestamps = torch.cumsum(torch.randint(1, 10**5, (t,)), 0)
    grad = torch.randn(t, args.dim)
    flops = layer_flops(lengths, config)
    print(f"\nHSTU layer, forward + backward: B={args.batch} D={args.dim} H={args.heads} dqk=dv={per_head} "
          f"N={args.max_len}; lengths mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; T={t} real tokens, padded to "
          f"{args.batch * args.max_len} ({args.batch * args.max_len / t:.1f}x)")

    seconds: Dict[str, float] = {"jagged": time_layer(jagged, x, offsets, timestamps, grad, args.repeats)}
    with bucketed_attention():
        seconds["bucketed"] = time_layer(jagged, x, offsets, timestamps, grad, args.repeats)
    if not args.no_reference:
        seconds["reference"] = time_layer(reference, x, offsets, timestamps, grad, args.repeats)

    print(f"{'variant':<10} {'s/call':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'of matmul':>9} "
          f"{'jagged vs this':>15}")
    for name, s in seconds.items():
        print(f"{name:<10} {s:8.3f} {t / s:10,.0f} {flops / s / 1e9:8.2f} {flops / s / matmul_rate:9.1%} "
              f"{s / seconds['jagged']:14.2f}x")
    if "reference" in seconds:
        ratio = seconds["reference"] / seconds["jagged"]
        print(f"jagged / padded reference: {ratio:.2f}x (aim >= {AIM_JAGGED_OVER_REFERENCE}x: "
              f"{ratio / AIM_JAGGED_OVER_REFERENCE:.2f}x of aim)")


def bench_models(args: argparse.Namespace) -> None:
    """Training tokens/s of the whole retrieval model, HSTU vs SASRec at equal dims."""
    from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.data.store import SequenceStore, write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate
    from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.sharding import OptimConfig, build_optimizer, shard

    users = args.model_batch * (args.model_steps + 2)
    synthetic = SyntheticConfig(num_users=users, num_items=20_000, num_events=int(users * args.mean_len),
                                min_seq_len=5, length_sigma=1.0, seed=args.seed)
    ctx = init_distributed()
    optim = OptimConfig()
    with tempfile.TemporaryDirectory(prefix="hstu-bench-") as tmp:
        write_store(generate(synthetic), tmp, {"dataset": "hstu-bench"})
        store = SequenceStore.open(tmp)
        dataset = SequenceDataset(tmp, Split.TRAIN, args.model_max_len)
        loader = iter(make_dataloader(dataset, args.model_batch, shuffle=True, seed=args.seed))
        batches = [next(loader) for _ in range(args.model_steps + 1)]
        tokens = sum(int(b.features["item"].lengths().sum()) for b in batches[1:])
        longest = max(int(b.features["item"].lengths().max()) for b in batches)
        print(f"\nWhole model, training steps (DMP token table + encoder + sampled softmax + optimisers): "
              f"batch {args.model_batch}, max_seq_len {args.model_max_len} (longest in batch {longest}), "
              f"D={args.dim}, {args.model_blocks} blocks, {args.heads} heads, {store.num_items} items; "
              f"{args.model_steps} timed steps, {tokens} real tokens")
        rates: Dict[str, float] = {}
        for name in ("hstu", "sasrec"):
            torch.manual_seed(args.seed)
            cfg = RetrievalConfig(name=name, embedding_dim=args.dim, num_blocks=args.model_blocks,
                                  num_heads=args.heads, attention_dim=args.dim // args.heads,
                                  linear_dim=args.dim // args.heads, dropout=0.2, action_mode="summed")
            model = GenerativeRetrieval(cfg, store.num_items, store.num_actions, args.model_max_len)
            dmp = shard(model, ctx, optim, args.model_batch)
            optimizer = build_optimizer(dmp, optim)
            dmp.train()
            for i, batch in enumerate(batches):
                if i == 1:  # the first step warms up
                    start = time.perf_counter()
                out = dmp(batch)  # one process: the mean over this batch's predictions
                loss = out["item_loss_sum"] / out["queries"] + 0.1 * out["action_loss_sum"] / out["actions"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rates[name] = tokens / (time.perf_counter() - start)
            del dmp, optimizer, model
        print(f"{'encoder':<8} {'tokens/s':>10} {'s/step':>8}")
        for name, rate in rates.items():
            print(f"{name:<8} {rate:10,.0f} {tokens / rate / args.model_steps:8.2f}")
        print(f"HSTU / SASRec training tokens/s: {rates['hstu'] / rates['sasrec']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mean-len", type=float, default=100.0)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128, help="model width D")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the padded reference layer (slow)")
    parser.add_argument("--model-batch", type=int, default=64)
    parser.add_argument("--model-max-len", type=int, default=512)
    parser.add_argument("--model-blocks", type=int, default=2)
    parser.add_argument("--model-steps", type=int, default=4)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model comparison")
    args = parser.parse_args()
    silence_known_noise()
    rate = matmul_flops_per_s()
    print(f"fp32 matmul (2048^3, best of 5): {rate / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    bench_layer(args, rate)
    if not args.no_model:
        bench_models(args)


if __name__ == "__main__":
    main()
