"""Retrieval training objectives side by side, under both seen-item protocols.

Trains a recipe (default: HSTU on ML-100K) once per objective and seed through
``genrec train`` and reads each run's test metrics under both protocols (seen items
removed from the ranking, the papers' protocol; and ranked too, RecBole's), which one
evaluation produces. Prints, per objective, NDCG@10 / HR@10 averaged over the seeds under
each protocol, the ratio of the two protocols, and the paired-bootstrap difference to the
first objective (per-user metrics averaged over the seeds, users resampled).

Runs are cached under ``--out`` (a finished run is not trained again).

Usage::

    .venv/bin/python bench/retrieval_objectives.py                          # HSTU, 4 objectives, seeds 0-2
    .venv/bin/python bench/retrieval_objectives.py --config apps/configs/sasrec_ml100k.toml --out runs/obj_sasrec
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.train.metrics import paired_bootstrap  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = {
    "sampled uniform": ["model.loss=sampled_softmax", "model.negatives=uniform"],
    "sampled in-batch logQ": ["model.loss=sampled_softmax", "model.negatives=in_batch", "model.logq_correction=true"],
    "sampled mixed logQ": ["model.loss=sampled_softmax", "model.negatives=mixed", "model.logq_correction=true"],
    "full softmax": ["model.loss=full_softmax"],
}


def run(config: str, out: str, name: str, seed: int, extra: List[str]) -> str:
    run_dir = os.path.join(out, f"{name.replace(' ', '_')}_s{seed}")
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
        command = [os.path.join(os.path.dirname(sys.executable), "genrec"), "train", "--config", config]
        for o in [*OBJECTIVES[name], *extra, f"train.seed={seed}", f"train.output_dir={run_dir}",
                  "train.progress=false", "train.resume=never"]:
            command += ["--set", o]
        os.makedirs(run_dir, exist_ok=True)
        start = time.perf_counter()
        with open(os.path.join(run_dir + ".log"), "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  trained {name} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def ndcg10(ranks: np.ndarray) -> torch.Tensor:
    r = torch.as_tensor(ranks, dtype=torch.float64)
    return torch.where(r < 10, 1.0 / torch.log2(r + 2.0), torch.zeros((), dtype=torch.float64))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "apps", "configs", "hstu_ml100k.toml"))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "objectives"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="names, comma-separated")
    parser.add_argument("--set", action="append", default=[], help="an override for every run")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    asked = {n.strip() for n in args.objectives.split(",") if n.strip()}
    unknown = asked - set(OBJECTIVES)
    if unknown:
        parser.error(f"unknown objectives {sorted(unknown)}; known: {list(OBJECTIVES)}")
    names = [n for n in OBJECTIVES if n in asked]  # in the table's order
    rows: Dict[str, Dict] = {}
    for name in names:
        per_seed = []
        for seed in seeds:
            d = run(args.config, args.out, name, seed, args.set)
            m = json.load(open(os.path.join(d, "metrics.json")))
            ranks = np.load(os.path.join(d, "test_ranks.npz"))
            excluded = bool(ranks["exclude_seen"])
            per_seed.append({
                "excl": ndcg10(ranks["rank"] if excluded else ranks["rank_other_protocol"]),
                "kept": ndcg10(ranks["rank_other_protocol"] if excluded else ranks["rank"]),
                "hr_excl": m["metrics"]["test"]["hr@10"] if excluded else m["metrics"]["test"]["seen_excluded"]["hr@10"],
                "hr_kept": m["metrics"]["test"]["seen_kept"]["hr@10"] if excluded else m["metrics"]["test"]["hr@10"],
                "valid": m["metrics"].get("valid", {}).get("ndcg@10"),
                "seconds": m["training"]["train_seconds"], "epochs": m["training"]["epochs_run"]})
        rows[name] = {
            "excl": torch.stack([s["excl"] for s in per_seed]).mean(0),
            "kept": torch.stack([s["kept"] for s in per_seed]).mean(0),
            "excl_seeds": [float(s["excl"].mean()) for s in per_seed],
            "kept_seeds": [float(s["kept"].mean()) for s in per_seed],
            "hr_excl": float(np.mean([s["hr_excl"] for s in per_seed])),
            "hr_kept": float(np.mean([s["hr_kept"] for s in per_seed])),
            "valid": float(np.mean([s["valid"] for s in per_seed if s["valid"] is not None] or [float("nan")])),
            "seconds": float(np.mean([s["seconds"] for s in per_seed])),
            "epochs": float(np.mean([s["epochs"] for s in per_seed]))}
    base = names[0]
    print(f"\n{args.config}, seeds {seeds}: test NDCG@10 / HR@10 (mean over seeds; ± is the seeds' sd), "
          f"validation NDCG@10 (what selection sees), and the paired difference to '{base}' "
          "(per-user NDCG@10 averaged over seeds, 10,000 user resamples)\n")
    print("| objective | valid NDCG@10 | NDCG@10, seen removed | HR@10 | NDCG@10, seen ranked | HR@10 | ranked / removed "
          f"| vs {base}: removed [95% CI] | ranked [95% CI] | train s | epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = []
        for protocol in ("excl", "kept"):
            if name == base:
                cells.append("—")
            else:
                diff, lo, hi = paired_bootstrap(r[protocol], rows[base][protocol], 10000, 0)
                cells.append(f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}] ({r[protocol].mean() / rows[base][protocol].mean():.2f}x)")
        print(f"| {name} | {r['valid']:.4f} | {r['excl'].mean():.4f} ± {np.std(r['excl_seeds']):.4f} | "
              f"{r['hr_excl']:.4f} | {r['kept'].mean():.4f} ± {np.std(r['kept_seeds']):.4f} | {r['hr_kept']:.4f} | "
              f"{r['kept'].mean() / r['excl'].mean():.2f} | {cells[0]} | {cells[1]} | {r['seconds']:.0f} | "
              f"{r['epochs']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
