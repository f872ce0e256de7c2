"""Jagged batches of user sequences as TorchRec ``KeyedJaggedTensor``s, with no padding.

A :class:`SequenceDataset` reads a split of a :class:`SequenceStore` and builds whole
batches at once (vectorised gathers from the memory-mapped CSR arrays), so a batch of
thousands of events costs a handful of numpy calls rather than a Python loop per user.
:func:`make_dataloader` wraps it in a ``torch.utils.data.DataLoader`` with workers and
seeded, epoch-dependent shuffling; each rank of a distributed job reads its own share.
The batch type, :class:`~torchrec_genrec.batch.SequenceBatch`, is shared with the models
and the predictors.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_genrec.batch import ACTION_KEY, ITEM_KEY, TIMESTAMP_KEY, SequenceBatch
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore

__all__ = ["ACTION_KEY", "ITEM_KEY", "TIMESTAMP_KEY", "SequenceBatch", "SequenceDataset", "ShardedBatchSampler",
           "gather_ranges", "make_dataloader"]


def gather_ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges ``start[i]:end[i]``, without a Python loop.

    Example::

        gather_ranges(np.array([10, 3]), np.array([12, 6]))  # [10, 11, 3, 4, 5]
    """
    # Empty ranges contribute no slot.
    nonempty = end > start
    start, end = start[nonempty], end[nonempty]
    lengths = end - start
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each range is a run of +1 steps; at a range's first slot, jump from the previous
    # range's last index to this range's start.
    steps = np.ones(total, dtype=np.int64)
    first = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    steps[0] = start[0]
    steps[first[1:]] = start[1:] - (end[:-1] - 1)
    return np.cumsum(steps)


class SequenceDataset(Dataset):
    """One split of a sequence store; indexing with a list of rows returns a whole batch.

    Args:
        store_path (str): a prepared dataset (see :class:`SequenceStore`).
        split (Split): TRAIN, VALID or TEST.
        max_seq_len (int): histories longer than this keep their most recent events.
        protocol (LeaveOneOut): how targets are held out.
        with_seen_items (bool): also return each user's full, untruncated history
            items (``SequenceBatch.seen_items``), for excluding them in evaluation.

    Example::

        ds = SequenceDataset(path, Split.TEST, max_seq_len=200)
        batch = ds[[0, 1, 2]]   # SequenceBatch with B = 3
    """

    def __init__(self, store_path: str, split: Split, max_seq_len: int,
                 protocol: LeaveOneOut = LeaveOneOut(), with_seen_items: bool = False) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, not {max_seq_len}")
        self.store_path = store_path
        self.split = split
        self.max_seq_len = max_seq_len
        self.protocol = protocol
        store = SequenceStore.open(store_path)
        self.user, self.start, self.end, self.target = protocol.bounds(store, split)
        self.num_users_excluded = store.num_users - len(self.user)
        if len(self.user) == 0:
            raise DataError(f"no user has enough events for the {split.value} split "
                            f"(leave-one-out, holdout={protocol.holdout})", path=store_path)
        self.history_start = self.start.copy()
        # Truncation keeps the most recent events.
        self.start = np.maximum(self.start, self.end - max_seq_len)
        self.with_seen_items = with_seen_items
        self.has_action = store.action is not None
        self._store: Optional[SequenceStore] = None  # opened lazily in each worker

    @property
    def store(self) -> SequenceStore:
        if self._store is None:
            self._store = SequenceStore.open(self.store_path)
        return self._store

    def __getstate__(self) -> Dict:
        # Memory maps are re-opened in each worker instead of being pickled as copies.
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, rows) -> SequenceBatch:
        if isinstance(rows, (int, np.integer)):
            rows = [rows]
        return self.__getitems__(rows)

    def raw_histories(self, batch: SequenceBatch) -> List[Dict[str, list]]:
        """A batch's histories in raw item ids and action values, oldest first: what a
        client sends a predictor (``History(**h)``).

        Returns:
            List[Dict[str, list]]: per user ``items``, ``timestamps`` and, when the store
            has actions, ``actions``.
        """
        store = self.store
        raw_items, action_values = store.item_raw_ids(), store.action_values
        f = batch.features
        offsets = np.concatenate([[0], np.cumsum(f[ITEM_KEY].lengths().numpy())])
        items, ts = f[ITEM_KEY].values().numpy(), f[TIMESTAMP_KEY].values().numpy()
        actions = f[ACTION_KEY].values().numpy() if self.has_action else None
        out = []
        for a, b in zip(offsets[:-1], offsets[1:]):
            h = {"items": raw_items[items[a:b]].tolist(), "timestamps": ts[a:b].tolist()}
            if actions is not None:
                h["actions"] = [action_values[x] for x in actions[a:b]]
            out.append(h)
        return out

    def __getitems__(self, rows: Sequence[int]) -> SequenceBatch:
        rows = np.asarray(rows, dtype=np.int64)
        store = self.store
        start, end = self.start[rows], self.end[rows]
        index = gather_ranges(start, end)
        lengths = torch.from_numpy(end - start)
        keys: List[str] = [ITEM_KEY]
        values = [store.item[index].astype(np.int64)]
        if self.has_action:
            keys.append(ACTION_KEY)
            values.append(store.action[index].astype(np.int64))
        keys.append(TIMESTAMP_KEY)
        values.append(np.asarray(store.timestamp[index], dtype=np.int64))
        features = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=lengths.repeat(len(keys)),  # key-major: all rows of key 0, then key 1, ...
        )
        batch = SequenceBatch(features=features, user=torch.from_numpy(self.user[rows]))
        if self.split is not Split.TRAIN:
            target = self.target[rows]
            batch.target_item = torch.from_numpy(store.item[target].astype(np.int64))
            batch.target_timestamp = torch.from_numpy(np.asarray(store.timestamp[target], dtype=np.int64))
            if self.has_action:
                batch.target_action = torch.from_numpy(store.action[target].astype(np.int64))
        if self.with_seen_items:
            first = self.history_start[rows]
            batch.seen_items = JaggedTensor(
                values=torch.from_numpy(store.item[gather_ranges(first, end)].astype(np.int64)),
                lengths=torch.from_numpy(end - first),
            )
        return batch


