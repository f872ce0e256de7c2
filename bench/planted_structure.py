"""HSTU and SASRec against the Bayes-optimal ranker on data with planted sequential structure.

The synthetic generator (:mod:`torchrec_genrec.data.synthetic`) plants two signals:
a taste cluster per user (most non-Markov events come from it) and a sparse Markov chain
over items (with probability ``p_markov`` the next item is one of the previous item's
three successors). Given a user's item history, the Bayes posterior predictive of the
next item is exact (:meth:`SyntheticWorld.posterior_next_item_distribution`), so ranking
by it is the best any model can do from the history. This script

1. generates the data and prepares its sequence store,
2. ranks every test user's held-out item by the posterior under exactly the protocol the
   models are evaluated with (leave-one-out by time, full ranking, the user's other seen
   items removed): the **oracle**. A second, unreachable bound ranks by the generator's
   own distribution, which knows the user's latent cluster,
3. trains HSTU and SASRec through ``genrec train`` (the README's recipe, one process each)
   at several depths and maximum sequence lengths, and
4. prints HR@10 / NDCG@10 of each run and HR@10 as a fraction of the oracle's, side by
   side, plus paired-bootstrap intervals for HSTU - SASRec at equal settings.

Runs are cached in ``--out`` (a finished run is not trained again), so an interrupted
sweep resumes.

Usage::

    .venv/bin/python bench/planted_structure.py                       # the default sweep
    .venv/bin/python bench/planted_structure.py --depths 2 --lengths 64 --models hstu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.splits import LeaveOneOut, Split  # noqa: E402
from torchrec_genrec.data.store import SequenceStore, write_store  # noqa: E402
from torchrec_genrec.data.synthetic import SyntheticConfig, SyntheticWorld, generate  # noqa: E402
from torchrec_genrec.train.metrics import metrics_from_ranks, paired_bootstrap, rank_of_targets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"hstu": os.path.join(ROOT, "apps", "configs", "hstu_ml100k.toml"),
           "sasrec": os.path.join(ROOT, "apps", "configs", "sasrec_ml100k.toml")}


def world_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(num_users=args.users, num_items=args.items, num_events=args.events,
                           item_zipf=args.zipf, num_clusters=args.clusters, p_cluster=args.p_cluster,
                           p_markov=args.p_markov, min_seq_len=5, seed=args.seed)


def prepare(config: SyntheticConfig, out: str) -> str:
    store_dir = os.path.join(out, "store")
    if not os.path.exists(os.path.join(store_dir, "manifest.json")):
        write_store(generate(config), store_dir, {"dataset": "planted-synthetic", "synthetic": repr(config)})
    return store_dir


def oracle_ranks(world: SyntheticWorld, store: SequenceStore) -> Tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Test-event ranks of the Bayes posterior and of the cluster-knowing generator.

    Returns:
        ``(users, posterior_ranks, generator_ranks)``: dense user ids in the order the
        evaluation writes them (``test_ranks.npz``), and two int64 ``(M,)`` rank tensors.
    """
    users, start, end, target = LeaveOneOut(1).bounds(store, Split.TEST)
    item_raw = np.asarray(store.item_raw_ids())
    user_raw = np.asarray(store.user_raw_ids())
    items = np.asarray(store.item)
    posterior = np.empty((len(users), len(item_raw)), dtype=np.float32)
    generator = np.empty_like(posterior)
    for row, (u, s, e) in enumerate(zip(users, start, end)):
        history = item_raw[items[s:e]]  # from the user's first event: the posterior needs all of it
        posterior[row] = world.posterior_next_item_distribution(history)[item_raw]
        generator[row] = world.next_item_distribution(int(history[-1]), int(user_raw[u]))[item_raw]
    lengths = torch.as_tensor(end - start)
    seen_offsets = torch.zeros(len(users) + 1, dtype=torch.int64)
    seen_offsets[1:] = torch.cumsum(lengths, 0)
    seen = torch.as_tensor(np.concatenate([items[s:e] for s, e in zip(start, end)]).astype(np.int64))
    targets = torch.as_tensor(items[target].astype(np.int64))
    rank = lambda scores: rank_of_targets(torch.as_tensor(scores), targets, seen, seen_offsets)  # noqa: E731
    return users, rank(posterior), rank(generator)


def train(model: str, store_dir: str, out: str, depth: int, max_len: int, args: argparse.Namespace) -> Dict:
    """Runs ``genrec train`` for one cell of the sweep (or reads its cached result)."""
    run_dir = os.path.join(out, "runs", f"{model}_d{depth}_l{max_len}_s{args.train_seed}{args.tag}")
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(metrics_path):
        overrides = [f"data.dataset={store_dir}", f"data.max_seq_len={max_len}", "data.holdout=1",
                     f"model.num_blocks={depth}", f"model.embedding_dim={args.dim}",
                     f"train.epochs={args.epochs}", f"train.seed={args.train_seed}",
                     f"train.output_dir={run_dir}", "train.progress=false", "train.checkpoint=false",
                     "train.tensorboard=false", "model.action_loss_weight=0.0", *args.set]
        command = [os.path.join(os.path.dirname(sys.executable), "genrec"), "train", "--config", RECIPES[model]]
        for o in overrides:
            command += ["--set", o]
        start = time.perf_counter()
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "train.log"), "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  trained {model} depth={depth} max_len={max_len} in {time.perf_counter() - start:.0f} s",
              flush=True)
    with open(metrics_path) as f:
        result = json.load(f)
    ranks = np.load(os.path.join(run_dir, "test_ranks.npz"))
    result["_users"], result["_ranks"] = ranks["user"], torch.as_tensor(ranks["rank"])
    return result


