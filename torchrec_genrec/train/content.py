"""Content pipelines: content embeddings, MoCo task adaptation (MUSE's SCL), semantic IDs
(RQ-KMeans / RQ-VAE), DAS, and their quality reports.

Everything learned from behaviour reads a :class:`BehaviourLog`: the events strictly
before the ranking split's validation cutoff (:func:`behaviour_log`), so nothing from
the ranker's validation or test period leaks into the features it is given.

Example::

    store = SequenceStore.open(resolve_store("movielens-100k"))
    log = behaviour_log(store, valid_fraction=0.1, test_fraction=0.1)
    content = embed_content(store, "tfidf", name="tfidf", dim=64)           # saved with the store
    sid = build_semantic_ids(store, log, content, method="rqkmeans", name="sid_tfidf")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torchrec_genrec.data.content import behaviour_cutoff, embed_items, save_side_features
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.modules.das import DAS, DASBatch, DASConfig
from torchrec_genrec.modules.semantic_ids import (RQVAEConfig, disambiguate, reconstruct, rq_kmeans,
                                                  semantic_id_stats, train_rqvae)

logger = logging.getLogger(__name__)

__all__ = ["BehaviourLog", "ContentAdapter", "adapt_content_moco", "behaviour_log", "behaviour_log_before",
           "build_semantic_ids",
           "co_consumption_lift", "content_i2i_recall", "embed_content", "train_das", "user_content"]


@dataclasses.dataclass
class BehaviourLog:
    """Events a behaviour model may learn from, in store order (user, then time).

    Attributes:
        user, item, timestamp (np.ndarray): ``(E',)`` per event.
        cutoff (int): every timestamp is strictly below it.
        num_users, num_items (int): id ranges.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    cutoff: int
    num_users: int
    num_items: int

    def __post_init__(self) -> None:
        if self.timestamp.size and int(self.timestamp.max()) >= self.cutoff:
            raise ValueError("a behaviour log must hold only events before its cutoff")
        if self.user.size == 0:
            raise ValueError("the behaviour log is empty: no events before the validation cutoff")

    def consecutive_pairs(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(a, b)``: item ``b`` is the next item the same user engaged with after ``a``."""
        same_user = self.user[1:] == self.user[:-1]
        return self.item[:-1][same_user], self.item[1:][same_user]

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.item, minlength=self.num_items)


def behaviour_log(store: SequenceStore, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> BehaviourLog:
    """The store's events before the ranking split's validation cutoff."""
    return behaviour_log_before(store, behaviour_cutoff(store, valid_fraction, test_fraction)[0])


def behaviour_log_before(store: SequenceStore, cutoff: int) -> BehaviourLog:
    """The store's events strictly before ``cutoff`` (store order: they are the store
    events ``np.nonzero(store.timestamp < cutoff)``, one for one)."""
    before = np.asarray(store.timestamp) < cutoff
    user = np.repeat(np.arange(store.num_users, dtype=np.int64), store.lengths)
    return BehaviourLog(user[before], np.asarray(store.item, dtype=np.int64)[before],
                        np.asarray(store.timestamp, dtype=np.int64)[before], int(cutoff), store.num_users,
                        store.num_items)


def user_content(log: BehaviourLog, item_content: torch.Tensor) -> torch.Tensor:
    """``(U, D)`` a user's content vector: the normalised mean of the content vectors of
    the items in its (pre-cutoff) history; zeros for a user with none."""
    sums = torch.zeros(log.num_users, item_content.shape[1]).index_add_(
        0, torch.from_numpy(log.user), item_content[torch.from_numpy(log.item)].float())
    return F.normalize(sums, dim=-1)


def embed_content(store: SequenceStore, encoder: str, name: str, dim: int = 64, model_dir: Optional[str] = None,
                  progress: bool = False) -> torch.Tensor:
    """Encodes every item's text and saves the set ``name`` (tensor ``item``)."""
    start = time.perf_counter()
    vectors = embed_items(store, encoder, dim, model_dir, progress)
    save_side_features(store.path, name, {"item": vectors},
                       {"kind": "content", "encoder": encoder, "dim": int(vectors.shape[1]),
                        "seconds": round(time.perf_counter() - start, 2)})
    return torch.from_numpy(vectors)


# ------------------------------------------------------------------ MoCo / SCL
class ContentAdapter(nn.Module):
    """A residual MLP that adapts frozen content vectors: ``normalize(x + MLP(x))``."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.mlp(x), dim=-1)


def adapt_content_moco(log: BehaviourLog, content: torch.Tensor, epochs: int = 5, batch_size: int = 512,
                       queue_size: int = 4096, momentum: float = 0.99, temperature: float = 0.07,
                       lr: float = 1e-3, seed: int = 0, progress: bool = False) -> Tuple[torch.Tensor, Dict]:
    """MoCo contrastive adaptation of ``content`` ``(I, D)`` to the behaviour log.

    Positive pairs are consecutive items of one user (MUSE's SCL uses query -> purchased
    item); negatives are the momentum encoder's queue of past keys; InfoNCE. Returns the
    adapted vectors (the query encoder applied to every item) and training stats.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.from_numpy(x) for x in log.consecutive_pairs())
    keep = a != b
    a, b = a[keep], b[keep]
    query = ContentAdapter(content.shape[1])
    key = ContentAdapter(content.shape[1])
    key.load_state_dict(query.state_dict())
    for p in key.parameters():
        p.requires_grad_(False)
    queue = F.normalize(torch.randn(queue_size, content.shape[1], generator=g), dim=-1)
    ptr = 0
    opt = torch.optim.Adam(query.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(epochs), desc="moco", disable=not progress, leave=False):
        order = torch.randperm(a.numel(), generator=g)
        for start in range(0, a.numel() - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            q = query(content[a[idx]])
            with torch.no_grad():
                k = key(content[b[idx]])
            logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], dim=1) / temperature
            loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.int64))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pk, pq in zip(key.parameters(), query.parameters()):
                    pk.mul_(momentum).add_(pq, alpha=1 - momentum)
                n = k.shape[0]
                slots = (torch.arange(n) + ptr) % queue_size
                queue[slots] = k
                ptr = (ptr + n) % queue_size
            losses.append(loss.item())
    with torch.no_grad():
        adapted = query(content)
    return adapted, {"pairs": int(a.numel()), "steps": len(losses), "first_loss": losses[0] if losses else None,
                     "last_loss": float(np.mean(losses[-20:])) if losses else None}


