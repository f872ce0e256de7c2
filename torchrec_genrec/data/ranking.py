"""The ranking task built from a sequence store: one sample per event, label from its action.

For every event ``e`` of user ``u`` (pointwise format):

- label: the event's action value ``>= positive_threshold`` (MovieLens: rating >= 4);
- non-sequential features: user id, age bucket, gender, occupation, zip prefix (from
  ``users.parquet``), item id, genres (multi-hot) and release year (from ``items.parquet``),
  hour and weekday of the event (UTC);
- sequential features: the user's events with a timestamp STRICTLY before ``e``'s — events
  in the same second are not "earlier" (half of MovieLens-100K's consecutive ratings share
  a second), so nothing rated alongside the target leaks in — as two behaviour sequences,
  ``liked`` (label 1) and ``other``, each the most recent ``max_seq_len`` events;
- split: by event time (:class:`~torchrec_genrec.data.splits.GlobalTimeSplit`).

Grouped format: a user's events of one split that fall in the same ``window_seconds``
window form one request; its candidates share the history before the window's first
event, so the sequence side is computed once per request.

Example::

    data = RankingData.build("~/.cache/torchrec_genrec/datasets/movielens-100k")
    train = data.samples(Split.TRAIN)               # event ids
    liked, other = data.history(train[:4])          # per sample: event ids of each sequence
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from torchrec_genrec.batch import hour_and_weekday, per_second
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import GlobalTimeSplit, Split
from torchrec_genrec.data.store import SequenceStore

__all__ = ["AGE_BUCKETS", "RankingConfig", "RankingData", "hour_and_weekday"]

#: MovieLens's age groups (lower bounds); bucket 0 is "unknown".
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)
_SPLIT_CODE = {Split.TRAIN: 0, Split.VALID: 1, Split.TEST: 2}


@dataclasses.dataclass
class RankingConfig:
    """Args:
    positive_threshold (float): an event is positive when its action value is at least this.
    max_seq_len (int): events kept per behaviour sequence (the most recent).
    valid_fraction (float): share of events, by time, in validation.
    test_fraction (float): share of events, by time, in test.
    zip_prefix (int): leading characters of the zip code kept as a feature.
    window_seconds (int): grouped format: one request per user per window of this length.
    lifelong_len (int): also carry each request's whole history (its most recent
        ``lifelong_len`` events, any label) as the ``lifelong`` sequence, for lifelong-interest
        models (MUSE); 0 leaves it out.
    """

    positive_threshold: float = 4.0
    max_seq_len: int = 50
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    zip_prefix: int = 3
    window_seconds: int = 86400
    lifelong_len: int = 0

    def __post_init__(self) -> None:
        if self.window_seconds < 1:
            raise ValueError(f"data.task.window_seconds must be >= 1 (seconds per grouped request window), "
                             f"got {self.window_seconds}")


def _vocab(values: List[Optional[str]]) -> Tuple[np.ndarray, List[str]]:
    """Strings -> ids 1..V in sorted order (0 = missing), and the vocabulary."""
    vocab = sorted({v for v in values if v is not None and v != ""})
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return np.asarray([index.get(v, 0) for v in values], dtype=np.int64), vocab


class RankingData:
    """Per-event features and history bounds of a store, built once in memory.

    Attributes:
        user, item, label, split, hour, weekday (np.ndarray): ``[E]`` per event.
        history_start, history_end (np.ndarray): ``[E]``; event ``e``'s history is the
            user's events ``history_start[e] : history_end[e]`` (all strictly earlier).
        user_features (Dict[str, np.ndarray]): ``age``, ``gender``, ``occupation``, ``zip``
            ids per dense user (0 = unknown).
        item_year (np.ndarray): ``[I]`` release-year ids (0 = unknown).
        genre_offsets, genre_values (np.ndarray): CSR genres per dense item, ids from 1.
        vocab_sizes (Dict[str, int]): rows each feature's table needs (ids ``0..size-1``).
    """

    def __init__(self, store: SequenceStore, config: RankingConfig) -> None:
        self.store = store
        self.config = config
        if store.action is None:
            raise DataError("the ranking task labels events by their action (e.g. rating) and this store has none; "
                            "prepare it with an action column (csv: --action-col)", path=store.path)
        if store.num_events == 0:
            raise DataError("the store has no events", path=store.path)
        values = np.asarray(store.action_values, dtype=np.float64)
        action = np.asarray(store.action, dtype=np.int64)
        self.label = (values[action] >= config.positive_threshold).astype(np.int8)
        lengths = store.lengths
        self.user = np.repeat(np.arange(store.num_users, dtype=np.int64), lengths)
        self.item = np.asarray(store.item, dtype=np.int64)
        ts = np.asarray(store.timestamp, dtype=np.int64)
        self.timestamp = ts
        self.hour, self.weekday = hour_and_weekday(ts // _per_second(store))
        self.split = GlobalTimeSplit(config.valid_fraction, config.test_fraction).labels(store)

        # History bounds: within each user (sorted by time), the first event with the same timestamp.
        starts = np.repeat(store.offsets[:-1], lengths)
        self.history_start = starts
        self.history_end = same_time_start(self.user, ts)

        # Each kind of behaviour as one event list in store order (users contiguous, time
        # ascending), with prefix counts: a history's sequence is then one slice of it.
        liked = self.label == 1
        self.liked_events = np.nonzero(liked)[0]
        self.other_events = np.nonzero(~liked)[0]
        self._liked_prefix = np.concatenate([[0], np.cumsum(liked)]).astype(np.int64)
        self._other_prefix = np.arange(len(liked) + 1, dtype=np.int64) - self._liked_prefix

        self._user_features(store, config)
        self._item_features(store)
        self.vocab_sizes = {
            "user": store.num_users, "item": store.num_items, "hour": 24, "weekday": 7,
            "age": len(AGE_BUCKETS) + 1, "gender": len(self.vocabularies["gender"]) + 1,
            "occupation": len(self.vocabularies["occupation"]) + 1, "zip": len(self.vocabularies["zip"]) + 1,
            "year": len(self.vocabularies["year"]) + 1, "genre": len(self.vocabularies["genre"]) + 1,
            "rating": len(store.action_values),
        }

    @classmethod
    def build(cls, store_path: str, config: Optional[RankingConfig] = None) -> "RankingData":
        return cls(SequenceStore.open(store_path), config or RankingConfig())

    def _user_features(self, store: SequenceStore, config: RankingConfig) -> None:
        table = store.user_features()
        u = store.num_users
        self.vocabularies: Dict[str, List] = {}
        if table is None:
            self.user_features = {k: np.zeros(u, dtype=np.int64) for k in ("age", "gender", "occupation", "zip")}
            self.vocabularies.update(gender=[], occupation=[], zip=[])
            return
        columns = table.column_names
        age = np.asarray(table.column("age").to_pylist() if "age" in columns else [None] * u, dtype=object)
        age_ids = np.asarray([0 if a is None else int(np.searchsorted(AGE_BUCKETS, a, side="right")) for a in age])
        feats = {"age": age_ids.astype(np.int64)}
        for name in ("gender", "occupation"):
            ids, vocab = _vocab(table.column(name).to_pylist() if name in columns else [None] * u)
            feats[name], self.vocabularies[name] = ids, vocab
        zips = table.column("zip").to_pylist() if "zip" in columns else [None] * u
        ids, vocab = _vocab([z[:config.zip_prefix] if z else None for z in zips])
        feats["zip"], self.vocabularies["zip"] = ids, vocab
        self.user_features = feats

    def _item_features(self, store: SequenceStore) -> None:
        table = store.item_features()
        n = store.num_items
        if table is None:
            self.item_year = np.zeros(n, dtype=np.int64)
            self.genre_offsets, self.genre_values = np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
            self.vocabularies.update(year=[], genre=[])
            return
        columns = table.column_names
        years = table.column("year").to_pylist() if "year" in columns else [None] * n
        ids, vocab = _vocab([None if y is None else str(y) for y in years])
        self.item_year, self.vocabularies["year"] = ids, vocab
        genres = table.column("genres").to_pylist() if "genres" in columns else [[] for _ in range(n)]
        genre_vocab = sorted({g for gs in genres for g in (gs or [])})
        index = {g: i + 1 for i, g in enumerate(genre_vocab)}
        lengths = np.asarray([len(gs or []) for gs in genres], dtype=np.int64)
        self.genre_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.genre_values = np.asarray([index[g] for gs in genres for g in (gs or [])], dtype=np.int64)
        self.vocabularies["genre"] = genre_vocab

    # ------------------------------------------------------------------ samples
    def samples(self, split: Split) -> np.ndarray:
        """Event ids of a split, in store order (user, then time): the pointwise samples."""
        return np.nonzero(self.split == _SPLIT_CODE[split])[0]

    def history(self, events: np.ndarray) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        """Per event, the event ids of its ``liked`` and ``other`` sequences (oldest first,
        each the most recent ``max_seq_len``), all strictly earlier than the event."""
        events = np.asarray(events, dtype=np.int64)
        (liked_lo, liked_hi), (other_lo, other_hi) = self.sequence_bounds(
            self.history_start[events], self.history_end[events])
        liked = [self.liked_events[a:b] for a, b in zip(liked_lo, liked_hi)]
        other = [self.other_events[a:b] for a, b in zip(other_lo, other_hi)]
        return liked, other

    def sequence_bounds(self, start: np.ndarray, end: np.ndarray) -> Tuple[Tuple[np.ndarray, np.ndarray], ...]:
        """The two behaviour sequences of histories ``start[i]:end[i]`` (event ids), as
        ``((liked_lo, liked_hi), (other_lo, other_hi))``: sequence ``i`` is
        ``liked_events[liked_lo[i]:liked_hi[i]]`` (resp. ``other_events``), the most recent
        ``max_seq_len`` of each kind. Vectorised: prefix counts, no loop over events."""
        k = self.config.max_seq_len
        out = []
        for prefix in (self._liked_prefix, self._other_prefix):
            hi = prefix[end]
            out.append((np.maximum(prefix[start], hi - k), hi))
        return tuple(out)

    def requests(self, split: Split) -> Tuple[np.ndarray, np.ndarray]:
        """The grouped format: ``(request_offsets, events)``.

        ``events`` are the split's events in store order; request ``r`` is
        ``events[request_offsets[r]:request_offsets[r + 1]]``, one user's events in one
        window of ``window_seconds`` (counted from that user's first event of the window).
        Every candidate of a request is served with the history of the request's first
        event (:meth:`request_history_end`), which is strictly earlier than all of them.
        """
        events = self.samples(split)
        if events.size == 0:
            return np.zeros(1, dtype=np.int64), events
        user, ts = self.user[events], self.timestamp[events] // _per_second(self.store)
        return window_starts(user, ts, self.config.window_seconds), events

    def stats(self) -> Dict[str, float]:
        """Sample counts, positive rates and history lengths per split."""
        out: Dict[str, float] = {}
        for split in Split:
            events = self.samples(split)
            out[f"{split.value}_samples"] = int(events.size)
            out[f"{split.value}_positive_rate"] = float(self.label[events].mean()) if events.size else 0.0
            out[f"{split.value}_mean_history"] = float((self.history_end[events] - self.history_start[events]).mean()) \
                if events.size else 0.0
            offsets, _ = self.requests(split)
            out[f"{split.value}_requests"] = int(len(offsets) - 1)
        return out


def same_time_start(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """``(E,)`` for events in user order (time ascending within a user), the index of the
    first event of the same user with the same timestamp: the end of each event's strictly
    earlier history (ties are simultaneous, so none sees the others)."""
    same_as_previous = np.zeros(len(timestamp), dtype=bool)
    same_as_previous[1:] = (timestamp[1:] == timestamp[:-1]) & (user[1:] == user[:-1])
    return np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(len(timestamp))))


def window_starts(user: np.ndarray, seconds: np.ndarray, window_seconds: int) -> np.ndarray:
    """Request offsets of the grouped format: events (users contiguous, time ascending
    within a user) cut into windows, each opened by a user's first event not yet in a
    window and holding that user's events less than ``window_seconds`` after it.

    Vectorised: each event's successor (the first event of its user at or after its time +
    W) comes from one ``searchsorted`` over ``(user, time)`` keys; the window starts are
    what the successor chains reach from each user's first event, found by pointer
    doubling in O(n log(windows per user)).

    Returns:
        np.ndarray: ``(R + 1,)`` offsets into the events, from 0 to ``len(user)``.

    Example::

        window_starts(np.array([0, 0, 0, 1]), np.array([0, 5, 12, 3]), 10)  # [0, 2, 3, 4]
    """
    if window_seconds < 1:
        raise ValueError(f"window_seconds must be >= 1, got {window_seconds}")
    n = len(user)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    user, seconds = np.asarray(user, dtype=np.int64), np.asarray(seconds, dtype=np.int64)
    if (np.diff(user) < 0).any():
        raise ValueError("window_starts needs events in user order (ascending user ids, time ascending within one)")
    span = int(seconds.max() - seconds.min()) + int(window_seconds) + 1
    if int(user.max()) + 1 > np.iinfo(np.int64).max // span:
        raise ValueError(f"{int(user.max()) + 1} users x a {span}-second span overflow int64 window keys")
    key = user * span + (seconds - seconds.min())  # sorted: users contiguous, time ascending
    successor = np.searchsorted(key, key + int(window_seconds), side="left")
    successor[successor < n] = np.where(user[successor[successor < n]] == user[successor < n],
                                        successor[successor < n], n)
    jump = np.append(successor, n)  # index n: past the end, its own successor
    reached = np.zeros(n + 1, dtype=bool)
    reached[np.nonzero(np.concatenate([[True], user[1:] != user[:-1]]))[0]] = True  # each user's first event
    while True:
        grown = reached.copy()
        grown[jump[reached]] = True
        if np.array_equal(grown, reached):
            break
        reached, jump = grown, jump[jump]  # doubling: jump now covers twice the steps
    return np.append(np.nonzero(reached[:n])[0], n).astype(np.int64)


def _per_second(store: SequenceStore) -> int:
    return per_second(store.manifest.get("timestamp_unit", "s"))
