"""Tests of the synthetic event-log generator and its MovieLens-format writer."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest

from torchrec_genrec.data.readers import read_interactions, read_movielens_1m
from torchrec_genrec.data.store import SequenceStore, write_store
from torchrec_genrec.data.synthetic import (
    BLOCK_USERS,
    SyntheticConfig,
    SyntheticWorld,
    expected_hit_rate,
    generate,
    write_csv,
    write_movielens_1m,
)

SMALL = SyntheticConfig(num_users=2500, num_items=1000, num_events=100_000, seed=7)
PLANTED = SyntheticConfig(num_users=1500, num_items=400, num_events=60_000, num_clusters=8,
                          p_cluster=0.8, p_markov=0.5, seed=11)


@pytest.fixture(scope="module")
def small() -> pa.Table:
    return generate(SMALL).events


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def test_same_seed_same_events_any_chunk_size(small: pa.Table) -> None:
    assert generate(SMALL).events.equals(small)
    # Chunks are whole blocks of users drawn from per-block streams: chunking changes nothing.
    world = SyntheticWorld(SMALL)
    tiny = pa.Table.from_batches(list(world.batches(chunk_events=1)))
    assert tiny.equals(small)
    assert len(list(world.batches(chunk_events=1))) == -(-SMALL.num_users // BLOCK_USERS)
    other = generate(dataclasses.replace(SMALL, seed=8)).events
    assert not np.array_equal(_np(other, "item"), _np(small, "item"))


def test_counts_match_the_config(small: pa.Table) -> None:
    assert small.num_rows == SMALL.num_events
    assert small.schema.names == ["user", "item", "timestamp", "action"]
    assert all(t == pa.int64() for t in small.schema.types)
    lengths = np.bincount(_np(small, "user"))
    assert len(lengths) == SMALL.num_users and lengths.min() >= SMALL.min_seq_len
    item = _np(small, "item")
    assert item.min() >= 0 and item.max() < SMALL.num_items
    action = np.bincount(_np(small, "action"), minlength=SMALL.num_actions) / small.num_rows
    np.testing.assert_allclose(action, np.array(SMALL.action_probs) / sum(SMALL.action_probs), atol=0.01)


def test_lengths_are_long_tailed(small: pa.Table) -> None:
    lengths = np.bincount(_np(small, "user"))
    mean = SMALL.num_events / SMALL.num_users
    assert lengths.max() > 8 * mean
    assert np.median(lengths) < mean  # most users are below the mean: a right tail


def test_popularity_is_zipf_like(small: pa.Table) -> None:
    counts = np.sort(np.bincount(_np(small, "item"), minlength=SMALL.num_items))[::-1]
    assert counts[0] > 50 * np.median(counts)
    # log-count against log-rank has slope about -item_zipf over the well-sampled head.
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.3 < slope < -0.9
    # Popularity is shuffled over ids: the most popular item is not item 0.
    world = SyntheticWorld(SMALL)
    assert np.argsort(-world.popularity)[:10].tolist() != list(range(10))


def test_timestamps_increase_per_user(small: pa.Table) -> None:
    user, ts = _np(small, "user"), _np(small, "timestamp")
    assert np.all(np.diff(user) >= 0)  # grouped by user
    same = user[1:] == user[:-1]
    assert np.all(np.diff(ts)[same] > 0)
    assert ts.min() >= SMALL.start_timestamp


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="num_events"):
        SyntheticConfig(num_users=10, num_events=20, min_seq_len=5)
    with pytest.raises(ValueError, match="p_cluster and p_markov"):
        SyntheticConfig(p_markov=1.5)


def test_planted_structure_and_oracle() -> None:
    world = SyntheticWorld(PLANTED)
    events = pa.Table.from_batches(list(world.batches()))
    user, item = _np(events, "user"), _np(events, "item")
    same = user[1:] == user[:-1]
    follows = (world.successors[item[:-1]] == item[1:, None]).any(axis=1)[same]
    # Markov steps plus the odd independent draw that happens to hit a successor.
    assert 0.48 < follows.mean() < 0.56
    in_cluster = world.item_cluster[item] == world.user_cluster[user]
    # p_cluster of the non-Markov half, plus chance hits.
    assert in_cluster.mean() > 0.4

    u = 3
    history = item[world.offsets[u]:world.offsets[u + 1]]
    p = world.next_item_distribution(int(history[-2]), u)
    assert p.shape == (PLANTED.num_items,) and abs(p.sum() - 1) < 1e-9
    posterior = world.cluster_posterior(history[:-1])
    assert posterior.argmax() == world.user_cluster[u] and posterior.max() > 0.99
    q = world.posterior_next_item_distribution(history[:-1])
    assert abs(q.sum() - 1) < 1e-9
    np.testing.assert_allclose(q, p, atol=1e-6)  # the cluster is known from a long history
    assert expected_hit_rate(q, 10) > expected_hit_rate(world.popularity, 10)
    # The realised oracle HR@10 over all users agrees with its expectation.
    hits, expected = [], []
    for u in range(PLANTED.num_users):
        h = item[world.offsets[u]:world.offsets[u + 1]]
        q = world.posterior_next_item_distribution(h[:-1])
        hits.append(h[-1] in np.argpartition(-q, 10)[:10])
        expected.append(expected_hit_rate(q, 10))
    assert abs(np.mean(hits) - np.mean(expected)) < 0.04


def test_csv_round_trip_through_the_store(tmp_path, small: pa.Table) -> None:
    path = str(tmp_path / "events.csv")
    assert write_csv(SMALL, path, chunk_events=10_000) == SMALL.num_events
    with open(path) as f:
        assert f.readline() == "user,item,timestamp,action\n"
    data = read_interactions(path, action_col="action")
    assert data.events.select(["user", "item", "timestamp", "action"]).equals(small)
    stats = write_store(data, str(tmp_path / "store"))
    store = SequenceStore.open(str(tmp_path / "store"))
    assert (stats.num_events, store.num_events) == (SMALL.num_events, SMALL.num_events)
    assert store.num_users == SMALL.num_users
    assert store.num_actions == SMALL.num_actions
    np.testing.assert_array_equal(store.lengths, np.bincount(_np(small, "user")))
    items = store.item_raw_ids()[store.item[store.offsets[5]:store.offsets[6]]]
    np.testing.assert_array_equal(items, _np(small, "item")[_np(small, "user") == 5])


def test_movielens_1m_format(tmp_path) -> None:
    config = SyntheticConfig.movielens_1m_like(num_users=300, num_items=200, num_events=30_000,
                                               num_clusters=5, seed=2)
    directory = str(tmp_path / "ml")
    assert write_movielens_1m(config, directory) == config.num_events
    read = {}
    for name in ("ratings.dat", "movies.dat", "users.dat"):
        with open(os.path.join(directory, name), encoding="latin-1") as f:
            read[name] = [line.rstrip("\n").split("::") for line in f]
    ratings = np.array(read["ratings.dat"], dtype=np.int64)
    assert ratings.shape == (config.num_events, 4)
    assert ratings[:, 0].min() == 1 and ratings[:, 0].max() == config.num_users
    assert ratings[:, 1].min() >= 1 and ratings[:, 1].max() <= config.num_items
    assert set(np.unique(ratings[:, 2])) == {1, 2, 3, 4, 5}
    movies = read["movies.dat"]
    assert len(movies) == config.num_items and {len(m) for m in movies} == {3}
    assert movies[16][0] == "17" and movies[16][1].startswith("Synthetic Movie 17 (")
    assert all(g in ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                     "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                     "Thriller", "War", "Western") for m in movies for g in m[2].split("|"))
    users = read["users.dat"]
    assert len(users) == config.num_users and {len(u) for u in users} == {5}
    assert {u[1] for u in users} <= {"M", "F"} and all(len(u[4]) == 5 for u in users)

    data = read_movielens_1m(directory)
    assert data.num_events == config.num_events
    assert data.item_features.num_rows == config.num_items
    assert data.user_features.num_rows == config.num_users
    stats = write_store(data, str(tmp_path / "store"))
    assert (stats.num_users, stats.num_events, stats.num_actions) == (config.num_users, config.num_events, 5)


def test_genrec_prepare_synthetic_builds_a_store_once(tmp_path, capsys):
    """`genrec prepare synthetic` generates straight into a store (the GPU recipe's data is
    built where it trains); the same config is not generated twice, a bad one is an error
    naming the flags, and a directory of the user's is not overwritten."""
    from torchrec_genrec import cli
    from torchrec_genrec.data.store import SequenceStore

    out = tmp_path / "syn"
    flags = ["--users", "40", "--items", "500", "--events", "4000", "--zipf", "0.8", "--clusters", "5",
             "--p-markov", "0.3", "--out", str(out)]
    assert cli.main(["prepare", "synthetic", *flags]) == 0
    store = SequenceStore.open(str(out))
    assert store.num_users == 40 and store.num_events == 4000
    assert store.manifest["synthetic"]["p_markov"] == 0.3
    stamp = os.path.getmtime(out / "manifest.json")
    assert cli.main(["prepare", "synthetic", *flags]) == 0
    assert os.path.getmtime(out / "manifest.json") == stamp
    assert cli.main(["prepare", "synthetic", *flags, "--seed", "1"]) == 0  # another config: rebuilt
    assert SequenceStore.open(str(out)).manifest["synthetic"]["seed"] == 1
    capsys.readouterr()
    assert cli.main(["prepare", "synthetic", "--users", "40", "--events", "10", "--out", str(tmp_path / "x")]) == 2
    assert "num_events (10) must be >= num_users * min_seq_len" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli.main(["prepare", "synthetic", *flags[:-1], str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
