"""Full-ranking retrieval metrics: HR@K, NDCG@K and MRR of one held-out item per user.

This is the evaluation of the HSTU and SASRec papers: every user has one target item (the
last event under leave-one-out), the model scores the *whole catalogue* of N items, the
items already in the user's history are removed, and the target's rank among the rest
gives

- ``HR@K``   = 1 if rank < K else 0,
- ``NDCG@K`` = 1 / log2(rank + 2) if rank < K else 0 (one relevant item, so IDCG = 1),
- ``MRR``    = 1 / (rank + 1), not truncated,

each averaged over users (ranks are 0-based).

TorchRec's own ``torchrec.metrics`` are written for ranking models that score labelled
examples: AUC, NE, calibration, and session-level NDCG / precision / recall over the
examples of a session. None of them ranks a held-out item against the full catalogue
with history exclusion, which is what retrieval papers report, so those metrics live
here. State is kept as tensors of sums and a count, so ranks of a distributed job can be
combined later with one ``all_reduce`` (sum) per tensor.

Example::

    metrics = RetrievalMetrics(ks=(10, 50))
    for batch in loader:
        scores = model.score_all_items(batch)                     # (B, N)
        history = batch.features["item"]
        metrics.update(rank_of_targets(scores, batch.target_item,
                                       history.values(), history.offsets()))
    metrics.compute()  # {"hr@10": ..., "ndcg@10": ..., "hr@50": ..., "ndcg@50": ..., "mrr": ..., "count": ...}
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

DEFAULT_KS: Tuple[int, ...] = (10, 50, 200)


def rank_of_targets(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude_values: Optional[torch.Tensor] = None,
    exclude_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """0-based rank of each target among all N items, with history items removed.

    The rank of target ``t`` in row ``b`` is the number of items ``j`` that are not
    excluded and beat it:

    - ``scores[b, j] > scores[b, t]``, or
    - ``scores[b, j] == scores[b, t]`` and ``j < t`` (ties go to the lower item index),

    i.e. the target's position in a stable sort by ``(-score, item index)``. Ties are
    broken deterministically and never in the target's favour for being the target: a
    constant scorer ranks target ``t`` at ``t`` (less the removed items below it), not
    first, so a collapsed model cannot look perfect.

    Excluded items (the user's history) are removed from the ranking, which is what
    setting their scores to -inf does, except that a removed item never ties with a
    target scored -inf. Repeated history items are fine. The target itself is never
    removed, even when it is in the history (repeat consumption).

    NaN scores count against the model, so a diverged model cannot score well: a NaN
    item beats the target, and a NaN target ranks last among the items kept.

    Args:
        scores (torch.Tensor): ``(B, N)`` floating scores of every item for each row.
        targets (torch.Tensor): ``(B,)`` integer target item of each row, in ``[0, N)``.
        exclude_values (Optional[torch.Tensor]): ``(sum_b H[b],)`` items to remove,
            row ``b``'s items being ``exclude_values[exclude_offsets[b]:exclude_offsets[b + 1]]``
            (the layout of a TorchRec ``JaggedTensor``: ``values()``, ``offsets()``).
        exclude_offsets (Optional[torch.Tensor]): ``(B + 1,)`` offsets of
            ``exclude_values``, starting at 0. Given together with ``exclude_values``.

    Returns:
        torch.Tensor: ``(B,)`` int64 ranks in ``[0, N - 1]``.

    Example::

        scores = torch.tensor([[0.1, 0.9, 0.5, 0.5],
                               [0.3, 0.3, 0.3, 0.3]])
        targets = torch.tensor([2, 2])
        # history: row 0 [1], row 1 [0, 2]
        rank_of_targets(scores, targets, torch.tensor([1, 0, 2]), torch.tensor([0, 1, 3]))
        # tensor([0, 1]): row 0: item 1 removed, item 3 ties but has a higher index;
        #                 row 1: item 0 removed, item 1 ties with a lower index and beats
        #                 the target, which is in the history but never removed
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    batch, num_items = scores.shape
    if targets.shape != (batch,):
        raise ValueError(f"targets must be (B,) = ({batch},), got shape {tuple(targets.shape)}")
    if (exclude_values is None) != (exclude_offsets is None):
        raise ValueError("give exclude_values and exclude_offsets together")
    targets = targets.to(device=scores.device, dtype=torch.int64).unsqueeze(1)  # (B, 1)
    target_score = scores.gather(1, targets)  # (B, 1)
    item = torch.arange(num_items, device=scores.device).unsqueeze(0)  # (1, N)
    beats = (scores > target_score) | ((scores == target_score) & (item < targets))
    beats |= torch.isnan(scores)
    # The target never beats itself (it would only through the NaN rule above).
    beats.scatter_(1, targets, False)
    kept = torch.full((batch,), num_items, dtype=torch.int64, device=scores.device)
    if exclude_values is not None and exclude_offsets is not None:
        if exclude_offsets.shape != (batch + 1,):
            raise ValueError(f"exclude_offsets must be (B + 1,) = ({batch + 1},), "
                             f"got shape {tuple(exclude_offsets.shape)}")
        offsets = exclude_offsets.to(device=scores.device, dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(batch, device=scores.device), offsets[1:] - offsets[:-1])
        start = int(offsets[0])
        values = exclude_values.to(device=scores.device, dtype=torch.int64)[start:start + rows.numel()]
        # A mask rather than -inf scores, so a removed item never ties with the target.
        # Repeated history items just write False twice; the target is put back.
        keep = torch.ones_like(beats)
        keep.index_put_((rows, values), torch.zeros((), dtype=torch.bool, device=scores.device))
        keep.scatter_(1, targets, True)
        beats &= keep
        kept = keep.sum(dim=1)
    rank = beats.sum(dim=1)
    return torch.where(torch.isnan(target_score.squeeze(1)), kept - 1, rank)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, torch.Tensor]:
    """Per-example HR@K, NDCG@K and MRR from 0-based ranks.

    Args:
        ranks (torch.Tensor): ``(M,)`` integer ranks.
        ks (Sequence[int]): cut-offs K.

    Returns:
        Dict[str, torch.Tensor]: ``"hr@K"``, ``"ndcg@K"`` for each K and ``"mrr"``, each
        ``(M,)`` float64.

    Example::

        metrics_from_ranks(torch.tensor([0, 3, 20]), ks=(10,))
        # {"hr@10": [1, 1, 0], "ndcg@10": [1.0, 0.431, 0.0], "mrr": [1.0, 0.25, 0.0476]}
    """
    r = ranks.to(torch.float64)
    out: Dict[str, torch.Tensor] = {}
    gain = 1.0 / torch.log2(r + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, gain, torch.zeros_like(gain))
    out["mrr"] = 1.0 / (r + 1.0)
    return out


