"""Export quality on a trained run: does the artifact reproduce the training model?

Exports the run at fp32, fp16 and int8, then for every test user (full ranking, seen
items excluded, as in training's evaluation) scores the catalogue with the training model
(eager, unsharded) and with each artifact through the public Predictor API (raw ids in),
and prints side by side:

- max |score difference| against the training model, HR@10 / NDCG@10 / MRR, and the
  run's recorded test metrics;
- token table bytes, as TorchRec stores the rows (aligned, with int8's scale/bias) and
  payload only, as a ratio to fp32;
- top-10 overlap with fp32 and the paired-bootstrap interval of NDCG@10 against fp32.

Usage::

    make run                                    # trains runs/hstu_ml100k
    .venv/bin/python bench/export_ml100k.py [--run runs/hstu_ml100k] [--out artifacts/hstu_ml100k]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.batching import SequenceDataset  # noqa: E402
from torchrec_genrec.data.splits import LeaveOneOut, Split  # noqa: E402
from torchrec_genrec.export import export_run, load_trained_model, table_bytes  # noqa: E402
from torchrec_genrec.inference.predictor import History, Predictor  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402
from torchrec_genrec.train.metrics import metrics_from_ranks, paired_bootstrap, rank_of_targets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/hstu_ml100k")
    parser.add_argument("--out", default="artifacts/hstu_ml100k")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=10000, help="bootstrap resamples")
    args = parser.parse_args()
    silence_known_noise()

    model, cfg = load_trained_model(args.run)
    record = json.load(open(os.path.join(args.run, "metrics.json")))
    store_path = record["dataset"]["path"]
    ds = SequenceDataset(store_path, Split.TEST, cfg.data.max_seq_len, LeaveOneOut(cfg.data.holdout),
                         with_seen_items=True)

    predictors = {}
    for precision in ("fp32", "fp16", "int8"):
        out = os.path.join(args.out, precision)
        start = time.perf_counter()
        export_run(args.run, out, precision=precision, overwrite=True)
        predictors[precision] = Predictor.load(out)
        print(f"exported {precision} to {out} in {time.perf_counter() - start:.1f} s")

    ranks = {name: [] for name in ["training model", *predictors]}
    top10 = {name: [] for name in predictors}
    max_diff = {name: 0.0 for name in predictors}
    with torch.no_grad():
        for start in range(0, len(ds), args.batch):
            batch = ds[list(range(start, min(start + args.batch, len(ds))))]
            reference, _ = model.score(batch)
            histories = [History(**h) for h in ds.raw_histories(batch)]
            seen = batch.seen_items
            ranks["training model"].append(rank_of_targets(reference, batch.target_item, seen.values(), seen.offsets()))
            for name, predictor in predictors.items():
                users = predictor.user_vectors([predictor.prepare(h) for h in histories])
                scores = predictor._index.cosine(users, torch.arange(predictor.num_items))
                max_diff[name] = max(max_diff[name], float((scores - reference).abs().max()))
                ranks[name].append(rank_of_targets(scores, batch.target_item, seen.values(), seen.offsets()))
                masked = scores.clone()
                rows = torch.repeat_interleave(torch.arange(len(histories)), seen.lengths())
                masked[rows, seen.values()] = -float("inf")
                top10[name].append(torch.topk(masked, 10, dim=1).indices)

    per_user = {name: metrics_from_ranks(torch.cat(r), [10]) for name, r in ranks.items()}
    recorded = record["metrics"]["test"]
    manifests = {name: p.manifest for name, p in predictors.items()}
    top_fp32 = torch.cat(top10["fp32"])
    print(f"\n{len(ds)} test users of {args.run}; recorded by training: HR@10 {recorded['hr@10']:.4f} "
          f"NDCG@10 {recorded['ndcg@10']:.4f} MRR {recorded['mrr']:.4f}")
    print(f"{'':<15} {'max|dscore|':>11} {'HR@10':>7} {'NDCG@10':>8} {'MRR':>7} {'table bytes':>12} "
          f"{'vs fp32':>8} {'payload':>8} {'top10 overlap':>14} {'NDCG@10 - fp32 [95% CI]':>30}")
    for name, m in per_user.items():
        line = f"{name:<15} {'-' if name == 'training model' else format(max_diff[name], '.2e'):>11} " \
               f"{float(m['hr@10'].mean()):>7.4f} {float(m['ndcg@10'].mean()):>8.4f} {float(m['mrr'].mean()):>7.4f}"
        if name in manifests:
            stored, payload = table_bytes(manifests[name]), table_bytes(manifests[name], payload_only=True)
            ratio = stored / table_bytes(manifests["fp32"])
            payload_ratio = payload / table_bytes(manifests["fp32"], payload_only=True)
            top = torch.cat(top10[name])
            overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, top_fp32)])
            diff, lo, hi = paired_bootstrap(m["ndcg@10"], per_user["fp32"]["ndcg@10"], num_samples=args.samples)
            line += f" {stored:>12,d} {ratio:>8.3f} {payload_ratio:>8.3f} {overlap:>14.4f} " \
                    f"{diff:>+9.4f} [{lo:+.4f}, {hi:+.4f}]"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
