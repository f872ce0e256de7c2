"""Train / validation / test splits of a sequence store.

Two protocols:

- **Leave-one-out by time** (HSTU, SASRec and RecBole): per user, the last event is the
  test target, the second-to-last the validation target, and training sees the rest.
  The published HSTU numbers use a variant (``holdout=1``): training sees all but the
  last event and the last is evaluated.
- **Global time split** (ranking): two timestamp cutoffs split all events into train,
  validation and test by when they happened, so nothing from the future leaks into
  training.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Tuple

import numpy as np

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.store import SequenceStore


class Split(enum.Enum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out by time.

    Args:
        holdout (int): events held out at each user's end. 2 (default): train on all
            but the last two, validate on the second-to-last, test on the last.
            1: train on all but the last and test on the last (the published HSTU
            protocol; there is no validation event, so model selection must not use it).

    Example::

        start, end, target = LeaveOneOut().bounds(store, Split.TEST)
        # history of row r: events start[r]:end[r]; its target event: target[r]
    """

    holdout: int = 2

    def __post_init__(self) -> None:
        if self.holdout not in (1, 2):
            raise ValueError(f"holdout must be 1 or 2, not {self.holdout}")

    def bounds(self, store: SequenceStore, split: Split) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-user event ranges of a split.

        Returns:
            Tuple of int64 arrays ``(user, start, end, target)``, one row per user that has
            the split: the history is events ``start:end`` of the store (for TRAIN: the
            whole training sequence, every position predicts the next one), and
            ``target`` is the index of the event to predict (-1 for TRAIN). Users too
            short for a split are left out of it: TRAIN needs at least two training
            events, VALID and TEST at least one history event before the target.
        """
        offsets = np.asarray(store.offsets)
        start, stop = offsets[:-1], offsets[1:]
        users = np.arange(len(start), dtype=np.int64)
        if split is Split.TRAIN:
            end = stop - self.holdout
            keep = end - start >= 2
            target = np.full(len(start), -1, dtype=np.int64)
        else:
            if split is Split.VALID and self.holdout < 2:
                raise DataError("leave-one-out with holdout=1 has no validation events; use holdout=2 "
                                "or select models on the training loss")
            back = 2 if (split is Split.VALID) else 1
            target = stop - back
            end = target
            keep = end - start >= 1
        return users[keep], start[keep], end[keep], target[keep]


@dataclasses.dataclass(frozen=True)
class GlobalTimeSplit:
    """Splits events by two timestamp cutoffs (for ranking tasks).

    Args:
        valid_fraction (float): share of events (by time) in validation.
        test_fraction (float): share of events (by time) in test.

    Example::

        cut = GlobalTimeSplit(0.1, 0.1).cutoffs(store)
        labels = GlobalTimeSplit(0.1, 0.1).labels(store)  # 0 train, 1 valid, 2 test
    """

    valid_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.valid_fraction and 0 < self.test_fraction and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("need 0 <= valid_fraction, 0 < test_fraction and their sum < 1, "
                             f"got {self.valid_fraction}, {self.test_fraction}")

    def cutoffs(self, store: SequenceStore) -> Tuple[int, int]:
        """Returns ``(valid_start, test_start)``: events at or after a cutoff belong to that split."""
        # Integer order statistics: float quantiles lose nanosecond timestamps (> 2**53).
        ts = np.asarray(store.timestamp)
        n = len(ts)
        k_valid = min(int(np.floor(n * (1 - self.valid_fraction - self.test_fraction))), n - 1)
        k_test = min(int(np.floor(n * (1 - self.test_fraction))), n - 1)
        valid_start, test_start = (int(v) for v in np.partition(ts, [k_valid, k_test])[[k_valid, k_test]])
        if test_start <= valid_start and self.valid_fraction > 0:
            raise DataError("timestamps are too coarse for these split fractions (the cutoffs coincide)",
                            path=store.path)
        return valid_start, test_start

    def labels(self, store: SequenceStore) -> np.ndarray:
        """int8 ``[E]``: 0 train, 1 valid, 2 test for every event of the store."""
        valid_start, test_start = self.cutoffs(store)
        ts = np.asarray(store.timestamp)
        out = (ts >= valid_start).astype(np.int8)
        out += ts >= test_start
        return out