class ShardedBatchSampler(Sampler[List[int]]):
    """Yields this rank's batches of row indices; reshuffles per epoch from one seed.

    Every rank draws the same permutation (seed + epoch) and takes every
    ``world_size``-th batch, so ranks never share a row and an epoch's order is a pure
    function of (seed, epoch): resumes and re-runs see the same batches.

    Args:
        num_rows (int): dataset size.
        batch_size (int): rows per batch (per rank).
        shuffle (bool): shuffle each epoch.
        seed (int): base seed.
        rank (int): this process's rank.
        world_size (int): number of ranks.
        drop_last (bool): drop the final short batch (and any batch that only some
            ranks would get), so all ranks take the same number of steps.
    """

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's order; ``start_batch`` skips this rank's first batches
        (resuming mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _batches(self) -> List[np.ndarray]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        batches = [order[i:i + self.batch_size] for i in range(0, self.num_rows, self.batch_size)]
        if self.drop_last:
            if batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        for b in self._batches()[self.start_batch:]:
            yield b.tolist()

    def __len__(self) -> int:
        return max(len(self._batches()) - self.start_batch, 0)


def _identity(batch: SequenceBatch) -> SequenceBatch:
    return batch


def make_dataloader(dataset: SequenceDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                    num_workers: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = False) -> DataLoader:
    """A DataLoader of :class:`SequenceBatch` es over ``dataset``.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch for a new shuffle.

    Example::

        loader = make_dataloader(ds, 128, shuffle=True, seed=0, num_workers=2)
        for epoch in range(3):
            loader.batch_sampler.set_epoch(epoch)
            for batch in loader: ...
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_identity,  # __getitems__ already returns a batch
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Its own generator: by default each new iterator draws a seed from the global one,
        # which would shift dropout whenever an epoch's iterator is (re)created, e.g. when
        # resuming mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
