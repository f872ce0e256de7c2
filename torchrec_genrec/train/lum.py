"""LUM pre-training on packed ``<condition, item>`` rows and the conditioned-retrieval test.

Pre-training reads only the events before the ranking split's validation cutoff. The
retrieval test asks, for each test user, for the item of its first test event given the
history before the cutoff: the interest vector of the true condition ranks every item
(items already in the history excluded); recall@10 and NDCG@10. The fair baseline is
the unconditioned model (``condition = "none"``: the same architecture trained with one
constant condition) with the true condition applied afterwards as a filter on the ranked
items; a wrong condition (another genre, drawn at random) shows what the condition carries.

Example::

    cfg = LUMRecipeConfig(condition="genre")
    model, seqs, history = pretrain_lum(cfg)
    metrics = conditioned_retrieval(model, seqs, store, cfg)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.lum import CONDITIONS, ConditionItemSequences, condition_item_sequences, pack_sequences
from torchrec_genrec.data.splits import GlobalTimeSplit
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.modules.lum import LUM, LUMConfig
from torchrec_genrec.train.content import behaviour_log

logger = logging.getLogger(__name__)

__all__ = ["LUMRecipeConfig", "conditioned_retrieval", "pretrain_lum"]


@dataclasses.dataclass
class LUMRecipeConfig:
    """Args:
    dataset (str): a prepared dataset's name or store path.
    condition (str): a key of ``data.lum.CONDITIONS`` (``none`` = unconditioned).
    max_events (int): most recent pre-cutoff events per user (2 tokens each).
    row_len (int): tokens per packed row.
    batch_rows (int): rows per step.
    epochs (int): passes over the rows.
    lr (float): AdamW learning rate.
    seed (int): seeds the model, the row order and the negatives.
    valid_fraction, test_fraction (float): the ranking split (its validation cutoff).
    model (LUMConfig): sizes.
    """

    dataset: str = "movielens-100k"
    condition: str = "genre"
    max_events: int = 100
    row_len: int = 256
    batch_rows: int = 16
    epochs: int = 20
    lr: float = 2e-3
    seed: int = 0
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    progress: bool = False
    model: LUMConfig = dataclasses.field(default_factory=LUMConfig)


def pretrain_lum(cfg: LUMRecipeConfig) -> Tuple[LUM, ConditionItemSequences, List[Dict[str, float]]]:
    """Pre-trains LUM on packed rows; returns the model (eval mode), the sequences and
    the per-epoch history (loss, top-1 against the negatives, tokens/s)."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    store = SequenceStore.open(resolve_store(cfg.dataset))
    log = behaviour_log(store, cfg.valid_fraction, cfg.test_fraction)
    seqs = condition_item_sequences(store, log, cfg.condition, cfg.max_events)
    rows = pack_sequences(seqs.lengths(), cfg.row_len)
    model = LUM(cfg.model, seqs.space)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    history = []
    for epoch in tqdm(range(cfg.epochs), desc=f"lum {cfg.condition}", disable=not cfg.progress):
        model.train()
        order = torch.randperm(len(rows), generator=g).tolist()
        sums = {"loss": 0.0, "top1": 0.0, "positions": 0.0}
        tokens, start = 0, time.perf_counter()
        for s in range(0, len(order), cfg.batch_rows):
            batch = seqs.packed_rows([rows[i] for i in order[s:s + cfg.batch_rows]], cfg.row_len)
            loss, stats = model.loss(batch.tokens, batch.segment, batch.position, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n = float(stats["positions"])
            sums["loss"] += float(stats["loss"]) * n
            sums["top1"] += float(stats["top1"]) * n
            sums["positions"] += n
            tokens += int((batch.segment >= 0).sum())
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "loss": sums["loss"] / sums["positions"],
                        "top1": sums["top1"] / sums["positions"], "tokens_per_s": tokens / seconds})
    return model.eval(), seqs, history


def _test_events(store: SequenceStore, cfg: LUMRecipeConfig) -> Tuple[np.ndarray, np.ndarray]:
    """The test events (user, event id), in store order."""
    _, test_start = GlobalTimeSplit(cfg.valid_fraction, cfg.test_fraction).cutoffs(store)
    user = np.repeat(np.arange(store.num_users), store.lengths)
    events = np.nonzero(np.asarray(store.timestamp) >= test_start)[0]
    return user[events], events


