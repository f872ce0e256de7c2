"""The content issue's ranker table: test AUC / GAUC of each feature variant over seeds,
paired-bootstrap intervals against the IDs-only ranker, item-representation parameters,
and AUC on long-tail / cold items (few / no events before the validation cutoff).

Reads ``runs/<prefix>_<variant>_s<seed>`` (``bench/content_ranking.sh``).

    .venv/bin/python bench/content_report.py
    .venv/bin/python bench/content_report.py --variants ids sid das --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ranking_report import load  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.train.content import behaviour_log  # noqa: E402
from torchrec_genrec.train.ranking_metrics import paired_bootstrap_ranking, ranking_metrics  # noqa: E402

ALL = ["ids", "sid", "das", "simtier", "sata", "both", "both_scl", "sid_only", "small_sid", "small"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--variants", nargs="+", default=ALL)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--baseline", default="ids")
    parser.add_argument("--prefix", default="c7", help="runs are <runs>/<prefix>_<variant>_s<seed>")
    parser.add_argument("--tail", type=int, default=10, help="long tail: items with fewer pre-cutoff events")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args()

    runs = {}
    for v in args.variants:
        dirs = [os.path.join(args.runs, f"{args.prefix}_{v}_s{s}") for s in args.seeds]
        dirs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.json"))]
        if dirs:
            runs[v] = [load(d) for d in dirs]
    if args.baseline not in runs:
        raise SystemExit(f"no finished runs of the baseline {args.baseline!r} under {args.runs}")
    metrics0, ref = runs[args.baseline][0]
    store = SequenceStore.open(metrics0["dataset"]["path"])
    log = behaviour_log(store)
    counts = log.item_counts()
    items = np.asarray(store.item, dtype=np.int64)[ref["event"]]
    tail = counts[items] < args.tail
    cold = counts[items] == 0
    labels, users = torch.from_numpy(ref["label"]).double(), torch.from_numpy(ref["user"])
    print(f"test set: {len(labels):,} samples, {len(np.unique(ref['user']))} users; long tail (< {args.tail} "
          f"pre-cutoff events): {int(tail.sum()):,} samples; cold (none): {int(cold.sum()):,}")
    base_logits = torch.stack([torch.from_numpy(p["logit"]).double() for _, p in runs[args.baseline]])
    header = ["variant", "runs", "item-repr params", "AUC", "GAUC", "AUC - ids [95% CI]", "GAUC - ids [95% CI]",
              "tail AUC (- ids [95% CI])", "cold AUC (- ids [95% CI])", "best epoch"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for v, rs in runs.items():
        for _, p in rs:
            if not np.array_equal(p["event"], ref["event"]):
                raise SystemExit(f"{v}: its test samples differ from the baseline's")
        logits = torch.stack([torch.from_numpy(p["logit"]).double() for _, p in rs])
        mean = {k: float(np.mean([r["metrics"]["test"][k] for r, _ in rs])) for k in ("auc", "gauc")}
        params = rs[0][0]["training"].get("table_parameters", {}).get("item_representation")
        cells = [v, str(len(rs)), f"{params:,}" if params is not None else "?", f"{mean['auc']:.4f}",
                 f"{mean['gauc']:.4f}"]
        for metric in ("auc", "gauc"):
            if v == args.baseline:
                cells.append("-")
                continue
            d, lo, hi = paired_bootstrap_ranking(logits, base_logits, labels, users, metric, num_samples=args.samples)
            cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        for mask in (tail, cold):
            m = torch.from_numpy(mask)
            if m.sum() == 0 or labels[m].min() == labels[m].max():
                cells.append("n/a")
                continue
            aucs = [ranking_metrics(row[m].float(), labels[m].float(), users[m])["auc"] for row in logits]
            cell = f"{np.mean(aucs):.4f}"
            if v != args.baseline:
                d, lo, hi = paired_bootstrap_ranking(logits[:, m], base_logits[:, m], labels[m], users[m], "auc",
                                                     num_samples=args.samples)
                cell += f" ({d:+.4f} [{lo:+.4f}, {hi:+.4f}])"
            cells.append(cell)
        cells.append(",".join(str(r["training"]["best_epoch"]) for r, _ in rs))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
