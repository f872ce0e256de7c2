"""Tests for the on-disk sequence store (torchrec_genrec/data/store.py).

Every property is checked against a reference that is obviously right: a plain numpy
``lexsort`` for the event order and ``np.unique`` for the id maps.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_genrec.data import store as store_module
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import Interactions
from torchrec_genrec.data.store import SCHEMA_VERSION, SequenceStore, write_store

# Few examples: each one writes a store to disk.
SETTINGS = settings(max_examples=25, deadline=None)


def _ids(kind: str, pool: list) -> list:
    """Raw ids of one kind built from small ints (so draws collide and users repeat)."""
    if kind == "int":
        return [int(v) - 3 for v in pool]  # negative ids too
    if kind == "huge":
        # Spread over far more than 2**20 values: bypasses the lookup-table path.
        return [10**15 + int(v) * 10**12 for v in pool]
    return [f"id-{v:02d}" if v % 3 else f"z{v}" for v in pool]  # strings, not in numeric order


@st.composite
def event_tables(draw):
    n = draw(st.integers(1, 40))
    user_kind = draw(st.sampled_from(["int", "huge", "str"]))
    item_kind = draw(st.sampled_from(["int", "huge", "str"]))
    users = _ids(user_kind, draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)))
    items = _ids(item_kind, draw(st.lists(st.integers(0, 15), min_size=n, max_size=n)))
    if draw(st.booleans()):
        # Few distinct timestamps: many ties, which must keep file order.
        ts = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    else:
        # A span wider than 63 bits minus the row bits: the lexsort fallback.
        ts = draw(st.lists(st.sampled_from([-(2**62), -5, 0, 7, 2**62]), min_size=n, max_size=n))
    columns = {"user": users, "item": items, "timestamp": pa.array(ts, type=pa.int64())}
    action_kind = draw(st.sampled_from([None, "rating", "event"]))
    if action_kind == "rating":
        columns["action"] = draw(st.lists(st.sampled_from([0.5, 1.0, 3.5, 5.0]), min_size=n, max_size=n))
    elif action_kind == "event":
        columns["action"] = draw(st.lists(st.sampled_from(["view", "click", "buy"]), min_size=n, max_size=n))
    return pa.table(columns)


def _reference(events: pa.Table):
    """The store's contents computed the slow, obvious way."""
    users = np.asarray(events.column("user").to_pylist())
    items = np.asarray(events.column("item").to_pylist())
    ts = np.asarray(events.column("timestamp").to_pylist(), dtype=np.int64)
    user_raw, user_dense = np.unique(users, return_inverse=True)
    item_raw = np.unique(items)
    # Sort by user, then timestamp, then file position (ties keep file order).
    order = np.lexsort((np.arange(len(ts)), ts, user_dense))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_dense, minlength=len(user_raw)))])
    out = {"user_raw": user_raw, "item_raw": item_raw, "offsets": offsets,
           "item": items[order], "timestamp": ts[order], "user_of_event": users[order]}
    if "action" in events.column_names:
        actions = np.asarray(events.column("action").to_pylist())
        out["action_values"] = np.unique(actions)
        out["action"] = actions[order]
    return out


@SETTINGS
@given(events=event_tables())
def test_round_trip_matches_lexsort_reference(events: pa.Table) -> None:
    _check_round_trip(events)


@pytest.mark.parametrize("events", [
    # Sparse huge int ids (the sort + index_in path) and timestamps too wide to pack (lexsort).
    pa.table({"user": [10**15, 3, 10**15, 3], "item": [2 * 10**15, 5, 5, 2 * 10**15],
              "timestamp": [2**62, -(2**62), -(2**62), 0], "action": ["buy", "view", "view", "click"]}),
    # String ids, tied timestamps, float ratings.
    pa.table({"user": ["b", "a", "b", "a", "b"], "item": ["y", "x", "x", "z", "y"],
              "timestamp": [1, 1, 1, 0, 1], "action": [1.0, 4.5, 2.0, 4.5, 1.0]}),
], ids=["huge_ids_wide_timestamps", "strings_ties_ratings"])
def test_round_trip_fixed_cases(events: pa.Table) -> None:
    _check_round_trip(events)


