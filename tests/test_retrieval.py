"""GenerativeRetrieval (HSTU / SASRec over the unified token table) and its trainer."""

import json
import os

import numpy as np
import pytest
import torch

from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
from torchrec_genrec.data.splits import Split
from torchrec_genrec.data.store import SequenceStore, write_store
from torchrec_genrec.data.synthetic import SyntheticConfig, generate
from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig

MAX_LEN = 12


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("retrieval") / "store")
    cfg = SyntheticConfig(num_users=60, num_items=40, num_events=900, min_seq_len=5, seed=3)
    write_store(generate(cfg), path)
    return path


def small_config(**overrides) -> RetrievalConfig:
    base = dict(embedding_dim=16, num_blocks=1, num_heads=2, attention_dim=8, linear_dim=8, dropout=0.0,
                num_negatives=8)
    base.update(overrides)
    return RetrievalConfig(**base)


def batches(store_path, split, n=16):
    ds = SequenceDataset(store_path, split, MAX_LEN, with_seen_items=split is not Split.TRAIN)
    return next(iter(make_dataloader(ds, n, shuffle=False)))


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@pytest.mark.parametrize("action_mode", ["interleaved", "summed", "none"])
@pytest.mark.parametrize("loss,negatives", [("sampled_softmax", "uniform"), ("sampled_softmax", "in_batch"),
                                            ("sampled_softmax", "mixed"), ("full_softmax", "uniform")])
def test_every_mode_trains_and_scores(store_path, name, action_mode, loss, negatives):
    store = SequenceStore.open(store_path)
    torch.manual_seed(0)
    model = GenerativeRetrieval(small_config(name=name, action_mode=action_mode, loss=loss, negatives=negatives,
                                             label_smoothing=0.1),
                                store.num_items, store.num_actions, MAX_LEN, device=torch.device("cpu"))
    model.set_item_frequencies(torch.arange(store.num_items) + 1.0)
    out = model(batches(store_path, Split.TRAIN))
    value = out["item_loss_sum"] / out["queries"]
    assert torch.isfinite(value) and out["queries"] > 0 and out["tokens"] > 0
    value.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert ("action_loss_sum" in out) == (action_mode != "none")
    model.eval()
    scores, action_logits = model.score(batches(store_path, Split.TEST))
    assert scores.shape == (16, store.num_items)
    assert (action_logits is None) == (action_mode == "none")


@pytest.mark.parametrize("action_mode", ["interleaved", "summed"])
def test_user_representation_never_sees_the_target(store_path, action_mode):
    # With the action head, the target item token is appended after the history: the
    # retrieval scores must not depend on it (causal), only the action prediction may.
    store = SequenceStore.open(store_path)
    torch.manual_seed(0)
    model = GenerativeRetrieval(small_config(action_mode=action_mode), store.num_items, store.num_actions,
                                MAX_LEN, device=torch.device("cpu")).eval()
    batch = batches(store_path, Split.TEST)
    scores, logits = model.score(batch)
    batch.target_item = (batch.target_item + 7) % store.num_items
    scores2, logits2 = model.score(batch)
    torch.testing.assert_close(scores, scores2)
    assert not torch.allclose(logits, logits2)


def test_out_of_range_item_is_a_clear_error(store_path):
    store = SequenceStore.open(store_path)
    model = GenerativeRetrieval(small_config(), store.num_items // 4, store.num_actions, MAX_LEN,
                                device=torch.device("cpu"))
    with pytest.raises(ValueError, match="item ids must lie in"):
        model(batches(store_path, Split.TRAIN))


