"""Ranking metrics: AUC, GAUC, log loss and normalised entropy, and paired bootstrap
intervals of the difference between two models on the same samples.

AUC, log loss and NE are TorchRec's (``torchrec.metrics.auc.compute_auc``,
``torchrec.metrics.ne``), computed once over a whole split. GAUC is the impression-weighted
mean of per-user AUCs over users with both a positive and a negative sample (the
definition of the DIN paper); TorchRec's ``gauc`` averages sessions unweighted, hence the
small loop here.

Example::

    metrics = ranking_metrics(logits, labels, users)     # {"auc": ..., "gauc": ..., ...}
    diff, lo, hi = paired_bootstrap_ranking(logits_a, logits_b, labels, users, "auc")
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torchrec.metrics.auc import compute_auc
from torchrec.metrics.ne import compute_cross_entropy, compute_logloss, compute_ne

__all__ = ["per_user_auc", "ranking_metrics", "paired_bootstrap_ranking"]

_ETA = 1e-12


def _auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    return float(compute_auc(1, [scores.view(1, -1)], [labels.view(1, -1)], [weights.view(1, -1)])[0])


def _weighted_sorted_auc(sorted_labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(k,)`` AUCs of samples already sorted by descending score, under ``k`` weightings
    ``(k, N)`` (the formula of ``torchrec.metrics.auc``)."""
    cum_fp = torch.cumsum(weights * (1.0 - sorted_labels), dim=1)
    cum_tp = torch.cumsum(weights * sorted_labels, dim=1)
    area = torch.trapz(cum_tp, cum_fp, dim=1)
    denom = cum_fp[:, -1] * cum_tp[:, -1]
    return torch.where(denom == 0, torch.full_like(area, 0.5), area / denom.clamp(min=1e-300))


