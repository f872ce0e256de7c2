"""An embedding table declared as data: what a model declares and the planner reads.

A model lists its tables as :class:`TableSpec` s (``models/tables.py`` holds the
declarations): size, the features that look it up, the sharding types it accepts (in order
of preference), whether it trains, how many ids a sample looks up, and caching hints.
:mod:`torchrec_genrec.plans` turns such a list into planner constraints and a sharding
plan; neither side imports the other.

Example::

    TableSpec("tokens", num_embeddings=10**9, embedding_dim=table_width(250),
              feature_names=("history", "negatives"), sharding_types=("row_wise",), ids_per_sample=200.0)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from torchrec.distributed.types import ShardingType

from torchrec_genrec.errors import PlanError

__all__ = ["SHARDING_TYPES", "TableSpec", "table_width"]

#: Sharding types a spec may name (TorchRec's values).
SHARDING_TYPES = tuple(t.value for t in (ShardingType.DATA_PARALLEL, ShardingType.TABLE_WISE,
                                         ShardingType.COLUMN_WISE, ShardingType.ROW_WISE,
                                         ShardingType.TABLE_ROW_WISE, ShardingType.TABLE_COLUMN_WISE,
                                         ShardingType.GRID_SHARD))


def table_width(embedding_dim: int) -> int:
    """Columns a table of model width ``embedding_dim`` is stored in: fbgemm's fused
    tables need a multiple of 4 (the extra columns are never read)."""
    return -(-embedding_dim // 4) * 4


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table of a model and how it wants to be placed.

    Args:
        name (str): table name (unique within the model; the key of its plan entry).
        num_embeddings (int): rows.
        embedding_dim (int): columns (a multiple of 4 for fbgemm's fused kernels).
        feature_names (Tuple[str, ...]): the KJT features that look this table up.
        sharding_types (Tuple[str, ...]): accepted TorchRec sharding types, preferred first.
        pooled (bool): True for an ``EmbeddingBagCollection`` table (sum-pooled bags),
            False for an ``EmbeddingCollection`` one (one vector per id: sequences).
        trainable (bool): False for a frozen table (e.g. precomputed content embeddings):
            it is sharded with no optimiser state and never updated.
        ids_per_sample (float): ids one sample looks up in this table, over all its
            features (a sequence's expected length); the planner's cost model uses it.
        cache_load_factor (Optional[float]): on CUDA, also allow keeping only this share
            of rows in HBM as a cache over host memory (UVM); None keeps every row in HBM.
        compute_kernels (Tuple[str, ...]): accepted TorchRec compute kernels (``fused``,
            ``fused_uvm_caching``, ``fused_uvm``, ``dense``, ...); empty: derived from the
            sharding types and ``cache_load_factor``. CUDA-only kernels are dropped on CPU.
        description (str): what the table holds, for plan printouts.

    Example::

        TableSpec("user_age", 8, 16, ("user_age",), ("table_wise", "data_parallel"), pooled=True)
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Tuple[str, ...]
    sharding_types: Tuple[str, ...] = (ShardingType.ROW_WISE.value,)
    pooled: bool = False
    trainable: bool = True
    ids_per_sample: float = 1.0
    cache_load_factor: Optional[float] = None
    compute_kernels: Tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            problems.append(f"needs num_embeddings >= 1 and embedding_dim >= 1, got {self.num_embeddings} x "
                            f"{self.embedding_dim}")
        if self.embedding_dim % 4:
            problems.append(f"embedding_dim {self.embedding_dim} is not a multiple of 4 (fbgemm's fused tables "
                            f"need one); store it as {-(-self.embedding_dim // 4) * 4} columns")
        unknown = [t for t in self.sharding_types if t not in SHARDING_TYPES]
        if unknown or not self.sharding_types:
            problems.append(f"sharding_types {list(self.sharding_types)} must be non-empty, from {list(SHARDING_TYPES)}")
        if not self.feature_names:
            problems.append("has no feature_names")
        if self.cache_load_factor is not None and not 0 < self.cache_load_factor <= 1:
            problems.append(f"cache_load_factor must be in (0, 1], got {self.cache_load_factor}")
        if problems:
            raise PlanError(f"table {self.name!r}: " + "; ".join(problems))

    @property
    def num_bytes(self) -> int:
        """fp32 weight bytes."""
        return self.num_embeddings * self.embedding_dim * 4
