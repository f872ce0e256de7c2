"""Embedding lookup + update throughput: a sharded TorchRec EmbeddingCollection on 2 ranks
and on 1 rank, against a plain ``nn.Embedding`` of the same size.

Each step looks up ``--ids`` ids per rank (Zipf-distributed over ``--rows`` rows, as real
item ids are), takes a loss on the returned vectors and backpropagates, which updates the
looked-up rows:

- ``EC, N ranks``: an ``EmbeddingCollection`` planned row-wise by the project's planner
  (``plans``) under ``DistributedModelParallel``, fused row-wise Adagrad (the update runs
  inside the backward), gloo all-to-alls between ranks;
- ``nn.Embedding``: ``sparse=True`` with ``torch.optim.Adagrad`` (PyTorch's sparse path),
  one process.

Figures: rows looked up and updated per second (all ranks together), and each as a ratio
of the plain baseline. Ranks share this machine's cores (``--threads`` per process in
total), so the 2-rank figure measures the sharding machinery, not extra hardware.

Usage::

    .venv/bin/python bench/sharding_bench.py [--rows 1000000] [--dim 64] [--ids 8192] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def zipf_ids(rows: int, n: int, seed: int, exponent: float = 1.05) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights) / weights.sum()
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), rows - 1)
    return torch.from_numpy(rng.permutation(rows)[ranks])  # popularity spread over ids


def _ec_worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: Dict) -> None:
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from torchrec_genrec.logging_utils import silence_known_noise
    from torchrec_genrec.plans.planner import make_sharders, plan_tables
    from torchrec_genrec.plans.spec import TableSpec
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    silence_known_noise()
    torch.set_num_threads(max(args.threads // world, 1))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    spec = TableSpec("t", args.rows, args.dim, ("f",), sharding_types=("row_wise",), ids_per_sample=1.0)
    module = torch.nn.Module()
    module.ec = EmbeddingCollection(tables=[EmbeddingConfig(name="t", num_embeddings=args.rows, embedding_dim=args.dim,
                                                            feature_names=["f"])], device=torch.device("meta"))
    sharders = make_sharders(learning_rate=0.05)
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=world),
                                               kernel_config=KernelConfig(compute_device="cpu"))
    report = plan_tables([spec], topology, args.ids, sharders=sharders, module=module,
                         process_group=dist.group.WORLD)
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=report.plan, sharders=sharders)
    batches = [zipf_ids(args.rows, args.ids, seed=1000 * step + rank) for step in range(args.steps + 2)]
    lengths = torch.ones(args.ids, dtype=torch.int32)
    for step, ids in enumerate(batches):
        if step == 2:
            dist.barrier()
            start = time.perf_counter()
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)
        values = dmp.module.ec(kjt)["f"].values()
        values.pow(2).sum().backward()
    dist.barrier()
    if rank == 0:
        out["seconds"] = time.perf_counter() - start
    dist.destroy_process_group()


def bench_ec(world: int, args: argparse.Namespace) -> float:
    """Rows/s of the sharded EmbeddingCollection on ``world`` ranks (all ranks together)."""
    fd, init_file = tempfile.mkstemp(prefix="sharding-bench-")
    os.close(fd)
    os.unlink(init_file)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ec_worker, args=(world, init_file, args, out), nprocs=world, start_method="spawn")
        seconds = out["seconds"]
    return world * args.ids * args.steps / seconds


def bench_plain(args: argparse.Namespace) -> float:
    torch.set_num_threads(args.threads)
    table = torch.nn.Embedding(args.rows, args.dim, sparse=True)
    optimizer = torch.optim.Adagrad(table.parameters(), lr=0.05)
    batches = [zipf_ids(args.rows, args.ids, seed=1000 * step) for step in range(args.steps + 2)]
    for step, ids in enumerate(batches):
        if step == 2:
            start = time.perf_counter()
        optimizer.zero_grad()
        table(ids).pow(2).sum().backward()
        optimizer.step()
    return args.ids * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ids", type=int, default=8192, help="ids per rank per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in total")
    args = parser.parse_args()
    print(f"table {args.rows:,} x {args.dim} fp32 ({args.rows * args.dim * 4 / 2**20:,.0f} MiB), "
          f"{args.ids:,} Zipf ids per rank per step, {args.steps} timed steps, {args.threads} threads in total")
    rates = {"nn.Embedding (sparse, Adagrad)": bench_plain(args),
             "EC row-wise, 1 rank": bench_ec(1, args),
             "EC row-wise, 2 ranks": bench_ec(2, args)}
    base = rates["nn.Embedding (sparse, Adagrad)"]
    print(f"{'variant':<32} {'rows/s':>12} {'vs nn.Embedding':>16}")
    for name, rate in rates.items():
        print(f"{name:<32} {rate:12,.0f} {rate / base:15.2f}x")
    print(f"2 ranks / 1 rank: {rates['EC row-wise, 2 ranks'] / rates['EC row-wise, 1 rank']:.2f}x")


if __name__ == "__main__":
    main()
