"""Checkpoints resume exactly: an interrupted and resumed run ends where an uninterrupted one does."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, RETRIEVAL_RECIPE, synthetic_store
from torchrec_genrec import cli

RECIPE = RETRIEVAL_RECIPE


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synthetic_store(tmp_path_factory, "resume", num_users=96, num_items=50, num_events=1500, min_seq_len=5, seed=4)


def overrides(store_path, out, *extra):
    # Dropout stays on (0.2): the restored random state is part of what must be exact.
    settings = [f"data.dataset={store_path}", "data.max_seq_len=16", f"train.output_dir={out}",
                "train.batch_size=16", "train.eval_every=1", "train.progress=false", "train.tensorboard=false",
                "model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "model.num_negatives=16",
                *extra]
    return [x for s in settings for x in ("--set", s)]


def result(out):
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = np.load(out / "test_ranks.npz")["rank"]
    history = [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in metrics["training"]["history"]]
    return metrics["metrics"], history, ranks, metrics["training"]


def test_resume_after_an_epoch_is_bit_identical(store_path, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, full, "train.epochs=3")]) == 0
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, part, "train.epochs=1")]) == 0
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, part, "train.epochs=3")]) == 0
    m_full, h_full, r_full, t_full = result(full)
    m_part, h_part, r_part, t_part = result(part)
    assert t_full["resumed_from"] is None and t_part["resumed_from"].startswith("step-")
    assert h_part == h_full and len(h_full) == 3
    assert m_part == m_full
    assert np.array_equal(r_part, r_full)


def test_resume_refuses_a_checkpoint_of_another_model(store_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1")]) == 0
    code = cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=2", "model.num_blocks=3")])
    assert code == 2
    assert "different model/data settings" in capsys.readouterr().err
    # resume=never starts over in the same directory.
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1", "model.num_blocks=3",
                                                             "train.resume=never")]) == 0


def torchrun(store_path, out, nproc, *extra, env=None, max_restarts=0):
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node",
               str(nproc), "--max-restarts", str(max_restarts), "-m", "torchrec_genrec.cli", "train", "--config",
               RECIPE, *overrides(store_path, out, *extra)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_killed_rank_recovers_from_the_last_checkpoint_with_nothing_lost(store_path, tmp_path):
    # 2 ranks, batch 16 each: 3 steps per epoch. Rank 1 dies before step 5 (mid-epoch 1);
    # torchrun restarts both; they resume from the step-4 checkpoint and finish.
    common = ("train.epochs=3", "train.batch_size=16", "train.checkpoint_every_steps=2")
    clean = torchrun(store_path, tmp_path / "clean", 2, *common)
    marker = tmp_path / "fault-fired"
    faulty = torchrun(store_path, tmp_path / "faulty", 2, *common, "train.fault_at_step=1:5",
                      f"train.fault_marker={marker}", max_restarts=1)
    assert marker.exists(), "the fault drill did not fire"
    assert "fault drill" in faulty.stderr
    m_clean, h_clean, r_clean, t_clean = result(tmp_path / "clean")
    m_faulty, h_faulty, r_faulty, t_faulty = result(tmp_path / "faulty")
    assert t_clean["resumed_from"] is None and t_faulty["resumed_from"] == "step-000000004"
    assert h_faulty == h_clean and m_faulty == m_clean and np.array_equal(r_faulty, r_clean)


def test_two_rank_checkpoint_resumes_on_one_rank(store_path, tmp_path):
    out = tmp_path / "reshard"
    # 2 ranks x 8 users resume as 1 rank x 16: the same global batch.
    torchrun(store_path, out, 2, "train.epochs=1", "train.batch_size=8")
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=2",
                                                             "train.batch_size=16")]) == 0
    metrics, history, _, training = result(out)
    assert training["resumed_from"].startswith("step-")
    assert [h["epoch"] for h in history] == [0, 1]
    assert metrics["test"]["count"] > 0 and 0 <= metrics["test"]["ndcg@10"] <= 1


class _MappedHandler:
    """An iopath handler serving ``genrectest://`` from a local directory (a stand-in for an
    object store): every file operation of the checkpointer must go through it."""

    def __new__(cls, root):
        from iopath.common.file_io import PathHandler

        class Handler(PathHandler):
            calls = 0

            def _get_supported_prefixes(self):
                return ["genrectest://"]

            def _local(self, path):
                Handler.calls += 1
                return os.path.join(root, path[len("genrectest://"):])

            def _get_local_path(self, path, **kwargs):
                return self._local(path)

            def _open(self, path, mode="r", **kwargs):
                return open(self._local(path), mode)

            def _exists(self, path, **kwargs):
                return os.path.exists(self._local(path))

            def _isdir(self, path, **kwargs):
                return os.path.isdir(self._local(path))

            def _isfile(self, path, **kwargs):
                return os.path.isfile(self._local(path))

            def _ls(self, path, **kwargs):
                return os.listdir(self._local(path))

            def _mkdirs(self, path, **kwargs):
                os.makedirs(self._local(path), exist_ok=True)

            def _rm(self, path, **kwargs):
                local = self._local(path)
                os.rmdir(local) if os.path.isdir(local) else os.remove(local)

            def _mv(self, src, dst, **kwargs):
                os.rename(self._local(src), self._local(dst))
                return True

        return Handler()


def test_checkpoints_through_an_iopath_handler(store_path, tmp_path):
    from torchrec_genrec.train.storage import path_manager

    root = tmp_path / "bucket"
    root.mkdir()
    handler = _MappedHandler(str(root))
    path_manager.register_handler(handler, allow_override=True)
    out = tmp_path / "run"
    args = ["train.checkpoint_dir=genrectest://run1/checkpoints", "train.checkpoint_every_steps=2"]
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1", *args)]) == 0
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=2", *args)]) == 0
    _, history, _, training = result(out)
    assert training["resumed_from"].startswith("step-") and len(history) == 2
    stored = sorted(os.listdir(root / "run1" / "checkpoints"))
    assert "best" in stored and any(s.startswith("step-") for s in stored)
    assert not (out / "checkpoints").exists() and type(handler).calls > 0


def test_mid_epoch_checkpoint_of_two_ranks_resumes_on_one_at_the_same_data_position(store_path, tmp_path):
    # Dropout off: then 2 ranks x 8 train exactly like 1 rank x 16 (tests/test_distributed.py),
    # so a 2-rank run killed mid-epoch and finished on 1 rank must follow the clean 2-rank run.
    common = ("train.epochs=2", "train.checkpoint_every_steps=2", "model.dropout=0.0")
    torchrun(store_path, tmp_path / "clean", 2, *common, "train.batch_size=8")
    out = tmp_path / "moved"
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "torchrec_genrec.cli", "train", "--config", RECIPE,
               *overrides(store_path, out, *common, "train.batch_size=8", "train.fault_at_step=0:9",
                          f"train.fault_marker={tmp_path / 'fired'}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env).returncode != 0
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, *common, "train.batch_size=16",
                                                             "train.resume=must")]) == 0
    m_clean, h_clean, r_clean, _ = result(tmp_path / "clean")
    m_moved, h_moved, r_moved, t_moved = result(out)
    assert t_moved["resumed_from"] == "step-000000008"  # 6 steps per epoch: mid-epoch 1
    assert [h["epoch"] for h in h_moved] == [0, 1]
    for a, b in zip(h_clean, h_moved):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 * abs(a["train_loss"])
    assert abs(m_clean["test"]["ndcg@10"] - m_moved["test"]["ndcg@10"]) < 1e-3
