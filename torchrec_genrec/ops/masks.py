"""Attention masks over packed rows (several sequences laid end to end in one row)."""

from __future__ import annotations

import torch

__all__ = ["block_causal_mask"]


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` segment ids -> ``(B, L, L)`` bool: token ``i`` may attend to ``j`` iff
    both belong to the same (non-padding) segment and ``j <= i``.

    Args:
        segment (torch.Tensor): ``(B, L)`` int64, the sequence each token belongs to;
            ``-1`` marks padding (attends to nothing, attended by nothing).

    Example::

        block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0].int()
        # [[1, 0, 0, 0],
        #  [1, 1, 0, 0],
        #  [0, 0, 1, 0],
        #  [0, 0, 0, 0]]
    """
    same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(2) >= 0)
    causal = torch.ones(segment.shape[1], segment.shape[1], dtype=torch.bool, device=segment.device).tril()
    return same & causal
