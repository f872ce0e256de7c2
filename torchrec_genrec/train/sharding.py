"""Placing a model's tables: plan them on the job's ranks, wrap the model in
``DistributedModelParallel``, seed the tables independently of the plan, write
precomputed rows into frozen tables, and build the optimisers.

The model is wrapped in ``DistributedModelParallel`` even on one process: its tables are
materialised and sharded by the planner and updated by a fused sparse optimiser inside
the backward pass; the dense part uses a dense optimiser (AdamW by default).

Sparse optimiser on CPU: fbgemm fuses only (row-wise) Adagrad and SGD there — Adam
fails ("Optimizer adam is not supported in CPU mode") — so the CPU default is exact
row-wise Adagrad; on CUDA ``adam`` matches the paper's all-Adam(W) setup.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_genrec.config import ConfigError
from torchrec_genrec.ops.random import hash32, keyed_truncated_normal
from torchrec_genrec.plans.planner import make_sharders, plan_tables
from torchrec_genrec.plans.spec import TableSpec, parse_pins
from torchrec_genrec.train.distributed import DistContext

logger = logging.getLogger(__name__)

__all__ = ["OptimConfig", "build_optimizer", "full_state_dict", "seed_embedding_tables", "shard", "sharding_pins",
           "write_table_rows"]

_SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
}


@dataclasses.dataclass
class OptimConfig:
    """Args:
    dense (str): optimiser of the dense parameters: ``adamw`` or ``adam``.
    lr (float): its learning rate.
    betas (Tuple[float, ...]): its betas.
    weight_decay (float): its weight decay (decoupled for AdamW, L2 for Adam).
    sparse_optimizer (str): fused optimiser of the embedding tables: ``rowwise_adagrad``,
        ``adagrad``, ``sgd`` (CPU and CUDA) or ``adam`` (CUDA only).
    sparse_lr (float): its learning rate.
    """

    dense: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-3
    betas: Tuple[float, ...] = (0.9, 0.98)
    weight_decay: float = 0.0
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05

    def validate(self, prefix: str = "train.optim") -> "OptimConfig":
        if self.lr <= 0 or self.sparse_lr < 0:
            raise ConfigError(f"{prefix}.lr must be > 0 and {prefix}.sparse_lr >= 0 (got {self.lr}, {self.sparse_lr})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        return self


def shard(model: nn.Module, ctx: DistContext, optim: OptimConfig, batch_size: int,
          pins: Sequence[str] = (), seed: Optional[int] = None,
          specs: Optional[Sequence[TableSpec]] = None) -> DistributedModelParallel:
    """Plans the model's tables (``model.table_specs()``, see ``plans``) on the job's ranks
    and wraps the model in DistributedModelParallel.

    Args:
        pins (Sequence[str]): manual plan, ``TABLE:SHARDING_TYPE[:KERNEL]`` per table.
        seed (Optional[int]): initialise the tables from this seed, the same whatever the
            plan (see :func:`seed_embedding_tables`); default ``model.seed``.
        specs (Optional[Sequence[TableSpec]]): the model's table declarations; default
            ``model.table_specs()``.
    """
    if optim.sparse_optimizer == "adam" and ctx.device.type != "cuda":
        raise ConfigError("train.optim.sparse_optimizer = 'adam' needs CUDA: fbgemm fuses only Adagrad, row-wise "
                         "Adagrad and SGD on CPU. Use 'rowwise_adagrad' (the CPU default).")
    sharders = make_sharders(_SPARSE_OPTIMIZERS[optim.sparse_optimizer], optim.sparse_lr)
    world, local = ctx.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    # The device's real memory, not TorchRec's default cap, so the plan is the one that fits.
    hbm = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda" else None
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=local,
                                                             hbm_cap_bytes=hbm),
                                               kernel_config=KernelConfig(compute_device=ctx.device.type))
    report = plan_tables(list(specs) if specs is not None else model.table_specs(), topology, batch_size, sharders=sharders, pins=parse_pins(pins),
                         module=model, process_group=dist.group.WORLD)
    if ctx.is_main:
        for t in report.tables:
            logger.info("table %s: %s on ranks %s, shards %s", t.name, t.sharding_type, t.ranks or "all",
                        t.shard_shapes)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=ctx.device, plan=report.plan,
        sharders=sharders,
    )
    seed_embedding_tables(dmp, model.seed if seed is None else seed)
    frozen = getattr(model, "frozen_table_weights", None)
    for table, weight in (frozen() if callable(frozen) else {}).items():
        write_table_rows(dmp, table, weight)
    return dmp


def _local_table_blocks(dmp: DistributedModelParallel):
    """Yields ``(table, block, row0, col0, full_shape)`` for every embedding-table weight
    this rank holds: each local shard of a sharded table (its offsets from the shard
    metadata), or the whole weight of a data-parallel (replicated) table."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in dmp.state_dict().items():
        parts = key.split(".")
        sharded = isinstance(value, ShardedTensor)
        replicated = (not sharded and len(parts) >= 3 and parts[-3] in ("embeddings", "embedding_bags")
                      and value.dim() == 2)
        if not (key.endswith(".weight") and (sharded or replicated)):
            continue
        if replicated:
            yield parts[-2], value, 0, 0, tuple(value.shape)
            continue
        for shard in value.local_shards():
            row0, col0 = shard.metadata.shard_offsets
            yield parts[-2], shard.tensor, row0, col0, tuple(value.size())


