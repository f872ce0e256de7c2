"""The ranking recipe resumes exactly: interrupted after an epoch, killed mid-epoch, or
losing a rank under torchrun, it ends where an uninterrupted run ends; a 2-rank checkpoint
finishes on 1 rank."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, RANKING_RECIPE, synthetic_store
from torchrec_genrec import cli

RECIPE = RANKING_RECIPE
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synthetic_store(tmp_path_factory, "ranking_resume", num_users=80, num_items=60, num_events=3000, min_seq_len=5, seed=3)


def overrides(store_path, out, *extra):
    # Dropout stays on: the restored random state is part of what must be exact.
    settings = [f"data.dataset={store_path}", f"train.output_dir={out}", "model.name=dlrm", "model.embedding_dim=8",
                "model.dropout=0.2", "data.task.max_seq_len=8", "data.task.positive_threshold=1",
                "train.batch_size=128", "train.epochs=3", "train.patience=5", "train.progress=false",
                "train.tensorboard=false", *extra]
    return [x for s in settings for x in ("--set", s)]


def result(out):
    metrics = json.loads((out / "metrics.json").read_text())
    history = [{k: v for k, v in h.items() if k != "samples_per_s"} for h in metrics["training"]["history"]]
    return metrics["metrics"], history, np.load(out / "test_predictions.npz")["logit"], metrics["training"]


@pytest.fixture(scope="module")
def clean_run(store_path, tmp_path_factory):
    """Three uninterrupted epochs (19 steps each)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out)]) == 0
    return result(out)


def test_ranking_resume_after_an_epoch_is_bit_identical(store_path, clean_run, tmp_path, capsys):
    out = tmp_path / "part"
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1")]) == 0
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out)]) == 0
    metrics, history, logits, training = result(out)
    c_metrics, c_history, c_logits, c_training = clean_run
    assert c_training["resumed_from"] is None and training["resumed_from"] == "step-000000019"
    assert history == c_history and len(history) == 3 and metrics == c_metrics
    assert np.array_equal(logits, c_logits)
    # A plan whose optimiser state does not fit the checkpoint's is refused, saying why.
    saved = json.loads((out / "checkpoints" / "step-000000057" / "trainer.json").read_text())
    other = [p.rsplit(":", 1)[0].replace("data_parallel", "table_wise") + ":fused" for p in saved["sharding"]
             if ":data_parallel:" in p]
    assert other, saved["sharding"]  # the 1-rank plan keeps some small tables data-parallel
    code = cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.epochs=4",
                                                            "plan.pins=" + json.dumps(other[:1]))])
    assert code == 2 and "does not fit this model's sharding plan" in capsys.readouterr().err
    # Another model's checkpoint is refused, naming the way out; resume=never starts over.
    code = cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "model.embedding_dim=16")])
    assert code == 2 and "different model/data settings" in capsys.readouterr().err
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1",
                                                            "train.resume=never")]) == 0
    assert result(out)[3]["resumed_from"] is None


def test_ranking_run_killed_mid_epoch_resumes_bit_identical(store_path, clean_run, tmp_path):
    out = tmp_path / "killed"
    command = [os.path.join(BIN, "genrec"), "rank", "--config", RECIPE,
               *overrides(store_path, out, "train.checkpoint_every_steps=10", "train.fault_at_step=0:25",
                          f"train.fault_marker={tmp_path / 'fired'}")]
    # The killed run's thread count is this process's: reductions split over other thread
    # counts round differently, and bit-identity is the point.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 13 and "fault drill" in proc.stderr
    assert not (out / "metrics.json").exists()
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.checkpoint_every_steps=10",
                                                            "train.resume=must")]) == 0
    metrics, history, logits, training = result(out)
    c_metrics, c_history, c_logits, _ = clean_run
    assert training["resumed_from"] == "step-000000020"  # mid-epoch 1
    assert history == c_history and metrics == c_metrics and np.array_equal(logits, c_logits)
    assert training["steps"] == 57


