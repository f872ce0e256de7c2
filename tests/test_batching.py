"""Tests for jagged batching (torchrec_genrec/data/batching.py).

Batches are compared with a per-user Python reference read straight from the store's
arrays, so the vectorised gathers are checked against something obviously right.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_genrec.data.batching import (
    ShardedBatchSampler,
    SequenceBatch,
    SequenceDataset,
    gather_ranges,
    make_dataloader,
)
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import Interactions
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore, write_store


@settings(max_examples=60, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 4)), max_size=10))
def test_gather_ranges_matches_python(ranges: List[Tuple[int, int]]) -> None:
    start = np.array([s for s, _ in ranges], dtype=np.int64)
    end = np.array([s + n for s, n in ranges], dtype=np.int64)
    want = [i for s, n in ranges for i in range(s, s + n)]
    got = gather_ranges(start, end)
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_gather_ranges_docstring_example() -> None:
    assert gather_ranges(np.array([10, 3]), np.array([12, 6])).tolist() == [10, 11, 3, 4, 5]
    assert gather_ranges(np.array([5, 7, 7]), np.array([5, 7, 8])).tolist() == [7]


# --- a small store shared by the dataset tests ----------------------------------------

NUM_USERS = 23


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    """Users of lengths 1..30 (some too short for each split), shuffled events, actions."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 31, size=NUM_USERS)
    lengths[:3] = [1, 2, 3]
    users = np.repeat(np.arange(NUM_USERS) * 10 + 1, lengths)
    n = len(users)
    events = pa.table({
        "user": users,
        "item": rng.integers(0, 40, size=n) * 7,
        "timestamp": rng.integers(0, 50, size=n),  # ties included
        "action": rng.choice(np.array(["view", "click", "buy"]), size=n),
    })
    events = events.take(pa.array(rng.permutation(n)))
    path = str(tmp_path_factory.mktemp("batching") / "store")
    write_store(Interactions(events, source="test"), path)
    return path


@pytest.fixture(scope="module")
def store_path_no_action(tmp_path_factory) -> str:
    users = np.repeat(np.arange(5), [1, 3, 4, 6, 2])
    events = pa.table({"user": users, "item": np.arange(len(users)) % 4, "timestamp": np.arange(len(users))})
    path = str(tmp_path_factory.mktemp("batching") / "store")
    write_store(Interactions(events, source="test"), path)
    return path


def _user_events(store: SequenceStore, u: int) -> Dict[str, List[int]]:
    lo, hi = int(store.offsets[u]), int(store.offsets[u + 1])
    out = {"item": [int(x) for x in store.item[lo:hi]], "timestamp": [int(x) for x in store.timestamp[lo:hi]]}
    if store.action is not None:
        out["action"] = [int(x) for x in store.action[lo:hi]]
    return out


def _reference_rows(store: SequenceStore, split: Split, holdout: int, max_seq_len: int):
    """Per user, in user order: (user, history per key, target event index or None)."""
    rows = []
    for u in range(store.num_users):
        events = _user_events(store, u)
        n = len(events["item"])
        if split is Split.TRAIN:
            end, target = n - holdout, None
            if end < 2:
                continue
        else:
            end = n - (2 if split is Split.VALID else 1)
            target = end
            if end < 1:
                continue
        begin = max(0, end - max_seq_len)  # keep the most recent events
        history = {k: v[begin:end] for k, v in events.items()}
        target_event = None if target is None else {k: v[target] for k, v in events.items()}
        rows.append((u, history, target_event))
    return rows


def _check_batch(batch: SequenceBatch, expected_rows, has_action: bool) -> None:
    keys = ["item", "action", "timestamp"] if has_action else ["item", "timestamp"]
    features = batch.features
    assert isinstance(features, KeyedJaggedTensor)
    assert features.keys() == keys
    assert batch.batch_size == len(expected_rows)
    assert batch.user.tolist() == [u for u, _, _ in expected_rows]
    lengths = [len(h["item"]) for _, h, _ in expected_rows]
    assert features.lengths().tolist() == lengths * len(keys)
    for key in keys:
        jt = features[key]
        assert jt.values().dtype == torch.int64
        assert jt.lengths().tolist() == lengths
        assert [t.tolist() for t in jt.to_dense()] == [h[key] for _, h, _ in expected_rows]
        # Padded view: same rows, zero-filled on the right.
        width = max(lengths)
        padded = jt.to_padded_dense(desired_length=width, padding_value=0)
        want = [h[key] + [0] * (width - len(h[key])) for _, h, _ in expected_rows]
        assert padded.tolist() == want
    if expected_rows[0][2] is None:
        assert batch.target_item is None and batch.target_action is None and batch.target_timestamp is None
    else:
        assert batch.target_item.tolist() == [t["item"] for _, _, t in expected_rows]
        assert batch.target_timestamp.tolist() == [t["timestamp"] for _, _, t in expected_rows]
        if has_action:
            assert batch.target_action.tolist() == [t["action"] for _, _, t in expected_rows]
        else:
            assert batch.target_action is None


@pytest.mark.parametrize("split", [Split.TRAIN, Split.VALID, Split.TEST])
@pytest.mark.parametrize("max_seq_len", [1, 4, 200])
def test_batches_match_reference(store_path: str, split: Split, max_seq_len: int) -> None:
    store = SequenceStore.open(store_path)
    ds = SequenceDataset(store_path, split, max_seq_len=max_seq_len)
    expected = _reference_rows(store, split, holdout=2, max_seq_len=max_seq_len)
    assert len(ds) == len(expected)
    assert ds.num_users_excluded == store.num_users - len(expected)
    rng = np.random.default_rng(1)
    for rows in ([0], list(range(len(ds))), rng.permutation(len(ds))[:7].tolist()):
        _check_batch(ds[rows], [expected[r] for r in rows], has_action=True)
    # An int index is a batch of one.
    _check_batch(ds[3], [expected[3]], has_action=True)


