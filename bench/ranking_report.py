"""Test AUC / GAUC of ranking runs over seeds, with paired-bootstrap intervals against a baseline.

Reads ``runs/<prefix><model>_s<seed>/{metrics.json,test_predictions.npz}`` (written by
``genrec rank``; ``bench/ranking_ml100k.sh`` makes them) and prints, per model, the mean
over seeds of each test metric, then ``model - baseline`` for AUC and GAUC with a 95%
interval from one bootstrap over users that resamples all seeds alike.

    .venv/bin/python bench/ranking_report.py --baseline dlrm --models dlrm onetrans hstu --seeds 0 1 2
    .venv/bin/python bench/ranking_report.py --named base=runs/rank_onetrans_s0 shared=runs/abl_shared
        (any runs, NAME=DIR[,DIR...]; the first is the baseline)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.train.ranking_metrics import paired_bootstrap_ranking  # noqa: E402


def load(run: str):
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    pred = np.load(os.path.join(run, "test_predictions.npz"))
    order = np.argsort(pred["event"], kind="stable")
    return metrics, {k: pred[k][order] for k in pred.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="directory holding the runs")
    parser.add_argument("--prefix", default="rank_", help="run name prefix: <prefix><model>_s<seed>")
    parser.add_argument("--models", nargs="+", default=["dlrm", "onetrans", "hstu"])
    parser.add_argument("--baseline", default="dlrm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--named", nargs="+", metavar="NAME=DIR[,DIR]",
                        help="compare these runs instead (seeds joined by commas); the first is the baseline")
    args = parser.parse_args()

    if args.named:
        groups = dict(item.split("=", 1) for item in args.named)
        runs = {name: [load(d) for d in dirs.split(",")] for name, dirs in groups.items()}
        args.baseline = next(iter(groups))
    else:
        runs = {m: [load(os.path.join(args.runs, f"{args.prefix}{m}_s{s}")) for s in args.seeds]
                for m in args.models}
    ref = runs[args.baseline][0][1]
    labels, users = torch.from_numpy(ref["label"]).double(), torch.from_numpy(ref["user"])
    for m, rs in runs.items():
        for _, p in rs:
            if not np.array_equal(p["event"], ref["event"]):
                raise SystemExit(f"{m}: its test samples differ from {args.baseline}'s; compare runs of one split")
    logits = {m: torch.stack([torch.from_numpy(p["logit"]).double() for _, p in rs]) for m, rs in runs.items()}
    print(f"test set: {len(labels):,} samples, {len(np.unique(ref['user']))} users; "
          f"{len(runs[args.baseline])} run(s) per row; baseline {args.baseline}")
    # Training speed is not shown: runs often share the CPU; bench/onetrans_bench.py measures it.
    header = ["model", "runs", "AUC", "GAUC", "logloss", "NE", "best epoch",
              "AUC - base [95% CI]", "GAUC - base [95% CI]"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for m, rs in runs.items():
        mean = {k: float(np.mean([r["metrics"]["test"][k] for r, _ in rs])) for k in ("auc", "gauc", "logloss", "ne")}
        epochs = ",".join(str(r["training"]["best_epoch"]) for r, _ in rs)
        cells = [m, str(len(rs)), f"{mean['auc']:.4f}", f"{mean['gauc']:.4f}", f"{mean['logloss']:.4f}", f"{mean['ne']:.4f}",
                 epochs]
        for metric in ("auc", "gauc"):
            if m == args.baseline:
                cells.append("-")
                continue
            d, lo, hi = paired_bootstrap_ranking(logits[m], logits[args.baseline], labels, users, metric,
                                                 num_samples=args.samples)
            cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
