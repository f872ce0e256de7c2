"""Training loop for generative retrieval on TorchRec.

The model is wrapped in ``DistributedModelParallel`` even on one process: the token
table is materialised and sharded by the planner, and updated by a fused sparse
optimiser inside the backward pass; the dense part (encoder, heads) uses AdamW. Each
epoch: train with a progress bar (loss, tokens/s), evaluate on the validation events,
checkpoint with ``torch.distributed.checkpoint``, stop early on validation NDCG@10.
The best checkpoint is reloaded for the test evaluation.

Sparse optimiser on CPU: fbgemm fuses only (row-wise) Adagrad and SGD there — Adam
fails ("Optimizer adam is not supported in CPU mode") — so the CPU default is exact
row-wise Adagrad; on CUDA ``adam`` matches the paper's all-Adam(W) setup.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_genrec.config import ConfigError
from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
from torchrec_genrec.models.retrieval import GenerativeRetrieval
from torchrec_genrec.plans.planner import make_sharders, plan_tables
from torchrec_genrec.plans.spec import parse_pins
from torchrec_genrec.train import storage
from torchrec_genrec.train.distributed import DistContext
from torchrec_genrec.train.evaluate import evaluate_retrieval

logger = logging.getLogger(__name__)

_SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
}


@dataclasses.dataclass
class OptimConfig:
    """Args:
    lr (float): dense AdamW learning rate.
    betas (Tuple[float, ...]): AdamW betas.
    weight_decay (float): AdamW weight decay.
    sparse_optimizer (str): fused optimiser of the token table: ``rowwise_adagrad``,
        ``adagrad``, ``sgd`` (CPU and CUDA) or ``adam`` (CUDA only).
    sparse_lr (float): its learning rate.
    """

    lr: float = 1e-3
    betas: Tuple[float, ...] = (0.9, 0.98)
    weight_decay: float = 0.0
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05


def shard(model: GenerativeRetrieval, ctx: DistContext, optim: OptimConfig, batch_size: int,
          pins: Sequence[str] = (), seed: Optional[int] = None) -> DistributedModelParallel:
    """Plans the model's tables (``model.table_specs()``, see ``plans``) on the job's ranks
    and wraps the model in DistributedModelParallel.

    Args:
        pins (Sequence[str]): manual plan, ``TABLE:SHARDING_TYPE[:KERNEL]`` per table.
        seed (Optional[int]): initialise the tables from this seed, the same whatever the
            plan (see :func:`seed_embedding_tables`); default ``model.seed``.
    """
    if optim.sparse_optimizer == "adam" and ctx.device.type != "cuda":
        raise ValueError("train.optim.sparse_optimizer = 'adam' needs CUDA: fbgemm fuses only Adagrad, row-wise "
                         "Adagrad and SGD on CPU. Use 'rowwise_adagrad' (the CPU default).")
    sharders = make_sharders(_SPARSE_OPTIMIZERS[optim.sparse_optimizer], optim.sparse_lr)
    world, local = ctx.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    # The device's real memory, not TorchRec's default cap, so the plan is the one that fits.
    hbm = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda" else None
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=local,
                                                             hbm_cap_bytes=hbm),
                                               kernel_config=KernelConfig(compute_device=ctx.device.type))
    report = plan_tables(model.table_specs(), topology, batch_size, sharders=sharders, pins=parse_pins(pins),
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


def resume_pins(checkpointer: Checkpointer, resume: str, pins: Sequence[str], fingerprint: str) -> List[str]:
    """``pins`` plus the plan of the checkpoint a resume would load (tables not pinned by
    ``pins``), so the tables are planned as they were when it was written. A checkpoint
    of other settings adds nothing (:func:`restore_latest_checkpoint` refuses it)."""
    latest = checkpointer.latest() if resume != "never" else None
    if latest is None:
        return list(pins)
    saved = checkpointer.trainer_state(latest)
    if saved.get("fingerprint") != fingerprint:
        return list(pins)
    pinned = {p.split(":")[0] for p in pins}
    return list(pins) + [p for p in saved.get("sharding", []) if p.split(":")[0] not in pinned]


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
    from torchrec_genrec.ops.random import hash32, keyed_truncated_normal

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
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                         weight_decay=optim.weight_decay),
    )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])


class Checkpointer:
    """torch.distributed.checkpoint into ``<dir>/<name>``, visible only once complete.

    A checkpoint holds the sharded tables, the dense weights and buffers, both optimisers'
    state (``dcp``, so it loads into any plan or world size), the trainer's position and
    history (``trainer.json``) and every rank's random state (``rng-rank<R>.pt``). It is
    written to ``<name>.tmp`` and renamed by rank 0 after every rank has finished, so a
    crash mid-save leaves the previous checkpoint intact; ``.tmp`` leftovers are ignored
    and replaced. Periodic checkpoints are named ``step-<global step>``; the newest
    ``keep_latest`` are kept, plus ``best``. ``directory`` is a local path or any URI the
    project's iopath ``path_manager`` serves (:mod:`torchrec_genrec.train.storage`).
    """

    def __init__(self, directory: str, ctx: DistContext, keep_latest: int = 2) -> None:
        self.directory, self.ctx, self.keep_latest = directory, ctx, keep_latest
        if ctx.is_main:
            storage.makedirs(directory)

    def save(self, name: str, state: Dict[str, Any], trainer_state: Optional[Dict[str, Any]] = None) -> str:
        final = storage.join(self.directory, name)
        tmp = final + ".tmp"
        if self.ctx.is_main and storage.exists(tmp):
            storage.rmtree(tmp)
        dist.barrier()
        dcp.save(state, storage_writer=storage.IOPathWriter(tmp))
        buffer = io.BytesIO()
        torch.save(_rng_state(), buffer)
        storage.write_bytes(storage.join(tmp, f"rng-rank{self.ctx.rank}.pt"), buffer.getvalue())
        if self.ctx.is_main and trainer_state is not None:
            payload = {**trainer_state, "world_size": self.ctx.world_size}
            storage.write_bytes(storage.join(tmp, "trainer.json"), json.dumps(payload).encode())
        dist.barrier()
        if self.ctx.is_main:
            # Move the old copy aside before the new one takes its name, so a crash in between
            # leaves one of them (``best`` is re-written in place every time it improves).
            old = final + ".old"
            if storage.exists(old):
                storage.rmtree(old)
            if storage.exists(final):
                storage.rename(final, old)
            storage.rename(tmp, final)
            storage.rmtree(old)
            self._prune()
        dist.barrier()
        return final

    def load(self, name: str, state: Dict[str, Any]) -> None:
        dcp.load(state, storage_reader=storage.IOPathReader(storage.join(self.directory, name)))

    def latest(self) -> Optional[str]:
        """The newest complete periodic checkpoint's name, or None; rank 0 decides and
        tells the others, so every rank resumes from the same one."""
        steps = self._periodic() if self.ctx.is_main else []
        choice = [steps[-1] if steps else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def trainer_state(self, name: str) -> Dict[str, Any]:
        return json.loads(storage.read_bytes(storage.join(self.directory, name, "trainer.json")))

    def restore_rng(self, name: str) -> bool:
        """Restores this rank's random state if the checkpoint has one for it."""
        path = storage.join(self.directory, name, f"rng-rank{self.ctx.rank}.pt")
        if not storage.exists(path):
            return False
        _set_rng_state(torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=False))
        return True

    def _periodic(self) -> List[str]:
        # Complete = dcp's metadata and the trainer state are there (both written before
        # the rename; on stores where a rename is a copy, a half-copied directory lacks one).
        return sorted((d for d in storage.listdir(self.directory) if d.startswith("step-")
                       and not d.endswith((".tmp", ".old"))
                       and storage.exists(storage.join(self.directory, d, "trainer.json"))
                       and storage.exists(storage.join(self.directory, d, ".metadata"))),
                      key=lambda d: int(d.split("-")[1]))

    def _prune(self) -> None:
        steps = self._periodic()
        for old in steps[: max(len(steps) - self.keep_latest, 0)]:
            storage.rmtree(storage.join(self.directory, old))


