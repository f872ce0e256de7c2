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
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.streamable import Pipelineable

from torchrec_genrec.data.content import behaviour_cutoff, embed_items, save_side_features
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.modules.das import DAS, DASBatch, DASConfig
from torchrec_genrec.modules.moco import MoCo
from torchrec_genrec.modules.semantic_ids import (RQVAE, RQVAEConfig, disambiguate, reconstruct, rq_kmeans,
                                                  semantic_id_stats)
from torchrec_genrec.plans.spec import TableSpec
from torchrec_genrec.train.sharding import OptimConfig, full_state_dict
from torchrec_genrec.train.trainer import Loss, TrainConfig, Trainer

logger = logging.getLogger(__name__)

__all__ = ["BehaviourLog", "DASTask", "MoCoTask", "RQVAETask", "adapt_content_moco", "behaviour_log", "behaviour_log_before",
           "build_semantic_ids", "train_rqvae",
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


# ------------------------------------------------------------------ trainer plumbing
class TensorBatch(Pipelineable):
    """A batch of named dense tensors (content vectors, ids): what the content tasks step on."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def to(self, device: torch.device, non_blocking: bool = False) -> "TensorBatch":
        return TensorBatch(**{k: v.to(device=device, non_blocking=non_blocking) for k, v in self.tensors.items()})

    def record_stream(self, stream: torch.Stream) -> None:
        for v in self.tensors.values():
            v.record_stream(stream)


class PermutedBatches:
    """Epoch data of a content task: each epoch a permutation of ``n`` examples drawn from
    ``generator`` (the task's, shared with what else it draws, in the order the task draws
    it), cut into batches of ``batch_size`` (the last, shorter one dropped with
    ``drop_last``); ``make_batch(indices)`` builds each batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 make_batch: Callable[[torch.Tensor], TensorBatch], drop_last: bool) -> None:
        self.n, self.batch_size, self.generator, self.make_batch = n, batch_size, generator, make_batch
        self.drop_last = drop_last
        self._order = torch.arange(n)
        self._starts: List[int] = []

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._order = torch.randperm(self.n, generator=self.generator)
        end = self.n - self.batch_size + 1 if self.drop_last else self.n
        self._starts = list(range(0, max(end, 0), self.batch_size))[start_batch:]

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[TensorBatch]:
        for s in self._starts:
            yield self.make_batch(self._order[s:s + self.batch_size])


def _content_train_config(epochs: int, batch_size: int, lr: float, seed: int, progress: bool,
                          output_dir: str = "") -> TrainConfig:
    """A content model's training: Adam on the dense parameters (fused row-wise Adagrad on
    any TorchRec table), no validation split, nothing written unless ``output_dir``."""
    return TrainConfig(seed=seed, output_dir=output_dir, tensorboard=bool(output_dir), progress=progress,
                       epochs=epochs, batch_size=batch_size, checkpoint=bool(output_dir), patience=epochs,
                       optim=OptimConfig(dense="adam", lr=lr, betas=(0.9, 0.999), weight_decay=0.0, sparse_lr=0.05))


