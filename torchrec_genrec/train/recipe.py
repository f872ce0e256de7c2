"""Recipe configs and the run that trains and evaluates one of them.

A recipe is a TOML file in ``apps/configs/`` read into :class:`RecipeConfig`; ``genrec
train --config FILE [--set key=value ...]`` runs it: open the prepared dataset, fit the
model, select on validation, report test metrics to stdout, TensorBoard and
``<output_dir>/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Dict, Literal, Tuple

import torch

from torchrec_genrec import __version__
from torchrec_genrec.config import to_dict
from torchrec_genrec.data.batching import SequenceDataset
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.train.evaluate import evaluate_retrieval


@dataclasses.dataclass
class DataConfig:
    """Args:
    dataset (str): a prepared dataset's name (``genrec prepare NAME``) or a store path.
    max_seq_len (int): longest history a model sees; longer ones keep the most recent events.
    holdout (int): leave-one-out events held out per user (2: valid + test, 1: test only).
    num_workers (int): DataLoader worker processes.
    """

    dataset: str = "movielens-100k"
    max_seq_len: int = 200
    holdout: int = 2
    num_workers: int = 0


@dataclasses.dataclass
class ModelConfig:
    """Args:
    name (str): the model; ``mostpop`` ranks by training-set popularity.
    """

    name: Literal["mostpop"] = "mostpop"


@dataclasses.dataclass
class EvalConfig:
    """Args:
    ks (Tuple[int, ...]): cut-offs for HR@K and NDCG@K (full ranking over all items).
    batch_size (int): users per evaluation batch.
    """

    ks: Tuple[int, ...] = (10, 50, 200)
    batch_size: int = 256


@dataclasses.dataclass
class TrainConfig:
    """Args:
    seed (int): seeds torch, numpy and the data order.
    output_dir (str): metrics.json and TensorBoard events go here.
    tensorboard (bool): write TensorBoard scalars.
    """

    seed: int = 0
    output_dir: str = "runs/default"
    tensorboard: bool = True


@dataclasses.dataclass
class RecipeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def _write_json_atomic(path: str, payload: Dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".metrics-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def run_recipe(cfg: RecipeConfig) -> Dict[str, Any]:
    """Trains and evaluates ``cfg``; returns what it writes to ``metrics.json``."""
    torch.manual_seed(cfg.train.seed)
    store_path = resolve_store(cfg.data.dataset)
    store = SequenceStore.open(store_path)
    protocol = LeaveOneOut(cfg.data.holdout)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    start = time.perf_counter()

    if cfg.model.name == "mostpop":
        from torchrec_genrec.models.mostpop import MostPopular

        model = MostPopular.fit(store, protocol)
    else:  # unreachable: the config loader checks the Literal
        raise ValueError(f"unknown model {cfg.model.name!r}")

    results: Dict[str, Any] = {}
    splits = [Split.VALID, Split.TEST] if cfg.data.holdout == 2 else [Split.TEST]
    writer = None
    if cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.train.output_dir, "tensorboard"))
    for split in splits:
        dataset = SequenceDataset(store_path, split, cfg.data.max_seq_len, protocol, with_seen_items=True)
        metrics = evaluate_retrieval(model, dataset, cfg.eval.ks, cfg.eval.batch_size,
                                     num_workers=cfg.data.num_workers, desc=f"eval {split.value}")
        results[split.value] = metrics
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(f"{split.value}/{name}", value, 0)
    if writer is not None:
        writer.close()

    payload = {
        "model": cfg.model.name,
        "dataset": {"path": store_path, "source": store.manifest.get("source"),
                    "num_users": store.num_users, "num_items": store.num_items, "num_events": store.num_events},
        "protocol": f"leave-one-out by time, holdout={cfg.data.holdout}, full ranking, seen items excluded",
        "metrics": results,
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
        "torchrec_genrec": __version__,
    }
    _write_json_atomic(os.path.join(cfg.train.output_dir, "metrics.json"), payload)
    return payload
