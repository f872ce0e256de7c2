"""LUM's training data: alternating ``<condition, item>`` token sequences, packed into rows.

Each user's events before the ranking split's validation cutoff (a
:class:`~torchrec_genrec.train.content.BehaviourLog`) become the token sequence
``c_1, i_1, c_2, i_2, ...`` of the unified token space, where the condition ``c_t``
precedes the item ``i_t`` it conditions. Conditions are declared per dataset
(:data:`CONDITIONS`): MovieLens offers the genre of the next item, its hour bucket or its
weekday. A model trained on these sequences predicts, at each condition position, the item
that follows (next-condition-item prediction).

Packing (:func:`pack_sequences`) puts several users' sequences into one fixed-length row
(first-fit decreasing); :func:`block_causal_mask` lets a token attend only to earlier
tokens of its own user, so no compute goes to padding and no user sees another.

Example::

    log = behaviour_log(store)
    seqs = condition_item_sequences(store, log, "genre", max_events=100)
    rows = pack_sequences(seqs.lengths(), row_len=256)       # list of sequence ids per row
    batch = seqs.packed_rows(rows, 256)                      # tokens, segments, positions
    mask = block_causal_mask(batch.segment)                  # (B, 256, 256) bool
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.streamable import Pipelineable

from torchrec_genrec.batch import HOUR_BUCKET, REQUEST_CONDITION_CODES
from torchrec_genrec.data.ranking import _per_second, hour_and_weekday
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.ops.masks import block_causal_mask
from torchrec_genrec.tokens import TokenSpace

__all__ = ["CONDITIONS", "HOUR_BUCKET", "ITEM_CONDITIONS", "REQUEST_CONDITION_CODES", "ConditionItemSequences",
           "LUMBatch", "LUMEpochs", "PackedRows", "user_folds", "batch_by_tokens", "block_causal_mask", "condition_given_item", "condition_item_sequences",
           "condition_vocabulary", "item_conditions", "pack_sequences", "padding_waste"]


def _genre_condition(store: SequenceStore, items: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """The item's first genre (1..G; 0 when it has none)."""
    table = store.item_features()
    genres = table.column("genres").to_pylist() if table is not None and "genres" in table.column_names else None
    if genres is None:
        raise ValueError("the genre condition needs item genres (items.parquet with a genres column)")
    vocab = sorted({g for gs in genres for g in (gs or [])})
    index = {g: i + 1 for i, g in enumerate(vocab)}
    first = np.asarray([index[gs[0]] if gs else 0 for gs in genres], dtype=np.int64)
    return first[items]


#: Conditions per dataset: name -> (function of (store, items, seconds) -> ids, vocabulary size).
CONDITIONS: Dict[str, Callable[[SequenceStore, np.ndarray, np.ndarray], np.ndarray]] = {
    "genre": _genre_condition,
    "hour": lambda store, items, seconds: hour_and_weekday(seconds)[0] // HOUR_BUCKET,  # 8 three-hour buckets
    "weekday": lambda store, items, seconds: hour_and_weekday(seconds)[1],
    # One constant condition: the unconditioned model (same architecture, no information).
    "none": lambda store, items, seconds: np.zeros(len(items), dtype=np.int64),
}
_CONDITION_SIZES = {"hour": 8, "weekday": 7, "none": 1}
#: Conditions that are attributes of the item (known for every item, not only from events).
ITEM_CONDITIONS = ("genre",)


def item_conditions(store: SequenceStore, condition: str) -> np.ndarray:
    """``(I,)`` every catalogue item's value of an item-attribute condition (a time
    condition evaluated here reads time 0 and means nothing)."""
    return np.asarray(CONDITIONS[condition](store, np.arange(store.num_items),
                                            np.zeros(store.num_items, dtype=np.int64)), dtype=np.int64)


