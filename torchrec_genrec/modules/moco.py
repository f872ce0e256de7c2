"""MoCo adaptation of frozen content vectors to behaviour (MUSE's SCL).

A residual MLP adapter (:class:`ContentAdapter`) maps a content vector to
``normalize(x + MLP(x))``. Two copies: the query adapter learns; the key adapter follows it
by momentum and fills a queue of past keys, the negatives. For a positive pair ``(a, b)``
(item ``b`` engaged with right after item ``a`` by the same user) the query of ``a``
should score the key of ``b`` above every queued key (InfoNCE).

Example::

    moco = MoCo(dim=384, queue_size=4096, generator=torch.Generator().manual_seed(0))
    loss, keys = moco(content[a], content[b])          # (), (B, D)
    ...backward, optimiser step...
    moco.momentum_update(keys)                          # key adapter and queue follow
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContentAdapter", "MoCo"]


class ContentAdapter(nn.Module):
    """A residual MLP that adapts frozen content vectors: ``normalize(x + MLP(x))``.

    Args:
        dim (int): content width D.
        hidden (int): MLP width.

    Shape: ``(N, D) -> (N, D)``, unit rows. The last layer starts at zero, so the
    adapter starts as the identity (on normalised inputs).
    """

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.mlp(x), dim=-1)


class MoCo(nn.Module):
    """Query and momentum key adapters with a queue of past keys.

    Args:
        dim (int): content width D.
        queue_size (int): queued keys (negatives).
        momentum (float): the key adapter's momentum.
        temperature (float): InfoNCE temperature.
        generator (Optional[torch.Generator]): draws the initial queue.
    """

    def __init__(self, dim: int, queue_size: int = 4096, momentum: float = 0.99, temperature: float = 0.07,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.momentum, self.temperature = momentum, temperature
        self.query = ContentAdapter(dim)
        self.key = ContentAdapter(dim)
        self.key.load_state_dict(self.query.state_dict())
        for p in self.key.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=generator), dim=-1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, D)`` anchor and positive content vectors -> the mean InfoNCE loss and the
        ``(B, D)`` keys of the positives (for :meth:`momentum_update`)."""
        q = self.query(anchors)
        with torch.no_grad():
            k = self.key(positives)
        logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ self.queue.T], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)), k

    @torch.no_grad()
    def momentum_update(self, keys: torch.Tensor) -> None:
        """After the query adapter's optimiser step: the key adapter moves towards it and
        ``keys`` replace the oldest queued keys."""
        for pk, pq in zip(self.key.parameters(), self.query.parameters()):
            pk.mul_(self.momentum).add_(pq, alpha=1 - self.momentum)
        n, size = keys.shape[0], self.queue.shape[0]
        start = int(self.pointer)
        slots = (torch.arange(n, device=keys.device) + start) % size
        self.queue[slots] = keys
        self.pointer.fill_((start + n) % size)