def test_fused_optimizer_updates_negatives_looked_up_through_the_collection(store_path):
    # TorchRec's fused optimiser only updates rows looked up by the sharded module: the
    # sampled negatives must change, rows nobody touched must not.
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.sharding import OptimConfig, build_optimizer, shard

    store = SequenceStore.open(store_path)
    ctx = init_distributed()
    torch.manual_seed(0)
    model = GenerativeRetrieval(small_config(action_mode="none", num_negatives=3), store.num_items,
                                store.num_actions, MAX_LEN)
    dmp = shard(model, ctx, OptimConfig(sparse_lr=0.5), batch_size=4)
    optimizer = build_optimizer(dmp, OptimConfig())

    def table():
        (tensor,) = [v for k, v in dmp.state_dict().items() if k.endswith("tokens.weight")]
        return tensor.local_shards()[0].tensor.clone()

    batch = batches(store_path, Split.TRAIN, n=1)
    history = set((batch.features["item"].values() + model.space.offset("item")).tolist())
    before = table()
    negatives = model.space.offset("item") + model.uniform_negatives(batch.user, int(model.step))  # what forward draws
    loss = dmp(batch)["item_loss_sum"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = set(torch.nonzero((table() != before).any(1)).flatten().tolist())
    assert set(negatives.flatten().tolist()) - history <= changed
    assert changed <= history | set(negatives.flatten().tolist())


def test_recipe_end_to_end_with_checkpoints(store_path, tmp_path):
    from torchrec_genrec import cli

    out = tmp_path / "run"
    code = cli.main([
        "train", "--config", "apps/configs/hstu_ml100k.toml",
        "--set", f"data.dataset={store_path}", "--set", f"data.max_seq_len={MAX_LEN}",
        "--set", f"train.output_dir={out}", "--set", "train.epochs=2", "--set", "train.batch_size=16",
        "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
        "--set", "train.progress=false",
    ])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["training"]["epochs_run"] == 2
    assert 0 <= result["metrics"]["test"]["ndcg@10"] <= result["metrics"]["test"]["hr@10"] <= 1
    assert result["metrics"]["test"]["count"] == len(SequenceDataset(store_path, Split.TEST, MAX_LEN))
    ranks = np.load(out / "test_ranks.npz")
    assert len(ranks["user"]) == len(ranks["rank"]) == result["metrics"]["test"]["count"]
    assert np.isclose((ranks["rank"] < 10).mean(), result["metrics"]["test"]["hr@10"])
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "best" in ckpts and not any(c.endswith(".tmp") for c in ckpts)
    steps = [c for c in ckpts if c.startswith("step-")]
    assert len(steps) == 2 and os.path.exists(out / "checkpoints" / steps[-1] / "trainer.json")
    assert os.path.exists(out / "checkpoints" / "best" / ".metadata")


def test_tables_are_seeded_independently_of_the_plan(store_path):
    # Element (row, col) of the token table is a function of (seed, table, row, col), so a
    # row-wise and a table-wise plan start from the same model, and another seed does not.
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.sharding import OptimConfig, shard

    store = SequenceStore.open(store_path)
    ctx = init_distributed()

    def table(pin, seed):
        torch.manual_seed(seed + 100)  # the global generator must not matter
        model = GenerativeRetrieval(small_config(), store.num_items, store.num_actions, MAX_LEN, seed=seed)
        dmp = shard(model, ctx, OptimConfig(), batch_size=4, pins=[pin])
        (tensor,) = [v for k, v in dmp.state_dict().items() if k.endswith("tokens.weight")]
        return tensor.local_shards()[0].tensor.clone()

    a = table("tokens:row_wise", 0)
    assert torch.equal(a, table("tokens:table_wise", 0))
    assert not torch.equal(a, table("tokens:row_wise", 1))
    assert float(a.abs().max()) <= 0.04 and 0.01 < float(a.std()) < 0.03


def test_sampled_cross_entropy_agrees_with_torch_and_leaves_out_accidental_hits():
    """The sampled loss is plain cross-entropy with the positive in column 0: equal to
    ``F.cross_entropy`` (label smoothing included) when nothing is excluded, and an excluded
    candidate (a negative that is the positive) counts as if it were not there."""
    from torchrec_genrec.models.retrieval import _sampled_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(7, 6, dtype=torch.float64)
    target = torch.zeros(7, dtype=torch.int64)
    none = torch.zeros(7, 6, dtype=torch.bool)
    for eps in (0.0, 0.1, 0.5):
        torch.testing.assert_close(_sampled_cross_entropy(logits, none, eps),
                                   torch.nn.functional.cross_entropy(logits, target, reduction="sum",
                                                                     label_smoothing=eps))
    excluded = none.clone()
    excluded[2, 3] = excluded[5, 1] = True
    keep = [[c for c in range(6) if not excluded[r, c]] for r in range(7)]
    expected = sum(torch.nn.functional.cross_entropy(logits[r, keep[r]].unsqueeze(0), target[:1], reduction="sum",
                                                     label_smoothing=0.2) for r in range(7))
    torch.testing.assert_close(_sampled_cross_entropy(logits, excluded, 0.2), expected)


@pytest.mark.parametrize("negatives", ["in_batch", "mixed"])
def test_logq_correction_subtracts_the_sampling_log_probability(store_path, negatives):
    """Equal item frequencies shift every candidate of a route by one constant: with in-batch
    negatives alone (and with uniform ones, whose q is 1/N = the equal frequency) the loss is
    the uncorrected one. Skewed frequencies change it; no frequencies is a clear error."""
    store = SequenceStore.open(store_path)
    batch = batches(store_path, Split.TRAIN)

    def loss(logq, counts):
        torch.manual_seed(0)
        model = GenerativeRetrieval(small_config(negatives=negatives, logq_correction=logq), store.num_items,
                                    store.num_actions, MAX_LEN, device=torch.device("cpu"))
        if counts is not None:
            model.set_item_frequencies(counts)
        torch.manual_seed(1)  # the in-batch draw
        out = model(batch)
        return out["item_loss_sum"] / out["queries"]

    plain = loss(False, None)
    torch.testing.assert_close(loss(True, torch.ones(store.num_items)), plain)
    skewed = torch.arange(store.num_items, dtype=torch.float32) ** 2 + 1
    assert not torch.allclose(loss(True, skewed), plain)
    with pytest.raises(RuntimeError, match="set_item_frequencies"):
        loss(True, None)


def test_both_seen_item_protocols_come_from_one_evaluation(store_path):
    """``exclude_seen`` picks the protocol reported; the other comes along under
    ``seen_kept`` / ``seen_excluded`` and equals an evaluation under that protocol. A scorer
    that puts every seen item first is perfect when they are removed and is not when they
    are ranked."""
    from torchrec_genrec.train.evaluate import evaluate_retrieval

    store = SequenceStore.open(store_path)
    ds = SequenceDataset(store_path, Split.TEST, MAX_LEN, with_seen_items=True)

    def seen_first(batch):
        scores = torch.zeros(batch.batch_size, store.num_items)
        seen = batch.seen_items
        scores[torch.repeat_interleave(torch.arange(batch.batch_size), seen.lengths()), seen.values()] = 2.0
        scores[torch.arange(batch.batch_size), batch.target_item] = 1.0
        return scores

    excluded = evaluate_retrieval(seen_first, ds, [10], 16, progress=False, return_ranks=True)
    kept = evaluate_retrieval(seen_first, ds, [10], 16, progress=False, exclude_seen=False, return_ranks=True)
    assert excluded["mrr"] == 1.0 and kept["mrr"] < 0.5
    plain = lambda m: {k: v for k, v in m.items() if not isinstance(v, (dict, torch.Tensor))}  # noqa: E731
    assert excluded["seen_kept"] == plain(kept) and kept["seen_excluded"] == plain(excluded)
    assert torch.equal(excluded["ranks_other_protocol"], kept["ranks"])
