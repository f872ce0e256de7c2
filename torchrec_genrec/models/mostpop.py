"""Most-popular ranker: the floor every retrieval table is read against."""

from __future__ import annotations

import numpy as np
import torch

from torchrec_genrec.batch import SequenceBatch
from torchrec_genrec.data.batching import gather_ranges
from torchrec_genrec.data.splits import LeaveOneOut


class MostPopular(torch.nn.Module):
    """Scores every item by how often it occurs in the training events.

    The same ranking for every user; evaluation then removes each user's seen items.

    Args:
        num_items (int): catalogue size N.

    Example::

        model = MostPopular.fit(store, LeaveOneOut())
        scores = model(batch)  # (B, N)
    """

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_items, dtype=torch.float32))

    @classmethod
    def fit(cls, store, protocol: LeaveOneOut) -> "MostPopular":
        """Counts items over every user's training events (no validation or test event).

        Args:
            store (SequenceStore): the events (its ``offsets``, ``item`` and ``num_items``).
            protocol (LeaveOneOut): how many events per user are held out.
        """
        # Every user's training events count, also users too short for a training sequence.
        offsets = np.asarray(store.offsets)
        start_all = offsets[:-1]
        end_all = np.maximum(offsets[1:] - protocol.holdout, start_all)
        items = np.asarray(store.item)[gather_ranges(start_all, end_all)]
        model = cls(store.num_items)
        model.counts.copy_(torch.from_numpy(np.bincount(items, minlength=store.num_items).astype(np.float32)))
        return model

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """Returns ``(B, N)`` scores."""
        return self.counts.unsqueeze(0).expand(batch.batch_size, -1)
