"""Item and user feature tables of the MovieLens and RecBole readers."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import pyarrow as pa

from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER
from torchrec_genrec.data.readers._parsing import parse_int64

# "Toy Story (1995)", "Fawlty Towers (1975-1979)", "Babylon 5 (1998) ".
_TITLE_YEAR_RE = re.compile(r"\A(.*?)\s*\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*\Z", re.DOTALL)
TRAILING_YEAR_RE = re.compile(r"(\d{4})\s*\Z")


def split_title(title: str) -> Tuple[str, Optional[int]]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; titles without a year keep it None."""
    m = _TITLE_YEAR_RE.match(title)
    if m is None:
        return title.strip(), None
    return m.group(1), int(m.group(2))


def to_int(value: Optional[str]) -> Optional[int]:
    """A year or an age as an int64; None when it is not one (``"unknown"``, ``"V"``)."""
    return None if value is None else parse_int64(value.strip())


def item_table(items: pa.Array, titles: List[str], fallback_years: List[Optional[int]],
               genres: List[List[str]]) -> pa.Table:
    """``item``, ``title`` (without its year), ``year`` (the title's, else the fallback), ``genres``."""
    out_titles: List[str] = []
    years: List[Optional[int]] = []
    for title, fallback in zip(titles, fallback_years):
        t, y = split_title(title)
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


def user_table(users: pa.Array, ages: List[Optional[int]], genders: pa.Array, occupations: List[str],
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


def events(table: pa.Table, user: str, item: str, timestamp: str, action: Optional[str]) -> pa.Table:
    """The ``events`` table of :class:`Interactions` from a reader's columns."""
    cols = {USER: table[user], ITEM: table[item], TIMESTAMP: table[timestamp]}
    if action is not None:
        cols[ACTION] = table[action].cast(pa.float64())
    return pa.table(cols)


def column(table: pa.Table, name: str) -> pa.Array:
    return table[name].combine_chunks()