def sharding_pins(dmp: DistributedModelParallel) -> List[str]:
    """The plan ``dmp`` runs as pins, ``TABLE:SHARDING_TYPE:COMPUTE_KERNEL`` per table: what
    a checkpoint records so a resume on another world size keeps each table's sharding type
    and kernel (a data-parallel table trains with the dense optimiser, a fused one with the
    fused optimiser: their optimiser states do not load into each other)."""
    return sorted(f"{table}:{sharding.sharding_type}:{sharding.compute_kernel}"
                  for module_plan in dmp.plan.plan.values() for table, sharding in module_plan.items())


def write_table_rows(dmp: DistributedModelParallel, table: str, weight: torch.Tensor) -> int:
    """Copies ``weight`` ``(rows, cols)`` into table ``table`` of a sharded model, each rank
    writing its own shards (or the whole table where it is replicated): how precomputed
    vectors reach a frozen table. Returns the elements this rank wrote."""
    written, found = 0, False
    with torch.no_grad():
        for name, block, row0, col0, shape in _local_table_blocks(dmp):
            if name != table:
                continue
            found = True
            if shape != tuple(weight.shape):
                raise ValueError(f"table {table!r} is {shape}, the rows given are {tuple(weight.shape)}")
            rows, cols = block.shape
            block.copy_(weight[row0:row0 + rows, col0:col0 + cols].to(block.dtype))
            written += rows * cols
    if not found:
        raise KeyError(f"no table {table!r} in the sharded model")
    return written


def seed_embedding_tables(dmp: DistributedModelParallel, seed: int, std: float = 0.02, bound: float = 0.04) -> int:
    """Re-initialises every sharded table so that element ``(row, col)`` of table ``t`` is a
    pure function of ``(seed, t, row, col)``: a truncated normal, as the model's own init.

    TorchRec materialises each shard with the rank's generator, so without this the same
    seed gives a different model under a different plan or world size. Each rank writes
    only its own shards (row and column offsets from the shard metadata), in chunks;
    data-parallel (replicated) tables are written whole on every rank.

    Returns:
        int: the number of table elements this rank wrote.
    """
    written = 0
    with torch.no_grad():
        for table, block, row0, col0, _ in _local_table_blocks(dmp):
            table_key = int(hash32(torch.tensor(sum(ord(c) << (8 * (i % 4)) for i, c in enumerate(table)))))
            rows, cols = block.shape
            columns = torch.arange(col0, col0 + cols)
            chunk = max(1, (1 << 22) // max(cols, 1))
            for r in range(0, rows, chunk):
                ids = torch.arange(row0 + r, row0 + min(r + chunk, rows)).unsqueeze(1)
                block[r:r + len(ids)].copy_(keyed_truncated_normal(std, bound, seed, table_key, ids, columns))
                written += ids.numel() * cols
    return written


def build_optimizer(dmp: DistributedModelParallel, optim: OptimConfig) -> CombinedOptimizer:
    """The fused sparse optimiser of the tables (``dmp.fused_optimizer``, stepped inside the
    backward pass) combined with the dense optimiser of every other parameter, as one
    ``CombinedOptimizer`` whose state ``torch.distributed.checkpoint`` saves and re-shards."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    make = torch.optim.AdamW if optim.dense == "adamw" else torch.optim.Adam
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: make(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay),
    )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])


def full_state_dict(dmp: DistributedModelParallel) -> Dict[str, torch.Tensor]:
    """The sharded model's state as an unsharded module's: every sharded table whole, on
    every rank (each rank writes its shards into a zero tensor, one all-reduce sums them),
    ready for ``load_state_dict`` of the plain model."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out: Dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size(), dtype=value.dtype)
            for block in value.local_shards():
                index = tuple(slice(o, o + n) for o, n in zip(block.metadata.shard_offsets, block.metadata.shard_sizes))
                full[index] = block.tensor.detach().cpu()
            if dist.is_initialized() and dist.get_world_size() > 1:
                moved = full.to(dmp.device)
                dist.all_reduce(moved)
                full = moved.cpu()
            out[key] = full
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
    return out
