"""Pre-trains LUM (genre condition) on the events before the validation cutoff and caches
its ranker features as the side-feature set ``lum_genre``: every user's interest under
every genre, every item's LUM embedding. Then `VARIANTS=lum bash bench/content_ranking.sh`
and `bench/content_report.py --variants ids lum`.

    .venv/bin/python bench/lum_features.py --epochs 20 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.datasets import resolve_store  # noqa: E402
from torchrec_genrec.data.store import SequenceStore  # noqa: E402
from torchrec_genrec.train.lum import LUMRecipeConfig, lum_features, pretrain_lum  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="lum_genre")
    args = parser.parse_args()
    cfg = LUMRecipeConfig(condition="genre", epochs=args.epochs, seed=args.seed)
    model, seqs, history = pretrain_lum(cfg)
    out = lum_features(model, seqs, SequenceStore.open(resolve_store(cfg.dataset)), args.name)
    print(f"pre-training: {history[-1]}")
    print(f"{args.name}: interests {tuple(out['lum_interest'].shape)}, items {tuple(out['lum_item'].shape)}")


if __name__ == "__main__":
    main()
