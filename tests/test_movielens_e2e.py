"""The README's main path on the real embedded data: fetch, prepare, train, evaluate."""

import json
import os

import numpy as np
import pytest

from torchrec_genrec import cli
from torchrec_genrec.data import datasets
from torchrec_genrec.data.errors import DataError


def test_prepare_movielens_100k_counts(ml100k, capsys):
    assert (ml100k.num_users, ml100k.num_items, ml100k.num_events) == (943, 1682, 100000)
    assert ml100k.action_values == [1.0, 2.0, 3.0, 4.0, 5.0]
    lengths = ml100k.lengths
    assert lengths.min() >= 20 and lengths.sum() == 100000  # every ML-100K user rated >= 20 movies
    # Sequences are time-ordered within each user.
    ts = np.asarray(ml100k.timestamp)
    starts = np.asarray(ml100k.offsets)[:-1]
    inside = np.ones(len(ts), dtype=bool)
    inside[starts] = False
    assert (np.diff(ts)[inside[1:]] >= 0).all()
    items = ml100k.item_features()
    assert items.num_rows == 1682 and "genres" in items.column_names
    assert ml100k.user_features().num_rows == 943
    # Raw ids round-trip: ML-100K ids are 1..943 / 1..1682.
    assert ml100k.user_raw_ids()[0] == 1 and ml100k.item_raw_ids()[-1] == 1682


def test_prepare_is_cached(ml100k, capsys):
    before = os.path.getmtime(os.path.join(ml100k.path, "manifest.json"))
    assert cli.main(["prepare", "movielens-100k"]) == 0
    assert "943 users, 1682 items, 100000 interactions" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(ml100k.path, "manifest.json")) == before


def test_mostpop_recipe_end_to_end(ml100k, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--config", "apps/configs/mostpop_ml100k.toml", "--set", f"train.output_dir={out}"])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    test = result["metrics"]["test"]
    assert test["count"] == 943
    # Popularity must beat a random ranking (HR@10 = 10 / ~1600 unseen items) by far.
    assert test["hr@10"] > 5 * 10 / 1682
    assert 0 < test["ndcg@10"] <= test["hr@10"] <= test["hr@50"] <= test["hr@200"] <= 1
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert "test  (943 users)" in capsys.readouterr().out


def test_unprepared_dataset_says_how_to_fix(genrec_home, capsys):
    code = cli.main(["train", "--config", "apps/configs/mostpop_ml100k.toml", "--set", "data.dataset=movielens-1m"])
    assert code == 2
    assert "genrec prepare movielens-1m --path DIR" in capsys.readouterr().err


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'movielens-5m'.*known: movielens-100k"):
        datasets.prepare("movielens-5m")


def test_doctor_reports_the_known_good_stack(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torchrec" in out and "fbgemm operators" in out and "known-good" in out
