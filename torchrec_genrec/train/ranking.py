"""The ranking recipe: DCNv2+DIN, OneTrans or the HSTU ranker on the ranking task.

Same machinery as the retrieval recipe: the model's tables are planned and sharded by
TorchRec (``DistributedModelParallel``, fused row-wise Adagrad), the dense part trains
with AdamW, validation AUC picks the epoch (early stopping), the best weights are kept
as a ``torch.distributed.checkpoint`` and tested. A checkpoint after every epoch (and every
``checkpoint_every_steps``) lets an interrupted run resume exactly where it stopped.
Samples come pointwise (one request per event) or grouped (one request per user and time window, see
:mod:`torchrec_genrec.data.ranking_batching`); evaluation is pointwise by default, so
both formats are scored on the same test samples. Under ``torchrun`` every rank takes its
share of each global batch (the losses weighted so the step equals one process at the
global batch size) and of the evaluation, whose predictions are gathered on every rank.

Example::

    cfg = load_config(RankingRecipeConfig, "apps/configs/ranking_ml100k.toml", ["model.name=onetrans", "train.seed=1"])
    payload = run_ranking_recipe(cfg)      # also writes metrics.json and test_predictions.npz
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from torchrec_genrec import __version__
from torchrec_genrec.config import ConfigError, to_dict
from torchrec_genrec.data.content import behaviour_cutoff
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.ranking import RankingConfig, RankingData
from torchrec_genrec.data.ranking_batching import RankingDataset, RequestBatchSampler, make_ranking_loader
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import Split
from torchrec_genrec.models.ranking import Ranker, RankerConfig, count_dense_parameters, count_table_parameters
from torchrec_genrec.train.io import write_json_atomic
from torchrec_genrec.train.ranking_metrics import ranking_metrics
from torchrec_genrec.train.retrieval import PlanConfig, SamplerEpochs
from torchrec_genrec.train.trainer import Loss, OptimConfig, TrainConfig, Trainer, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["RankingDataConfig", "RankingEvalConfig", "RankingRecipeConfig", "RankingTask", "evaluate_ranker",
           "load_ranker_side_inputs", "run_ranking_recipe"]


@dataclasses.dataclass
class RankingDataConfig:
    """Args:
    dataset (str): a prepared dataset's name or a store path (needs an action column).
    task (RankingConfig): labels, sequence length, split fractions, request window.
    grouped (bool): train on grouped requests (shared history per user and window)
        instead of one request per event.
    eval_grouped (bool): evaluate on grouped requests too (serving's view: a request's
        candidates see only the history before it); default pointwise.
    """

    dataset: str = "movielens-100k"
    task: RankingConfig = dataclasses.field(default_factory=RankingConfig)
    grouped: bool = False
    eval_grouped: bool = False


@dataclasses.dataclass
class RankingEvalConfig:
    """Args:
    batch_size (int): candidates per evaluation batch.
    """

    batch_size: int = 1024

    def validate(self) -> "RankingEvalConfig":
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        return self


def _ranking_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/ranking", epochs=10, batch_size=256, patience=2,
                       optim=OptimConfig(lr=1e-3, sparse_lr=0.05))


@dataclasses.dataclass
class RankingRecipeConfig:
    data: RankingDataConfig = dataclasses.field(default_factory=RankingDataConfig)
    model: RankerConfig = dataclasses.field(default_factory=RankerConfig)
    train: TrainConfig = dataclasses.field(default_factory=_ranking_train_defaults)
    eval: RankingEvalConfig = dataclasses.field(default_factory=RankingEvalConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)

    def validate(self) -> "RankingRecipeConfig":
        """Checks every section (after all overrides: fields depend on each other)."""
        self.train.validate()
        self.eval.validate()
        validate = getattr(self.data.task, "validate", None)
        if validate is not None:
            validate()
        if self.model.muse != "none" and self.data.task.lifelong_len <= 0:
            raise ConfigError("model.muse reads the whole history: set data.task.lifelong_len (e.g. 1000)")
        return self


@torch.no_grad()
def evaluate_ranker(predict, dataset: RankingDataset, batch_size: int, progress: bool = False,
                    desc: str = "eval", rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None
                    ) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """Scores every candidate of ``dataset``; returns the metrics and the predictions
    (``event``, ``user``, ``label``, ``logit``, ordered by event). In a job of several
    ranks each scores its share of the batches and every rank gets all predictions.
    Batches move to ``device`` (the model's) once; the predictions come back to the CPU."""
    loader = make_ranking_loader(dataset, batch_size, shuffle=False, rank=rank, world_size=world_size)
    # Sharded tables answer a lookup only when every rank looks up: ranks with fewer batches
    # repeat their last one (its scores dropped) so all take the same number of steps.
    steps = -(-len(_global_eval_plan(dataset, batch_size)) // world_size)
    logits, labels, users, events = [], [], [], []
    last = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        last = batch
        logits.append(predict(batch.to(device, non_blocking=True) if device is not None else batch).float().cpu())
        labels.append(batch.label)
        users.append(batch.user)
        events.append(batch.event)
    for _ in range(steps - len(logits)):
        filler = last if last is not None else dataset[[0]]
        predict(filler.to(device, non_blocking=True) if device is not None else filler)
    cat = (lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype))  # noqa: E731
    out = {"logit": cat(logits, torch.float32), "label": cat(labels, torch.float32),
           "user": cat(users, torch.int64), "event": cat(events, torch.int64)}
    if world_size > 1:
        import torch.distributed as dist

        shares: List[Any] = [None] * world_size
        dist.all_gather_object(shares, {k: v.numpy() for k, v in out.items()})
        out = {k: torch.from_numpy(np.concatenate([share[k] for share in shares])) for k in out}
    order = torch.argsort(out["event"])
    out = {k: v[order] for k, v in out.items()}
    metrics = ranking_metrics(out["logit"], out["label"], out["user"])
    return metrics, {k: v.numpy() for k, v in out.items()}


def _global_eval_plan(dataset: RankingDataset, batch_size: int) -> RequestBatchSampler:
    """The global (single-process) evaluation plan, to count its batches."""
    return RequestBatchSampler(dataset.candidates_per_request(), batch_size, shuffle=False)


def load_ranker_side_inputs(store_path: str, model: RankerConfig, vocab_sizes: Dict[str, int],
                            cutoff: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The side-feature sets ``model`` names (``content``, ``sid``, ``das``, ``lum``), as
    the :class:`Ranker`'s ``side`` inputs, and what made each (for metrics.json).

    Args:
        cutoff (int): the ranking split's validation cutoff; a set learned from behaviour
            under another cutoff (it may have read validation or test events) is refused.
    """
    from torchrec_genrec.data.content import load_side_features as _load

    def load_side_features(path: str, name: str, expect: Dict[str, int]):
        s = _load(path, name, expect)
        learned = s.meta.get("behaviour_cutoff")
        if cutoff is not None and learned is not None and int(learned) != int(cutoff):
            why = ("it read events this ranker validates or tests on" if int(learned) > int(cutoff)
                   else "it misses training events of this split")
            raise DataError(f"side-feature set {name!r} was learned from events before {learned}, but this ranking "
                            f"split's validation cutoff is {cutoff}: {why}; rebuild it with the ranker's "
                            "valid/test fractions", path=s.path)
        return s

    rows = {"item": vocab_sizes["item"], "item_codes": vocab_sizes["item"], "item_fused": vocab_sizes["item"],
            "user_codes": vocab_sizes["user"], "user_fused": vocab_sizes["user"]}
    side: Dict[str, torch.Tensor] = {}
    meta: Dict[str, Any] = {}
    if model.content:
        s = load_side_features(store_path, model.content, rows)
        side["content"] = s["item"]
        meta["content"] = {"name": s.name, **s.meta}
    if model.sid:
        s = load_side_features(store_path, model.sid, rows)
        side["item_codes"] = s["item_codes"]
        if "user_codes" in s:
            side["user_codes"] = s["user_codes"]
        meta["sid"] = {"name": s.name, **s.meta}
    if model.das:
        s = load_side_features(store_path, model.das, rows)
        side["item_fused"], side["user_fused"] = s["item_fused"], s["user_fused"]
        meta["das"] = {"name": s.name, **s.meta}
    if model.lum:
        s = load_side_features(store_path, model.lum, rows)
        for key in ("lum_interest", "lum_item", "lum_item_condition", "lum_event", "lum_event_interest",
                    "lum_user_fold"):
            if key in s or key not in Ranker._OPTIONAL_LUM_KEYS:
                side[key] = s[key]
        meta["lum"] = {"name": s.name, **s.meta}
    return side, meta


class RankingTask:
    """Ranking as a trainer task: the ranker, its samples (pointwise or grouped), the
    BCE step and AUC/GAUC evaluation.

    Args:
        cfg (RankingRecipeConfig): the recipe.
        store_path (str): the prepared dataset (with an action column).

    Example::

        task = RankingTask(cfg, store_path)
        trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
        trainer.fit()
        metrics, predictions = task.predictions(trainer.model, "test")
    """

    units = "samples"
    selection = "auc"

    def __init__(self, cfg: RankingRecipeConfig, store_path: str) -> None:
        self.cfg = cfg
        self.store_path = store_path
        self.data = data = RankingData.build(store_path, cfg.data.task)
        self.train_set = RankingDataset(data, Split.TRAIN, grouped=cfg.data.grouped)
        self.sets = {"valid": RankingDataset(data, Split.VALID, grouped=cfg.data.eval_grouped),
                     "test": RankingDataset(data, Split.TEST, grouped=cfg.data.eval_grouped)}
        cutoff, _ = behaviour_cutoff(data.store, cfg.data.task.valid_fraction, cfg.data.task.test_fraction)
        side, self.side_meta = load_ranker_side_inputs(store_path, cfg.model, data.vocab_sizes, cutoff)
        self.model = Ranker(cfg.model, data.vocab_sizes, num_genres=self.train_set.num_genres,
                            max_seq_len=cfg.data.task.max_seq_len, seed=cfg.train.seed, side=side)
        if cfg.data.grouped:
            # Grouped batches pack whole requests per rank's batch size.
            self.resume_note = ("resuming grouped training mid-epoch on another number of ranks: grouped batches of "
                                "another per-rank size pack requests differently, so the rest of this epoch may skip "
                                "or repeat a few requests")

    def fingerprint(self) -> Mapping[str, Any]:
        return {"data": to_dict(self.cfg.data), "model": to_dict(self.cfg.model)}

    def train_data(self, rank: int, world_size: int) -> SamplerEpochs:
        loader = make_ranking_loader(self.train_set, self.cfg.train.batch_size, shuffle=True, seed=self.cfg.train.seed,
                                     rank=rank, world_size=world_size, even=True)
        return SamplerEpochs(loader, loader.sampler)

    def step(self, model: nn.Module, batch: Any) -> Tuple[Dict[str, Loss], int]:
        loss, stats = model(batch)
        n = batch.num_candidates
        return {"loss": Loss(loss, n, mean=True), "bce": Loss(stats["bce"], n, weight=0.0, mean=True)}, n

    def predictions(self, model: nn.Module, split: str) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
        """Metrics and per-candidate predictions of ``split`` (``valid`` / ``test``)."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        ranker = model.module if hasattr(model, "module") else model
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        return evaluate_ranker(ranker.predict, self.sets[split], self.cfg.eval.batch_size,
                               self.cfg.train.progress and rank == 0, split, rank, world, device)

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        return self.predictions(model, split)[0]


def run_ranking_recipe(cfg: RankingRecipeConfig) -> Dict[str, Any]:
    """Trains and tests ``cfg``; returns what it writes to ``metrics.json``."""
    cfg.validate()
    seed_everything(cfg.train.seed)
    start = time.perf_counter()
    store_path = resolve_store(cfg.data.dataset)
    task = RankingTask(cfg, store_path)
    trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
    result = trainer.fit()
    test, predictions = task.predictions(trainer.model, "test")
    ranker = trainer.model.module
    (best_record,) = [r for r in result.history if r["epoch"] == result.best_epoch]
    payload = {
        "task": "ranking",
        "model": cfg.model.name,
        "dataset": {"path": store_path, "source": task.data.store.manifest.get("source"), **task.data.stats()},
        "protocol": (f"label = action >= {cfg.data.task.positive_threshold}; global time split; "
                     f"{'grouped' if cfg.data.grouped else 'pointwise'} training, "
                     f"{'grouped' if cfg.data.eval_grouped else 'pointwise'} evaluation"),
        "metrics": {"valid": {k[len('valid_'):]: v for k, v in best_record.items() if k.startswith("valid_")},
                    "test": test},
        "training": {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "steps": result.steps,
                     "world_size": result.world_size, "global_batch_size": cfg.train.batch_size * result.world_size,
                     "train_seconds": round(result.train_seconds, 2),
                     "train_samples_per_s": round(result.units_per_second, 1),
                     "resumed_from": result.resumed_from, "backend": result.backend, "device": result.device,
                     "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes,
                     "dense_parameters": count_dense_parameters(ranker),
                     "table_parameters": count_table_parameters(ranker), "history": result.history},
        "side_features": task.side_meta,
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
        "torchrec_genrec": __version__,
    }
    trainer.metrics.scalars("final/test", {k: test[k] for k in ("auc", "gauc", "logloss", "ne")}, 0)
    trainer.close()
    if trainer.ctx.is_main:
        np.savez(os.path.join(cfg.train.output_dir, "test_predictions.npz"), **predictions)
        write_json_atomic(os.path.join(cfg.train.output_dir, "metrics.json"), payload)
    return payload
