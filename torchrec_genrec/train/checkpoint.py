"""Checkpoints: ``torch.distributed.checkpoint`` folders that appear only once complete,
resume from the newest intact one, and the settings digest that says whether a
checkpoint belongs to a run.

A checkpoint folder holds the sharded tables, the dense weights and buffers and both
optimisers' state (``dcp``: it loads into any plan or world size), the trainer's position
and history (``trainer.json``) and every rank's random state (``rng-rank<R>.pt``, tensors
only: it loads with ``weights_only=True``). It is written to ``<name>.tmp`` and renamed by
rank 0 after every rank has finished, so a crash mid-save leaves the previous checkpoint.

Checkpoints are trusted local files (``torch.distributed.checkpoint`` unpickles its
``.metadata``); nothing else in them needs unpickling.

Example::

    checkpointer = Checkpointer("runs/x/checkpoints", ctx, keep_latest=2)
    checkpointer.save("step-000000100", {"model": dmp.state_dict()}, {"step": 100, ...})
    name = checkpointer.latest_intact()          # the newest checkpoint whose files all read
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import pickle
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torchrec_genrec.config import ConfigError
from torchrec_genrec.errors import DataError
from torchrec_genrec.train import storage
from torchrec_genrec.train.distributed import DistContext

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Checkpointer", "checkpoint_problem", "fingerprint", "move_finished_run_aside", "resume_epoch",
           "stop_reason"]

TRAINER_STATE = "trainer.json"


class CheckpointError(DataError):
    """A checkpoint whose files cannot be read (truncated, corrupted, missing)."""


def fingerprint(sections: Mapping[str, Any], world_size: int = 1, batch_size: Optional[int] = None) -> str:
    """A digest of the settings a checkpoint's weights depend on.

    Args:
        sections (Mapping[str, Any]): the recipe's settings that define the model and its
            data (e.g. ``{"data": ..., "model": ..., "train": {"seed", "optim", ...}}``),
            as plain dicts; epoch caps, patience, plans and output paths stay out.
        world_size (int): ranks of this run.
        batch_size (Optional[int]): per-rank batch; recorded as the global batch
            (``batch_size x world_size``), so 2 x 64 resumes 1 x 128.
    """
    keep = json.loads(json.dumps(dict(sections), default=str))
    if batch_size is not None:
        keep.setdefault("train", {})["global_batch_size"] = batch_size * world_size
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ random state
def rng_state() -> Dict[str, Any]:
    """Every generator this process draws from, as tensors and numbers only (so it saves
    and loads with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _size(path: str) -> int:
    return os.path.getsize(storage._local(path)) if storage.is_local(path) else len(storage.read_bytes(path))


class Checkpointer:
    """``torch.distributed.checkpoint`` into ``<directory>/<name>``, visible only once complete.

    Periodic checkpoints are named ``step-<global step>``; the newest ``keep_latest``
    intact ones are kept (ordered by a save counter recorded in ``trainer.json``, not by
    step number), plus ``best``. ``directory`` is a local path or any URI the project's
    iopath ``path_manager`` serves (:mod:`torchrec_genrec.train.storage`).

    Args:
        directory (str): where the checkpoint folders go.
        ctx (DistContext): the job's ranks.
        keep_latest (int): periodic checkpoints kept.
    """

    def __init__(self, directory: str, ctx: DistContext, keep_latest: int = 2) -> None:
        self.directory, self.ctx, self.keep_latest = directory, ctx, max(int(keep_latest), 1)
        if ctx.is_main:
            storage.makedirs(directory)
        self._save_index = max([self._saved_index(n) for n in self._periodic_names()] + [0])

    # ------------------------------------------------------------------ writing
    def save(self, name: str, state: Dict[str, Any], trainer_state: Optional[Dict[str, Any]] = None) -> str:
        """Writes ``state`` (dcp), this rank's random state and, on rank 0,
        ``trainer_state`` (plus the world size and a save counter) as checkpoint ``name``."""
        final = storage.join(self.directory, name)
        tmp = final + ".tmp"
        if self.ctx.is_main and storage.exists(tmp):
            storage.rmtree(tmp)
        _barrier()
        dcp.save(state, storage_writer=storage.IOPathWriter(tmp))
        buffer = io.BytesIO()
        torch.save(rng_state(), buffer)
        storage.write_bytes(storage.join(tmp, f"rng-rank{self.ctx.rank}.pt"), buffer.getvalue())
        self._save_index += 1
        if self.ctx.is_main:
            payload = {**(trainer_state or {}), "world_size": self.ctx.world_size, "save_index": self._save_index}
            storage.write_bytes(storage.join(tmp, TRAINER_STATE), json.dumps(payload).encode())
        _barrier()
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
        _barrier()
        return final

    def _prune(self) -> None:
        intact = [n for n in self._periodic_names() if self.problem(n) is None]
        intact.sort(key=self._saved_index)
        for name in intact[: max(len(intact) - self.keep_latest, 0)]:
            storage.rmtree(storage.join(self.directory, name))

    # ------------------------------------------------------------------ reading
    def path(self, name: str) -> str:
        return storage.join(self.directory, name)

    def trainer_state(self, name: str) -> Dict[str, Any]:
        """``trainer.json`` of checkpoint ``name``.

        Raises:
            CheckpointError: missing or unreadable, naming the file.
        """
        path = storage.join(self.directory, name, TRAINER_STATE)
        try:
            state = json.loads(storage.read_bytes(path))
        except FileNotFoundError as e:
            raise CheckpointError("missing: the checkpoint is incomplete", path=path) from e
        except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"unreadable ({type(e).__name__}: {e}): the checkpoint is corrupt",
                                  path=path) from e
        if not isinstance(state, dict):
            raise CheckpointError("not a JSON object: the checkpoint is corrupt", path=path)
        return state

    def problem(self, name: str) -> Optional[str]:
        """Why checkpoint ``name`` cannot be read, or None (see :func:`checkpoint_problem`)."""
        return checkpoint_problem(storage.join(self.directory, name))

    def _periodic_names(self) -> List[str]:
        return [d for d in storage.listdir(self.directory)
                if d.startswith("step-") and not d.endswith((".tmp", ".old"))]

    def _saved_index(self, name: str) -> int:
        try:
            return int(self.trainer_state(name).get("save_index", 0))
        except (CheckpointError, TypeError, ValueError):
            return 0

    def candidates(self) -> List[str]:
        """Periodic checkpoints, newest first: by save counter, then step number. One whose
        ``trainer.json`` does not read comes first, so that it is checked and reported."""
        def key(name: str) -> Tuple[float, int]:
            step = name.split("-", 1)[1]
            try:
                index = float(self.trainer_state(name).get("save_index", 0))
            except (CheckpointError, TypeError, ValueError):
                index = float("inf")
            return index, int(step) if step.isdigit() else -1
        return sorted(self._periodic_names(), key=key, reverse=True)

    def latest_intact(self) -> Optional[str]:
        """The newest periodic checkpoint whose files all read, or None. A broken newer one
        is skipped with a warning naming it. Rank 0 decides and tells the others, so every
        rank resumes from the same one."""
        return _newest_untried(self, [])

    def load(self, name: str, state: Dict[str, Any]) -> None:
        """Loads checkpoint ``name`` into ``state`` in place (re-sharding as needed)."""
        dcp.load(state, storage_reader=storage.IOPathReader(storage.join(self.directory, name)))

    def restore_rng(self, name: str) -> bool:
        """Restores this rank's random state if the checkpoint has one for it."""
        path = storage.join(self.directory, name, f"rng-rank{self.ctx.rank}.pt")
        if not storage.exists(path):
            return False
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is a corrupt file
            raise CheckpointError(f"unreadable random state ({type(e).__name__}: {e})", path=path) from e
        set_rng_state(state)
        return True