def per_user_auc(scores: torch.Tensor, labels: torch.Tensor, users: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AUC of every user with both labels among their samples.

    Args:
        scores, labels, users (torch.Tensor): ``(N,)`` each.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``(user_ids, auc, impressions)``
        of the ``U`` users that have both a positive and a negative sample.
    """
    order = torch.argsort(users, stable=True)
    users_sorted = users[order]
    ids, counts = torch.unique_consecutive(users_sorted, return_counts=True)
    keep_ids, aucs, weights = [], [], []
    start = 0
    for uid, n in zip(ids.tolist(), counts.tolist()):
        idx = order[start:start + n]
        start += n
        y = labels[idx]
        positives = float(y.sum())
        if positives == 0 or positives == n:
            continue
        keep_ids.append(uid)
        aucs.append(_auc(scores[idx], y, torch.ones_like(y)))
        weights.append(n)
    return (torch.tensor(keep_ids, dtype=torch.int64), torch.tensor(aucs, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64))


def ranking_metrics(logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> Dict[str, float]:
    """AUC, GAUC, log loss and normalised entropy of a whole split.

    Args:
        logits (torch.Tensor): ``(N,)`` like-logits.
        labels (torch.Tensor): ``(N,)`` 0/1.
        users (torch.Tensor): ``(N,)`` user ids (GAUC's groups).

    Returns:
        Dict[str, float]: ``auc``, ``gauc``, ``logloss`` (mean binary cross-entropy in
        nats), ``ne`` (cross-entropy over that of always predicting the positive rate),
        ``samples``, ``positive_rate``, ``gauc_users``.
    """
    if logits.numel() == 0:
        raise ValueError("no samples to evaluate")
    logits, labels = logits.detach().double().cpu(), labels.detach().double().cpu()
    users = users.detach().cpu()
    probs = torch.sigmoid(logits)
    weights = torch.ones_like(labels)
    ce_sum = compute_cross_entropy(labels, probs, weights, _ETA).sum()  # log2
    positives, negatives = labels.sum(), (1 - labels).sum()
    ne = compute_ne(ce_sum, weights.sum(), positives, negatives, _ETA)
    logloss = compute_logloss(ce_sum, positives, negatives, _ETA) * torch.log(torch.tensor(2.0, dtype=torch.float64))
    _, user_auc, impressions = per_user_auc(logits, labels, users)
    gauc = float((user_auc * impressions).sum() / impressions.sum()) if impressions.numel() else float("nan")
    return {"auc": _auc(logits, labels, weights), "gauc": gauc, "logloss": float(logloss), "ne": float(ne),
            "samples": int(labels.numel()), "positive_rate": float(labels.mean()), "gauc_users": int(user_auc.numel())}


def paired_bootstrap_ranking(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor,
                             users: torch.Tensor, metric: str = "auc", num_samples: int = 1000, seed: int = 0,
                             confidence: float = 0.95) -> Tuple[float, float, float]:
    """``metric(a) - metric(b)`` on the same samples and its paired bootstrap interval.

    Users are resampled with replacement (a user's samples are not independent of each
    other); a resample weights every sample by its user's multiplicity, and both models
    are scored on the same resample. With several runs per model (seeds), the statistic
    is ``mean_s metric(a_s) - mean_t metric(b_t)``, every run on the same resample.

    Args:
        logits_a, logits_b (torch.Tensor): ``(N,)``, or ``(S, N)`` for S runs (seeds); the
            two models may have different numbers of runs.
        labels, users (torch.Tensor): ``(N,)`` each, aligned with the logits.
        metric (str): ``auc`` or ``gauc``.

    Returns:
        Tuple[float, float, float]: ``(difference, lo, hi)``.

    Example::

        diff, lo, hi = paired_bootstrap_ranking(onetrans_logits, dlrm_logits, labels, users, "gauc")
    """
    if metric not in ("auc", "gauc"):
        raise ValueError(f"metric must be auc or gauc, not {metric!r}")
    a, b = (x.detach().double().cpu() for x in (logits_a, logits_b))
    a, b = (x.unsqueeze(0) if x.dim() == 1 else x for x in (a, b))
    y, u = labels.detach().double().cpu(), users.detach().cpu()
    if a.shape[1:] != y.shape or b.shape[1:] != y.shape or y.shape != u.shape:
        raise ValueError(f"logits (S, N) of both models must align with labels and users (N,): got "
                         f"{tuple(logits_a.shape)}, {tuple(logits_b.shape)}, {tuple(labels.shape)}, {tuple(users.shape)}")
    generator = torch.Generator().manual_seed(seed)
    if metric == "gauc":
        mean_a = torch.stack([per_user_auc(x, y, u)[1] for x in a]).mean(0)
        mean_b = torch.stack([per_user_auc(x, y, u)[1] for x in b]).mean(0)
        delta = mean_a - mean_b  # (U,) each user's AUC difference, averaged over runs
        w = per_user_auc(a[0], y, u)[2]
        diff = float((delta * w).sum() / w.sum())
        m = delta.numel()
        draws = torch.randint(m, (num_samples, m), generator=generator)
        counts = torch.zeros(num_samples, m, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(num_samples, m, dtype=torch.float64))
        ww = counts * w
        stats = (ww * delta).sum(1) / ww.sum(1)
    else:
        ones = torch.ones_like(y)
        diff = sum(_auc(x, y, ones) for x in a) / len(a) - sum(_auc(x, y, ones) for x in b) / len(b)
        uniq, inverse = torch.unique(u, return_inverse=True)
        m = uniq.numel()
        # Each model's order does not depend on the weights: sort once, then every resample
        # is a cumulative sum over its sample weights (TorchRec's AUC formula, batched).
        orders = [(torch.argsort(x, descending=True), 1.0 / len(a)) for x in a] + \
                 [(torch.argsort(x, descending=True), -1.0 / len(b)) for x in b]
        stats = torch.zeros(num_samples, dtype=torch.float64)
        chunk = max(1, (1 << 22) // max(y.numel(), 1))
        for lo in range(0, num_samples, chunk):
            k = min(chunk, num_samples - lo)
            draws = torch.randint(m, (k, m), generator=generator)
            mult = torch.zeros(k, m, dtype=torch.float64).scatter_add_(1, draws, torch.ones(k, m, dtype=torch.float64))
            weights = mult[:, inverse]  # (k, N)
            for order, sign in orders:
                stats[lo:lo + k] += sign * _weighted_sorted_auc(y[order], weights[:, order])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(stats, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return diff, lo, hi
