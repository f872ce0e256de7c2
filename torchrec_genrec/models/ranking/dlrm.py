"""DCNv2 + DIN (the DLRM baseline): sequence modelling and feature crossing kept apart.

DIN target attention (:class:`~torchrec_genrec.modules.din.DINAttention`) pools each
behaviour sequence against the candidate; DCNv2 (TorchRec's ``CrossNet``) and a deep MLP
cross the non-sequential features; their outputs, concatenated, go through the final MLP::

    query  = MLP([target item ; target genres])                       (C, D)
    pooled = [DIN_s(query, events of sequence s) for s in SEQUENCES]   (C, D) each
    logit  = tower([CrossNet(ns) ; deep(ns) ; *pooled ; MUSE])
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet

from torchrec_genrec.batch import SEQUENCES, RankingBatch
from torchrec_genrec.models.ranking.features import Ranker, mlp
from torchrec_genrec.modules.din import DINAttention
from torchrec_genrec.ops.jagged import jagged_to_padded

__all__ = ["DLRMRanker"]


class DLRMRanker(Ranker, architecture="dlrm"):
    """The DCNv2 + DIN ranker (``model.name = "dlrm"``, settings in ``model.dlrm``).

    MUSE's lifelong features go to the final MLP as they are (SimTier's histogram and
    SA-TA's vector), not through the crossing.

    Args:
        config (RankerConfig): see :class:`~torchrec_genrec.models.ranking.features.Ranker`.
        vocab_sizes, num_genres, max_seq_len, seed, device, side: as for
            :class:`~torchrec_genrec.models.ranking.features.Ranker`.
    """

    muse_in_ns_features = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c, d = self.config, self.config.embedding_dim
        self.din = nn.ModuleDict({name: DINAttention(d, c.dlrm.din_hidden) for name in SEQUENCES})
        self.target_mlp = mlp([d + d, d], c.dropout, last_activation=False)
        self.cross = CrossNet(self.ns_width, c.dlrm.cross_layers)
        self.deep = mlp([self.ns_width, 2 * d, d], c.dropout)
        muse_width = (self.simtier.num_bins if self.simtier is not None else 0) + (d if self.sata is not None else 0)
        self.tower = self._tower(self.ns_width + d + len(SEQUENCES) * d + muse_width)

    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """``(C,)`` like-logits of every candidate."""
        f = self.lookup(batch)
        ns = self._ns_inputs(f)
        query = self.target_mlp(torch.cat([f["target_item"], f["target_genres"]], dim=-1))  # (C, D)
        pooled = [self._din(batch, f, name, query) for name in SEQUENCES]
        if "muse_tower" in f:
            pooled.append(f["muse_tower"])
        features = torch.cat([self.cross(ns), self.deep(ns), *pooled], dim=-1)
        return self.tower(features).squeeze(-1)

    def _din(self, batch: RankingBatch, f: Dict[str, torch.Tensor], name: str, query: torch.Tensor) -> torch.Tensor:
        """``(C, D)``: sequence ``name`` pooled by DIN against each candidate (every
        candidate of a request reads that request's events)."""
        lengths = batch.sequence_lengths(name)
        keys, valid = jagged_to_padded(f[f"{name}_events"], lengths, max(int(lengths.max()), 1))
        keys, valid = keys[batch.request_index], valid[batch.request_index]  # (C, L, D)
        return self.din[name](query, keys, valid)