def restore_latest_checkpoint(checkpointer: Optional[Checkpointer], dmp: DistributedModelParallel,
                              optimizer: CombinedOptimizer, ctx: DistContext, resume: str, fingerprint: str
                              ) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """Loads the newest periodic checkpoint into ``dmp`` and ``optimizer``, per ``resume``.

    ``resume="auto"`` loads it if there is one, ``"never"`` loads nothing, ``"must"`` fails
    without one. The checkpoint's fingerprint (the settings its weights depend on) must
    equal ``fingerprint``. On the world size it was written with, this rank's random state
    is restored too; on another one the tables and optimiser state re-shard.

    Returns:
        ``(name, trainer_state)`` of the checkpoint loaded, or ``(None, None)``.
    """
    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"train.resume must be auto, never or must, not {resume!r}")
    latest = checkpointer.latest() if checkpointer is not None and resume != "never" else None
    if resume == "must" and latest is None:
        raise ConfigError("train.resume = 'must' but there is no checkpoint to resume from in "
                          f"{checkpointer.directory if checkpointer else '(checkpoints are off)'}")
    if latest is None:
        return None, None
    saved = checkpointer.trainer_state(latest)
    if saved.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{storage.join(checkpointer.directory, latest)} was written by a run with different model/data "
            "settings or another global batch (train.batch_size x ranks: keep it when changing the number of "
            "ranks); use a new train.output_dir, or set train.resume = 'never' to start over")
    for name, sub in optimizer.optimizers:
        if name == "dense":
            sub.init_state()  # AdamW's state is lazy; it must exist to be loaded into
    state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
    try:
        checkpointer.load(latest, state)
    except (RuntimeError, CheckpointException) as err:  # "Missing key in checkpoint state_dict: ..."
        reason = str(err).strip().splitlines()[-1]
        raise ConfigError(
            f"{storage.join(checkpointer.directory, latest)} does not fit this model's sharding plan or tables "
            f"({reason}): a table planned with another sharding type or kernel keeps other optimiser state, and a "
            "rebuilt side-feature set may add or drop tables. Resume with the plan and sets it was written with "
            "(its trainer.json 'sharding', as plan.pins), or set train.resume = 'never'"
        ) from None
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if saved["world_size"] == ctx.world_size:
        checkpointer.restore_rng(latest)
    return latest, saved