# ------------------------------------------------------------------ semantic IDs
def build_semantic_ids(store: SequenceStore, log: BehaviourLog, content: torch.Tensor, method: str = "rqkmeans",
                       num_levels: int = 3, codebook_size: int = 64, seed: int = 0, name: Optional[str] = None,
                       rqvae_epochs: int = 300, progress: bool = False) -> Dict:
    """Semantic IDs of every item (``item_codes``, disambiguated: ``L + 1`` columns) and
    user (``user_codes``, from the user's content vector) by ``rqkmeans`` or ``rqvae``;
    saves the set ``name`` when given. Returns the tensors and their quality stats."""
    if method not in ("rqkmeans", "rqvae"):
        raise ValueError(f"unknown semantic-ID method {method!r}; choose rqkmeans or rqvae")
    users = user_content(log, content)
    start = time.perf_counter()
    out: Dict = {}
    for side, x in (("item", content.float()), ("user", users)):
        if method == "rqkmeans":
            codes, books = rq_kmeans(x, num_levels, codebook_size, seed)
            x_hat = reconstruct(books, codes)
        else:
            vae, _ = train_rqvae(x, RQVAEConfig(input_dim=x.shape[1], num_levels=num_levels,
                                                codebook_size=codebook_size), epochs=rqvae_epochs, seed=seed,
                                 progress=progress)
            with torch.no_grad():
                res = vae(x)
            codes, x_hat = res["codes"], res["x_hat"]
        out[f"{side}_stats"] = semantic_id_stats(codes, codebook_size, x, x_hat)
        out[f"{side}_codes"] = disambiguate(codes) if side == "item" else codes
    out["item_stats"]["disambiguation_rows"] = int(out["item_codes"][:, -1].max()) + 1
    out["seconds"] = round(time.perf_counter() - start, 2)
    if name:
        save_side_features(store.path, name, {"item_codes": out["item_codes"], "user_codes": out["user_codes"]},
                           {"kind": "semantic_ids", "method": method, "levels": num_levels,
                            "codebook_size": codebook_size, "seed": seed, "behaviour_cutoff": log.cutoff,
                            "item_stats": out["item_stats"], "user_stats": out["user_stats"]})
    return out