# ------------------------------------------------------------------ MoCo / SCL
class MoCoTask:
    """MoCo adaptation as a trainer task: consecutive-item pairs of the behaviour log, the
    InfoNCE step, the key adapter's momentum update and queue after every step.

    Args:
        log (BehaviourLog): the pairs' source.
        content (torch.Tensor): ``(I, D)`` frozen content vectors.
        queue_size, momentum, temperature: MoCo's settings.
        batch_size (int): pairs per step (a last, shorter batch is dropped).
        seed (int): the pair order and the initial queue.
    """

    units = "samples"
    selection = ""

    def __init__(self, log: BehaviourLog, content: torch.Tensor, queue_size: int, momentum: float,
                 temperature: float, batch_size: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        a, b = (torch.from_numpy(x) for x in log.consecutive_pairs())
        keep = a != b
        self.a, self.b, self.content = a[keep], b[keep], content
        self.batch_size = batch_size
        self.model = MoCo(content.shape[1], queue_size, momentum, temperature, self.generator)
        self.losses: List[float] = []
        self._keys: Optional[torch.Tensor] = None

    def table_specs(self) -> List[TableSpec]:
        return []

    def fingerprint(self) -> Mapping[str, Any]:
        return {"task": "moco", "pairs": int(self.a.numel()), "content": list(self.content.shape)}

    def train_data(self, rank: int, world_size: int) -> PermutedBatches:
        return PermutedBatches(self.a.numel(), self.batch_size, self.generator,
                               lambda idx: TensorBatch(anchors=self.content[self.a[idx]],
                                                       positives=self.content[self.b[idx]]), drop_last=True)

    def step(self, model: nn.Module, batch: TensorBatch) -> Tuple[Dict[str, Loss], int]:
        loss, self._keys = model(batch["anchors"], batch["positives"])
        n = batch["anchors"].shape[0]
        self._loss = loss.detach()
        return {"loss": Loss(loss, n, mean=True)}, n

    def on_step_end(self, module: nn.Module) -> None:
        module.momentum_update(self._keys)
        self.losses.append(float(self._loss))

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        raise ValueError("MoCo adaptation has no validation split")


def adapt_content_moco(log: BehaviourLog, content: torch.Tensor, epochs: int = 5, batch_size: int = 512,
                       queue_size: int = 4096, momentum: float = 0.99, temperature: float = 0.07,
                       lr: float = 1e-3, seed: int = 0, progress: bool = False) -> Tuple[torch.Tensor, Dict]:
    """MoCo contrastive adaptation of ``content`` ``(I, D)`` to the behaviour log, trained
    by the one :class:`~torchrec_genrec.train.trainer.Trainer` (:class:`MoCoTask`).

    Positive pairs are consecutive items of one user (MUSE's SCL uses query -> purchased
    item); negatives are the momentum encoder's queue of past keys; InfoNCE. Returns the
    adapted vectors (the query encoder applied to every item) and training stats.
    """
    torch.manual_seed(seed)
    task = MoCoTask(log, content, queue_size, momentum, temperature, batch_size, seed)
    trainer = Trainer(task, _content_train_config(epochs, batch_size, lr, seed, progress))
    trainer.fit()
    moco = trainer.model.module
    with torch.no_grad():
        adapted = moco.query(content)
    losses = task.losses
    return adapted, {"pairs": int(task.a.numel()), "steps": len(losses), "first_loss": losses[0] if losses else None,
                     "last_loss": float(np.mean(losses[-20:])) if losses else None}


# ------------------------------------------------------------------ RQ-VAE
class RQVAETask:
    """RQ-VAE fitting as a trainer task: shuffled batches of the vectors, the VAE's loss,
    dead codes re-seeded every 20 epochs (not in the last 20).

    Args:
        x (torch.Tensor): ``(N, D)`` vectors to quantise.
        config (RQVAEConfig): the model.
        epochs, batch_size, seed: training settings.
    """

    units = "samples"
    selection = ""

    def __init__(self, x: torch.Tensor, config: RQVAEConfig, epochs: int, batch_size: int, seed: int) -> None:
        self.x, self.epochs, self.batch_size = x, epochs, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.model = RQVAE(config)
        self.model.init_codebooks(x, seed)
        self.config = config

    def table_specs(self) -> List[TableSpec]:
        return []

    def fingerprint(self) -> Mapping[str, Any]:
        return {"task": "rqvae", "config": dataclasses.asdict(self.config), "x": list(self.x.shape)}

    def train_data(self, rank: int, world_size: int) -> PermutedBatches:
        return PermutedBatches(self.x.shape[0], self.batch_size, self.generator,
                               lambda idx: TensorBatch(x=self.x[idx]), drop_last=False)

    def step(self, model: nn.Module, batch: TensorBatch) -> Tuple[Dict[str, Loss], int]:
        out = model(batch["x"])
        n = batch["x"].shape[0]
        return {"loss": Loss(out["loss"], n, mean=True)}, n

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        if epoch % 20 == 19 and epoch < self.epochs - 20:
            with torch.no_grad():
                full = module(self.x)
                module.reseed_dead_codes(full["z"], full["codes"], self.generator)

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        raise ValueError("RQ-VAE fitting has no validation split")


def train_rqvae(x: torch.Tensor, config: RQVAEConfig, epochs: int = 200, lr: float = 1e-3, batch_size: int = 512,
                seed: int = 0, progress: bool = False) -> Tuple[RQVAE, Dict[str, float]]:
    """Fits an :class:`RQVAE` on ``x`` ``(N, D)`` through the one trainer
    (:class:`RQVAETask`); returns it (eval mode) and the final losses."""
    torch.manual_seed(seed)
    task = RQVAETask(x, config, epochs, batch_size, seed)
    trainer = Trainer(task, _content_train_config(epochs, batch_size, lr, seed, progress))
    trainer.fit()
    vae = trainer.model.module.eval()
    with torch.no_grad():
        full = vae(x)
    return vae, {"recon_loss": float(full["recon_loss"]), "quant_loss": float(full["quant_loss"])}


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


class DASTask:
    """DAS as a trainer task: behaviour pairs with a co-consumed next item and co-user, the
    joint quantisation + alignment + CF step, dead codes re-seeded every 5 epochs (not in
    the last 5). The id tables are TorchRec tables (planned, sharded, fused optimiser).

    Args:
        log (BehaviourLog): the pairs' source.
        item_content (torch.Tensor): ``(I, C)`` content vectors; users' are their mean.
        config (DASConfig): the model.
        epochs, batch_size, seed: training settings.
    """

    units = "samples"
    selection = ""

    def __init__(self, log: BehaviourLog, item_content: torch.Tensor, config: DASConfig, epochs: int,
                 batch_size: int, seed: int) -> None:
        self.config, self.epochs, self.batch_size = config, epochs, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.item_content = item_content.float()
        self.user_content = user_content(log, self.item_content)
        self.popularity = popularity_buckets(log, config.popularity_buckets)
        self.model = DAS(config, log.num_users, log.num_items, self.popularity, device=torch.device("meta"))
        self.model.init_codebooks(self.item_content, self.user_content, seed)
        self.num_users, self.num_items = log.num_users, log.num_items
        user, item = torch.from_numpy(log.user), torch.from_numpy(log.item)
        same = torch.zeros(user.numel(), dtype=torch.bool)
        same[:-1] = user[1:] == user[:-1]
        self.user, self.item = user, item
        self.next_item = torch.where(same, torch.roll(item, -1), item)
        # Users of each item (CSR) to draw a co-consumer from.
        order = torch.argsort(item, stable=True)
        self.item_offsets = torch.zeros(log.num_items + 1, dtype=torch.int64)
        self.item_offsets[1:] = torch.cumsum(torch.bincount(item, minlength=log.num_items), 0)
        self.users_by_item = user[order]

    def table_specs(self) -> List[TableSpec]:
        c, rows = self.config, self.model.rows
        return [TableSpec(name, rows[name], c.cf_dim, features, sharding_types=("table_wise", "row_wise"),
                          ids_per_sample=float(len(features)), description=f"DAS {name[4:].replace('_', ' ')}")
                for name, features in DAS.TABLES.items()]

    def fingerprint(self) -> Mapping[str, Any]:
        return {"task": "das", "config": dataclasses.asdict(self.config), "events": int(self.user.numel())}

    def _batch(self, idx: torch.Tensor) -> DASBatch:
        it = self.item[idx]
        lo, hi = self.item_offsets[it], self.item_offsets[it + 1]
        pick = lo + (torch.rand(idx.numel(), generator=self.generator) * (hi - lo).float()).long()
        user = self.user[idx]
        return DASBatch(user, it, self.next_item[idx], self.users_by_item[pick], self.item_content[it],
                        self.user_content[user])

    def train_data(self, rank: int, world_size: int) -> PermutedBatches:
        return PermutedBatches(self.user.numel(), self.batch_size, self.generator, self._batch, drop_last=True)

    def step(self, model: nn.Module, batch: DASBatch) -> Tuple[Dict[str, Loss], int]:
        out = model(batch)
        n = batch.user.numel()
        terms = {"loss": Loss(out["loss"], n, mean=True)}
        terms.update({k: Loss(v, n, weight=0.0, mean=True) for k, v in out.items() if k != "loss"})
        return terms, n

    def on_epoch_end(self, module: nn.Module, epoch: int) -> None:
        if epoch % 5 == 4 and epoch < self.epochs - 5:
            with torch.no_grad():
                for quantizer, x in ((module.item_quantizer, self.item_content),
                                     (module.user_quantizer, self.user_content)):
                    res = quantizer(x.to(self.model.popularity_bucket.device))
                    quantizer.reseed_dead_codes(res["z"], res["codes"], self.generator)

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        raise ValueError("DAS has no validation split")


def train_das(store: SequenceStore, log: BehaviourLog, content: torch.Tensor, config: Optional[DASConfig] = None,
              epochs: int = 20, batch_size: int = 1024, lr: float = 2e-3, seed: int = 0, name: Optional[str] = None,
              progress: bool = False, sparse_lr: float = 0.05) -> Dict:
    """Trains :class:`DAS` on ``log`` (one stage: quantisers, CF and alignment together)
    through the one trainer (:class:`DASTask`: TorchRec id tables with fused row-wise
    Adagrad at ``sparse_lr``, Adam at ``lr`` on the rest) and exports codes, CF and fused
    vectors; saves the set ``name`` when given."""
    config = config or DASConfig(content_dim=content.shape[1])
    torch.manual_seed(seed)
    task = DASTask(log, content, config, epochs, batch_size, seed)
    train = _content_train_config(epochs, batch_size, lr, seed, progress)
    train.optim.sparse_lr = sparse_lr
    start = time.perf_counter()
    trainer = Trainer(task, train)
    result = trainer.fit()
    das = DAS(config, log.num_users, log.num_items, task.popularity)
    das.load_state_dict(full_state_dict(trainer.model))
    das.eval()
    history = [{"epoch": h["epoch"], **{k[len("train_"):]: round(v, 4) for k, v in h.items()
                                         if k.startswith("train_")}} for h in result.history]
    exported = das.export(task.item_content, task.user_content)
    out: Dict = {"history": history, "seconds": round(time.perf_counter() - start, 2)}
    out["item_stats"] = semantic_id_stats(exported["item_codes"], config.codebook_size, task.item_content,
                                          exported["item_reconstruction"])
    out["user_stats"] = semantic_id_stats(exported["user_codes"], config.codebook_size, task.user_content,
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
