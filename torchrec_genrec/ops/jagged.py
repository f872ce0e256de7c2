"""Small jagged-tensor helpers shared by modules (values + offsets, no padding)."""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


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


class JaggedAttentionPlan:
    """Length buckets of a jagged batch, for per-sequence dense attention.

    Sequences are cut into length buckets (:func:`plan_length_buckets`, cost = causal
    attention cells plus a fixed price per bucket) and reordered so that each bucket is a
    contiguous run of whole sequences: the *plan order*. In plan order a bucket is a slice
    of the values that fbgemm pads to its longest sequence and unpads again; pointwise
    layers do not care about the order, so a model reorders its tokens once
    (:meth:`to_plan_order`), runs every layer on them, and restores the input order once
    at the end (:meth:`to_input_order`) or never (a loss over positions).

    Args:
        offsets (torch.Tensor): ``(B + 1,)`` int64, the batch in input order.
        overhead_cells (float): the price of one bucket, in attention cells.

    Example::

        plan = JaggedAttentionPlan(offsets)
        qkv = plan.to_plan_order(qkv_values)                       # (T, 3, H, d)
        out = plan.to_input_order(jagged_causal_attention(qkv, plan))
    """

    def __init__(self, offsets: torch.Tensor, overhead_cells: float = 16384.0) -> None:
        lengths = (offsets[1:] - offsets[:-1]).cpu().numpy()
        self.total = int(offsets[-1])
        buckets = plan_length_buckets(lengths, lambda p: p * (p + 1) / 2.0, np.ones_like, overhead_cells)
        members = np.concatenate([m for m, _ in buckets]) if buckets else np.zeros(0, np.int64)
        device = offsets.device
        member_lengths = torch.from_numpy(lengths[members]).to(device)
        #: the plan order's offsets (sequences of the buckets one after the other)
        self.offsets = lengths_to_offsets(member_lengths)
        starts = offsets[:-1][torch.from_numpy(members).to(device)]
        self.order = (torch.repeat_interleave(starts - self.offsets[:-1], member_lengths, output_size=self.total)
                      + torch.arange(self.total, device=device))
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(self.total, device=device)
        #: per bucket: (first sequence, end sequence) in plan order and the padded length
        self.buckets: List[Tuple[int, int, int]] = []
        first = 0
        for m, width in buckets:
            self.buckets.append((first, first + len(m), int(width)))
            first += len(m)

    def to_plan_order(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.order]

    def to_input_order(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.inverse]

    def attention_cells(self) -> Tuple[int, int]:
        """(causal cells computed, causal cells of the sequences themselves)."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        computed = sum((hi - lo) * p * (p + 1) // 2 for lo, hi, p in self.buckets)
        return int(computed), int((lengths * (lengths + 1) // 2).sum())


def jagged_causal_attention(qkv: torch.Tensor, plan: JaggedAttentionPlan) -> torch.Tensor:
    """Causal softmax attention within each sequence of a jagged batch in plan order.

    Each bucket's slice of the values is padded to its longest sequence
    (``fbgemm.jagged_to_padded_dense``), attended with a causal mask and unpadded
    (``fbgemm.dense_to_jagged``); padding sits after the real tokens, so the causal mask
    alone keeps it out of every real row.

    Args:
        qkv (torch.Tensor): ``(T, 3, H, d)`` queries, keys, values, in ``plan``'s order.
        plan (JaggedAttentionPlan): the batch's buckets.

    Returns:
        torch.Tensor: ``(T, H, d)`` in plan order.
    """
    t, _, h, d = qkv.shape
    flat = qkv.reshape(t, 3 * h * d)
    outs = []
    for lo, hi, width in plan.buckets:
        offsets = plan.offsets[lo:hi + 1] - plan.offsets[lo]
        values = flat[int(plan.offsets[lo]):int(plan.offsets[hi])]
        padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [width], padding_value=0.0)
        q, k, v = padded.view(hi - lo, width, 3, h, d).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, H, P, d)
        dense = att.transpose(1, 2).reshape(hi - lo, width, h * d)
        outs.append(torch.ops.fbgemm.dense_to_jagged(dense, [offsets])[0])
    if not outs:
        return qkv.new_zeros(t, h, d)
    return torch.cat(outs).view(t, h, d)


def reference_causal_attention(qkv: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain reference of :func:`jagged_causal_attention`: one sequence at a time,
    ``(T, 3, H, d)`` -> ``(T, H, d)`` in the order of ``offsets``."""
    out = []
    for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        if hi > lo:
            q, k, v = qkv[lo:hi].permute(1, 2, 0, 3)
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1))
    return torch.cat(out) if out else qkv.new_zeros(qkv.shape[0], qkv.shape[2], qkv.shape[3])
