"""Full-ranking evaluation of a retrieval model on a leave-one-out split."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from tqdm import tqdm

from torchrec_genrec.data.batching import SequenceBatch, SequenceDataset, make_dataloader
from torchrec_genrec.train.metrics import RetrievalMetrics, rank_of_targets


@torch.no_grad()
def evaluate_retrieval(model: Callable[[SequenceBatch], torch.Tensor], dataset: SequenceDataset,
                       ks: Sequence[int], batch_size: int, num_workers: int = 0,
                       desc: str = "eval", return_ranks: bool = False) -> Dict[str, float]:
    """Ranks each user's held-out item among all items, excluding items the user has seen.

    Args:
        model (Callable[[SequenceBatch], torch.Tensor]): returns ``(B, N)`` scores over
            the whole catalogue for a batch.
        dataset (SequenceDataset): a VALID or TEST split built with ``with_seen_items=True``.
        ks (Sequence[int]): cut-offs for HR@K / NDCG@K.
        batch_size (int): users per batch.
        num_workers (int): DataLoader workers.
        desc (str): progress-bar label.
        return_ranks (bool): also return the per-user 0-based ranks under key
            ``"ranks"`` (a tensor), e.g. for paired-bootstrap intervals.

    Returns:
        Dict[str, float]: ``hr@K``, ``ndcg@K``, ``mrr`` and ``count``.
    """
    if not dataset.with_seen_items:
        raise ValueError("evaluation excludes seen items: build the dataset with with_seen_items=True")
    metrics = RetrievalMetrics(ks)
    loader = make_dataloader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    all_ranks = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        scores = model(batch)
        seen = batch.seen_items
        ranks = rank_of_targets(scores, batch.target_item, seen.values(), seen.offsets())
        metrics.update(ranks)
        all_ranks.append(ranks)
    out: Dict = dict(metrics.compute())
    if return_ranks:
        out["ranks"] = torch.cat(all_ranks)
    return out
