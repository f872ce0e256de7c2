"""Each model's embedding tables, declared as data (:class:`~torchrec_genrec.table_spec.TableSpec`).

:mod:`torchrec_genrec.plans` turns these declarations into planner constraints and a
sharding plan (``genrec plan --model NAME`` plans :data:`MODEL_TABLES`); the models build
their collections from the same declarations.

- **Generative retrieval (HSTU, SASRec)**: one unified token table (special tokens, every
  item, every action). It is the big one (a billion items at D=256 is a terabyte), looked
  up by the history, the sampled negatives and the full catalogue: row-wise, so each rank
  holds a slice of rows and lookups spread evenly.
- **OneTrans ranking**: the shared S-token tables (item id, shared by the target and every
  behaviour-sequence event; rating/action) are large or hot and row-wise; each NS-token
  feature (user id, age, gender, occupation, zip prefix, release year, hour, weekday) has
  its own small table: table-wise (one rank owns it) or data-parallel (replicated, CUDA
  only for sequence tables), and the planner picks by cost.
- **Content embeddings**: precomputed multimodal vectors per item, frozen: no optimiser
  state, placed row-wise or table-wise like any other table.
- **Semantic IDs**: one sub-table per level of the codes (a multi-group table).

Example::

    tables = retrieval_tables(num_items=10**9, num_actions=5, embedding_dim=256, max_seq_len=1024)
    tables += content_tables(num_items=10**9, embedding_dim=128)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_genrec.modules.onetrans import OneTrans, OneTransConfig
from torchrec_genrec.table_spec import TableSpec, table_width
from torchrec_genrec.tokens import TokenSpace

__all__ = ["DenseBank", "MODEL_TABLES", "RETRIEVAL_FEATURES", "TOKEN_TABLE", "content_tables", "ns_bank_table",
           "semantic_id_retrieval_tables",
           "onetrans_dense_banks", "onetrans_tables", "retrieval_tables", "semantic_id_tables", "table_width"]

#: Name of the unified token table of the generative-retrieval models.
TOKEN_TABLE = "tokens"
#: The features that look it up: history item tokens, history action tokens (summed
#: mode), sampled negatives, and the catalogue (full-catalogue scoring).
RETRIEVAL_FEATURES = ("history", "history_actions", "negatives", "catalog")


def retrieval_tables(num_items: int, num_actions: int, embedding_dim: int, max_seq_len: int,
                     num_negatives: int = 128, interleaved: bool = False) -> List[TableSpec]:
    """The unified token table of HSTU / SASRec generative retrieval.

    Args:
        num_items (int): catalogue size.
        num_actions (int): action vocabulary (0: item tokens only).
        embedding_dim (int): model width (stored rounded up to a multiple of 4).
        max_seq_len (int): longest history, for the planner's lookups-per-sample estimate.
        num_negatives (int): sampled negatives per sample.
        interleaved (bool): item and action tokens interleaved (two tokens per event).
    """
    per_event = 2 if interleaved and num_actions else 1
    return [TableSpec(
        TOKEN_TABLE, TokenSpace.build(num_items=num_items, num_actions=num_actions).size, table_width(embedding_dim), RETRIEVAL_FEATURES,
        sharding_types=("row_wise", "table_wise"), ids_per_sample=float(per_event * max_seq_len + num_negatives),
        description="unified token space: special tokens, items, actions")]


def semantic_id_retrieval_tables(num_items: int, num_actions: int, embedding_dim: int, max_seq_len: int,
                                 levels: int, codebook_size: int, with_item_ids: bool = False,
                                 num_negatives: int = 128) -> List[TableSpec]:
    """The single token table of semantic-ID generative retrieval: special tokens, actions,
    and ``levels`` code levels of ``codebook_size`` codes plus a disambiguation level of
    as many (items sharing a full code path are told apart by it) — rows independent of
    the catalogue size. ``with_item_ids`` adds the item-ID tokens too (``item_repr =
    id+sid``). Every history event looks up ``levels + 1`` code tokens.
    """
    space = TokenSpace.build(num_items=num_items if with_item_ids else 0, num_actions=num_actions)
    rows = space.size + (levels + 1) * codebook_size
    per_event = levels + 1 + (1 if with_item_ids else 0)
    return [TableSpec(
        TOKEN_TABLE, rows, table_width(embedding_dim), RETRIEVAL_FEATURES, sharding_types=("row_wise", "table_wise"),
        ids_per_sample=float(per_event * max_seq_len + num_negatives),
        description=f"unified token space: special tokens, actions, {levels}+1 semantic-ID levels of "
                    f"{codebook_size} codes{', items' if with_item_ids else ''}")]


def onetrans_tables(num_items: int, num_users: int, embedding_dim: int, max_seq_len: int,
                    num_ratings: int = 5, num_genres: int = 19,
                    ns_rows: Optional[Dict[str, int]] = None) -> List[TableSpec]:
    """The ranking models' tables on MovieLens-style ranking features (the keys of
    :class:`~torchrec_genrec.batch.RankingBatch`); OneTrans, DCNv2+DIN and the HSTU ranker
    share them.

    The S-token tables are shared: one item table looked up by the target and by every
    behaviour sequence, one rating table for every sequence's events, one genre table
    (sum-pooled bags) for the target's and the sequences' genre profiles. Each NS-token
    feature has a table of its own.

    Args:
        max_seq_len (int): events per behaviour sequence (two sequences).
        ns_rows (Optional[Dict[str, int]]): rows of each NS feature's table (from the
            data's vocabularies); defaults sized for MovieLens.
    """
    d = table_width(embedding_dim)
    shared = [
        TableSpec("item", num_items, d, ("target_item", "liked_item", "other_item"),
                  sharding_types=("row_wise", "table_wise"), ids_per_sample=1.0 + 2 * max_seq_len,
                  description="S-token: item id, shared by the target and both sequences"),
        TableSpec("rating", num_ratings + 1, d, ("liked_rating", "other_rating"), sharding_types=("table_wise",),
                  ids_per_sample=2.0 * max_seq_len, description="S-token: rating of each event (0 = padding)"),
        TableSpec("genre", num_genres + 1, d, ("target_genres", "liked_genres", "other_genres"),
                  sharding_types=("table_wise", "data_parallel"), pooled=True,
                  ids_per_sample=2.0 * (1 + 2 * max_seq_len), description="multi-hot genres, pooled per bag"),
    ]
    rows = {"user_id": num_users, "user_age": 8, "user_gender": 3, "user_occupation": 22, "user_zip": 1000,
            "release_year": 128, "event_hour": 24, "event_weekday": 7}
    rows.update(ns_rows or {})
    ns = [TableSpec(name, n, d, (name,),
                    sharding_types=("row_wise", "table_wise") if name == "user_id" else ("table_wise", "data_parallel"),
                    pooled=True, description="NS-token feature (own table)") for name, n in rows.items()]
    return shared + ns


@dataclasses.dataclass(frozen=True)
class DenseBank:
    """A stacked dense weight bank of the model and where it lives (the planner places
    only tables; dense banks are declared here so a plan states them too).

    Args:
        name (str): parameter group.
        shape (Tuple[int, ...]): ``(L_NS, per-token parameters)`` for a per-token bank.
        placement (str): ``data_parallel`` (replicated, gradients all-reduced) or
            ``table`` (held as a TorchRec table indexed by token, placed by the planner).
    """

    name: str
    shape: Tuple[int, ...]
    placement: str = "data_parallel"

    @property
    def num_bytes(self) -> int:
        n = 4
        for s in self.shape:
            n *= s
        return n


def onetrans_dense_banks(embedding_dim: int, num_ns_tokens: int, num_layers: int,
                         ffn_dim: Optional[int] = None) -> List[DenseBank]:
    """OneTrans's dense weights: the shared S-token set per layer, and the per-token NS
    banks ``[L_NS, ...]`` (QKV, output projection, FFN, norms of every NS token), counted
    from the module itself.

    Placement trade-off: a replicated bank costs every rank its full size and an
    all-reduce of its gradient per step, but its lookup is free (every token's weights are
    local). Held as a TorchRec table indexed by token (one row per NS token and layer),
    the planner can shard it like any table, which pays off only once ``L_NS x per-token
    size`` is a sizeable share of a rank's memory — at the paper's scale (tens of NS
    tokens, D ~ 256-1024) a bank is tens to hundreds of MiB, so replication is the default.
    """
    with torch.device("meta"):
        model = OneTrans(OneTransConfig(embedding_dim=embedding_dim, num_layers=num_layers, num_heads=1,
                                        num_ns_tokens=num_ns_tokens, ffn_dim=ffn_dim))
    shared = sum(p.numel() for n, p in model.named_parameters() if ".s_weights." in n)
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if ".ns_weights." in n or n.startswith("final_norm")) // num_ns_tokens
    return [DenseBank("s_token_weights (shared by all S-tokens)", (shared,)),
            DenseBank("ns_token_weights (one set per NS-token)", (num_ns_tokens, per_token))]


def ns_bank_table(bank: DenseBank, num_layers: int) -> TableSpec:
    """The per-token bank as a TorchRec table (one row per NS token and layer), for the
    planner to place when replication is too costly."""
    tokens, per_token = bank.shape
    per_layer = -(-per_token // num_layers)
    return TableSpec("ns_token_weights", tokens * num_layers, table_width(per_layer), ("ns_token",),
                     sharding_types=("row_wise", "table_wise"), pooled=True, ids_per_sample=float(tokens * num_layers),
                     description="OneTrans per-NS-token weights, one row per token and layer")


def content_tables(num_items: int, embedding_dim: int) -> List[TableSpec]:
    """A frozen table of precomputed content (e.g. multimodal) vectors, one row per item."""
    return [TableSpec("content", num_items, table_width(embedding_dim), ("content_item",),
                      sharding_types=("row_wise", "table_wise"), trainable=False, ids_per_sample=1.0,
                      description="frozen precomputed content embeddings")]


def semantic_id_tables(codebook_sizes: Sequence[int], embedding_dim: int, prefix: str = "sid",
                       features: Sequence[str] = ("target", "liked", "other")) -> List[TableSpec]:
    """One sub-table per level (the multi-group table): ``{prefix}_l{l}`` with
    ``codebook_sizes[l]`` rows, read by the features ``{f}_{prefix}{l}``."""
    return [TableSpec(f"{prefix}_l{level}", int(rows), table_width(embedding_dim),
                      tuple(f"{f}_{prefix}{level}" for f in features), sharding_types=("table_wise", "row_wise"),
                      ids_per_sample=1.0, description=f"semantic-ID level {level} ({rows} codes)")
            for level, rows in enumerate(codebook_sizes)]


#: Table declarations ``genrec plan --model NAME`` knows, as functions of
#: ``(num_items, num_users, embedding_dim, max_seq_len, num_actions)``.
MODEL_TABLES: Dict[str, Callable[..., List[TableSpec]]] = {
    "hstu": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: retrieval_tables(
        num_items, num_actions, embedding_dim, max_seq_len),
    "sasrec": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: retrieval_tables(
        num_items, num_actions, embedding_dim, max_seq_len),
    "onetrans": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: onetrans_tables(
        num_items, num_users, embedding_dim, max_seq_len, num_ratings=num_actions),
    "hstu-sid": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions, levels=4, codebook_size=1024:
        semantic_id_retrieval_tables(num_items, num_actions, embedding_dim, max_seq_len, levels, codebook_size),
}
