"""Batches of the ranking task as TorchRec ``KeyedJaggedTensor``s, pointwise or grouped.

A batch holds ``R`` requests and ``C`` candidates (the samples to score). A request is
one user's history (two behaviour sequences, ``liked`` and ``other``) shared by its
candidates:

- **pointwise**: every event is its own request (``R == C``), with its exact history
  (all the user's strictly earlier events);
- **grouped**: a user's events in one time window form one request; its candidates
  share the history before the window's first event (:meth:`RankingData.requests`), so
  the sequence side — embedding lookups included — is computed once per request.

Every id feature goes through TorchRec tables, so both key sets have one row per
candidate (a ``KeyedJaggedTensor`` has a single batch size). The sequence features
(``liked_item``, ...) sit on the request's FIRST candidate row and are empty on the
others: each history is looked up once, and ``first_candidate`` tells the model where
to read it. Keys:

- ``sequence`` (for ``EmbeddingCollection``\\s): ``target_item``, ``liked_item``,
  ``other_item`` (one shared item table), ``liked_rating``, ``other_rating``;
- ``pooled`` (for ``EmbeddingBagCollection``\\s): the NS-token features ``user_id``,
  ``user_age``, ``user_gender``, ``user_occupation``, ``user_zip``, ``release_year``,
  ``event_hour``, ``event_weekday`` (one id each) and the multi-hot ``target_genres``,
  ``liked_genres``, ``other_genres`` (the genres of the target / of all the sequence's
  events: a genre profile).

Example::

    data = RankingData.build(store_path)
    dataset = RankingDataset(data, Split.TRAIN, grouped=True)
    loader = make_ranking_loader(dataset, batch_size=256, shuffle=True, seed=0)
    batch = next(iter(loader))
    batch.sequence["liked_item"].lengths()     # (C,): non-zero on first candidates only
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.ranking import RankingData, _per_second
from torchrec_genrec.data.splits import Split

__all__ = ["LIFELONG_KEY", "NS_FEATURES", "SEQUENCES", "POOLED_KEYS", "SEQUENCE_KEYS", "EventSequences", "ItemSides",
           "RankingBatch", "RankingDataset", "RequestBatchSampler", "assemble_batch", "make_ranking_loader"]

#: The behaviour sequences, in the order the models read them.
SEQUENCES = ("liked", "other")
#: Non-sequential features with one id per candidate, each its own table (an NS-token each).
NS_FEATURES = ("user_id", "user_age", "user_gender", "user_occupation", "user_zip", "release_year",
               "event_hour", "event_weekday")
SEQUENCE_KEYS = ("target_item", "liked_item", "other_item", "liked_rating", "other_rating")
#: Extra sequence key when the task carries the whole history (``RankingConfig.lifelong_len``).
LIFELONG_KEY = "lifelong_item"
POOLED_KEYS = NS_FEATURES + ("target_genres", "liked_genres", "other_genres")


@dataclasses.dataclass
class RankingBatch(Pipelineable):
    """``R`` requests and ``C`` candidates.

    Args:
        sequence (KeyedJaggedTensor): :data:`SEQUENCE_KEYS`, ``C`` rows each; the
            sequences' rows are non-empty only on each request's first candidate.
        pooled (KeyedJaggedTensor): :data:`POOLED_KEYS`, ``C`` rows each.
        event_time (Dict[str, torch.Tensor]): per sequence, ``(n,)`` int64 seconds of each
            event, aligned with ``sequence[f"{name}_item"].values()``.
        event_genres (Dict[str, torch.Tensor]): per sequence, ``(n, G)`` float multi-hot
            genres of each event (dense side information for the S-token MLP).
        target_genres (torch.Tensor): ``(C, G)`` multi-hot genres of each candidate.
        first_candidate (torch.Tensor): ``(R,)`` the candidate row holding request ``r``'s
            sequences.
        request_index (torch.Tensor): ``(C,)`` the request of each candidate.
        request_time (torch.Tensor): ``(R,)`` int64 seconds: the first candidate's time.
        target_time (torch.Tensor): ``(C,)`` int64 seconds of each candidate's event.
        label (torch.Tensor): ``(C,)`` float, 1 for a positive event.
        rating (torch.Tensor): ``(C,)`` int64 action id of the event (the rating class).
        user (torch.Tensor): ``(C,)`` dense user id (GAUC groups by it).
        event (torch.Tensor): ``(C,)`` the event id in the store.
    """

    sequence: KeyedJaggedTensor
    pooled: KeyedJaggedTensor
    event_time: Dict[str, torch.Tensor]
    event_genres: Dict[str, torch.Tensor]
    target_genres: torch.Tensor
    first_candidate: torch.Tensor
    request_index: torch.Tensor
    request_time: torch.Tensor
    target_time: torch.Tensor
    label: torch.Tensor
    rating: torch.Tensor
    user: torch.Tensor
    event: torch.Tensor

    @property
    def num_candidates(self) -> int:
        return int(self.label.numel())

    @property
    def num_requests(self) -> int:
        return int(self.first_candidate.numel())

    def sequence_lengths(self, name: str) -> torch.Tensor:
        """``(R,)`` events in request ``r``'s sequence ``name``."""
        return self.sequence[f"{name}_item"].lengths()[self.first_candidate]

    def to(self, device: torch.device, non_blocking: bool = False) -> "RankingBatch":
        def move(x):
            if isinstance(x, dict):
                return {k: v.to(device=device, non_blocking=non_blocking) for k, v in x.items()}
            return x.to(device=device, non_blocking=non_blocking)

        return RankingBatch(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:
        self.sequence.record_stream(stream)
        self.pooled.record_stream(stream)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for t in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(t, torch.Tensor):
                    t.record_stream(stream)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(lo[i], hi[i])`` without a Python loop."""
    lengths = hi - lo
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total, dtype=np.int64)


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
        cand = _ranges(self.offsets[requests], self.offsets[requests + 1])
        events = self.events[cand]
        per_request = self.offsets[requests + 1] - self.offsets[requests]
        bounds = d.sequence_bounds(self.history_start[requests], self.history_end[requests])

        seconds = d.timestamp // self._per_second
        sequences = {}
        for name, (lo, hi), pool in zip(SEQUENCES, bounds, (d.liked_events, d.other_events)):
            seq_events = pool[_ranges(lo, hi)]
            sequences[name] = EventSequences(d.item[seq_events], self._action[seq_events], seconds[seq_events], hi - lo)
        user = d.user[events]
        target_items = d.item[events]
        uf = d.user_features
        lifelong = None
        if d.config.lifelong_len > 0:
            end = self.history_end[requests]
            lo = np.maximum(self.history_start[requests], end - d.config.lifelong_len)
            life_events = _ranges(lo, end)
            lifelong = EventSequences(d.item[life_events], self._action[life_events], seconds[life_events], end - lo)
        ns_ids = {"user_id": user, "user_age": uf["age"][user], "user_gender": uf["gender"][user],
                  "user_occupation": uf["occupation"][user], "user_zip": uf["zip"][user],
                  "release_year": d.item_year[target_items], "event_hour": d.hour[events],
                  "event_weekday": d.weekday[events]}
        return assemble_batch(
            sequences, per_request, target_items, seconds[events], ns_ids, self.item_sides,
            label=d.label[events].astype(np.float32), rating=self._action[events], user=user, event=events,
            lifelong=lifelong)


@dataclasses.dataclass
class EventSequences:
    """One behaviour sequence of ``R`` requests, flat: ``lengths[r]`` events per request,
    oldest first. ``actions`` are action ids (``0..A-1``), ``seconds`` event times."""

    items: np.ndarray
    actions: np.ndarray
    seconds: np.ndarray
    lengths: np.ndarray


@dataclasses.dataclass
class ItemSides:
    """Item side information: genres as CSR ids (from 1) and as a multi-hot ``(I, G)``."""

    genre_offsets: np.ndarray
    genre_values: np.ndarray
    multi_hot: np.ndarray

    @classmethod
    def from_csr(cls, genre_offsets: np.ndarray, genre_values: np.ndarray, num_genres: int) -> "ItemSides":
        num_items = len(genre_offsets) - 1
        multi_hot = np.zeros((num_items, num_genres), dtype=np.float32)
        rows = np.repeat(np.arange(num_items), np.diff(genre_offsets))
        multi_hot[rows, np.asarray(genre_values, dtype=np.int64) - 1] = 1.0
        return cls(np.asarray(genre_offsets, dtype=np.int64), np.asarray(genre_values, dtype=np.int64), multi_hot)


def assemble_batch(sequences: Dict[str, EventSequences], candidates_per_request: np.ndarray,
                   target_items: np.ndarray, target_seconds: np.ndarray, ns_ids: Dict[str, np.ndarray],
                   items: ItemSides, label: Optional[np.ndarray] = None, rating: Optional[np.ndarray] = None,
                   user: Optional[np.ndarray] = None, event: Optional[np.ndarray] = None,
                   lifelong: Optional[EventSequences] = None) -> RankingBatch:
    """A :class:`RankingBatch` from dense ids: what the training data and the serving
    predictor both build batches with.

    Args:
        sequences (Dict[str, EventSequences]): each of :data:`SEQUENCES`, per request.
        candidates_per_request (np.ndarray): ``(R,)``, each >= 1; candidates are contiguous
            per request.
        target_items, target_seconds (np.ndarray): ``(C,)`` each.
        ns_ids (Dict[str, np.ndarray]): :data:`NS_FEATURES` ids, ``(C,)`` each.
        items (ItemSides): genres of every dense item.
        label, rating, user, event (Optional[np.ndarray]): ``(C,)`` each (zeros / -1 when
            serving, where they are unknown).
        lifelong (Optional[EventSequences]): the whole history per request (key
            :data:`LIFELONG_KEY`), when the model reads it.
    """
    per_request = np.asarray(candidates_per_request, dtype=np.int64)
    num_c = int(per_request.sum())
    first = np.concatenate([[0], np.cumsum(per_request)[:-1]]).astype(np.int64)
    seq_lengths: Dict[str, np.ndarray] = {}
    seq_values: Dict[str, np.ndarray] = {}
    event_time, event_genres = {}, {}
    pooled_lengths: Dict[str, np.ndarray] = {}
    pooled_values: Dict[str, np.ndarray] = {}
    genre_counts = np.diff(items.genre_offsets)
    for name in SEQUENCES:
        seq = sequences[name]
        lengths = np.zeros(num_c, dtype=np.int64)
        lengths[first] = seq.lengths
        seq_lengths[f"{name}_item"] = seq_lengths[f"{name}_rating"] = lengths
        seq_values[f"{name}_item"] = seq.items
        seq_values[f"{name}_rating"] = np.asarray(seq.actions) + 1  # 0 is padding
        event_time[name] = torch.from_numpy(np.asarray(seq.seconds, dtype=np.int64))
        event_genres[name] = torch.from_numpy(items.multi_hot[seq.items])
        per_request_genres = np.zeros(num_c, dtype=np.int64)
        np.add.at(per_request_genres, np.repeat(first, seq.lengths), genre_counts[seq.items])
        pooled_lengths[f"{name}_genres"] = per_request_genres
        pooled_values[f"{name}_genres"] = items.genre_values[
            _ranges(items.genre_offsets[seq.items], items.genre_offsets[seq.items + 1])]
    seq_lengths["target_item"] = np.ones(num_c, dtype=np.int64)
    seq_values["target_item"] = target_items
    for key in NS_FEATURES:
        pooled_lengths[key] = np.ones(num_c, dtype=np.int64)
        pooled_values[key] = ns_ids[key]
    pooled_lengths["target_genres"] = genre_counts[target_items]
    pooled_values["target_genres"] = items.genre_values[
        _ranges(items.genre_offsets[target_items], items.genre_offsets[target_items + 1])]
    target_seconds = np.asarray(target_seconds, dtype=np.int64)
    zeros = np.zeros(num_c, dtype=np.int64)
    sequence_keys = SEQUENCE_KEYS
    if lifelong is not None:
        lengths = np.zeros(num_c, dtype=np.int64)
        lengths[first] = lifelong.lengths
        seq_lengths[LIFELONG_KEY], seq_values[LIFELONG_KEY] = lengths, lifelong.items
        sequence_keys = SEQUENCE_KEYS + (LIFELONG_KEY,)
    return RankingBatch(
        sequence=_kjt(sequence_keys, seq_lengths, seq_values),
        pooled=_kjt(POOLED_KEYS, pooled_lengths, pooled_values),
        event_time=event_time,
        event_genres=event_genres,
        target_genres=torch.from_numpy(items.multi_hot[target_items]),
        first_candidate=torch.from_numpy(first),
        request_index=torch.from_numpy(np.repeat(np.arange(len(per_request)), per_request)),
        request_time=torch.from_numpy(target_seconds[first]),
        target_time=torch.from_numpy(target_seconds),
        label=torch.from_numpy(np.zeros(num_c, np.float32) if label is None else np.asarray(label, np.float32)),
        rating=torch.from_numpy(zeros if rating is None else np.asarray(rating, np.int64)),
        user=torch.from_numpy(zeros - 1 if user is None else np.asarray(user, np.int64)),
        event=torch.from_numpy(zeros - 1 if event is None else np.asarray(event, np.int64)),
    )


def _kjt(keys: Sequence[str], lengths: Dict[str, np.ndarray], values: Dict[str, np.ndarray]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.concatenate([values[k] for k in keys]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([lengths[k] for k in keys]).astype(np.int64)),
    )


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
