"""LUM conditioned retrieval on ML-100K: the true condition (the test item's genre) vs the
unconditioned model with the condition applied afterwards as a filter (the fair baseline)
vs a wrong condition, over seeds. Pre-training reads only events before the validation
cutoff; every test event of a user with such a history is asked for.

    .venv/bin/python bench/lum_retrieval.py --seeds 0 1 2 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.train.lum import run_lum_retrieval_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/lum_retrieval.json")
    args = parser.parse_args()
    runs = [run_lum_retrieval_study(seed=s, epochs=args.epochs) for s in args.seeds]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(runs, f, indent=1)
    first = runs[0]["conditioned"]
    print(f"{first['events']:,} test events of {first['users']} users with a pre-cutoff history; "
          f"{len(runs)} seed(s), {args.epochs} epochs")
    print("| query | recall@10 | NDCG@10 | per seed recall@10 |")
    print("|---|---|---|---|")
    for name in ("conditioned", "unconditioned_filtered", "wrong_condition", "unconditioned"):
        r = [run[name]["recall@10"] for run in runs]
        n = [run[name]["ndcg@10"] for run in runs]
        print(f"| {name} | {np.mean(r):.4f} | {np.mean(n):.4f} | {', '.join(f'{x:.4f}' for x in r)} |")
    ratio = np.mean([run["conditioned"]["recall@10"] for run in runs]) / max(
        np.mean([run["unconditioned_filtered"]["recall@10"] for run in runs]), 1e-12)
    print(f"conditioned / unconditioned + filter recall@10: {ratio:.2f}x")


if __name__ == "__main__":
    main()
