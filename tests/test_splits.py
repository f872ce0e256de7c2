"""Tests for train / validation / test splits (torchrec_genrec/data/splits.py)."""

from __future__ import annotations

import os
import tempfile
from typing import List

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import Interactions
from torchrec_genrec.data.splits import GlobalTimeSplit, LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore, write_store


def _store_with_lengths(lengths: List[int], path: str) -> SequenceStore:
    """A store whose dense user u has lengths[u] events (user raw id u, so dense = raw)."""
    users = np.repeat(np.arange(len(lengths)), lengths)
    events = pa.table({"user": users, "item": np.arange(len(users)) % 5,
                       "timestamp": np.arange(len(users))})
    write_store(Interactions(events, source="test"), path)
    return SequenceStore.open(path)


def _reference_bounds(lengths: List[int], holdout: int, split: Split):
    """Per-user loop: which users have the split, their history range and target."""
    rows = []
    offset = 0
    for u, n in enumerate(lengths):
        start, stop = offset, offset + n
        offset = stop
        if split is Split.TRAIN:
            if n - holdout >= 2:
                rows.append((u, start, stop - holdout, -1))
        else:
            target = stop - (2 if split is Split.VALID else 1)
            if target - start >= 1:
                rows.append((u, start, target, target))
    return [np.array([r[i] for r in rows], dtype=np.int64) for i in range(4)]


def test_leave_one_out_holdout_2_by_hand(tmp_path) -> None:
    store = _store_with_lengths([1, 2, 3, 4, 6], str(tmp_path / "s"))
    # offsets: 0, 1, 3, 6, 10, 16
    loo = LeaveOneOut(holdout=2)
    user, start, end, target = loo.bounds(store, Split.TRAIN)
    assert user.tolist() == [3, 4] and start.tolist() == [6, 10] and end.tolist() == [8, 14]
    assert target.tolist() == [-1, -1]
    user, start, end, target = loo.bounds(store, Split.VALID)
    assert user.tolist() == [2, 3, 4] and start.tolist() == [3, 6, 10]
    assert end.tolist() == [4, 8, 14] and target.tolist() == [4, 8, 14]
    user, start, end, target = loo.bounds(store, Split.TEST)
    # The test history includes the validation event.
    assert user.tolist() == [1, 2, 3, 4] and start.tolist() == [1, 3, 6, 10]
    assert end.tolist() == [2, 5, 9, 15] and target.tolist() == [2, 5, 9, 15]


def test_leave_one_out_holdout_1_by_hand(tmp_path) -> None:
    store = _store_with_lengths([1, 2, 3, 4], str(tmp_path / "s"))
    # offsets: 0, 1, 3, 6, 10
    loo = LeaveOneOut(holdout=1)
    user, start, end, target = loo.bounds(store, Split.TRAIN)
    assert user.tolist() == [2, 3] and start.tolist() == [3, 6] and end.tolist() == [5, 9]
    user, start, end, target = loo.bounds(store, Split.TEST)
    assert user.tolist() == [1, 2, 3] and end.tolist() == [2, 5, 9] and target.tolist() == [2, 5, 9]
    with pytest.raises(DataError, match="no validation events"):
        loo.bounds(store, Split.VALID)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=12))
def test_leave_one_out_matches_per_user_reference(lengths: List[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = _store_with_lengths(lengths, os.path.join(d, "s"))
        for holdout in (1, 2):
            loo = LeaveOneOut(holdout=holdout)
            splits = [Split.TRAIN, Split.TEST] + ([Split.VALID] if holdout == 2 else [])
            for split in splits:
                got = loo.bounds(store, split)
                want = _reference_bounds(lengths, holdout, split)
                for g, w in zip(got, want):
                    assert g.dtype == np.int64
                    np.testing.assert_array_equal(g, w)
            # Training never sees a held-out event: it ends where the first held-out one starts.
            train_users, _, train_end, _ = loo.bounds(store, Split.TRAIN)
            test_users, _, _, test_target = loo.bounds(store, Split.TEST)
            first_held_out = dict(zip(test_users.tolist(), (test_target - (holdout - 1)).tolist()))
            for u, e in zip(train_users.tolist(), train_end.tolist()):
                assert e == first_held_out[u]


@pytest.mark.parametrize("holdout", [0, 3])
def test_leave_one_out_rejects_other_holdouts(holdout: int) -> None:
    with pytest.raises(ValueError, match="holdout"):
        LeaveOneOut(holdout=holdout)


def _store_with_timestamps(ts: np.ndarray, path: str) -> SequenceStore:
    n = len(ts)
    events = pa.table({"user": np.arange(n) % 7, "item": np.arange(n) % 11,
                       "timestamp": pa.array(ts, type=pa.int64())})
    write_store(Interactions(events, source="test"), path)
    return SequenceStore.open(path)


@pytest.mark.parametrize("valid_fraction,test_fraction", [(0.1, 0.1), (0.2, 0.05), (0.0, 0.3)])
def test_global_time_split_labels_follow_cutoffs(tmp_path, valid_fraction: float, test_fraction: float) -> None:
    rng = np.random.default_rng(0)
    ts = rng.permutation(1000) * 3 + 17  # distinct timestamps, shuffled file order
    store = _store_with_timestamps(ts, str(tmp_path / "s"))
    split = GlobalTimeSplit(valid_fraction, test_fraction)
    valid_start, test_start = split.cutoffs(store)
    assert valid_start <= test_start
    labels = split.labels(store)
    assert labels.dtype == np.int8 and labels.shape == (store.num_events,)
    stored_ts = np.asarray(store.timestamp)
    expected = np.where(stored_ts >= test_start, 2, np.where(stored_ts >= valid_start, 1, 0))
    np.testing.assert_array_equal(labels, expected)
    # Nothing from the future in an earlier split.
    if (labels == 1).any():
        assert stored_ts[labels == 0].max() < stored_ts[labels == 1].min()
        assert stored_ts[labels == 1].max() < stored_ts[labels == 2].min()
    counts = np.bincount(labels, minlength=3) / len(labels)
    assert counts[1] == pytest.approx(valid_fraction, abs=0.002)
    assert counts[2] == pytest.approx(test_fraction, abs=0.002)


def test_global_time_split_nanosecond_timestamps(tmp_path) -> None:
    # Epoch nanoseconds exceed 2**53: cutoffs must not lose precision in a float quantile.
    ts = np.arange(1000, dtype=np.int64)
    base = 1_700_000_000_000_000_000
    split = GlobalTimeSplit(0.1, 0.1)
    small = split.labels(_store_with_timestamps(ts, str(tmp_path / "small")))
    large = split.labels(_store_with_timestamps(ts + base, str(tmp_path / "large")))
    np.testing.assert_array_equal(large, small)


def test_global_time_split_too_coarse_timestamps(tmp_path) -> None:
    store = _store_with_timestamps(np.zeros(50, dtype=np.int64), str(tmp_path / "s"))
    with pytest.raises(DataError, match="too coarse"):
        GlobalTimeSplit(0.1, 0.1).cutoffs(store)


@pytest.mark.parametrize("valid_fraction,test_fraction", [(-0.1, 0.1), (0.1, 0.0), (0.5, 0.5)])
def test_global_time_split_rejects_bad_fractions(valid_fraction: float, test_fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        GlobalTimeSplit(valid_fraction, test_fraction)
