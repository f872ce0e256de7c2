"""Small jagged-tensor helpers shared by modules (values + offsets, no padding)."""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
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


def plan_length_buckets(lengths: np.ndarray, work: Callable[[np.ndarray], np.ndarray],
                        calls: Callable[[np.ndarray], np.ndarray], overhead: float) -> List[Tuple[np.ndarray, int]]:
    """Cuts sequences into length buckets: ``[(sequence ids, padded length), ...]``.

    Sequences are sorted by length; a bucket is a run of the sorted order padded to its
    last (longest) member. The cut minimises ``sum_bucket(n * work(P) + overhead *
    calls(P))`` exactly (dynamic programme over the distinct lengths). Empty sequences
    are left out.

    Args:
        lengths (np.ndarray): ``(B,)`` sequence lengths.
        work (Callable): distinct padded lengths ``P`` -> cost of one sequence padded to each.
        calls (Callable): ``P`` -> fixed-price calls a bucket padded to each takes.
        overhead (float): price of one call, in ``work``'s units.

    Example::

        plan_length_buckets(np.array([3, 200, 4]), lambda P: P ** 2.0, np.ones_like, 1000.0)
        # [(array([0, 2]), 4), (array([1]), 200)]
    """
    nonempty = np.nonzero(lengths > 0)[0]
    if nonempty.size == 0:
        return []
    order = nonempty[np.argsort(lengths[nonempty], kind="stable")]
    uniq, counts = np.unique(lengths[order], return_counts=True)
    ends = np.cumsum(counts)  # a bucket ends after a run of equal lengths
    starts = np.concatenate([[0], ends])
    per_sequence = work(uniq)
    fixed = overhead * calls(uniq)
    best = np.zeros(uniq.size + 1)
    cut = np.zeros(uniq.size + 1, dtype=np.int64)
    for i in range(1, uniq.size + 1):
        # bucket covering distinct lengths j .. i-1, padded to uniq[i-1]
        cand = best[:i] + (ends[i - 1] - starts[:i]) * per_sequence[i - 1] + fixed[i - 1]
        j = int(np.argmin(cand))
        best[i] = cand[j]
        cut[i] = j
    buckets: List[Tuple[np.ndarray, int]] = []
    i = uniq.size
    while i > 0:
        j = int(cut[i])
        buckets.append((order[starts[j]:ends[i - 1]], int(uniq[i - 1])))
        i = j
    buckets.reverse()
    return buckets


def jagged_to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int, left: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows -> a zero-padded ``(B, max_len, D)`` block and its valid mask.

    Right padding goes through fbgemm's ``jagged_to_padded_dense``; left padding (the most
    recent event last, aligned across rows — what a recency cut slices) is an index-put.

    Args:
        values (torch.Tensor): ``(T, ...)`` rows of all sequences, sequence after sequence.
        lengths (torch.Tensor): ``(B,)`` int64, each ``<= max_len``.
        max_len (int): padded length.
        left (bool): pad on the left instead of the right.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``(B, max_len, ...)`` and the ``(B, max_len)``
        bool mask of real positions.

    Example::

        x, valid = jagged_to_padded(torch.ones(3, 2), torch.tensor([1, 2]), 2, left=True)
        valid  # tensor([[False, True], [True, True]])
    """
    b = lengths.numel()
    offsets = lengths_to_offsets(lengths)
    cols = torch.arange(max_len, device=values.device)
    if not left and values.dtype in (torch.float32, torch.float16, torch.bfloat16):
        valid = cols.view(1, max_len) < lengths.view(b, 1)
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], padding_value=0.0), valid
    # Left padding, or a dtype fbgemm's kernel does not take (int64 timestamps): index-put.
    shift = (max_len - lengths) if left else torch.zeros_like(lengths)
    valid = (cols.view(1, max_len) >= shift.view(b, 1)) & (cols.view(1, max_len) < (shift + lengths).view(b, 1))
    positions = positions_in_sequence(offsets, values.shape[0])
    rows = sequence_ids(offsets, values.shape[0])
    dest = rows * max_len + positions + shift[rows]
    out = values.new_zeros((b * max_len,) + tuple(values.shape[1:])).index_put((dest,), values)
    return out.view((b, max_len) + tuple(values.shape[1:])), valid