def condition_vocabulary(store: SequenceStore, condition: str) -> int:
    """How many values the condition takes (its condition tokens)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown LUM condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    return _CONDITION_SIZES.get(condition) or int(item_conditions(store, condition).max()) + 1


def condition_given_item(store: SequenceStore, log, condition: str) -> np.ndarray:
    """``(I, C)`` ``p(condition | item)``: exact (0 or 1) for an item attribute; for an
    event condition (hour, weekday) the item's frequency under each value in ``log``
    (events before the validation cutoff), add-one smoothed."""
    size = condition_vocabulary(store, condition)
    if condition in ITEM_CONDITIONS:
        return np.eye(size)[item_conditions(store, condition)]
    seconds = np.asarray(log.timestamp, dtype=np.int64) // _per_second(store)
    values = np.asarray(CONDITIONS[condition](store, log.item, seconds), dtype=np.int64)
    counts = np.zeros((store.num_items, size))
    np.add.at(counts, (log.item, values), 1.0)
    return (counts + 1.0) / (counts.sum(1, keepdims=True) + size)


@dataclasses.dataclass
class ConditionItemSequences:
    """Per user, ``2 * n`` tokens ``c_1, i_1, ..., c_n, i_n`` (CSR over users).

    Attributes:
        tokens (np.ndarray): token ids of the unified token space.
        offsets (np.ndarray): ``(U + 1,)``; user ``u``'s tokens are ``offsets[u]:offsets[u+1]``.
        timestamps (np.ndarray): each token's event time (a condition has its item's).
        space (TokenSpace): kinds ``special``, ``item``, ``condition``.
        condition (str): which condition.
        seen_items, seen_offsets (np.ndarray): every item of each user's pre-cutoff log
            (CSR over users), however many events ``max_events`` kept.
        cutoff (int): the behaviour cutoff (every event is strictly before it).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    timestamps: np.ndarray
    space: TokenSpace
    condition: str
    seen_items: np.ndarray
    seen_offsets: np.ndarray
    cutoff: int

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seen(self, user: int) -> torch.Tensor:
        """Every distinct item of the user's whole pre-cutoff log (not only the
        ``max_events`` kept as tokens): what retrieval must not recommend again."""
        return torch.from_numpy(np.unique(self.seen_items[self.seen_offsets[user]:self.seen_offsets[user + 1]]))

    def is_condition(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.space.is_kind(tokens, "condition")

    def packed_rows(self, rows: Sequence[Sequence[int]], row_len: int) -> "PackedRows":
        """The given rows of sequences (from :func:`pack_sequences`) as dense tensors."""
        b = len(rows)
        tokens = np.zeros((b, row_len), dtype=np.int64)  # 0 = [PAD]
        segment = np.full((b, row_len), -1, dtype=np.int64)
        position = np.zeros((b, row_len), dtype=np.int64)
        times = np.zeros((b, row_len), dtype=np.int64)
        for r, seqs in enumerate(rows):
            at = 0
            for s in seqs:
                lo, hi = self.offsets[s], self.offsets[s + 1]
                n = hi - lo
                if at + n > row_len:
                    raise ValueError(f"row {r} overflows {row_len} tokens: pack with pack_sequences")
                tokens[r, at:at + n] = self.tokens[lo:hi]
                segment[r, at:at + n] = s
                position[r, at:at + n] = np.arange(n)
                times[r, at:at + n] = self.timestamps[lo:hi]
                at += n
        return PackedRows(*(torch.from_numpy(x) for x in (tokens, segment, position, times)))

    def jagged_batch(self, users: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The given users' tokens in the library's jagged layout: ``(T,)`` values, one
        user after the other, and ``(B + 1,)`` offsets."""
        users = np.asarray(users, dtype=np.int64)
        lo, hi = self.offsets[users], self.offsets[users + 1]
        values = np.concatenate([self.tokens[a:b] for a, b in zip(lo, hi)]) if len(users) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
        return torch.from_numpy(values), torch.from_numpy(offsets)


@dataclasses.dataclass
class PackedRows:
    """``(B, L)`` tensors: ``tokens`` (0 = padding), ``segment`` (the user's sequence id,
    -1 on padding), ``position`` within the user's sequence, ``timestamps``."""

    tokens: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    timestamps: torch.Tensor


def condition_item_sequences(store: SequenceStore, log, condition: str = "genre",
                             max_events: int = 100) -> ConditionItemSequences:
    """The ``<condition, item>`` sequences of ``log``'s events (the most recent
    ``max_events`` per user; users with none get an empty sequence).

    Args:
        log (BehaviourLog): events before the validation cutoff.
        condition (str): a key of :data:`CONDITIONS`.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown LUM condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    seconds = np.asarray(log.timestamp, dtype=np.int64) // _per_second(store)
    cond = np.asarray(CONDITIONS[condition](store, log.item, seconds), dtype=np.int64)
    # The vocabulary of the whole catalogue, not only of the log's items (queries use it too).
    size = condition_vocabulary(store, condition)
    space = TokenSpace.build(num_items=log.num_items, contexts={"condition": size})
    counts = np.bincount(log.user, minlength=log.num_users)
    # Keep each user's most recent max_events (the log is in user, then time order).
    rank_from_end = np.concatenate([np.arange(c)[::-1] for c in counts]) if len(counts) else np.zeros(0, np.int64)
    keep = rank_from_end < max_events
    user, item, cond, ts = log.user[keep], log.item[keep], cond[keep], np.asarray(log.timestamp)[keep]
    tokens = np.empty(2 * len(item), dtype=np.int64)
    tokens[0::2] = space.to_tokens("condition", torch.from_numpy(cond)).numpy()
    tokens[1::2] = space.to_tokens("item", torch.from_numpy(item)).numpy()
    times = np.repeat(ts, 2)
    per_user = 2 * np.bincount(user, minlength=log.num_users)
    offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    seen_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ConditionItemSequences(tokens, offsets, times, space, condition, np.asarray(log.item, dtype=np.int64),
                                  seen_offsets, int(log.cutoff))


def pack_sequences(lengths: np.ndarray, row_len: int) -> List[List[int]]:
    """First-fit decreasing: sequence ids per row, each row holding at most ``row_len``
    tokens; empty sequences are left out. A sequence longer than a row is an error (cap
    it with ``max_events``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > row_len).any():
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit a row of {row_len}; "
                         "lower max_events or raise row_len")
    rows: List[List[int]] = []
    free: List[int] = []
    for s in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[s])
        if n == 0:
            continue
        for r, space_left in enumerate(free):
            if space_left >= n:
                rows[r].append(s)
                free[r] -= n
                break
        else:
            rows.append([s])
            free.append(row_len - n)
    return rows