class RetrievalMetrics:
    """Accumulates HR@K, NDCG@K and MRR over batches of target ranks.

    State is a few tensors (sums in float64, an int64 count) so it can be merged with
    another accumulator or reduced across ranks by summing each tensor (see
    :meth:`state`, :meth:`merge`, :meth:`load_state`). Per-example ranks are kept too
    (``keep_per_user=True``), in update order, for paired-bootstrap confidence intervals.

    Args:
        ks (Sequence[int]): cut-offs K for HR@K and NDCG@K.
        keep_per_user (bool): keep every rank for :meth:`per_user` (8 bytes per example).

    Example::

        m = RetrievalMetrics(ks=(10,))
        m.update(torch.tensor([0, 12]))
        m.update(torch.tensor([3]))
        m.compute()  # {"hr@10": 0.667, "ndcg@10": 0.477, "mrr": 0.442, "count": 3}
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, keep_per_user: bool = True) -> None:
        ks = tuple(int(k) for k in ks)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        self.ks = ks
        self.keep_per_user = keep_per_user
        self.reset()

    def reset(self) -> None:
        self.hr_sum = torch.zeros(len(self.ks), dtype=torch.float64)
        self.ndcg_sum = torch.zeros(len(self.ks), dtype=torch.float64)
        self.mrr_sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)
        self._ranks: list = []

    def update(self, ranks: torch.Tensor) -> None:
        """Adds a batch of 0-based ranks, ``(B,)`` (e.g. from :func:`rank_of_targets`)."""
        ranks = ranks.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        if ranks.numel() and int(ranks.min()) < 0:
            raise ValueError("ranks are 0-based and cannot be negative")
        per = metrics_from_ranks(ranks, self.ks)
        self.hr_sum += torch.stack([per[f"hr@{k}"].sum() for k in self.ks])
        self.ndcg_sum += torch.stack([per[f"ndcg@{k}"].sum() for k in self.ks])
        self.mrr_sum += per["mrr"].sum()
        self.count += ranks.numel()
        if self.keep_per_user:
            self._ranks.append(ranks)

    def compute(self) -> Dict[str, float]:
        """Means over all examples so far: ``hr@K``, ``ndcg@K`` per K, ``mrr``, and ``count``.

        With no examples the means are NaN (not 0, which would read as a real result).
        """
        n = int(self.count)
        denom = float(n) if n else float("nan")
        out: Dict[str, float] = {}
        for i, k in enumerate(self.ks):
            out[f"hr@{k}"] = float(self.hr_sum[i]) / denom
            out[f"ndcg@{k}"] = float(self.ndcg_sum[i]) / denom
        out["mrr"] = float(self.mrr_sum) / denom
        out["count"] = n
        return out

    def ranks(self) -> torch.Tensor:
        """``(M,)`` int64 every rank seen, in update order."""
        if not self.keep_per_user:
            raise RuntimeError("per-example ranks were not kept; create with keep_per_user=True")
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0, dtype=torch.int64)

    def per_user(self) -> Dict[str, torch.Tensor]:
        """Per-example metrics, ``(M,)`` float64 each, in update order (plus ``"rank"``).

        Two models compared with :func:`paired_bootstrap` must be evaluated on the same
        examples in the same order (same split, no shuffling).
        """
        ranks = self.ranks()
        out = metrics_from_ranks(ranks, self.ks)
        out["rank"] = ranks
        return out

    def state(self) -> Dict[str, torch.Tensor]:
        """The reducible state: tensors whose element-wise sum over ranks is the global state."""
        return {"hr_sum": self.hr_sum, "ndcg_sum": self.ndcg_sum, "mrr_sum": self.mrr_sum, "count": self.count}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Replaces the sums and count (e.g. with all-reduced ones). Per-example ranks are kept."""
        self.hr_sum = state["hr_sum"].detach().to("cpu", torch.float64).clone()
        self.ndcg_sum = state["ndcg_sum"].detach().to("cpu", torch.float64).clone()
        self.mrr_sum = state["mrr_sum"].detach().to("cpu", torch.float64).clone()
        self.count = state["count"].detach().to("cpu", torch.int64).clone()

    def merge(self, other: "RetrievalMetrics") -> "RetrievalMetrics":
        """Adds ``other``'s examples to this accumulator (its ranks go after ours); returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge metrics with cut-offs {other.ks} into {self.ks}")
        self.hr_sum += other.hr_sum
        self.ndcg_sum += other.ndcg_sum
        self.mrr_sum += other.mrr_sum
        self.count += other.count
        if self.keep_per_user:
            if not other.keep_per_user:
                raise ValueError("cannot merge an accumulator without per-example ranks into one with them")
            self._ranks.extend(other._ranks)
        return self


def paired_bootstrap(
    a: torch.Tensor,
    b: torch.Tensor,
    num_samples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Tuple[float, float, float]:
    """Mean of ``a - b`` and its percentile-bootstrap confidence interval.

    Examples are resampled with replacement as pairs (the same user for both models),
    which is far tighter than comparing two independent intervals when the models'
    per-user metrics are correlated, as they almost always are.

    Args:
        a (torch.Tensor): ``(M,)`` per-example metric of model A (e.g. ``per_user()["ndcg@10"]``).
        b (torch.Tensor): ``(M,)`` the same metric of model B on the same examples, same order.
        num_samples (int): bootstrap resamples.
        seed (int): seed of the resampling; the same seed gives the same interval.
        confidence (float): coverage of the interval, 0.95 for a 95% interval.

    Returns:
        Tuple[float, float, float]: ``(mean_diff, lo, hi)``; the difference is
        significant at this level when the interval excludes 0.

    Example::

        diff, lo, hi = paired_bootstrap(hstu.per_user()["ndcg@10"], sasrec.per_user()["ndcg@10"])
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"a and b must be (M,) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if num_samples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need num_samples >= 1 and 0 < confidence < 1, got {num_samples}, {confidence}")
    diff = (a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64))
    m = diff.numel()
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(num_samples, dtype=torch.float64)
    # Resample in chunks of about 4M indices so memory stays flat for large M.
    chunk = max(1, (1 << 22) // m)
    for lo in range(0, num_samples, chunk):
        n = min(chunk, num_samples - lo)
        index = torch.randint(m, (n, m), generator=generator)
        means[lo:lo + n] = diff[index].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    q = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(diff.mean()), float(q[0]), float(q[1])
