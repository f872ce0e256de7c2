"""`genrec tune`: an Optuna search whose trials are runs of the one Trainer, selected on
validation NDCG@10 only, written as a directory a user can read, and resumable."""

import json
import os

import pytest

from conftest import RETRIEVAL_RECIPE, synthetic_store
from torchrec_genrec.config import ConfigError

SPACE = """
[params."model.dropout"]
type = "float"
low = 0.0
high = 0.4

[params."model.loss"]
type = "categorical"
choices = ["sampled_softmax", "full_softmax"]

[params."train.optim.lr"]
type = "float"
low = 1e-3
high = 1e-2
log = true
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory, "tune", num_users=50, num_items=30, num_events=700, min_seq_len=6,
                           seed=7)


def _settings(store):
    return [f"data.dataset={store}", "data.max_seq_len=10", "model.embedding_dim=8", "model.attention_dim=8",
            "model.linear_dim=8", "model.num_blocks=1", "model.num_negatives=8", "train.batch_size=16",
            "train.epochs=3", "train.eval_every=1", "train.progress=false", "train.tensorboard=false"]


def _space(tmp_path, text=SPACE):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ('[params."model.dropout"]\ntype = "uniform"\nlow = 0\nhigh = 1', "type must be one of"),
    ('[params."model.dropout"]\ntype = "float"\nlow = 0.5\nhigh = 0.1', "low <= high"),
    ('[params."train.optim.lr"]\ntype = "float"\nlow = 0\nhigh = 1\nlog = true', "log-scale range must be positive"),
    ('[params."model.dropout"]\ntype = "float"\nlow = 0\nhigh = 0.5\nchoices = [1]', "do not apply"),
    ('[params."model.dropuot"]\ntype = "float"\nlow = 0\nhigh = 0.5', "model.dropuot"),
    ('[params."model.dropout"]\ntype = "float"\nlow = 0\nhigh = 2', "model.dropout"),
    ("[search]\nx = 1", "[params."),
])
def test_bad_search_spaces_are_refused_naming_file_and_key(store, tmp_path, text, message):
    from torchrec_genrec.train.tune import tune

    space = _space(tmp_path, text)
    with pytest.raises(ConfigError, match="space.toml") as e:
        tune(RETRIEVAL_RECIPE, space, 2, str(tmp_path / "out"), overrides=_settings(store))
    assert message in str(e.value)


def test_search_writes_a_readable_directory_resumes_and_never_tests(store, tmp_path, monkeypatch):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from torchrec_genrec import cli
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train import retrieval
    from torchrec_genrec.train.tune import tune

    evaluated = []
    original = retrieval.RetrievalTask.evaluate
    monkeypatch.setattr(retrieval.RetrievalTask, "evaluate",
                        lambda self, model, split, **kw: evaluated.append(split) or original(self, model, split, **kw))
    out, space = str(tmp_path / "search"), _space(tmp_path)
    summary = tune(RETRIEVAL_RECIPE, space, 3, out, overrides=_settings(store), startup_trials=1,
                   warmup_evaluations=1)
    assert set(evaluated) == {"valid"}, "a search must never evaluate the test split"
    assert {"trial-0000", "trial-0001", "trial-0002", "trials.md", "trials.csv", "best.toml", "best.json",
            "study.journal", "search.json"} <= set(os.listdir(out))
    assert sum(summary["trials"].values()) == 3 and summary["trials"]["fail"] == 0
    best = summary["best"]
    record = json.load(open(os.path.join(out, f"trial-{best['trial']:04d}", "trial.json")))
    assert record["params"] == best["params"] and max(record["evaluations"]) == pytest.approx(best["valid_ndcg@10"])
    assert len(open(os.path.join(out, "trials.md")).read().strip().splitlines()) == 2 + 2 + 3
    # best.toml is the whole recipe with the best settings: `genrec train --config` reads it.
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig

    cfg = load_config(RetrievalRecipeConfig, os.path.join(out, "best.toml"))
    assert cfg.model.dropout == pytest.approx(best["params"]["model.dropout"])
    assert cfg.model.loss == best["params"]["model.loss"] and cfg.data.dataset == store

    # Resumed: only the missing trials run; earlier trials are left as they are.
    before = os.path.getmtime(os.path.join(out, "trial-0000", "trial.json"))
    assert cli.main(["tune", "--config", RETRIEVAL_RECIPE, "--space", space, "--trials", "4", "--out", out,
                     "--startup-trials", "1", "--warmup-evaluations", "1",
                     *[a for s in _settings(store) for a in ("--set", s)]]) == 0
    assert os.path.isdir(os.path.join(out, "trial-0003")) and not os.path.exists(os.path.join(out, "trial-0004"))
    assert os.path.getmtime(os.path.join(out, "trial-0000", "trial.json")) == before
    # A trial a killed search left running is marked failed and replaced.
    study = optuna.load_study(study_name="genrec-tune",
                              storage=JournalStorage(JournalFileBackend(os.path.join(out, "study.journal"))))
    study.ask()  # trial 4, never told: what a kill mid-trial leaves
    summary = tune(RETRIEVAL_RECIPE, space, 5, out, overrides=_settings(store), startup_trials=1,
                   warmup_evaluations=1)
    assert summary["trials"]["fail"] == 1 and summary["trials"]["complete"] + summary["trials"]["pruned"] == 5
    # Another space (or config) in the same directory is refused, not mixed in.
    with pytest.raises(ConfigError, match="another config, space or seed"):
        tune(RETRIEVAL_RECIPE, _space(tmp_path, SPACE.replace("0.4", "0.3")), 6, out, overrides=_settings(store))
