"""From table declarations to a TorchRec sharding plan: in a job, or as a dry run for a cluster.

:func:`plan_tables` builds the planner inputs (a ``Topology``, the constraints of
:func:`~torchrec_genrec.plans.spec.parameter_constraints`, the sharders with their fused
optimisers), runs ``EmbeddingShardingPlanner`` — ``collective_plan`` inside a job (rank 0
plans, every rank gets the same plan), ``plan`` in a dry run, which needs no process
group and no devices — checks that every declared table is in the plan, and reports each
table's placement and every rank's estimated HBM / host memory.

Example (dry run: a billion-item HSTU token table on 16 nodes x 8 GPUs)::

    tables = retrieval_tables(num_items=10**9, num_actions=5, embedding_dim=256, max_seq_len=1024)
    report = plan_tables(tables, cluster_topology(nodes=16, gpus_per_node=8, hbm_gb=80), batch_size=128)
    print(format_report(report))
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    PlannerError,
    ShardingOption,
    Stats,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
import torchrec.optim as trec_optim

from torchrec_genrec.plans.spec import PlanError, TableSpec, parameter_constraints

__all__ = [
    "FrozenEmbeddingCollection",
    "FrozenEmbeddingCollectionSharder",
    "PlanReport",
    "cluster_topology",
    "format_report",
    "make_sharders",
    "plan_tables",
    "tables_module",
]

_GIB = 1024**3


class FrozenEmbeddingCollection(EmbeddingCollection):
    """An ``EmbeddingCollection`` whose tables never train (precomputed content vectors).

    A separate module type so that it gets its own sharder: one without optimiser state.
    """


class FrozenEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """Shards :class:`FrozenEmbeddingCollection`: fused SGD at learning rate 0, i.e. no
    update and no optimiser state (SGD keeps none), so the planner budgets weights only."""

    def __init__(self) -> None:
        super().__init__(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0})

    @property
    def module_type(self):  # type: ignore[override]
        return FrozenEmbeddingCollection


def make_sharders(optimizer: EmbOptimType = EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate: float = 0.05,
                  eps: float = 1e-8) -> List[ModuleSharder[nn.Module]]:
    """Sharders for the three kinds of table module; trainable ones fuse ``optimizer``."""
    fused = {"optimizer": optimizer, "learning_rate": learning_rate, "eps": eps}
    return [EmbeddingCollectionSharder(fused_params=dict(fused)),
            EmbeddingBagCollectionSharder(fused_params=dict(fused)),
            FrozenEmbeddingCollectionSharder()]


def tables_module(tables: Sequence[TableSpec], device: torch.device = torch.device("meta")) -> nn.Module:
    """A module holding ``tables`` as TorchRec collections (what the planner plans).

    Sequence tables go to an ``EmbeddingCollection`` (``sequence``), pooled ones to an
    ``EmbeddingBagCollection`` (``pooled``), frozen sequence tables to a
    :class:`FrozenEmbeddingCollection` (``frozen``). On the meta device nothing is allocated,
    so a dry run plans tables of any size.
    """
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise PlanError(f"table names must be unique, got {names}")
    module = nn.Module()
    sequence = [t for t in tables if not t.pooled and t.trainable]
    frozen = [t for t in tables if not t.pooled and not t.trainable]
    pooled = [t for t in tables if t.pooled]
    if any(not t.trainable for t in pooled):
        raise PlanError("frozen pooled tables are not supported: declare frozen content tables unpooled")
    ec = lambda ts: [EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings,  # noqa: E731
                                     embedding_dim=t.embedding_dim, feature_names=list(t.feature_names)) for t in ts]
    if sequence:
        module.sequence = EmbeddingCollection(tables=ec(sequence), device=device)
    if frozen:
        module.frozen = FrozenEmbeddingCollection(tables=ec(frozen), device=device)
    if pooled:
        module.pooled = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
                               feature_names=list(t.feature_names)) for t in pooled], device=device)
    return module


def cluster_topology(nodes: int, gpus_per_node: int, hbm_gb: float, ddr_gb: float = 512.0,
                     compute_device: str = "cuda") -> Topology:
    """A ``Topology`` of ``nodes x gpus_per_node`` ranks with ``hbm_gb`` per GPU and
    ``ddr_gb`` host memory per rank (for CPU ranks ``ddr_gb`` is the memory that counts)."""
    if nodes < 1 or gpus_per_node < 1 or hbm_gb <= 0 or ddr_gb <= 0:
        raise PlanError(f"need nodes, gpus_per_node >= 1 and positive memory, got nodes={nodes} "
                        f"gpus_per_node={gpus_per_node} hbm_gb={hbm_gb} ddr_gb={ddr_gb}")
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=nodes * gpus_per_node, local_world_size=gpus_per_node,
                                     hbm_cap_bytes=int(hbm_gb * _GIB) if compute_device == "cuda" else 0,
                                     ddr_cap_bytes=int(ddr_gb * _GIB)),
        kernel_config=KernelConfig(compute_device=compute_device),
    )


# The planner's storage model reads the optimiser from ``param._optimizer_classes`` (set by
# TorchRec's apply_optimizer_in_backward), not from a sharder's fused_params: without this,
# a dry run would budget weights only, whatever the optimiser.
_OPTIMIZER_CLASSES = {
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: trec_optim.RowWiseAdagrad,
    EmbOptimType.EXACT_ADAGRAD: torch.optim.Adagrad,
    EmbOptimType.EXACT_SGD: torch.optim.SGD,
    EmbOptimType.ADAM: torch.optim.Adam,
}


def _declare_optimizer_state(module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> None:
    """Tags each table weight of a dry-run module with its sharder's fused optimiser."""
    by_type = {s.module_type: s for s in sharders}
    for child in module.children():
        sharder = by_type.get(type(child))
        optimizer = (getattr(sharder, "fused_params", None) or {}).get("optimizer") if sharder else None
        cls = _OPTIMIZER_CLASSES.get(optimizer)
        if cls is None:
            continue
        if isinstance(child, FrozenEmbeddingCollection):
            cls = torch.optim.SGD  # learning rate 0: no state
        for weight in child.parameters():
            weight._optimizer_classes = [cls]  # type: ignore[attr-defined]