# ------------------------------------------------------------------ DAS
def popularity_buckets(log: BehaviourLog, buckets: int) -> torch.Tensor:
    """``(I,)`` bucket of each item by its (pre-cutoff) event count: equal-mass quantiles."""
    counts = log.item_counts().astype(np.float64)
    ranks = np.argsort(np.argsort(counts, kind="stable"), kind="stable")
    return torch.from_numpy((ranks * buckets // max(len(counts), 1)).astype(np.int64))


def train_das(store: SequenceStore, log: BehaviourLog, content: torch.Tensor, config: Optional[DASConfig] = None,
              epochs: int = 20, batch_size: int = 1024, lr: float = 2e-3, seed: int = 0, name: Optional[str] = None,
              progress: bool = False) -> Dict:
    """Trains :class:`DAS` on ``log`` (one stage: quantisers, CF and alignment together)
    and exports codes, CF and fused vectors; saves the set ``name`` when given."""
    config = config or DASConfig(content_dim=content.shape[1])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    item_content = content.float()
    users_content = user_content(log, item_content)
    das = DAS(config, log.num_users, log.num_items, popularity_buckets(log, config.popularity_buckets))
    das.init_codebooks(item_content, users_content, seed)
    user, item = torch.from_numpy(log.user), torch.from_numpy(log.item)
    same = torch.zeros(user.numel(), dtype=torch.bool)
    same[:-1] = user[1:] == user[:-1]
    next_item = torch.where(same, torch.roll(item, -1), item)
    # Users of each item (CSR) to draw a co-consumer from.
    order = torch.argsort(item, stable=True)
    item_offsets = torch.zeros(log.num_items + 1, dtype=torch.int64)
    item_offsets[1:] = torch.cumsum(torch.bincount(item, minlength=log.num_items), 0)
    users_by_item = user[order]
    opt = torch.optim.Adam(das.parameters(), lr=lr)
    start, history = time.perf_counter(), []
    for epoch in tqdm(range(epochs), desc="das", disable=not progress, leave=False):
        perm = torch.randperm(user.numel(), generator=g)
        sums: Dict[str, float] = {}
        steps = 0
        for s in range(0, user.numel() - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            it = item[idx]
            lo, hi = item_offsets[it], item_offsets[it + 1]
            pick = lo + (torch.rand(idx.numel(), generator=g) * (hi - lo).float()).long()
            batch = DASBatch(user[idx], it, next_item[idx], users_by_item[pick])
            losses = das(batch, item_content, users_content)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            steps += 1
        if epoch % 5 == 4 and epoch < epochs - 5:
            with torch.no_grad():
                for quantizer, x in ((das.item_quantizer, item_content), (das.user_quantizer, users_content)):
                    res = quantizer(x)
                    quantizer.reseed_dead_codes(res["z"], res["codes"], g)
        history.append({"epoch": epoch, **{k: round(v / max(steps, 1), 4) for k, v in sums.items()}})
    das.eval()
    exported = das.export(item_content, users_content)
    out: Dict = {"history": history, "seconds": round(time.perf_counter() - start, 2)}
    out["item_stats"] = semantic_id_stats(exported["item_codes"], config.codebook_size, item_content,
                                          exported["item_reconstruction"])
    out["user_stats"] = semantic_id_stats(exported["user_codes"], config.codebook_size, users_content,
                                          exported["user_reconstruction"])
    out["item_codes"] = disambiguate(exported["item_codes"])
    out["item_stats"]["disambiguation_rows"] = int(out["item_codes"][:, -1].max()) + 1
    out["user_codes"] = exported["user_codes"]
    for k in ("item_cf", "user_cf", "item_fused", "user_fused"):
        out[k] = exported[k]
    if name:
        save_side_features(
            store.path, name, {k: out[k] for k in ("item_codes", "user_codes", "item_cf", "user_cf", "item_fused",
                                                   "user_fused")},
            {"kind": "das", "config": dataclasses.asdict(config), "epochs": epochs, "seed": seed,
             "behaviour_cutoff": log.cutoff, "item_stats": out["item_stats"], "user_stats": out["user_stats"],
             "final": history[-1] if history else {}})
    return out


# ------------------------------------------------------------------ reports
def co_consumption_lift(log: BehaviourLog, codes: torch.Tensor, min_count: int = 1) -> Dict[str, float]:
    """How much more items sharing a first-level code are co-consumed than random pairs.

    Co-consumption of items ``a, b`` = cosine of their (pre-cutoff) user-incidence
    vectors. Returns the mean over pairs sharing ``codes[:, 0]``, over all pairs, and the
    ratio (lift); items with fewer than ``min_count`` events are left out.
    """
    x = torch.zeros(log.num_items, log.num_users)
    x[torch.from_numpy(log.item), torch.from_numpy(log.user)] = 1.0
    keep = x.sum(1) >= max(min_count, 1)
    x, first = x[keep], codes[keep, 0]
    x = F.normalize(x, dim=1)
    cos = x @ x.T
    n = cos.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    same = (first.unsqueeze(0) == first.unsqueeze(1)) & off_diagonal
    same_mean = float(cos[same].mean()) if same.any() else float("nan")
    all_mean = float(cos[off_diagonal].mean())
    return {"same_code_pairs": int(same.sum()) // 2, "same_code_cosine": same_mean, "random_pair_cosine": all_mean,
            "lift": same_mean / all_mean if all_mean > 0 else float("nan")}


def content_i2i_recall(store: SequenceStore, content: torch.Tensor, events: np.ndarray, label: np.ndarray,
                       k: int = 50) -> Dict[str, float]:
    """A GSU-style check of content vectors: for each positive event in ``events`` whose
    user had an earlier positive, is the target among the ``k`` items most similar (by
    cosine) to that previous liked item? Returns recall@k over those events."""
    user = np.repeat(np.arange(store.num_users), store.lengths)
    item = np.asarray(store.item, dtype=np.int64)
    prev = np.full(len(item), -1, dtype=np.int64)
    # The most recent earlier positive of the same user, for every event.
    last_pos = -1
    last_user = -1
    for e in range(len(item)):
        if user[e] != last_user:
            last_pos, last_user = -1, user[e]
        prev[e] = last_pos
        if label[e] == 1:
            last_pos = e
    chosen = np.asarray([e for e in events if label[e] == 1 and prev[e] >= 0 and item[prev[e]] != item[e]])
    if chosen.size == 0:
        return {"events": 0, f"recall@{k}": float("nan")}
    x = F.normalize(content.float(), dim=-1)
    anchors = torch.from_numpy(item[prev[chosen]])
    sims = x[anchors] @ x.T
    sims[torch.arange(len(chosen)), anchors] = -2.0  # the anchor itself is not a candidate
    top = sims.topk(k, dim=1).indices
    hits = (top == torch.from_numpy(item[chosen]).unsqueeze(1)).any(dim=1)
    return {"events": int(len(chosen)), f"recall@{k}": float(hits.float().mean())}
