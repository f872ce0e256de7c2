"""The ranking dataset: labels, features, leakage-free histories, time split, grouped requests."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.ranking import RankingConfig, RankingData
from torchrec_genrec.data.splits import GlobalTimeSplit, Split
from torchrec_genrec.data.store import write_store
from torchrec_genrec.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    inter = generate(SyntheticConfig(num_users=60, num_items=40, num_events=2000, min_seq_len=4, seed=5))
    # Coarsen time to hours so that many of a user's events share a timestamp.
    events = inter.events
    hours = pa.array((events.column("timestamp").to_numpy() // 3600) * 3600)
    inter = dataclasses.replace(inter, events=events.set_column(events.schema.get_field_index("timestamp"),
                                                                "timestamp", hours))
    path = str(tmp_path_factory.mktemp("ranking") / "store")
    write_store(inter, path)
    return RankingData.build(path, RankingConfig(max_seq_len=5, window_seconds=7 * 86400, positive_threshold=1))


def test_histories_hold_strictly_earlier_events_of_the_same_user(data):
    ts, user = data.timestamp, data.user
    rng = np.random.default_rng(0)
    events = rng.choice(len(ts), 300, replace=False)
    assert (ts[1:] == ts[:-1]).sum() > 100  # the fixture does have ties
    for e in events:
        mine = np.nonzero(user == user[e])[0]
        expected = mine[ts[mine] < ts[e]]
        assert np.array_equal(np.arange(data.history_start[e], data.history_end[e]), expected)
    liked, other = data.history(events)
    for e, lk, ot in zip(events, liked, other):
        assert len(lk) <= 5 and len(ot) <= 5
        assert (data.label[lk] == 1).all() and (data.label[ot] == 0).all()
        assert (ts[np.concatenate([lk, ot]).astype(int)] < ts[e]).all()
        past = np.arange(data.history_start[e], data.history_end[e])
        assert np.array_equal(lk, past[data.label[past] == 1][-5:])  # the most recent ones


def test_split_by_time_and_grouped_requests(data):
    valid_start, test_start = GlobalTimeSplit(0.1, 0.1).cutoffs(data.store)
    assert (data.timestamp[data.samples(Split.TRAIN)] < valid_start).all()
    assert (data.timestamp[data.samples(Split.TEST)] >= test_start).all()
    total = sum(len(data.samples(s)) for s in Split)
    assert total == data.store.num_events
    offsets, events = data.requests(Split.TRAIN)
    assert offsets[-1] == len(events) and len(offsets) - 1 < len(events)  # some requests group several events
    for r in range(len(offsets) - 1):
        group = events[offsets[r]:offsets[r + 1]]
        assert len(set(data.user[group])) == 1
        assert data.timestamp[group].max() - data.timestamp[group].min() < 7 * 86400
        first = group[0]
        # The shared history (that of the first candidate) is strictly earlier than every candidate.
        shared = np.arange(data.history_start[first], data.history_end[first])
        assert (data.timestamp[shared] < data.timestamp[group].min()).all()


def test_labels_follow_the_threshold_and_a_store_without_actions_is_refused(data, tmp_path):
    values = np.asarray(data.store.action_values)
    assert np.array_equal(data.label, (values[np.asarray(data.store.action)] >= 1).astype(np.int8))
    inter = generate(SyntheticConfig(num_users=5, num_items=5, num_events=40, min_seq_len=3, seed=1))
    inter = dataclasses.replace(inter, events=inter.events.drop_columns(["action"]))
    write_store(inter, str(tmp_path / "no_actions"))
    with pytest.raises(DataError, match="has none"):
        RankingData.build(str(tmp_path / "no_actions"))


def test_movielens_features(ml100k):
    data = RankingData.build(ml100k.path)
    assert data.vocab_sizes["age"] == 8 and data.vocab_sizes["gender"] == 3 and data.vocab_sizes["weekday"] == 7
    raw_users = ml100k.user_raw_ids()
    first = int(np.nonzero(raw_users == 1)[0][0])  # user 1: 24, M, technician, 85711
    assert data.user_features["age"][first] == 2  # the 18-24 bucket
    assert data.vocabularies["gender"][data.user_features["gender"][first] - 1] == "M"
    assert data.vocabularies["zip"][data.user_features["zip"][first] - 1] == "857"
    toy_story = int(np.nonzero(ml100k.item_raw_ids() == 1)[0][0])
    genres = data.genre_values[data.genre_offsets[toy_story]:data.genre_offsets[toy_story + 1]]
    assert [data.vocabularies["genre"][g - 1] for g in genres] == ["Animation", "Children's", "Comedy"]
    assert data.vocabularies["year"][data.item_year[toy_story] - 1] == "1995"
    stats = data.stats()
    assert stats["train_samples"] + stats["valid_samples"] + stats["test_samples"] == 100000
    assert 0.4 < stats["test_positive_rate"] < 0.7


def test_the_builder_reads_movielens_1m_files(tmp_path):
    """ML-1M's users.dat / movies.dat carry the same features in another format (age
    codes, genres in the title file, the year inside the title)."""
    from torchrec_genrec.data.readers import read_movielens_1m

    raw = tmp_path / "ml-1m"
    raw.mkdir()
    (raw / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n1::914::4::978301968\n"
                                     "2::1193::2::978298413\n2::914::5::978299000\n")
    (raw / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                    "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                    "914::My Fair Lady (1964)::Musical|Romance\n", encoding="latin-1")
    (raw / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    write_store(read_movielens_1m(raw), str(tmp_path / "store"))
    data = RankingData.build(str(tmp_path / "store"), RankingConfig(valid_fraction=0.2, test_fraction=0.2))
    assert data.label.tolist() == [1, 1, 0, 0, 1]  # user 1 by time: 5, 4, 3; user 2: 2, 5
    assert data.vocab_sizes["gender"] == 3 and sorted(data.vocabularies["gender"]) == ["F", "M"]
    assert sorted(data.vocabularies["year"]) == ["1964", "1975", "1996"]
    assert "Musical" in data.vocabularies["genre"] and data.vocab_sizes["age"] == 8
    assert set(data.vocabularies["zip"]) == {"480", "700"}
    assert sorted(data.user_features["age"].tolist()) == [1, 7]  # "Under 18" and "56+"


def test_vectorised_request_windows_match_the_sequential_rule():
    """``window_starts`` (successor chains, pointer doubling) == the plain loop: a window
    opens at a user's first event and at the first event W or more after the window's start."""
    from torchrec_genrec.data.ranking import window_starts

    def reference(user, seconds, w):
        starts, opened = [0], seconds[0]
        for i in range(1, len(user)):
            if user[i] != user[i - 1] or seconds[i] - opened >= w:
                starts.append(i)
                opened = seconds[i]
        return np.asarray(starts + [len(user)])

    g = np.random.default_rng(0)
    for _ in range(300):
        n = int(g.integers(1, 80))
        user = np.sort(g.integers(0, 6, n))
        seconds = np.concatenate([np.sort(g.integers(0, 100, int((user == u).sum()))) for u in np.unique(user)])
        w = int(g.integers(1, 40))
        np.testing.assert_array_equal(window_starts(user, seconds, w), reference(user, seconds, w))
    np.testing.assert_array_equal(window_starts(np.array([0, 0, 0, 1]), np.array([0, 5, 12, 3]), 10), [0, 2, 3, 4])
    assert window_starts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 5).tolist() == [0]
    with pytest.raises(ValueError, match="window_seconds must be >= 1"):
        window_starts(np.array([0, 0]), np.array([0, 5]), 0)
    with pytest.raises(ValueError, match="user order"):
        window_starts(np.array([1, 0]), np.array([0, 5]), 10)
    with pytest.raises(ValueError, match="data.task.window_seconds"):
        RankingConfig(window_seconds=0)
