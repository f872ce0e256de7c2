"""The one training loop of every recipe: retrieval, ranking, LUM and the content models.

A :class:`Task` supplies what differs — its model (TorchRec tables on the meta device and
dense modules), its training batches per epoch, ``step(model, batch)`` returning the loss
terms, and ``evaluate(model, split)`` — and :class:`Trainer` does the rest, the same way
for all of them:

- **placement**: the model is planned and sharded by TorchRec
  (``DistributedModelParallel``, fused sparse optimiser in the backward pass, a dense
  optimiser for the rest); every batch moves to the model's device once
  (``Pipelineable.to(device, non_blocking=True)``), in training and evaluation;
- **the step**, through TorchRec's ``TrainPipelineSparseDist`` (the next batches are
  copied to the device, and the input all-to-alls of tables the model looks up straight
  from the batch are started, while the current batch computes), or a plain loop
  (``train.pipeline = "none"``);
- **loss scaling across ranks**: a task returns each loss term as a sum (or mean) over
  its own predictions with their count; the trainer sums the counts over ranks and scales
  each rank's term so that the averaged gradient is that of the global mean, so N ranks
  with B examples each train like one rank with N x B;
- **mixed precision** (``train.precision = "bf16"``: autocast around the forward) and
  ``torch.compile`` of the modules a task names (``train.compile``), both off by default;
- **evaluation cadence and early stopping** on the task's selection metric, the best
  weights kept as a checkpoint and reloaded at the end;
- **checkpoint / resume** (:mod:`torchrec_genrec.train.checkpoint`): one settings
  fingerprint, periodic and per-epoch checkpoints with the data position, partial sums,
  history and random state, so a resumed run ends bit-identical to an uninterrupted one;
  a broken newest checkpoint falls back to the previous intact one;
- **reporting** through one :class:`~torchrec_genrec.train.logger.MetricsLogger`
  (TensorBoard, tqdm, log lines);
- **the fault drill** (``train.fault_at_step = "RANK:STEP"``) to rehearse recovery.

Example::

    task = RetrievalTask(cfg, store_path)
    trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
    result = trainer.fit()            # best weights loaded
    metrics = task.evaluate(trainer.model, "test")
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_genrec.config import ConfigError, to_dict
from torchrec_genrec.train.checkpoint import (CheckpointError, Checkpointer, fingerprint, load_latest, move_finished_run_aside,
                                              resume_epoch, resume_pins, stop_reason)
from torchrec_genrec.train.distributed import DistContext, init_distributed
from torchrec_genrec.train.logger import MetricsLogger
from torchrec_genrec.train.sharding import OptimConfig, build_optimizer, shard, sharding_pins

logger = logging.getLogger(__name__)

__all__ = ["EpochData", "FitResult", "Loss", "OptimConfig", "Task", "TrainConfig", "Trainer", "seed_everything"]


@dataclasses.dataclass
class TrainConfig:
    """How a model is trained, whatever the task.

    Args:
        seed (int): seeds torch, numpy, the tables and the data order.
        output_dir (str): results, ``checkpoints/`` and ``tensorboard/`` go here.
        tensorboard (bool): write TensorBoard scalars.
        progress (bool): show tqdm progress bars.
        epochs (int): epoch cap.
        batch_size (int): examples per training batch, per rank (the global batch is
            ``batch_size x ranks``).
        patience (int): stop once this many epochs have passed since the best validation
            score (the model-selection rule; the best epoch's weights are tested).
        eval_every (int): validate every this many epochs (and after the last).
        max_steps (Optional[int]): stop after this many steps (smoke tests, golden runs).
        checkpoint (bool): save a checkpoint after every epoch and for the best epoch.
        checkpoint_every_steps (Optional[int]): also checkpoint inside epochs, every this
            many steps (less work lost to a failure on long epochs).
        checkpoint_dir (Optional[str]): where checkpoints go: a local path or any URI with
            an iopath handler registered on ``train.storage.path_manager``; default
            ``<output_dir>/checkpoints``.
        keep_checkpoints (int): periodic checkpoints kept (the newest intact ones).
        resume (str): ``auto``: continue from the newest intact checkpoint if there is one
            (a restarted job, a longer epoch cap); ``never``: start over (an earlier run in
            ``output_dir`` is moved aside to ``<output_dir>.old-<time>``, not deleted);
            ``must``: fail if there is none.
        precision (str): ``fp32``, or ``bf16`` (autocast around the forward; tables and
            optimiser state stay fp32). fp16 is not offered: its loss scaling cannot be
            undone inside the fused sparse optimiser's backward update.
        compile (bool): ``torch.compile`` the dense modules the task names.
        pipeline (str): ``sparse_dist`` (TorchRec's ``TrainPipelineSparseDist``), ``none``
            (a plain loop) or ``auto`` (the pipeline on CUDA, where it overlaps the copy of
            the next batches with compute; the plain loop on CPU, where there is no copy to
            hide); all three compute the same steps.
        log_every_steps (int): report the step's losses every this many steps (each report
            reads the losses back from the device).
        fault_at_step (str): fault drill, ``RANK:STEP``: that rank exits (code 13) just
            before that global step, once: a marker file (``fault_marker``, default
            ``<output_dir>/.fault-fired``) makes it fire only in the first attempt.
        fault_marker (str): the drill's marker file.
        optim (OptimConfig): optimisers.
    """

    seed: int = 0
    output_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True
    epochs: int = 100
    batch_size: int = 128
    patience: int = 10
    eval_every: int = 1
    max_steps: Optional[int] = None
    checkpoint: bool = True
    checkpoint_every_steps: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    keep_checkpoints: int = 2
    resume: Literal["auto", "never", "must"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    pipeline: Literal["auto", "sparse_dist", "none"] = "auto"
    log_every_steps: int = 1
    fault_at_step: str = ""
    fault_marker: str = ""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def validate(self, prefix: str = "train") -> "TrainConfig":
        """Checks ranges; raises ConfigError naming the key and what is allowed."""
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key} must be {what}, got {getattr(self, key)!r}")

        need(self.epochs >= 1, "epochs", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.patience >= 0, "patience", ">= 0")
        need(self.eval_every >= 1, "eval_every", ">= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 (or unset)")
        need(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps",
             ">= 1 (or unset)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        need(self.log_every_steps >= 1, "log_every_steps", ">= 1")
        need(self.resume in ("auto", "never", "must"), "resume", "auto, never or must")
        need(self.precision in ("fp32", "bf16"), "precision", "fp32 or bf16")
        need(self.pipeline in ("auto", "sparse_dist", "none"), "pipeline", "auto, sparse_dist or none")
        if self.fault_at_step:
            parts = self.fault_at_step.split(":")
            need(len(parts) == 2 and all(p.strip().isdigit() for p in parts), "fault_at_step", "RANK:STEP")
        self.optim.validate(f"{prefix}.optim")
        return self


@dataclasses.dataclass
class Loss:
    """One term of a step's objective (or a statistic), over this rank's predictions.

    Args:
        value (torch.Tensor): scalar: the sum over this rank's predictions, or their mean
            when ``mean=True``.
        count (Union[int, float, torch.Tensor]): this rank's number of predictions.
        weight (float): its weight in the objective; 0 makes it a statistic only.
        mean (bool): ``value`` is a mean, not a sum.

    Example::

        Loss(F.cross_entropy(logits, y, reduction="sum"), len(y))     # a summed term
        Loss(accuracy_sum, len(y), weight=0.0)                         # reported, not trained
    """

    value: torch.Tensor
    count: Union[int, float, torch.Tensor]
    weight: float = 1.0
    mean: bool = False


class EpochData(Protocol):
    """A task's training batches: ``set_epoch(epoch, start_batch)`` then iterate over this
    rank's batches of that epoch from ``start_batch`` on (its global position: the same
    whatever the world size, since the global batch is fixed)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Any: ...


