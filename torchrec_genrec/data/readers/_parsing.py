"""What every reader shares: where files come from, how a delimited file is laid out, the
fast pyarrow read, and the diagnostic pass that names the first bad line.

Large files are parsed by ``pyarrow.csv.read_csv`` (multithreaded, explicit column types).
When pyarrow rejects a file, or a check on the parsed table fails, a slow line-by-line pass
looks for the first bad line so that the :class:`DataError` names the file, the 1-based
line number (the header, if any, is line 1), the offending value and, where the delimiter
looks wrong, the one that fits.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import enum
import io
import math
import os
import re
import urllib.parse
import urllib.request
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from iopath.common.file_io import g_pathmgr

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.readers.arguments import MessagePart, error_from_parts

PathLike = Union[str, "os.PathLike[str]"]

# Delimiters tried when a line does not split into the expected number of fields.
CANDIDATE_DELIMITERS = ("\t", ",", ";", "|", "::")
# pyarrow block size: larger blocks parse a little faster on big files; 4 MiB keeps small
# files to a single block.
BLOCK_SIZE = 1 << 22
EXCERPT_CHARS = 80
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The sequence store keeps string ids in a fixed-width numpy array, so the longest id sets
# the width of every id: a 200,000-character id would make each one take 800 KB.
MAX_ID_CHARS = 256
RIGHT_FILE_HINT = " (is this the right file for this reader?)"

_INT_RE = re.compile(r"\s*-?[0-9]+\s*\Z")
_INT64_RANGE = f"from {INT64_MIN} to {INT64_MAX} (int64)"


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """One readable file: an iopath path or a member of a zip archive.

    Args:
        label (str): what errors show, e.g. ``"ml-1m.zip!ml-1m/ratings.dat"``.
        open (Callable[[], BinaryIO]): a fresh binary file object each call (the
            diagnostic pass reads the file a second time).
    """

    label: str
    open: Callable[[], BinaryIO]


def local_path(path: PathLike) -> str:
    """Maps ``file://`` URIs to local paths; other strings go to iopath unchanged."""
    path = os.fspath(path)
    if path.startswith("file://"):
        parsed = urllib.parse.urlparse(path)
        return urllib.request.url2pathname(parsed.path)
    return path


def file_source(path: PathLike) -> Source:
    label = os.fspath(path)
    local = local_path(path)
    return Source(label, lambda: g_pathmgr.open(local, "rb"))


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


class Container:
    """A dataset folder or a zip archive, searched for files by name.

    Args:
        path (str): the folder or the archive (any iopath path or ``file://`` URI).
        expected (str): what the folder should hold, for errors.

    Example::

        with Container("ml-1m.zip", "expected ratings.dat, ...") as box:
            ratings, movies = box.require(["ratings.dat", "movies.dat"])
    """

    def __init__(self, path: PathLike, expected: str) -> None:
        self.label = os.fspath(path)
        self.expected = expected
        self._local = local_path(path)
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

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def find(self, name: str, prefix: Optional[str] = None) -> Optional[Source]:
        """Returns the file ``name``: ``prefix + name`` in a zip if present, else the
        shallowest member whose base name is ``name``."""
        if self._zip is None:
            path = _join(self.label, name)
            if not g_pathmgr.isfile(local_path(path)):
                return None
            return file_source(path)
        members = self._zip.namelist()
        if prefix is not None and prefix + name in members:
            member = prefix + name
        else:
            matches = [m for m in members if m.rsplit("/", 1)[-1] == name]
            if not matches:
                return None
            member = min(matches, key=lambda m: (m.count("/"), m))
        zf = self._zip
        return Source(f"{self.label}!{member}", lambda: zf.open(member))

    def require(self, names: Sequence[str], prefix: Optional[str] = None) -> List[Source]:
        found = [self.find(n, prefix) for n in names]
        missing = [n for n, s in zip(names, found) if s is None]
        if missing:
            where = "archive" if self._zip is not None else "directory"
            raise DataError(f"{where} lacks {', '.join(missing)}; {self.expected}", path=self.label)
        return [s for s in found if s is not None]


