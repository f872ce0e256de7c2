"""Constrained beam search over semantic IDs: decode an item's code path level by level,
only ever along paths that exist in the catalogue.

:class:`CodeTable` turns the catalogue's ``(N, L)`` codes into one sorted key array per
level — the key of a prefix is its codes read as a mixed-radix number — so "which codes may
follow these prefixes" is one ``searchsorted`` over a ``(..., K)`` block of candidate keys:
no Python per item or per beam, and memory linear in N (8 bytes per item and level; 1e7
items x 4 levels is 320 MB). :func:`constrained_beam_search` keeps the ``beam`` best
prefixes by summed log-probability, masks every invalid extension, removes excluded items
(a user's seen items) at the last level before the final selection, and returns item ids.

Example::

    table = CodeTable(codes, codebook_sizes=[256, 256, 256, 8])      # codes: (N, 4), unique rows
    items, scores = constrained_beam_search(step, table, batch_size=B, beam=20, k=10)
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

#: ``step(level, prefix_codes)``: log-probabilities of level ``level``'s codes given each
#: beam's prefix. ``prefix_codes`` is ``(B, W, level)`` int64; the result ``(B, W, K_level)``.
StepFn = Callable[[int, torch.Tensor], torch.Tensor]


class CodeTable:
    """The valid code paths of a catalogue.

    Args:
        codes (torch.Tensor): ``(N, L)`` int64, item ``i``'s semantic ID in row ``i``;
            rows must be unique (append a disambiguation level first, see
            ``modules.semantic_ids.disambiguate``).
        codebook_sizes (Sequence[int]): ``K_l`` per level; every code of level ``l`` is
            in ``[0, K_l)``.

    Raises:
        ValueError: codes out of range, duplicate rows, or more than 62 bits of keys.
    """

    def __init__(self, codes: torch.Tensor, codebook_sizes: Sequence[int]) -> None:
        if codes.dim() != 2 or codes.shape[1] != len(codebook_sizes) or codes.shape[0] == 0:
            raise ValueError(f"codes must be (N, {len(codebook_sizes)}) with N >= 1, got {tuple(codes.shape)}")
        self.sizes = [int(k) for k in codebook_sizes]
        if sum(math.log2(k) for k in self.sizes) > 62:
            raise ValueError(f"codebook sizes {self.sizes} need more than 62 bits per code path")
        codes = codes.to(torch.int64)
        for level, k in enumerate(self.sizes):
            column = codes[:, level]
            if int(column.min()) < 0 or int(column.max()) >= k:
                raise ValueError(f"level {level} codes must be in [0, {k}), got [{int(column.min())}, "
                                 f"{int(column.max())}]")
        self.levels = len(self.sizes)
        self.num_items = int(codes.shape[0])
        keys = torch.zeros(self.num_items, dtype=torch.int64, device=codes.device)
        self.prefix_keys: List[torch.Tensor] = []
        for level, k in enumerate(self.sizes):
            keys = keys * k + codes[:, level]
            self.prefix_keys.append(torch.unique(keys))  # sorted
        if self.prefix_keys[-1].numel() != self.num_items:
            raise ValueError(f"{self.num_items - self.prefix_keys[-1].numel()} items share a full code path with "
                             "another: append a disambiguation level (modules.semantic_ids.disambiguate)")
        order = torch.argsort(keys)
        self.item_by_key = order  # the item of prefix_keys[-1][j] is item_by_key[j]

    def to(self, device: torch.device) -> "CodeTable":
        self.prefix_keys = [k.to(device) for k in self.prefix_keys]
        self.item_by_key = self.item_by_key.to(device)
        return self

    def keys(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """``(..., l)`` codes -> ``(...,)`` prefix keys."""
        key = torch.zeros(prefix_codes.shape[:-1], dtype=torch.int64, device=prefix_codes.device)
        for level in range(prefix_codes.shape[-1]):
            key = key * self.sizes[level] + prefix_codes[..., level]
        return key

    def _lookup(self, level: int, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        table = self.prefix_keys[level]
        pos = torch.searchsorted(table, candidates.reshape(-1)).clamp_max(table.numel() - 1).reshape(candidates.shape)
        return table[pos] == candidates, pos

    def valid_next(self, level: int, prefix_keys: torch.Tensor) -> torch.Tensor:
        """``(...,)`` keys of level-``level`` prefixes (``level`` codes each; zeros at level
        0) -> ``(..., K_level)`` bool: which codes extend them to a path that exists."""
        codes = torch.arange(self.sizes[level], device=prefix_keys.device)
        return self._lookup(level, prefix_keys.unsqueeze(-1) * self.sizes[level] + codes)[0]

    def items_of(self, full_keys: torch.Tensor) -> torch.Tensor:
        """Item ids of full code-path keys; -1 where no item has that path."""
        hit, pos = self._lookup(self.levels - 1, full_keys)
        return torch.where(hit, self.item_by_key[pos], torch.full_like(full_keys, -1))

    def codes_of(self, items: torch.Tensor) -> torch.Tensor:
        """``(...,)`` item ids -> ``(..., L)`` codes (inverse of :meth:`items_of`)."""
        where = torch.empty_like(self.item_by_key)
        where[self.item_by_key] = torch.arange(self.num_items, device=where.device)
        key = self.prefix_keys[-1][where[items]]
        out = []
        for k in reversed(self.sizes):
            out.append(key % k)
            key = key // k
        return torch.stack(out[::-1], dim=-1)


def constrained_beam_search(step: StepFn, table: CodeTable, batch_size: int, beam: int, k: int,
                            exclude_values: Optional[torch.Tensor] = None,
                            exclude_offsets: Optional[torch.Tensor] = None,
                            device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` items with the highest summed code log-probability found by a beam of
    width ``beam`` that only follows code paths of :class:`CodeTable` ``table``.

    Args:
        step (StepFn): ``step(level, prefix_codes (B, W, level)) -> (B, W, K_level)``
            log-probabilities.
        table (CodeTable): the valid paths (on ``device``).
        batch_size (int): B.
        beam (int): W, beams kept per level (``>= k``).
        k (int): items returned per row.
        exclude_values, exclude_offsets (Optional[torch.Tensor]): per row, items never to
            return (jagged: ``values[offsets[b]:offsets[b + 1]]``), e.g. the user's seen
            items; removed at the last level before the final selection, so they take no
            beam.
        device (Optional[torch.device]): where to search (default: the table's).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``(B, k)`` item ids and their summed
        log-probabilities, best first; -1 / -inf where fewer than ``k`` paths remain.
    """
    if beam < k or k < 1:
        raise ValueError(f"the beam must be at least k >= 1, got beam {beam}, k {k}")
    device = device or table.prefix_keys[0].device
    codes = torch.zeros(batch_size, 1, 0, dtype=torch.int64, device=device)
    scores = torch.zeros(batch_size, 1, device=device)
    excluded = None
    if exclude_values is not None and exclude_values.numel():
        excluded = _padded_sorted(exclude_values.to(device), exclude_offsets.to(device), batch_size)
    for level in range(table.levels):
        log_p = step(level, codes).float()  # (B, W, K)
        size = table.sizes[level]
        if log_p.shape != (batch_size, codes.shape[1], size):
            raise ValueError(f"step({level}) returned {tuple(log_p.shape)}, expected "
                             f"{(batch_size, codes.shape[1], size)}")
        keys = table.keys(codes)  # (B, W)
        total = scores.unsqueeze(-1) + log_p
        total = total.masked_fill(~table.valid_next(level, keys), float("-inf"))
        if level == table.levels - 1 and excluded is not None:
            items = table.items_of(keys.unsqueeze(-1) * size + torch.arange(size, device=device))
            total = total.masked_fill(_member(items.reshape(batch_size, -1), excluded).reshape(total.shape),
                                      float("-inf"))
        width = min(beam if level < table.levels - 1 else k, total.shape[1] * size)
        scores, flat = torch.topk(total.reshape(batch_size, -1), width, dim=1)
        parent, code = flat // size, flat % size
        codes = torch.cat([torch.gather(codes, 1, parent.unsqueeze(-1).expand(-1, -1, codes.shape[2])),
                           code.unsqueeze(-1)], dim=2)
    items = table.items_of(table.keys(codes))
    items = torch.where(torch.isfinite(scores), items, torch.full_like(items, -1))
    if items.shape[1] < k:  # a catalogue smaller than k
        pad = k - items.shape[1]
        items = torch.cat([items, items.new_full((batch_size, pad), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((batch_size, pad), float("-inf"))], dim=1)
    return items, scores


def _padded_sorted(values: torch.Tensor, offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Jagged per-row items -> ``(B, S)`` sorted rows padded with -1 at the front."""
    lengths = offsets[1:] - offsets[:-1]
    width = max(int(lengths.max()), 1) if lengths.numel() else 1
    row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths)
    pos = torch.arange(values.numel(), device=values.device) - offsets[:-1][row]
    out = torch.full((rows, width), -1, dtype=torch.int64, device=values.device)
    out[row, pos] = values.to(torch.int64)
    return torch.sort(out, dim=1).values


def _member(items: torch.Tensor, sorted_rows: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bool: is ``items[b, c]`` in row ``b`` of ``sorted_rows`` (never for -1)."""
    pos = torch.searchsorted(sorted_rows, items).clamp_max(sorted_rows.shape[1] - 1)
    return (torch.gather(sorted_rows, 1, pos) == items) & (items >= 0)