def test_truncation_keeps_most_recent_events(store_path: str) -> None:
    store = SequenceStore.open(store_path)
    ds = SequenceDataset(store_path, Split.TEST, max_seq_len=3)
    batch = ds[list(range(len(ds)))]
    ts = batch.features["timestamp"].to_dense()
    for b, u in enumerate(batch.user.tolist()):
        lo, hi = int(store.offsets[u]), int(store.offsets[u + 1])
        assert ts[b].tolist() == store.timestamp[max(lo, hi - 4):hi - 1].tolist()
        assert batch.target_timestamp[b] >= ts[b].max()


@pytest.mark.parametrize("split", [Split.TRAIN, Split.TEST])
def test_holdout_1_and_no_actions(store_path_no_action: str, split: Split) -> None:
    store = SequenceStore.open(store_path_no_action)
    ds = SequenceDataset(store_path_no_action, split, max_seq_len=10, protocol=LeaveOneOut(holdout=1))
    expected = _reference_rows(store, split, holdout=1, max_seq_len=10)
    _check_batch(ds[list(range(len(ds)))], expected, has_action=False)


def test_dataset_errors(store_path_no_action: str, tmp_path) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        SequenceDataset(store_path_no_action, Split.TEST, max_seq_len=0)
    single = str(tmp_path / "single")
    write_store(Interactions(pa.table({"user": [1, 2], "item": [1, 2], "timestamp": [0, 1]}), source="t"), single)
    with pytest.raises(DataError, match="no user has enough events for the test split"):
        SequenceDataset(single, Split.TEST, max_seq_len=10)


def _batch_lists(batch: SequenceBatch):
    return (batch.user.tolist(), batch.features.keys(), batch.features.lengths().tolist(),
            batch.features.values().tolist(),
            None if batch.target_item is None else batch.target_item.tolist())


def test_dataloader_workers_match_main_process(store_path: str) -> None:
    ds = SequenceDataset(store_path, Split.VALID, max_seq_len=5)
    epochs = {}
    for workers in (0, 2):
        loader = make_dataloader(ds, batch_size=4, shuffle=True, seed=3, num_workers=workers)
        assert not loader.pin_memory  # CPU path: nothing is pinned
        runs = []
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            runs.append([_batch_lists(b) for b in loader])
        epochs[workers] = runs
    assert epochs[0] == epochs[2]
    assert epochs[0][0] != epochs[0][1]  # a new epoch reshuffles
    # Each epoch covers every row exactly once.
    users = sorted(u for batch in epochs[0][0] for u in batch[0])
    assert users == sorted(ds.user.tolist())


def test_sampler_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> List[List[int]]:
        sampler = ShardedBatchSampler(50, 8, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    batches = order(0, 2)
    assert [len(b) for b in batches] == [8] * 6 + [2]
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert list(ShardedBatchSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("num_rows,batch_size", [(50, 8), (48, 8), (7, 3), (3, 4)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_ranks_partition_rows(num_rows: int, batch_size: int, drop_last: bool) -> None:
    per_rank = []
    for rank in range(2):
        sampler = ShardedBatchSampler(num_rows, batch_size, seed=7, rank=rank, world_size=2, drop_last=drop_last)
        sampler.set_epoch(4)
        batches = list(sampler)
        assert len(sampler) == len(batches)
        per_rank.append(batches)
    rows = [[i for b in batches for i in b] for batches in per_rank]
    assert not set(rows[0]) & set(rows[1])
    covered = sorted(rows[0] + rows[1])
    if drop_last:
        assert len(per_rank[0]) == len(per_rank[1])
        assert all(len(b) == batch_size for batches in per_rank for b in batches)
        full = num_rows // batch_size
        assert len(covered) == (full - full % 2) * batch_size
    else:
        assert covered == list(range(num_rows))


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBatchSampler(10, 0)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, 2, rank=2, world_size=2)


def test_sequence_batch_is_pipelineable_and_moves(store_path: str) -> None:
    ds = SequenceDataset(store_path, Split.TEST, max_seq_len=5)
    batch = ds[[0, 1, 2]]
    assert isinstance(batch, Pipelineable)
    for non_blocking in (False, True):
        moved = batch.to(torch.device("cpu"), non_blocking=non_blocking)
        assert isinstance(moved, SequenceBatch)
        assert _batch_lists(moved) == _batch_lists(batch)
        assert moved.target_action.tolist() == batch.target_action.tolist()
        assert moved.target_timestamp.tolist() == batch.target_timestamp.tolist()
    train = SequenceDataset(store_path, Split.TRAIN, max_seq_len=5)[[0, 1]].to(torch.device("cpu"))
    assert train.target_item is None and train.target_action is None


def test_dataset_pickles_without_its_memory_maps(store_path: str) -> None:
    import pickle

    ds = SequenceDataset(store_path, Split.TEST, max_seq_len=5)
    ds[[0]]  # opens the store
    assert ds._store is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None
    assert _batch_lists(clone[[0, 1]]) == _batch_lists(ds[[0, 1]])
    assert os.path.isdir(clone.store_path)
