"""The batches the models read, and the features both training data and serving build.

The data pipeline (:mod:`torchrec_genrec.data`) fills these batches from a sequence store;
the predictors (:mod:`torchrec_genrec.inference`) fill them from a request. Neither side
imports the other: both build batches with what is here.

- Retrieval: :class:`SequenceBatch`, one jagged history per user (keys :data:`ITEM_KEY`,
  :data:`ACTION_KEY`, :data:`TIMESTAMP_KEY`).
- Ranking: :class:`RankingBatch`, ``R`` requests and ``C`` candidates, built by
  :func:`assemble_batch` from dense ids (:class:`EventSequences` per behaviour sequence,
  :class:`ItemSides` for the item side information). A request is one user's history
  (the :data:`SEQUENCES` ``liked`` and ``other``, cut by :func:`request_sequences` when
  serving) shared by its candidates; :func:`ns_feature_ids` gives each candidate its
  non-sequential features. Every id
  feature goes through TorchRec tables, so both key sets have one row per candidate (a
  ``KeyedJaggedTensor`` has a single batch size); the sequence features sit on the
  request's FIRST candidate row and are empty on the others: each history is looked up
  once, and ``first_candidate`` tells the model where to read it. Keys:

  - ``sequence`` (for ``EmbeddingCollection``\\s): ``target_item``, ``liked_item``,
    ``other_item`` (one shared item table), ``liked_rating``, ``other_rating``;
  - ``pooled`` (for ``EmbeddingBagCollection``\\s): the NS-token features ``user_id``,
    ``user_age``, ``user_gender``, ``user_occupation``, ``user_zip``, ``release_year``,
    ``event_hour``, ``event_weekday`` (one id each) and the multi-hot ``target_genres``,
    ``liked_genres``, ``other_genres`` (the genres of the target / of all the sequence's
    events: a genre profile).

- Request time: :func:`hour_and_weekday` of an event, the timestamp units
  (:func:`per_second`) and the LUM conditions a ranker reads off the request time
  (:data:`HOUR_BUCKET`, :data:`REQUEST_CONDITION_CODES`).

Example::

    sequences = {name: EventSequences(items, actions, seconds, lengths=np.array([len(items)]))
                 for name in SEQUENCES}
    batch = assemble_batch(sequences, np.array([3]), target_items, target_seconds, ns_ids, item_sides)
    batch.sequence["liked_item"].lengths()     # (C,): non-zero on first candidates only
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

__all__ = ["ACTION_KEY", "HOUR_BUCKET", "ITEM_KEY", "LIFELONG_KEY", "NS_FEATURES", "POOLED_KEYS",
           "REQUEST_CONDITION_CODES", "SEQUENCES", "SEQUENCE_KEYS", "TIMESTAMP_KEY", "TIMESTAMP_UNITS",
           "USER_SIDES", "EventSequences", "ItemSides", "RankingBatch", "SequenceBatch", "assemble_batch",
           "concat_ranges", "hour_and_weekday", "ns_feature_ids", "per_second", "request_sequences"]

# ------------------------------------------------------------------ retrieval
ITEM_KEY, ACTION_KEY, TIMESTAMP_KEY = "item", "action", "timestamp"


@dataclasses.dataclass
class SequenceBatch(Pipelineable):
    """A batch of user histories and, for evaluation splits, the event to predict.

    Args:
        features (KeyedJaggedTensor): keys ``item`` (dense item ids), ``action`` (dense
            action ids; only when the store has actions) and ``timestamp``; one jagged
            row per user, oldest event first, ``B`` rows per key. Shape of each key's
            values: ``(sum_b L[b],)``, int64.
        user (torch.Tensor): ``(B,)`` dense user ids.
        target_item (Optional[torch.Tensor]): ``(B,)`` the held-out item (VALID/TEST).
        target_action (Optional[torch.Tensor]): ``(B,)`` its action id.
        target_timestamp (Optional[torch.Tensor]): ``(B,)`` its timestamp.
        seen_items (Optional[JaggedTensor]): every item the user had interacted with
            before the target, untruncated (``max_seq_len`` does not apply): what
            full-ranking evaluation excludes. Only with ``with_seen_items=True``.

    Example::

        batch.features["item"].lengths()   # tensor([3, 1]): L[b]
        batch.features["item"].values()    # tensor([5, 9, 2, 7]): oldest first per row
    """

    features: KeyedJaggedTensor
    user: torch.Tensor
    target_item: Optional[torch.Tensor] = None
    target_action: Optional[torch.Tensor] = None
    target_timestamp: Optional[torch.Tensor] = None
    seen_items: Optional[JaggedTensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.user.numel())

    def _map(self, fn) -> "SequenceBatch":
        return SequenceBatch(
            features=fn(self.features),
            user=fn(self.user),
            target_item=None if self.target_item is None else fn(self.target_item),
            target_action=None if self.target_action is None else fn(self.target_action),
            target_timestamp=None if self.target_timestamp is None else fn(self.target_timestamp),
            seen_items=None if self.seen_items is None else fn(self.seen_items),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "SequenceBatch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        if self.seen_items is not None:
            self.seen_items.record_stream(stream)
        for t in (self.user, self.target_item, self.target_action, self.target_timestamp):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> "SequenceBatch":
        return self._map(lambda t: t.pin_memory())


# ------------------------------------------------------------------ ranking
#: The behaviour sequences, in the order the models read them.
SEQUENCES = ("liked", "other")
#: Non-sequential features with one id per candidate, each its own table (an NS-token each).
NS_FEATURES = ("user_id", "user_age", "user_gender", "user_occupation", "user_zip", "release_year",
               "event_hour", "event_weekday")
SEQUENCE_KEYS = ("target_item", "liked_item", "other_item", "liked_rating", "other_rating")
#: Extra sequence key when the task carries the whole history (``RankingConfig.lifelong_len``).
LIFELONG_KEY = "lifelong_item"
POOLED_KEYS = NS_FEATURES + ("target_genres", "liked_genres", "other_genres")
#: The user side features behind ``user_age``, ``user_gender``, ``user_occupation``, ``user_zip``.
USER_SIDES = ("age", "gender", "occupation", "zip")


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


def concat_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(lo[i], hi[i])`` without a Python loop."""
    lengths = hi - lo
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total, dtype=np.int64)


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
            concat_ranges(items.genre_offsets[seq.items], items.genre_offsets[seq.items + 1])]
    seq_lengths["target_item"] = np.ones(num_c, dtype=np.int64)
    seq_values["target_item"] = target_items
    for key in NS_FEATURES:
        pooled_lengths[key] = np.ones(num_c, dtype=np.int64)
        pooled_values[key] = ns_ids[key]
    pooled_lengths["target_genres"] = genre_counts[target_items]
    pooled_values["target_genres"] = items.genre_values[
        concat_ranges(items.genre_offsets[target_items], items.genre_offsets[target_items + 1])]
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


