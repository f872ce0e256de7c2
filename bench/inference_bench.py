"""Inference speed: the eager training model vs the exported artifacts (fp32, int8).

Measured in one run, on ML-100K test histories of a trained run:

1. ``recommend`` latency at batch 1 (p50 / p99 over ``--calls`` calls) and throughput
   at batch 64 (users/s): the training model (unsharded ``GenerativeRetrieval.score``,
   then top-k with the history excluded) vs the fp32 and the int8 artifact through
   ``Predictor.recommend`` (raw ids in, raw ids out).
2. ``score`` of 1, 64 and 512 candidates for one user: one pass (one encoder call, then
   the candidates' dot products) vs one call per candidate; the ratio is what one-pass
   multi-candidate scoring saves.

Usage::

    make run                                          # trains runs/hstu_ml100k
    .venv/bin/python bench/inference_bench.py [--run runs/hstu_ml100k] [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.batching import SequenceDataset  # noqa: E402
from torchrec_genrec.data.splits import LeaveOneOut, Split  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.export import export_run, load_trained_model  # noqa: E402
from torchrec_genrec.inference.predictor import History, Predictor  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402


def _latencies(fn: Callable[[int], None], calls: int, warmup: int = 10) -> np.ndarray:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return np.asarray(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/hstu_ml100k")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per latency figure")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    silence_known_noise()
    torch.manual_seed(0)

    model, cfg = load_trained_model(args.run)
    import json

    store_path = json.load(open(os.path.join(args.run, "metrics.json")))["dataset"]["path"]
    store = SequenceStore.open(store_path)
    raw_items = store.item_raw_ids()
    ds = SequenceDataset(store_path, Split.TEST, cfg.data.max_seq_len, LeaveOneOut(cfg.data.holdout),
                         with_seen_items=True)
    n_users = len(ds)

    all_histories = [History(**h) for h in ds.raw_histories(ds[list(range(n_users))])]
    tmp = tempfile.mkdtemp(prefix="genrec_inference_bench_")
    predictors = {}
    for precision in ("fp32", "int8"):
        export_run(args.run, os.path.join(tmp, precision), precision=precision)
        predictors[precision] = Predictor.load(os.path.join(tmp, precision))

    def eager_recommend(rows: List[int]) -> None:
        batch = ds[rows]
        with torch.no_grad():
            scores, _ = model.score(batch)
        seen = batch.seen_items
        scores[torch.repeat_interleave(torch.arange(len(rows)), seen.lengths()), seen.values()] = -float("inf")
        torch.topk(scores, args.k, dim=1)

    print(f"{args.run}: {n_users} test users, {model.num_items} items, histories up to {cfg.data.max_seq_len} "
          f"events; torch threads {torch.get_num_threads()}")
    print(f"\nrecommend (top-{args.k}, history excluded)")
    print(f"{'':<16} {'b=1 p50 ms':>11} {'b=1 p99 ms':>11} {'b=64 users/s':>13} {'vs eager':>9}")
    rows_64 = [list((np.arange(64) + 64 * i) % n_users) for i in range(n_users // 64 + 1)]
    eager_tput = None
    for name in ("eager training", "fp32 artifact", "int8 artifact"):
        if name == "eager training":
            one = lambda i: eager_recommend([i % n_users])  # noqa: E731
            many = lambda i: eager_recommend(rows_64[i % len(rows_64)])  # noqa: E731
        else:
            p = predictors[name.split()[0]]
            one = lambda i, p=p: p.recommend([all_histories[i % n_users]], k=args.k)  # noqa: E731
            many = lambda i, p=p: p.recommend([all_histories[r] for r in rows_64[i % len(rows_64)]], k=args.k)  # noqa: E731
        lat = _latencies(one, args.calls)
        batch_lat = _latencies(many, max(args.calls // 10, 20), warmup=3)
        tput = 64 / np.median(batch_lat)
        eager_tput = eager_tput or tput
        print(f"{name:<16} {np.percentile(lat, 50) * 1e3:>11.2f} {np.percentile(lat, 99) * 1e3:>11.2f} "
              f"{tput:>13.0f} {tput / eager_tput:>8.2f}x")

    p = predictors["int8"]
    rng = np.random.default_rng(0)
    print("\nscore (int8 artifact, one user, history of the test users in turn)")
    print(f"{'candidates':>10} {'one pass ms':>12} {'per-candidate ms':>17} {'ratio':>7}")
    for n in (1, 64, 512):
        cands = [raw_items[rng.choice(len(raw_items), n, replace=False)].tolist() for _ in range(8)]
        calls = max(args.calls // (1 if n == 1 else 10), 10)
        one_pass = _latencies(lambda i: p.score(all_histories[i % n_users], cands[i % 8]), calls)
        per_cand = _latencies(lambda i: [p.score(all_histories[i % n_users], [c]) for c in cands[i % 8]],
                              max(calls // (n if n > 1 else 1), 5), warmup=2)
        a, b = np.median(one_pass), np.median(per_cand)
        print(f"{n:>10} {a * 1e3:>12.2f} {b * 1e3:>17.2f} {b / a:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