def batch_by_tokens(lengths: np.ndarray, order: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Consecutive users of ``order`` grouped into batches of at most ``max_tokens`` tokens
    (a longer user gets a batch alone); empty sequences are left out. The jagged layout's
    batching: a batch holds exactly its users' tokens."""
    batches: List[List[int]] = [[]]
    used = 0
    for s in order:
        n = int(lengths[s])
        if n == 0:
            continue
        if batches[-1] and used + n > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append(int(s))
        used += n
    return [b for b in batches if b]


def padding_waste(lengths: np.ndarray, row_len: int, rows: List[List[int]]) -> Dict[str, float]:
    """Share of attention-matrix work spent on padding: packed rows vs one user per row
    padded to the longest sequence (tokens and ``L^2`` attention cells)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths[lengths > 0]
    useful_tokens, useful_cells = float(used.sum()), float((used * (used + 1) // 2).sum())
    padded_len = int(used.max())
    return {
        "packed_token_waste": 1.0 - useful_tokens / (len(rows) * row_len),
        "padded_token_waste": 1.0 - useful_tokens / (len(used) * padded_len),
        "packed_cell_waste": 1.0 - useful_cells / (len(rows) * row_len * (row_len + 1) / 2),
        "padded_cell_waste": 1.0 - useful_cells / (len(used) * padded_len * (padded_len + 1) / 2),
    }


@dataclasses.dataclass
class LUMBatch(Pipelineable):
    """A training batch of LUM: the library's jagged layout (``tokens`` ``(T,)`` one user
    after the other, ``offsets`` ``(B + 1,)``) or packed rows (``tokens``, ``segment``,
    ``position`` ``(B, L)``, ``offsets`` unused)."""

    tokens: torch.Tensor
    offsets: Optional[torch.Tensor] = None
    segment: Optional[torch.Tensor] = None
    position: Optional[torch.Tensor] = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LUMBatch":
        return LUMBatch(*(None if x is None else fn(x) for x in (self.tokens, self.offsets, self.segment,
                                                                  self.position)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "LUMBatch":
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for x in (self.tokens, self.offsets, self.segment, self.position):
            if x is not None:
                x.record_stream(stream)

    def pin_memory(self) -> "LUMBatch":
        return self._map(lambda x: x.pin_memory())


def user_folds(num_users: int, folds: int) -> np.ndarray:
    """``(U,)`` each user's cross-fitting fold: ``u % folds``."""
    return np.arange(num_users, dtype=np.int64) % folds