# --------------------------------------------------------------------------- layouts


class Kind(enum.Enum):
    """What a field's values must look like, checked by the diagnostic pass."""

    TEXT = "anything"
    ID = "a non-empty id"
    INT = "an integer"
    FLOAT = "a number"
    FINITE = "a finite number"
    INTEGRAL = "a whole number"
    TIMESTAMP = "an integer or an ISO-8601 date-time"


@dataclasses.dataclass
class Field:
    """One column of a delimited file.

    Args:
        name (str): the column's name in the table pyarrow returns.
        kind (Kind): what its values must look like.
        arrow (Optional[pa.DataType]): its type on the fast path; None lets pyarrow infer.
        label (str): how errors call it, e.g. ``"Rating"``; defaults to ``name``.
        hint (Sequence[MessagePart]): appended to errors about its values.
    """

    name: str
    kind: Kind = Kind.TEXT
    arrow: Optional[pa.DataType] = None
    label: str = ""
    hint: Sequence[MessagePart] = ()

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclasses.dataclass
class Layout:
    """How one delimited file is laid out.

    Args:
        delimiter (str): one or more characters between fields.
        fields (List[Field]): the columns, in file order.
        header (bool): whether line 1 names the columns (it is skipped).
        encoding (str): the text encoding.
        quoting (bool): whether fields may be ``"``-quoted.
        what (str): what a row is, for the "no rows" error, e.g. ``"movies"``.
        delimiter_hint (Callable[[str], Sequence[MessagePart]]): appended to "the delimiter
            looks wrong" errors, given the delimiter that fits.
    """

    delimiter: str
    fields: List[Field]
    header: bool = False
    encoding: str = "utf-8"
    quoting: bool = False
    what: str = "events"
    delimiter_hint: Callable[[str], Sequence[MessagePart]] = lambda guess: ()


def excerpt(text: str) -> str:
    """``repr`` of ``text``, cut to :data:`EXCERPT_CHARS` characters."""
    return repr(text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "...")


def split(text: str, delimiter: str, quoting: bool) -> List[str]:
    if quoting and '"' in text:
        return next(csv.reader([text], delimiter=delimiter)) if len(delimiter) == 1 else text.split(delimiter)
    return text.split(delimiter)


def delimiter_guess(text: str, delimiter: str, quoting: bool, n: int) -> Optional[str]:
    """Another delimiter that splits ``text`` into ``n`` (or, if ``n`` is 0, 2+) fields."""
    for cand in CANDIDATE_DELIMITERS:
        if cand == delimiter:
            continue
        k = len(split(text, cand, quoting))
        if (n and k == n) or (not n and k > 1):
            return cand
    return None


def delimiter_message(text: str, delimiter: str, guess: str, hint: Sequence[MessagePart]) -> List[MessagePart]:
    k = len(text.split(guess))
    return [f"the delimiter looks wrong: this line splits into {k} fields on {guess!r}, not on {delimiter!r}", *hint]


# --------------------------------------------------------------------------- values


def parse_int64(value: str) -> Optional[int]:
    """``value`` as an int64 if it is a decimal integer in range (spaces allowed), else None."""
    if not _INT_RE.match(value):
        return None
    # Checked before int(): Python refuses to convert more than 4300 digits.
    if len(value.strip().lstrip("-").lstrip("0")) > 19:
        return None
    n = int(value)
    return n if INT64_MIN <= n <= INT64_MAX else None


def parse_iso(value: str) -> Optional[int]:
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


def _whole_number_problem(value: str) -> Optional[str]:
    if _INT_RE.match(value):
        return None if parse_int64(value) is not None else f"is out of range: whole numbers here are {_INT64_RANGE}"
    if "_" in value:
        return f"is not {Kind.INTEGRAL.value}"
    try:
        x = float(value)
    except ValueError:
        return f"is not {Kind.INTEGRAL.value}"
    if not x.is_integer():
        return f"is not {Kind.INTEGRAL.value}"
    if not INT64_MIN <= x < 2.0**63:
        return f"is out of range: whole numbers here are {_INT64_RANGE}"
    return None


