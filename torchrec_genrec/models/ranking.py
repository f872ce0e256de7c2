"""Rankers on TorchRec tables: DCNv2 + DIN (the DLRM baseline), OneTrans, and the HSTU ranker.

All three read the same :class:`~torchrec_genrec.data.ranking_batching.RankingBatch`
through the same tables (:func:`~torchrec_genrec.plans.models.onetrans_tables`): one
``EmbeddingCollection`` (the item table, shared by the target and both behaviour
sequences; the rating table) and one ``EmbeddingBagCollection`` (genre bags; one table
per NS feature). They differ in how sequences and features meet:

- ``dlrm``: DIN target attention over each behaviour sequence, DCNv2 (TorchRec's
  ``CrossNet``) + a deep MLP over the non-sequential features, concatenated into an MLP —
  sequence modelling and feature crossing kept apart;
- ``onetrans``: one causal transformer over ``[S-tokens ; NS-tokens]``
  (:mod:`torchrec_genrec.modules.onetrans`); the S side runs once per request (Stage I)
  and each candidate's NS tokens attend to its cached keys/values (Stage II);
- ``hstu``: the user's merged history, then the candidates under a target-aware mask
  (:mod:`torchrec_genrec.modules.hstu_ranker`), with two task heads at the candidate
  positions (like = label, and the rating class): one pass scores all of a request's
  candidates.

Example::

    model = Ranker(RankerConfig(name="onetrans"), vocab_sizes=data.vocab_sizes, num_genres=19)
    dmp = shard(model, ctx, optim, batch_size=256)
    loss, stats = dmp(batch)                    # training
    logits = dmp.module.predict(batch)          # (C,) like-logits
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, List, Literal, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.crossnet import CrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_genrec.data.ranking_batching import NS_FEATURES, SEQUENCES, RankingBatch
from torchrec_genrec.modules.hstu import HSTUConfig
from torchrec_genrec.modules.hstu_ranker import HSTURankerEncoder
from torchrec_genrec.modules.onetrans import OneTrans, OneTransConfig
from torchrec_genrec.ops.jagged import jagged_to_padded
from torchrec_genrec.plans.models import onetrans_tables, table_width
from torchrec_genrec.plans.spec import TableSpec

__all__ = ["NS_GROUPS", "Ranker", "RankerConfig"]

#: Feature groups of the group-wise NS tokenizer (one MLP, one token each).
NS_GROUPS: Dict[str, Tuple[str, ...]] = {
    "user": ("user_id", "user_age", "user_gender", "user_occupation", "user_zip"),
    "item": ("target_item", "release_year", "target_genres"),
    "context": ("event_hour", "event_weekday"),
    "profile": ("liked_genres", "other_genres"),
}
_NS_INPUTS = tuple(f for group in NS_GROUPS.values() for f in group)


@dataclasses.dataclass
class RankerConfig:
    """Args:
    name (str): ``dlrm`` (DCNv2 + DIN), ``onetrans`` or ``hstu``.
    embedding_dim (int): table and token width D.
    dropout (float): dropout in the towers (and the transformer blocks).
    tower_dims (Tuple[int, ...]): hidden sizes of the final MLP.
    cross_layers (int): dlrm: DCNv2 cross layers.
    din_hidden (int): dlrm: hidden size of DIN's attention MLP.
    num_layers (int): onetrans / hstu: blocks.
    num_heads (int): onetrans / hstu: attention heads.
    merge (str): onetrans: ``timestamp`` (both sequences interleaved by time, plus a
        sequence-type embedding) or ``sep`` (concatenated, each closed by a learnable
        [SEP] token).
    ns_tokenizer (str): onetrans: ``auto_split`` (one MLP over all NS features, split
        into ``num_ns_tokens`` tokens) or ``group_wise`` (one MLP and token per group of
        :data:`NS_GROUPS`).
    num_ns_tokens (int): onetrans, auto-split: NS tokens.
    pyramid (str): onetrans: ``linear`` or ``none``.
    pyramid_min_s_tokens (int): onetrans: S-tokens left after the last layer.
    selection (str): onetrans: which S-tokens a pyramid layer keeps: ``recency``,
        ``scorer_topk`` or ``scorer_threshold``.
    shared_ns_params (bool): onetrans ablation: NS tokens use the S-tokens' weights.
    rating_loss_weight (float): hstu: weight of the rating-class task.
    """

    name: Literal["dlrm", "onetrans", "hstu"] = "onetrans"
    embedding_dim: int = 32
    dropout: float = 0.1
    tower_dims: Tuple[int, ...] = (128, 64)
    cross_layers: int = 2
    din_hidden: int = 64
    num_layers: int = 2
    num_heads: int = 2
    merge: Literal["timestamp", "sep"] = "timestamp"
    ns_tokenizer: Literal["auto_split", "group_wise"] = "auto_split"
    num_ns_tokens: int = 4
    pyramid: Literal["linear", "none"] = "linear"
    pyramid_min_s_tokens: int = 0
    selection: Literal["recency", "scorer_topk", "scorer_threshold"] = "recency"
    shared_ns_params: bool = False
    rating_loss_weight: float = 0.5

    def __post_init__(self) -> None:
        choices = {"name": ("dlrm", "onetrans", "hstu"), "merge": ("timestamp", "sep"),
                   "ns_tokenizer": ("auto_split", "group_wise")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"model.{field} must be one of {', '.join(allowed)}, not {getattr(self, field)!r}")
        if self.embedding_dim < 4 or self.embedding_dim % self.num_heads:
            raise ValueError(f"model.embedding_dim ({self.embedding_dim}) must be >= 4 and divisible by "
                             f"model.num_heads ({self.num_heads})")


def _mlp(dims: List[int], dropout: float, last_activation: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers += [nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _log_hours(delta_seconds: torch.Tensor) -> torch.Tensor:
    """A time gap as a feature: log(1 + hours), scaled to about [0, 1] over years."""
    return torch.log1p(delta_seconds.clamp(min=0).to(torch.float32) / 3600.0).unsqueeze(-1) / 10.0


class Ranker(nn.Module):
    """A CTR-style ranker on the ranking task's features (see the module docstring).

    Args:
        config (RankerConfig): which model and its settings.
        vocab_sizes (Dict[str, int]): :attr:`RankingData.vocab_sizes` (rows per feature).
        num_genres (int): genre vocabulary G (multi-hot width).
        max_seq_len (int): events per behaviour sequence.
        seed (int): table initialisation seed (see ``train.trainer.seed_embedding_tables``).
        device (torch.device): where the tables are created; ``meta`` lets DMP materialise them.
    """

    def __init__(self, config: RankerConfig, vocab_sizes: Dict[str, int], num_genres: int, max_seq_len: int,
                 seed: int = 0, device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.config, self.seed, self.max_seq_len = config, seed, max_seq_len
        self.vocab_sizes, self.num_genres = dict(vocab_sizes), num_genres
        self.num_ratings = vocab_sizes["rating"]
        d = config.embedding_dim
        self.table_dim = table_width(d)
        init = partial(nn.init.trunc_normal_, mean=0.0, std=0.02, a=-0.04, b=0.04)
        specs = self.table_specs()
        self.sequence_embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=s.name, embedding_dim=s.embedding_dim, num_embeddings=s.num_embeddings,
                                    feature_names=list(s.feature_names), init_fn=init) for s in specs if not s.pooled],
            device=device)
        self.pooled_embeddings = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=s.name, embedding_dim=s.embedding_dim, num_embeddings=s.num_embeddings,
                                       feature_names=list(s.feature_names), init_fn=init,
                                       pooling=PoolingType.MEAN if s.name == "genre" else PoolingType.SUM)
                    for s in specs if s.pooled],
            device=device)
        # Each sequence's events through that sequence's own MLP: item, rating, genres, age.
        event_width = 2 * d + num_genres + 1
        self.event_mlps = nn.ModuleDict({name: _mlp([event_width, d, d], config.dropout, last_activation=False)
                                         for name in SEQUENCES})
        ns_width = len(_NS_INPUTS) * d
        c = config
        if c.name == "dlrm":
            self.din = nn.ModuleDict({name: _mlp([4 * d, c.din_hidden, 1], 0.0, last_activation=False)
                                      for name in SEQUENCES})
            self.target_mlp = _mlp([d + d, d], c.dropout, last_activation=False)
            self.cross = CrossNet(ns_width, c.cross_layers)
            self.deep = _mlp([ns_width, 2 * d, d], c.dropout)
            tower_in = ns_width + d + len(SEQUENCES) * d
        elif c.name == "onetrans":
            self.type_embedding = nn.Embedding(len(SEQUENCES), d)
            self.sep_tokens = nn.Parameter(torch.randn(len(SEQUENCES), d) * 0.02)
            if c.ns_tokenizer == "auto_split":
                self.num_ns = c.num_ns_tokens
                self.ns_tokenizer = _mlp([ns_width, 2 * d * self.num_ns, d * self.num_ns], c.dropout,
                                         last_activation=False)
            else:
                self.num_ns = len(NS_GROUPS)
                self.ns_group_mlps = nn.ModuleDict({g: _mlp([len(f) * d, d, d], c.dropout, last_activation=False)
                                                    for g, f in NS_GROUPS.items()})
            self.onetrans = OneTrans(OneTransConfig(
                embedding_dim=d, num_layers=c.num_layers, num_heads=c.num_heads, num_ns_tokens=self.num_ns,
                dropout=c.dropout, pyramid=c.pyramid, pyramid_min_s_tokens=c.pyramid_min_s_tokens,
                selection=c.selection, shared_ns_params=c.shared_ns_params,
                max_s_tokens=2 * max_seq_len + (len(SEQUENCES) if c.merge == "sep" else 0)))
            tower_in = self.num_ns * d
        else:
            merged = 2 * max_seq_len + 1
            self.hstu = HSTURankerEncoder(HSTUConfig(
                embedding_dim=d, num_blocks=c.num_layers, num_heads=c.num_heads, attention_dim=d // c.num_heads,
                linear_dim=d // c.num_heads, max_seq_len=merged, dropout=c.dropout))
            self.candidate_mlp = _mlp([d + d, d], c.dropout, last_activation=False)
            self.context = _mlp([ns_width, 2 * d, d], c.dropout)
            self.rating_head = nn.Linear(d + d, self.num_ratings)
            tower_in = d + d
        self.tower = nn.Sequential(_mlp([tower_in, *c.tower_dims], c.dropout), nn.Linear(c.tower_dims[-1], 1))

    def table_specs(self) -> List[TableSpec]:
        """The model's embedding tables as the planner sees them (see ``plans``)."""
        v = self.vocab_sizes
        ns_rows = {"user_id": v["user"], "user_age": v["age"], "user_gender": v["gender"],
                   "user_occupation": v["occupation"], "user_zip": v["zip"], "release_year": v["year"],
                   "event_hour": v["hour"], "event_weekday": v["weekday"]}
        return onetrans_tables(v["item"], v["user"], self.config.embedding_dim, self.max_seq_len,
                               num_ratings=self.num_ratings, num_genres=self.num_genres, ns_rows=ns_rows)

    # ----------------------------------------------------------------- features
    def _features(self, batch: RankingBatch) -> Dict[str, torch.Tensor]:
        """Looks every table up once: per-candidate NS embeddings ``(C, D)`` and, per
        sequence, its event vectors ``(n, D)`` (request after request, oldest first)."""
        d = self.config.embedding_dim
        seq = self.sequence_embeddings(batch.sequence)
        pooled = self.pooled_embeddings(batch.pooled).to_dict()
        first = batch.first_candidate
        out: Dict[str, torch.Tensor] = {k: pooled[k][:, :d] for k in NS_FEATURES + ("target_genres",)}
        out["target_item"] = seq["target_item"].values()[:, :d]
        for name in SEQUENCES:
            # Profiles sit on first candidate rows: broadcast each request's to its candidates.
            out[f"{name}_genres"] = pooled[f"{name}_genres"][:, :d][first][batch.request_index]
            items = seq[f"{name}_item"].values()[:, :d]
            ratings = seq[f"{name}_rating"].values()[:, :d]
            request_of_event = torch.repeat_interleave(torch.arange(batch.num_requests, device=items.device),
                                                       batch.sequence_lengths(name))
            gap = _log_hours(batch.request_time[request_of_event] - batch.event_time[name])
            out[f"{name}_events"] = self.event_mlps[name](
                torch.cat([items, ratings, batch.event_genres[name], gap], dim=-1))
            out[f"{name}_request"] = request_of_event
        return out

    def _ns_inputs(self, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([f[k] for k in _NS_INPUTS], dim=-1)  # (C, |NS| * D)

    def _merged_history(self, batch: RankingBatch, f: Dict[str, torch.Tensor], tokens: Dict[str, torch.Tensor],
                        merge: str, left: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both sequences of each request as one padded sequence ``(R, L, D)`` (+ valid
        mask, + int64 timestamps): interleaved by time, or concatenated with [SEP]s."""
        r = batch.num_requests
        device = batch.request_time.device
        parts, requests, keys, times = [], [], [], []
        for i, name in enumerate(SEQUENCES):
            req = f[f"{name}_request"]
            t = batch.event_time[name]
            parts.append(tokens[name])
            requests.append(req)
            times.append(t)
            # Sort key within a request: time (interleave) or (segment, position) (concatenate).
            if merge == "timestamp":
                keys.append(t * 2 + i)
            else:
                pos = torch.arange(req.numel(), device=device) - torch.searchsorted(req, req)
                keys.append((2 * i) * (1 << 20) + pos)
        if merge == "sep":
            for i in range(len(SEQUENCES)):
                parts.append(self.sep_tokens[i].expand(r, -1))
                requests.append(torch.arange(r, device=device))
                keys.append(torch.full((r,), (2 * i + 1) * (1 << 20), dtype=torch.int64, device=device))
                times.append(batch.request_time)
        values, request, key, time = (torch.cat(x) for x in (parts, requests, keys, times))
        order = torch.argsort(request * (1 << 40) + key, stable=True)
        lengths = torch.bincount(request, minlength=r)
        max_len = max(int(lengths.max()) if r else 0, 1)
        padded, valid = jagged_to_padded(values[order], lengths, max_len, left=left)
        times, _ = jagged_to_padded(time[order], lengths, max_len, left=left)
        return padded, valid, times

    # ----------------------------------------------------------------- models
    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """``(C,)`` like-logits of every candidate."""
        return self._forward(batch)[0]

    def _forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        f = self._features(batch)
        name = self.config.name
        if name == "dlrm":
            return self._dlrm(batch, f), {}
        if name == "onetrans":
            return self._onetrans(batch, f), {}
        return self._hstu(batch, f)

    def _dlrm(self, batch: RankingBatch, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        ns = self._ns_inputs(f)
        query = self.target_mlp(torch.cat([f["target_item"], f["target_genres"]], dim=-1))  # (C, D)
        pooled = []
        for name in SEQUENCES:
            lengths = batch.sequence_lengths(name)
            keys, valid = jagged_to_padded(f[f"{name}_events"], lengths, max(int(lengths.max()), 1))
            keys, valid = keys[batch.request_index], valid[batch.request_index]  # (C, L, D)
            q = query.unsqueeze(1).expand_as(keys)
            # DIN: an MLP scores each event against the target; weights are not normalised.
            weights = self.din[name](torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
            pooled.append((weights * valid).unsqueeze(-1).mul(keys).sum(dim=1))
        features = torch.cat([self.cross(ns), self.deep(ns), *pooled], dim=-1)
        return self.tower(features).squeeze(-1)

    def _ns_tokens(self, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        d = self.config.embedding_dim
        if self.config.ns_tokenizer == "auto_split":
            x = self.ns_tokenizer(self._ns_inputs(f))
            return x.view(x.shape[0], self.num_ns, d)
        return torch.stack([self.ns_group_mlps[g](torch.cat([f[k] for k in feats], dim=-1))
                            for g, feats in NS_GROUPS.items()], dim=1)

    def _onetrans(self, batch: RankingBatch, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = {name: f[f"{name}_events"] + (self.type_embedding.weight[i] if self.config.merge == "timestamp"
                                                else 0.0) for i, name in enumerate(SEQUENCES)}
        s_tokens, s_valid, _ = self._merged_history(batch, f, tokens, self.config.merge, left=True)
        cache = self.onetrans.encode_sequence(s_tokens, s_valid)  # Stage I: once per request
        ns_out = self.onetrans.forward_cached(cache, self._ns_tokens(f), batch.request_index)  # Stage II
        return self.tower(ns_out.flatten(1)).squeeze(-1)

    def _hstu(self, batch: RankingBatch, f: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        d = self.config.embedding_dim
        # History tokens: item + rating + genres (the event MLP), one stream ordered by time.
        tokens = {name: f[f"{name}_events"] for name in SEQUENCES}
        history, valid, times = self._merged_history(batch, f, tokens, "timestamp", left=False)
        lengths = valid.sum(dim=1)
        # Candidates of each request side by side: (R, Cmax, D).
        slot = torch.arange(batch.num_candidates, device=history.device) - batch.first_candidate[batch.request_index]
        per_request = torch.bincount(batch.request_index, minlength=batch.num_requests)
        c_max = max(int(per_request.max()), 1)
        cand = self.candidate_mlp(torch.cat([f["target_item"], f["target_genres"]], dim=-1))
        grid = cand.new_zeros(batch.num_requests, c_max, d).index_put((batch.request_index, slot), cand)
        cand_time = batch.target_time.new_zeros(batch.num_requests, c_max).index_put(
            (batch.request_index, slot), batch.target_time)
        out = self.hstu(history, lengths, times, grid, cand_time)[batch.request_index, slot]  # (C, D)
        features = torch.cat([out, self.context(self._ns_inputs(f))], dim=-1)
        return self.tower(features).squeeze(-1), {"rating_logits": self.rating_head(features)}

    def forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training step: ``(loss, stats)``; the loss is the mean binary cross-entropy of
        the like-logits (plus the rating task for ``hstu``)."""
        logits, extra = self._forward(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        stats = {"bce": loss.detach()}
        if "rating_logits" in extra and self.config.rating_loss_weight > 0:
            rating_loss = F.cross_entropy(extra["rating_logits"], batch.rating)
            stats["rating_ce"] = rating_loss.detach()
            loss = loss + self.config.rating_loss_weight * rating_loss
        stats["loss"] = loss.detach()
        stats["samples"] = torch.tensor(float(batch.num_candidates))
        return loss, stats


def count_dense_parameters(model: nn.Module) -> int:
    """Parameters outside the embedding tables."""
    return sum(p.numel() for n, p in model.named_parameters()
               if "embeddings" not in n and not n.startswith(("sequence_embeddings", "pooled_embeddings")))

