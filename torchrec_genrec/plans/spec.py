"""What TorchRec's planner is told about a model's declared tables.

A model lists its tables as :class:`~torchrec_genrec.table_spec.TableSpec` s (declared in
:mod:`torchrec_genrec.models.tables`): size, the features that look it up, the sharding
types it accepts (in order of preference), whether it trains, how many ids a sample looks
up, and caching hints. :func:`parameter_constraints` turns the list into the
``ParameterConstraints`` the ``EmbeddingShardingPlanner`` takes, for a compute device:
what fbgemm cannot run on that device is dropped with the reason logged (on CPU:
data-parallel sequence tables, table-row-wise, UVM caching), and a table left with
nothing it can run on is an error that says so.

Example::

    tables = [TableSpec("tokens", num_embeddings=10**9, embedding_dim=256,
                        feature_names=("history", "negatives"), sharding_types=("row_wise",),
                        ids_per_sample=200.0)]
    constraints = parameter_constraints(tables, compute_device="cuda")
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams, ShardingType

from torchrec_genrec.errors import PlanError
from torchrec_genrec.table_spec import SHARDING_TYPES, TableSpec

logger = logging.getLogger(__name__)

__all__ = ["PlanError", "TableSpec", "parameter_constraints", "parse_pins", "SHARDING_TYPES"]

_FUSED, _UVM_CACHING, _DENSE = "fused", "fused_uvm_caching", "dense"


def _supported(spec: TableSpec, sharding_type: str, compute_device: str) -> Optional[str]:
    """Why fbgemm/TorchRec cannot run this sharding type here, or None if it can."""
    if compute_device != "cpu":
        return None
    if sharding_type == ShardingType.DATA_PARALLEL.value and not spec.pooled:
        return "fbgemm's CPU dense kernel ignores PoolingMode.NONE (sequence tables)"
    if sharding_type in (ShardingType.TABLE_ROW_WISE.value, ShardingType.GRID_SHARD.value):
        return "CUDA only in TorchRec"
    if sharding_type == ShardingType.ROW_WISE.value and spec.pooled:
        return "row-wise pooled tables are CUDA only in TorchRec"
    return None


def parameter_constraints(tables: Sequence[TableSpec], compute_device: str,
                          pins: Optional[Dict[str, Tuple[str, Optional[str]]]] = None) -> Dict[str, ParameterConstraints]:
    """The planner constraints for ``tables`` on ``compute_device`` (``cuda`` or ``cpu``).

    Args:
        tables (Sequence[TableSpec]): the model's tables.
        compute_device (str): ``cuda`` or ``cpu``: what cannot run there is dropped.
        pins (Optional[Dict[str, Tuple[str, Optional[str]]]]): manual plan, table name to
            ``(sharding_type, compute_kernel or None)``; overrides the declaration.

    Returns:
        Dict[str, ParameterConstraints]: keyed by table name.

    Raises:
        PlanError: a pin names an unknown table, or a table has no sharding type this
            device can run.
    """
    pins = dict(pins or {})
    names = {t.name for t in tables}
    unknown = sorted(set(pins) - names)
    if unknown:
        raise PlanError(f"pinned table(s) {unknown} are not tables of this model; its tables: {sorted(names)}")
    constraints: Dict[str, ParameterConstraints] = {}
    for spec in tables:
        kernel_pin: Optional[str] = None
        wanted: Iterable[str] = spec.sharding_types
        if spec.name in pins:
            pinned_type, kernel_pin = pins[spec.name]
            if pinned_type not in SHARDING_TYPES:
                raise PlanError(f"pin {spec.name}:{pinned_type}: unknown sharding type; use one of {list(SHARDING_TYPES)}")
            wanted = (pinned_type,)
        allowed: List[str] = []
        for sharding_type in wanted:
            reason = _supported(spec, sharding_type, compute_device)
            if reason is None:
                allowed.append(sharding_type)
            else:
                logger.info("table %s: %s dropped on %s: %s", spec.name, sharding_type, compute_device, reason)
        if not allowed:
            raise PlanError(f"table {spec.name!r}: none of {list(wanted)} runs on {compute_device} "
                            f"({_supported(spec, list(wanted)[0], compute_device)}); allow e.g. table_wise")
        if kernel_pin is not None:
            kernels = [kernel_pin]
        elif spec.compute_kernels:
            kernels = [k for k in spec.compute_kernels if compute_device == "cuda" or not k.startswith("fused_uvm")]
            if not kernels:
                raise PlanError(f"table {spec.name!r}: compute kernels {list(spec.compute_kernels)} need CUDA")
        elif spec.cache_load_factor is not None and compute_device == "cuda":
            kernels = [_FUSED, _UVM_CACHING]
        else:
            kernels = [_FUSED]
        if ShardingType.DATA_PARALLEL.value in allowed and kernel_pin is None and not spec.compute_kernels:
            kernels.append(_DENSE)  # data-parallel tables run on the dense kernel
        constraints[spec.name] = ParameterConstraints(
            sharding_types=allowed,
            compute_kernels=kernels,
            pooling_factors=[spec.ids_per_sample],
            cache_params=(CacheParams(load_factor=spec.cache_load_factor)
                          if spec.cache_load_factor is not None and compute_device == "cuda" else None),
            # Column-wise shards of at least 32 columns keep fbgemm's kernels efficient.
            min_partition=min(32, spec.embedding_dim) if spec.embedding_dim % 32 == 0 else None,
        )
    return constraints


def parse_pins(pins: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
    """Reads ``TABLE:SHARDING_TYPE[:COMPUTE_KERNEL]`` strings (a manual plan).

    Example::

        parse_pins(["tokens:row_wise", "user_age:table_wise:fused"])
    """
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for text in pins:
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise PlanError(f"pin {text!r} must be TABLE:SHARDING_TYPE or TABLE:SHARDING_TYPE:COMPUTE_KERNEL "
                            f"(e.g. tokens:row_wise)")
        if parts[1] not in SHARDING_TYPES:
            raise PlanError(f"pin {text!r}: unknown sharding type {parts[1]!r}; use one of {list(SHARDING_TYPES)}")
        out[parts[0]] = (parts[1], parts[2] if len(parts) == 3 else None)
    return out