class Task(Protocol):
    """What a recipe supplies to :class:`Trainer`.

    Attributes:
        model (nn.Module): tables on the meta device (``table_specs()``), dense modules.
        units (str): what the throughput counts (``tokens``, ``samples``).
        selection (str): the validation metric that picks the best epoch (higher is
            better), or ``""`` when the task has no validation split.
    """

    model: nn.Module
    units: str
    selection: str

    def train_data(self, rank: int, world_size: int) -> EpochData: ...

    def step(self, model: nn.Module, batch: Any) -> Tuple[Dict[str, Loss], Union[float, torch.Tensor]]: ...

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]: ...

    def fingerprint(self) -> Mapping[str, Any]: ...


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    steps: int
    history: List[Dict[str, float]]
    seconds: float
    train_seconds: float
    units_per_second: float
    resumed_from: Optional[str] = None
    world_size: int = 1
    backend: str = ""  # the process group's: nccl on GPUs, gloo on CPUs
    device: str = "cpu"
    peak_gpu_memory_bytes: Optional[int] = None  # this rank's, while training and validating


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _PendingSums:
    """A step's term means and units added up on the device (no host sync per step) and
    moved into the epoch's sums when the trainer reports or checkpoints."""

    def __init__(self, part: Dict[str, Any]) -> None:
        self.part = part
        self.terms: Dict[str, torch.Tensor] = {}
        self.units: Optional[torch.Tensor] = None
        self.batches = 0

    def add(self, means: Dict[str, torch.Tensor], units: torch.Tensor) -> None:
        for k, v in means.items():
            self.terms[k] = v if k not in self.terms else self.terms[k] + v
        self.units = units if self.units is None else self.units + units
        self.batches += 1

    def flush(self) -> None:
        if not self.batches:
            return
        for k, v in self.terms.items():
            self.part["terms"][k] = self.part["terms"].get(k, 0.0) + float(v)
        self.part["units"] += float(self.units)
        self.part["batches"] += self.batches
        self.terms, self.units, self.batches = {}, None, 0


