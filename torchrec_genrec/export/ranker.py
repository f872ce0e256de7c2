"""``genrec export`` of a ranking run: a trained ranker -> the artifact
:class:`~torchrec_genrec.inference.ranker.RankerPredictor` serves.

The artifact is a directory holding the model's weights (safetensors: the id tables as
TorchRec's quantised inference collections — int8 row-wise with a per-row fp16 scale and
bias, or fp16 —, or the trained fp32 model; dense parameters fp32), the item and user
side features the ranker reads (genres, release year, age, gender, occupation, zip;
safetensors), the raw ids and the timestamp unit (``vocab.json``) and a ``manifest.json``
(config, stack versions, each file's size and sha256) — nothing pickled. Everything the
predictor needs from the run's dataset is written into it: serving never opens the store.

Example::

    manifest = export_ranker("runs/onetrans_ml100k", "artifacts/onetrans", precision="int8")
    predictor = RankerPredictor.load("artifacts/onetrans")
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from torchrec_genrec.batch import USER_SIDES
from torchrec_genrec.config import from_dict, to_dict
from torchrec_genrec.data.ranking import RankingData
from torchrec_genrec.data.store import atomic_dir, publish_dir
from torchrec_genrec.errors import DataError
from torchrec_genrec.export.checkpoint import read_run_record
from torchrec_genrec.export.output import check_output_dir, make_readable
from torchrec_genrec.inference import artifact as art
from torchrec_genrec.inference.ranker import FEATURES, RANKER_FORMAT, WEIGHTS, quantize_ranker_tables
from torchrec_genrec.models.ranking import Ranker
from torchrec_genrec.train import storage
from torchrec_genrec.train.ranking import RankingRecipeConfig, load_ranker_side_inputs

__all__ = ["export_ranker", "is_ranking_run", "load_trained_ranker"]


def _run_record(run_dir: str) -> Dict[str, Any]:
    return read_run_record(run_dir)


def is_ranking_run(run_dir: str) -> bool:
    """Whether ``run_dir`` was written by ``genrec rank`` (rather than ``genrec train``)."""
    return _run_record(run_dir).get("task") == "ranking"


def load_trained_ranker(run_dir: str, checkpoint: str = "best", serving: bool = False
                        ) -> Tuple[Ranker, Any, RankingData]:
    """The run's ranker, unsharded on CPU in eval mode, its config and its ranking data.

    ``serving=True`` leaves out what only training samples read (point-in-time LUM
    interests of training events): the model a request is scored with.

    Raises:
        DataError: no metrics.json, not a ranking run, or no such checkpoint.
    """
    record = _run_record(run_dir)
    if record.get("task") != "ranking":
        raise DataError(f"{run_dir} is not a ranking run (genrec rank); export retrieval runs the same way")
    cfg = from_dict(RankingRecipeConfig, record["config"], os.path.join(run_dir, "metrics.json"))
    data = RankingData.build(record["dataset"]["path"], cfg.data.task)
    path = storage.join(os.path.join(run_dir, "checkpoints"), checkpoint)
    if not storage.exists(storage.join(path, ".metadata")):
        raise DataError(f"no complete checkpoint {checkpoint!r} in {os.path.join(run_dir, 'checkpoints')}")
    side, _ = load_ranker_side_inputs(record["dataset"]["path"], cfg.model, data.vocab_sizes)
    if serving:
        side = {k: v for k, v in side.items() if k not in Ranker.TRAINING_ONLY_SIDE_KEYS}
    model = Ranker(cfg.model, data.vocab_sizes, num_genres=len(data.vocabularies["genre"]),
                   max_seq_len=cfg.data.task.max_seq_len, seed=cfg.train.seed, device=torch.device("cpu"), side=side)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=storage.IOPathReader(path))
    model.load_state_dict(state["model"])
    return model.eval(), cfg, data


def _weights_to_save(model: Ranker) -> Dict[str, torch.Tensor]:
    # A quantised collection's table rows are views into its TBE's storage: copy them out.
    # The TBE's own buffers (offsets, cache state) are rebuilt from the config at load.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if ".tbes." not in k}


def export_ranker(run_dir: str, out_dir: str, checkpoint: str = "best", overwrite: bool = False,
                  precision: str = "int8") -> Dict[str, Any]:
    """Writes the serving artifact of a ranking run (see the module docstring).

    Args:
        run_dir (str): a finished ``genrec rank`` run.
        out_dir (str): the artifact directory (published atomically).
        checkpoint (str): which checkpoint, ``best`` by default.
        overwrite (bool): replace an existing ``out_dir``.
        precision (str): id tables ``int8`` (default), ``fp16`` or ``fp32``
            (:func:`~torchrec_genrec.inference.ranker.quantize_ranker_tables`).

    Returns:
        Dict[str, Any]: the manifest.
    """
    check_output_dir(out_dir, run_dir, overwrite)
    model, cfg, data = load_trained_ranker(run_dir, checkpoint, serving=True)
    tables = quantize_ranker_tables(model, precision)
    store = data.store
    tmp = atomic_dir(out_dir)
    try:
        save_file(_weights_to_save(model), os.path.join(tmp, WEIGHTS))
        sides = {"genre_offsets": data.genre_offsets, "genre_values": data.genre_values, "item_year": data.item_year,
                 **{f"user_{k}": data.user_features[k] for k in USER_SIDES}}
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in sides.items()},
                  os.path.join(tmp, FEATURES))
        vocab = {"item_ids": store.item_raw_ids().tolist(), "user_ids": store.user_raw_ids().tolist(),
                 "action_values": list(store.action_values), "genres": data.vocabularies["genre"],
                 "timestamp_unit": store.manifest.get("timestamp_unit", "s")}
        with open(os.path.join(tmp, art.VOCAB), "w") as f:  # the directory is published atomically
            json.dump(vocab, f)
        record = _run_record(run_dir)
        manifest = {
            "format": RANKER_FORMAT, "format_version": art.ARTIFACT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": art.stack_versions(), "precision": precision, "tables": tables,
            "side_widths": model.side_widths(),
            "model": to_dict(cfg.model), "task": to_dict(cfg.data.task),
            "vocab_sizes": data.vocab_sizes, "num_genres": len(data.vocabularies["genre"]),
            "run": {"name": os.path.basename(os.path.abspath(run_dir)), "checkpoint": checkpoint,
                    "test": record.get("metrics", {}).get("test")},
            "files": {name: art.file_entry(os.path.join(tmp, name)) for name in (WEIGHTS, FEATURES, art.VOCAB)},
        }
        with open(os.path.join(tmp, art.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        make_readable(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