def _check_round_trip(events: pa.Table) -> None:
    ref = _reference(events)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "store")
        stats = write_store(Interactions(events, source="test", action_name="rating"), path)
        store = SequenceStore.open(path)

        assert (store.num_users, store.num_items, store.num_events) == (
            len(ref["user_raw"]), len(ref["item_raw"]), events.num_rows)
        assert (stats.num_users, stats.num_items, stats.num_events) == (
            store.num_users, store.num_items, store.num_events)
        assert store.offsets.dtype == np.int64 and store.item.dtype == np.int32
        assert store.timestamp.dtype == np.int64
        np.testing.assert_array_equal(store.offsets, ref["offsets"])
        np.testing.assert_array_equal(store.lengths, np.diff(ref["offsets"]))

        # Dense ids are ranks of the sorted raw ids, and map back to the raw ids.
        user_raw, item_raw = store.user_raw_ids(), store.item_raw_ids()
        assert user_raw.tolist() == ref["user_raw"].tolist()
        assert item_raw.tolist() == ref["item_raw"].tolist()
        assert store.item.min() >= 0 and store.item.max() < store.num_items
        assert item_raw[store.item].tolist() == ref["item"].tolist()
        np.testing.assert_array_equal(store.timestamp, ref["timestamp"])
        users_per_event = np.repeat(user_raw, store.lengths)
        assert users_per_event.tolist() == ref["user_of_event"].tolist()

        if "action" in ref:
            assert store.action is not None and store.action.dtype == np.int16
            assert store.num_actions == len(ref["action_values"])
            assert store.action_values == ref["action_values"].tolist()
            values = np.asarray(store.action_values, dtype=object)
            assert values[store.action].tolist() == ref["action"].tolist()
            assert store.manifest["action"]["name"] == "rating"
        else:
            assert store.action is None and store.num_actions == 0 and store.action_values == []


def test_ties_keep_file_order_and_dense_ids_ignore_file_order(tmp_path) -> None:
    events = pa.table({"user": [7, 3, 7, 7, 3], "item": [30, 10, 20, 10, 40],
                       "timestamp": [5, 9, 5, 1, 9]})
    store = SequenceStore.open(_write(events, tmp_path / "a"))
    # User 3 (dense 0): items 10, 40 tied at t=9, in file order; user 7: t=1, then 30, 20 tied at t=5.
    assert store.item_raw_ids()[store.item].tolist() == [10, 40, 10, 30, 20]
    assert store.timestamp.tolist() == [9, 9, 1, 5, 5]
    # The same events reversed give the same id maps (ties then come out reversed).
    reversed_store = SequenceStore.open(_write(events.take(pa.array([4, 3, 2, 1, 0])), tmp_path / "b"))
    assert reversed_store.item_raw_ids().tolist() == store.item_raw_ids().tolist()
    assert reversed_store.user_raw_ids().tolist() == store.user_raw_ids().tolist()
    assert reversed_store.item_raw_ids()[reversed_store.item].tolist() == [40, 10, 10, 20, 30]


def _write(events: pa.Table, path, **kwargs) -> str:
    write_store(Interactions(events, source="test", **kwargs), str(path))
    return str(path)


def test_string_ids_differing_by_trailing_nul_stay_distinct(tmp_path) -> None:
    # numpy unicode arrays drop trailing NUL characters, so "a" and "a\x00" must not be
    # merged (or mapped to an invalid dense id) on the way through numpy; rejecting
    # them with a DataError is also acceptable.
    events = pa.table({"user": ["u", "u", "u"], "item": ["a", "a\x00", "b"], "timestamp": [1, 2, 3]})
    try:
        store = SequenceStore.open(_write(events, tmp_path / "s"))
    except DataError:
        return
    assert 0 <= store.item.min() and store.item.max() < store.num_items
    assert store.num_items == 3