def _fresh_epoch_sums() -> Dict[str, Any]:
    """Running sums of an epoch (kept in mid-epoch checkpoints so a resume continues them):
    per term the sum of its per-step global means, batches, units (all ranks'), seconds."""
    return {"terms": {}, "batches": 0, "units": 0.0, "seconds": 0.0}


class Trainer:
    """Trains a :class:`Task` (see the module docstring).

    Args:
        task (Task): model, data, step, evaluation.
        config (TrainConfig): how to train.
        pins (Sequence[str]): manual sharding plan, ``TABLE:SHARDING_TYPE[:KERNEL]``.
        ctx (Optional[DistContext]): the job's ranks; joined here when None.

    Example::

        trainer = Trainer(RetrievalTask(cfg, store_path), cfg.train, pins=cfg.plan.pins)
        result = trainer.fit()                   # FitResult: history, best epoch, throughput
        loss, means, units = trainer.train_step(batch)   # one step by hand (tests, benches)
    """

    def __init__(self, task: Task, config: TrainConfig, pins: Sequence[str] = (),
                 ctx: Optional[DistContext] = None) -> None:
        self.task, self.config = task, config.validate()
        self.ctx = ctx = ctx or init_distributed()
        c = config
        self.checkpoint_dir = c.checkpoint_dir or os.path.join(c.output_dir, "checkpoints")
        if c.checkpoint and not (c.output_dir or c.checkpoint_dir):
            raise ConfigError("train.checkpoint needs train.output_dir or train.checkpoint_dir (where checkpoints go)")
        if ctx.is_main and c.output_dir:
            os.makedirs(c.output_dir, exist_ok=True)
            if c.resume == "never":
                moved = move_finished_run_aside(c.output_dir, self.checkpoint_dir)
                if moved:
                    logger.warning("train.resume = 'never': the earlier run in %s was moved to %s", c.output_dir,
                                   moved)
        if dist.is_initialized():
            dist.barrier()
        self.metrics = MetricsLogger(c.output_dir or None, c.tensorboard, c.progress, ctx.is_main)
        self.checkpointer = Checkpointer(self.checkpoint_dir, ctx, c.keep_checkpoints) if c.checkpoint else None
        train_settings = {"seed": c.seed, "optim": to_dict(c.optim)}
        if c.precision != "fp32":
            train_settings["precision"] = c.precision
        self.fingerprint = fingerprint({**task.fingerprint(), "train": train_settings}, ctx.world_size, c.batch_size)
        resume = c.resume if self.checkpointer is not None else "never"
        # A resume plans the tables as the checkpoint's run did (another world size may pick
        # other sharding types, whose optimiser states would not load into each other).
        pins = resume_pins(self.checkpointer, resume, pins, self.fingerprint)
        specs = task.table_specs() if hasattr(task, "table_specs") else None
        self.dmp: DistributedModelParallel = shard(task.model, ctx, c.optim, c.batch_size, pins,
                                                   seed=getattr(task.model, "seed", c.seed), specs=specs)
        self.optimizer: CombinedOptimizer = build_optimizer(self.dmp, c.optim)
        if c.compile:
            for name in getattr(task, "compile_targets", lambda: [])():
                self.dmp.module.get_submodule(name).compile()
        self._autocast_dtype = torch.bfloat16 if c.precision == "bf16" else None

    @property
    def model(self) -> DistributedModelParallel:
        """The sharded model (``.module`` is the task's model)."""
        return self.dmp

    # ------------------------------------------------------------------ the step
    def _autocast(self) -> Any:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self._autocast_dtype)

    def _objective(self, terms: Dict[str, Loss], units: Union[float, torch.Tensor]
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """Sums every term's count and value over ranks (one all-reduce, no host sync) and
        scales each rank's terms so the averaged gradient is the global mean's. Returns the
        loss to backpropagate, each term's global mean and the global units."""
        world = self.ctx.world_size
        device = next(iter(terms.values())).value.device
        names = list(terms)
        local = []
        for name in names:
            t = terms[name]
            count = torch.as_tensor(t.count, dtype=torch.float64, device=device)
            value = t.value.detach().to(torch.float64)
            local += [count, value * count if t.mean else value]
        local.append(torch.as_tensor(units, dtype=torch.float64, device=device))
        packed = torch.stack(local)
        if world > 1:
            dist.all_reduce(packed)
        loss: Optional[torch.Tensor] = None
        means: Dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            t = terms[name]
            global_count, global_sum = packed[2 * i], packed[2 * i + 1]
            means[name] = global_sum / global_count.clamp_min(1.0)
            if t.weight == 0:
                continue
            if t.mean:
                scale = torch.as_tensor(t.count, dtype=torch.float64, device=device) * world / global_count.clamp_min(
                    1.0)
            else:
                scale = world / global_count.clamp_min(1.0)
            term = t.value if t.weight == 1.0 else t.weight * t.value
            term = term * scale.to(t.value.dtype)
            loss = term if loss is None else loss + term
        if loss is None:
            raise ValueError("the task's step returned no term with a weight: nothing to train")
        means["loss"] = sum(terms[n].weight * means[n] for n in names if terms[n].weight != 0)
        return loss, means, packed[-1]

    def _forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        self._fault_drill()
        with self._autocast():
            terms, units = self.task.step(self.dmp, batch)
        loss, means, global_units = self._objective(terms, units)
        return loss, (means, global_units)

    def train_step(self, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """One plain step on ``batch`` (moved to the model's device): forward, backward,
        optimiser step. Returns the loss backpropagated, each term's global mean and the
        global units."""
        batch = batch.to(self.ctx.device, non_blocking=True)
        loss, (means, units) = self._forward(batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss, means, units

    def _fault_drill(self) -> None:
        spec = self.config.fault_at_step
        if not spec:
            return
        rank, at = (int(x) for x in spec.split(":"))
        marker = self.config.fault_marker or os.path.join(self.config.output_dir, ".fault-fired")
        if self.ctx.rank == rank and self._step == at and not os.path.exists(marker):
            open(marker, "w").close()
            logger.error("fault drill: rank %d exits at step %d", rank, at)
            os._exit(13)

    def _steps(self, batches: Iterable[Any]) -> Iterable[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        """Runs a training step per batch; yields each step's term means and units."""
        pipelined = self.config.pipeline == "sparse_dist" or (self.config.pipeline == "auto"
                                                              and self.ctx.device.type == "cuda")
        if not pipelined:
            for batch in batches:
                _, means, units = self.train_step(batch)
                yield means, units
            return
        pipeline = _SparseDistPipeline(self.dmp, self.optimizer, self.ctx.device, self._forward,
                                       sparse_dist=getattr(self.task, "pipeline_sparse_dist", False))
        iterator = iter(batches)
        try:
            while True:
                try:
                    means, units = pipeline.progress(iterator)
                except StopIteration:
                    return
                yield means, units
        finally:
            pipeline.detach()

    # ------------------------------------------------------------------ the run
    def _state(self) -> Dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _state_for_load(self) -> Dict[str, Any]:
        for name, sub in self.optimizer.optimizers:
            if name == "dense":
                sub.init_state()  # AdamW's state is lazy; it must exist to be loaded into
        return self._state()

    def fit(self, on_validation: Optional[Callable[[int, float], bool]] = None) -> FitResult:
        """Trains with early stopping on the task's selection metric; leaves the best
        weights loaded (the last ones when the task has no validation split or
        checkpoints are off).

        Args:
            on_validation: called after each validation with the epoch and its selection
                score; returning True stops the run (``stopped = "pruned"``), e.g. a
                hyper-parameter search's pruner (``genrec tune``).
        """
        c, ctx, task = self.config, self.ctx, self.task
        data = task.train_data(ctx.rank, ctx.world_size)
        validate = bool(task.selection)
        best, best_epoch, self._step = float("-inf"), -1, 0
        history: List[Dict[str, float]] = []
        start = time.perf_counter()
        totals = {"seconds": 0.0, "units": 0.0}
        first_epoch, first_batch, partial = 0, 0, _fresh_epoch_sums()
        resumed_from, saved = None, None
        if self.checkpointer is not None:
            resumed_from, saved, state = load_latest(
                self.checkpointer, self._state_for_load, c.resume, self.fingerprint,
                lambda s: s.get("world_size") == ctx.world_size)
            if saved is not None:
                self.dmp.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self._step, best, best_epoch, history = saved["step"], saved["best"], saved["best_epoch"], \
                    saved["history"]
                totals, partial = saved["totals"], saved["partial"]
                first_epoch = resume_epoch(saved, c.epochs, c.patience, c.max_steps)
                first_batch = saved["batch_in_epoch"]
                self.metrics.info("resumed from %s: epoch %d, batch %d, step %d%s", resumed_from, saved["epoch"],
                                  first_batch, self._step, "" if saved["world_size"] == ctx.world_size
                                  else f" (re-sharded from {saved['world_size']} ranks)")
                note = getattr(task, "resume_note", None)
                if note is not None and first_batch and saved["world_size"] != ctx.world_size:
                    self.metrics.info(note)

        def save_progress(epoch: int, batch_in_epoch: int, part: Dict[str, Any], stopped: str) -> None:
            self.checkpointer.save(f"step-{self._step:09d}", self._state(), {
                "fingerprint": self.fingerprint, "step": self._step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "best": best, "best_epoch": best_epoch, "history": history, "partial": part, "totals": totals,
                "stopped": stopped, "sharding": sharding_pins(self.dmp)})

        for epoch in range(first_epoch, c.epochs):
            skip = first_batch if epoch == first_epoch else 0
            data.set_epoch(epoch, start_batch=skip)
            self.dmp.train()
            part = partial if epoch == first_epoch else _fresh_epoch_sums()
            batches_in_epoch = skip + len(data)  # this rank's, the skipped ones included
            batch_in_epoch = skip
            epoch_start = time.perf_counter() - part["seconds"]
            batches = iter(data)
            if skip and saved is not None and saved["world_size"] == ctx.world_size:
                # Creating the iterator may draw a seed from the global generator, which the
                # interrupted run had drawn before the checkpoint: back to the saved state.
                self.checkpointer.restore_rng(resumed_from)
            pending = _PendingSums(part)
            on_step_end = getattr(task, "on_step_end", None)
            for means, units in self._steps(self.metrics.bar(batches, f"epoch {epoch}", total=len(data))):
                self._step += 1
                batch_in_epoch += 1
                pending.add(means, units)
                if on_step_end is not None:
                    on_step_end(self.dmp.module)
                if self._step % c.log_every_steps == 0 or batch_in_epoch == batches_in_epoch:
                    values = {k: float(v) for k, v in means.items()}
                    pending.flush()
                    rate = part["units"] / max(time.perf_counter() - epoch_start, 1e-9)
                    self.metrics.postfix(loss=f"{values['loss']:.4f}", **{f"{task.units[:3]}_s": f"{rate:,.0f}"})
                    self.metrics.scalars("train", {**values, "lr": self.optimizer.param_groups[-1]["lr"],
                                                   f"{task.units}_per_s": rate}, self._step)
                if c.max_steps is not None and self._step >= c.max_steps:
                    break
                if (self.checkpointer is not None and c.checkpoint_every_steps
                        and self._step % c.checkpoint_every_steps == 0 and batch_in_epoch < batches_in_epoch):
                    pending.flush()
                    part["seconds"] = time.perf_counter() - epoch_start
                    save_progress(epoch, batch_in_epoch, dict(part, terms=dict(part["terms"])), "")
            pending.flush()
            if hasattr(task, "on_epoch_end"):
                task.on_epoch_end(self.dmp.module, epoch)
            seconds = time.perf_counter() - epoch_start
            totals["seconds"] += seconds
            totals["units"] += part["units"]
            record: Dict[str, float] = {"epoch": epoch,
                                        **{f"train_{k}": v / max(part["batches"], 1) for k, v in part["terms"].items()},
                                        f"{task.units}_per_s": part["units"] / max(seconds, 1e-9)}
            last_epoch = epoch == c.epochs - 1 or (c.max_steps is not None and self._step >= c.max_steps)
            evaluated = validate and ((epoch + 1) % c.eval_every == 0 or last_epoch)
            if evaluated:
                self.dmp.eval()
                valid = task.evaluate(self.dmp, "valid")
                # History rows are flat: a nested group (another protocol's figures) becomes "group/key".
                for k, v in valid.items():
                    record.update({f"valid_{k}/{kk}": vv for kk, vv in v.items()} if isinstance(v, dict)
                                  else {f"valid_{k}": v})
                self.metrics.scalars("valid", valid, epoch)
                score = valid[task.selection]
                if score > best:
                    best, best_epoch = score, epoch
                    if self.checkpointer is not None:
                        self.checkpointer.save("best", {"model": self.dmp.state_dict()},
                                               {"fingerprint": self.fingerprint, "epoch": epoch, "valid": valid})
            history.append(record)
            shown = {k: round(v, 4) for k, v in record.items()
                     if k in ("train_loss", f"valid_{task.selection}") or k.endswith("_per_s")}
            self.metrics.info("epoch %d %s", epoch, shown)
            stop = stop_reason(evaluated and epoch - best_epoch >= c.patience, self._step, c.max_steps)
            if evaluated and on_validation is not None and on_validation(epoch, float(valid[task.selection])):
                stop = stop or "pruned"
            if self.checkpointer is not None:
                save_progress(epoch + 1, 0, _fresh_epoch_sums(), stop)
            if stop:
                break
        if validate and self.checkpointer is not None and best_epoch >= 0:
            self.load_checkpoint("best")
        self.dmp.eval()
        last_trained = int(history[-1]["epoch"]) if history else -1
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
        return FitResult(best_epoch if validate else last_trained, len(history), self._step, history,
                         time.perf_counter() - start, totals["seconds"],
                         totals["units"] / max(totals["seconds"], 1e-9), resumed_from, ctx.world_size,
                         ctx.backend, str(ctx.device), peak)

    def load_checkpoint(self, name: str) -> None:
        """Loads checkpoint ``name``'s model weights (``best``, ``step-...``).

        Raises:
            CheckpointError: its files do not read, naming the file.
        """
        problem = self.checkpointer.problem(name)
        if problem is not None:
            raise CheckpointError(f"cannot load checkpoint {name!r}: {problem}")
        state = {"model": self.dmp.state_dict()}
        self.checkpointer.load(name, state)
        self.dmp.load_state_dict(state["model"])

    def close(self) -> None:
        self.metrics.close()


class _SparseDistPipeline:
    """TorchRec's ``TrainPipelineSparseDist`` driving the trainer's step.

    The forward is the trainer's (the task's step plus the cross-rank loss scaling), passed
    as ``custom_model_fwd``; the pipeline copies the next batches to the device, runs
    backward and the optimiser. A task whose model looks up its tables straight from batch
    attributes (TorchRec's traceable sparse-arch layout) sets ``pipeline_sparse_dist`` and
    its input all-to-alls are pipelined too; otherwise the model is not rewritten (its
    lookups build their KeyedJaggedTensors inside the forward, which FX cannot trace).
    """

    def __init__(self, dmp: DistributedModelParallel, optimizer: CombinedOptimizer, device: torch.device,
                 forward: Any, sparse_dist: bool) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        class _Pipeline(TrainPipelineSparseDist):
            def _pipeline_model(self, batch, context, pipelined_forward=None):  # noqa: ANN001
                if sparse_dist:
                    kwargs = {} if pipelined_forward is None else {"pipelined_forward": pipelined_forward}
                    return super()._pipeline_model(batch, context, **kwargs)
                self._pipelined_modules, self._original_forwards = [], []
                self._pipelined_postprocs, self._original_kjt_dist_forwards = [], []
                return None

        self._pipeline = _Pipeline(dmp, optimizer, device, execute_all_batches=True, custom_model_fwd=forward)

    def progress(self, iterator: Any) -> Any:
        return self._pipeline.progress(iterator)

    def detach(self) -> None:
        self._pipeline.detach()
