"""A run's checkpoint loads into an unsharded model that scores exactly as the trained one."""

import json
import os

import numpy as np
import pytest

from torchrec_genrec import cli
from torchrec_genrec.data.batching import SequenceDataset
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import write_store
from torchrec_genrec.data.synthetic import SyntheticConfig, generate
from torchrec_genrec.export import load_trained_model
from torchrec_genrec.train.evaluate import evaluate_retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unsharded_model_reproduces_the_runs_test_metrics(tmp_path):
    store = str(tmp_path / "store")
    write_store(generate(SyntheticConfig(num_users=70, num_items=45, num_events=1100, min_seq_len=5, seed=8)), store)
    out = tmp_path / "run"
    settings = [f"data.dataset={store}", "data.max_seq_len=14", f"train.output_dir={out}", "train.epochs=2",
                "train.batch_size=16", "train.progress=false", "train.tensorboard=false", "model.embedding_dim=16",
                "model.attention_dim=8", "model.linear_dim=8", "model.num_negatives=8"]
    assert cli.main(["train", "--config", os.path.join(ROOT, "apps/configs/hstu_ml100k.toml"),
                     *[x for s in settings for x in ("--set", s)]]) == 0
    model, cfg = load_trained_model(str(out))
    assert cfg.data.max_seq_len == 14 and not model.training
    test = SequenceDataset(store, Split.TEST, cfg.data.max_seq_len, LeaveOneOut(cfg.data.holdout), with_seen_items=True)
    again = evaluate_retrieval(model.score, test, cfg.eval.ks, 32, return_ranks=True, progress=False)
    recorded = json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    saved = np.load(out / "test_ranks.npz")
    assert np.array_equal(again.pop("ranks").numpy(), saved["rank"])
    assert np.array_equal(again.pop("ranks_other_protocol").numpy(), saved["rank_other_protocol"])
    assert again.pop("seen_kept") == pytest.approx(recorded.pop("seen_kept"))
    assert again == pytest.approx(recorded)
    with pytest.raises(DataError, match="no checkpoint .step-999."):
        load_trained_model(str(out), checkpoint="step-999")
    with pytest.raises(DataError, match="no metrics.json"):
        load_trained_model(str(tmp_path))
