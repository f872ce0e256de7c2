"""Small jagged-tensor helpers shared by modules (values + offsets, no padding)."""

from __future__ import annotations

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B + 1,)`` int64 offsets, via fbgemm's complete cumsum."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.to(torch.int64))


def positions_in_sequence(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every jagged value within its own sequence.

    Args:
        offsets (torch.Tensor): ``(B + 1,)`` int64.
        total (int): ``T = offsets[-1]``.

    Returns:
        torch.Tensor: ``(T,)`` int64.

    Example::

        positions_in_sequence(torch.tensor([0, 3, 5]), 5)  # tensor([0, 1, 2, 0, 1])
    """
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def sequence_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Which sequence each jagged value belongs to: ``(T,)`` int64 in ``[0, B)``."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths, output_size=total)