def value_problem(value: str, kind: Kind) -> Optional[str]:
    """What is wrong with ``value`` as a ``kind`` (e.g. ``"is not an integer"``), or None."""
    if kind is Kind.TEXT:
        return None
    if kind is Kind.ID:
        if value == "":
            return f"is not {kind.value}"
        if len(value) > MAX_ID_CHARS:
            return (f"is {len(value)} characters long; ids are at most {MAX_ID_CHARS} characters "
                    "(map longer ids to short keys, e.g. a hash)")
        if "\x00" in value:
            return "holds a NUL character, which ids must not"
        return None
    if kind is Kind.INT:
        if parse_int64(value) is not None:
            return None
        if _INT_RE.match(value):
            return f"is out of range: integers here are {_INT64_RANGE}"
        return f"is not {kind.value}"
    if kind in (Kind.FLOAT, Kind.FINITE):
        if "_" in value:
            return f"is not {Kind.FLOAT.value}"
        try:
            x = float(value)
        except ValueError:
            return f"is not {Kind.FLOAT.value}"
        if kind is Kind.FINITE and not math.isfinite(x):
            return f"is not {kind.value} (NaN and infinities are refused)"
        return None
    if kind is Kind.INTEGRAL:
        return _whole_number_problem(value)
    if kind is Kind.TIMESTAMP:
        problem = _whole_number_problem(value)
        if problem is None or parse_iso(value) is not None:
            return None
        if problem.startswith("is out of range"):
            return f"is out of range: timestamps are integers {_INT64_RANGE} or ISO-8601 date-times"
        return f"is not {kind.value}"
    raise AssertionError(kind)


# --------------------------------------------------------------------------- diagnostics


def _check_line(text: str, lineno: int, src: Source, layout: Layout) -> Optional[DataError]:
    """The error for one line (without its line break), or None if it is fine or blank."""
    if text == "":
        # pyarrow skips empty lines too.
        return None
    n = len(layout.fields)
    delim = layout.delimiter
    values = split(text, delim, layout.quoting)
    if len(values) != n:
        parts: List[MessagePart] = [
            f"expected {n} fields separated by {delim!r}, found {len(values)}: {excerpt(text)}"
        ]
        guess = delimiter_guess(text, delim, layout.quoting, n)
        if guess is not None:
            parts += ["; ", *delimiter_message(text, delim, guess, layout.delimiter_hint(guess))]
        return error_from_parts(parts, path=src.label, line=lineno)
    for field, value in zip(layout.fields, values):
        problem = value_problem(value, field.kind)
        if problem is not None:
            return error_from_parts(
                [f"{field.label} value {excerpt(value)} {problem}", *field.hint, f": {excerpt(text)}"],
                path=src.label,
                line=lineno,
            )
    return None


def _re2_escape(text: str) -> str:
    return "".join(r"\t" if c == "\t" else c if c.isalnum() else "\\" + c for c in text)


def _good_line_pattern(layout: Layout) -> str:
    """An RE2 pattern for lines that certainly pass :func:`_check_line` (and blank lines).

    Most lines of a large file are fine; pyarrow's vectorised regex skips them, so only
    the lines it does not match (quoted fields, ISO dates, huge numbers, bad lines) get the
    exact Python check, and the diagnostic pass takes seconds on 10M lines.
    """
    first = _re2_escape(layout.delimiter[0])
    text = f'[^{first}"]' if layout.quoting else f"[^{first}]"
    integer = r" *-?\d{1,18} *"
    number = r" *-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})? *"
    patterns = {
        Kind.TEXT: text + "*",
        Kind.ID: text[:-1] + r"\x00]" + f"{{1,{MAX_ID_CHARS}}}",
        Kind.INT: integer,
        Kind.FLOAT: number,
        Kind.FINITE: number,
        Kind.INTEGRAL: r" *-?\d{1,18}(?:\.0*)? *",
        Kind.TIMESTAMP: integer,
    }
    line = _re2_escape(layout.delimiter).join(patterns[f.kind] for f in layout.fields)
    return f"^(?:{line})?$"


