"""OneTrans and HSTU-ranker costs on ML-100K shapes, side by side in one run.

1. Training samples/s (TorchRec DMP, fused tables, real ML-100K batches of 256
   candidates): OneTrans with and without the pyramid, and every ranker on pointwise vs
   grouped requests; plus OneTrans's multiply-adds per request from the model's own count.
2. Serving one user with a full history (2 x 50 events) and C = 1, 100, 1000 candidates:
   OneTrans with the KV cache (Stage I once, Stage II per candidate) vs the full forward
   (history recomputed per candidate), and the HSTU ranker in one target-aware pass vs one
   pass per candidate (batched: C rows with the history each).

    .venv/bin/python bench/onetrans_bench.py [--steps 30] [--skip-training]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_speed(steps: int) -> None:
    from torchrec_genrec.data.datasets import resolve_store
    from torchrec_genrec.data.ranking import RankingConfig, RankingData
    from torchrec_genrec.data.ranking_batching import RankingDataset, make_ranking_loader
    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.models.ranking import OneTransRankerConfig, Ranker, RankerConfig
    from torchrec_genrec.modules.onetrans import OneTransConfig, flops_per_sample
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.sharding import OptimConfig, build_optimizer, shard

    data = RankingData.build(resolve_store("movielens-100k"), RankingConfig())
    sets = {g: RankingDataset(data, Split.TRAIN, grouped=g) for g in (False, True)}
    ctx = init_distributed()
    optim = OptimConfig(lr=1e-3, sparse_lr=0.05)

    def speed(cfg: RankerConfig, grouped: bool) -> float:
        torch.manual_seed(0)
        model = Ranker(cfg, data.vocab_sizes, sets[grouped].num_genres, data.config.max_seq_len)
        dmp = shard(model, ctx, optim, 256)
        opt = build_optimizer(dmp, optim)
        loader = iter(make_ranking_loader(sets[grouped], 256, shuffle=True, seed=0))
        batches = [next(loader) for _ in range(steps + 3)]
        dmp.train()
        samples, seconds = 0, 0.0
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            loss, _ = dmp(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 3:  # the first steps warm up allocators and kernels
                seconds += time.perf_counter() - start
                samples += batch.num_candidates
        return samples / seconds

    print(f"## Training samples/s ({steps} steps of 256 candidates, after 3 warm-up steps)\n")
    pyr = speed(RankerConfig(name="onetrans"), False)
    flat = speed(RankerConfig(name="onetrans", onetrans=OneTransRankerConfig(pyramid="none")), False)
    base = OneTransConfig(embedding_dim=32, num_layers=2, num_heads=2, num_ns_tokens=4)
    macs_pyr = flops_per_sample(base, 100, pyramid="linear")
    macs_flat = flops_per_sample(base, 100, pyramid="none")
    print("| OneTrans | samples/s | multiply-adds per request (S = 100) |")
    print("|---|---|---|")
    print(f"| pyramid (linear) | {pyr:,.0f} | {macs_pyr / 1e6:.2f} M |")
    print(f"| no pyramid | {flat:,.0f} | {macs_flat / 1e6:.2f} M |")
    print(f"| pyramid / none | {pyr / flat:.2f}x | {macs_pyr / macs_flat:.2f}x |\n")
    print("| model | pointwise samples/s | grouped samples/s | grouped / pointwise |")
    print("|---|---|---|---|")
    for name in ("dlrm", "onetrans", "hstu"):
        point = pyr if name == "onetrans" else speed(RankerConfig(name=name), False)
        grouped = speed(RankerConfig(name=name), True)
        print(f"| {name} | {point:,.0f} | {grouped:,.0f} | {grouped / point:.2f}x |")
    print()


def serving_cost(repeats: int) -> None:
    from torchrec_genrec.modules.hstu import HSTUConfig
    from torchrec_genrec.modules.hstu_ranker import HSTURankerEncoder
    from torchrec_genrec.modules.onetrans import OneTrans, OneTransConfig

    torch.manual_seed(0)
    d, s_len, num_ns = 32, 100, 4
    onetrans = OneTrans(OneTransConfig(embedding_dim=d, num_layers=2, num_heads=2, num_ns_tokens=num_ns,
                                       max_s_tokens=s_len)).eval()
    hstu = HSTURankerEncoder(HSTUConfig(embedding_dim=d, num_blocks=2, num_heads=2, attention_dim=d // 2,
                                        linear_dim=d // 2, max_seq_len=s_len + 1, dropout=0.0)).eval()
    s_tokens, s_valid = torch.randn(1, s_len, d), torch.ones(1, s_len, dtype=torch.bool)
    history_ts = torch.arange(s_len).view(1, s_len) * 3600
    lengths = torch.tensor([s_len])
    print(f"## Serving one user (history {s_len} events, D = {d}, 2 layers), median of {repeats}\n")
    print("| candidates | OneTrans KV cache | OneTrans full | full / cache | HSTU one pass | HSTU per candidate "
          "| per candidate / one pass |")
    print("|---|---|---|---|---|---|---|")
    costs = {}
    with torch.no_grad():
        for c in (1, 100, 1000):
            ns = torch.randn(c, num_ns, d)
            index = torch.zeros(c, dtype=torch.int64)
            cached = _timed(lambda: onetrans.forward_cached(onetrans.encode_sequence(s_tokens, s_valid), ns, index),
                            repeats)
            full = _timed(lambda: onetrans(s_tokens.expand(c, -1, -1), s_valid.expand(c, -1), ns), repeats)
            cand = torch.randn(1, c, d)
            cand_ts = torch.full((1, c), s_len * 3600)
            one_pass = _timed(lambda: hstu(s_tokens, lengths, history_ts, cand, cand_ts), repeats)
            per_candidate = _timed(lambda: hstu(s_tokens.expand(c, -1, -1), lengths.expand(c), history_ts.expand(c, -1),
                                                cand.view(c, 1, d), cand_ts.view(c, 1)), repeats)
            costs[c] = (cached, one_pass)
            print(f"| {c} | {cached * 1e3:.2f} ms | {full * 1e3:.2f} ms | {full / cached:.1f}x | "
                  f"{one_pass * 1e3:.2f} ms | {per_candidate * 1e3:.2f} ms | {per_candidate / one_pass:.1f}x |")
    print(f"\n1000 candidates vs 1: OneTrans with cache {costs[1000][0] / costs[1][0]:.1f}x, "
          f"HSTU one pass {costs[1000][1] / costs[1][1]:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per serving measurement")
    parser.add_argument("--skip-training", action="store_true", help="only the serving measurements")
    args = parser.parse_args()
    silence_known_noise()
    import logging

    logging.getLogger("torchrec_genrec.train.trainer").setLevel(logging.WARNING)
    print(f"torch threads: {torch.get_num_threads()}\n")
    if not args.skip_training:
        training_speed(args.steps)
    serving_cost(args.repeats)


if __name__ == "__main__":
    main()
