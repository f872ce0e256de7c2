"""Each model's embedding tables, declared as data (see :mod:`torchrec_genrec.plans.spec`).

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

Example::

    tables = retrieval_tables(num_items=10**9, num_actions=5, embedding_dim=256, max_seq_len=1024)
    tables += content_tables(num_items=10**9, embedding_dim=128)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torchrec_genrec.plans.spec import TableSpec
from torchrec_genrec.tokens import TokenSpace

__all__ = ["MODEL_TABLES", "TOKEN_TABLE", "RETRIEVAL_FEATURES", "content_tables", "onetrans_tables",
           "retrieval_tables", "table_width"]

#: Name of the unified token table of the generative-retrieval models.
TOKEN_TABLE = "tokens"
#: The features that look it up: history item tokens, history action tokens (summed
#: mode), sampled negatives, and the catalogue (full-catalogue scoring).
RETRIEVAL_FEATURES = ("history", "history_actions", "negatives", "catalog")


def table_width(embedding_dim: int) -> int:
    """Columns a table of model width ``embedding_dim`` is stored in: fbgemm's fused
    tables need a multiple of 4 (the extra columns are never read)."""
    return -(-embedding_dim // 4) * 4


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


def onetrans_tables(num_items: int, num_users: int, embedding_dim: int, max_seq_len: int,
                    num_ratings: int = 5, num_genres: int = 19,
                    ns_rows: Optional[Dict[str, int]] = None) -> List[TableSpec]:
    """The ranking models' tables on MovieLens-style ranking features (the keys of
    :mod:`torchrec_genrec.data.ranking_batching`); OneTrans, DCNv2+DIN and the HSTU ranker
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


def content_tables(num_items: int, embedding_dim: int) -> List[TableSpec]:
    """A frozen table of precomputed content (e.g. multimodal) vectors, one row per item."""
    return [TableSpec("content", num_items, table_width(embedding_dim), ("content_item",),
                      sharding_types=("row_wise", "table_wise"), trainable=False, ids_per_sample=1.0,
                      description="frozen precomputed content embeddings")]


#: Table declarations ``genrec plan --model NAME`` knows, as functions of
#: ``(num_items, num_users, embedding_dim, max_seq_len, num_actions)``.
MODEL_TABLES: Dict[str, Callable[..., List[TableSpec]]] = {
    "hstu": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: retrieval_tables(
        num_items, num_actions, embedding_dim, max_seq_len),
    "sasrec": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: retrieval_tables(
        num_items, num_actions, embedding_dim, max_seq_len),
    "onetrans": lambda num_items, num_users, embedding_dim, max_seq_len, num_actions: onetrans_tables(
        num_items, num_users, embedding_dim, max_seq_len, num_ratings=num_actions),
}
