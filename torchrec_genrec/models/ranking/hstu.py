"""The HSTU ranker: the user's merged history, then the candidates under a target-aware
mask (:mod:`torchrec_genrec.modules.hstu_ranker`), with two task heads at the candidate
positions (like = label, and the rating class). One pass scores all of a request's
candidates::

    out   = HSTU([history of the request ; its candidates])[candidate positions]   (C, D)
    x     = [out ; context(NS features)]
    logit = tower(x);  rating logits = rating_head(x)
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_genrec.batch import SEQUENCES, RankingBatch
from torchrec_genrec.models.ranking.features import Ranker, merged_history, mlp
from torchrec_genrec.modules.hstu import HSTUConfig
from torchrec_genrec.modules.hstu_ranker import HSTURankerEncoder

__all__ = ["HSTURanker"]


class HSTURanker(Ranker, architecture="hstu"):
    """The HSTU ranker (``model.name = "hstu"``, settings in ``model.hstu``).

    Args:
        config (RankerConfig): see :class:`~torchrec_genrec.models.ranking.features.Ranker`.
        vocab_sizes, num_genres, max_seq_len, seed, device, side: as for
            :class:`~torchrec_genrec.models.ranking.features.Ranker`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c, d = self.config, self.config.embedding_dim
        h = c.hstu
        self.hstu = HSTURankerEncoder(HSTUConfig(
            embedding_dim=d, num_blocks=h.num_layers, num_heads=h.num_heads, attention_dim=d // h.num_heads,
            linear_dim=d // h.num_heads, max_seq_len=2 * self.max_seq_len + 1, dropout=c.dropout))
        self.candidate_mlp = mlp([d + d, d], c.dropout, last_activation=False)
        self.context = mlp([self.ns_width, 2 * d, d], c.dropout)
        self.rating_head = nn.Linear(d + d, self.num_ratings)
        self.tower = self._tower(d + d)

    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """``(C,)`` like-logits of every candidate."""
        return self._heads(batch)[0]

    def forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training step: ``(loss, stats)``; the loss is the mean binary cross-entropy of
        the like-logits plus ``rating_loss_weight`` times the rating-class cross-entropy."""
        logits, rating_logits = self._heads(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        stats = {"bce": loss.detach()}
        weight = self.config.hstu.rating_loss_weight
        if weight > 0:
            rating_loss = F.cross_entropy(rating_logits, batch.rating)
            stats["rating_ce"] = rating_loss.detach()
            loss = loss + weight * rating_loss
        stats["loss"] = loss.detach()
        stats["samples"] = torch.tensor(float(batch.num_candidates), device=loss.device)
        return loss, stats

    def _heads(self, batch: RankingBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(C,)`` like-logits and ``(C, num_ratings)`` rating logits."""
        f = self.lookup(batch)
        d = self.config.embedding_dim
        # History tokens: item + rating + genres (the event MLP), one stream ordered by time.
        tokens = {name: f[f"{name}_events"] for name in SEQUENCES}
        history, valid, times = merged_history(batch, f, tokens, "timestamp", left=False)
        lengths = valid.sum(dim=1)
        # Candidates of each request side by side: (R, Cmax, D).
        slot = torch.arange(batch.num_candidates, device=history.device) - batch.first_candidate[batch.request_index]
        per_request = torch.bincount(batch.request_index, minlength=batch.num_requests)
        c_max = max(int(per_request.max()), 1)
        cand = self.candidate_mlp(torch.cat([f["target_item"], f["target_genres"]], dim=-1))
        grid = cand.new_zeros(batch.num_requests, c_max, d).index_put((batch.request_index, slot), cand)
        cand_time = batch.target_time.new_zeros(batch.num_requests, c_max).index_put(
            (batch.request_index, slot), batch.target_time)
        out = self.hstu(history, lengths, times, grid, cand_time)[batch.request_index, slot]  # (C, D)
        features = torch.cat([out, self.context(self._ns_inputs(f))], dim=-1)
        return self.tower(features).squeeze(-1), self.rating_head(features)
