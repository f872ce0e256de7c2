"""The on-disk sequence store: per-user, time-ordered event sequences as CSR arrays.

A prepared dataset is a directory::

    manifest.json          counts, id maps, action vocabulary, source, schema version
    offsets.npy  int64 [U + 1]   user u's events are rows offsets[u] : offsets[u + 1]
    item.npy     int32 [E]       dense item id, 0 .. num_items - 1
    timestamp.npy int64 [E]      non-decreasing within a user
    action.npy   int16 [E]       dense action id (optional), 0 .. num_actions - 1
    user_ids.npy, item_ids.npy   raw id of each dense id (int64 or unicode)
    items.parquet, users.parquet feature tables, row i = dense id i (optional)

Arrays are memory-mapped on open, so a store far larger than RAM can be batched from.
A store is written into a temporary directory and renamed into place: it is visible only
once complete, and a crash mid-write leaves any previous store untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from torchrec_genrec import __version__
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER, Interactions

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("offsets", "item", "timestamp", "action")


def _factorize(column: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    """Maps raw ids to dense ids in sorted raw-id order.

    Dense ids do not depend on the order of the file, so the same events give the same
    dataset however they are shuffled.

    Returns:
        Tuple[np.ndarray, np.ndarray]: ``(raw_ids, dense)``: sorted unique raw ids and the
        int32 dense id of every row.
    """
    if pa.types.is_integer(column.type):
        values = column.to_numpy()
        lo, hi = int(values.min()), int(values.max())
        span = hi - lo + 1
        if span <= max(4 * len(values), 1 << 20):
            # Dense enough for a lookup table: O(E) instead of a hash or a sort.
            present = np.zeros(span, dtype=bool)
            present[values - lo] = True
            raw = np.flatnonzero(present).astype(np.int64) + lo
            lut = np.cumsum(present, dtype=np.int64).astype(np.int32) - 1
            del present
            return raw, lut[values if lo == 0 else values - lo]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        unique = pc.unique(column).to_pylist()
        if any("\x00" in u for u in unique):
            # numpy's fixed-width strings would drop a trailing NUL and merge two ids.
            raise DataError("ids must not contain NUL characters")
        raw = np.sort(np.asarray(unique, dtype=str))
        value_set = pa.array(raw.tolist(), type=column.type)
    else:  # large sparse integers, floats (ratings)
        raw = np.sort(pc.unique(column).to_numpy(zero_copy_only=False))
        value_set = pa.array(raw, type=column.type)
    dense = pc.index_in(column, value_set=value_set).to_numpy(zero_copy_only=False)
    return raw, dense.astype(np.int32)


def _sort_by_user_then_time(user: np.ndarray, timestamp: np.ndarray) -> Optional[np.ndarray]:
    """Stable order by (user, timestamp): events with equal timestamps keep file order.

    Returns None when the events are already in that order (a per-user dump), so the
    caller skips the gathers too; a log already in time order skips the first sort.

    Two value sorts of packed 64-bit keys (numpy sorts values ~8x faster than it
    argsorts them) instead of one lexsort: first by (time, row), then by (user, rank in
    time order). Falls back to a lexsort when the keys do not fit in 63 bits.
    """
    n = len(user)
    same_user = user[1:] == user[:-1]
    if (user[1:] >= user[:-1]).all() and (timestamp[1:][same_user] >= timestamp[:-1][same_user]).all():
        return None
    del same_user
    time_ordered = bool((timestamp[1:] >= timestamp[:-1]).all())
    row_bits = max(int(n - 1).bit_length(), 1)
    t0 = int(timestamp.min())
    t_span = int(timestamp.max()) - t0
    user_bits = max(int(user.max()).bit_length(), 1)
    if (not time_ordered and t_span.bit_length() + row_bits > 63) or user_bits + row_bits > 63:
        return np.lexsort((timestamp, user))
    row_mask = np.int64((1 << row_bits) - 1)
    if time_ordered:
        by_time = np.arange(n, dtype=np.int64)
    else:
        key = (timestamp - t0) << row_bits
        key |= np.arange(n, dtype=np.int64)
        key.sort()
        by_time = key & row_mask  # row ids in (time, row) order
    key = user[by_time].astype(np.int64) << row_bits
    key |= np.arange(n, dtype=np.int64)
    key.sort()
    key &= row_mask  # positions in by_time, now in (user, time, row) order
    return by_time[key]


@dataclasses.dataclass
class StoreStats:
    num_users: int
    num_items: int
    num_events: int
    num_actions: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.num_users} users, {self.num_items} items, {self.num_events} interactions"
                + (f", {self.num_actions} action values" if self.num_actions else ""))


def atomic_dir(path: str) -> str:
    """A fresh temporary directory next to ``path``, to be :func:`publish_dir`-ed there."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)