@pytest.mark.parametrize("string_ids", [False, True])
def test_feature_tables_are_aligned_to_dense_ids(tmp_path, string_ids: bool) -> None:
    conv = (lambda v: f"x{v}") if string_ids else (lambda v: v)
    events = pa.table({"user": [conv(u) for u in [5, 2, 5, 9]], "item": [conv(i) for i in [300, 100, 200, 300]],
                       "timestamp": [1, 2, 3, 4]})
    # Item 200 and user 9 have no feature row; item 999 and user 1 have no events.
    items = pa.table({"item": [conv(i) for i in [999, 300, 100]], "genre": ["a", "c", "b"],
                      "year": pa.array([1990, 2000, 1980], type=pa.int32())})
    users = pa.table({"user": [conv(u) for u in [1, 5, 2]], "age": [10, 50, 20]})
    store = SequenceStore.open(_write(events, tmp_path / "s", item_features=items, user_features=users))

    item_raw = store.item_raw_ids().tolist()
    item_table = store.item_features()
    assert item_table.num_rows == store.num_items
    assert item_table.column("item").to_pylist() == item_raw
    genre = {conv(300): "c", conv(100): "b"}
    year = {conv(300): 2000, conv(100): 1980}
    assert item_table.column("genre").to_pylist() == [genre.get(i) for i in item_raw]
    assert item_table.column("year").to_pylist() == [year.get(i) for i in item_raw]

    user_raw = store.user_raw_ids().tolist()
    user_table = store.user_features()
    assert user_table.column("user").to_pylist() == user_raw
    age = {conv(5): 50, conv(2): 20}
    assert user_table.column("age").to_pylist() == [age.get(u) for u in user_raw]
    assert store.manifest["item_features"] and store.manifest["user_features"]


def test_no_feature_tables(tmp_path) -> None:
    store = SequenceStore.open(_write(pa.table({"user": [1], "item": [2], "timestamp": [3]}), tmp_path / "s"))
    assert store.item_features() is None and store.user_features() is None


def test_duplicate_feature_rows_are_rejected(tmp_path) -> None:
    events = pa.table({"user": [1, 1], "item": [2, 3], "timestamp": [3, 4]})
    items = pa.table({"item": [2, 2], "f": [0, 1]})
    with pytest.raises(DataError, match="duplicate"):
        _write(events, tmp_path / "s", item_features=items)
    assert os.listdir(tmp_path) == []


def _small_events(offset: int = 0) -> pa.Table:
    return pa.table({"user": [1, 1, 2, 2, 2], "item": [10 + offset, 11, 10, 12, 13],
                     "timestamp": [5, 6, 5, 7, 8], "action": [4.0, 3.0, 5.0, 1.0, 2.0]})


def test_rewrite_replaces_store(tmp_path) -> None:
    path = _write(_small_events(), tmp_path / "store")
    _write(_small_events(offset=100), path)
    assert 110 in SequenceStore.open(path).item_raw_ids().tolist()
    assert os.listdir(tmp_path) == ["store"]


