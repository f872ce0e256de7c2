"""LUM conditioned retrieval on ML-100K, per condition kind, over seeds: the true condition
(the condition's output, and 4 generated items pooled) vs the unconditioned model with the
condition applied afterwards (the fair baseline: + log p(condition | item), a filter for
the genre, the item's pre-cutoff frequency for hour / weekday) vs a wrong condition vs the
unconditioned model alone. Pre-training reads only events before the validation cutoff;
every test event of a user with such a history is asked for. Differences come with a
paired bootstrap over users (all seeds resampled alike).

    .venv/bin/python bench/lum_retrieval.py --conditions genre hour --seeds 0 1 2 --epochs 20
    .venv/bin/python bench/lum_retrieval.py --conditions genre --encoder hstu
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.modules.lum import LUMConfig  # noqa: E402
from torchrec_genrec.train.lum import run_lum_retrieval_study  # noqa: E402

ROWS = (("conditioned", "true condition"), ("conditioned_pooled", "true condition, {steps} generated items pooled"),
        ("unconditioned_prior", "unconditioned + condition applied after"), ("wrong_condition", "wrong condition"),
        ("unconditioned", "unconditioned"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", nargs="+", default=["genre", "hour"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="generated items pooled per condition")
    parser.add_argument("--encoder", choices=["transformer", "hstu"], default="transformer")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples over users")
    parser.add_argument("--out", default="runs/lum_retrieval.json")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {}
    if os.path.exists(args.out):  # resume: studies already measured are kept
        with open(args.out) as f:
            results = json.load(f)
    for condition in args.conditions:
        for seed in args.seeds:
            key = f"{condition}/{args.encoder}/e{args.epochs}/k{args.steps}/{seed}"
            if key not in results:
                results[key] = run_lum_retrieval_study(seed=seed, epochs=args.epochs, condition=condition,
                                                       steps=args.steps, model=LUMConfig(encoder=args.encoder))
                with open(args.out + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
    for condition in args.conditions:
        runs = [results[f"{condition}/{args.encoder}/e{args.epochs}/k{args.steps}/{s}"] for s in args.seeds]
        first = runs[0]["conditioned"]
        print(f"\ncondition {condition}, encoder {args.encoder}: {first['events']:,} test events of "
              f"{first['users']} users with a pre-cutoff history; {len(runs)} seed(s), {args.epochs} epochs")
        print("| query | recall@10 | NDCG@10 | per-seed recall@10 |")
        print("|---|---|---|---|")
        for key, label in ROWS:
            r = [run[key]["recall@10"] for run in runs]
            n = [run[key]["ndcg@10"] for run in runs]
            per_seed = ", ".join(f"{x:.4f}" for x in r)
            print(f"| {label.format(steps=args.steps)} | {np.mean(r):.4f} | {np.mean(n):.4f} | {per_seed} |")
        mean = lambda key, m: np.mean([run[key][m] for run in runs])  # noqa: E731
        print("| comparison | recall@10 ratio | recall@10 difference [95% CI] | NDCG@10 ratio | "
              "NDCG@10 difference [95% CI] |")
        print("|---|---|---|---|---|")
        for a, b in (("conditioned", "unconditioned_prior"), ("conditioned_pooled", "unconditioned_prior"),
                     ("conditioned_pooled", "conditioned"), ("conditioned", "wrong_condition")):
            cells = [f"{a} vs {b}"]
            for metric, field in (("recall@10", "event_hit"), ("ndcg@10", "event_ndcg")):
                d, lo, hi = paired_bootstrap(runs, a, b, field, args.samples)
                cells += [f"{mean(a, metric) / max(mean(b, metric), 1e-12):.2f}x", f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"]
            print("| " + " | ".join(cells) + " |")


def paired_bootstrap(runs, a: str, b: str, field: str, samples: int, seed: int = 0):
    """Mean over seeds of (a - b) per test event, and a 95% interval from resampling users
    (every seed resampled alike)."""
    users = np.asarray(runs[0][a]["event_user"])
    ids, inverse = np.unique(users, return_inverse=True)
    count = np.bincount(inverse, minlength=len(ids)).astype(float)
    diff = np.mean([np.bincount(inverse, weights=np.asarray(r[a][field]) - np.asarray(r[b][field]),
                                minlength=len(ids)) for r in runs], axis=0)  # per user, summed over events
    weights = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=samples)
    boot = (weights @ diff) / (weights @ count)
    return float(diff.sum() / count.sum()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


if __name__ == "__main__":
    main()