@torch.no_grad()
def conditioned_retrieval(model: LUM, seqs: ConditionItemSequences, cfg: LUMRecipeConfig,
                          filter_by_condition: bool = False, wrong_condition: bool = False,
                          k: int = 10, seed: int = 0) -> Dict[str, float]:
    """Recall@k / NDCG@k of every test event of the users with a pre-cutoff history,
    given that history and the event's condition (one group query per user: each distinct
    condition read out in one pass). Items already in the history are not ranked.

    Args:
        model, seqs: a pre-trained LUM and its sequences (``pretrain_lum``).
        filter_by_condition (bool): keep only items whose condition is the true one (the
            unconditioned baseline's filter).
        wrong_condition (bool): query with a random other condition value.
    """
    store = SequenceStore.open(resolve_store(cfg.dataset))
    users, events = _test_events(store, cfg)
    seconds = np.asarray(store.timestamp, dtype=np.int64)
    items = np.asarray(store.item, dtype=np.int64)
    genre_condition = CONDITIONS[cfg.condition if cfg.condition != "none" else "genre"]
    true_cond = np.asarray(genre_condition(store, items[events], seconds[events]))
    item_cond = torch.from_numpy(np.asarray(genre_condition(store, np.arange(store.num_items),
                                                            np.zeros(store.num_items, dtype=np.int64))))
    num_cond = int(item_cond.max()) + 1
    rng = np.random.default_rng(seed)
    hits, ndcg, n, n_users = 0.0, 0.0, 0, 0
    for u in np.unique(users).tolist():
        prefix = torch.from_numpy(seqs.tokens[seqs.offsets[u]:seqs.offsets[u + 1]])
        if prefix.numel() == 0:
            continue
        n_users += 1
        prefix = prefix[-(cfg.model.max_positions - 1):]
        mine = users == u
        conds = true_cond[mine]
        if wrong_condition:
            asked = np.asarray([rng.choice([x for x in range(1, num_cond) if x != c]) for c in conds])
        else:
            asked = conds
        query_values = np.zeros_like(asked) if cfg.condition == "none" else asked
        distinct, slot = np.unique(query_values, return_inverse=True)
        interests = model.query(prefix, seqs.space.to_tokens("condition", torch.from_numpy(distinct)))
        scores_by_condition = model.item_scores(interests)
        seen = seqs.space.from_tokens("item", prefix[1::2])
        scores_by_condition[:, seen] = -math.inf
        for target, c, s in zip(items[events[mine]].tolist(), conds.tolist(), slot.tolist()):
            scores = scores_by_condition[s].clone()
            if filter_by_condition:
                scores[item_cond != c] = -math.inf
            n += 1
            if scores[target] == -math.inf:
                continue  # an item the user already had: not retrievable here
            rank = int((scores > scores[target]).sum())
            if rank < k:
                hits += 1
                ndcg += 1.0 / math.log2(rank + 2)
    return {f"recall@{k}": hits / max(n, 1), f"ndcg@{k}": ndcg / max(n, 1), "events": n, "users": n_users}


def run_lum_retrieval_study(seed: int = 0, epochs: int = 20, dataset: str = "movielens-100k",
                            model: Optional[LUMConfig] = None) -> Dict[str, Dict[str, float]]:
    """The conditioned-retrieval comparison for one seed: conditioned (true condition),
    wrong condition, unconditioned + filter, unconditioned."""
    out: Dict[str, Dict[str, float]] = {}
    base = dict(dataset=dataset, epochs=epochs, seed=seed, model=model or LUMConfig())
    cond_cfg = LUMRecipeConfig(condition="genre", **base)
    cond_model, cond_seqs, cond_hist = pretrain_lum(cond_cfg)
    out["conditioned"] = {**conditioned_retrieval(cond_model, cond_seqs, cond_cfg), "train": cond_hist[-1]}
    out["wrong_condition"] = conditioned_retrieval(cond_model, cond_seqs, cond_cfg, wrong_condition=True, seed=seed)
    none_cfg = LUMRecipeConfig(condition="none", **base)
    none_model, none_seqs, none_hist = pretrain_lum(none_cfg)
    out["unconditioned_filtered"] = {**conditioned_retrieval(none_model, none_seqs, none_cfg,
                                                             filter_by_condition=True), "train": none_hist[-1]}
    out["unconditioned"] = conditioned_retrieval(none_model, none_seqs, none_cfg)
    return out


@torch.no_grad()
def lum_features(model: LUM, seqs: ConditionItemSequences, store: SequenceStore, name: Optional[str] = None,
                 ) -> Dict[str, torch.Tensor]:
    """Step 3's offline cache: every user's interest vector under every condition (one
    group query per user over its pre-cutoff history; zeros without one), every item's LUM
    embedding, and each item's condition; saved as the side-feature set ``name``.

    Returns:
        ``lum_interest`` ``(U * C, D)`` (row ``u * C + c``), ``lum_item`` ``(I, D)``,
        ``lum_item_condition`` ``(I,)``.
    """
    from torchrec_genrec.data.content import save_side_features

    c = seqs.space.count("condition")
    d = model.config.embedding_dim
    conditions = seqs.space.to_tokens("condition", torch.arange(c))
    interest = torch.zeros(store.num_users, c, d)
    for u in range(store.num_users):
        prefix = torch.from_numpy(seqs.tokens[seqs.offsets[u]:seqs.offsets[u + 1]])
        if prefix.numel():
            interest[u] = model.query(prefix[-(model.config.max_positions - 1):], conditions)
    first, end = seqs.space.ranges["item"]
    items = model.embed(torch.arange(first, end))
    cond_fn = CONDITIONS[seqs.condition]
    item_condition = torch.from_numpy(np.asarray(cond_fn(store, np.arange(store.num_items),
                                                         np.zeros(store.num_items, dtype=np.int64)), dtype=np.int64))
    out = {"lum_interest": interest.reshape(-1, d), "lum_item": items, "lum_item_condition": item_condition}
    if name:
        save_side_features(store.path, name, out, {"kind": "lum", "condition": seqs.condition, "conditions": c})
    return out
