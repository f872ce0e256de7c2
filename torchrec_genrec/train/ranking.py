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

    cfg = load_config(RankingRecipeConfig, "apps/configs/onetrans_ml100k.toml", ["train.seed=1"])
    payload = run_ranking_recipe(cfg)      # also writes metrics.json and test_predictions.npz
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_genrec import __version__
from torchrec_genrec.config import to_dict
from torchrec_genrec.data.content import behaviour_cutoff
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.ranking import RankingConfig, RankingData
from torchrec_genrec.data.ranking_batching import RankingDataset, RequestBatchSampler, make_ranking_loader
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import Split
from torchrec_genrec.models.ranking import Ranker, RankerConfig, count_dense_parameters, count_table_parameters
from torchrec_genrec.train.ranking_metrics import ranking_metrics
from torchrec_genrec.train.recipe import PlanConfig
from torchrec_genrec.train.trainer import OptimConfig

logger = logging.getLogger(__name__)

__all__ = ["RankingDataConfig", "RankingRecipeConfig", "RankingTrainConfig", "evaluate_ranker",
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
class RankingTrainConfig:
    """Args:
    seed (int): seeds torch, numpy, the tables and the data order.
    output_dir (str): metrics.json, test_predictions.npz, checkpoints/, tensorboard/.
    tensorboard (bool): write TensorBoard scalars.
    epochs (int): epoch cap.
    batch_size (int): candidates per training batch (per rank: the global batch is
        ``batch_size x ranks``).
    eval_batch_size (int): candidates per evaluation batch.
    patience (int): stop once this many epochs passed since the best validation AUC.
    max_steps (Optional[int]): stop after this many steps (smoke tests).
    checkpoint_every_steps (Optional[int]): also checkpoint inside epochs, every this many
        steps (a checkpoint is always written after each epoch).
    resume (str): ``auto``: continue from the newest checkpoint in
        ``<output_dir>/checkpoints`` if there is one (a restarted job, a longer epoch cap);
        ``never``: start over; ``must``: fail if there is none.
    progress (bool): tqdm progress bars.
    optim (OptimConfig): optimisers (fused sparse + AdamW dense).
    """

    seed: int = 0
    output_dir: str = "runs/ranking"
    tensorboard: bool = True
    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int = 1024
    patience: int = 2
    max_steps: Optional[int] = None
    checkpoint_every_steps: Optional[int] = None
    resume: Literal["auto", "never", "must"] = "auto"
    progress: bool = True
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, sparse_lr=0.05))


@dataclasses.dataclass
class RankingRecipeConfig:
    data: RankingDataConfig = dataclasses.field(default_factory=RankingDataConfig)
    model: RankerConfig = dataclasses.field(default_factory=RankerConfig)
    train: RankingTrainConfig = dataclasses.field(default_factory=RankingTrainConfig)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)


