"""Bad input to the readers gets a clear error; multi-character delimiters; the two faces of
a reader-argument error (Python parameter names, ``genrec prepare`` flag names)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from torchrec_genrec import cli
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.readers import (
    ReaderArgumentError,
    read_interactions,
    read_movielens_100k,
    read_movielens_1m,
    read_movielens_20m,
    read_recbole_atomic,
)
from torchrec_genrec.data.readers import _parsing
from torchrec_genrec.data.store import SequenceStore, write_store

INT64_RANGE = "from -9223372036854775808 to 9223372036854775807 (int64)"

ML1M: Dict[str, str] = {
    "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
    "movies.dat": "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Musical\n",
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
}
ML100K: Dict[str, str] = {
    "u.data": "1\t10\t4\t881250949\n2\t10\t5\t881250951\n",
    "u.item": "10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 19) + "\n",
    "u.user": "1|24|M|technician|85711\n2|53|F|other|T8H1N\n",
}
ML20M: Dict[str, str] = {
    "ratings.csv": "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n7,2,0.5,1094785740\n",
    "movies.csv": "movieId,title,genres\n2,Jumanji (1995),Adventure\n",
}
RECBOLE: Dict[str, str] = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\n242\tKolya\n",
}


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _dataset(root: Path, files: Dict[str, str], **override: str) -> Path:
    for name, text in {**files, **override}.items():
        _write(root / name, text, "latin-1")
    return root


def _prepare_csv(capsys: pytest.CaptureFixture, path: Path, out: Path, *flags: str) -> str:
    """Runs ``genrec prepare csv`` expecting a data error; returns what it printed on stderr."""
    assert cli.main(["prepare", "csv", "--path", str(path), "--out", str(out), *flags]) == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- multi-character delimiters


def _ml1m_like(root: Path, n: int = 300) -> Path:
    """An ML-1M folder whose ratings.dat spans many small parse blocks."""
    rng = np.random.default_rng(0)
    rows = [f"{rng.integers(1, 40)}::{rng.integers(1, 60)}::{rng.integers(1, 6)}::{978300000 + i}" for i in range(n)]
    movies = "".join(f"{i}::Movie {i} (1990)::Drama\n" for i in range(1, 60))
    users = "".join(f"{u}::F::25::{u % 21}::00000\n" for u in range(1, 40))
    return _dataset(root, {"ratings.dat": "\n".join(rows) + "\n", "movies.dat": movies, "users.dat": users})


def test_prepare_csv_double_colon_matches_movielens_1m(tmp_path, capsys, monkeypatch) -> None:
    # Small blocks: the delimiter swap streams the file in many pieces.
    monkeypatch.setattr(_parsing, "BLOCK_SIZE", 256)
    root = _ml1m_like(tmp_path / "ml-1m")
    csv_store, ml_store = tmp_path / "csv", tmp_path / "ml"
    argv = ["prepare", "csv", "--path", str(root / "ratings.dat"), "--out", str(csv_store),
            "--delimiter", "::", "--no-header", "--timestamp-col", "3", "--action-col", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    write_store(read_movielens_1m(root), str(ml_store))
    a, b = SequenceStore.open(str(csv_store)), SequenceStore.open(str(ml_store))
    assert a.stats() == b.stats()
    for name in ("offsets", "item", "timestamp", "action"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.user_raw_ids(), b.user_raw_ids())
    np.testing.assert_array_equal(a.item_raw_ids(), b.item_raw_ids())
    assert a.action_values == b.action_values  # 1..5 == 1.0..5.0


def test_read_interactions_double_colon(tmp_path) -> None:
    root = _dataset(tmp_path, ML1M)
    data = read_interactions(root / "ratings.dat", delimiter="::", has_header=False, timestamp_col=3,
                             action_col=2)
    ml = read_movielens_1m(root)
    for col in ("user", "item", "timestamp", "action"):
        assert data.events[col].to_pylist() == ml.events[col].to_pylist()


def test_double_colon_sniffed_from_line_1(tmp_path) -> None:
    root = _dataset(tmp_path, ML1M)
    data = read_interactions(root / "ratings.dat", has_header=False)
    assert data.events["item"].to_pylist() == [1193, 661, 1193]


def test_multichar_delimiter_inside_quotes_and_stand_in_bytes(tmp_path) -> None:
    # A quoted "::" stays in its value; a file that holds the first stand-in byte uses another.
    path = _write(tmp_path / "log.dat", 'user::item::timestamp::note\n1::2::3::"a::b"\n4::5::6::x\x1fy\n')
    data = read_interactions(path, delimiter="::")
    assert data.events["note"].to_pylist() == ["a::b", "x\x1fy"]
    _write(path, "user::item::timestamp::note\n1::2::3::\x1c\x1d\x1e\x1f\n")
    with pytest.raises(DataError, match=r"log\.dat: the file holds all of the control bytes"):
        read_interactions(path, delimiter="::")


def test_multichar_delimiter_bad_line(tmp_path) -> None:
    path = _write(tmp_path / "log.dat", "user||item||timestamp\n1||2||3\n1||2\n")
    with pytest.raises(DataError, match=r"log\.dat:3: expected 3 fields separated by '\|\|', found 2: '1\|\|2'"):
        read_interactions(path, delimiter="||")


_line_text = st.text(alphabet=":ab\t,", max_size=12)


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(_line_text, min_size=1, max_size=30), block=st.integers(1, 16),
       ending=st.sampled_from(["\n", "\r\n"]))
def test_delimiter_swap_splits_like_each_line(lines: List[str], block: int, ending: str) -> None:
    import io

    text = ending.join(lines)
    expected = ending.join(line.replace("::", "\x1f") for line in lines).encode()
    old = _parsing.BLOCK_SIZE
    _parsing.BLOCK_SIZE = block
    try:
        swapped = _parsing._DelimiterSwap(io.BytesIO(text.encode()), b"::", b"\x1f").read()
    finally:
        _parsing.BLOCK_SIZE = old
    assert swapped == expected


def test_bad_delimiter(tmp_path, capsys) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n")
    for bad in ("", '"', "\n"):
        with pytest.raises(ReaderArgumentError, match="cannot separate fields"):
            read_interactions(path, delimiter=bad)
    err = _prepare_csv(capsys, path, tmp_path / "out", "--delimiter", "")
    assert "log.csv: --delimiter '' cannot separate fields" in err


# --------------------------------------------------------------------------- values out of range


def test_id_of_200000_digits(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n" + "9" * 200_000 + ",2,4\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    msg = str(e.value)
    assert "log.csv:3: user value '9999" in msg and "is 200000 characters long; ids are at most 256" in msg
    assert len(msg) < 600  # the value is cut short
    with pytest.raises(DataError) as e:
        read_interactions(path, id_type="int")
    assert "log.csv:3: user value '9999" in str(e.value) and f"is out of range: integers here are {INT64_RANGE}" in str(
        e.value
    )


def test_long_and_nul_ids(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1," + "x" * 257 + ",4\n")
    with pytest.raises(DataError, match=r"log\.csv:3: item value 'xxx.*is 257 characters long"):
        read_interactions(path)
    _write(path, "user,item,timestamp\n1,2,3\na\x00b,2,4\n")
    with pytest.raises(DataError, match=r"log\.csv:3: user value 'a\\x00b' holds a NUL character"):
        read_interactions(path)
    _write(path, "user,item,timestamp\n1,2,3\n1," + "x" * 256 + ",4\n")
    assert read_interactions(path).num_events == 2


@pytest.mark.parametrize("value", ["12345678901234567890", "99999999999999999999999", "-9223372036854775809",
                                   "1e30"])
def test_timestamp_out_of_int64(tmp_path, value: str) -> None:
    path = _write(tmp_path / "log.csv", f"user,item,timestamp\n1,2,3\n1,2,{value}\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert f"log.csv:3: timestamp value {value!r} is out of range: timestamps are integers {INT64_RANGE}" in str(
        e.value
    )


def test_timestamp_at_int64_bounds(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,9223372036854775807\n1,3,-9223372036854775808\n")
    assert read_interactions(path).events["timestamp"].to_pylist() == [2**63 - 1, -(2**63)]
    # Mixed with ISO dates: the value-by-value path.
    _write(path, "user,item,timestamp\n1,2,9223372036854775807\n1,3,2024-01-01T00:00:00\n")
    assert read_interactions(path).events["timestamp"].to_pylist() == [2**63 - 1, 1704067200]
    # Mixed with a whole float: big integers are not rounded through float64.
    _write(path, "user,item,timestamp\n1,2,1714557600123456789\n1,3,1.0\n")
    assert read_interactions(path).events["timestamp"].to_pylist() == [1714557600123456789, 1]


def test_movielens_timestamp_out_of_int64(tmp_path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "1::1193::5::978300760\n1::661::3::123456789012345678901\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    assert "ratings.dat:2: Timestamp value '123456789012345678901' is out of range" in str(e.value)
    assert INT64_RANGE in str(e.value)


def test_recbole_timestamp_out_of_int64(tmp_path) -> None:
    inter = RECBOLE["ml-100k.inter"] + "196\t242\t3\t1e30\n"
    root = _dataset(tmp_path, RECBOLE, **{"ml-100k.inter": inter})
    with pytest.raises(DataError, match=r"ml-100k\.inter:3: timestamp value '1e30' is out of range"):
        read_recbole_atomic(root)


def test_huge_year_is_unknown_not_a_crash(tmp_path) -> None:
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\n242\tKolya\t" + "9" * 5000 + "\n"
    data = read_recbole_atomic(_dataset(tmp_path, RECBOLE, **{"ml-100k.item": item}))
    assert data.item_features["year"].to_pylist() == [None]


# --------------------------------------------------------------------------- NaN ratings


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-Infinity"])
def test_generic_nan_action(tmp_path, value: str) -> None:
    path = _write(tmp_path / "log.csv", f"user,item,timestamp,rating\n1,2,3,4.5\n\n1,2,4,{value}\n")
    with pytest.raises(DataError) as e:
        read_interactions(path, action_col="rating")
    assert (f"log.csv:4: action column 'rating' value {value!r} is not a finite number "
            "(NaN and infinities are refused)") in str(e.value)


def test_movielens_nan_rating(tmp_path) -> None:
    root = _dataset(tmp_path / "1m", ML1M, **{"ratings.dat": "1::1193::5::978300760\n1::661::nan::978302109\n"})
    with pytest.raises(DataError, match=r"ratings\.dat:2: Rating value 'nan' is not a finite number"):
        read_movielens_1m(root)
    root = _dataset(tmp_path / "100k", ML100K, **{"u.data": "1\t10\tNaN\t881250949\n"})
    with pytest.raises(DataError, match=r"u\.data:1: rating value 'NaN' is not a finite number"):
        read_movielens_100k(root)
    root = _dataset(tmp_path / "20m", ML20M, **{"ratings.csv": "userId,movieId,rating,timestamp\n1,2,inf,1\n"})
    with pytest.raises(DataError, match=r"ratings\.csv:2: rating value 'inf' is not a finite number"):
        read_movielens_20m(root)


def test_recbole_nan_rating(tmp_path) -> None:
    inter = RECBOLE["ml-100k.inter"] + "196\t242\tnan\t881250950\n"
    with pytest.raises(DataError, match=r"ml-100k\.inter:3: rating value 'nan' is not a finite number"):
        read_recbole_atomic(_dataset(tmp_path, RECBOLE, **{"ml-100k.inter": inter}))


# --------------------------------------------------------------------------- MovieLens listings


@pytest.mark.parametrize("item", ["-5", "777"])
def test_movielens_1m_item_not_in_movies(tmp_path, item: str) -> None:
    # Negative or positive, an id movies.dat lacks is refused the same way.
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": f"1::1193::5::978300760\n\n1::{item}::3::978302109\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    msg = str(e.value)
    assert f"ratings.dat:3: MovieID {item} is not in {root / 'movies.dat'}" in msg
    assert f"'1::{item}::3::978302109'" in msg


def test_movielens_1m_user_not_in_users(tmp_path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "1::1193::5::978300760\n9::661::3::978302109\n"})
    with pytest.raises(DataError, match=r"ratings\.dat:2: UserID 9 is not in .*users\.dat"):
        read_movielens_1m(root)


def test_movielens_1m_movie_listed_twice(tmp_path) -> None:
    movies = ML1M["movies.dat"] + "1193::Again (1975)::Drama\n"
    root = _dataset(tmp_path, ML1M, **{"movies.dat": movies})
    with pytest.raises(DataError, match=r"movies\.dat:3: MovieID 1193 is listed again \(first on line 1\)"):
        read_movielens_1m(root)


def test_movielens_1m_unlisted_item_in_zip(tmp_path) -> None:
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in {**ML1M, "ratings.dat": "1::1193::5::1\n1::42::3::2\n"}.items():
            zf.writestr(f"ml-1m/{name}", text)
    with pytest.raises(DataError, match=r"ml-1m\.zip!ml-1m/ratings\.dat:2: MovieID 42 is not in .*movies\.dat"):
        read_movielens_1m(archive)


def test_movielens_100k_and_20m_unlisted_items(tmp_path) -> None:
    root = _dataset(tmp_path / "100k", ML100K, **{"u.data": "1\t10\t4\t1\n1\t-3\t4\t2\n"})
    with pytest.raises(DataError, match=r"u\.data:2: movie id -3 is not in .*u\.item"):
        read_movielens_100k(root)
    root = _dataset(tmp_path / "20m", ML20M, **{"ratings.csv": "userId,movieId,rating,timestamp\n1,2,3,1\n1,9,3,2\n"})
    with pytest.raises(DataError, match=r"ratings\.csv:3: movieId 9 is not in .*movies\.csv"):
        read_movielens_20m(root)


def test_recbole_items_may_lack_features(tmp_path) -> None:
    # RecBole's .item file is optional per item: an event's item it lacks gets null features.
    inter = RECBOLE["ml-100k.inter"] + "196\t999\t3\t881250950\n"
    data = read_recbole_atomic(_dataset(tmp_path, RECBOLE, **{"ml-100k.inter": inter}))
    assert data.num_events == 2


def test_recbole_item_listed_twice(tmp_path) -> None:
    item = RECBOLE["ml-100k.item"] + "242\tKolya again\n"
    with pytest.raises(DataError, match=r"ml-100k\.item:3: item_id 242 is listed again \(first on line 2\)"):
        read_recbole_atomic(_dataset(tmp_path, RECBOLE, **{"ml-100k.item": item}))


# --------------------------------------------------------------------------- more bad input


def test_directory_instead_of_file(tmp_path, capsys) -> None:
    (tmp_path / "log.csv").mkdir()
    with pytest.raises(DataError, match=r"log\.csv: a directory, not a file"):
        read_interactions(tmp_path / "log.csv")
    assert "a directory, not a file" in _prepare_csv(capsys, tmp_path / "log.csv", tmp_path / "out")
    root = _dataset(tmp_path / "ml-1m", {k: v for k, v in ML1M.items() if k != "ratings.dat"})
    (root / "ratings.dat").mkdir()
    with pytest.raises(DataError, match=r"directory lacks ratings\.dat"):
        read_movielens_1m(root)


def test_duplicated_header_names(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,user,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"log\.csv:1: the header repeats column name\(s\) \['user'\]"):
        read_interactions(path)


def test_header_not_utf8(tmp_path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"us\xe9r,item,timestamp\n1,2,3\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv:1: line is not valid utf-8 text" in str(e.value) and "re-save the file as utf-8" in str(e.value)
    assert "\\n" not in str(e.value)


def test_two_roles_one_column(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n")
    with pytest.raises(ReaderArgumentError, match="user_col and item_col both name column 'user'"):
        read_interactions(path, item_col="user")


def test_no_header_too_few_columns(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "1,2\n")
    with pytest.raises(ReaderArgumentError, match=r"log\.csv:1: the file has no header and 2 column\(s\), so the "
                                                  r"timestamp is not in its default column 2; give timestamp_col"):
        read_interactions(path, has_header=False)


# --------------------------------------------------------------------------- both faces


@pytest.mark.parametrize(
    "text,kwargs,flags,python_says,cli_says",
    [
        ("user\titem\ttimestamp\n1\t2\t3\n", {}, [],
         "(pass delimiter='\\t')", "(pass --delimiter $'\\t')"),
        ("user_id,movie_id,time\n1,2,3\n", {}, [],
         "name them with user_col, item_col, timestamp_col, e.g. user_col='user_id', item_col='movie_id', "
         "timestamp_col='time'",
         "name them with --user-col, --item-col, --timestamp-col, e.g. --user-col user_id --item-col movie_id "
         "--timestamp-col time"),
        ("user,item,timestamp\n1,b2,3\n", {"id_type": "int"}, ["--id-type", "int"],
         "(pass id_type='string' for text ids)", "(pass --id-type string for text ids)"),
        ("user,item,timestamp\n1,2,3\n", {"user_col": 7}, ["--user-col", "7"],
         "user_col=7 is out of range", "--user-col 7 is out of range"),
        ("1,2,3\n4,5,6\n", {}, [],
         "line 1 looks like data, not a header: if so, pass has_header=False",
         "line 1 looks like data, not a header: if so, pass --no-header"),
        ("u;i;t\n1;2;3\n", {"has_header": False}, ["--no-header"],
         "(pass delimiter=';')", "(pass --delimiter ';')"),
    ],
)
def test_argument_errors_speak_the_callers_language(tmp_path, capsys, text, kwargs, flags, python_says,
                                                    cli_says) -> None:
    path = _write(tmp_path / "log.csv", text)
    with pytest.raises(ReaderArgumentError) as e:
        read_interactions(path, **kwargs)
    assert python_says in str(e.value) and "--" not in str(e.value)
    assert str(e.value).startswith(f"{path}:")
    err = _prepare_csv(capsys, path, tmp_path / "out", *flags)
    assert err.startswith(f"genrec prepare: error: {path}:") and cli_says in err
    assert "_col" not in err and "delimiter=" not in err and "Traceback" not in err


def test_reader_argument_error_pickles(tmp_path) -> None:
    path = _write(tmp_path / "log.csv", "user\titem\ttimestamp\n1\t2\t3\n")
    with pytest.raises(ReaderArgumentError) as e:
        read_interactions(path)
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value) and again.line == 1 and again.arguments == e.value.arguments


@pytest.mark.parametrize(
    "text,flags,says",
    [
        ("", [], "log.csv: no events: the file is empty"),
        ("user,item,timestamp\n", [], "log.csv: no events: the file has only a header line"),
        ("user,item,timestamp\n1,2,3\n1,2\n", [], "log.csv:3: expected 3 fields separated by ',', found 2: '1,2'"),
        ("user,item,timestamp\n1,2,3\n1,2,12345678901234567890\n", [],
         "log.csv:3: timestamp value '12345678901234567890' is out of range"),
        ("user,item,timestamp,r\n1,2,3,NaN\n", ["--action-col", "r"],
         "log.csv:2: action column 'r' value 'NaN' is not a finite number"),
    ],
)
def test_cli_data_errors(tmp_path, capsys, text, flags, says) -> None:
    path = _write(tmp_path / "log.csv", text)
    err = _prepare_csv(capsys, path, tmp_path / "out", *flags)
    assert says in err and "Traceback" not in err