def publish_dir(tmp: str, path: str) -> None:
    """Moves a finished directory into place, replacing an old one only after success."""
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=os.path.dirname(os.path.abspath(path)))
        os.rename(path, os.path.join(old, "store"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def _features_by_dense_id(table: Optional[pa.Table], key: str, raw_ids: np.ndarray, name: str) -> Optional[pa.Table]:
    """Reorders a feature table so row i describes dense id i (null rows where absent)."""
    if table is None:
        return None
    keys = table.column(key)
    if keys.null_count:
        raise DataError(f"{name} feature table has {keys.null_count} rows without a {key} id")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        raise DataError(f"{name} feature table has duplicate {key} ids")
    if pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type):
        wanted = pa.array(raw_ids.astype(str).tolist(), type=keys.type)
    else:
        wanted = pa.array(raw_ids, type=keys.type)
    rows = pc.index_in(wanted, value_set=keys)
    out = table.take(rows)  # null index -> null row
    return out.set_column(out.schema.get_field_index(key), key, wanted)


def write_store(interactions: Interactions, path: str, extra_manifest: Optional[Dict[str, Any]] = None) -> StoreStats:
    """Writes an event log as a sequence store at ``path`` (atomically).

    Args:
        interactions (Interactions): the events, raw ids, any order.
        path (str): the store directory; replaced if it exists.
        extra_manifest (Optional[Dict[str, Any]]): more fields for ``manifest.json``
            (e.g. how the source was obtained).

    Returns:
        StoreStats: counts and the seconds it took.

    Example::

        stats = write_store(read_movielens_1m("ml-1m/"), "datasets/ml-1m")
        store = SequenceStore.open("datasets/ml-1m")
    """
    start = time.perf_counter()
    interactions.validate()
    events = interactions.events
    user_raw, user = _factorize(events.column(USER))
    item_raw, item = _factorize(events.column(ITEM))
    timestamp = events.column(TIMESTAMP).to_numpy()
    if timestamp.dtype != np.int64:
        timestamp = timestamp.astype(np.int64)
    order = _sort_by_user_then_time(user, timestamp)

    tmp = atomic_dir(path)
    try:
        counts = np.bincount(user, minlength=len(user_raw))
        offsets = np.zeros(len(user_raw) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        del counts, user
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        np.save(os.path.join(tmp, "item.npy"), item if order is None else item[order])
        del item
        np.save(os.path.join(tmp, "timestamp.npy"), timestamp if order is None else timestamp[order])
        del timestamp
        action_info: Dict[str, Any] = {}
        if interactions.has_action:
            action_raw, action = _factorize(events.column(ACTION))
            if len(action_raw) > np.iinfo(np.int16).max:
                raise DataError(
                    f"column 'action' has {len(action_raw)} distinct values; actions are a small vocabulary "
                    "(ratings, event types). Map a continuous signal to buckets first.",
                    path=interactions.source,
                )
            np.save(os.path.join(tmp, "action.npy"), (action if order is None else action[order]).astype(np.int16))
            action_info = {"name": interactions.action_name, "values": action_raw.tolist()}
        del order
        np.save(os.path.join(tmp, "user_ids.npy"), user_raw)
        np.save(os.path.join(tmp, "item_ids.npy"), item_raw)
        for table, key, fname in ((interactions.item_features, ITEM, "items.parquet"),
                                  (interactions.user_features, USER, "users.parquet")):
            aligned = _features_by_dense_id(table, key, item_raw if key == ITEM else user_raw, key)
            if aligned is not None:
                pq.write_table(aligned, os.path.join(tmp, fname))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_by": f"torchrec-genrec {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": interactions.source,
            "files": interactions.files,
            "num_users": int(len(user_raw)),
            "num_items": int(len(item_raw)),
            "num_events": int(events.num_rows),
            "timestamp_unit": interactions.timestamp_unit,
            "action": action_info or None,
            "item_features": interactions.item_features is not None,
            "user_features": interactions.user_features is not None,
            **(extra_manifest or {}),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StoreStats(len(user_raw), len(item_raw), events.num_rows, len(action_info.get("values", [])),
                      time.perf_counter() - start)


class SequenceStore:
    """A prepared dataset, memory-mapped.

    Args:
        path (str): a directory written by :func:`write_store`.

    Attributes:
        offsets (np.ndarray): int64 ``[U + 1]``; user ``u``'s events are
            ``offsets[u]:offsets[u + 1]``, oldest first.
        item (np.ndarray): int32 ``[E]`` dense item ids.
        timestamp (np.ndarray): int64 ``[E]``.
        action (Optional[np.ndarray]): int16 ``[E]`` dense action ids, or None.

    Example::

        store = SequenceStore.open("~/.cache/torchrec_genrec/datasets/movielens-100k")
        u = 0
        items = store.item[store.offsets[u]:store.offsets[u + 1]]
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise DataError(
                "no prepared dataset here (manifest.json missing); run `genrec prepare ...` first",
                path=self.path,
            )
        with open(manifest_path) as f:
            self.manifest: Dict[str, Any] = json.load(f)
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"dataset schema version {version}, this torchrec-genrec reads version {SCHEMA_VERSION}; "
                "re-run `genrec prepare` to rebuild it",
                path=self.path,
            )
        self.offsets = self._load("offsets", self.num_users + 1)
        self.item = self._load("item", self.num_events)
        self.timestamp = self._load("timestamp", self.num_events)
        self.action = self._load("action", self.num_events) if self.manifest.get("action") else None
        if self.offsets[-1] != self.num_events:
            raise DataError(f"offsets end at {self.offsets[-1]}, manifest says {self.num_events} events; "
                            "the dataset is corrupt, re-run `genrec prepare`", path=self.path)

    @classmethod
    def open(cls, path: str) -> "SequenceStore":
        return cls(path)

    def _load(self, name: str, expected: int) -> np.ndarray:
        file = os.path.join(self.path, f"{name}.npy")
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"cannot read {name}.npy ({e}); the dataset is incomplete or corrupt, "
                            "re-run `genrec prepare`", path=self.path) from e
        if array.shape != (expected,):
            raise DataError(f"{name}.npy has shape {array.shape}, manifest expects ({expected},); "
                            "the dataset is corrupt, re-run `genrec prepare`", path=self.path)
        return array

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def num_events(self) -> int:
        return int(self.manifest["num_events"])

    @property
    def num_actions(self) -> int:
        action = self.manifest.get("action")
        return len(action["values"]) if action else 0

    @property
    def action_values(self) -> list:
        action = self.manifest.get("action")
        return list(action["values"]) if action else []

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_raw_ids(self) -> np.ndarray:
        return np.load(os.path.join(self.path, "user_ids.npy"), mmap_mode="r")

    def item_raw_ids(self) -> np.ndarray:
        return np.load(os.path.join(self.path, "item_ids.npy"), mmap_mode="r")

    def item_features(self) -> Optional[pa.Table]:
        file = os.path.join(self.path, "items.parquet")
        return pq.read_table(file) if os.path.exists(file) else None

    def user_features(self) -> Optional[pa.Table]:
        file = os.path.join(self.path, "users.parquet")
        return pq.read_table(file) if os.path.exists(file) else None

    def stats(self) -> StoreStats:
        return StoreStats(self.num_users, self.num_items, self.num_events, self.num_actions, 0.0)

    def __repr__(self) -> str:
        return f"SequenceStore({self.path!r}: {self.stats()})"
