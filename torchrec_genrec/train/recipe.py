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
from typing import Any, Dict, Literal, Optional, Tuple

import torch

from torchrec_genrec import __version__
from torchrec_genrec.config import to_dict
from torchrec_genrec.data.batching import SequenceDataset
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.models.retrieval import RetrievalConfig
from torchrec_genrec.train.evaluate import evaluate_retrieval
from torchrec_genrec.train.trainer import OptimConfig


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
    output_dir (str): metrics.json, checkpoints/ and tensorboard/ go here.
    tensorboard (bool): write TensorBoard scalars.
    epochs (int): epoch cap.
    batch_size (int): users per training batch (per rank).
    patience (int): stop once this many epochs have passed since the best validation
        NDCG@10 (the model-selection rule; the best epoch's weights are tested).
    eval_every (int): validate every this many epochs (and after the last).
    max_steps (Optional[int]): stop after this many steps (smoke tests, golden runs).
    checkpoint (bool): save a torch.distributed.checkpoint every epoch and for the best epoch.
    checkpoint_every_steps (Optional[int]): also checkpoint inside epochs, every this many
        steps (less work lost to a failure on long epochs).
    checkpoint_dir (Optional[str]): where checkpoints go: a local path or any URI with an
        iopath handler registered on ``train.storage.path_manager``; default
        ``<output_dir>/checkpoints``.
    resume (str): ``auto``: continue from the newest checkpoint in ``output_dir`` if there
        is one (a restarted job, or a longer epoch cap); ``never``: start over; ``must``:
        fail if there is none.
    progress (bool): show tqdm progress bars.
    optim (OptimConfig): optimisers.
    """

    seed: int = 0
    output_dir: str = "runs/default"
    tensorboard: bool = True
    epochs: int = 100
    batch_size: int = 128
    patience: int = 10
    eval_every: int = 1
    max_steps: Optional[int] = None
    checkpoint: bool = True
    checkpoint_every_steps: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    resume: Literal["auto", "never", "must"] = "auto"
    progress: bool = True
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)


@dataclasses.dataclass
class PlanConfig:
    """Args:
    pins (Tuple[str, ...]): manual sharding plan, ``TABLE:SHARDING_TYPE[:COMPUTE_KERNEL]``
        per table (e.g. ``["tokens:table_wise"]``); tables not pinned are planned from
        the model's declaration (``genrec plan`` shows the result).
    """

    pins: Tuple[str, ...] = ()


@dataclasses.dataclass
class RecipeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)


def _write_json_atomic(path: str, payload: Dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".metrics-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(cfg: RecipeConfig, world_size: int = 1) -> str:
    """A digest of the settings a checkpoint's weights depend on: data, model, seed, global
    batch size (per-rank batch x ranks, so 2 x 64 resumes 1 x 128) and optimiser; not the
    epoch cap, patience, plan or output settings."""
    import hashlib

    keep = {"data": to_dict(cfg.data), "model": to_dict(cfg.model),
            "train": {k: v for k, v in to_dict(cfg.train).items() if k in ("seed", "optim")}}
    keep["train"]["global_batch_size"] = cfg.train.batch_size * world_size
    keep["data"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def run_recipe(cfg: RecipeConfig) -> Dict[str, Any]:
    """Trains and evaluates ``cfg``; returns what it writes to ``metrics.json``."""
    _seed_everything(cfg.train.seed)
    store_path = resolve_store(cfg.data.dataset)
    store = SequenceStore.open(store_path)
    protocol = LeaveOneOut(cfg.data.holdout)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    start = time.perf_counter()
    eval_split = lambda split: SequenceDataset(  # noqa: E731
        store_path, split, cfg.data.max_seq_len, protocol, with_seen_items=True)
    valid_set = eval_split(Split.VALID) if cfg.data.holdout == 2 else None
    test_set = eval_split(Split.TEST)
    writer = None
    results: Dict[str, Any] = {}
    training: Dict[str, Any] = {}

    if cfg.model.name == "mostpop":
        from torchrec_genrec.models.mostpop import MostPopular

        model = MostPopular.fit(store, protocol)
        scorer = model
        is_main = True
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(cfg.train.output_dir, "tensorboard"))
        if valid_set is not None:
            results["valid"] = evaluate_retrieval(scorer, valid_set, cfg.eval.ks, cfg.eval.batch_size,
                                                  num_workers=cfg.data.num_workers, desc="valid",
                                                  progress=cfg.train.progress)
    else:
        from torchrec_genrec.models.retrieval import GenerativeRetrieval
        from torchrec_genrec.train.distributed import init_distributed
        from torchrec_genrec.train.trainer import Checkpointer, build_optimizer, fit, resume_pins, shard

        ctx = init_distributed()
        is_main = ctx.is_main
        if cfg.train.tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(cfg.train.output_dir, "tensorboard"))
        model = GenerativeRetrieval(cfg.model, store.num_items, store.num_actions, cfg.data.max_seq_len,
                                    seed=cfg.train.seed)
        checkpoint_dir = cfg.train.checkpoint_dir or os.path.join(cfg.train.output_dir, "checkpoints")
        checkpointer = (Checkpointer(checkpoint_dir, ctx)
                        if cfg.train.checkpoint else None)
        # A resume plans the tables as the checkpoint's run did (see trainer.resume_pins).
        pins = (resume_pins(checkpointer, cfg.train.resume, cfg.plan.pins, fingerprint(cfg, ctx.world_size))
                if checkpointer is not None else list(cfg.plan.pins))
        dmp = shard(model, ctx, cfg.train.optim, cfg.train.batch_size, pins)
        optimizer = build_optimizer(dmp, cfg.train.optim)
        train_set = SequenceDataset(store_path, Split.TRAIN, cfg.data.max_seq_len, protocol)
        result = fit(dmp, optimizer, train_set, valid_set, ctx=ctx, epochs=cfg.train.epochs,
                     batch_size=cfg.train.batch_size, eval_batch_size=cfg.eval.batch_size, ks=cfg.eval.ks,
                     patience=cfg.train.patience, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                     eval_every=cfg.train.eval_every,
                     checkpointer=checkpointer, writer=writer, max_steps=cfg.train.max_steps,
                     progress=cfg.train.progress, checkpoint_every_steps=cfg.train.checkpoint_every_steps,
                     resume=cfg.train.resume if cfg.train.checkpoint else "never",
                     fingerprint=fingerprint(cfg, ctx.world_size))
        scorer = dmp.module.score
        dmp.eval()
        training = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                    "resumed_from": result.resumed_from,
                    "train_seconds": round(result.seconds, 2),
                    "tokens_per_second": round(result.tokens_per_second, 1), "history": result.history}
        if valid_set is not None and result.best_epoch >= 0:
            (best,) = [r for r in result.history if r["epoch"] == result.best_epoch]
            results["valid"] = {k[len("valid_"):]: v for k, v in best.items() if k.startswith("valid_")}

    results["test"] = evaluate_retrieval(scorer, test_set, cfg.eval.ks, cfg.eval.batch_size,
                                         num_workers=cfg.data.num_workers, desc="test",
                                         progress=cfg.train.progress, return_ranks=True)
    # Per-user test ranks (users in dense-id order) let two runs on the same split be
    # compared with a paired bootstrap (train.metrics.paired_bootstrap).
    test_ranks = results["test"].pop("ranks")
    if writer is not None:
        for split, metrics in results.items():
            for name, value in metrics.items():
                writer.add_scalar(f"final/{split}/{name}", value, 0)
        writer.close()
    payload = {
        "model": cfg.model.name,
        "dataset": {"path": store_path, "source": store.manifest.get("source"),
                    "num_users": store.num_users, "num_items": store.num_items, "num_events": store.num_events,
                    "num_actions": store.num_actions},
        "protocol": f"leave-one-out by time, holdout={cfg.data.holdout}, full ranking, seen items excluded",
        "metrics": results,
        "training": training,
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
        "torchrec_genrec": __version__,
    }
    if is_main:
        import numpy as np

        np.savez(os.path.join(cfg.train.output_dir, "test_ranks.npz"),
                 user=test_set.user, rank=test_ranks.numpy())
        _write_json_atomic(os.path.join(cfg.train.output_dir, "metrics.json"), payload)
    return payload
