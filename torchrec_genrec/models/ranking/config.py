"""Configs of the rankers: the shared settings in :class:`RankerConfig`, one small config per
architecture under it (``model.dlrm``, ``model.onetrans``, ``model.hstu``).

Example (TOML, or ``--set model.onetrans.pyramid=none``)::

    [model]
    name = "onetrans"
    embedding_dim = 32

    [model.onetrans]
    num_layers = 2
    pyramid = "none"
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Literal, Tuple

from torchrec_genrec.config import check_ranges

__all__ = ["DLRMConfig", "HSTURankerConfig", "OneTransRankerConfig", "RankerConfig"]


def _check_choices(prefix: str, config: object, choices: Dict[str, Tuple[str, ...]]) -> None:
    for field, allowed in choices.items():
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"{prefix}.{field} must be one of {', '.join(allowed)}, not {value!r}")


@dataclasses.dataclass
class DLRMConfig:
    """The DCNv2 + DIN ranker (``model.dlrm``).

    Args:
        cross_layers (int): DCNv2 cross layers over the non-sequential features.
        din_hidden (int): hidden size of DIN's attention MLP.
    """

    cross_layers: int = 2
    din_hidden: int = 64

    def __post_init__(self) -> None:
        check_ranges("model.dlrm", self, {"cross_layers": (0, None), "din_hidden": (1, None)})


@dataclasses.dataclass
class OneTransRankerConfig:
    """The OneTrans ranker (``model.onetrans``); see :class:`~torchrec_genrec.modules.onetrans.OneTransConfig`.

    Args:
        num_layers (int): transformer blocks.
        num_heads (int): attention heads; must divide ``model.embedding_dim``.
        merge (str): ``timestamp`` (both sequences interleaved by time, plus a
            sequence-type embedding) or ``sep`` (concatenated, each closed by a learnable
            [SEP] token).
        ns_tokenizer (str): ``auto_split`` (one MLP over all NS features, split into
            ``num_ns_tokens`` tokens) or ``group_wise`` (one MLP and token per group of
            :data:`~torchrec_genrec.models.ranking.NS_GROUPS`).
        num_ns_tokens (int): NS tokens of the auto-split tokenizer.
        pyramid (str): ``linear`` or ``none``.
        pyramid_min_s_tokens (int): S-tokens left after the last layer.
        selection (str): which S-tokens a pyramid layer keeps: ``recency``, ``scorer_topk``
            or ``scorer_threshold``.
        shared_ns_params (bool): ablation: NS tokens use the S-tokens' weights.
    """

    num_layers: int = 2
    num_heads: int = 2
    merge: Literal["timestamp", "sep"] = "timestamp"
    ns_tokenizer: Literal["auto_split", "group_wise"] = "auto_split"
    num_ns_tokens: int = 4
    pyramid: Literal["linear", "none"] = "linear"
    pyramid_min_s_tokens: int = 0
    selection: Literal["recency", "scorer_topk", "scorer_threshold"] = "recency"
    shared_ns_params: bool = False

    def __post_init__(self) -> None:
        check_ranges("model.onetrans", self, {"num_layers": (1, None), "num_heads": (1, None),
                                              "num_ns_tokens": (1, None), "pyramid_min_s_tokens": (0, None)})
        _check_choices("model.onetrans", self, {
            "merge": ("timestamp", "sep"), "ns_tokenizer": ("auto_split", "group_wise"),
            "pyramid": ("linear", "none"), "selection": ("recency", "scorer_topk", "scorer_threshold")})


@dataclasses.dataclass
class HSTURankerConfig:
    """The HSTU ranker (``model.hstu``).

    Args:
        num_layers (int): HSTU blocks.
        num_heads (int): attention heads; must divide ``model.embedding_dim``.
        rating_loss_weight (float): weight of the rating-class task.
    """

    num_layers: int = 2
    num_heads: int = 2
    rating_loss_weight: float = 0.5

    def __post_init__(self) -> None:
        check_ranges("model.hstu", self, {"num_layers": (1, None), "num_heads": (1, None),
                                          "rating_loss_weight": (0.0, None)})


@dataclasses.dataclass
class RankerConfig:
    """The ranker (``model``): which architecture, the settings all three share, and each
    architecture's own config.

    Args:
        name (str): ``dlrm`` (DCNv2 + DIN), ``onetrans`` or ``hstu``.
        embedding_dim (int): table and token width D.
        dropout (float): dropout in the towers (and the transformer blocks).
        tower_dims (Tuple[int, ...]): hidden sizes of the final MLP.
        item_ids (str): the item-ID table: ``full`` (one row per item), ``hashed`` (ids
            modulo ``item_hash_rows``: a smaller table that semantic IDs complement) or
            ``none`` (no ID table: semantic IDs replace it; needs ``sid``).
        item_hash_rows (int): rows of the hashed item table.
        sid (str): a side-feature set (``genrec content sid`` / ``genrec content das``) whose
            ``item_codes`` (and ``user_codes``) become semantic-ID tables, one per level,
            summed into every item's (and the user's) representation; empty: none.
        das (str): a DAS side-feature set whose fused item and user vectors (``item_fused``,
            ``user_fused``) are read from a frozen table as extra NS features; empty: none.
        content (str): a content side-feature set (``genrec content embed``) loaded into a
            frozen table (MUSE's multimodal table); needed by ``muse``.
        muse (str): lifelong-interest features from MUSE over the ``lifelong`` sequence
            (``data.task.lifelong_len`` > 0): ``none``, ``simtier``, ``sata`` or ``both``.
        muse_top_k (int): behaviours the GSU retrieves.
        lum (str): a LUM side-feature set (``train.lum.lum_features``): the user's interest
            vector under the target item's condition (an item attribute such as the genre)
            or under the request's condition (its 3-hour bucket or weekday, for a set
            pre-trained on those) and its cosine similarity to the target's LUM embedding
            become NS features (read from a frozen table); empty: none.
        dlrm (DLRMConfig): settings of ``name = "dlrm"``.
        onetrans (OneTransRankerConfig): settings of ``name = "onetrans"``.
        hstu (HSTURankerConfig): settings of ``name = "hstu"``.
    """

    name: Literal["dlrm", "onetrans", "hstu"] = "onetrans"
    embedding_dim: int = 32
    dropout: float = 0.1
    tower_dims: Tuple[int, ...] = (128, 64)
    item_ids: Literal["full", "hashed", "none"] = "full"
    item_hash_rows: int = 256
    sid: str = ""
    das: str = ""
    content: str = ""
    muse: Literal["none", "simtier", "sata", "both"] = "none"
    muse_top_k: int = 50
    lum: str = ""
    dlrm: DLRMConfig = dataclasses.field(default_factory=DLRMConfig)
    onetrans: OneTransRankerConfig = dataclasses.field(default_factory=OneTransRankerConfig)
    hstu: HSTURankerConfig = dataclasses.field(default_factory=HSTURankerConfig)

    def __post_init__(self) -> None:
        check_ranges("model", self, {"dropout": (0.0, 1.0), "tower_dims": (1, None)})
        _check_choices("model", self, {"name": ("dlrm", "onetrans", "hstu"), "item_ids": ("full", "hashed", "none"),
                                       "muse": ("none", "simtier", "sata", "both")})
        if self.embedding_dim < 4:
            raise ValueError(f"model.embedding_dim ({self.embedding_dim}) must be >= 4")
        # Only the transformer that is built splits D into heads.
        heads = {"onetrans": self.onetrans.num_heads, "hstu": self.hstu.num_heads}.get(self.name)
        if heads is not None and self.embedding_dim % heads:
            raise ValueError(f"model.embedding_dim ({self.embedding_dim}) must be divisible by "
                             f"model.{self.name}.num_heads ({heads})")
        if self.item_ids == "none" and not self.sid:
            raise ValueError("model.item_ids = 'none' leaves items with no representation: give model.sid "
                             "(semantic IDs replace the item-ID table)")
        if self.muse != "none" and not self.content:
            raise ValueError(f"model.muse = {self.muse!r} needs model.content (the content vectors its GSU "
                             "compares); build them with `genrec content embed`")
        if self.item_hash_rows < 1 or self.muse_top_k < 1:
            raise ValueError("model.item_hash_rows and model.muse_top_k must be >= 1")