def ns_feature_ids(user: np.ndarray, target_items: np.ndarray, target_seconds: np.ndarray,
                   user_sides: Dict[str, np.ndarray], item_year: np.ndarray) -> Dict[str, np.ndarray]:
    """The :data:`NS_FEATURES` ids of ``C`` candidates, as :func:`assemble_batch` takes them.

    Args:
        user, target_items, target_seconds (np.ndarray): ``(C,)`` dense user and item ids,
            and the event time in seconds.
        user_sides (Dict[str, np.ndarray]): per :data:`USER_SIDES` name, ``(U,)`` ids.
        item_year (np.ndarray): ``(I,)`` release-year ids.
    """
    hour, weekday = hour_and_weekday(target_seconds)
    return {"user_id": user, **{f"user_{k}": user_sides[k][user] for k in USER_SIDES},
            "release_year": item_year[target_items], "event_hour": hour, "event_weekday": weekday}


def request_sequences(items: np.ndarray, actions: np.ndarray, seconds: np.ndarray, liked: np.ndarray,
                      max_seq_len: int, lifelong_len: int = 0) -> Dict[str, EventSequences]:
    """One request's behaviour sequences from its history (dense ids, oldest first, all
    before the request): ``liked`` and ``other`` hold the most recent ``max_seq_len``
    events of each kind, ``lifelong`` (when ``lifelong_len > 0``) the most recent
    ``lifelong_len`` events of any kind — the sequences the training data cuts from a
    stored history.

    Args:
        items, actions, seconds (np.ndarray): ``(n,)`` the history's events.
        liked (np.ndarray): ``(n,)`` bool, the events of the ``liked`` sequence.
        max_seq_len, lifelong_len (int): events kept per sequence.
    """
    n = len(items)
    out = {}
    for name, keep in zip(SEQUENCES, (liked, ~liked)):
        idx = np.nonzero(keep)[0][-max_seq_len:]  # the most recent of each kind
        out[name] = EventSequences(items[idx], actions[idx], seconds[idx], np.asarray([len(idx)]))
    if lifelong_len > 0:
        idx = np.arange(max(n - lifelong_len, 0), n)
        out["lifelong"] = EventSequences(items[idx], actions[idx], seconds[idx], np.asarray([len(idx)]))
    return out


def _kjt(keys: Sequence[str], lengths: Dict[str, np.ndarray], values: Dict[str, np.ndarray]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.concatenate([values[k] for k in keys]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([lengths[k] for k in keys]).astype(np.int64)),
    )


# ------------------------------------------------------------------ request time
#: Units a store's timestamps may be in, and how many of each make a second.
TIMESTAMP_UNITS: Dict[str, int] = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}


def per_second(unit: str) -> int:
    """Timestamps in ``unit`` per second (an unknown unit reads as seconds)."""
    return TIMESTAMP_UNITS.get(unit, 1)


def hour_and_weekday(seconds: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """UTC hour (0-23) and weekday (Monday = 0) of Unix times in seconds."""
    seconds = np.asarray(seconds, dtype=np.int64)
    # 1970-01-01 was a Thursday.
    return ((seconds // 3600) % 24).astype(np.int64), (((seconds // 86400) + 3) % 7).astype(np.int64)


#: Hours per bucket of LUM's ``hour`` condition; a ranker maps the request hour the same way.
HOUR_BUCKET = 3
#: LUM conditions of the event, not the item: a ranker reads them off the request (its
#: time). In a LUM side-feature set the per-item condition holds these codes instead of a value.
REQUEST_CONDITION_CODES = {"hour": -1, "weekday": -2}