class _KeepBestPlan(Stats):
    """A planner ``Stats`` hook that keeps the chosen sharding options (with storage estimates)."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,  # type: ignore[override]
            run_time, best_plan, *args, **kwargs) -> None:
        self.best_plan = list(best_plan)


@dataclasses.dataclass
class TablePlacement:
    name: str
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    shard_shapes: List[Tuple[int, int]]


@dataclasses.dataclass
class PlanReport:
    """What :func:`plan_tables` decided.

    Attributes:
        plan (ShardingPlan): the TorchRec plan (pass it to ``DistributedModelParallel``).
        tables (List[TablePlacement]): each table's sharding type, kernel, ranks, shard shapes.
        hbm_bytes (List[int]): estimated device memory per rank (weights, optimiser state,
            I/O buffers), from the planner's storage model.
        ddr_bytes (List[int]): estimated host memory per rank.
        topology (Topology): what was planned for.
    """

    plan: ShardingPlan
    tables: List[TablePlacement]
    hbm_bytes: List[int]
    ddr_bytes: List[int]
    topology: Topology


def plan_tables(tables: Sequence[TableSpec], topology: Topology, batch_size: int,
                sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
                pins: Optional[Dict[str, Tuple[str, Optional[str]]]] = None,
                module: Optional[nn.Module] = None,
                process_group: Optional[dist.ProcessGroup] = None) -> PlanReport:
    """Plans ``tables`` for ``topology``.

    Args:
        tables (Sequence[TableSpec]): every table of the model.
        topology (Topology): the ranks and their memory.
        batch_size (int): samples per rank per step (the planner's cost model).
        sharders (Optional[List[ModuleSharder]]): default :func:`make_sharders`.
        pins (Optional[Dict]): manual plan (see ``parameter_constraints``).
        module (Optional[nn.Module]): the model whose collections hold ``tables``; default
            a meta-device :func:`tables_module` (a dry run).
        process_group (Optional[dist.ProcessGroup]): inside a job: plan on rank 0 and
            share the plan (``collective_plan``); None plans locally.

    Returns:
        PlanReport: the plan, each table's placement and the per-rank memory estimate.

    Raises:
        PlanError: the tables do not fit (the planner's reason and suggestions in the
            message), a declaration is invalid, or a table is missing from the plan.
    """
    sharders = sharders if sharders is not None else make_sharders()
    if module is None:
        module = tables_module(tables)
    # Dry run or job alike, so both budget the same optimiser state (TorchRec maps the tag
    # back to the same fused optimiser when it shards).
    _declare_optimizer_state(module, sharders)
    keep = _KeepBestPlan()
    # The planner logs a warning per table when it adjusts storage; the report says it all.
    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size,
        constraints=parameter_constraints(tables, topology.compute_device, pins),
        storage_reservation=FixedPercentageStorageReservation(0.15), stats=[keep],
    )
    try:
        plan = planner.collective_plan(module, sharders, process_group) if process_group is not None \
            else planner.plan(module, sharders)
    except PlannerError as e:
        total = sum(t.num_bytes for t in tables)
        raise PlanError(f"the planner cannot place these tables ({total / _GIB:,.1f} GiB of fp32 weights) on "
                        f"{topology.world_size} {topology.compute_device} ranks: {e}") from None

    placements: Dict[str, TablePlacement] = {}
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():  # type: ignore[union-attr]
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            placements[name] = TablePlacement(
                name, sharding.sharding_type, sharding.compute_kernel, list(sharding.ranks or []),
                [tuple(s.shard_sizes) for s in shards])
    missing = [t.name for t in tables if t.name not in placements]
    if missing:
        raise PlanError(f"tables {missing} are missing from the sharding plan: is their module in the model "
                        f"and a sharder for its type given?")
    hbm = [0] * topology.world_size
    ddr = [0] * topology.world_size
    for option in keep.best_plan:
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
    return PlanReport(plan, [placements[t.name] for t in tables], hbm, ddr, topology)


def _ranks_text(ranks: List[int]) -> str:
    if not ranks:
        return "all"
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def format_report(report: PlanReport, tables: Optional[Sequence[TableSpec]] = None) -> str:
    """The plan as text: one line per table, then per-rank memory (min / mean / max)."""
    specs = {t.name: t for t in tables or []}
    topo = report.topology
    lines = [f"{'table':<16} {'rows x dim':>22} {'sharding':<12} {'kernel':<18} {'ranks':<10} {'shards':>6} "
             f"{'shard rows x cols':>20}"]
    for p in report.tables:
        spec = specs.get(p.name)
        size = f"{spec.num_embeddings:,} x {spec.embedding_dim}" if spec else ""
        shapes = sorted(set(p.shard_shapes))
        shape = " / ".join(f"{r:,} x {c}" for r, c in shapes[:2]) + (" ..." if len(shapes) > 2 else "")
        lines.append(f"{p.name:<16} {size:>22} {p.sharding_type:<12} {p.compute_kernel:<18} "
                     f"{_ranks_text(p.ranks):<10} {max(len(p.shard_shapes), 1):>6} {shape:>20}")
    for label, values, cap in (("HBM", report.hbm_bytes, topo.devices[0].storage.hbm),
                               ("host", report.ddr_bytes, topo.devices[0].storage.ddr)):
        if not any(values):
            continue
        mean = sum(values) / len(values)
        lines.append(f"per-rank {label}: min {min(values) / _GIB:.2f} GiB, mean {mean / _GIB:.2f} GiB, "
                     f"max {max(values) / _GIB:.2f} GiB of {cap / _GIB:.1f} GiB "
                     f"({max(values) / max(cap, 1):.0%} at the fullest rank)")
    lines.append(f"{topo.world_size} ranks ({topo.local_world_size} per node), {topo.compute_device}")
    return "\n".join(lines)
