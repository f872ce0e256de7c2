"""OneTrans as a ranker: one causal transformer over ``[S-tokens ; NS-tokens]``
(:mod:`torchrec_genrec.modules.onetrans`).

The S-tokens are both behaviour sequences merged into one (interleaved by time with a
sequence-type embedding, or concatenated with [SEP]s); the NS-tokens are the
non-sequential features, tokenized by one MLP split into tokens (auto-split) or one MLP
per feature group (group-wise). The S side runs once per request (Stage I) and each
candidate's NS tokens attend to its cached keys and values (Stage II)::

    cache  = OneTrans.encode_sequence(S-tokens of each request)        Stage I
    ns_out = OneTrans.forward_cached(cache, NS-tokens of each candidate)  Stage II
    logit  = tower(ns_out.flatten(1))
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from torchrec_genrec.batch import SEQUENCES, RankingBatch
from torchrec_genrec.models.ranking.features import Ranker, merged_history, mlp
from torchrec_genrec.modules.onetrans import OneTrans, OneTransConfig

__all__ = ["OneTransRanker"]


class OneTransRanker(Ranker, architecture="onetrans"):
    """The OneTrans ranker (``model.name = "onetrans"``, settings in ``model.onetrans``).

    Args:
        config (RankerConfig): see :class:`~torchrec_genrec.models.ranking.features.Ranker`.
        vocab_sizes, num_genres, max_seq_len, seed, device, side: as for
            :class:`~torchrec_genrec.models.ranking.features.Ranker`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c, d = self.config, self.config.embedding_dim
        o = c.onetrans
        self.type_embedding = nn.Embedding(len(SEQUENCES), d)
        self.sep_tokens = nn.Parameter(torch.randn(len(SEQUENCES), d) * 0.02)
        if o.ns_tokenizer == "auto_split":
            self.num_ns = o.num_ns_tokens
            self.ns_tokenizer = mlp([self.ns_width, 2 * d * self.num_ns, d * self.num_ns], c.dropout,
                                    last_activation=False)
        else:
            self.ns_groups = self.ns_feature_groups()
            self.num_ns = len(self.ns_groups)
            self.ns_group_mlps = nn.ModuleDict({g: mlp([len(f) * d, d, d], c.dropout, last_activation=False)
                                                for g, f in self.ns_groups.items()})
        self.onetrans = OneTrans(OneTransConfig(
            embedding_dim=d, num_layers=o.num_layers, num_heads=o.num_heads, num_ns_tokens=self.num_ns,
            dropout=c.dropout, pyramid=o.pyramid, pyramid_min_s_tokens=o.pyramid_min_s_tokens,
            selection=o.selection, shared_ns_params=o.shared_ns_params,
            max_s_tokens=2 * self.max_seq_len + (len(SEQUENCES) if o.merge == "sep" else 0)))
        self.tower = self._tower(self.num_ns * d)

    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """``(C,)`` like-logits of every candidate."""
        f = self.lookup(batch)
        merge = self.config.onetrans.merge
        tokens = {name: f[f"{name}_events"] + (self.type_embedding.weight[i] if merge == "timestamp" else 0.0)
                  for i, name in enumerate(SEQUENCES)}
        s_tokens, s_valid, _ = merged_history(batch, f, tokens, merge, left=True, sep_tokens=self.sep_tokens)
        cache = self.onetrans.encode_sequence(s_tokens, s_valid)  # Stage I: once per request
        ns_out = self.onetrans.forward_cached(cache, self._ns_tokens(f), batch.request_index)  # Stage II
        return self.tower(ns_out.flatten(1)).squeeze(-1)

    def _ns_tokens(self, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``(C, num_ns, D)`` NS tokens of every candidate."""
        d = self.config.embedding_dim
        if self.config.onetrans.ns_tokenizer == "auto_split":
            x = self.ns_tokenizer(self._ns_inputs(f))
            return x.view(x.shape[0], self.num_ns, d)
        return torch.stack([self.ns_group_mlps[g](torch.cat([f[k] for k in feats], dim=-1))
                            for g, feats in self.ns_groups.items()], dim=1)