def _read_all(path: str) -> dict:
    return {f: pathlib.Path(path, f).read_bytes() for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("fail_at_call", [1, 3, 5])
def test_failed_write_leaves_previous_store_and_no_temp_dirs(tmp_path, monkeypatch, fail_at_call: int) -> None:
    path = _write(_small_events(), tmp_path / "store")
    before = _read_all(path)

    real_save, calls = np.save, []

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == fail_at_call:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store_module.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        _write(_small_events(offset=100), path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["store"]  # no .tmp- or .old- directory left behind
    assert _read_all(path) == before
    assert SequenceStore.open(path).item_raw_ids().tolist() == [10, 11, 12, 13]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    def failing_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store_module.np, "save", failing_save)
    with pytest.raises(OSError):
        _write(_small_events(), tmp_path / "store")
    assert os.listdir(tmp_path) == []


def test_too_many_action_values_is_a_data_error_and_leaves_nothing(tmp_path) -> None:
    n = 40_000  # more distinct values than an int16 action id can hold
    events = pa.table({"user": np.zeros(n, dtype=np.int64), "item": np.arange(n),
                       "timestamp": np.arange(n), "action": np.arange(n) / 7.0})
    with pytest.raises(DataError, match="distinct values"):
        _write(events, tmp_path / "store")
    assert os.listdir(tmp_path) == []


def test_empty_events_are_a_data_error(tmp_path) -> None:
    events = pa.table({"user": pa.array([], pa.int64()), "item": pa.array([], pa.int64()),
                       "timestamp": pa.array([], pa.int64())})
    with pytest.raises(DataError, match="no events"):
        _write(events, tmp_path / "store")
    assert os.listdir(tmp_path) == []


def test_open_missing_store(tmp_path) -> None:
    with pytest.raises(DataError, match="manifest.json missing"):
        SequenceStore.open(str(tmp_path / "nothing"))


@pytest.fixture
def store_path(tmp_path) -> str:
    return _write(_small_events(), tmp_path / "store")


@pytest.mark.parametrize("name", ["item", "offsets", "timestamp", "action"])
def test_deleted_array_is_detected(store_path: str, name: str) -> None:
    os.remove(os.path.join(store_path, f"{name}.npy"))
    with pytest.raises(DataError, match=rf"{name}\.npy.*corrupt"):
        SequenceStore.open(store_path)


@pytest.mark.parametrize("keep", ["empty", "half_header", "header_only", "all_but_one_value"])
def test_truncated_array_is_detected(store_path: str, keep: str) -> None:
    file = os.path.join(store_path, "item.npy")
    data = pathlib.Path(file).read_bytes()
    header = len(data) - 5 * 4  # 5 int32 values follow the header
    cut = {"empty": 0, "half_header": header // 2, "header_only": header, "all_but_one_value": len(data) - 4}[keep]
    with open(file, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(DataError, match=r"item\.npy.*corrupt"):
        SequenceStore.open(store_path)


def test_wrong_length_array_is_detected(store_path: str) -> None:
    np.save(os.path.join(store_path, "timestamp.npy"), np.arange(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"timestamp\.npy has shape \(4,\), manifest expects \(5,\)"):
        SequenceStore.open(store_path)


def test_inconsistent_offsets_are_detected(store_path: str) -> None:
    np.save(os.path.join(store_path, "offsets.npy"), np.array([0, 2, 4], dtype=np.int64))
    with pytest.raises(DataError, match="offsets end at 4"):
        SequenceStore.open(store_path)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None])
def test_wrong_schema_version_is_detected(store_path: str, version) -> None:
    manifest_file = pathlib.Path(store_path, "manifest.json")
    manifest = json.loads(manifest_file.read_text())
    if version is None:
        del manifest["schema_version"]
    else:
        manifest["schema_version"] = version
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema version"):
        SequenceStore.open(store_path)


def test_manifest_records_source_and_extra_fields(tmp_path) -> None:
    path = str(tmp_path / "store")
    write_store(Interactions(_small_events(), source="unit-test", files={"ratings": "r.dat"}), path,
                extra_manifest={"obtained_from": "hand-written"})
    store = SequenceStore.open(path)
    assert store.manifest["source"] == "unit-test"
    assert store.manifest["files"] == {"ratings": "r.dat"}
    assert store.manifest["obtained_from"] == "hand-written"
    assert "5 interactions" in repr(store)


@pytest.mark.parametrize("layout", ["user_sorted", "time_sorted", "shuffled"])
def test_sort_fast_paths_match_lexsort(layout):
    from torchrec_genrec.data.store import _sort_by_user_then_time

    rng = np.random.default_rng(7)
    n = 5000
    user = rng.integers(0, 50, n).astype(np.int32)
    ts = rng.integers(0, 300, n).astype(np.int64)  # many ties
    if layout == "user_sorted":
        o = np.lexsort((np.arange(n), ts, user))
        user, ts = user[o], ts[o]
    elif layout == "time_sorted":
        o = np.lexsort((np.arange(n), ts))
        user, ts = user[o], ts[o]
    expected = np.lexsort((np.arange(n), ts, user))
    got = _sort_by_user_then_time(user, ts)
    if got is None:
        assert layout == "user_sorted"
        got = np.arange(n)
    np.testing.assert_array_equal(got, expected)


def test_prepare_never_deletes_a_directory_it_did_not_write(tmp_path, capsys):
    """`genrec prepare --out DIR` writes into a new or empty directory or over an earlier
    store; a directory holding anything else is refused (its files stay) unless --force."""
    import csv

    from torchrec_genrec import cli

    log = tmp_path / "events.csv"
    with open(log, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "timestamp"])
        for u in range(5):
            for t in range(4):
                writer.writerow([u, (u + t) % 7, 100 * u + t])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = cli.main(["prepare", "csv", "--path", str(log), "--out", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and "not a sequence store ('notes.txt')" in err and "--force" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(["prepare", "csv", "--path", str(log), "--out", str(a_file)]) == 2
    assert a_file.read_text() == "x"
    # An empty directory, then the store itself again, are fine; --force replaces anything.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["prepare", "csv", "--path", str(log), "--out", str(empty)]) == 0
    assert cli.main(["prepare", "csv", "--path", str(log), "--out", str(empty)]) == 0
    assert cli.main(["prepare", "csv", "--path", str(log), "--out", str(mine), "--force"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "manifest.json").exists()
    assert cli.main(["prepare", "movielens-1m", "--path", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "mine" / "..")]) == 2  # the parent holds other files
