"""DIN: target attention over a behaviour sequence (Deep Interest Network, Alibaba).

Each past event is scored against the candidate by a small MLP over
``[q, k, q - k, q * k]`` (query = the candidate, key = the event), and the events are
summed with those scores as weights. The weights are not normalised (no softmax): how much
of the history matches the candidate stays visible in the pooled vector's size.

:func:`din_reference` is the same pooling written candidate by candidate over the
unpadded history: the plain reading the tests compare against.

Example::

    din = DINAttention(embedding_dim=32, hidden_dim=64)
    # 2 candidates; the first has 3 past events, the second 1 (padding marked invalid)
    keys = torch.randn(2, 3, 32)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    pooled = din(query=torch.randn(2, 32), keys=keys, valid=valid)   # (2, 32)
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["DINAttention", "din_reference"]


class DINAttention(nn.Module):
    """DIN's target attention: the events weighted by an MLP score against the candidate, summed.

    Args:
        embedding_dim (int): width D of the query and the events.
        hidden_dim (int): hidden size H of the scoring MLP ``4D -> H -> 1`` (SiLU).

    Shape: query ``(C, D)``, keys ``(C, L, D)``, valid ``(C, L)`` bool -> ``(C, D)``.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(C, L)`` unnormalised attention scores of every event."""
        q = query.unsqueeze(1).expand_as(keys)
        return self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Args:
            query (torch.Tensor): ``(C, D)`` the candidates.
            keys (torch.Tensor): ``(C, L, D)`` padded past events of each candidate's user.
            valid (torch.Tensor): ``(C, L)`` bool, False at padding.

        Returns:
            torch.Tensor: ``(C, D)`` the score-weighted sum of each candidate's events.
        """
        weights = self.scores(query, keys)
        return (weights * valid).unsqueeze(-1).mul(keys).sum(dim=1)


def din_reference(module: DINAttention, query: torch.Tensor, events: List[torch.Tensor]) -> torch.Tensor:
    """:class:`DINAttention` candidate by candidate, each over its own ``(L_c, D)`` events
    (no padding): plain PyTorch. Returns ``(C, D)``."""
    out = []
    for q, k in zip(query, events):
        score = module.mlp(torch.cat([q.expand_as(k), k, q - k, q * k], dim=-1))  # (L_c, 1)
        out.append((score * k).sum(dim=0))
    return torch.stack(out)
