import os

import pytest

from torchrec_genrec.logging_utils import silence_known_noise

silence_known_noise()


@pytest.fixture(scope="session")
def genrec_home(tmp_path_factory):
    """A private GENREC_HOME for the session: tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("genrec_home")
    old = os.environ.get("GENREC_HOME")
    os.environ["GENREC_HOME"] = str(home)
    yield home
    if old is None:
        del os.environ["GENREC_HOME"]
    else:
        os.environ["GENREC_HOME"] = old


@pytest.fixture(scope="session")
def ml100k(genrec_home):
    """MovieLens-100K prepared the way the README does it (fetched from the registry)."""
    from torchrec_genrec import cli
    from torchrec_genrec.data import datasets
    from torchrec_genrec.data.store import SequenceStore

    assert cli.main(["prepare", "movielens-100k"]) == 0
    return SequenceStore.open(datasets.dataset_dir("movielens-100k"))
