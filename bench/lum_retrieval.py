"""LUM conditioned retrieval on ML-100K, per condition kind, over seeds: the true condition
(the condition's output, and 4 generated items pooled) vs the unconditioned model with the
condition applied afterwards (the fair baseline: + log p(condition | item), a filter for
the genre, the item's pre-cutoff frequency for hour / weekday) vs a wrong condition vs the
unconditioned model alone. Pre-training reads only events before the validation cutoff;
every test event of a user with such a history is asked for.

    .venv/bin/python bench/lum_retrieval.py --conditions genre hour --seeds 0 1 2 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.train.lum import run_lum_retrieval_study  # noqa: E402

ROWS = (("conditioned", "true condition"), ("conditioned_pooled", "true condition, 4 generated items pooled"),
        ("unconditioned_prior", "unconditioned + condition applied after"), ("wrong_condition", "wrong condition"),
        ("unconditioned", "unconditioned"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", nargs="+", default=["genre", "hour"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="generated items pooled per condition")
    parser.add_argument("--out", default="runs/lum_retrieval.json")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {}
    if os.path.exists(args.out):  # resume: studies already measured are kept
        with open(args.out) as f:
            results = json.load(f)
    for condition in args.conditions:
        for seed in args.seeds:
            key = f"{condition}/{seed}"
            if key not in results:
                results[key] = run_lum_retrieval_study(seed=seed, epochs=args.epochs, condition=condition,
                                                       steps=args.steps)
                with open(args.out + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
    for condition in args.conditions:
        runs = [results[f"{condition}/{s}"] for s in args.seeds]
        first = runs[0]["conditioned"]
        print(f"\ncondition {condition}: {first['events']:,} test events of {first['users']} users with a pre-cutoff "
              f"history; {len(runs)} seed(s), {args.epochs} epochs")
        print("| query | recall@10 | NDCG@10 | per-seed recall@10 |")
        print("|---|---|---|---|")
        for key, label in ROWS:
            r = [run[key]["recall@10"] for run in runs]
            n = [run[key]["ndcg@10"] for run in runs]
            print(f"| {label} | {np.mean(r):.4f} | {np.mean(n):.4f} | {', '.join(f'{x:.4f}' for x in r)} |")
        mean = lambda key, m: np.mean([run[key][m] for run in runs])  # noqa: E731
        for key in ("conditioned", "conditioned_pooled"):
            print(f"{key} / unconditioned + condition after: recall@10 "
                  f"{mean(key, 'recall@10') / max(mean('unconditioned_prior', 'recall@10'), 1e-12):.2f}x, NDCG@10 "
                  f"{mean(key, 'ndcg@10') / max(mean('unconditioned_prior', 'ndcg@10'), 1e-12):.2f}x")


if __name__ == "__main__":
    main()
