"""The one trainer: TorchRec's pipeline and the plain loop train identically, a broken newest
checkpoint falls back to the previous intact one and the run ends as an uninterrupted run
from it, starting over never deletes an earlier run, pruning counts saves not step numbers,
the random state is saved weights-only, bf16 autocast trains, bad settings are clear errors."""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import RETRIEVAL_RECIPE, synthetic_store
from torchrec_genrec import cli
from torchrec_genrec.config import load_config
from torchrec_genrec.train.checkpoint import Checkpointer, rng_state, set_rng_state
from torchrec_genrec.train.distributed import init_distributed
from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, RetrievalTask
from torchrec_genrec.train.trainer import Trainer, seed_everything

RECIPE = RETRIEVAL_RECIPE


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synthetic_store(tmp_path_factory, "trainer", num_users=96, num_items=50, num_events=1500, min_seq_len=5, seed=4)


def settings(store_path, out, *extra):
    return [f"data.dataset={store_path}", "data.max_seq_len=16", f"train.output_dir={out}", "train.batch_size=16",
            "train.eval_every=1", "train.progress=false", "train.tensorboard=false", "model.embedding_dim=16",
            "model.attention_dim=8", "model.linear_dim=8", "model.num_negatives=16", *extra]


def overrides(store_path, out, *extra):
    return [x for s in settings(store_path, out, *extra) for x in ("--set", s)]


def result(out):
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = np.load(out / "test_ranks.npz")["rank"]
    history = [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in metrics["training"]["history"]]
    return metrics["metrics"], history, ranks, metrics["training"]


def _sharded_state(dmp):
    out = {}
    for k, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            v = torch.cat([s.tensor for s in v.local_shards()])
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
    return out


def test_sparse_dist_pipeline_and_plain_loop_train_identically(store_path, tmp_path):
    states, histories = {}, {}
    for pipeline in ("none", "sparse_dist"):
        cfg = load_config(RetrievalRecipeConfig, RECIPE, settings(
            store_path, tmp_path / pipeline, f"train.pipeline={pipeline}", "train.max_steps=9", "train.epochs=2",
            "train.checkpoint=false"))
        seed_everything(cfg.train.seed)
        trainer = Trainer(RetrievalTask(cfg, store_path), cfg.train)
        result = trainer.fit()
        histories[pipeline] = [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in result.history]
        states[pipeline] = _sharded_state(trainer.model)
    assert histories["none"] == histories["sparse_dist"] and len(histories["none"]) == 2
    assert states["none"].keys() == states["sparse_dist"].keys()
    for key, value in states["none"].items():
        assert torch.equal(value, states["sparse_dist"][key]), key


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


CORRUPTIONS = {
    "distcp_truncated": lambda d: [_truncate(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".distcp")],
    "metadata_truncated": lambda d: _truncate(os.path.join(d, ".metadata")),
    "trainer_json_truncated": lambda d: _truncate(os.path.join(d, "trainer.json")),
    "rng_truncated": lambda d: _truncate(os.path.join(d, "rng-rank0.pt")),
}


@pytest.fixture(scope="module")
def clean_three_epochs(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=3",
                                                            "train.checkpoint_every_steps=2")]) == 0
    return result(out)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(store_path, clean_three_epochs, tmp_path, caplog,
                                                                   corruption):
    out = tmp_path / "run"
    common = ("train.checkpoint_every_steps=2",)
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=2", *common)]) == 0
    checkpoints = out / "checkpoints"
    steps = sorted(d for d in os.listdir(checkpoints) if d.startswith("step-"))
    newest, previous = steps[-1], steps[-2]
    CORRUPTIONS[corruption](str(checkpoints / newest))
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=3", *common)]) == 0
    assert any(newest in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    metrics, history, ranks, training = result(out)
    c_metrics, c_history, c_ranks, _ = clean_three_epochs
    assert training["resumed_from"] == previous
    assert history == c_history and metrics == c_metrics and np.array_equal(ranks, c_ranks)


def test_resume_never_moves_an_earlier_run_aside_instead_of_overwriting_it(store_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1")]) == 0
    before = json.loads((out / "metrics.json").read_text())
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1", "model.num_blocks=3",
                                                            "train.resume=never")]) == 0
    moved = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
    assert len(moved) == 1
    kept = json.loads((tmp_path / moved[0] / "metrics.json").read_text())
    assert kept == before and os.path.isdir(tmp_path / moved[0] / "checkpoints" / "best")
    assert json.loads((out / "metrics.json").read_text())["config"]["model"]["num_blocks"] == 3


