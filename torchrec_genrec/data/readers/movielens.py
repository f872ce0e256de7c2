"""Readers of the GroupLens MovieLens releases: 100K, 1M and 20M (25M and ml-latest share
20M's format).

Each accepts the unzipped folder or the GroupLens zip itself. Every rating must name a movie
of the movie file and, where the release has a user file, a user of it: a rating of an
unlisted movie means a file from another release or a corrupt download, so it is refused,
naming its line, rather than kept without features.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from torchrec_genrec.data.interactions import Interactions
from torchrec_genrec.data.readers import _features
from torchrec_genrec.data.readers._parsing import (
    RIGHT_FILE_HINT,
    Container,
    Field,
    Kind,
    Layout,
    PathLike,
    Source,
    check_header,
    check_unique,
    first_row,
    read_header,
    read_table,
    row_error,
)

__all__ = ["ML100K_GENRES", "ML1M_OCCUPATIONS", "read_movielens_100k", "read_movielens_1m", "read_movielens_20m"]

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

_ML100K_EXPECTED = "expected u.data, u.item, u.user from the GroupLens ml-100k zip (or the zip itself)"
_ML1M_EXPECTED = "expected ratings.dat, movies.dat, users.dat from the GroupLens ml-1m zip (or the zip itself)"
_ML20M_EXPECTED = "expected ratings.csv, movies.csv from the GroupLens ml-20m zip (or the zip itself)"


def _right_file_hint(guess: str) -> List[str]:
    return [RIGHT_FILE_HINT]


class _Parsed(NamedTuple):
    """A file as read: where it came from, how it is laid out, and its rows."""

    src: Source
    layout: Layout
    table: pa.Table


def _parsed(src: Source, layout: Layout) -> _Parsed:
    return _Parsed(src, layout, read_table(src, layout))


def _check_listed(ratings: _Parsed, listing: _Parsed, key: str, label: str) -> None:
    """Raises for an id ``listing`` (a movie or user file) holds twice, then for the first
    rating whose ``key`` id it lacks."""
    check_unique(listing.src, listing.layout, listing.table[key], label)
    unlisted = first_row(pc.invert(pc.is_in(ratings.table[key], value_set=listing.table[key].combine_chunks())))
    if unlisted is not None:
        value = ratings.table[key][unlisted].as_py()
        raise row_error(
            ratings.src, ratings.layout, unlisted,
            f"{label} {value} is not in {listing.src.label}; every rating must name one listed there "
            "(are both files from the same download?)",
        )


def _movielens_ratings(ratings: pa.Table, source: str, files: Dict[str, str], item_features: pa.Table,
                       user_features: Optional[pa.Table] = None) -> Interactions:
    """The Interactions every GroupLens MovieLens reader returns: ratings as the action, seconds."""
    return Interactions(
        _features.events(ratings, "user", "item", "timestamp", "rating"),
        source=source,
        item_features=item_features,
        user_features=user_features,
        action_name="rating",
        timestamp_unit="s",
        files=files,
    ).validate()


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

    Raises:
        DataError: naming the file and line of the first bad line, of a rating whose movie
            is not in ``u.item`` or whose user is not in ``u.user``, or of an id listed twice.

    Example::

        data = read_movielens_100k("ml-100k")
        data.num_events  # 100000
        data.item_features.slice(0, 1).to_pylist()
        # [{'item': 1, 'title': 'Toy Story', 'year': 1995,
        #   'genres': ['Animation', "Children's", 'Comedy']}]
    """
    with Container(directory, _ML100K_EXPECTED) as box:
        data_src, item_src, user_src = box.require(["u.data", "u.item", "u.user"])
        ratings = _parsed(
            data_src,
            Layout(
                "\t",
                [
                    Field("user", Kind.INT, pa.int64()),
                    Field("item", Kind.INT, pa.int64()),
                    Field("rating", Kind.FINITE, pa.float64()),
                    Field("timestamp", Kind.INT, pa.int64()),
                ],
                delimiter_hint=_right_file_hint,
            ),
        )
        flags = [Field(f"g{i}", Kind.INT, pa.int8(), label=f"genre flag {g!r}") for i, g in enumerate(ML100K_GENRES)]
        items = _parsed(
            item_src,
            Layout(
                "|",
                [
                    Field("item", Kind.INT, pa.int64(), label="movie id"),
                    Field("title", arrow=pa.string()),
                    Field("release", arrow=pa.string()),
                    Field("video_release", arrow=pa.string()),
                    Field("url", arrow=pa.string()),
                ]
                + flags,
                encoding="latin-1",
                what="movies",
            ),
        )
        users = _parsed(
            user_src,
            Layout(
                "|",
                [
                    Field("user", Kind.INT, pa.int64(), label="user id"),
                    Field("age", Kind.INT, pa.int64()),
                    Field("gender", arrow=pa.string()),
                    Field("occupation", arrow=pa.string()),
                    Field("zip", arrow=pa.string()),
                ],
                encoding="latin-1",
                what="users",
            ),
        )
        _check_listed(ratings, items, "item", "movie id")
        _check_listed(ratings, users, "user", "user id")
        files = {"events": data_src.label, "items": item_src.label, "users": user_src.label}

    column = _features.column
    flag_rows = list(zip(*(column(items.table, f.name).to_pylist() for f in flags)))
    genres = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flag_rows]
    release_years = [
        int(m.group(1)) if (m := _features.TRAILING_YEAR_RE.search(r)) else None
        for r in column(items.table, "release").to_pylist()
    ]
    item_features = _features.item_table(
        column(items.table, "item"), column(items.table, "title").to_pylist(), release_years, genres
    )
    user_features = users.table.select(["user", "age", "gender", "occupation", "zip"])
    return _movielens_ratings(ratings.table, "movielens-100k (grouplens)", files, item_features, user_features)


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

    Raises:
        DataError: naming the file and line of the first bad line, of a rating whose movie
            is not in ``movies.dat`` or whose user is not in ``users.dat``, or of an id
            listed twice.

    Example::

        data = read_movielens_1m("ml-1m")
        data.num_events, data.events.schema.names
        # (1000209, ['user', 'item', 'timestamp', 'action'])
    """
    with Container(directory, _ML1M_EXPECTED) as box:
        rating_src, movie_src, user_src = box.require(["ratings.dat", "movies.dat", "users.dat"])
        ratings = _parsed(
            rating_src,
            Layout(
                "::",
                [
                    Field("user", Kind.INT, pa.int64(), label="UserID"),
                    Field("item", Kind.INT, pa.int64(), label="MovieID"),
                    Field("rating", Kind.FINITE, pa.float64(), label="Rating"),
                    Field("timestamp", Kind.INT, pa.int64(), label="Timestamp"),
                ],
                delimiter_hint=_right_file_hint,
            ),
        )
        movies = _parsed(
            movie_src,
            Layout(
                "::",
                [
                    Field("item", Kind.INT, pa.int64(), label="MovieID"),
                    Field("title", arrow=pa.string()),
                    Field("genres", arrow=pa.string()),
                ],
                encoding="latin-1",
                what="movies",
                delimiter_hint=_right_file_hint,
            ),
        )
        users = _parsed(
            user_src,
            Layout(
                "::",
                [
                    Field("user", Kind.INT, pa.int64(), label="UserID"),
                    Field("gender", arrow=pa.string(), label="Gender"),
                    Field("age", Kind.INT, pa.int64(), label="Age"),
                    Field("occupation", Kind.INT, pa.int64(), label="Occupation"),
                    Field("zip", arrow=pa.string(), label="Zip-code"),
                ],
                encoding="latin-1",
                what="users",
                delimiter_hint=_right_file_hint,
            ),
        )
        _check_listed(ratings, movies, "item", "MovieID")
        _check_listed(ratings, users, "user", "UserID")
        files = {"events": rating_src.label, "items": movie_src.label, "users": user_src.label}

    column = _features.column
    genres = [[g for g in s.split("|") if g] for s in column(movies.table, "genres").to_pylist()]
    item_features = _features.item_table(
        column(movies.table, "item"), column(movies.table, "title").to_pylist(), [None] * movies.table.num_rows,
        genres,
    )
    occupations = [
        ML1M_OCCUPATIONS[c] if 0 <= c < len(ML1M_OCCUPATIONS) else str(c)
        for c in column(users.table, "occupation").to_pylist()
    ]
    user_features = _features.user_table(
        column(users.table, "user"), column(users.table, "age").to_pylist(), column(users.table, "gender"),
        occupations, column(users.table, "zip"),
    )
    return _movielens_ratings(ratings.table, "movielens-1m (grouplens)", files, item_features, user_features)


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

    Raises:
        DataError: naming the file and line of the first bad line, of a rating whose movie
            is not in ``movies.csv``, or of a movie listed twice.

    Example::

        data = read_movielens_20m("ml-20m")
        data.num_events  # 20000263
    """
    with Container(directory, _ML20M_EXPECTED) as box:
        rating_src, movie_src = box.require(["ratings.csv", "movies.csv"])
        rating_names = ["userId", "movieId", "rating", "timestamp"]
        check_header(rating_src, read_header(rating_src, ",", True), rating_names, ",", True)
        ratings = _parsed(
            rating_src,
            Layout(
                ",",
                [
                    Field("user", Kind.INT, pa.int64(), label="userId"),
                    Field("item", Kind.INT, pa.int64(), label="movieId"),
                    Field("rating", Kind.FINITE, pa.float64()),
                    Field("timestamp", Kind.INT, pa.int64()),
                ],
                header=True,
                quoting=True,
            ),
        )
        movie_names = ["movieId", "title", "genres"]
        check_header(movie_src, read_header(movie_src, ",", True, what="movies"), movie_names, ",", True)
        movies = _parsed(
            movie_src,
            Layout(
                ",",
                [
                    Field("item", Kind.INT, pa.int64(), label="movieId"),
                    Field("title", arrow=pa.string()),
                    Field("genres", arrow=pa.string()),
                ],
                header=True,
                quoting=True,
                what="movies",
            ),
        )
        _check_listed(ratings, movies, "item", "movieId")
        files = {"events": rating_src.label, "items": movie_src.label}

    column = _features.column
    genres = [
        [g for g in s.split("|") if g and g != "(no genres listed)"] for s in column(movies.table, "genres").to_pylist()
    ]
    item_features = _features.item_table(
        column(movies.table, "item"), column(movies.table, "title").to_pylist(), [None] * movies.table.num_rows,
        genres,
    )
    return _movielens_ratings(ratings.table, "movielens-20m (grouplens)", files, item_features)