def stop_reason(patience_over: bool, step: int, max_steps: Optional[int]) -> str:
    """Why a run stops after an epoch: ``"patience"``, ``"max_steps"`` or ``""`` (it goes on)."""
    if patience_over:
        return "patience"
    return "max_steps" if max_steps is not None and step >= max_steps else ""


def resume_epoch(saved: Dict[str, Any], epochs: int, patience: int, max_steps: Optional[int]) -> int:
    """The epoch a resumed run continues from: the checkpoint's position, or ``epochs``
    (nothing left to train) when the run it ended would still stop under the current
    settings. A raised ``patience`` continues an early-stopped run; a run stopped by
    ``max_steps`` is not continued by raising it (the rest of that epoch was skipped),
    which is an error rather than a silent re-evaluation."""
    reason = saved.get("stopped")
    if not reason:
        return saved["epoch"]
    if reason == "max_steps":
        if max_steps is None or saved["step"] < max_steps:
            raise ConfigError(f"this run's checkpoint stopped at train.max_steps = {saved['step']}, inside an epoch; "
                              "a longer run cannot continue it exactly: set train.resume = 'never' (or a new "
                              "train.output_dir) to train it in full")
        return epochs
    history = saved.get("history") or []
    if reason == "patience" and history and history[-1]["epoch"] - saved["best_epoch"] < patience:
        return saved["epoch"]
    return epochs  # early stopping ended it (or a checkpoint that kept no reason, from before)


