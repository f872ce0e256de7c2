"""The ranking recipe resumes exactly: interrupted after an epoch, killed mid-epoch, or
losing a rank under torchrun, it ends where an uninterrupted run ends."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from torchrec_genrec import cli
from torchrec_genrec.data.store import write_store
from torchrec_genrec.data.synthetic import SyntheticConfig, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "apps", "configs", "ranking_ml100k.toml")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ranking_resume") / "store")
    write_store(generate(SyntheticConfig(num_users=80, num_items=60, num_events=3000, min_seq_len=5, seed=3)), path)
    return path


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
    # Another model's checkpoint is refused, naming the way out; resume=never starts over.
    code = cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "model.embedding_dim=16")])
    assert code == 2 and "different model/data settings" in capsys.readouterr().err
    assert cli.main(["rank", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1",
                                                            "train.resume=never")]) == 0
    assert result(out)[3]["resumed_from"] is None


def test_ranking_run_killed_mid_epoch_resumes_bit_identical(store_path, clean_run, tmp_path):
    out = tmp_path / "killed"
    command = [os.path.join(BIN, "genrec"), "rank", "--config", RECIPE,
               *overrides(store_path, out, "train.checkpoint_every_steps=10")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENREC_FAULT_AT_STEP": "0:25",
           "GENREC_FAULT_MARKER": str(tmp_path / "fired")}
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


def test_ranking_job_losing_a_rank_restarts_from_its_checkpoint(store_path, tmp_path):
    # 2 ranks x 64: 18 global steps per epoch. Rank 1 dies before step 25; torchrun
    # restarts both, they resume from the step-20 checkpoint and end like the clean job.
    def torchrun(out, env=None, max_restarts=0):
        command = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "--max-restarts",
                   str(max_restarts), os.path.join(BIN, "genrec"), "rank", "--config", RECIPE,
                   *overrides(store_path, out, "train.batch_size=64", "train.epochs=2",
                              "train.checkpoint_every_steps=10")]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    torchrun(tmp_path / "clean")
    marker = tmp_path / "fired"
    faulty = torchrun(tmp_path / "faulty", {"GENREC_FAULT_AT_STEP": "1:25", "GENREC_FAULT_MARKER": str(marker)}, 1)
    assert marker.exists() and "fault drill" in faulty.stderr
    c_metrics, c_history, c_logits, c_training = result(tmp_path / "clean")
    metrics, history, logits, training = result(tmp_path / "faulty")
    assert c_training["resumed_from"] is None and training["resumed_from"] == "step-000000020"
    assert training["world_size"] == 2 and training["steps"] == c_training["steps"]
    assert history == c_history and metrics == c_metrics and np.array_equal(logits, c_logits)
