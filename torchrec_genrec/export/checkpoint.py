"""A trained run's model, un-sharded, on one process: the starting point of export.

``torch.distributed.checkpoint`` re-shards on load, so a checkpoint written by any number
of ranks under any plan loads into a plain (unsharded, non-DMP) model with its tables as
ordinary ``EmbeddingCollection`` weights — no process group needed. The run's
``metrics.json`` records the config and the catalogue sizes the model was built with.

Example::

    model, cfg = load_trained_model("runs/hstu_ml100k")          # the best epoch
    scores, _ = model.score(batch)                                # (B, N), as in training
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import torch
import torch.distributed.checkpoint as dcp

from torchrec_genrec.config import from_dict
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.errors import DataError
from torchrec_genrec.models.retrieval import GenerativeRetrieval
from torchrec_genrec.train import storage
from torchrec_genrec.train.checkpoint import checkpoint_problem
from torchrec_genrec.train.retrieval import RetrievalRecipeConfig as RecipeConfig

__all__ = ["load_trained_model", "read_run_record"]


def read_run_record(run_dir: str) -> Dict[str, Any]:
    """A finished run's ``metrics.json``, checked to be one this library wrote.

    Raises:
        DataError: no such file, not JSON, or not a run of ``genrec train`` / ``genrec rank``.
    """
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir} has no metrics.json: is it a finished run's train.output_dir?")
    try:
        with open(path) as f:
            record = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"not a readable metrics.json ({e}): the run is incomplete or the file was edited",
                        path=path) from e
    if (not isinstance(record, dict) or not isinstance(record.get("config"), dict)
            or not isinstance(record.get("dataset"), dict) or "torchrec_genrec" not in record):
        raise DataError("not a run of this library (no config, dataset or torchrec_genrec version recorded): export "
                        "reads runs written by `genrec train` or `genrec rank`", path=path)
    return record


def load_trained_model(run_dir: str, checkpoint: str = "best") -> Tuple[GenerativeRetrieval, RecipeConfig]:
    """Loads checkpoint ``checkpoint`` of the run in ``run_dir`` into an unsharded model.

    Args:
        run_dir (str): a run's ``train.output_dir`` (with its ``metrics.json``).
        checkpoint (str): ``best`` (default) or a ``step-...`` name.

    Returns:
        Tuple[GenerativeRetrieval, RecipeConfig]: the model in eval mode on CPU, and the config.

    Raises:
        DataError: the run has no metrics.json or no such checkpoint.
    """
    metrics_path = os.path.join(run_dir, "metrics.json")
    record = read_run_record(run_dir)
    cfg = from_dict(RecipeConfig, record["config"], metrics_path)
    if cfg.model.name == "mostpop":
        raise DataError(f"{run_dir} is a MostPop run: it has no model checkpoint")
    dataset = record["dataset"]
    if "num_actions" in dataset:
        num_actions = dataset["num_actions"]
    else:  # runs recorded before num_actions was: read it from the store
        num_actions = SequenceStore.open(dataset["path"]).num_actions
    directory = cfg.train.checkpoint_dir or os.path.join(run_dir, "checkpoints")
    path = storage.join(directory, checkpoint)
    if not storage.exists(path):
        raise DataError(f"no checkpoint {checkpoint!r} in {directory} "
                        f"(found: {sorted(storage.listdir(directory)) or 'nothing'})")
    problem = checkpoint_problem(path, need_trainer_state=False)
    if problem is not None:
        raise DataError(f"checkpoint {checkpoint!r} cannot be read: {problem}; export another checkpoint "
                        "(--checkpoint step-...) or train again")
    model = GenerativeRetrieval(cfg.model, dataset["num_items"], num_actions, cfg.data.max_seq_len,
                                device=torch.device("cpu"), seed=cfg.train.seed)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=storage.IOPathReader(path))
    model.load_state_dict(state["model"])
    return model.eval(), cfg
