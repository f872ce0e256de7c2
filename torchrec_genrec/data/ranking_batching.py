"""Batches of the ranking task as TorchRec ``KeyedJaggedTensor``s, pointwise or grouped.

The batch (:class:`~torchrec_genrec.batch.RankingBatch`), its keys and
:func:`~torchrec_genrec.batch.assemble_batch` are shared with the serving predictor; this
module fills them from a store.

A batch holds ``R`` requests and ``C`` candidates (the samples to score). A request is
one user's history (two behaviour sequences, ``liked`` and ``other``) shared by its
candidates:

- **pointwise**: every event is its own request (``R == C``), with its exact history
  (all the user's strictly earlier events);
- **grouped**: a user's events in one time window form one request; its candidates
  share the history before the window's first event (:meth:`RankingData.requests`), so
  the sequence side — embedding lookups included — is computed once per request.

Every id feature goes through TorchRec tables; the batch's key sets and where the
sequence features sit are described in :mod:`torchrec_genrec.batch`.

Example::

    data = RankingData.build(store_path)
    dataset = RankingDataset(data, Split.TRAIN, grouped=True)
    loader = make_ranking_loader(dataset, batch_size=256, shuffle=True, seed=0)
    batch = next(iter(loader))
    batch.sequence["liked_item"].lengths()     # (C,): non-zero on first candidates only
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from torchrec_genrec.batch import (LIFELONG_KEY, NS_FEATURES, POOLED_KEYS, SEQUENCE_KEYS, SEQUENCES, EventSequences,
                                   ItemSides, RankingBatch, assemble_batch, concat_ranges, ns_feature_ids)
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.ranking import RankingData, _per_second
from torchrec_genrec.data.splits import Split

__all__ = ["LIFELONG_KEY", "NS_FEATURES", "SEQUENCES", "POOLED_KEYS", "SEQUENCE_KEYS", "EventSequences", "ItemSides",
           "RankingBatch", "RankingDataset", "RequestBatchSampler", "assemble_batch", "make_ranking_loader"]


class RankingDataset(Dataset):
    """The requests of one split; ``dataset[list_of_request_ids]`` builds a whole batch.

    Args:
        data (RankingData): the features and histories.
        split (Split): which events are the candidates.
        grouped (bool): one request per user and time window (shared history), or one
            per event (its own history).

    Example::

        dataset = RankingDataset(data, Split.TEST)
        batch = dataset[[0, 1, 2]]       # 3 requests (= 3 candidates when pointwise)
    """

    def __init__(self, data: RankingData, split: Split, grouped: bool = False) -> None:
        self.data, self.split, self.grouped = data, split, grouped
        if grouped:
            offsets, events = data.requests(split)
        else:
            events = data.samples(split)
            offsets = np.arange(len(events) + 1, dtype=np.int64)
        if events.size == 0:
            raise DataError(f"the {split.value} split of the ranking task has no events; check the split fractions "
                            "(ranking.valid_fraction / ranking.test_fraction) against the data's time span",
                            path=data.store.path)
        self.offsets, self.events = offsets, events
        first = events[offsets[:-1]]
        self.history_start, self.history_end = data.history_start[first], data.history_end[first]
        self.num_genres = len(data.vocabularies["genre"])
        self.item_sides = ItemSides.from_csr(data.genre_offsets, data.genre_values, self.num_genres)
        self._per_second = _per_second(data.store)
        self._action = np.asarray(data.store.action, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_samples(self) -> int:
        return len(self.events)

    def candidates_per_request(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, requests: Sequence[int]) -> RankingBatch:
        d = self.data
        requests = np.asarray(requests, dtype=np.int64)
        cand = concat_ranges(self.offsets[requests], self.offsets[requests + 1])
        events = self.events[cand]
        per_request = self.offsets[requests + 1] - self.offsets[requests]
        bounds = d.sequence_bounds(self.history_start[requests], self.history_end[requests])

        seconds = d.timestamp // self._per_second
        sequences = {}
        for name, (lo, hi), pool in zip(SEQUENCES, bounds, (d.liked_events, d.other_events)):
            seq_events = pool[concat_ranges(lo, hi)]
            sequences[name] = EventSequences(d.item[seq_events], self._action[seq_events], seconds[seq_events], hi - lo)
        user = d.user[events]
        target_items = d.item[events]
        lifelong = None
        if d.config.lifelong_len > 0:
            end = self.history_end[requests]
            lo = np.maximum(self.history_start[requests], end - d.config.lifelong_len)
            life_events = concat_ranges(lo, end)
            lifelong = EventSequences(d.item[life_events], self._action[life_events], seconds[life_events], end - lo)
        ns_ids = ns_feature_ids(user, target_items, seconds[events], d.user_features, d.item_year)
        return assemble_batch(
            sequences, per_request, target_items, seconds[events], ns_ids, self.item_sides,
            label=d.label[events].astype(np.float32), rating=self._action[events], user=user, event=events,
            lifelong=lifelong)


class RequestBatchSampler(Sampler[List[int]]):
    """Packs requests into batches of about ``batch_size`` candidates.

    Requests are taken in a seeded, epoch-dependent order (or in order) and a batch is
    closed once it holds at least ``batch_size`` candidates, so a grouped batch carries
    as many samples as a pointwise one (a request is never split). ``set_epoch`` before
    each epoch (``start_batch`` skips what a resumed run has trained). In a job of
    ``world_size`` ranks every rank plans the same batches and takes every
    ``world_size``-th one, so global step ``s`` covers the batches a single
    process would take at ``world_size`` times the batch size; with ``even=True`` the
    last few are dropped so that every rank takes as many steps.

    Args:
        candidates (np.ndarray): ``(R,)`` candidates per request.
        batch_size (int): candidates per batch (per rank).
        shuffle (bool): shuffle requests every epoch.
        seed (int): seed of the shuffle.
        rank, world_size (int): this rank's share of the batches.
        even (bool): the same number of batches on every rank (training).
    """

    def __init__(self, candidates: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, even: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.candidates = np.asarray(candidates, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0
        self._batches = self._plan()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Plans ``epoch``'s batches; this rank starts at its ``start_batch``-th one (a
        resumed run: the global step index in the epoch, whatever the world size)."""
        self.epoch = epoch
        self._batches = self._plan()[start_batch:]

    def _plan(self) -> List[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.candidates)) if self.shuffle
                 else np.arange(len(self.candidates)))
        if self.batch_size == 1 or (self.candidates == 1).all():
            batches = np.split(order, np.arange(self.batch_size, len(order), self.batch_size))
        else:
            # Greedy: a batch closes at the first request that brings it to batch_size.
            ends, count = [], 0
            for i, n in enumerate(self.candidates[order].tolist()):
                count += n
                if count >= self.batch_size:
                    ends.append(i + 1)
                    count = 0
            batches = [b for b in np.split(order, ends) if len(b)]
        if self.world_size > 1:
            if self.even:
                batches = batches[:len(batches) - len(batches) % self.world_size]
            batches = batches[self.rank::self.world_size]
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(b.tolist() for b in self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def make_ranking_loader(dataset: RankingDataset, batch_size: int, shuffle: bool, seed: int = 0,
                        num_workers: int = 0, rank: int = 0, world_size: int = 1, even: bool = False) -> DataLoader:
    """A DataLoader of whole :class:`RankingBatch`\\es (``batch_size`` candidates each),
    this rank's share of them (:class:`RequestBatchSampler`)."""
    sampler = RequestBatchSampler(dataset.candidates_per_request(), batch_size, shuffle, seed, rank, world_size, even)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers)
