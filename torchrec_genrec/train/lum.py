"""LUM pre-training on ``<condition, item>`` tokens, the conditioned-retrieval test, and the
ranker's feature cache.

Pre-training reads only the events before the ranking split's validation cutoff (jagged
batches by default, or packed rows) and runs through the one
:class:`~torchrec_genrec.train.trainer.Trainer`: the token table is a TorchRec table planned
and sharded under ``DistributedModelParallel`` and trained by the fused sparse optimiser,
the transformer by AdamW. The retrieval test asks, for every test event of a user with a
pre-cutoff history, for its item given that history: the interest vector of the event's
true condition ranks every item (the user's pre-cutoff items excluded); recall@10 and
NDCG@10. The fair baseline is the unconditioned model (``condition = "none"``: the same
architecture trained with one constant condition) with the true condition applied
afterwards as a filter on the ranked items; a wrong condition (another genre, drawn at
random) shows what the condition carries.

Example::

    cfg = load_config(LUMRecipeConfig, "apps/configs/lum_ml100k.toml", ["data.condition=genre"])
    model, seqs, history = pretrain_lum(cfg)
    metrics = conditioned_retrieval(model, seqs, cfg)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from torchrec_genrec.config import ConfigError, from_dict, to_dict
from torchrec_genrec.data.content import save_side_features
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.data.lum import (CONDITIONS, ITEM_CONDITIONS, REQUEST_CONDITION_CODES, ConditionItemSequences,
                                      LUMBatch, LUMEpochs, condition_given_item, condition_item_sequences,
                                      item_conditions, user_folds)
from torchrec_genrec.data.ranking import _per_second, same_time_start
from torchrec_genrec.data.splits import GlobalTimeSplit
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.modules.lum import HSTU_NO_PACKED_ROWS, LUM, LUMConfig
from torchrec_genrec.plans.spec import TableSpec
from torchrec_genrec.train.content import behaviour_log, behaviour_log_before
from torchrec_genrec.train.io import write_json_atomic
from torchrec_genrec.train.sharding import OptimConfig, full_state_dict
from torchrec_genrec.train.trainer import Loss, TrainConfig, Trainer, seed_everything

logger = logging.getLogger(__name__)

__all__ = ["LUMDataConfig", "LUMRecipeConfig", "LUMTask", "conditioned_retrieval", "event_interests", "load_lum",
           "lum_features", "prefix_room", "pretrain_lum", "run_lum_retrieval_study", "save_lum", "user_folds",
           "user_prefix"]

WEIGHTS = "lum.safetensors"


@dataclasses.dataclass
class LUMDataConfig:
    """Args:
    dataset (str): a prepared dataset's name or store path.
    condition (str): a key of ``data.lum.CONDITIONS`` (``none`` = unconditioned).
    max_events (int): most recent pre-cutoff events per user (2 tokens each).
    layout (str): ``jagged`` (the library's jagged batches: values + offsets) or
        ``packed`` (several users per fixed-length row, block-diagonal mask).
    row_len (int): tokens per packed row.
    batch_rows (int): rows per step; a jagged batch holds ``batch_rows * row_len`` tokens.
    valid_fraction, test_fraction (float): the ranking split (its validation cutoff).
    folds (int): user folds for cross-fitting (user ``u`` is in fold ``u % folds``).
    holdout_fold (int): pre-train without the users of this fold (-1: every user), so
        their features come from a model that never trained on their events
        (:func:`lum_features` over the K models of holdout folds 0..K-1).
    """

    dataset: str = "movielens-100k"
    condition: str = "genre"
    max_events: int = 100
    layout: str = "jagged"
    row_len: int = 256
    batch_rows: int = 16
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    folds: int = 1
    holdout_fold: int = -1


def _lum_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="", epochs=20, tensorboard=True, progress=False, checkpoint=False,
                       optim=OptimConfig(lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01, sparse_lr=0.05))


@dataclasses.dataclass
class LUMRecipeConfig:
    """LUM pre-training: the data (``data``), the model (``model``), how it trains
    (``train``: the shared :class:`~torchrec_genrec.train.trainer.TrainConfig`; an empty
    ``train.output_dir`` writes nothing)."""

    data: LUMDataConfig = dataclasses.field(default_factory=LUMDataConfig)
    model: LUMConfig = dataclasses.field(default_factory=LUMConfig)
    train: TrainConfig = dataclasses.field(default_factory=_lum_train_defaults)

    def validate(self) -> "LUMRecipeConfig":
        """Checks the whole config (after every override: fields depend on each other)."""
        d = self.data
        if d.condition not in CONDITIONS:
            raise ConfigError(f"unknown LUM condition {d.condition!r}; choose one of {sorted(CONDITIONS)} "
                              "(data.condition)")
        if d.layout not in ("jagged", "packed"):
            raise ConfigError(f"unknown LUM layout {d.layout!r}; choose 'jagged' or 'packed' (data.layout)")
        if d.layout == "packed" and self.model.encoder == "hstu":
            raise ConfigError(f"data.layout 'packed' with model.encoder 'hstu': {HSTU_NO_PACKED_ROWS}")
        if d.max_events < 1 or d.row_len < 2 or d.batch_rows < 1:
            raise ConfigError("data.max_events, data.batch_rows must be >= 1 and data.row_len >= 2, got "
                              f"{d.max_events}, {d.batch_rows}, {d.row_len}")
        if 2 * d.max_events > self.model.max_positions:
            raise ConfigError(f"data.max_events {d.max_events} makes sequences of {2 * d.max_events} tokens, longer "
                              f"than model.max_positions {self.model.max_positions}; lower one or raise the other")
        if d.folds < 1 or not -1 <= d.holdout_fold < d.folds:
            raise ConfigError(f"data.holdout_fold must be -1 or in [0, data.folds), with data.folds >= 1; got folds "
                              f"{d.folds}, holdout_fold {d.holdout_fold}")
        self.model.validate()
        self.train.validate()
        return self


def _sequences(cfg: LUMRecipeConfig) -> Tuple[SequenceStore, ConditionItemSequences]:
    store = SequenceStore.open(resolve_store(cfg.data.dataset))
    log = behaviour_log(store, cfg.data.valid_fraction, cfg.data.test_fraction)
    return store, condition_item_sequences(store, log, cfg.data.condition, cfg.data.max_events)


class LUMTask:
    """LUM pre-training as a trainer task: the model (token table on the meta device),
    the users' ``<condition, item>`` sequences batched per epoch, the InfoNCE step.

    Args:
        cfg (LUMRecipeConfig): the recipe.
        seqs (ConditionItemSequences): the users' pre-cutoff token sequences.
    """

    units = "tokens"
    selection = ""  # no validation split: the last epoch's weights are kept

    def __init__(self, cfg: LUMRecipeConfig, seqs: ConditionItemSequences) -> None:
        self.cfg, self.seqs = cfg, seqs
        self.model = LUM(cfg.model, seqs.space, device=torch.device("meta"), seed=cfg.train.seed)
        holdout = None
        if cfg.data.holdout_fold >= 0:  # cross-fitting: the held-out fold's users are not trained on
            holdout = user_folds(len(seqs.lengths()), cfg.data.folds) == cfg.data.holdout_fold
        self.holdout = holdout

    def fingerprint(self) -> Mapping[str, Any]:
        return {"data": to_dict(self.cfg.data), "model": to_dict(self.cfg.model)}

    def table_specs(self) -> List[TableSpec]:
        """The token table (conditions and items of the unified token space), row-wise."""
        m = self.cfg.model
        return [TableSpec("lum_tokens", self.seqs.space.size, m.embedding_dim, LUM.FEATURES,
                          sharding_types=("row_wise", "table_wise"),
                          ids_per_sample=float(2 * self.cfg.data.max_events + m.num_negatives),
                          description="LUM token space: conditions and items")]

    def train_data(self, rank: int, world_size: int) -> LUMEpochs:
        d = self.cfg.data
        return LUMEpochs(self.seqs, d.layout, d.row_len, d.batch_rows, self.cfg.train.seed, self.holdout, rank,
                         world_size)

    def step(self, model: nn.Module, batch: LUMBatch) -> Tuple[Dict[str, Loss], int]:
        out = model(batch)
        n = out["positions"]
        return {"loss": Loss(out["loss_sum"], n), "top1": Loss(out["top1_sum"], n, weight=0.0)}, out["tokens"]

    def evaluate(self, model: nn.Module, split: str) -> Dict[str, float]:
        raise ValueError("LUM pre-training has no validation split; test with conditioned_retrieval")


def pretrain_lum(cfg: LUMRecipeConfig) -> Tuple[LUM, ConditionItemSequences, List[Dict[str, float]]]:
    """Pre-trains LUM on the events before the validation cutoff; returns the trained model
    (unsharded, on CPU, eval mode), the sequences and the per-epoch history (loss, top-1
    against the negatives, tokens/s). With ``cfg.train.output_dir`` the run is saved there
    (:func:`save_lum`) and the curves go to TensorBoard."""
    cfg.validate()
    seed_everything(cfg.train.seed)
    store, seqs = _sequences(cfg)
    if not seqs.lengths().any():
        raise ValueError(f"{store.path}: no event before the validation cutoff; LUM has nothing to pre-train on")
    task = LUMTask(cfg, seqs)
    trainer = Trainer(task, cfg.train)
    result = trainer.fit()
    trainer.close()
    model = LUM(cfg.model, seqs.space, seed=cfg.train.seed)
    model.load_state_dict(full_state_dict(trainer.model))
    history = [{"epoch": h["epoch"], "loss": h["train_loss"], "top1": h["train_top1"],
                "tokens_per_s": h["tokens_per_s"]} for h in result.history]
    if cfg.train.output_dir and trainer.ctx.is_main:
        save_lum(cfg.train.output_dir, model, cfg, history)
    return model.eval(), seqs, history


def save_lum(run_dir: str, model: LUM, cfg: LUMRecipeConfig, history: List[Dict[str, float]]) -> None:
    """``config.json``, ``history.json`` and then ``lum.safetensors`` (the weights, tensors
    only; the file that marks a finished run), each written to a temporary file and
    renamed: a run directory never holds a partial file, and never new weights beside an
    old config."""
    from safetensors.torch import save_file

    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, WEIGHTS)
    if os.path.exists(final):
        os.remove(final)  # a crash below leaves no finished-looking run with the old weights
    write_json_atomic(os.path.join(run_dir, "config.json"), to_dict(cfg))
    write_json_atomic(os.path.join(run_dir, "history.json"), {"history": history})
    tmp = final + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)


def load_lum(run_dir: str) -> Tuple[LUM, ConditionItemSequences, LUMRecipeConfig]:
    """A run of :func:`pretrain_lum` back: the model (eval mode), its sequences, its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(run_dir, WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished LUM run "
                                "(genrec lum train --out DIR)")
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        cfg = from_dict(LUMRecipeConfig, json.load(f), where=config_path).validate()
    _, seqs = _sequences(cfg)
    model = LUM(cfg.model, seqs.space, seed=cfg.train.seed)
    try:
        model.load_state_dict(load_file(path))
    except (RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path} does not match its config.json (token space {seqs.space.size}): {err}") from None
    return model.eval(), seqs, cfg


def _test_events(store: SequenceStore, cfg: LUMRecipeConfig) -> Tuple[np.ndarray, np.ndarray]:
    """The test events (user, event id), in store order."""
    _, test_start = GlobalTimeSplit(cfg.data.valid_fraction, cfg.data.test_fraction).cutoffs(store)
    user = np.repeat(np.arange(store.num_users), store.lengths)
    events = np.nonzero(np.asarray(store.timestamp) >= test_start)[0]
    return user[events], events


def user_prefix(seqs: ConditionItemSequences, user: int, room: int) -> torch.Tensor:
    """The user's most recent ``<condition, item>`` tokens that fit in ``room`` positions
    (cut at a condition, so the prefix stays in pairs)."""
    prefix = torch.from_numpy(seqs.tokens[seqs.offsets[user]:seqs.offsets[user + 1]])
    keep = min(prefix.numel(), room - room % 2)
    return prefix[prefix.numel() - keep:]


def prefix_room(model: LUM, steps: int) -> int:
    """Positions left for the history prefix when ``steps`` items are generated after it."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (1 = the condition's output), got {steps}")
    room = model.config.max_positions - (2 * steps - 1)
    if room < 2:
        raise ValueError(f"{steps} generated items leave no room for a history in max_positions "
                         f"{model.config.max_positions}; use fewer steps")
    return room


@torch.no_grad()
def conditioned_retrieval(model: LUM, seqs: ConditionItemSequences, cfg: LUMRecipeConfig,
                          condition: Optional[str] = None, condition_prior: bool = False,
                          wrong_condition: bool = False, steps: int = 1, k: int = 10, seed: int = 0,
                          per_event: bool = False) -> Dict[str, Any]:
    """Recall@k / NDCG@k of every test event of the users with a pre-cutoff history,
    given that history and the event's condition (one group query per user: each distinct
    condition read out in one pass). Items of the user's pre-cutoff log are not ranked
    (a test event of such an item counts as a miss).

    Args:
        model, seqs, cfg: a pre-trained LUM, its sequences and recipe (``pretrain_lum``).
        condition (str): the condition whose true value each test event is asked with
            (default ``cfg.data.condition``; required for the unconditioned model, and for a
            conditioned one it must be the condition it was trained on).
        condition_prior (bool): add ``log p(condition | item)`` to the scores (logits
            ``cos / temperature``): the condition applied after the fact. For an item
            attribute (genre) ``p`` is 0 or 1: a filter; for a time condition it is the
            item's smoothed pre-cutoff frequency under the condition.
        wrong_condition (bool): query with a random other condition value.
        steps (int): the interest is the condition's output (1) or pooled over ``steps``
            greedily generated outputs (:meth:`LUM.interests`).
        per_event (bool): also return ``event_user`` / ``event_hit`` / ``event_ndcg`` per
            test event (for a paired bootstrap over users).
    """
    condition = condition or cfg.data.condition
    if condition == "none":
        raise ValueError("the unconditioned model needs the condition to evaluate: pass condition='genre', ...")
    if cfg.data.condition not in ("none", condition):
        raise ValueError(f"this LUM was trained on condition {cfg.data.condition!r}; it cannot be asked with "
                         f"{condition!r} values (train one on {condition!r}, or evaluate the unconditioned model)")
    store = SequenceStore.open(resolve_store(cfg.data.dataset))
    users, events = _test_events(store, cfg)
    seconds = np.asarray(store.timestamp, dtype=np.int64) // _per_second(store)
    items = np.asarray(store.item, dtype=np.int64)
    true_cond = np.asarray(CONDITIONS[condition](store, items[events], seconds[events]))
    log = behaviour_log(store, cfg.data.valid_fraction, cfg.data.test_fraction)
    prior = condition_given_item(store, log, condition)
    with np.errstate(divide="ignore"):  # log 0 = -inf: an item outside the condition
        log_prior = torch.from_numpy(np.log(prior)).float() if condition_prior else None
    values = np.arange(1 if condition in ITEM_CONDITIONS else 0, prior.shape[1])
    rng = np.random.default_rng(seed)
    hits, ndcg, n_users = [], [], 0  # per test event, in (user, store) order
    event_users: List[int] = []
    room = prefix_room(model, steps)
    for u in np.unique(users).tolist():
        prefix = user_prefix(seqs, u, room)
        if prefix.numel() == 0:
            continue
        n_users += 1
        mine = users == u
        conds = true_cond[mine]
        asked = np.asarray([rng.choice(values[values != c]) for c in conds]) if wrong_condition else conds
        query_values = np.zeros_like(asked) if cfg.data.condition == "none" else asked
        distinct, slot = np.unique(query_values, return_inverse=True)
        seen = seqs.seen(u)
        interests = model.interests(prefix, seqs.space.to_tokens("condition", torch.from_numpy(distinct)), steps,
                                    exclude=seen)
        logits_by_condition = model.item_scores(interests) / model.config.temperature
        logits_by_condition[:, seen] = -math.inf
        for target, c, s in zip(items[events[mine]].tolist(), conds.tolist(), slot.tolist()):
            scores = logits_by_condition[s]
            if log_prior is not None:
                scores = scores + log_prior[:, c]
            event_users.append(u)
            # An item the user already had is not retrievable here: a miss.
            rank = int((scores > scores[target]).sum()) if scores[target] > -math.inf else k
            hits.append(1.0 if rank < k else 0.0)
            ndcg.append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    n = len(hits)
    out = {f"recall@{k}": sum(hits) / max(n, 1), f"ndcg@{k}": sum(ndcg) / max(n, 1), "events": n, "users": n_users}
    if per_event:
        out.update({"event_user": event_users, "event_hit": hits, "event_ndcg": ndcg})
    return out


def run_lum_retrieval_study(seed: int = 0, epochs: int = 20, dataset: str = "movielens-100k",
                            condition: str = "genre", steps: int = 4, model: Optional[LUMConfig] = None,
                            layout: str = "jagged") -> Dict[str, Dict[str, Any]]:
    """The conditioned-retrieval comparison for one seed and condition kind: true
    condition (its output, and ``steps`` generated items pooled), wrong condition, the
    unconditioned model with the condition applied afterwards (``condition_prior``), and
    the unconditioned model alone."""
    out: Dict[str, Dict[str, Any]] = {}

    def recipe(condition_name: str) -> LUMRecipeConfig:
        train = _lum_train_defaults()
        train.seed, train.epochs = seed, epochs
        return LUMRecipeConfig(data=LUMDataConfig(dataset=dataset, condition=condition_name, layout=layout),
                               model=model or LUMConfig(), train=train)

    cond_cfg = recipe(condition)
    cond_model, cond_seqs, cond_hist = pretrain_lum(cond_cfg)
    ask = functools.partial(conditioned_retrieval, per_event=True)
    out["conditioned"] = {**ask(cond_model, cond_seqs, cond_cfg), "train": cond_hist[-1]}
    out["conditioned_pooled"] = ask(cond_model, cond_seqs, cond_cfg, steps=steps)
    out["wrong_condition"] = ask(cond_model, cond_seqs, cond_cfg, wrong_condition=True, seed=seed)
    none_cfg = recipe("none")
    none_model, none_seqs, none_hist = pretrain_lum(none_cfg)
    out["unconditioned_prior"] = {**ask(none_model, none_seqs, none_cfg, condition, condition_prior=True),
                                  "train": none_hist[-1]}
    out["unconditioned"] = ask(none_model, none_seqs, none_cfg, condition)
    return out


@torch.no_grad()
def event_interests(model: LUM, store: SequenceStore, cutoff: int, condition: str, max_events: int,
                    batch_tokens: int = 1 << 16, progress: bool = False,
                    users: Optional[np.ndarray] = None) -> Tuple[np.ndarray, torch.Tensor]:
    """Point-in-time interests: for every event before ``cutoff``, the interest under that
    event's own condition (its item's genre, or its hour bucket / weekday) given the user's
    at most ``max_events`` most recent events strictly earlier in time — what the ranker's
    per-user interest would have been when the event happened (zeros without an earlier
    event, like a user without history). A ranker trained on these
    sees, for each training sample, no event at or after it (the per-user cache reads the
    whole pre-cutoff history, the sample itself included).

    Each event is one query ``[prefix ; condition]`` (:meth:`LUM.query` with one
    condition), all of them encoded as jagged sequences of about ``batch_tokens`` tokens.
    ``users`` (a ``(U,)`` bool mask) keeps only those users' events.

    Returns:
        ``(events, interests)``: ``(E',)`` the store ids of the events before ``cutoff``
        (ascending), ``(E', D)`` their interests.

    Example::

        model, seqs, cfg = load_lum("runs/lum_genre")
        events, vectors = event_interests(model, store, seqs.cutoff, cfg.data.condition, cfg.data.max_events)
    """
    log = behaviour_log_before(store, cutoff)
    events = np.nonzero(np.asarray(store.timestamp) < cutoff)[0]  # the log's events, one for one
    user, n = log.user, len(events)
    # Every event of the log as a <condition, item> pair, in log order: pair j is event j.
    pairs = condition_item_sequences(store, log, condition, max_events=n).tokens
    # The prefix of event j: the pairs of its user strictly earlier in time, at most `cap`.
    end = same_time_start(user, log.timestamp)
    first_of_user = np.searchsorted(user, user, side="left")
    cap = min(max_events, prefix_room(model, 1) // 2)
    start = np.maximum(end - cap, first_of_user)
    lengths = 2 * (end - start) + 1  # the prefix's tokens, then the event's condition
    asked = np.arange(n) if users is None else np.nonzero(np.asarray(users, dtype=bool)[user])[0]
    out = torch.zeros(n, model.config.embedding_dim)
    chunks = np.split(asked, np.nonzero(np.diff(np.cumsum(lengths[asked]) // batch_tokens))[0] + 1)
    for chunk in tqdm(chunks if asked.size else [], desc="event interests", disable=not progress):
        length = lengths[chunk]
        offsets = np.concatenate([[0], np.cumsum(length)])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length)
        prefix_tokens = np.repeat(2 * (end[chunk] - start[chunk]), length)
        index = np.where(within < prefix_tokens, np.repeat(2 * start[chunk], length) + within,
                         np.repeat(2 * chunk, length))  # the last token: event j's own condition
        h = model.encode_jagged(torch.from_numpy(pairs[index]), torch.from_numpy(offsets))
        out[torch.from_numpy(chunk)] = h[torch.from_numpy(offsets[1:] - 1)]
    # No earlier event: zeros, as the per-user cache (and so serving) has for a user
    # without history.
    out[torch.from_numpy(end == start)] = 0.0
    return events[asked], out[torch.from_numpy(asked)]


@torch.no_grad()
def lum_features(model: Union[LUM, Sequence[LUM]], seqs: ConditionItemSequences, store: SequenceStore,
                 name: Optional[str] = None, steps: int = 1, top_k: int = 50, progress: bool = False,
                 event_history: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Step 3's offline cache: every user's interest vector under every condition (one
    group query per user over its pre-cutoff history; zeros without one), the top-``k``
    items per user and condition (the user's pre-cutoff items excluded), every item's LUM
    embedding and each item's condition; saved as the side-feature set ``name`` with the
    behaviour cutoff it was learned under (the ranker checks it against its split).

    Args:
        model (LUM or a sequence of K LUMs): with K cross-fitted models (model ``k``
            pre-trained with ``holdout_fold = k`` of ``folds = K``), user ``u``'s vectors come
            from model ``u % K``, which never trained on the user's events; the set then holds
            K item tables (``lum_item`` ``(K * I, D)``, model after model) and
            ``lum_user_fold`` ``(U,)``.
        steps (int): the interest is the condition's output (1) or pooled over ``steps``
            greedily generated outputs (:meth:`LUM.interests`).
        event_history (Optional[int]): also cache every pre-cutoff event's point-in-time
            interest (:func:`event_interests`, given at most this many earlier events: the
            pre-training's ``max_events``); the ranker then reads those for its training
            samples. Needs ``steps = 1``.

    Returns:
        ``lum_interest`` ``(U * C, D)`` (row ``u * C + c``), ``lum_topk`` ``(U * C, k)``
        item ids (-1 for a user without history), ``lum_item`` ``(I, D)``,
        ``lum_item_condition`` ``(I,)``: the item's condition value, or for an event
        condition its code in ``data.lum.REQUEST_CONDITION_CODES`` (the ranker then takes
        the request's hour bucket / weekday); with ``event_history``, ``lum_event``
        ``(E',)`` store event ids and ``lum_event_interest`` ``(E', D)``.
    """
    if event_history is not None and steps != 1:
        raise ValueError("point-in-time event interests are the condition's output: use steps = 1")
    models = [model] if isinstance(model, LUM) else list(model)
    fold = user_folds(store.num_users, len(models))
    c = seqs.space.count("condition")
    d = models[0].config.embedding_dim
    conditions = seqs.space.to_tokens("condition", torch.arange(c))
    interest = torch.zeros(store.num_users, c, d)
    top = torch.full((store.num_users, c, top_k), -1, dtype=torch.int64)
    room = min(prefix_room(m, steps) for m in models)
    for u in tqdm(range(store.num_users), desc="lum features", disable=not progress):
        prefix = user_prefix(seqs, u, room)
        if prefix.numel():
            seen, m = seqs.seen(u), models[fold[u]]
            interest[u] = m.interests(prefix, conditions, steps, exclude=seen)
            top[u] = m.retrieve_from(interest[u], top_k, exclude=seen)[1]
    items = torch.cat([m.item_embeddings() for m in models])
    if seqs.condition in REQUEST_CONDITION_CODES:  # the ranker reads the request's hour / weekday
        item_condition = torch.full((store.num_items,), REQUEST_CONDITION_CODES[seqs.condition], dtype=torch.int64)
    else:
        item_condition = torch.from_numpy(item_conditions(store, seqs.condition))
    out = {"lum_interest": interest.reshape(-1, d), "lum_topk": top.reshape(-1, top_k), "lum_item": items,
           "lum_item_condition": item_condition}
    if len(models) > 1:
        out["lum_user_fold"] = torch.from_numpy(fold)
    if event_history is not None:
        parts = [event_interests(m, store, seqs.cutoff, seqs.condition, event_history, progress=progress,
                                 users=fold == k) for k, m in enumerate(models)]
        events = np.concatenate([p[0] for p in parts])
        order = torch.from_numpy(np.argsort(events, kind="stable"))
        vectors = torch.cat([p[1] for p in parts])
        out.update(lum_event=torch.from_numpy(events)[order], lum_event_interest=vectors[order])
    if name:
        save_side_features(store.path, name, out, {"kind": "lum", "condition": seqs.condition, "conditions": c,
                                                   "steps": steps, "behaviour_cutoff": seqs.cutoff,
                                                   "event_history": event_history, "folds": len(models)})
    return out