def _read_lines(src: Source, encoding: str) -> pa.ChunkedArray:
    """Every physical line of ``src`` as a string, blank ones included: row i is line i + 1."""
    with src.open() as f:
        table = pacsv.read_csv(
            f,
            read_options=pacsv.ReadOptions(column_names=["line"], encoding=encoding, block_size=BLOCK_SIZE),
            # A delimiter that text files do not hold; a file that has one takes the slow path.
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"line": pa.string()}, null_values=[], strings_can_be_null=False
            ),
        )
    return table["line"]


def diagnose(src: Source, layout: Layout) -> Optional[DataError]:
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


def _decode(raw: bytes, lineno: int, src: Source, encoding: str) -> str:
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"line is not valid {encoding} text ({e.reason} at byte {e.start}): "
            f"{excerpt(raw.decode('latin-1').rstrip(chr(13) + chr(10)))}; re-save the file as {encoding}",
            path=src.label,
            line=lineno,
        ) from None


def _diagnose_slow(src: Source, layout: Layout) -> Optional[DataError]:
    lineno = 0
    seen_row = False
    with src.open() as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = _decode(raw, lineno, src, layout.encoding)
            except DataError as e:
                return e
            if lineno == 1 and layout.header:
                continue
            err = _check_line(line, lineno, src, layout)
            if err is not None:
                return err
            seen_row = seen_row or line != ""
    return None if seen_row else _no_rows(src, layout, lineno)


def _no_rows(src: Source, layout: Layout, lines: int) -> DataError:
    if lines == 0:
        state = "the file is empty"
    elif layout.header and lines == 1:
        state = "the file has only a header line"
    else:
        state = "the file has no data lines"
    return DataError(f"no {layout.what}: {state}", path=src.label)


def fail(src: Source, layout: Layout, reason: str) -> DataError:
    """The precise error if the diagnostic pass finds one, else ``reason``."""
    err = diagnose(src, layout)
    return err if err is not None else DataError(reason, path=src.label)


def row_line(src: Source, layout: Layout, row: int) -> Tuple[int, str]:
    """The 1-based line number and the text of data row ``row`` of a table read from ``src``.

    pyarrow skips blank lines, so row ``i`` is the ``i``-th non-blank line after the header.
    """
    first = 1 if layout.header else 0
    try:
        data = _read_lines(src, layout.encoding).slice(first)
        i = pc.indices_nonzero(pc.not_equal(data, ""))[row].as_py()
        return first + i + 1, data[i].as_py()
    except (pa.ArrowException, UnicodeDecodeError):
        pass  # a stray \x1f: count in Python
    seen = -1
    with src.open() as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno <= first:
                continue
            text = _decode(raw, lineno, src, layout.encoding)
            seen += text != ""
            if seen == row:
                return lineno, text
    raise IndexError(f"{src.label} has no data row {row}")


def row_error(src: Source, layout: Layout, row: int, message: str) -> DataError:
    """``message`` about data row ``row``, located at its line and quoting it."""
    lineno, text = row_line(src, layout, row)
    return DataError(f"{message}: {excerpt(text)}", path=src.label, line=lineno)


def first_row(mask: Union[pa.Array, pa.ChunkedArray]) -> Optional[int]:
    """The index of the first true value of a boolean column, or None."""
    hits = pc.indices_nonzero(mask)
    return hits[0].as_py() if len(hits) else None


