"""Pre-trains LUM on the events before the validation cutoff, once per seed, and caches its
ranker features as the side-feature sets ``lum_<condition>_s<seed>``: every user's interest
under every condition value, its top-k items per value, every item's LUM embedding. The
ranker reads the interest under the target's genre, or under the request's hour bucket /
weekday for a set pre-trained on those.
Then `SEEDS="0 1 2" VARIANTS="ids lum" bash bench/content_ranking.sh` (the ranker of seed s
reads the LUM of seed s) and `bench/content_report.py --variants ids lum`.

    .venv/bin/python bench/lum_features.py --epochs 20 --seeds 0 1 2
    .venv/bin/python bench/lum_features.py --condition hour     # then VARIANTS=lum_hour
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.datasets import resolve_store  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.modules.lum import LUMConfig  # noqa: E402
from torchrec_genrec.train.lum import LUMRecipeConfig, lum_features, pretrain_lum  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1, help="generated items pooled into each interest")
    parser.add_argument("--condition", default="genre", help="genre (the target's) or hour / weekday (the request's)")
    parser.add_argument("--encoder", choices=["transformer", "hstu"], default="transformer")
    parser.add_argument("--name", default="", help="sets are <name>_s<seed> (default lum_<condition>)")
    args = parser.parse_args()
    for seed in args.seeds:
        name = f"{args.name or 'lum_' + args.condition}_s{seed}"
        cfg = LUMRecipeConfig(condition=args.condition, epochs=args.epochs, seed=seed, output_dir=f"runs/{name}",
                              model=LUMConfig(encoder=args.encoder))
        model, seqs, history = pretrain_lum(cfg)
        out = lum_features(model, seqs, SequenceStore.open(resolve_store(cfg.dataset)), name, steps=args.steps)
        print(f"{name}: pre-training {history[-1]}; interests {tuple(out['lum_interest'].shape)}, "
              f"items {tuple(out['lum_item'].shape)}")


if __name__ == "__main__":
    main()
