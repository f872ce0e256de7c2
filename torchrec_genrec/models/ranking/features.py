"""The part all rankers share: their tables, side inputs and feature lookups.

Every ranker reads the same :class:`~torchrec_genrec.batch.RankingBatch`
through the same tables (:func:`~torchrec_genrec.models.tables.onetrans_tables`): one
``EmbeddingCollection`` (the item table, shared by the target and both behaviour
sequences; the rating table) and one ``EmbeddingBagCollection`` (genre bags; one table
per NS feature), plus the optional semantic-ID tables and the frozen content / DAS / LUM
tables. :class:`Ranker` builds them and looks every table up once per batch
(:meth:`Ranker.lookup`); the architectures (``dlrm``, ``onetrans``, ``hstu``) subclass it
and differ only in how the sequences and the features meet.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_genrec.batch import (HOUR_BUCKET, LIFELONG_KEY, NS_FEATURES, REQUEST_CONDITION_CODES, SEQUENCES,
                                   RankingBatch)
from torchrec_genrec.models.ranking.config import RankerConfig
from torchrec_genrec.models.tables import onetrans_tables, semantic_id_tables, table_width
from torchrec_genrec.modules.muse import SimilarityAwareTargetAttention, SimTier, gsu_top_k
from torchrec_genrec.ops.jagged import jagged_to_padded
from torchrec_genrec.plans.planner import FrozenEmbeddingCollection
from torchrec_genrec.table_spec import TableSpec

__all__ = ["NS_GROUPS", "Ranker", "count_dense_parameters", "count_table_parameters", "merged_history", "mlp"]

#: Feature groups of the group-wise NS tokenizer (one MLP, one token each).
NS_GROUPS: Dict[str, Tuple[str, ...]] = {
    "user": ("user_id", "user_age", "user_gender", "user_occupation", "user_zip"),
    "item": ("target_item", "release_year", "target_genres"),
    "context": ("event_hour", "event_weekday"),
    "profile": ("liked_genres", "other_genres"),
}
_NS_INPUTS = tuple(f for group in NS_GROUPS.values() for f in group)
_SID_PREFIXES = ("sid_", "usid_")


def _pad_columns(weight: torch.Tensor, width: int) -> torch.Tensor:
    return weight if weight.shape[1] == width else torch.cat(
        [weight, weight.new_zeros(weight.shape[0], width - weight.shape[1])], dim=1)


def mlp(dims: List[int], dropout: float, last_activation: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``, each but (unless ``last_activation``)
    the last followed by SiLU and dropout."""
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
    """A CTR-style ranker on the ranking task's features: the tables and lookups every
    architecture shares, and the factory of the architectures.

    ``Ranker(config, ...)`` builds the architecture ``config.name`` names: a
    :class:`~torchrec_genrec.models.ranking.dlrm.DLRMRanker` (``dlrm``),
    :class:`~torchrec_genrec.models.ranking.onetrans.OneTransRanker` (``onetrans``) or
    :class:`~torchrec_genrec.models.ranking.hstu.HSTURanker` (``hstu``). Each has
    ``predict(batch)`` (``(C,)`` like-logits) and ``forward(batch) -> (loss, stats)``.

    The constructor order is part of the results: dense layers draw their initial values
    from torch's global RNG, so the shared layers are created first (in this class) and
    each architecture's after them.

    Args:
        config (RankerConfig): which model and its settings.
        vocab_sizes (Dict[str, int]): :attr:`RankingData.vocab_sizes` (rows per feature).
        num_genres (int): genre vocabulary G (multi-hot width).
        max_seq_len (int): events per behaviour sequence.
        seed (int): table initialisation seed (see ``train.sharding.seed_embedding_tables``).
        device (torch.device): where the tables are created; ``meta`` lets DMP materialise them.
        side (Optional[Dict[str, torch.Tensor]]): the side-feature sets ``config`` names
            (``train.ranking.load_ranker_side_inputs``): semantic-ID codes, frozen content /
            DAS / LUM vectors.

    Example::

        model = Ranker(RankerConfig(name="onetrans"), vocab_sizes=data.vocab_sizes, num_genres=19,
                       max_seq_len=50)                  # a OneTransRanker
        dmp = shard(model, ctx, optim, batch_size=256)
        loss, stats = dmp(batch)                         # training
        logits = dmp.module.predict(batch)               # (C,) like-logits
    """

    #: The architecture a subclass implements (its ``config.name``).
    architecture: ClassVar[str] = ""
    #: Whether MUSE's features join the NS features (projected to D) or go to the final
    #: tower as they are.
    muse_in_ns_features: ClassVar[bool] = True
    _architectures: ClassVar[Dict[str, Type["Ranker"]]] = {}

    def __init_subclass__(cls, architecture: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if architecture:
            cls.architecture = architecture
            Ranker._architectures[architecture] = cls

    def __new__(cls, config: Optional[RankerConfig] = None, *args: Any, **kwargs: Any) -> "Ranker":
        if cls is Ranker and config is not None:
            cls = Ranker._architectures[config.name]
        return super().__new__(cls)

    def __init__(self, config: RankerConfig, vocab_sizes: Dict[str, int], num_genres: int, max_seq_len: int,
                 seed: int = 0, device: torch.device = torch.device("meta"),
                 side: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        if config.name != self.architecture:
            raise ValueError(f"{type(self).__name__} is the {self.architecture!r} ranker, but model.name is "
                             f"{config.name!r}; build it with Ranker(config, ...)")
        self.config, self.seed, self.max_seq_len = config, seed, max_seq_len
        self.vocab_sizes, self.num_genres = dict(vocab_sizes), num_genres
        self.num_ratings = vocab_sizes["rating"]
        d = config.embedding_dim
        self.table_dim = table_width(d)
        side = dict(side or {})
        self._check_side(side)
        # Semantic-ID codes are part of the model (cached for serving): buffers, saved with it.
        for key in ("item_codes", "user_codes", "lum_item_condition"):
            self.register_buffer(key, side[key].to(torch.int64) if key in side else None)
        self.sid_levels = int(self.item_codes.shape[1]) if self.item_codes is not None else 0
        self.user_sid_levels = int(self.user_codes.shape[1]) if self.user_codes is not None else 0
        # Frozen tables' contents, written into the (sharded) tables by ``shard``.
        self._frozen_weights: Dict[str, torch.Tensor] = {}
        if "content" in side:
            self._frozen_weights["content"] = side["content"].float()
        if "item_fused" in side:
            self._frozen_weights["das"] = torch.cat([side["item_fused"], side["user_fused"]]).float()
        if "lum_interest" in side:
            self._frozen_weights["lum"] = torch.cat([side["lum_interest"], side["lum_item"]]).float()
            self.lum_conditions = side["lum_interest"].shape[0] // vocab_sizes["user"]
        # Cross-fitted LUMs: user u's vectors come from model lum_user_fold[u], with its own
        # item table (the K item tables follow the interests, model after model).
        self.register_buffer("lum_user_fold",
                             side["lum_user_fold"].to(torch.int64) if "lum_user_fold" in side else None)
        self.lum_folds = int(self.lum_user_fold.max()) + 1 if self.lum_user_fold is not None else 1
        # Point-in-time interests of training events (sorted store event ids -> rows): a
        # training sample reads its own event's row instead of its user's final interest.
        self.register_buffer("lum_events", side["lum_event"].to(torch.int64) if "lum_event" in side else None)
        if "lum_event_interest" in side:
            self._frozen_weights["lum_event"] = side["lum_event_interest"].float()
        self.lum_dim = int(side["lum_item"].shape[1]) if "lum_item" in side else 0
        self.content_dim = int(side["content"].shape[1]) if "content" in side else 0
        self.das_dim = int(side["item_fused"].shape[1]) if "item_fused" in side else 0
        init = partial(nn.init.trunc_normal_, mean=0.0, std=0.02, a=-0.04, b=0.04)
        specs = self.table_specs()
        ec = lambda chosen: [EmbeddingConfig(  # noqa: E731
            name=s.name, embedding_dim=s.embedding_dim, num_embeddings=s.num_embeddings,
            feature_names=list(s.feature_names), init_fn=init) for s in chosen]
        self.sequence_embeddings = EmbeddingCollection(
            tables=ec([s for s in specs if not s.pooled and s.trainable and not s.name.startswith(_SID_PREFIXES)]),
            device=device)
        self._sequence_features = [f for t in self.sequence_embeddings.embedding_configs() for f in t.feature_names]
        sid_specs = [s for s in specs if s.name.startswith(_SID_PREFIXES)]
        self.sid_embeddings = EmbeddingCollection(tables=ec(sid_specs), device=device) if sid_specs else None
        # One frozen collection per frozen table (a collection's tables share one width).
        frozen = {s.name: s for s in specs if not s.trainable}
        self.content_embeddings = FrozenEmbeddingCollection(tables=ec([frozen["content"]]), device=device) \
            if "content" in frozen else None
        self.das_embeddings = FrozenEmbeddingCollection(tables=ec([frozen["das"]]), device=device) \
            if "das" in frozen else None
        self.lum_embeddings = FrozenEmbeddingCollection(tables=ec([frozen["lum"]]), device=device) \
            if "lum" in frozen else None
        self.lum_event_embeddings = FrozenEmbeddingCollection(tables=ec([frozen["lum_event"]]), device=device) \
            if "lum_event" in frozen else None
        self.ns_inputs = _NS_INPUTS + self._extra_ns_inputs()
        if self.das_dim:
            self.das_projections = nn.ModuleDict({k: nn.Linear(self.das_dim, d) for k in ("das_item", "das_user")})
        if self.lum_dim:
            # One projection per cross-fitted model: their embedding spaces differ.
            interest = {"lum_interest": nn.Linear(self.lum_dim, d)} if self.lum_folds == 1 else {
                f"lum_interest_fold{k}": nn.Linear(self.lum_dim, d) for k in range(self.lum_folds)}
            self.lum_projections = nn.ModuleDict({**interest, "lum_similarity": nn.Linear(1, d)})
        muse = config.muse
        self.simtier = SimTier() if muse in ("simtier", "both") else None
        self.sata = SimilarityAwareTargetAttention(d) if muse in ("sata", "both") else None
        if self.simtier is not None and self.muse_in_ns_features:
            self.simtier_projection = nn.Linear(self.simtier.num_bins, d)
        self.pooled_embeddings = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=s.name, embedding_dim=s.embedding_dim, num_embeddings=s.num_embeddings,
                                       feature_names=list(s.feature_names), init_fn=init,
                                       pooling=PoolingType.MEAN if s.name == "genre" else PoolingType.SUM)
                    for s in specs if s.pooled],
            device=device)
        # Each sequence's events through that sequence's own MLP: item, rating, genres, age.
        event_width = 2 * d + num_genres + 1
        self.event_mlps = nn.ModuleDict({name: mlp([event_width, d, d], config.dropout, last_activation=False)
                                         for name in SEQUENCES})
        # Width of the concatenated NS features (:meth:`_ns_inputs`), the input of every
        # architecture's NS path.
        self.ns_width = len(self.ns_inputs) * d

    def table_specs(self) -> List[TableSpec]:
        """The model's embedding tables as the planner sees them (see ``plans``)."""
        v = self.vocab_sizes
        ns_rows = {"user_id": v["user"], "user_age": v["age"], "user_gender": v["gender"],
                   "user_occupation": v["occupation"], "user_zip": v["zip"], "release_year": v["year"],
                   "event_hour": v["hour"], "event_weekday": v["weekday"]}
        c, d = self.config, self.config.embedding_dim
        specs = onetrans_tables(v["item"], v["user"], d, self.max_seq_len,
                                num_ratings=self.num_ratings, num_genres=self.num_genres, ns_rows=ns_rows)
        item_keys = self._item_keys()
        out = []
        for spec in specs:
            if spec.name == "item":
                if c.item_ids == "none":
                    continue
                spec = dataclasses.replace(
                    spec, feature_names=tuple(item_keys),
                    num_embeddings=min(c.item_hash_rows, v["item"]) if c.item_ids == "hashed" else spec.num_embeddings,
                    ids_per_sample=spec.ids_per_sample + (c.muse_top_k if c.muse != "none" else 0))
            out.append(spec)
        prefixes = [key[:-len("_item")] for key in item_keys]
        if self.sid_levels:
            out += semantic_id_tables(self._codebook_sizes(self.item_codes), d, "sid", prefixes)
        if self.user_sid_levels:
            out += semantic_id_tables(self._codebook_sizes(self.user_codes), d, "usid", ("user",))
        if self.content_dim:
            features = ("target_content",) + (("lifelong_content",) if c.muse != "none" else ())
            out.append(TableSpec("content", v["item"], table_width(self.content_dim), features, trainable=False,
                                 sharding_types=("table_wise", "row_wise"), ids_per_sample=1.0 + 100.0,
                                 description="frozen content vectors (MUSE's multimodal table)"))
        if self.das_dim:
            out.append(TableSpec("das", v["item"] + v["user"], table_width(self.das_dim), ("target_das", "user_das"),
                                 trainable=False, sharding_types=("table_wise", "row_wise"), ids_per_sample=2.0,
                                 description="frozen DAS fused vectors: items, then users"))
        if self.lum_dim:
            out.append(TableSpec("lum", v["user"] * self.lum_conditions + self.lum_folds * v["item"],
                                 table_width(self.lum_dim),
                                 ("lum_interest", "lum_item"), trainable=False,
                                 sharding_types=("table_wise", "row_wise"), ids_per_sample=2.0,
                                 description="frozen LUM vectors: user x condition interests, then items"))
        if self.lum_events is not None:
            out.append(TableSpec("lum_event", int(self.lum_events.numel()), table_width(self.lum_dim),
                                 ("lum_event_interest",), trainable=False, sharding_types=("table_wise", "row_wise"),
                                 ids_per_sample=1.0,
                                 description="frozen LUM point-in-time interests of training events (not exported)"))
        return out

    # ------------------------------------------------------------ side inputs
    _SIDE_KEYS = ("content", "item_codes", "user_codes", "item_fused", "user_fused", "lum_interest", "lum_item",
                  "lum_item_condition", "lum_event", "lum_event_interest", "lum_user_fold")
    #: Side inputs that only training reads (per-event features of training events):
    #: an exported ranker is built without them.
    TRAINING_ONLY_SIDE_KEYS = ("lum_event", "lum_event_interest")
    #: LUM set entries that only some sets have (point-in-time interests, cross-fit folds).
    _OPTIONAL_LUM_KEYS = TRAINING_ONLY_SIDE_KEYS + ("lum_user_fold",)

    def _check_side(self, side: Dict[str, torch.Tensor]) -> None:
        c, v = self.config, self.vocab_sizes
        unknown = sorted(set(side) - set(self._SIDE_KEYS))
        if unknown:
            raise ValueError(f"unknown side inputs {unknown}; expected some of {self._SIDE_KEYS}")
        needs = {"content": bool(c.content), "item_codes": bool(c.sid), "item_fused": bool(c.das),
                 "user_fused": bool(c.das), "lum_interest": bool(c.lum), "lum_item": bool(c.lum),
                 "lum_item_condition": bool(c.lum)}
        for key, needed in needs.items():
            if needed and key not in side:
                raise ValueError(f"the model config asks for {key!r} (model.sid / model.das / model.content) but "
                                 "no such side input was given")
        folds = int(side["lum_user_fold"].max()) + 1 if "lum_user_fold" in side else 1
        for key, rows in (("content", v["item"]), ("item_codes", v["item"]), ("item_fused", v["item"]),
                          ("user_codes", v["user"]), ("user_fused", v["user"]), ("lum_item", folds * v["item"]),
                          ("lum_item_condition", v["item"]), ("lum_user_fold", v["user"])):
            if key in side and side[key].shape[0] != rows:
                raise ValueError(f"side input {key!r} has {side[key].shape[0]} rows, the data has {rows}")
        paired = ("lum_event" in side) == ("lum_event_interest" in side)
        if not paired or ("lum_event" in side and "lum_interest" not in side):
            raise ValueError("point-in-time LUM inputs come as lum_event + lum_event_interest, with lum_interest")
        if "lum_event" in side:
            events = side["lum_event"]
            if events.shape[0] != side["lum_event_interest"].shape[0] or bool((events[1:] <= events[:-1]).any()):
                raise ValueError("lum_event must be ascending store event ids, one per lum_event_interest row")

    @staticmethod
    def _codebook_sizes(codes: torch.Tensor) -> List[int]:
        return [int(codes[:, level].max()) + 1 for level in range(codes.shape[1])]

    def _item_keys(self) -> List[str]:
        return ["target_item", "liked_item", "other_item"] + (
            [LIFELONG_KEY] if self.config.muse != "none" else [])

    def _extra_ns_inputs(self) -> Tuple[str, ...]:
        extra: List[str] = []
        if self.sid_levels and self.config.item_ids != "none":
            extra.append("target_sid")  # with no ID table the target's SIDs ARE its item vector
        if self.user_sid_levels:
            extra.append("user_sid")
        if self.das_dim:
            extra += ["das_item", "das_user"]
        if self.lum_dim:
            extra += ["lum_interest", "lum_similarity"]
        if self.muse_in_ns_features:
            extra += (["muse_simtier"] if self.config.muse in ("simtier", "both") else []) + (
                ["muse_sata"] if self.config.muse in ("sata", "both") else [])
        return tuple(extra)

    def ns_feature_groups(self) -> Dict[str, Tuple[str, ...]]:
        """:data:`NS_GROUPS` with the side features the model reads added to their group."""
        groups = {g: tuple(f) for g, f in NS_GROUPS.items()}
        extra = set(self.ns_inputs) - set(_NS_INPUTS)
        add = {"item": ("target_sid", "das_item"), "user": ("user_sid", "das_user", "lum_interest", "lum_similarity"),
               "lifelong": ("muse_simtier", "muse_sata")}
        for group, keys in add.items():
            chosen = tuple(k for k in keys if k in extra)
            if chosen:
                groups[group] = groups.get(group, ()) + chosen
        return groups

    @staticmethod
    def side_inputs_from_state(state: Dict[str, torch.Tensor], vocab_sizes: Dict[str, int],
                               widths: Optional[Dict[str, int]] = None) -> Dict[str, torch.Tensor]:
        """The ``side`` inputs a saved state dict carries (semantic-ID code buffers, frozen
        content / DAS / LUM tables), so an exported ranker rebuilds without the dataset's sets.

        ``widths`` (:meth:`side_widths` of the saved model) cuts the frozen tables' padding
        columns off; without it the tables come back padded to a multiple of 4 columns."""
        side: Dict[str, torch.Tensor] = {}
        for key in ("item_codes", "user_codes"):
            if key in state:
                side[key] = state[key]

        def frozen(name: str) -> Optional[torch.Tensor]:
            weight = state.get(f"{name}_embeddings.embeddings.{name}.weight")
            return weight[:, :widths[name]] if weight is not None and widths else weight

        content = frozen("content")
        if content is not None:
            side["content"] = content
        das = frozen("das")
        if das is not None:
            side["item_fused"], side["user_fused"] = das[:vocab_sizes["item"]], das[vocab_sizes["item"]:]
        lum = frozen("lum")
        if lum is not None:
            folds = 1
            if state.get("lum_user_fold") is not None:
                side["lum_user_fold"] = state["lum_user_fold"]
                folds = int(state["lum_user_fold"].max()) + 1
            items = folds * vocab_sizes["item"]
            side["lum_interest"], side["lum_item"] = lum[:-items], lum[-items:]
            side["lum_item_condition"] = state["lum_item_condition"]
        return side

    def side_widths(self) -> Dict[str, int]:
        """The frozen tables' widths before padding (what :meth:`side_inputs_from_state` cuts to)."""
        return {"content": self.content_dim, "das": self.das_dim, "lum": self.lum_dim}

    def frozen_table_weights(self) -> Dict[str, torch.Tensor]:
        """Rows of the frozen tables (content, DAS vectors), written after sharding."""
        return {name: _pad_columns(w, table_width(w.shape[1])) for name, w in self._frozen_weights.items()}

    # ----------------------------------------------------------------- features
    def _features(self, batch: RankingBatch) -> Dict[str, torch.Tensor]:
        """Looks every table up once: per-candidate NS embeddings ``(C, D)`` and, per
        sequence, its event vectors ``(n, D)`` (request after request, oldest first)."""
        d = self.config.embedding_dim
        seq = self.sequence_embeddings(self._sequence_input(batch))
        pooled = self.pooled_embeddings(batch.pooled).to_dict()
        first = batch.first_candidate
        out: Dict[str, torch.Tensor] = {k: pooled[k][:, :d] for k in NS_FEATURES + ("target_genres",)}
        items_by_key = self._item_vectors(batch, seq, out)
        out["target_item"] = items_by_key["target_item"]
        if LIFELONG_KEY in items_by_key:
            out["lifelong_item"] = items_by_key[LIFELONG_KEY]
        # Every frozen table is looked up once per batch (MUSE reads the content rows from here).
        frozen = self._frozen_lookup(batch) if (self.content_dim or self.das_dim or self.lum_dim) else {}
        if self.content_dim and self.config.muse != "none":
            out["target_content"], out["lifelong_content"] = frozen["target_content"], frozen["lifelong_content"]
        if self.das_dim:
            out["das_item"] = self.das_projections["das_item"](frozen["target_das"])
            out["das_user"] = self.das_projections["das_user"](frozen["user_das"])
        if self.lum_dim:
            interest, item = frozen["lum_interest"], frozen["lum_item"]
            similarity = F.cosine_similarity(interest, item, dim=-1, eps=1e-8).unsqueeze(-1)
            if self.lum_folds == 1:
                out["lum_interest"] = self.lum_projections["lum_interest"](interest)
            else:
                fold = self.lum_user_fold[batch.pooled["user_id"].values()].unsqueeze(-1)
                out["lum_interest"] = sum((fold == k) * self.lum_projections[f"lum_interest_fold{k}"](interest)
                                          for k in range(self.lum_folds))
            out["lum_similarity"] = self.lum_projections["lum_similarity"](similarity)
        for name in SEQUENCES:
            # Profiles sit on first candidate rows: broadcast each request's to its candidates.
            out[f"{name}_genres"] = pooled[f"{name}_genres"][:, :d][first][batch.request_index]
            items = items_by_key[f"{name}_item"]
            ratings = seq[f"{name}_rating"].values()[:, :d]
            request_of_event = torch.repeat_interleave(torch.arange(batch.num_requests, device=items.device),
                                                       batch.sequence_lengths(name))
            gap = _log_hours(batch.request_time[request_of_event] - batch.event_time[name])
            out[f"{name}_events"] = self.event_mlps[name](
                torch.cat([items, ratings, batch.event_genres[name], gap], dim=-1))
            out[f"{name}_request"] = request_of_event
        return out

    def _sequence_input(self, batch: RankingBatch) -> KeyedJaggedTensor:
        """``batch.sequence`` as the item/rating tables read it: item ids hashed or dropped
        as ``item_ids`` says, keys the model does not read dropped."""
        kjt = batch.sequence
        if self.config.item_ids == "full" and list(kjt.keys()) == self._sequence_features:
            return kjt
        jt = kjt.to_dict()
        rows = self.config.item_hash_rows
        values, lengths = [], []
        for key in self._sequence_features:
            ids = jt[key].values()
            values.append(ids % rows if self.config.item_ids == "hashed" and key.endswith("_item") else ids)
            lengths.append(jt[key].lengths())
        return KeyedJaggedTensor.from_lengths_sync(self._sequence_features, torch.cat(values), torch.cat(lengths))

    def _item_vectors(self, batch: RankingBatch, seq: Dict, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``(n, D)`` vectors of every item key's ids: the ID table's row (unless
        ``item_ids = none``) plus the sum of its semantic-ID levels; the target's and the
        user's SID sums also go to ``out`` (``target_sid``, ``user_sid``)."""
        d = self.config.embedding_dim
        keys = self._item_keys()
        vectors = {k: seq[k].values()[:, :d] for k in keys} if self.config.item_ids != "none" else {}
        if not (self.sid_levels or self.user_sid_levels):
            return vectors
        jt = batch.sequence.to_dict()
        sid_keys, sid_values, sid_lengths = [], [], []
        for key in keys if self.sid_levels else []:
            ids = jt[key].values()
            for level in range(self.sid_levels):
                sid_keys.append(f"{key[:-len('_item')]}_sid{level}")
                sid_values.append(self.item_codes[ids, level])
                sid_lengths.append(jt[key].lengths())
        user = batch.pooled["user_id"].values()
        for level in range(self.user_sid_levels):
            sid_keys.append(f"user_usid{level}")
            sid_values.append(self.user_codes[user, level])
            sid_lengths.append(batch.pooled["user_id"].lengths())
        looked_up = self.sid_embeddings(KeyedJaggedTensor.from_lengths_sync(
            sid_keys, torch.cat(sid_values), torch.cat(sid_lengths)))
        for key in keys if self.sid_levels else []:
            prefix = key[:-len("_item")]
            sid = sum(looked_up[f"{prefix}_sid{level}"].values()[:, :d] for level in range(self.sid_levels))
            if key == "target_item" and self.config.item_ids != "none":
                out["target_sid"] = sid
                continue
            vectors[key] = vectors[key] + sid if key in vectors else sid
        if self.user_sid_levels:
            out["user_sid"] = sum(looked_up[f"user_usid{level}"].values()[:, :d]
                                  for level in range(self.user_sid_levels))
        return vectors

    def _frozen_lookup(self, batch: RankingBatch) -> Dict[str, torch.Tensor]:
        """Frozen-table rows: ``target_content`` / ``lifelong_content`` (content) and
        ``target_das`` / ``user_das`` (DAS vectors; users after the items)."""
        jt = batch.sequence.to_dict()
        out: Dict[str, torch.Tensor] = {}
        requests = []
        if self.content_dim:
            keys = ["target_content"] + (["lifelong_content"] if self.config.muse != "none" else [])
            sources = [jt["target_item"]] + ([jt[LIFELONG_KEY]] if self.config.muse != "none" else [])
            requests.append((self.content_embeddings, keys, [j.values() for j in sources],
                             [j.lengths() for j in sources], self.content_dim))
        if self.das_dim:
            user = batch.pooled["user_id"]
            requests.append((self.das_embeddings, ["target_das", "user_das"],
                             [jt["target_item"].values(), user.values() + self.vocab_sizes["item"]],
                             [jt["target_item"].lengths(), user.lengths()], self.das_dim))
        if self.lum_dim:
            target, user = jt["target_item"], batch.pooled["user_id"]
            condition = self.lum_item_condition[target.values()]
            # Event conditions (REQUEST_CONDITION_CODES) come from the sample's event, not the
            # item (one target per sample, so the pooled features line up with the targets).
            hour, weekday = batch.pooled["event_hour"].values(), batch.pooled["event_weekday"].values()
            condition = torch.where(condition == REQUEST_CONDITION_CODES["hour"], hour // HOUR_BUCKET, condition)
            condition = torch.where(condition == REQUEST_CONDITION_CODES["weekday"], weekday, condition)
            interest_row = user.values() * self.lum_conditions + condition
            item_row = target.values() + self.vocab_sizes["user"] * self.lum_conditions
            if self.lum_user_fold is not None:
                item_row = item_row + self.lum_user_fold[user.values()] * self.vocab_sizes["item"]
            requests.append((self.lum_embeddings, ["lum_interest", "lum_item"], [interest_row, item_row],
                             [target.lengths(), target.lengths()], self.lum_dim))
        at_event = None
        if self.lum_event_embeddings is not None:
            # Samples of training events read the interest their event had (point in time).
            row = torch.searchsorted(self.lum_events, batch.event).clamp(max=self.lum_events.numel() - 1)
            at_event = self.lum_events[row] == batch.event
            requests.append((self.lum_event_embeddings, ["lum_event_interest"], [row[at_event]],
                             [at_event.to(torch.int32)], self.lum_dim))
        for module, keys, values, lengths, width in requests:
            looked_up = module(KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths)))
            # Frozen: no gradient flows into the table.
            out.update({k: looked_up[k].values()[:, :width].detach() for k in keys})
        if at_event is not None:
            out["lum_interest"] = out["lum_interest"].index_put((at_event.nonzero().view(-1),),
                                                                out.pop("lum_event_interest"))
        return out

    def _muse(self, batch: RankingBatch, f: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """MUSE over the lifelong sequence: GSU top-K by content similarity, then SimTier
        ``(C, 21)`` and / or SA-TA ``(C, D)``."""
        lengths = batch.sequence_lengths("lifelong")
        top = gsu_top_k(f["target_content"], f["lifelong_content"], lengths, batch.request_index,
                        self.config.muse_top_k)
        out = {}
        if self.simtier is not None:
            out["muse_simtier"] = self.simtier(top.similarity, top.valid)
        if self.sata is not None:
            behaviours = f["lifelong_item"][top.index]
            out["muse_sata"] = self.sata(f["target_item"], behaviours, top.similarity, top.valid)
        return out

    def _ns_inputs(self, f: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([f[k] for k in self.ns_inputs], dim=-1)  # (C, |NS| * D)

    def lookup(self, batch: RankingBatch) -> Dict[str, torch.Tensor]:
        """Every feature the architectures read (:meth:`_features`), with MUSE's lifelong
        features added: projected NS features ``muse_simtier`` / ``muse_sata`` ``(C, D)``,
        or (when MUSE goes to the tower) their concatenation ``muse_tower``."""
        f = self._features(batch)
        if self.config.muse == "none":
            return f
        muse = self._muse(batch, f)
        if self.muse_in_ns_features:
            if "muse_simtier" in muse:
                muse["muse_simtier"] = self.simtier_projection(muse["muse_simtier"])
            f.update(muse)
        else:
            f["muse_tower"] = torch.cat(list(muse.values()), dim=-1)
        return f

    def _tower(self, width: int) -> nn.Sequential:
        """The final MLP: ``(C, width)`` -> ``(C, 1)`` like-logit."""
        c = self.config
        return nn.Sequential(mlp([width, *c.tower_dims], c.dropout), nn.Linear(c.tower_dims[-1], 1))

    # ----------------------------------------------------------------- training
    def predict(self, batch: RankingBatch) -> torch.Tensor:
        """``(C,)`` like-logits of every candidate."""
        raise NotImplementedError

    def forward(self, batch: RankingBatch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Training step: ``(loss, stats)``; the loss is the mean binary cross-entropy of
        the like-logits."""
        loss = F.binary_cross_entropy_with_logits(self.predict(batch), batch.label)
        return loss, {"bce": loss.detach(), "loss": loss.detach(),
                      "samples": torch.tensor(float(batch.num_candidates), device=loss.device)}


def merged_history(batch: RankingBatch, f: Dict[str, torch.Tensor], tokens: Dict[str, torch.Tensor], merge: str,
                   left: bool, sep_tokens: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both behaviour sequences of each request as one padded sequence: interleaved by
    time, or concatenated, each closed by its [SEP] token.

    Args:
        batch (RankingBatch): the batch (event and request times).
        f (Dict[str, torch.Tensor]): :meth:`Ranker.lookup`'s features; reads
            ``<sequence>_request``, the request of every event.
        tokens (Dict[str, torch.Tensor]): per sequence, the ``(n_s, D)`` tokens of its events.
        merge (str): ``timestamp`` (interleaved by time) or ``sep`` (concatenated).
        left (bool): pad on the left (the most recent events line up) or on the right.
        sep_tokens (Optional[torch.Tensor]): ``(len(SEQUENCES), D)`` [SEP] tokens of ``sep``,
            timestamped with the request.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: tokens ``(R, L, D)``, valid
        ``(R, L)`` bool and int64 timestamps ``(R, L)``.
    """
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
            parts.append(sep_tokens[i].expand(r, -1))
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


def count_table_parameters(model: Ranker) -> Dict[str, int]:
    """Trainable table parameters (rows x columns) per table, plus ``item_representation``:
    the item-ID table and the semantic-ID tables together."""
    out = {s.name: s.num_embeddings * s.embedding_dim for s in model.table_specs() if s.trainable}
    out["item_representation"] = sum(v for k, v in out.items() if k == "item" or k.startswith("sid_"))
    return out


def count_dense_parameters(model: nn.Module) -> int:
    """Parameters outside the embedding tables."""
    return sum(p.numel() for n, p in model.named_parameters()
               if "embeddings" not in n and not n.startswith(("sequence_embeddings", "pooled_embeddings")))