def _per_user_ndcg10(ranks: torch.Tensor) -> torch.Tensor:
    return torch.where(ranks < 10, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "planted"))
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=180_000)
    parser.add_argument("--zipf", type=float, default=0.8)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--p-cluster", type=float, default=0.5)
    parser.add_argument("--p-markov", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--models", default="hstu,sasrec")
    parser.add_argument("--dim", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--depths", default="1,2,4,8", help="layers, at --base-length")
    parser.add_argument("--lengths", default="8,16,32,64,128", help="max sequence lengths, at --base-depth")
    parser.add_argument("--base-depth", type=int, default=2)
    parser.add_argument("--base-length", type=int, default=64)
    parser.add_argument("--set", action="append", default=[],
                        help="a recipe override for every run, e.g. model.loss=full_softmax (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the run directories (runs of other --set)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    config = world_config(args)
    world = SyntheticWorld(config)
    store_dir = prepare(config, args.out)
    store = SequenceStore.open(store_dir)
    users, posterior, generator = oracle_ranks(world, store)
    oracle = {k: float(v.double().mean()) for k, v in metrics_from_ranks(posterior, (10,)).items()}
    bound = {k: float(v.double().mean()) for k, v in metrics_from_ranks(generator, (10,)).items()}
    print(f"planted data: {store.num_users} users, {store.num_items} items, {store.num_events} events "
          f"(mean length {store.num_events / store.num_users:.0f}); {config.num_clusters} clusters, "
          f"p_cluster {config.p_cluster}, p_markov {config.p_markov}")
    print(f"Bayes-optimal ranker (history only): HR@10 {oracle['hr@10']:.4f} NDCG@10 {oracle['ndcg@10']:.4f}")
    print(f"generator (knows the cluster):       HR@10 {bound['hr@10']:.4f} NDCG@10 {bound['ndcg@10']:.4f}")

    models = [m for m in args.models.split(",") if m]
    cells = [(d, args.base_length) for d in map(int, args.depths.split(","))]
    cells += [(args.base_depth, n) for n in map(int, args.lengths.split(",")) if (args.base_depth, n) not in cells]
    results: Dict[Tuple[str, int, int], Dict] = {}
    for depth, max_len in cells:
        for model in models:
            r = train(model, store_dir, args.out, depth, max_len, args)
            if not np.array_equal(r["_users"], users):
                raise RuntimeError(f"{model} d={depth} l={max_len}: test users differ from the oracle's")
            results[(model, depth, max_len)] = r

    def table(title: str, key: str, values: List[int]) -> None:
        print(f"\n{title}")
        head = f"| {key:>7} |" + "".join(f" {m} HR@10 | {m} NDCG@10 | {m} / oracle |" for m in models)
        if len(models) == 2:
            head += " NDCG@10 diff [95% CI] |"
        print(head)
        print("|" + "---|" * (1 + 3 * len(models) + (len(models) == 2)))
        for v in values:
            cell = (v, args.base_length) if key == "depth" else (args.base_depth, v)
            row = f"| {v:>7} |"
            for m in models:
                test = results[(m, *cell)]["metrics"]["test"]
                row += f" {test['hr@10']:.4f} | {test['ndcg@10']:.4f} | {test['hr@10'] / oracle['hr@10']:.2f} |"
            if len(models) == 2:
                a, b = (_per_user_ndcg10(results[(m, *cell)]["_ranks"]) for m in models)
                diff, lo, hi = paired_bootstrap(a, b)
                row += f" {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] |"
            print(row)

    table(f"Depth (max length {args.base_length}); oracle HR@10 {oracle['hr@10']:.4f}", "depth",
          [d for d, n in cells if n == args.base_length and (d, n) in [(x, args.base_length) for x in
                                                                        map(int, args.depths.split(","))]])
    table(f"Max sequence length (depth {args.base_depth}); oracle HR@10 {oracle['hr@10']:.4f}", "max_len",
          [int(n) for n in args.lengths.split(",")])
    summary = {f"{m}_d{d}_l{n}": {"test": r["metrics"]["test"], "train_seconds": r["training"]["train_seconds"],
                                  "best_epoch": r["training"]["best_epoch"]}
               for (m, d, n), r in results.items()}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"world": repr(config), "oracle": oracle, "generator_bound": bound, "runs": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