def test_pruning_keeps_the_newest_intact_checkpoints_by_save_counter(tmp_path):
    ctx = init_distributed()
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), ctx, keep_latest=2)
    state = {"w": torch.arange(4.0)}
    # A broken leftover with a higher step number than anything this run will write.
    stale = directory / "step-000099999"
    stale.mkdir()
    (stale / "trainer.json").write_text("{not json")
    for step in (5, 10, 15):
        checkpointer.save(f"step-{step:09d}", {"w": state["w"] + step}, {"step": step})
    names = sorted(d for d in os.listdir(directory) if d.startswith("step-"))
    assert names == ["step-000000010", "step-000000015", "step-000099999"]
    assert checkpointer.latest_intact() == "step-000000015"
    assert "trainer.json" in (checkpointer.problem("step-000099999") or "")
    saved = [json.loads((directory / n / "trainer.json").read_text())["save_index"] for n in names[:2]]
    assert saved == [2, 3]
    # The counter carries on in a new process (a resumed run), whatever the step numbers.
    again = Checkpointer(str(directory), ctx, keep_latest=2)
    again.save("step-000000001", {"w": state["w"]}, {"step": 1})
    assert again.latest_intact() == "step-000000001"
    assert sorted(d for d in os.listdir(directory) if d.startswith("step-")) == [
        "step-000000001", "step-000000015", "step-000099999"]


def test_random_state_round_trips_weights_only():
    import random

    seed_everything(3)
    state = rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_bf16_autocast_trains(store_path, tmp_path):
    cfg = load_config(RetrievalRecipeConfig, RECIPE, settings(
        store_path, tmp_path / "bf16", "train.precision=bf16", "train.epochs=2", "train.checkpoint=false"))
    seed_everything(cfg.train.seed)
    trainer = Trainer(RetrievalTask(cfg, store_path), cfg.train)
    history = trainer.fit().history
    losses = [h["train_item_loss"] for h in history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    fp32 = load_config(RetrievalRecipeConfig, RECIPE, settings(store_path, tmp_path / "fp32", "train.epochs=2",
                                                                "train.checkpoint=false"))
    assert Trainer(RetrievalTask(fp32, store_path), fp32.train).fingerprint != trainer.fingerprint


@pytest.mark.parametrize("setting,message", [
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.epochs=-1", "train.epochs must be >= 1"),
    ("train.patience=-2", "train.patience must be >= 0"),
    ("train.max_steps=0", "train.max_steps must be >= 1"),
    ("train.precision=fp16", "train.precision = 'fp16' is not one of"),
    ("train.fault_at_step=soon", "train.fault_at_step must be RANK:STEP"),
    ("train.optim.lr=0", "train.optim.lr must be > 0"),
    ("train.optim.betas=[0.9]", "train.optim.betas must be two numbers"),
    ("data.max_seq_len=0", "data.max_seq_len must be >= 2"),
    ("data.holdout=3", "data.holdout must be 1"),
    ("eval.ks=[5]", "eval.ks must be cut-offs"),
])
def test_bad_training_settings_are_clear_errors(store_path, tmp_path, capsys, setting, message):
    code = cli.main(["train", "--config", RECIPE, *overrides(store_path, tmp_path / "run", setting)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_export_refuses_a_corrupt_best_checkpoint(store_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", RECIPE, *overrides(store_path, out, "train.epochs=1")]) == 0
    _truncate(str(out / "checkpoints" / "best" / ".metadata"))
    code = cli.main(["export", str(out), "--out", str(tmp_path / "artifact")])
    err = capsys.readouterr().err
    assert code == 2 and ".metadata" in err and "Traceback" not in err
    assert not (tmp_path / "artifact").exists()
