"""The generic reader: any CSV/TSV event log, one event per line.

Errors that another reader argument would fix (a ``delimiter``, a ``user_col`` ...) are
:class:`~torchrec_genrec.data.readers.arguments.ReaderArgumentError`, which name the
argument for whoever called the reader.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc
from iopath.common.file_io import g_pathmgr

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER, Interactions
from torchrec_genrec.data.readers._parsing import (
    CANDIDATE_DELIMITERS,
    EXCERPT_CHARS,
    Field,
    Kind,
    Layout,
    PathLike,
    Source,
    arrow_read,
    check_ids,
    delimiter_guess,
    delimiter_message,
    fail,
    file_source,
    first_line,
    local_path,
    parse_int64,
    parse_iso,
    read_header,
    sniff_types,
    split,
)
from torchrec_genrec.data.readers.arguments import Arg, MessagePart, ReaderArgumentError, Settings

__all__ = ["read_interactions"]

# The reader's parameter for each role's column.
_ROLE_PARAMS = {USER: "user_col", ITEM: "item_col", TIMESTAMP: "timestamp_col", ACTION: "action_col"}
# Without a header, the default column names stand for these positions.
_DEFAULT_POSITIONS = {USER: 0, ITEM: 1, TIMESTAMP: 2, ACTION: 3}
# Header words that hint at a role, for "did you mean" suggestions.
_ROLE_WORDS = {
    USER: ("user", "uid", "customer", "visitor", "session"),
    ITEM: ("item", "iid", "movie", "product", "article", "video", "song", "track"),
    TIMESTAMP: ("time", "ts", "date", "when"),
    ACTION: ("rating", "action", "event", "label", "behavior", "behaviour", "type"),
}
# Loose shape of the values _timestamps_to_int accepts; Python's parser has the last word.
_TIMESTAMP_RE = (
    r"^\s*(-?\d+(\.\d*)?([eE][+-]?\d+)?"
    r"|\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}([.,]\d+)?)?)?)?\s*([Zz]|[+-]\d{2}(:?\d{2})?)?)\s*$"
)
_CONVERSION_RE = re.compile(r"In CSV column #(\d+): CSV conversion error")
_INT_RE = re.compile(r"\s*-?[0-9]+\s*\Z")
_NUMBER_RE = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*\Z")


def _delimiter_hint(guess: str) -> List[MessagePart]:
    return [" (pass ", Arg("delimiter", guess), ")"]


def _infer_delimiter(path: str, src: Source) -> str:
    ext = os.path.splitext(path.lower())[1]
    if ext == ".csv":
        return ","
    if ext in (".tsv", ".txt", ".tab"):
        return "\t"
    # Unknown extension: the candidate that splits line 1 into the most fields.
    line = first_line(src, "utf-8") or ""
    best = max(CANDIDATE_DELIMITERS, key=lambda c: len(line.split(c)))
    return best if len(line.split(best)) > 1 else ","


def _suggest(role: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        low = n.lower()
        if any(w in low for w in _ROLE_WORDS[role]):
            return n
    return None


def _resolve_columns(
    src: Source,
    names: List[str],
    roles: Dict[str, Union[str, int, None]],
    has_header: bool,
    delimiter: str,
    line: str,
) -> Dict[str, int]:
    """Maps each role (user, item, timestamp, action) to a column position."""
    positions: Dict[str, int] = {}
    missing: List[str] = []
    for role, spec in roles.items():
        if spec is None:
            continue
        param = _ROLE_PARAMS[role]
        if isinstance(spec, int) and not isinstance(spec, bool):
            if not -len(names) <= spec < len(names):
                raise ReaderArgumentError(
                    [Arg(param, spec), f" is out of range: the file has {len(names)} column(s), numbered from 0"],
                    path=src.label,
                    line=1,
                )
            positions[role] = spec % len(names)
        elif has_header:
            if spec in names:
                positions[role] = names.index(spec)
            else:
                missing.append(role)
        elif spec == role and _DEFAULT_POSITIONS[role] < len(names):
            positions[role] = _DEFAULT_POSITIONS[role]
        elif spec == role:
            raise ReaderArgumentError(
                [f"the file has no header and {len(names)} column(s), so the {role} is not in its default "
                 f"column {_DEFAULT_POSITIONS[role]}; give ", Arg(param), " as a 0-based column position"],
                path=src.label,
                line=1,
            )
        else:
            raise ReaderArgumentError(
                ["without a header, give ", Arg(param), f" as a 0-based column position, not {spec!r}"],
                path=src.label,
            )
    if missing:
        guess = delimiter_guess(line, delimiter, True, 0)
        if len(names) == 1 and guess is not None:
            raise ReaderArgumentError(
                [f"found a single column {names[0][:EXCERPT_CHARS]!r}; ",
                 *delimiter_message(line, delimiter, guess, _delimiter_hint(guess))],
                path=src.label,
                line=1,
            )
        parts: List[MessagePart] = [
            f"missing column(s) {[roles[r] for r in missing]}; the header has columns {names}; name them with "
        ]
        for i, role in enumerate(missing):
            parts += [", " if i else "", Arg(_ROLE_PARAMS[role])]
        unused = [n for n in names if n not in roles.values()]
        guesses = [Arg(_ROLE_PARAMS[r], g) for r in missing if (g := _suggest(r, unused)) is not None]
        if guesses:
            parts += [", e.g. ", Settings(tuple(guesses))]
        if all(_NUMBER_RE.match(n) for n in names):
            parts += ["; line 1 looks like data, not a header: if so, pass ", Arg("has_header", False)]
        raise ReaderArgumentError(parts, path=src.label, line=1)
    by_position: Dict[int, str] = {}
    for role, position in positions.items():
        if position in by_position:
            other = by_position[position]
            raise ReaderArgumentError(
                [Arg(_ROLE_PARAMS[other]), " and ", Arg(_ROLE_PARAMS[role]),
                 f" both name column {names[position]!r}; give each its own column"],
                path=src.label,
            )
        by_position[position] = role
    return positions


def _timestamps_to_int(col: pa.ChunkedArray) -> Optional[pa.ChunkedArray]:
    """Text timestamps -> int64 epoch seconds: integers, whole floats or ISO-8601; else None."""
    try:
        return col.cast(pa.int64())
    except pa.ArrowException:
        pass
    try:
        f = col.cast(pa.float64())
        if not pc.all(pc.equal(pc.floor(f), f)).as_py():
            return None
        # Beyond 2**53 float64 rounds: such values are read one by one, integers exactly.
        if pc.all(pc.less_equal(pc.abs(f), 2.0**53)).as_py():
            return f.cast(pa.int64())
    except pa.ArrowException:
        pass
    for ttype in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
        try:
            us = col.cast(ttype).cast(pa.int64())
        except pa.ArrowException:
            continue
        # Floor to whole seconds, also before 1970.
        return pc.floor(pc.divide(us.cast(pa.float64()), 1e6)).cast(pa.int64())
    # Mixed forms (e.g. some with a zone offset, some without): one value at a time, but
    # only once a vectorised check says every value could parse, so that a plain bad
    # value goes straight to the diagnostic pass.
    if not pc.all(pc.match_substring_regex(col, _TIMESTAMP_RE)).as_py():
        return None
    out: List[int] = []
    for v in col.to_pylist():
        if _INT_RE.match(v):
            n = parse_int64(v)  # None beyond int64
        else:
            try:
                x = float(v)
            except ValueError:
                x = float("nan")
            n = int(x) if x.is_integer() and -(2.0**63) <= x < 2.0**63 else parse_iso(v)
        if n is None:
            return None
        out.append(n)
    return pa.chunked_array([pa.array(out, pa.int64())])


def _check_delimiter(delimiter: str, label: str) -> None:
    if not delimiter or any(c in delimiter for c in '\r\n"'):
        raise ReaderArgumentError(
            [Arg("delimiter", delimiter), " cannot separate fields: give one or more characters, none of them a "
             "line break or '\"'"],
            path=label,
        )


def read_interactions(
    path: PathLike,
    *,
    delimiter: Optional[str] = None,
    user_col: Union[str, int] = USER,
    item_col: Union[str, int] = ITEM,
    timestamp_col: Union[str, int] = TIMESTAMP,
    action_col: Union[str, int, None] = None,
    has_header: bool = True,
    id_type: str = "auto",
) -> Interactions:
    """Reads a generic CSV/TSV event log, one event per line.

    The fast path is a single multithreaded ``pyarrow.csv.read_csv`` call with explicit
    types (about a second for 10M four-integer rows). Columns other than the mapped ones are
    kept in ``events`` with pyarrow's inferred types (empty cells make a column text).

    Args:
        path (str): the file (any iopath path or ``file://`` URI).
        delimiter (Optional[str]): one or more characters, e.g. ``","``, ``"\\t"`` or
            MovieLens-1M's ``"::"``; by default ``","`` for ``.csv``, ``"\\t"`` for ``.tsv`` /
            ``.txt``, else sniffed from line 1.
        user_col (Union[str, int]): header name of the user column, or its 0-based position.
        item_col (Union[str, int]): header name or position of the item column.
        timestamp_col (Union[str, int]): header name or position of the timestamp column:
            integers (any unit, larger = later, within int64), whole floats, or ISO-8601
            date-times, which become epoch seconds (naive ones are taken as UTC).
        action_col (Union[str, int, None]): header name or position of an optional action
            column (a rating, an event type, ...); int64, float64 (finite) or string as inferred.
        has_header (bool): whether line 1 names the columns. Without a header, the default
            names stand for positions 0, 1, 2 (and ``"action"`` for 3); other columns are
            named ``column_<i>``.
        id_type (str): ``"int"`` (int64 ids, an error otherwise), ``"string"``, or
            ``"auto"``: int64 when every id is an integer, else string. String ids are at
            most 256 characters.

    Returns:
        Interactions: ``events`` with ``user``, ``item`` (int64 or string), ``timestamp``
        (int64), ``action`` if ``action_col`` is given, then the file's other columns (an
        extra column whose name clashes with these is renamed ``extra_<name>``);
        ``action_name`` is the action column's header name.

    Raises:
        ReaderArgumentError: for input that another argument fixes (a wrong delimiter, a
            column name the header lacks); it names the argument.
        DataError: naming the file and line of the first bad line otherwise.

    Example::

        # events.tsv:
        # uid<TAB>sku<TAB>ts<TAB>event
        # 7<TAB>A12<TAB>2024-05-01T10:00:00Z<TAB>click
        data = read_interactions("events.tsv", user_col="uid", item_col="sku",
                                 timestamp_col="ts", action_col="event")
        data.events.schema.types  # [int64, string, int64, string]
    """
    if id_type not in ("auto", "int", "string"):
        raise ValueError(f"id_type must be 'auto', 'int' or 'string', not {id_type!r}")
    label = os.fspath(path)
    local = local_path(path)
    if not g_pathmgr.isfile(local):
        what = "a directory, not a file" if g_pathmgr.isdir(local) else "no such file"
        raise DataError(
            f"{what}; expected a CSV/TSV event log with columns {user_col!r}, {item_col!r}, {timestamp_col!r}",
            path=label,
        )
    src = file_source(path)
    if delimiter is None:
        delimiter = _infer_delimiter(local, src)
    _check_delimiter(delimiter, label)

    line = first_line(src, "utf-8")
    if line is None:
        raise DataError("no events: the file is empty", path=label)
    if has_header:
        names = read_header(src, delimiter, True)
    else:
        names = [f"column_{i}" for i in range(len(split(line, delimiter, True)))]
    roles: Dict[str, Union[str, int, None]] = {
        USER: user_col, ITEM: item_col, TIMESTAMP: timestamp_col, ACTION: action_col,
    }  # fmt: skip
    if not has_header and len(names) == 1:
        guess = delimiter_guess(line, delimiter, True, 0)
        if guess is not None:
            raise ReaderArgumentError(
                ["found a single column; ", *delimiter_message(line, delimiter, guess, _delimiter_hint(guess))],
                path=label,
                line=1,
            )
    pos = _resolve_columns(src, names, roles, has_header, delimiter, line)

    id_kind, id_arrow = Kind.INT, pa.int64()
    id_hint: Sequence[MessagePart] = (" (pass ", Arg("id_type", "string"), " for text ids)")
    if id_type != "int":
        id_kind, id_arrow, id_hint = Kind.ID, pa.int64() if id_type == "auto" else pa.string(), ()

    def role_label(role: str) -> str:
        name = names[pos[role]]
        return role if name == role else f"{role} column {name!r}"

    fields = [Field(n, label=f"column {n!r}") for n in names]
    for role in (USER, ITEM):
        fields[pos[role]] = Field(names[pos[role]], id_kind, id_arrow, role_label(role), id_hint)
    fields[pos[TIMESTAMP]] = Field(names[pos[TIMESTAMP]], Kind.TIMESTAMP, pa.int64(), role_label(TIMESTAMP))
    if ACTION in pos:
        fields[pos[ACTION]].label = role_label(ACTION)
    layout = Layout(delimiter, fields, header=has_header, quoting=True, delimiter_hint=_delimiter_hint)

    # Fast path first; a conversion error in a column that may legitimately be text
    # (auto ids, ISO timestamps, inferred extras) retries with that column as text.
    sniffed = sniff_types(src, layout)
    for k, arrow_type in sniffed.items():
        fields[k].arrow = arrow_type
    table: Optional[pa.Table] = None
    for _ in range(len(fields) + 1):
        try:
            table = arrow_read(src, layout)
            break
        except (pa.ArrowException, UnicodeDecodeError) as e:
            m = _CONVERSION_RE.search(str(e))
            k = int(m.group(1)) if m else -1
            relax = 0 <= k < len(fields) and (
                (k in (pos[USER], pos[ITEM]) and id_type == "auto" and fields[k].arrow == pa.int64())
                or (k == pos[TIMESTAMP] and fields[k].arrow == pa.int64())
                or (k not in (pos[USER], pos[ITEM], pos[TIMESTAMP])
                    and (fields[k].arrow is None or (k in sniffed and fields[k].arrow != pa.string())))
            )
            if not relax:
                raise fail(src, layout, f"cannot parse the file: {e}") from None
            fields[k].arrow = pa.string()
    if table is None:
        raise fail(src, layout, "cannot parse the file")
    if table.num_rows == 0:
        raise fail(src, layout, "no events: the file has no data lines")

    for role in (USER, ITEM):
        col = table[names[pos[role]]]
        if pa.types.is_string(col.type):
            if pc.any(pc.equal(col, "")).as_py():
                raise fail(src, layout, f"empty {role} ids")
            check_ids(src, layout, col, role)
    ts = table[names[pos[TIMESTAMP]]]
    if not pa.types.is_integer(ts.type):
        converted = _timestamps_to_int(ts)
        if converted is None:
            raise fail(src, layout, "timestamps are neither integers nor ISO-8601 date-times")
        ts = converted

    cols: Dict[str, pa.ChunkedArray] = {USER: table[names[pos[USER]]], ITEM: table[names[pos[ITEM]]], TIMESTAMP: ts}
    if ACTION in pos:
        action = table[names[pos[ACTION]]]
        if pa.types.is_boolean(action.type):
            action = action.cast(pa.int64())
        elif pa.types.is_floating(action.type):
            if not pc.all(pc.is_finite(action)).as_py():
                # The diagnostic pass names the line once it knows the column must be finite.
                finite = dataclasses.replace(fields[pos[ACTION]], kind=Kind.FINITE)
                strict = dataclasses.replace(layout, fields=fields[:pos[ACTION]] + [finite] + fields[pos[ACTION] + 1:])
                raise fail(src, strict, f"{role_label(ACTION)} holds NaN or infinite values")
        elif not (pa.types.is_integer(action.type) or pa.types.is_string(action.type)):
            action = action.cast(pa.string())
        cols[ACTION] = action
    used = set(pos.values())
    for i, n in enumerate(names):
        if i not in used:
            cols[f"extra_{n}" if n in cols or n in (USER, ITEM, TIMESTAMP, ACTION) else n] = table[n]
    action_name = names[pos[ACTION]] if ACTION in pos and has_header else ACTION
    return Interactions(
        pa.table(cols),
        source=label,
        action_name=action_name,
        timestamp_unit="s",
        files={"events": label},
    ).validate()
