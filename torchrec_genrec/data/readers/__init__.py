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

Bad input raises :class:`DataError` naming the file, the 1-based line number (the header,
if any, is line 1), the offending value and how to fix it. Where another reader argument
would fix it (a delimiter, a column name), the error is a :class:`ReaderArgumentError`,
whose message a front end can re-spell with its own names for the arguments.

Modules: :mod:`.movielens`, :mod:`.recbole`, :mod:`.csv` (the generic reader),
:mod:`.arguments` (arguments in error messages) and ``_parsing`` (the machinery they share:
sources, layouts, the pyarrow fast path and the diagnostic pass).
"""

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.readers.arguments import (
    PYTHON_SPELLING,
    Arg,
    ArgumentSpelling,
    ReaderArgumentError,
    Settings,
)
from torchrec_genrec.data.readers.csv import read_interactions
from torchrec_genrec.data.readers.movielens import (
    ML100K_GENRES,
    ML1M_OCCUPATIONS,
    read_movielens_100k,
    read_movielens_1m,
    read_movielens_20m,
)
from torchrec_genrec.data.readers.recbole import read_movielens_100k_recbole, read_recbole_atomic

__all__ = [
    "Arg",
    "ArgumentSpelling",
    "DataError",
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
    "PYTHON_SPELLING",
    "ReaderArgumentError",
    "Settings",
    "read_interactions",
    "read_movielens_100k",
    "read_movielens_100k_recbole",
    "read_movielens_1m",
    "read_movielens_20m",
    "read_recbole_atomic",
]