def checkpoint_problem(folder: str, need_trainer_state: bool = True) -> Optional[str]:
    """Why the checkpoint in ``folder`` cannot be read, or None when its files all read:
    ``trainer.json`` parses, the random states load weights-only, dcp's ``.metadata``
    loads and every data file is as long as the metadata says. The message names the file.
    """
    try:
        state_path = storage.join(folder, TRAINER_STATE)
        if need_trainer_state or storage.exists(state_path):
            try:
                state = json.loads(storage.read_bytes(state_path))
            except FileNotFoundError as e:
                raise CheckpointError("missing: the checkpoint is incomplete", path=state_path) from e
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"unreadable ({type(e).__name__}: {e})", path=state_path) from e
            if not isinstance(state, dict):
                raise CheckpointError("not a JSON object", path=state_path)
        for entry in storage.listdir(folder):
            if entry.startswith("rng-rank") and entry.endswith(".pt"):
                rng_path = storage.join(folder, entry)
                try:
                    torch.load(io.BytesIO(storage.read_bytes(rng_path)), weights_only=True)
                except Exception as e:  # noqa: BLE001 - a truncated zip raises many kinds
                    raise CheckpointError(f"unreadable ({type(e).__name__}: {e})", path=rng_path) from e
        metadata_path = storage.join(folder, ".metadata")
        if not storage.exists(metadata_path):
            raise CheckpointError("missing: the checkpoint is incomplete", path=metadata_path)
        try:
            metadata = storage.IOPathReader(folder).read_metadata()
        except Exception as e:  # noqa: BLE001 - a truncated pickle raises many kinds
            raise CheckpointError(f"unreadable ({type(e).__name__}: {e})", path=metadata_path) from e
        needed: Dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for relative, length in needed.items():
            file_path = storage.join(folder, relative)
            if not storage.exists(file_path):
                raise CheckpointError("missing: the checkpoint is incomplete", path=file_path)
            size = _size(file_path)
            if size < length:
                raise CheckpointError(f"{size} bytes, its metadata needs {length}: truncated", path=file_path)
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"{folder}: unreadable ({type(e).__name__}: {e})"
    return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def move_finished_run_aside(output_dir: str, checkpoint_dir: str) -> Optional[str]:
    """Before a run that starts over (``train.resume = never``) in a directory that holds
    another run's results or checkpoints: renames that run to ``<output_dir>.old-<time>``
    (nothing is deleted) and returns the new name; None when there was nothing to move.

    Raises:
        ConfigError: the checkpoints live outside ``output_dir`` on a store this cannot move.
    """
    holds_run = os.path.exists(os.path.join(output_dir, "metrics.json")) or (
        storage.exists(checkpoint_dir) and bool(storage.listdir(checkpoint_dir)))
    if not holds_run:
        return None
    inside = storage.is_local(checkpoint_dir) and os.path.abspath(storage._local(checkpoint_dir)).startswith(
        os.path.abspath(output_dir) + os.sep)
    if not inside and storage.exists(checkpoint_dir) and storage.listdir(checkpoint_dir):
        raise ConfigError(f"train.resume = 'never' but {checkpoint_dir} holds checkpoints of an earlier run: give a "
                          "new train.checkpoint_dir (or move those checkpoints yourself) so they are not mixed")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{output_dir.rstrip(os.sep)}.old-{stamp}"
    suffix = 1
    while os.path.exists(target):
        target = f"{output_dir.rstrip(os.sep)}.old-{stamp}-{suffix}"
        suffix += 1
    os.rename(output_dir, target)
    os.makedirs(output_dir, exist_ok=True)
    return target


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


