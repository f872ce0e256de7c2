"""Full-ranking evaluation of a retrieval model on a leave-one-out split."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

from torchrec_genrec.data.batching import SequenceBatch, SequenceDataset, make_dataloader
from torchrec_genrec.train.metrics import RetrievalMetrics, rank_of_targets

ScoreOutput = Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]


@torch.no_grad()
def evaluate_retrieval(model: Callable[[SequenceBatch], ScoreOutput], dataset: SequenceDataset,
                       ks: Sequence[int], batch_size: int, num_workers: int = 0,
                       desc: str = "eval", return_ranks: bool = False, progress: bool = True,
                       device: Optional[torch.device] = None, exclude_seen: bool = True) -> Dict[str, Any]:
    """Ranks each user's held-out item among all items, by default excluding items the
    user has seen; the other protocol's metrics come along (one forward pass scores both).

    Args:
        model (Callable[[SequenceBatch], ScoreOutput]): returns ``(B, N)`` scores over
            the whole catalogue for a batch, or ``(scores, action_logits)`` where
            ``action_logits`` ``(B, A)`` predict the action on the target item (then
            ``action_acc`` is reported too).
        dataset (SequenceDataset): a VALID or TEST split built with ``with_seen_items=True``.
        ks (Sequence[int]): cut-offs for HR@K / NDCG@K.
        batch_size (int): users per batch.
        num_workers (int): DataLoader workers.
        desc (str): progress-bar label.
        return_ranks (bool): also return the per-user 0-based ranks under key
            ``"ranks"`` (a tensor), e.g. for paired-bootstrap intervals.
        progress (bool): show a progress bar.
        device (Optional[torch.device]): the model's device; each batch moves there once.
        exclude_seen (bool): remove each user's history items from the ranking (true), or
            rank them too (false).

    Returns:
        Dict[str, Any]: ``hr@K``, ``ndcg@K``, ``mrr``, ``count`` (and ``action_acc``) under
        the protocol asked, and the same under the other one as a dict under
        ``seen_kept`` (when ``exclude_seen``) or ``seen_excluded``.
    """
    if not dataset.with_seen_items:
        raise ValueError("evaluation excludes seen items: build the dataset with with_seen_items=True")
    # Under a process group every rank scores its own share of the batches (the sharded
    # tables need every rank in every lookup) and the per-user ranks are gathered.
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    loader = make_dataloader(dataset, batch_size, shuffle=False, num_workers=num_workers, rank=rank, world_size=world)
    total_batches = -(-len(dataset) // batch_size)
    rounds = -(-total_batches // world)
    own_ranks, own_other = [], []
    action_hits = action_count = 0
    batches = iter(loader)
    for _ in tqdm(range(rounds), desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        batch = next(batches, None)
        if batch is None:  # fewer batches here than on other ranks: keep the lookups in step
            filler = dataset.__getitems__([0])
            model(filler.to(device, non_blocking=True) if device is not None else filler)
            continue
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        scores = model(batch)
        if isinstance(scores, tuple):
            scores, action_logits = scores
            if action_logits is not None and batch.target_action is not None:
                action_hits += (action_logits.argmax(1) == batch.target_action).sum()
                action_count += batch.batch_size
        seen = batch.seen_items
        excluded = rank_of_targets(scores, batch.target_item, seen.values(), seen.offsets()).cpu()
        kept = rank_of_targets(scores, batch.target_item).cpu()
        own_ranks.append(excluded if exclude_seen else kept)
        own_other.append(kept if exclude_seen else excluded)
    action_hits = int(action_hits)  # one device sync for the whole evaluation
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, (own_ranks, own_other, action_hits, action_count))
        # Rank r holds batches r, r + world, ...: interleave them back into dataset order.
        by_batch, other_by_batch = {}, {}
        for r, (ranks_r, other_r, _, _) in enumerate(gathered):
            for i, (ranks, other) in enumerate(zip(ranks_r, other_r)):
                by_batch[r + i * world], other_by_batch[r + i * world] = ranks, other
        all_ranks = [by_batch[b] for b in range(total_batches)]
        all_other = [other_by_batch[b] for b in range(total_batches)]
        action_hits = sum(g[2] for g in gathered)
        action_count = sum(g[3] for g in gathered)
    else:
        all_ranks, all_other = own_ranks, own_other
    out: Dict[str, Any] = _metrics(ks, all_ranks)
    out["seen_kept" if exclude_seen else "seen_excluded"] = _metrics(ks, all_other)
    if action_count:
        out["action_acc"] = action_hits / action_count
    if return_ranks:
        out["ranks"] = torch.cat(all_ranks)
        out["ranks_other_protocol"] = torch.cat(all_other)
    return out


def _metrics(ks: Sequence[int], ranks: Sequence[torch.Tensor]) -> Dict[str, float]:
    metrics = RetrievalMetrics(ks)
    for r in ranks:
        metrics.update(r)
    return dict(metrics.compute())
