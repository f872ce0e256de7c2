"""MUSE: lifelong user interest from multimodal similarity (GSU) and two ESU modules.

- **GSU** (:func:`gsu_top_k`): cosine similarity between the target item's content vector
  and every behaviour's, over the user's whole history (jagged: no padding to the longest
  history while scoring), then the top-K behaviours (default 50).
- **SimTier** (:class:`SimTier`): the similarities of the retrieved behaviours as a
  histogram over tiers of width 0.1 on [-1, 1] (21 bins, the last one for exactly 1);
  each bin's feature is ``log(count + 1)`` times a learned per-bin weight.
- **SA-TA** (:class:`SimilarityAwareTargetAttention`): target attention over the
  retrieved behaviours' ID embeddings whose score fuses the ID attention ``alpha`` with the
  similarity ``R``: ``g1 * alpha + g2 * R + g3 * alpha * R + b``, softmax over the top-K,
  weighted sum of the ID embeddings.

:func:`target_attention_reference` is the same SA-TA over the whole sequence (no GSU):
the cost the GSU avoids, and the reference the tests compare against at K >= length.

Example::

    top = gsu_top_k(target_content, history_content, history_lengths, request_index, k=50)
    tiers = SimTier()(top.similarity, top.valid)                      # (C, 21)
    interest = SimilarityAwareTargetAttention(32)(target_id, history_id[top.index], top)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GSUResult", "SimTier", "SimilarityAwareTargetAttention", "gsu_top_k", "target_attention_reference"]


@dataclasses.dataclass
class GSUResult:
    """The top-K behaviours of each candidate.

    Attributes:
        index (torch.Tensor): ``(C, K)`` int64 rows of the flat (jagged) history values;
            0 where ``valid`` is False.
        similarity (torch.Tensor): ``(C, K)`` cosine similarity, descending; 0 where invalid.
        valid (torch.Tensor): ``(C, K)`` bool, False past the user's history length.
    """

    index: torch.Tensor
    similarity: torch.Tensor
    valid: torch.Tensor


def gsu_top_k(target: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, request_index: torch.Tensor,
              k: int = 50) -> GSUResult:
    """General search unit: cosine top-``k`` of each candidate's history.

    Args:
        target (torch.Tensor): ``(C, Dc)`` content vectors of the candidates.
        history (torch.Tensor): ``(n, Dc)`` content vectors of every request's behaviours,
            request after request (jagged values).
        lengths (torch.Tensor): ``(R,)`` behaviours per request.
        request_index (torch.Tensor): ``(C,)`` each candidate's request.
        k (int): behaviours kept.
    """
    device = target.device
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(lengths, 0)
    per_candidate = lengths[request_index]
    c = target.shape[0]
    max_len = int(per_candidate.max()) if c else 0
    width = max(min(k, max_len), 1)
    if max_len == 0:
        zeros = torch.zeros(c, width, device=device)
        return GSUResult(zeros.long(), zeros, zeros.bool())
    t = F.normalize(target.float(), dim=-1)
    history = history.float()
    inverse_norm = history.norm(dim=-1).clamp_min(1e-12).reciprocal()
    cand = torch.repeat_interleave(torch.arange(c, device=device), per_candidate)
    if lengths.numel() == c and torch.equal(request_index, torch.arange(c, device=device)):
        # One candidate per request (pointwise): the pairs are the history rows in order.
        rows = torch.arange(history.shape[0], device=device)
        pos = rows - offsets[:-1][cand]
        behaviours = history
    else:
        # Every (candidate, behaviour-of-its-request) pair, scored without padding.
        pos = torch.arange(cand.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(per_candidate, 0) - per_candidate, per_candidate)
        rows = offsets[request_index][cand] + pos
        behaviours = history[rows]
    sims = (behaviours * t[cand]).sum(-1) * inverse_norm[rows]
    grid = torch.full((c, max_len), -3.0, device=device)
    grid[cand, pos] = sims
    top, where = grid.topk(width, dim=1)
    valid = top > -2.0
    index = offsets[request_index].unsqueeze(1) + where  # position in the request -> flat row
    return GSUResult(torch.where(valid, index, 0), torch.where(valid, top, 0.0), valid)


class SimTier(nn.Module):
    """Similarity histogram over tiers of width ``bin_width`` on [-1, 1].

    Args:
        bin_width (float): tier width (0.1: 21 bins, the last for similarity exactly 1).

    Shape: ``(C, K)`` similarities and validity -> ``(C, num_bins)``.
    """

    def __init__(self, bin_width: float = 0.1) -> None:
        super().__init__()
        self.bin_width = bin_width
        self.num_bins = int(round(2.0 / bin_width)) + 1
        self.weight = nn.Parameter(torch.ones(self.num_bins))

    def histogram(self, similarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bins = torch.floor((similarity.clamp(-1.0, 1.0) + 1.0) / self.bin_width + 1e-6).long()
        bins = bins.clamp(0, self.num_bins - 1)
        counts = torch.zeros(similarity.shape[0], self.num_bins, device=similarity.device)
        return counts.scatter_add_(1, bins, valid.float())

    def forward(self, similarity: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.histogram(similarity, valid)) * self.weight


class SimilarityAwareTargetAttention(nn.Module):
    """SA-TA over the retrieved behaviours' ID embeddings.

    Args:
        dim (int): ID embedding width D.

    Shape: target ``(C, D)``, behaviours ``(C, K, D)``, similarity / valid ``(C, K)``
    -> ``(C, D)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        # g1 * alpha + g2 * R + g3 * alpha * R + b, as in MUSE.
        self.gamma = nn.Parameter(torch.tensor([1.0, 1.0, 0.0]))
        self.bias = nn.Parameter(torch.zeros(()))
        self.scale = 1.0 / math.sqrt(dim)

    def scores(self, target: torch.Tensor, behaviours: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        alpha = torch.einsum("cd,ckd->ck", self.query(target), self.key(behaviours)) * self.scale
        g1, g2, g3 = self.gamma
        return g1 * alpha + g2 * similarity + g3 * alpha * similarity + self.bias

    def forward(self, target: torch.Tensor, behaviours: torch.Tensor, similarity: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        scores = self.scores(target, behaviours, similarity).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a user with no history: zeros
        return torch.einsum("ck,ckd->cd", weights, behaviours)


def target_attention_reference(module: SimilarityAwareTargetAttention, target: torch.Tensor,
                               target_content: torch.Tensor, behaviours: torch.Tensor,
                               behaviour_content: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SA-TA over every behaviour (padded ``(C, L, ·)``, no retrieval): plain PyTorch."""
    sim = torch.einsum("cd,cld->cl", F.normalize(target_content, dim=-1), F.normalize(behaviour_content, dim=-1))
    return module(target, behaviours, sim, valid)