def resume_pins(checkpointer: Optional[Checkpointer], resume: str, pins: Sequence[str], digest: str) -> List[str]:
    """``pins`` plus the plan of the checkpoint a resume would load (tables not pinned by
    ``pins``), so the tables are planned as they were when it was written. A checkpoint
    of other settings adds nothing (the resume refuses it)."""
    latest = checkpointer.latest_intact() if checkpointer is not None and resume != "never" else None
    if latest is None:
        return list(pins)
    saved = checkpointer.trainer_state(latest)
    if saved.get("fingerprint") != digest:
        return list(pins)
    pinned = {p.split(":")[0] for p in pins}
    return list(pins) + [p for p in saved.get("sharding", []) if p.split(":")[0] not in pinned]


def load_latest(checkpointer: Checkpointer, state_fn: Any, resume: str, digest: str,
                same_world: Any) -> Tuple[Optional[str], Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """Loads the newest intact periodic checkpoint into the state ``state_fn()`` returns
    (``{"model": ..., "optimizer": ...}``), per ``resume`` (``auto``: if there is one;
    ``never``: nothing; ``must``: fail without one). A checkpoint that cannot be read is
    skipped for the next older one (with a warning naming it); one written with other
    settings, or whose tables do not fit this plan, is an error that says what to do.

    Args:
        checkpointer (Checkpointer): where the checkpoints are.
        state_fn (Callable[[], Dict]): builds the state dict to load into.
        resume (str): ``auto``, ``never`` or ``must``.
        digest (str): this run's :func:`fingerprint`.
        same_world (Callable[[Dict], bool]): whether the saved run had this world size
            (then this rank's random state is restored too).

    Returns:
        ``(name, trainer_state, state)`` of the checkpoint loaded, or ``(None, None, None)``.
    """
    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"train.resume must be auto, never or must, not {resume!r}")
    if resume == "never":
        return None, None, None
    tried: List[str] = []
    while True:
        latest = _newest_untried(checkpointer, tried)
        if latest is None:
            if resume == "must":
                what = f" (unreadable: {', '.join(tried)})" if tried else ""
                raise ConfigError(f"train.resume = 'must' but there is no intact checkpoint to resume from in "
                                  f"{checkpointer.directory}{what}")
            return None, None, None
        saved = checkpointer.trainer_state(latest)
        if saved.get("fingerprint") != digest:
            raise ConfigError(
                f"{checkpointer.path(latest)} was written by a run with different model/data settings or another "
                "global batch (train.batch_size x ranks: keep it when changing the number of ranks); use a new "
                "train.output_dir, or set train.resume = 'never' to start over (the old run is moved aside)")
        state = state_fn()
        try:
            checkpointer.load(latest, state)
        except (RuntimeError, CheckpointException, OSError, EOFError, pickle.UnpicklingError) as err:
            text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if "Missing key" in str(err) or "Unexpected key" in str(err) or "size mismatch" in str(err):
                raise ConfigError(
                    f"{checkpointer.path(latest)} does not fit this model's sharding plan or tables ({text}): a "
                    "table planned with another sharding type or kernel keeps other optimiser state, and a rebuilt "
                    "side-feature set may add or drop tables. Resume with the plan and sets it was written with (its "
                    "trainer.json 'sharding', as plan.pins), or set train.resume = 'never'") from None
            logger.warning("checkpoint %s failed to load (%s); falling back to an older one", checkpointer.path(latest),
                           text)
            tried.append(latest)
            continue
        if same_world(saved):
            checkpointer.restore_rng(latest)
        return latest, saved, state


def _newest_untried(checkpointer: Checkpointer, tried: List[str]) -> Optional[str]:
    choice: List[Optional[str]] = [None]
    if checkpointer.ctx.is_main:
        for name in checkpointer.candidates():
            if name in tried:
                continue
            reason = checkpointer.problem(name)
            if reason is None:
                choice[0] = name
                break
            logger.warning("checkpoint %s cannot be read, falling back to an older one: %s",
                           checkpointer.path(name), reason)
            tried.append(name)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]