@torch.no_grad()
def evaluate_ranker(predict, dataset: RankingDataset, batch_size: int, progress: bool = False,
                    desc: str = "eval", rank: int = 0, world_size: int = 1
                    ) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """Scores every candidate of ``dataset``; returns the metrics and the predictions
    (``event``, ``user``, ``label``, ``logit``, ordered by event). In a job of several
    ranks each scores its share of the batches and every rank gets all predictions."""
    loader = make_ranking_loader(dataset, batch_size, shuffle=False, rank=rank, world_size=world_size)
    # Sharded tables answer a lookup only when every rank looks up: ranks with fewer batches
    # repeat their last one (its scores dropped) so all take the same number of steps.
    steps = -(-len(_global_eval_plan(dataset, batch_size)) // world_size)
    logits, labels, users, events = [], [], [], []
    last = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        last = batch
        logits.append(predict(batch).float())
        labels.append(batch.label)
        users.append(batch.user)
        events.append(batch.event)
    for _ in range(steps - len(logits)):
        predict(last if last is not None else dataset[[0]])
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


def _fresh_epoch_sums() -> Dict[str, float]:
    """Running sums of an epoch (kept in mid-epoch checkpoints so a resume continues them);
    ``samples`` counts every rank's."""
    return {"loss_sum": 0.0, "batches": 0, "samples": 0, "seconds": 0.0}


def _fingerprint(cfg: RankingRecipeConfig, world_size: int = 1) -> str:
    """A digest of the settings a checkpoint's weights depend on: data, model, seed,
    optimiser and the global batch (per-rank batch x ranks, so 2 x 128 resumes as 1 x 256)."""
    keep = {"data": to_dict(cfg.data), "model": to_dict(cfg.model),
            "train": {k: v for k, v in to_dict(cfg.train).items() if k in ("seed", "optim")}}
    keep["train"]["global_batch_size"] = cfg.train.batch_size * world_size
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def run_ranking_recipe(cfg: RankingRecipeConfig) -> Dict[str, Any]:
    """Trains and tests ``cfg``; returns what it writes to ``metrics.json``."""
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.recipe import _seed_everything, _write_json_atomic
    from torchrec_genrec.train.trainer import (Checkpointer, _maybe_inject_fault, build_optimizer,
                                               restore_latest_checkpoint, resume_epoch, resume_pins, shard,
                                               sharding_pins, stop_reason)

    _seed_everything(cfg.train.seed)
    start = time.perf_counter()
    store_path = resolve_store(cfg.data.dataset)
    data = RankingData.build(store_path, cfg.data.task)
    train_set = RankingDataset(data, Split.TRAIN, grouped=cfg.data.grouped)
    valid_set = RankingDataset(data, Split.VALID, grouped=cfg.data.eval_grouped)
    test_set = RankingDataset(data, Split.TEST, grouped=cfg.data.eval_grouped)
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    ctx = init_distributed()
    writer = None
    if cfg.train.tensorboard and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.train.output_dir, "tensorboard"))
    cutoff, _ = behaviour_cutoff(data.store, cfg.data.task.valid_fraction, cfg.data.task.test_fraction)
    side, side_meta = load_ranker_side_inputs(store_path, cfg.model, data.vocab_sizes, cutoff)
    if cfg.model.muse != "none" and cfg.data.task.lifelong_len <= 0:
        raise ValueError("model.muse reads the whole history: set data.task.lifelong_len (e.g. 1000)")
    model = Ranker(cfg.model, data.vocab_sizes, num_genres=train_set.num_genres,
                   max_seq_len=cfg.data.task.max_seq_len, seed=cfg.train.seed, side=side)
    checkpointer = Checkpointer(os.path.join(cfg.train.output_dir, "checkpoints"), ctx, keep_latest=2)
    # A resume plans the tables as the checkpoint's run did (another world size may pick
    # other sharding types, whose optimiser states would not load).
    fingerprint = _fingerprint(cfg, ctx.world_size)
    pins = resume_pins(checkpointer, cfg.train.resume, cfg.plan.pins, fingerprint)
    dmp = shard(model, ctx, cfg.train.optim, cfg.train.batch_size, pins)
    optimizer = build_optimizer(dmp, cfg.train.optim)
    loader = make_ranking_loader(train_set, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                 rank=ctx.rank, world_size=ctx.world_size, even=True)
    evaluate = lambda split_set, desc: evaluate_ranker(  # noqa: E731
        ranker.predict, split_set, cfg.train.eval_batch_size, cfg.train.progress and ctx.is_main, desc,
        ctx.rank, ctx.world_size)
    ranker: Ranker = dmp.module  # type: ignore[assignment]

    history: List[Dict[str, float]] = []
    best, best_epoch, step = -1.0, -1, 0
    totals = {"train_seconds": 0.0, "train_samples": 0}
    first_epoch, first_batch, partial = 0, 0, _fresh_epoch_sums()
    resumed_from, saved = restore_latest_checkpoint(checkpointer, dmp, optimizer, ctx, cfg.train.resume,
                                                    fingerprint)
    if saved is not None:
        step, best, best_epoch, history = saved["step"], saved["best"], saved["best_epoch"], saved["history"]
        totals, partial = saved["totals"], saved["partial"]
        first_epoch = resume_epoch(saved, cfg.train.epochs, cfg.train.patience, cfg.train.max_steps)
        first_batch = saved["batch_in_epoch"]
        if ctx.is_main and cfg.data.grouped and first_batch and saved["world_size"] != ctx.world_size:
            logger.warning("resuming grouped training mid-epoch on %d ranks (saved on %d): grouped batches of "
                           "another per-rank size pack requests differently, so the rest of this epoch may skip or "
                           "repeat a few requests", ctx.world_size, saved["world_size"])
        if ctx.is_main:
            logger.info("resumed from %s: epoch %d, batch %d, step %d%s", resumed_from, saved["epoch"], first_batch,
                        step, "" if saved["world_size"] == ctx.world_size
                        else f" (re-sharded from {saved['world_size']} ranks)")

    def save_progress(epoch: int, batch_in_epoch: int, part: Dict[str, float], stopped: str) -> None:
        checkpointer.save(f"step-{step:09d}", {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()},
                          {"fingerprint": fingerprint, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                           "best": best, "best_epoch": best_epoch, "history": history, "partial": part,
                           "totals": totals, "stopped": stopped, "sharding": sharding_pins(dmp)})

    for epoch in range(first_epoch, cfg.train.epochs):
        skip = first_batch if epoch == first_epoch else 0
        loader.sampler.set_epoch(epoch, start_batch=skip)
        dmp.train()
        part = partial if epoch == first_epoch else _fresh_epoch_sums()
        batches_in_epoch = skip + len(loader.sampler)
        batch_in_epoch = skip
        epoch_start = time.perf_counter() - part["seconds"]
        batches = iter(loader)
        if skip and saved["world_size"] == ctx.world_size:
            # Creating the iterator drew a seed from the global generator, which the
            # interrupted run had drawn before the checkpoint: back to the saved state.
            checkpointer.restore_rng(resumed_from)
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.train.progress and ctx.is_main))
        for batch in bar:
            _maybe_inject_fault(ctx, step)
            loss, stats = dmp(batch.to(ctx.device))
            bce = float(stats["bce"])
            if ctx.world_size > 1:
                # Gradients are averaged over ranks (DDP for dense, TorchRec's gradient
                # division for tables): weight each rank's mean by its share of the global batch.
                import torch.distributed as dist

                sums = torch.tensor([float(batch.num_candidates), bce * batch.num_candidates], dtype=torch.float64)
                dist.all_reduce(sums)
                loss = loss * (batch.num_candidates * ctx.world_size / float(sums[0]))
                bce = float(sums[1] / sums[0])
                part["samples"] += int(sums[0])  # global: a resume on another world size counts on
            else:
                part["samples"] += batch.num_candidates
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            part["batches"] += 1
            part["loss_sum"] += bce
            rate = part["samples"] / max(time.perf_counter() - epoch_start, 1e-9)
            bar.set_postfix(bce=f"{bce:.4f}", samples_s=f"{rate:,.0f}")
            if writer is not None:
                writer.add_scalar("train/bce", bce, step)
                writer.add_scalar("train/samples_per_s", rate, step)
            if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
                break
            if (cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0
                    and batch_in_epoch < batches_in_epoch):
                part["seconds"] = time.perf_counter() - epoch_start
                save_progress(epoch, batch_in_epoch, dict(part), stopped="")
        seconds = time.perf_counter() - epoch_start
        totals["train_seconds"] += seconds
        totals["train_samples"] += part["samples"]
        dmp.eval()
        valid, _ = evaluate(valid_set, "valid")
        record = {"epoch": epoch, "train_bce": part["loss_sum"] / max(part["batches"], 1),
                  "samples_per_s": part["samples"] / seconds,
                  **{f"valid_{k}": v for k, v in valid.items()}}
        history.append(record)
        if writer is not None:
            for k in ("auc", "gauc", "logloss", "ne"):
                writer.add_scalar(f"valid/{k}", valid[k], epoch)
        if ctx.is_main:
            logger.info("epoch %d train_bce %.4f valid auc %.4f gauc %.4f (%.0f samples/s)", epoch, record["train_bce"],
                        valid["auc"], valid["gauc"], record["samples_per_s"])
        if valid["auc"] > best:
            best, best_epoch = valid["auc"], epoch
            checkpointer.save("best", {"model": dmp.state_dict()},
                              {"fingerprint": fingerprint, "epoch": epoch, "valid": valid})
        stop = stop_reason(epoch - best_epoch >= cfg.train.patience, step, cfg.train.max_steps)
        save_progress(epoch + 1, 0, _fresh_epoch_sums(), stopped=stop)
        if stop:
            break
    state = {"model": dmp.state_dict()}
    checkpointer.load("best", state)
    dmp.load_state_dict(state["model"])
    dmp.eval()
    test, predictions = evaluate(test_set, "test")
    (best_record,) = [r for r in history if r["epoch"] == best_epoch]
    payload = {
        "task": "ranking",
        "model": cfg.model.name,
        "dataset": {"path": store_path, "source": data.store.manifest.get("source"), **data.stats()},
        "protocol": (f"label = action >= {cfg.data.task.positive_threshold}; global time split; "
                     f"{'grouped' if cfg.data.grouped else 'pointwise'} training, "
                     f"{'grouped' if cfg.data.eval_grouped else 'pointwise'} evaluation"),
        "metrics": {"valid": {k[len('valid_'):]: v for k, v in best_record.items() if k.startswith("valid_")},
                    "test": test},
        "training": {"best_epoch": best_epoch, "epochs_run": len(history), "steps": step,
                     "world_size": ctx.world_size, "global_batch_size": cfg.train.batch_size * ctx.world_size,
                     "train_seconds": round(totals["train_seconds"], 2),
                     "train_samples_per_s": round(totals["train_samples"] / max(totals["train_seconds"], 1e-9), 1),
                     "resumed_from": resumed_from,
                     "dense_parameters": count_dense_parameters(ranker),
                     "table_parameters": count_table_parameters(ranker), "history": history},
        "side_features": side_meta,
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(cfg),
        "torchrec_genrec": __version__,
    }
    if writer is not None:
        for k in ("auc", "gauc", "logloss", "ne"):
            writer.add_scalar(f"final/test/{k}", test[k], 0)
        writer.close()
    if ctx.is_main:
        np.savez(os.path.join(cfg.train.output_dir, "test_predictions.npz"), **predictions)
        _write_json_atomic(os.path.join(cfg.train.output_dir, "metrics.json"), payload)
    return payload

