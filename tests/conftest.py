import contextlib
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small HSTU run (summed actions, time bias) on synthetic data, trained for 2 epochs:
    what the export and serving tests start from. Returns (run_dir, store_dir)."""
    from torchrec_genrec import cli
    from torchrec_genrec.data.store import write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("tiny_run")
    store = str(root / "store")
    write_store(generate(SyntheticConfig(num_users=80, num_items=60, num_events=1600, min_seq_len=5, seed=3)), store)
    out = root / "run"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    settings = [f"data.dataset={store}", "data.max_seq_len=16", f"train.output_dir={out}", "train.epochs=2",
                "train.batch_size=16", "train.progress=false", "train.tensorboard=false", "model.embedding_dim=16",
                "model.attention_dim=8", "model.linear_dim=8", "model.num_negatives=8"]
    assert cli.main(["train", "--config", os.path.join(here, "apps/configs/hstu_ml100k.toml"),
                     *[x for s in settings for x in ("--set", s)]]) == 0
    return str(out), store


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run, tmp_path_factory):
    """The tiny run exported at each precision: {precision: artifact_dir}."""
    from torchrec_genrec.export import export_run

    root = tmp_path_factory.mktemp("artifacts")
    return {p: export_run(tiny_run[0], str(root / p), precision=p) and str(root / p) for p in ("fp32", "fp16", "int8")}


@contextlib.contextmanager
def http_server(app, **config):
    """Serves an ASGI app with uvicorn on a free local port in a thread; yields its URL.
    ``config`` goes to ``uvicorn.Config`` (e.g. the server's ``http`` protocol)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def predict_each_candidate_alone(model, grouped, requests):
    """Scores every candidate of ``grouped[requests]`` as a one-candidate request with the
    same shared history (the request's offsets shrunk to that candidate), concatenated."""
    import numpy as np
    import torch

    from torchrec_genrec.data.ranking_batching import RankingDataset

    sizes = grouped.candidates_per_request()
    alone = []
    for r in requests:
        for k in range(sizes[r]):
            single = RankingDataset.__new__(RankingDataset)
            single.__dict__.update(grouped.__dict__)
            start = grouped.offsets[r] + k
            single.offsets = np.array([start, start + 1])
            single.history_start, single.history_end = grouped.history_start[[r]], grouped.history_end[[r]]
            alone.append(model.predict(single[[0]]))
    return torch.cat(alone)


#: The repository root and its shipped recipes (tests run them as a user would).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL_RECIPE = os.path.join(ROOT, "apps", "configs", "hstu_ml100k.toml")
RANKING_RECIPE = os.path.join(ROOT, "apps", "configs", "ranking_ml100k.toml")


def synthetic_store(tmp_path_factory, name, **config):
    """A sequence store of synthetic events (:class:`SyntheticConfig` ``config``) in a
    fresh temporary directory; returns its path."""
    from torchrec_genrec.data.store import write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate

    path = str(tmp_path_factory.mktemp(name) / "store")
    write_store(generate(SyntheticConfig(**config)), path)
    return path