class LUMEpochs:
    """One epoch's LUM batches in a fresh random order, this rank's share: the trainer's
    epoch data.

    The order of epoch ``e`` is a permutation drawn from ``(seed, e)``, so it is the same
    on a resume. Jagged batches hold at most ``batch_rows * row_len`` tokens of whole
    users (:func:`batch_by_tokens`); packed batches ``batch_rows`` rows of
    :func:`pack_sequences`. On ``world_size`` ranks each takes every ``world_size``-th
    batch, the same number on every rank.

    Args:
        seqs (ConditionItemSequences): the users' token sequences.
        layout (str): ``jagged`` or ``packed``.
        row_len (int): tokens per packed row.
        batch_rows (int): rows per batch (jagged: the token budget's unit).
        seed (int): the order's seed.
        holdout (Optional[np.ndarray]): ``(U,)`` bool, users never trained on (cross-fitting).
        rank, world_size (int): this rank's share.
    """

    def __init__(self, seqs: ConditionItemSequences, layout: str, row_len: int, batch_rows: int, seed: int,
                 holdout: Optional[np.ndarray] = None, rank: int = 0, world_size: int = 1) -> None:
        self.seqs, self.layout, self.row_len, self.batch_rows = seqs, layout, row_len, batch_rows
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lengths = seqs.lengths().copy()
        if holdout is not None:
            self.lengths[np.asarray(holdout, dtype=bool)] = 0
        self._rows = pack_sequences(self.lengths, row_len) if layout == "packed" else None
        self.set_epoch(0)

    def batches(self, epoch: int) -> List[list]:
        """All ranks' batches of ``epoch``, in order (lists of rows, or of users)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self._rows is not None:
            order = torch.randperm(len(self._rows), generator=g).tolist()
            return [[self._rows[i] for i in order[s:s + self.batch_rows]]
                    for s in range(0, len(order), self.batch_rows)]
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        return batch_by_tokens(self.lengths, order, self.batch_rows * self.row_len)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        every = self.batches(epoch)
        per_rank = len(every) // self.world_size
        self._mine = every[self.rank::self.world_size][:per_rank][start_batch:]

    def __len__(self) -> int:
        return len(self._mine)

    def __iter__(self) -> Iterator[LUMBatch]:
        for batch in self._mine:
            if self._rows is not None:
                rows = self.seqs.packed_rows(batch, self.row_len)
                yield LUMBatch(rows.tokens, segment=rows.segment, position=rows.position)
            else:
                tokens, offsets = self.seqs.jagged_batch(batch)
                yield LUMBatch(tokens, offsets)
