"""Pre-trains LUM on the events before the validation cutoff, once per seed, and caches its
ranker features as the side-feature sets ``lum_<condition>_s<seed>``: every user's interest
under every condition value, its top-k items per value, every item's LUM embedding. The
ranker reads the interest under the target's genre, or under the request's hour bucket /
weekday for a set pre-trained on those.
Then `SEEDS="0 1 2" VARIANTS="ids lum" bash bench/content_ranking.sh` (the ranker of seed s
reads the LUM of seed s) and `bench/content_report.py --variants ids lum`.

    .venv/bin/python bench/lum_features.py --epochs 20 --seeds 0 1 2
    .venv/bin/python bench/lum_features.py --condition hour     # then VARIANTS=lum_hour
    # point-in-time training features from the same LUMs: then VARIANTS=lum_pit
    .venv/bin/python bench/lum_features.py --from-runs lum_genre --point-in-time --name lum_genre_pit
    # cross-fitted: every user's (and every training event's) vectors from a LUM that never
    # trained on that user: then VARIANTS=lum_xfit
    .venv/bin/python bench/lum_features.py --folds 2 --point-in-time --name lum_genre_xfit
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.datasets import resolve_store  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.config import load_config  # noqa: E402
from torchrec_genrec.train.lum import LUMRecipeConfig, load_lum, lum_features, pretrain_lum  # noqa: E402


def _recipe(args, seed: int, output_dir: str, **data) -> LUMRecipeConfig:
    """The shipped recipe (apps/configs/lum_ml100k.toml) with this run's settings."""
    settings = [f"data.condition={args.condition}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                f"train.output_dir={output_dir}", f"model.encoder={args.encoder}",
                *(f"data.{k}={v}" for k, v in data.items())]
    return load_config(LUMRecipeConfig, "apps/configs/lum_ml100k.toml", settings).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1, help="generated items pooled into each interest")
    parser.add_argument("--condition", default="genre", help="genre (the target's) or hour / weekday (the request's)")
    parser.add_argument("--encoder", choices=["transformer", "hstu"], default="transformer")
    parser.add_argument("--name", default="", help="sets are <name>_s<seed> (default lum_<condition>)")
    parser.add_argument("--point-in-time", action="store_true",
                        help="also cache each pre-cutoff event's interest from the events before it (the ranker's "
                             "training samples read those)")
    parser.add_argument("--from-runs", default="", help="read the LUM of runs/<PREFIX>_s<seed> instead of training")
    parser.add_argument("--folds", type=int, default=1,
                        help="cross-fit: pre-train this many LUMs, each without one fold of users, and give each user "
                             "the vectors of the LUM that never trained on it (runs/<name>_f<k>)")
    args = parser.parse_args()
    for seed in args.seeds:
        name = f"{args.name or 'lum_' + args.condition}_s{seed}"
        if args.from_runs:
            model, seqs, cfg = load_lum(f"runs/{args.from_runs}_s{seed}")
            trained = f"read runs/{args.from_runs}_s{seed}"
        elif args.folds > 1:
            model = []
            for k in range(args.folds):
                cfg = _recipe(args, seed, f"runs/{name}_f{k}", folds=args.folds, holdout_fold=k)
                fold_model, seqs, history = pretrain_lum(cfg)
                model.append(fold_model)
            trained = f"{args.folds} cross-fitted LUMs, the last {history[-1]}"
        else:
            cfg = _recipe(args, seed, f"runs/{name}")
            model, seqs, history = pretrain_lum(cfg)
            trained = f"pre-training {history[-1]}"
        start = time.perf_counter()
        out = lum_features(model, seqs, SequenceStore.open(resolve_store(cfg.data.dataset)), name, steps=args.steps,
                           event_history=cfg.data.max_events if args.point_in_time else None)
        events = f", events {tuple(out['lum_event_interest'].shape)}" if "lum_event" in out else ""
        print(f"{name}: {trained}; interests {tuple(out['lum_interest'].shape)}{events}, "
              f"items {tuple(out['lum_item'].shape)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
