"""``genrec export`` of a retrieval run: a trained run -> a self-contained inference artifact.

The token table goes through TorchRec's inference quantisation
(:func:`~torchrec_genrec.inference.quant.quantize_token_table`: a
``QuantEmbeddingCollection`` over fbgemm's inference TBE, int8 row-wise with a per-row
fp16 scale and bias, or fp16, or fp32); its TBE rows
are written as they are, alignment included, so the predictor loads them back into the
same module without re-quantising. The dense side — the sequence encoder and the user
readout — is exported with ``torch.export`` on right-padded inputs with dynamic batch
and length (the jagged training kernel plans buckets from the lengths in Python, which
export cannot trace; the padded path computes the same values, see
``tests/test_export.py``).

Example::

    manifest = export_run("runs/hstu_ml100k", "artifacts/hstu_int8", precision="int8")
    predictor = Predictor.load("artifacts/hstu_int8")
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any, Dict

import torch
import torch.nn.functional as F
from safetensors.torch import save, save_file
from torch import nn
from torch.export import Dim
from torchrec.inference.model_packager import PredictFactoryPackager

from torchrec_genrec.config import to_dict
from torchrec_genrec.data.store import SequenceStore, atomic_dir, publish_dir
from torchrec_genrec.export.checkpoint import load_trained_model
from torchrec_genrec.export.output import check_output_dir, check_output_file, make_readable
from torchrec_genrec.inference import artifact as art
from torchrec_genrec.inference.quant import PRECISIONS, quantize_token_table
from torchrec_genrec.inference.torchrec_package import CONFIG_NAME, WEIGHTS_NAME, RetrievalPredictFactory
from torchrec_genrec.models.retrieval import GenerativeRetrieval

__all__ = ["UserEncoder", "export_run", "export_torchrec_package", "table_bytes"]


class UserEncoder(nn.Module):
    """The exported dense graph: padded token embeddings -> one L2-normalised user vector
    per row, read at each row's last token (as training and evaluation read it).

    Args:
        encoder (nn.Module): an HSTU or SASRec encoder with ``forward_padded``.

    Call Args:
        embeddings (torch.Tensor): ``(B, L, D)`` token embeddings, right-padded.
        lengths (torch.Tensor): ``(B,)`` int64 tokens per row, ``1 <= lengths <= L``.
        timestamps (torch.Tensor): ``(B, L)`` int64 token times (ignored by SASRec).

    Returns:
        torch.Tensor: ``(B, D)`` user vectors, unit length.

    Example::

        user = UserEncoder(model.encoder)(emb, torch.tensor([3, 1]), ts)   # (2, D)
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        if hasattr(self.encoder, "forward_padded_last"):  # HSTU: the last layer computes one query per row
            last = self.encoder.forward_padded_last(embeddings, lengths, timestamps)
        else:
            h = self.encoder.forward_padded(embeddings, lengths, timestamps)
            last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return F.normalize(last, dim=-1, eps=1e-6)


def _export_encoder(model: GenerativeRetrieval, path: str) -> None:
    encoder = UserEncoder(model.encoder).eval()
    d = model.config.embedding_dim
    max_len = model.encoder.config.max_seq_len
    example = (torch.randn(2, 3, d), torch.tensor([3, 2]), torch.tensor([[1, 2, 3], [4, 5, 0]]))
    batch, length = Dim("batch", min=1), Dim("length", min=1, max=max_len)
    with torch.no_grad():
        program = torch.export.export(encoder, example, dynamic_shapes=({0: batch, 1: length}, {0: batch},
                                                                      {0: batch, 1: length}), strict=False)
    # No sample inputs: torch.export.load would unpickle them if weights-only loading failed.
    program._example_inputs = None
    torch.export.save(program, path)