def check_unique(src: Source, layout: Layout, keys: pa.ChunkedArray, label: str) -> None:
    """Raises for the second line of a key that a feature file (movies, users) lists twice."""
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    first_seen: Dict[Any, int] = {}
    for row, value in enumerate(keys.to_pylist()):
        if value in first_seen:
            first, _ = row_line(src, layout, first_seen[value])
            raise row_error(src, layout, row, f"{label} {value} is listed again (first on line {first}); "
                                              "give each one line")
        first_seen[value] = row


# --------------------------------------------------------------------------- fast path

# Bytes that stand in for a multi-character delimiter while pyarrow parses: ASCII's
# separator controls, which text files do not hold; the first one the file lacks is used.
_STAND_INS = (b"\x1f", b"\x1e", b"\x1d", b"\x1c")


class _DelimiterSwap(io.RawIOBase):
    """Reads ``raw`` with every ``delimiter`` replaced by the byte ``stand_in``.

    pyarrow's CSV parser takes a one-byte delimiter. Swapping a longer one while the file
    streams through keeps memory to a block plus the longest line, where reading the whole
    file and replacing would hold it twice, and pyarrow still parses its blocks in
    parallel. The swap runs on whole lines, which a delimiter never spans, so it splits
    exactly as splitting each line on the delimiter does. A file that holds ``stand_in``
    itself sets :attr:`clashed` and stops; the caller retries with another byte.
    """

    def __init__(self, raw: BinaryIO, delimiter: bytes, stand_in: bytes) -> None:
        super().__init__()
        self._raw, self._delimiter, self._stand_in = raw, delimiter, stand_in
        self._out = b""
        self._pos = 0
        self._carry = b""  # the unfinished last line of what was read so far
        self._eof = False
        self.clashed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out) and not self._eof:
            chunk = self._raw.read(BLOCK_SIZE)
            if self._stand_in in chunk:
                self.clashed = True
                raise ValueError(f"the file holds the stand-in byte {self._stand_in!r}")
            if chunk:
                data = self._carry + chunk
                cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
                data, self._carry = data[:cut], data[cut:]
            else:
                data, self._carry, self._eof = self._carry, b"", True
            self._out, self._pos = data.replace(self._delimiter, self._stand_in), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n


_T = TypeVar("_T")


def _parse(src: Source, layout: Layout, parse: Callable[[BinaryIO, str], _T]) -> Tuple[_T, str]:
    """``parse(stream, delimiter)`` on ``src``, with a multi-character delimiter swapped for a
    byte; returns its result and the delimiter pyarrow saw."""
    if len(layout.delimiter) == 1:
        with src.open() as f:
            return parse(f, layout.delimiter), layout.delimiter
    delimiter = layout.delimiter.encode(layout.encoding)
    for stand_in in _STAND_INS:
        with src.open() as f:
            stream = _DelimiterSwap(f, delimiter, stand_in)
            try:
                return parse(stream, stand_in.decode()), stand_in.decode()
            except ValueError:
                if not stream.clashed:
                    raise
    raise DataError(
        f"the file holds all of the control bytes {list(_STAND_INS)} that stand in for the "
        f"delimiter {layout.delimiter!r} while parsing; remove them or re-save it with a "
        "one-character delimiter",
        path=src.label,
    )