def torchrun(store_path, out, *extra, env=None, max_restarts=0):
    # Dropout off here: two ranks then follow the same trajectory as one at the same global
    # batch (per-rank dropout masks would not), so a 2 -> 1 re-shard can be compared too.
    command = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "--max-restarts",
               str(max_restarts), os.path.join(BIN, "genrec"), "rank", "--config", RECIPE,
               *overrides(store_path, out, "train.batch_size=64", "train.epochs=2", "train.checkpoint_every_steps=10",
                          "model.dropout=0.0", *extra)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_rank_run(store_path, tmp_path_factory):
    """Two epochs on 2 ranks x 64 (18 global steps per epoch)."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    torchrun(store_path, out)
    return result(out)


def test_ranking_job_losing_a_rank_restarts_from_its_checkpoint(store_path, two_rank_run, tmp_path):
    # Rank 1 dies before step 25; torchrun restarts both, they resume from the step-20
    # checkpoint and end like the clean job.
    marker = tmp_path / "fired"
    faulty = torchrun(store_path, tmp_path / "faulty", "train.fault_at_step=1:25", f"train.fault_marker={marker}",
                      max_restarts=1)
    assert marker.exists() and "fault drill" in faulty.stderr
    c_metrics, c_history, c_logits, c_training = two_rank_run
    metrics, history, logits, training = result(tmp_path / "faulty")
    assert c_training["resumed_from"] is None and training["resumed_from"] == "step-000000020"
    assert training["world_size"] == 2 and training["steps"] == c_training["steps"]
    assert history == c_history and metrics == c_metrics and np.array_equal(logits, c_logits)


def test_a_two_rank_ranking_checkpoint_resumes_on_one_rank(store_path, two_rank_run, tmp_path):
    """Killed mid-epoch 1 on 2 ranks x 64, finished on 1 rank x 128: the tables keep the
    sharding types (and optimiser state) they were saved with, the data position carries
    over, and the run follows the clean 2-rank run."""
    out = tmp_path / "moved"
    command = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", os.path.join(BIN, "genrec"),
               "rank", "--config", RECIPE, *overrides(store_path, out, "train.batch_size=64", "train.epochs=2",
                                                     "train.checkpoint_every_steps=10", "model.dropout=0.0",
                                                     "train.fault_at_step=0:25",
                                                     f"train.fault_marker={tmp_path / 'fired'}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env).returncode != 0
    saved = json.loads((out / "checkpoints" / "step-000000020" / "trainer.json").read_text())
    assert saved["world_size"] == 2 and any(p.startswith("item:") for p in saved["sharding"])
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.batch_size=128", "train.epochs=2",
                                                            "train.checkpoint_every_steps=10", "model.dropout=0.0",
                                                            "train.resume=must")]) == 0
    c_metrics, c_history, _, _ = two_rank_run
    metrics, history, _, training = result(out)
    assert training["resumed_from"] == "step-000000020" and training["world_size"] == 1
    assert [h["epoch"] for h in history] == [0, 1]
    for a, b in zip(c_history, history):
        assert a["train_bce"] == pytest.approx(b["train_bce"], rel=1e-4)
    assert metrics["test"]["auc"] == pytest.approx(c_metrics["test"]["auc"], abs=1e-3)


def test_a_resume_continues_a_stopped_run_only_where_that_is_exact():
    """Early stopping ended the run: a raised patience trains on, the same patience has
    nothing left; a run cut by max_steps is refused rather than silently re-evaluated."""
    from torchrec_genrec.config import ConfigError
    from torchrec_genrec.train.checkpoint import resume_epoch, stop_reason

    history = [{"epoch": e} for e in range(4)]
    saved = {"epoch": 4, "step": 40, "best_epoch": 1, "history": history, "stopped": stop_reason(True, 40, None)}
    assert saved["stopped"] == "patience"
    assert resume_epoch(saved, epochs=10, patience=2, max_steps=None) == 10  # still stopped
    assert resume_epoch(saved, epochs=10, patience=5, max_steps=None) == 4   # patience raised: go on
    cut = {**saved, "stopped": stop_reason(False, 40, 40)}
    assert cut["stopped"] == "max_steps" and resume_epoch(cut, 10, 2, max_steps=40) == 10
    with pytest.raises(ConfigError, match="max_steps"):
        resume_epoch(cut, 10, 2, max_steps=None)
    assert resume_epoch({**saved, "stopped": ""}, 10, 2, None) == 4
    assert resume_epoch({**saved, "stopped": True}, 10, 5, None) == 10  # a checkpoint from before reasons