def export_run(run_dir: str, out_dir: str, precision: str = "int8", checkpoint: str = "best",
               overwrite: bool = False) -> Dict[str, Any]:
    """Writes the inference artifact of a trained run.

    Args:
        run_dir (str): a finished run's ``train.output_dir`` (any number of ranks, any plan).
        out_dir (str): the artifact directory to create; it appears only once complete.
        precision (str): token table precision, ``int8`` (default), ``fp16`` or ``fp32``.
        checkpoint (str): ``best`` or a ``step-...`` / ``epoch-...`` checkpoint name.
        overwrite (bool): replace an existing ``out_dir``.

    Returns:
        Dict[str, Any]: the manifest written.

    Raises:
        DataError: no such run or checkpoint, or ``out_dir`` exists without ``overwrite``.
    """
    if precision not in PRECISIONS:
        raise art.ArtifactError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    check_output_dir(out_dir, run_dir, overwrite)
    model, cfg = load_trained_model(run_dir, checkpoint)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        record = json.load(f)
    store = SequenceStore.open(record["dataset"]["path"])
    if store.num_items != model.num_items:
        raise art.ArtifactError(f"the run's dataset now has {store.num_items} items, the model {model.num_items}: "
                                "it was prepared again since training; export needs the run's id map",
                                path=record["dataset"]["path"])

    tmp = atomic_dir(out_dir)
    try:
        config = model.token_embeddings.embedding_configs()[0]
        quant = quantize_token_table(model.token_embeddings, precision)
        table_key = f"embeddings.{config.name}.weight"
        weight = quant.state_dict()[table_key].contiguous()
        save_file({"weight": weight}, os.path.join(tmp, art.EMBEDDINGS),
                  metadata={"precision": precision, "table": config.name})
        _export_encoder(model, os.path.join(tmp, art.ENCODER))
        vocab = {"item_ids": store.item_raw_ids().tolist(),
                 "action_name": (store.manifest.get("action") or {}).get("name"),
                 "action_values": store.action_values if model.num_actions else []}
        with open(os.path.join(tmp, art.VOCAB), "w") as f:  # the whole directory is published atomically
            json.dump(vocab, f)
        test_metrics = record.get("metrics", {}).get("test")
        manifest = {
            "format": art.ARTIFACT_FORMAT,
            "format_version": art.ARTIFACT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": art.stack_versions(),
            "precision": precision,
            "model": to_dict(cfg.model),
            "num_items": model.num_items,
            "num_actions": model.num_actions,
            "action_mode": model.action_mode,
            "max_history": model.max_seq_len,
            "encoder_max_len": model.encoder.config.max_seq_len,
            "embedding_dim": model.config.embedding_dim,
            "uses_timestamps": bool(cfg.model.name == "hstu" and cfg.model.use_time_bias),
            "table": {"name": config.name, "rows": config.num_embeddings, "dim": config.embedding_dim,
                      "features": list(config.feature_names), "row_bytes": int(weight.shape[1]),
                      "data_type": PRECISIONS[precision].value},
            "run": {"name": os.path.basename(os.path.abspath(run_dir)), "checkpoint": checkpoint,
                    "test": test_metrics},
            "files": {name: art.file_entry(os.path.join(tmp, name))
                      for name in (art.ENCODER, art.EMBEDDINGS, art.VOCAB)},
        }
        with open(os.path.join(tmp, art.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        make_readable(tmp)
        publish_dir(tmp, out_dir)  # an existing artifact is replaced only now
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def table_bytes(manifest: Dict[str, Any], payload_only: bool = False) -> int:
    """Bytes of the token table in an artifact: as stored (TorchRec's aligned rows with
    their scale/bias) or the payload only (``rows x used dims x bytes per value``)."""
    table = manifest["table"]
    if not payload_only:
        return table["rows"] * table["row_bytes"]
    per_value = {"fp32": 4, "fp16": 2, "int8": 1}[manifest["precision"]]
    return table["rows"] * manifest["embedding_dim"] * per_value


class _Packager(PredictFactoryPackager):
    """Interns the factory's code; torch, TorchRec, fbgemm and torchrec_genrec's encoders extern."""

    @classmethod
    def set_extern_modules(cls, pe: Any) -> None:
        # The encoders come from the installed torchrec_genrec (like torchrec itself): its
        # dataclass configs cannot be re-imported from inside a package.
        pe.extern(["torch", "torch.**", "torchrec", "torchrec.**", "fbgemm_gpu", "fbgemm_gpu.**",
                   "numpy", "numpy.**", "safetensors", "safetensors.**", "typing_extensions",
                   "torchrec_genrec", "torchrec_genrec.modules", "torchrec_genrec.modules.**",
                   "torchrec_genrec.ops", "torchrec_genrec.ops.**", "torchrec_genrec.inference.layout"])

    @classmethod
    def set_mocked_modules(cls, pe: Any) -> None:
        pass


def export_torchrec_package(run_dir: str, out_path: str, precision: str = "int8", checkpoint: str = "best",
                            overwrite: bool = False) -> str:
    """Writes ``out_path``, a torch.package with :class:`RetrievalPredictFactory`.

    Args:
        run_dir (str): a finished run's output_dir.
        out_path (str): the package file to write (atomically).
        precision (str): ``int8``, ``fp16`` or ``fp32`` for the token table.
        checkpoint (str): ``best`` or a checkpoint name.
        overwrite (bool): replace an existing file.

    Returns:
        str: ``out_path``.
    """
    if precision not in PRECISIONS:
        raise art.ArtifactError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    check_output_file(out_path, run_dir, overwrite)
    model, cfg = load_trained_model(run_dir, checkpoint)
    table = model.token_embeddings.embedding_configs()[0]
    settings = {
        "precision": precision, "embedding_dim": cfg.model.embedding_dim, "action_mode": model.action_mode,
        "item_offset": model.space.offset("item"),
        "action_offset": model.space.offset("action") if model.num_actions else 0,
        "num_items": model.num_items, "features": list(table.feature_names), "table": table.name,
        "table_dim": table.embedding_dim, "table_rows": table.num_embeddings, "encoder": cfg.model.name,
        "encoder_config": dataclasses.asdict(model.encoder.config),
    }
    float_state = {f"token_embeddings.embeddings.{table.name}.weight":
                   model.token_embeddings.embeddings[table.name].weight.detach().contiguous()}
    float_state.update({f"encoder.{k}": v.detach().contiguous() for k, v in model.encoder.state_dict().items()})
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        _Packager.save_predict_factory(RetrievalPredictFactory, {CONFIG_NAME: json.dumps(settings)}, tmp,
                                       {WEIGHTS_NAME: save(float_state)})
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path