def _rng_state() -> Dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _maybe_inject_fault(ctx: DistContext, step: int) -> None:
    """Fault drill: ``GENREC_FAULT_AT_STEP=<rank>:<step>`` kills that rank once, just before
    that global step, to rehearse recovery (``torchrun --max-restarts``). A marker file
    next to the job's checkpoints makes it fire only in the first attempt."""
    spec = os.environ.get("GENREC_FAULT_AT_STEP")
    if not spec:
        return
    rank, at = (int(x) for x in spec.split(":"))
    marker = os.environ.get("GENREC_FAULT_MARKER", "")
    if ctx.rank == rank and step == at and marker and not os.path.exists(marker):
        open(marker, "w").close()
        logger.error("fault drill: rank %d exits at step %d", rank, step)
        os._exit(13)


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    history: List[Dict[str, float]]
    seconds: float
    tokens_per_second: float
    resumed_from: Optional[str] = None


def _fresh_epoch_sums() -> Dict[str, float]:
    """Running sums of an epoch (kept in mid-epoch checkpoints so a resume continues them)."""
    return {"loss_sum": 0.0, "batches": 0, "tokens": 0.0, "seconds": 0.0}


def fit(dmp: DistributedModelParallel, optimizer: CombinedOptimizer, train_set: SequenceDataset,
        valid_set: Optional[SequenceDataset], *, ctx: DistContext, epochs: int, batch_size: int,
        eval_batch_size: int, ks: Tuple[int, ...], patience: int, seed: int, num_workers: int,
        eval_every: int = 1,
        checkpointer: Optional[Checkpointer], writer: Any = None, max_steps: Optional[int] = None,
        progress: bool = True, checkpoint_every_steps: Optional[int] = None,
        resume: str = "auto", fingerprint: str = "") -> FitResult:
    """Trains with early stopping on validation NDCG@10; leaves the best weights loaded.

    Validation runs every ``eval_every`` epochs (and after the last); training stops once
    ``patience`` epochs have passed since the best validation score. Without a validation
    split (holdout=1, the published protocol) it trains all ``epochs`` and keeps the last
    weights.

    Checkpoints are written after every epoch and, with ``checkpoint_every_steps``, inside
    epochs too. ``resume="auto"`` continues from the newest checkpoint in the directory
    (``"never"`` starts over, ``"must"`` fails without one): weights, optimiser state,
    the position in the epoch's shuffled order, the loss sums so far, the history and the
    random state, so that on the same world size the resumed run ends bit-identical to an
    uninterrupted one. On another world size the tables and optimiser state re-shard; the
    data order continues from the same global position. ``fingerprint`` (the settings that
    define the model and data) must match the checkpoint's.
    """
    loader = make_dataloader(train_set, batch_size, shuffle=True, seed=seed, num_workers=num_workers,
                             rank=ctx.rank, world_size=ctx.world_size, drop_last=ctx.world_size > 1)
    model: GenerativeRetrieval = dmp.module  # type: ignore[assignment]
    best, best_epoch, step = -1.0, -1, 0
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    total_tokens = 0.0
    train_seconds = 0.0
    first_epoch, first_batch = 0, 0
    partial = _fresh_epoch_sums()
    resumed_from = None

    def training_state() -> Dict[str, Any]:
        return {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}

    latest, saved = restore_latest_checkpoint(checkpointer, dmp, optimizer, ctx, resume, fingerprint)
    if saved is not None:
        same_world = saved["world_size"] == ctx.world_size
        step, best, best_epoch = saved["step"], saved["best"], saved["best_epoch"]
        history = saved["history"]
        first_epoch, first_batch = resume_epoch(saved, epochs, patience, max_steps), saved["batch_in_epoch"]
        partial = saved["partial"]
        # The fingerprint pins the global batch (per-rank batch x ranks), so a rank's batch
        # index in the epoch is the global step index whatever the world size: it carries over.
        resumed_from = latest
        if ctx.is_main:
            logger.info("resumed from %s: epoch %d, batch %d, step %d%s", latest, first_epoch, first_batch, step,
                        "" if same_world else f" (re-sharded from {saved['world_size']} ranks)")

    def trainer_state(epoch: int, batch_in_epoch: int, part: Dict[str, float]) -> Dict[str, Any]:
        return {"fingerprint": fingerprint, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best": best, "best_epoch": best_epoch, "history": history, "partial": part,
                "sharding": sharding_pins(dmp)}

    epoch = first_epoch - 1
    for epoch in range(first_epoch, epochs):
        skip = first_batch if epoch == first_epoch else 0
        loader.batch_sampler.set_epoch(epoch, start_batch=skip)
        dmp.train()
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not (progress and ctx.is_main))
        part = partial if epoch == first_epoch else _fresh_epoch_sums()
        batches_in_epoch = skip + len(loader.batch_sampler)  # this rank's, the skipped ones included
        epoch_start = time.perf_counter() - part["seconds"]
        batch_in_epoch = skip
        for batch in bar:
            _maybe_inject_fault(ctx, step)
            batch = batch.to(ctx.device)
            loss, stats = dmp(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            tokens = float(stats["tokens"])
            part["tokens"] += tokens
            part["batches"] += 1
            rate = part["tokens"] / max(time.perf_counter() - epoch_start, 1e-9)
            loss_value = float(stats["loss"])  # the step's loss over all ranks
            part["loss_sum"] += loss_value
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}")
            if writer is not None and ctx.is_main:
                writer.add_scalar("train/loss", loss_value, step)
                for key in ("item_loss", "action_loss", "action_acc"):
                    if key in stats:
                        writer.add_scalar(f"train/{key}", float(stats[key]), step)
                writer.add_scalar("train/lr", optimizer.param_groups[-1]["lr"], step)
                writer.add_scalar("train/tokens_per_s", rate, step)
            if max_steps is not None and step >= max_steps:
                break
            if (checkpointer is not None and checkpoint_every_steps and step % checkpoint_every_steps == 0
                    and batch_in_epoch < batches_in_epoch):
                part["seconds"] = time.perf_counter() - epoch_start
                checkpointer.save(f"step-{step:09d}", training_state(),
                                  trainer_state(epoch, batch_in_epoch, dict(part)))
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        total_tokens += part["tokens"]
        record: Dict[str, float] = {"epoch": epoch, "train_loss": part["loss_sum"] / max(part["batches"], 1),
                                    "tokens_per_s": part["tokens"] / max(epoch_seconds, 1e-9)}
        last_epoch = epoch == epochs - 1 or (max_steps is not None and step >= max_steps)
        evaluate = valid_set is not None and ((epoch + 1) % eval_every == 0 or last_epoch)
        if evaluate:
            dmp.eval()
            metrics = evaluate_retrieval(model.score, valid_set, ks, eval_batch_size, num_workers=num_workers,
                                         desc="valid", progress=progress and ctx.is_main)
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            if writer is not None and ctx.is_main:
                for k, v in metrics.items():
                    writer.add_scalar(f"valid/{k}", v, epoch)
            score = metrics["ndcg@10"]
            if score > best:
                best, best_epoch = score, epoch
                if checkpointer is not None:
                    checkpointer.save("best", {"model": dmp.state_dict()})
        history.append(record)
        if ctx.is_main:
            shown = {k: round(v, 4) for k, v in record.items() if k in ("train_loss", "valid_ndcg@10", "valid_hr@10")}
            logger.info("epoch %d %s", epoch, shown)
        stop = stop_reason(evaluate and epoch - best_epoch >= patience, step, max_steps)
        if checkpointer is not None:
            checkpointer.save(f"step-{step:09d}", training_state(),
                              {**trainer_state(epoch + 1, 0, _fresh_epoch_sums()), "stopped": stop})
        if stop:
            break
    if valid_set is not None and checkpointer is not None and best_epoch >= 0:
        state = {"model": dmp.state_dict()}
        checkpointer.load("best", state)
        dmp.load_state_dict(state["model"])
    last_epoch_trained = int(history[-1]["epoch"]) if history else -1
    return FitResult(best_epoch if valid_set is not None else last_epoch_trained, len(history), history,
                     time.perf_counter() - start, total_tokens / max(train_seconds, 1e-9), resumed_from)
