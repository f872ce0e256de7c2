"""The retrieval recipe: HSTU, SASRec or MostPop on next-item retrieval.

A recipe is a TOML file in ``apps/configs/`` read into :class:`RetrievalRecipeConfig`;
``genrec train --config FILE [--set key=value ...]`` runs it: open the prepared dataset,
train the model through the one :class:`~torchrec_genrec.train.trainer.Trainer`, select on
validation NDCG@10, report test metrics to stdout, TensorBoard and
``<output_dir>/metrics.json``.

Example::

    cfg = load_config(RetrievalRecipeConfig, "apps/configs/hstu_ml100k.toml", ["train.seed=1"])
    payload = run_retrieval_recipe(cfg)        # also writes metrics.json and test_ranks.npz
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from torchrec_genrec import __version__
from torchrec_genrec.config import ConfigError, to_dict
from torchrec_genrec.data.batching import SequenceBatch, SequenceDataset, make_dataloader
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.models.mostpop import MostPopular
from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig
from torchrec_genrec.train.evaluate import evaluate_retrieval
from torchrec_genrec.train.io import write_json_atomic
from torchrec_genrec.train.logger import MetricsLogger
from torchrec_genrec.train.trainer import Loss, TrainConfig, Trainer, seed_everything

__all__ = ["DataConfig", "EvalConfig", "PlanConfig", "RetrievalRecipeConfig", "RetrievalTask", "SamplerEpochs",
           "run_retrieval_recipe"]


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

    def validate(self) -> "DataConfig":
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len must be >= 2 (a history and the event it predicts), got "
                              f"{self.max_seq_len}")
        if self.holdout not in (1, 2):
            raise ConfigError(f"data.holdout must be 1 (test only) or 2 (validation + test), got {self.holdout}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        return self


@dataclasses.dataclass
class EvalConfig:
    """Args:
    ks (Tuple[int, ...]): cut-offs for HR@K and NDCG@K (full ranking over all items).
    batch_size (int): users per evaluation batch.
    exclude_seen (bool): remove the items of each user's history from the ranking (the
        default, as in SASRec's and HSTU's papers); false ranks them too (RecBole's
        protocol), so a model must learn not to re-recommend what was consumed. The other
        protocol's figures are reported too, under ``seen_kept`` / ``seen_excluded``.
    """

    ks: Tuple[int, ...] = (10, 50, 200)
    batch_size: int = 256
    exclude_seen: bool = True

    def validate(self) -> "EvalConfig":
        if not self.ks or any(k < 1 for k in self.ks) or 10 not in self.ks:
            raise ConfigError(f"eval.ks must be cut-offs >= 1 including 10 (validation selects on NDCG@10), got "
                              f"{list(self.ks)}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        return self


@dataclasses.dataclass
class PlanConfig:
    """Args:
    pins (Tuple[str, ...]): manual sharding plan, ``TABLE:SHARDING_TYPE[:COMPUTE_KERNEL]``
        per table (e.g. ``["tokens:table_wise"]``); tables not pinned are planned from
        the model's declaration (``genrec plan`` shows the result).
    """

    pins: Tuple[str, ...] = ()


@dataclasses.dataclass
class RetrievalRecipeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)

    def validate(self) -> "RetrievalRecipeConfig":
        """Checks every section (after all overrides: fields depend on each other)."""
        self.data.validate()
        self.eval.validate()
        self.train.validate()
        validate = getattr(self.model, "validate", None)
        if validate is not None:
            validate()
        return self


class SamplerEpochs:
    """A DataLoader whose batch sampler has ``set_epoch(epoch, start_batch)``, as the
    trainer's :class:`~torchrec_genrec.train.trainer.EpochData`."""

    def __init__(self, loader: Any, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch=start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Any:
        return iter(self.loader)


class RetrievalTask:
    """Next-item retrieval as a trainer task: the model, the leave-one-out splits, the
    sampled-softmax step and full-catalogue evaluation.

    Args:
        cfg (RetrievalRecipeConfig): the recipe.
        store_path (str): the prepared dataset.

    Example::

        task = RetrievalTask(cfg, store_path)
        trainer = Trainer(task, cfg.train)
        trainer.fit()
        test = task.evaluate(trainer.model, "test")
    """

    units = "tokens"

    def __init__(self, cfg: RetrievalRecipeConfig, store_path: str) -> None:
        self.cfg = cfg
        self.store_path = store_path
        store = SequenceStore.open(store_path)
        protocol = LeaveOneOut(cfg.data.holdout)
        split = lambda s: SequenceDataset(store_path, s, cfg.data.max_seq_len, protocol,  # noqa: E731
                                          with_seen_items=True)
        self.sets: Dict[str, SequenceDataset] = {"test": split(Split.TEST)}
        if cfg.data.holdout == 2:
            self.sets["valid"] = split(Split.VALID)
        self.selection = "ndcg@10" if "valid" in self.sets else ""
        self.model = GenerativeRetrieval(cfg.model, store.num_items, store.num_actions, cfg.data.max_seq_len,
                                         seed=cfg.train.seed)
        if cfg.model.loss == "sampled_softmax" and cfg.model.negatives != "uniform" and cfg.model.logq_correction:
            self.model.set_item_frequencies(MostPopular.fit(store, protocol).counts)
        self.train_set = SequenceDataset(store_path, Split.TRAIN, cfg.data.max_seq_len, protocol)
        if len(self.train_set) == 0:
            raise ConfigError(f"{store_path}: no user has enough events to train on (a training sequence needs "
                              f"{cfg.data.holdout + 2} events: {cfg.data.holdout} held out and 2 to learn from)")

    def fingerprint(self) -> Mapping[str, Any]:
        data = {k: v for k, v in to_dict(self.cfg.data).items() if k != "num_workers"}
        return {"data": data, "model": to_dict(self.cfg.model)}

    def compile_targets(self) -> Tuple[str, ...]:
        return ("encoder",)

    def train_data(self, rank: int, world_size: int) -> SamplerEpochs:
        c = self.cfg
        loader = make_dataloader(self.train_set, c.train.batch_size, shuffle=True, seed=c.train.seed,
                                 num_workers=c.data.num_workers, rank=rank, world_size=world_size,
                                 drop_last=world_size > 1)
        return SamplerEpochs(loader, loader.batch_sampler)

    def step(self, model: nn.Module, batch: SequenceBatch) -> Tuple[Dict[str, Loss], Any]:
        out = model(batch)
        terms = {"item_loss": Loss(out["item_loss_sum"], out["queries"])}
        if "action_loss_sum" in out:
            terms["action_loss"] = Loss(out["action_loss_sum"], out["actions"],
                                        weight=self.cfg.model.action_loss_weight)
            terms["action_acc"] = Loss(out["action_correct"], out["actions"], weight=0.0)
        return terms, out["tokens"]

    def evaluate(self, model: nn.Module, split: str, return_ranks: bool = False) -> Dict[str, Any]:
        c = self.cfg
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        scorer = model.module.score if hasattr(model, "module") else model.score
        return evaluate_retrieval(scorer, self.sets[split], c.eval.ks, c.eval.batch_size,
                                  num_workers=c.data.num_workers, desc=split, progress=c.train.progress,
                                  return_ranks=return_ranks, device=device, exclude_seen=c.eval.exclude_seen)


def run_retrieval_recipe(cfg: RetrievalRecipeConfig) -> Dict[str, Any]:
    """Trains and evaluates ``cfg``; returns what it writes to ``metrics.json``."""
    cfg.validate()
    seed_everything(cfg.train.seed)
    store_path = resolve_store(cfg.data.dataset)
    store = SequenceStore.open(store_path)
    start = time.perf_counter()
    results: Dict[str, Any] = {}
    training: Dict[str, Any] = {}
    if cfg.model.name == "mostpop":
        protocol = LeaveOneOut(cfg.data.holdout)
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        metrics = MetricsLogger(cfg.train.output_dir, cfg.train.tensorboard, cfg.train.progress)
        scorer = MostPopular.fit(store, protocol)
        split = lambda s: SequenceDataset(store_path, s, cfg.data.max_seq_len, protocol,  # noqa: E731
                                          with_seen_items=True)
        test_set = split(Split.TEST)
        if cfg.data.holdout == 2:
            results["valid"] = evaluate_retrieval(scorer, split(Split.VALID), cfg.eval.ks, cfg.eval.batch_size,
                                                  num_workers=cfg.data.num_workers, desc="valid",
                                                  progress=cfg.train.progress, exclude_seen=cfg.eval.exclude_seen)
        results["test"] = evaluate_retrieval(scorer, test_set, cfg.eval.ks, cfg.eval.batch_size,
                                             num_workers=cfg.data.num_workers, desc="test",
                                             progress=cfg.train.progress, return_ranks=True,
                                             exclude_seen=cfg.eval.exclude_seen)
        is_main = True
    else:
        task = RetrievalTask(cfg, store_path)
        trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
        metrics, is_main = trainer.metrics, trainer.ctx.is_main
        result = trainer.fit()
        test_set = task.sets["test"]
        training = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "steps": result.steps,
                    "resumed_from": result.resumed_from, "world_size": result.world_size,
                    "train_seconds": round(result.seconds, 2),
                    "tokens_per_second": round(result.units_per_second, 1), "backend": result.backend,
                    "device": result.device, "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes,
                    "history": result.history}
        if "valid" in task.sets and result.best_epoch >= 0:
            (best,) = [r for r in result.history if r["epoch"] == result.best_epoch]
            results["valid"] = {}
            for key, value in best.items():
                if key.startswith("valid_"):
                    group, _, name = key[len("valid_"):].rpartition("/")
                    (results["valid"].setdefault(group, {}) if group else results["valid"])[name] = value
        results["test"] = task.evaluate(trainer.model, "test", return_ranks=True)
    # Per-user test ranks (users in dense-id order) let two runs on the same split be
    # compared with a paired bootstrap (train.metrics.paired_bootstrap).
    test_ranks = results["test"].pop("ranks")
    other_ranks = results["test"].pop("ranks_other_protocol")
    for split_name, values in results.items():
        metrics.scalars(f"final/{split_name}", values, 0)
    metrics.close()
    payload = {
        "model": cfg.model.name,
        "dataset": {"path": store_path, "source": store.manifest.get("source"),
                    "num_users": store.num_users, "num_items": store.num_items, "num_events": store.num_events,
                    "num_actions": store.num_actions},
        "protocol": f"leave-one-out by time, holdout={cfg.data.holdout}, full ranking, seen items "
                    f"{'excluded' if cfg.eval.exclude_seen else 'ranked too'}",
        "metrics": results,
        "training": training,
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
        "torchrec_genrec": __version__,
    }
    if is_main:
        np.savez(os.path.join(cfg.train.output_dir, "test_ranks.npz"), user=test_set.user, rank=test_ranks.numpy(),
                 rank_other_protocol=other_ranks.numpy(), exclude_seen=cfg.eval.exclude_seen)
        write_json_atomic(os.path.join(cfg.train.output_dir, "metrics.json"), payload)
    return payload
