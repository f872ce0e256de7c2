"""The train-time skew of the ranker's LUM feature, per-user cache vs point-in-time.

The ranker's ``lum_similarity`` feature is the cosine between the user's LUM interest
(under the target's condition) and the target's LUM item embedding. With the per-user
cache, a training sample's interest comes from the user's whole pre-cutoff history — the
sample's own event and later ones included — while a validation / test sample (and every
served request) only has the past. Point-in-time interests (``genrec lum features
--point-in-time``) give each training sample the interest of its own moment.

For each split, in one run: the share of samples whose user has a history to read an
interest from (without one the interest is zeros), the mean cosine over all samples and
over those with a history, and how well the cosine alone orders the labels (AUC, GAUC: the
feature as a one-feature ranker), for the training samples under both caches and for the
validation / test samples.

    .venv/bin/python bench/lum_features.py --from-runs lum_genre --point-in-time --name lum_genre_pit
    .venv/bin/python bench/lum_skew.py --sets lum_genre_pit_s0 lum_genre_pit_s1 lum_genre_pit_s2
    .venv/bin/python bench/lum_skew.py --sets lum_genre_xfit_s0 lum_genre_xfit_s1 lum_genre_xfit_s2  # cross-fitted
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.content import load_side_features  # noqa: E402
from torchrec_genrec.data.datasets import resolve_store  # noqa: E402
from torchrec_genrec.data.ranking import RankingConfig, RankingData  # noqa: E402
from torchrec_genrec.data.splits import Split  # noqa: E402
from torchrec_genrec.train.ranking_metrics import ranking_metrics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--sets", nargs="+", default=["lum_genre_pit_s0", "lum_genre_pit_s1", "lum_genre_pit_s2"],
                        help="LUM side-feature sets with point-in-time interests, of item conditions")
    args = parser.parse_args()
    path = resolve_store(args.dataset)
    data = RankingData.build(path, RankingConfig())
    rows = []
    for name in args.sets:
        s = load_side_features(path, name)
        if "lum_event" not in s:
            raise SystemExit(f"{name} has no point-in-time interests: build it with --point-in-time")
        if int(s["lum_item_condition"].min()) < 0:
            raise SystemExit(f"{name} is of an event condition; this bench reads item conditions (genre)")
        conditions = int(s.meta["conditions"])
        items = F.normalize(s["lum_item"], dim=-1)
        events, event_interest = s["lum_event"].numpy(), F.normalize(s["lum_event_interest"], dim=-1)
        user_interest = F.normalize(s["lum_interest"], dim=-1)

        # Cross-fitted sets hold one item table per fold: a user's rows come from its fold's LUM.
        fold = s["lum_user_fold"] if "lum_user_fold" in s else torch.zeros(data.store.num_users, dtype=torch.int64)

        def cosine(samples: np.ndarray, point_in_time: bool) -> torch.Tensor:
            target = torch.from_numpy(data.item[samples])
            item_rows = fold[torch.from_numpy(data.user[samples])] * data.store.num_items + target
            if point_in_time:
                at = np.searchsorted(events, samples)
                if not (events[np.minimum(at, len(events) - 1)] == samples).all():
                    raise SystemExit(f"{name}: a training sample has no point-in-time interest")
                interest = event_interest[torch.from_numpy(at)]
            else:
                user = torch.from_numpy(data.user[samples])
                interest = user_interest[user * conditions + s["lum_item_condition"][target]]
            return (interest * items[item_rows]).sum(-1), interest.norm(dim=-1) > 0

        for split, point_in_time in ((Split.TRAIN, False), (Split.TRAIN, True), (Split.VALID, False),
                                     (Split.TEST, False)):
            samples = data.samples(split)
            cos, known = cosine(samples, point_in_time)
            m = ranking_metrics(cos * 10.0, torch.from_numpy(data.label[samples]).float(),
                                torch.from_numpy(data.user[samples]))
            label = f"{split.value} ({'point in time' if point_in_time else 'per-user cache'})"
            rows.append((name, label, float(known.float().mean()), float(cos.mean()), float(cos[known].mean()),
                         m["auc"], m["gauc"]))
    print("| set | samples (interest from) | with a history | mean cosine(interest, target) | ... where there is "
          "a history | AUC of the cosine | GAUC of the cosine |")
    print("|---|---|---|---|---|---|---|")
    for name, label, share, mean, mean_known, auc, gauc in rows:
        print(f"| {name} | {label} | {share:.3f} | {mean:.4f} | {mean_known:.4f} | {auc:.4f} | {gauc:.4f} |")
    print("\nmeans over sets:")
    for label in dict.fromkeys(r[1] for r in rows):
        chosen = np.asarray([r[2:] for r in rows if r[1] == label]).mean(0)
        print(f"  {label:<32} with a history {chosen[0]:.3f}  cosine {chosen[1]:.4f} ({chosen[2]:.4f} where there is "
              f"one)  AUC {chosen[3]:.4f}  GAUC {chosen[4]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