def _arrow_options(layout: Layout, delimiter: str) -> Dict[str, Any]:
    return dict(
        read_options=pacsv.ReadOptions(
            column_names=[fl.name for fl in layout.fields],
            skip_rows=1 if layout.header else 0,
            encoding=layout.encoding,
            block_size=BLOCK_SIZE,
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


def arrow_read(src: Source, layout: Layout) -> pa.Table:
    """Reads ``src`` with pyarrow; raises pyarrow's error on bad input."""
    table, delimiter = _parse(src, layout, lambda f, d: pacsv.read_csv(f, **_arrow_options(layout, d)))
    if delimiter != layout.delimiter:
        # A quoted value may hold the delimiter, which the stand-in replaced: put it back.
        for k, name in enumerate(table.column_names):
            col = table[name]
            if pa.types.is_string(col.type) and pc.any(pc.match_substring(col, delimiter)).as_py():
                table = table.set_column(k, name, pc.replace_substring(col, delimiter, layout.delimiter))
    return table


def sniff_types(src: Source, layout: Layout) -> Dict[int, pa.DataType]:
    """Types pyarrow infers from the first block for the columns given no type.

    Reading with explicit types afterwards halves the parser's peak memory on large
    files (inference keeps both candidate representations while it decides).
    """
    if all(fl.arrow is not None for fl in layout.fields):
        return {}
    try:
        schema, _ = _parse(src, layout, lambda f, d: pacsv.open_csv(f, **_arrow_options(layout, d)).schema)
    except (pa.ArrowException, UnicodeDecodeError, ValueError):
        return {}  # the full read will fail and report the line
    return {k: schema.field(fl.name).type for k, fl in enumerate(layout.fields) if fl.arrow is None}


def read_table(src: Source, layout: Layout) -> pa.Table:
    """Reads ``src`` on the fast path and checks what pyarrow lets through (non-finite
    values of :attr:`Kind.FINITE` fields, over-long ids); on failure raises the
    diagnostic pass's error."""
    try:
        table = arrow_read(src, layout)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise fail(src, layout, f"cannot parse the file: {e}") from None
    if table.num_rows == 0:
        raise fail(src, layout, f"no {layout.what}: the file has no data lines")
    for field in layout.fields:
        col = table[field.name]
        if field.kind is Kind.FINITE and pa.types.is_floating(col.type):
            if not pc.all(pc.is_finite(col)).as_py():
                raise fail(src, layout, f"{field.label} holds NaN or infinite values")
        elif field.kind is Kind.ID and pa.types.is_string(col.type):
            check_ids(src, layout, col, field.label)
    return table


def check_ids(src: Source, layout: Layout, col: pa.ChunkedArray, label: str) -> None:
    """Raises for a string id that pyarrow accepts but the store cannot keep."""
    # Byte lengths come from the offsets for free; characters are counted only past the limit.
    too_long = (pc.max(pc.binary_length(col)).as_py() or 0) > MAX_ID_CHARS and pc.any(
        pc.greater(pc.utf8_length(col), MAX_ID_CHARS)
    ).as_py()
    if too_long or pc.any(pc.match_substring(col, "\x00")).as_py():
        raise fail(src, layout, f"{label} ids longer than {MAX_ID_CHARS} characters or with NUL characters")


# --------------------------------------------------------------------------- headers


def first_line(src: Source, encoding: str) -> Optional[str]:
    """Line 1 of ``src`` without its line break or a byte-order mark; None for an empty file."""
    with src.open() as f:
        raw = f.readline()
    if not raw:
        return None
    return _decode(raw, 1, src, encoding).lstrip("\ufeff")


def read_header(src: Source, delimiter: str, quoting: bool, encoding: str = "utf-8",
                what: str = "events") -> List[str]:
    """The column names on line 1 (blank ones become ``column_<i>``); raises for repeats."""
    line = first_line(src, encoding)
    if line is None:
        raise DataError(f"no {what}: the file is empty", path=src.label)
    names = [n.strip() or f"column_{i}" for i, n in enumerate(split(line, delimiter, quoting))]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"the header repeats column name(s) {dup}: {excerpt(line)}; give each column its own "
                        "name", path=src.label, line=1)
    return names


def check_header(src: Source, found: List[str], expected: Sequence[str], delimiter: str, quoting: bool) -> None:
    """Raises unless the header is exactly ``expected``."""
    if found == list(expected):
        return
    line = first_line(src, "utf-8") or ""
    parts: List[MessagePart] = [f"expected the header {delimiter.join(expected)!r}, found {excerpt(line)}"]
    guess = delimiter_guess(line, delimiter, quoting, len(expected))
    if guess is not None:
        parts += ["; ", *delimiter_message(line, delimiter, guess, [RIGHT_FILE_HINT])]
    raise error_from_parts(parts, path=src.label, line=1)
