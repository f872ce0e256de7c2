"""Quantised embedding tables: TorchRec's inference collections at an artifact's precision.

Export quantises a trained token table with :func:`quantize_token_table` (TorchRec's
``quantize_inference_model``: a ``QuantEmbeddingCollection`` over fbgemm's inference TBE,
int8 row-wise with a per-row fp16 scale and bias, or fp16, or fp32) and writes its rows as
they are; the predictor builds the same empty collection with :func:`build_quant_table`
and loads those rows back without re-quantising.

Example::

    quant = quantize_token_table(model.token_embeddings, "int8")
    table = build_quant_table("tokens", rows, dim, ["history"], "int8")
    table.load_state_dict(quant.state_dict())
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.inference.modules import quantize_inference_model
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection

__all__ = ["PRECISIONS", "TORCH_DTYPES", "build_quant_table", "quantize_token_table"]

#: Export precisions of the token table and the TorchRec data type each maps to.
PRECISIONS: Dict[str, DataType] = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
#: The torch dtype TorchRec's inference quantisation takes for each precision.
TORCH_DTYPES = {"fp32": torch.float, "fp16": torch.half, "int8": torch.qint8}


def _table_config(name: str, rows: int, dim: int, features: List[str], precision: str) -> EmbeddingConfig:
    return EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=list(features),
                           data_type=PRECISIONS[precision])


def quantize_token_table(collection: EmbeddingCollection, precision: str) -> QuantEmbeddingCollection:
    """A trained (float, unsharded) collection -> TorchRec's quantised inference collection.

    Args:
        collection (EmbeddingCollection): the model's token collection, on CPU.
        precision (str): ``fp32``, ``fp16`` or ``int8``.

    Returns:
        QuantEmbeddingCollection: fbgemm inference TBE rows at that precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    holder = nn.Module()
    holder.collection = collection
    quantize_inference_model(holder, per_table_weight_dtype={c.name: TORCH_DTYPES[precision]
                                                             for c in collection.embedding_configs()},
                             quantization_dtype=TORCH_DTYPES[precision])
    return holder.collection


def build_quant_table(name: str, rows: int, dim: int, features: List[str], precision: str,
                      device: torch.device = torch.device("cpu")) -> QuantEmbeddingCollection:
    """An empty quantised collection with the layout :func:`quantize_token_table` writes,
    ready for ``load_state_dict`` of an artifact's table."""
    return QuantEmbeddingCollection(tables=[_table_config(name, rows, dim, features, precision)],
                                    device=device, output_dtype=torch.float)
