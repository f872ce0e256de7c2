"""Ranker artifacts at fp32, fp16 and int8: quality, size and serving cost, in one run.

For each ranking run given, exports the artifact at every precision (``genrec export RUN
--precision P``), loads it with ``RankerPredictor`` and measures, against the fp32
artifact (the trained model exactly):

1. test AUC / GAUC over the run's whole test split (10,000 ratings on ML-100K), scored by
   the artifact's model, and the largest change of a test probability;
2. the embedding tables' bytes as stored (TorchRec's inference rows: int8 carries a per-row fp16
   scale and bias, rows are aligned) and the weights file's size;
3. ``RankerPredictor.score`` latency for one request of ``--candidates`` candidates from
   raw ids (median over ``--calls`` calls, the precisions interleaved call by call).

Usage::

    bash bench/ranking_ml100k.sh          # trains runs/rank_{dlrm,onetrans,hstu}_s0..2
    .venv/bin/python bench/ranker_export_bench.py --runs runs/rank_dlrm_s0 runs/rank_onetrans_s0 runs/rank_hstu_s0
    bash bench/content_ml100k.sh && bash bench/content_ranking.sh   # runs/c7_<variant>_s0..2
    .venv/bin/python bench/ranker_export_bench.py --runs runs/c7_das_s0 runs/c7_both_s0 runs/c7_lum_s0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.config import from_dict  # noqa: E402
from torchrec_genrec.data.ranking import RankingConfig, RankingData  # noqa: E402
from torchrec_genrec.data.ranking_batching import RankingDataset  # noqa: E402
from torchrec_genrec.data.splits import Split  # noqa: E402
from torchrec_genrec.inference.predictor import History  # noqa: E402
from torchrec_genrec.export import export_ranker  # noqa: E402
from torchrec_genrec.inference.ranker import RankerPredictor  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402
from torchrec_genrec.train.ranking import evaluate_ranker  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


def table_bytes(artifact: str, manifest: Dict) -> int:
    """The embedding tables' bytes as stored in the artifact: TorchRec's inference rows (int8 rows
    carry a per-row fp16 scale and bias, rows are aligned) or the fp32 weights."""
    from safetensors import safe_open

    names = {n for n, t in manifest["tables"].items() if t["precision"] == manifest["precision"]}
    total = 0
    with safe_open(os.path.join(artifact, "ranker.safetensors"), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if len(parts) >= 3 and parts[-3] in ("embeddings", "embedding_bags") and parts[-2] in names:
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["runs/rank_dlrm_s0", "runs/rank_onetrans_s0",
                                                     "runs/rank_hstu_s0"])
    parser.add_argument("--candidates", type=int, default=100, help="candidates per timed request")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per precision")
    args = parser.parse_args()
    silence_known_noise()
    torch.set_grad_enabled(False)
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            predictors, manifests = {}, {}
            for p in PRECISIONS:
                manifests[p] = export_ranker(run, os.path.join(tmp, p), precision=p)
                predictors[p] = RankerPredictor.load(os.path.join(tmp, p))
            data = RankingData.build(_store_of(run), from_dict(RankingConfig, manifests["fp32"]["task"]))
            test = RankingDataset(data, Split.TEST)
            scored = {p: evaluate_ranker(predictors[p].model.predict, test, 1024) for p in PRECISIONS}
            probs = {p: 1 / (1 + np.exp(-scored[p][1]["logit"])) for p in PRECISIONS}

            # One request from a real test event: its user's history, the first N items as candidates.
            store = data.store
            raw_items, raw_users = store.item_raw_ids(), store.user_raw_ids()
            values = np.asarray(store.action_values)
            e = int(test.events[len(test.events) // 2])
            past = np.arange(data.history_start[e], data.history_end[e])
            history = History(items=raw_items[data.item[past]].tolist(),
                              actions=values[np.asarray(store.action)[past]].tolist(),
                              timestamps=data.timestamp[past].tolist())
            candidates = raw_items[:args.candidates].tolist()
            user, ts = raw_users[data.user[e]], int(data.timestamp[e])
            times = {p: [] for p in PRECISIONS}
            for i in range(args.calls + 10):
                for p in PRECISIONS:
                    start = time.perf_counter()
                    predictors[p].score(user, history, candidates, ts)
                    if i >= 10:
                        times[p].append(time.perf_counter() - start)
            name = manifests["fp32"]["model"]["name"]
            print(f"\n{run} ({name}; test {len(test.events):,} ratings; {len(past)} history events, "
                  f"{args.candidates} candidates per request, median of {args.calls} interleaved calls)")
            print("| precision | test AUC | test GAUC | max |prob - fp32| | tables | vs fp32 | weights file "
                  "| vs fp32 | score p50 | vs fp32 |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            base_tables = table_bytes(os.path.join(tmp, "fp32"), manifests["fp32"])
            base_file = manifests["fp32"]["files"]["ranker.safetensors"]["bytes"]
            base_time = float(np.median(times["fp32"]))
            for p in PRECISIONS:
                m = scored[p][0]
                tables = table_bytes(os.path.join(tmp, p), manifests[p])
                size = manifests[p]["files"]["ranker.safetensors"]["bytes"]
                t = float(np.median(times[p]))
                print(f"| {p} | {m['auc']:.5f} | {m['gauc']:.5f} | {np.abs(probs[p] - probs['fp32']).max():.5f} "
                      f"| {tables / 2**10:,.0f} KiB | {tables / base_tables:.2f}x | {size / 2**10:,.0f} KiB "
                      f"| {size / base_file:.2f}x | {t * 1e3:.2f} ms | {t / base_time:.2f}x |")
    return 0


def _store_of(run: str) -> str:
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)["dataset"]["path"]


if __name__ == "__main__":
    raise SystemExit(main())
