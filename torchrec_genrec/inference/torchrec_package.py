"""The TorchRec-predictor target: a ``torch.package`` holding a TorchRec ``PredictFactory``.

TorchRec's inference stack loads a model as a packaged ``PredictFactory`` whose
``create_predict_module()`` builds the eager model, quantises its embedding collections
(``quantize_inference_model``) and wraps it in a ``PredictModule`` with
``predict_forward(Dict[str, Tensor])``. ``genrec export RUN --target torchrec-package``
writes exactly that (this module's code interned, torch / TorchRec / fbgemm extern,
the float weights as safetensors bytes, the settings as JSON), so a TorchRec serving
deployment loads it like its own DLRM package::

    from torchrec_genrec.inference.torchrec_package import load_predict_factory
    factory = load_predict_factory("hstu.torchrec.pt", trust=True)   # unpickles: your own files only
    module = factory.create_predict_module()            # quantised, eval mode, CPU
    out = module({"item": items, "action": actions, "timestamp": ts, "lengths": lengths})
    out["user_embedding"]   # (B, D) unit vectors;  out["scores"]  # (B, N) cosine over all items

The package interns this factory; torch, TorchRec, fbgemm and torchrec_genrec's encoder
and layout modules stay extern, so the serving environment installs the same pinned stack (the
manifest-free package records nothing else to check: keep it next to its artifact).

Inputs are dense ids (the artifact's ``vocab.json`` maps raw ids): ``item``, ``action``
(empty when the model reads no actions), ``timestamp`` — jagged values, events oldest
first — and ``lengths`` ``(B,)`` events per user.

Loading a ``torch.package`` unpickles its contents and runs its code: use it only for
packages you built or trust (:func:`load_predict_factory` asks for ``trust=True``). The artifact for :class:`~torchrec_genrec.inference.Predictor` and ``genrec serve``
(``--target predictor``) is the one that loads without unpickling.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.inference.modules import BatchingMetadata, PredictFactory, PredictModule, quantize_inference_model

from torchrec_genrec.inference.layout import layout_tokens, lookup_tokens, pad_tokens
from torchrec_genrec.modules.hstu import HSTUConfig, HSTUEncoder
from torchrec_genrec.modules.sasrec import SASRecConfig, SASRecEncoder

try:  # defined inside a torch.package only
    import torch_package_importer  # type: ignore[import-not-found]
except ImportError:
    torch_package_importer = None

__all__ = ["QuantRetrievalModel", "RetrievalPredictFactory", "RetrievalPredictModule", "load_predict_factory"]

CONFIG_NAME = "retrieval.json"
WEIGHTS_NAME = "model.safetensors"
_DTYPES = {"fp32": torch.float, "fp16": torch.half, "int8": torch.qint8}


class QuantRetrievalModel(nn.Module):
    """Token lookup in a (quantised) ``EmbeddingCollection`` + the encoder + exact scoring.

    Args:
        settings (Dict[str, Any]): what :func:`export_torchrec_package` records.
    """

    def __init__(self, settings: Dict[str, Any]) -> None:
        super().__init__()
        s = settings
        self.dim = int(s["embedding_dim"])
        self.action_mode = s["action_mode"]
        self.item_offset, self.action_offset = int(s["item_offset"]), int(s["action_offset"])
        self.num_items = int(s["num_items"])
        self.features = list(s["features"])
        self.token_embeddings = EmbeddingCollection(tables=[EmbeddingConfig(
            name=s["table"], embedding_dim=int(s["table_dim"]), num_embeddings=int(s["table_rows"]),
            feature_names=self.features)], device=torch.device("cpu"))
        if s["encoder"] == "hstu":
            self.encoder: nn.Module = HSTUEncoder(HSTUConfig(**s["encoder_config"]))
        else:
            self.encoder = SASRecEncoder(SASRecConfig(**s["encoder_config"]))

    def forward(self, item: torch.Tensor, action: torch.Tensor, timestamp: torch.Tensor,
                lengths: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens, added, times, token_lengths = layout_tokens(item, action, timestamp, lengths, self.action_mode,
                                                            self.item_offset, self.action_offset)
        x = lookup_tokens(self.token_embeddings, self.features, tokens, added, token_lengths, self.dim)
        padded, padded_times = pad_tokens(x, times, token_lengths)
        h = self.encoder.forward_padded(padded, token_lengths, padded_times)
        b = token_lengths.numel()
        user = F.normalize(h[torch.arange(b), token_lengths - 1], dim=-1, eps=1e-6)
        catalog = torch.arange(self.num_items) + self.item_offset
        items = lookup_tokens(self.token_embeddings, self.features, catalog, None,
                              torch.tensor([self.num_items] + [0] * (b - 1)), self.dim)
        return {"user_embedding": user, "scores": user @ F.normalize(items, dim=-1, eps=1e-6).T}


class RetrievalPredictModule(PredictModule):
    """TorchRec ``PredictModule``: ``{"item", "action", "timestamp", "lengths"}`` ->
    ``{"user_embedding": (B, D), "scores": (B, N)}``."""

    def predict_forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.predict_module(batch["item"], batch.get("action", torch.zeros(0, dtype=torch.int64)),
                                   batch["timestamp"], batch["lengths"])


class RetrievalPredictFactory(PredictFactory):
    """Builds the quantised predict module from the package's settings and weights.

    Args:
        settings (Optional[Dict[str, Any]]): the recorded settings; read from the package
            when None (as TorchRec's loader calls it).
        weights (Optional[bytes]): safetensors bytes of the float model; idem.
    """

    def __init__(self, settings: Optional[Dict[str, Any]] = None, weights: Optional[bytes] = None) -> None:
        if settings is None:
            settings = json.loads(torch_package_importer.load_text("__configs", CONFIG_NAME))
            weights = torch_package_importer.load_binary("extra_files", WEIGHTS_NAME)
        self.settings = settings
        self.weights = weights

    def create_predict_module(self, world_size: int = 1, device: str = "cpu") -> nn.Module:
        from safetensors.torch import load as load_safetensors

        model = QuantRetrievalModel(self.settings)
        model.load_state_dict(load_safetensors(self.weights))
        model.eval()
        precision = self.settings["precision"]
        quantize_inference_model(model, per_table_weight_dtype={self.settings["table"]: _DTYPES[precision]},
                                 quantization_dtype=_DTYPES[precision])
        return RetrievalPredictModule(model, device=device)

    def batching_metadata(self) -> Dict[str, BatchingMetadata]:
        return {name: BatchingMetadata(type="dense", device="cpu", pinned=[])
                for name in ("item", "action", "timestamp", "lengths")}

    def result_metadata(self) -> str:
        return "dict_of_tensor"

    def run_weights_independent_tranformations(self, predict_module: nn.Module) -> nn.Module:
        return predict_module

    def run_weights_dependent_transformations(self, predict_module: nn.Module) -> nn.Module:
        return predict_module



def load_predict_factory(path: str, trust: bool = False) -> PredictFactory:
    """The ``PredictFactory`` inside a package written by ``genrec export --target
    torchrec-package``.

    A ``torch.package`` is code: loading one unpickles its contents and runs the modules it
    interns, so a tampered package runs whatever it holds. This function loads only when the
    caller says the file is trusted (built by you, or checked against a checksum you
    trust); serve untrusted files as a ``--target predictor`` artifact instead, which is
    loaded as data.

    Args:
        path (str): the ``.pt`` package.
        trust (bool): must be True: you vouch that the package is yours.

    Returns:
        PredictFactory: call ``create_predict_module()`` for the quantised module.

    Raises:
        PermissionError: ``trust`` is not True.

    Example::

        factory = load_predict_factory("hstu.torchrec.pt", trust=True)
        module = factory.create_predict_module()
    """
    if trust is not True:
        raise PermissionError(f"{path}: a torch.package unpickles and runs code when it loads; pass trust=True "
                              "only for a package you built or verified, or serve the `--target predictor` "
                              "artifact, which loads as data")
    from torch.package import PackageImporter

    return PackageImporter(path).import_module("__module_loader").MODULE_FACTORY()
