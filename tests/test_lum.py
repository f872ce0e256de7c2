"""The LUM model: packed rows equal separate users, group queries equal single queries."""

import numpy as np
import pytest
import torch

from torchrec_genrec.data.lum import block_causal_mask, condition_item_sequences, pack_sequences
from torchrec_genrec.modules.lum import LUM, LUMConfig
from torchrec_genrec.train.content import behaviour_log


@pytest.fixture(scope="module")
def sequences(ml100k):
    return condition_item_sequences(ml100k, behaviour_log(ml100k), "genre", max_events=20)


def _model(space):
    torch.manual_seed(0)
    return LUM(LUMConfig(embedding_dim=16, num_layers=2, num_heads=2, max_positions=64, num_negatives=32,
                         dropout=0.0), space).eval()


def test_a_packed_row_computes_each_user_as_if_alone(sequences):
    model = _model(sequences.space)
    lengths = sequences.lengths()
    rows = [r for r in pack_sequences(lengths, 64) if len(r) >= 2][:2]
    packed = sequences.packed_rows(rows, 64)
    with torch.no_grad():
        together = model.encode(packed.tokens, packed.position, block_causal_mask(packed.segment))
        for r, row in enumerate(rows):
            for s in row:
                alone = sequences.packed_rows([[s]], int(lengths[s]))
                out = model.encode(alone.tokens, alone.position, block_causal_mask(alone.segment))[0]
                torch.testing.assert_close(together[r][packed.segment[r] == s], out, atol=1e-5, rtol=1e-5)


def test_group_query_equals_one_query_per_condition(sequences):
    model = _model(sequences.space)
    u = int(np.argmax(sequences.lengths()))
    prefix = torch.from_numpy(sequences.tokens[sequences.offsets[u]:sequences.offsets[u + 1]])
    conditions = model.space.to_tokens("condition", torch.tensor([1, 4, 7, 9]))
    with torch.no_grad():
        together = model.query(prefix, conditions)
        alone = torch.cat([model.query(prefix, c.view(1)) for c in conditions])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])  # the condition changes the interest
    assert model.item_scores(together).shape == (4, sequences.space.count("item"))


def test_next_condition_item_training_lowers_the_loss(sequences):
    model = _model(sequences.space).train()
    rows = pack_sequences(sequences.lengths(), 64)[:16]
    batch = sequences.packed_rows(rows, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first, stats = model.loss(batch.tokens, batch.segment, batch.position, g)
    assert stats["positions"] == int((sequences.lengths()[sum(rows, [])] // 2).sum())
    for _ in range(40):
        loss, _ = model.loss(batch.tokens, batch.segment, batch.position, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < float(first.detach()) - 0.5


def test_conditioned_retrieval_uses_only_pre_cutoff_training_and_scores_test_events(ml100k):
    """A short pre-training run and the retrieval test: the true condition must beat a
    wrong one (the condition carries the genre), and every metric is a rate."""
    from torchrec_genrec.train.lum import LUMRecipeConfig, conditioned_retrieval, pretrain_lum

    cfg = LUMRecipeConfig(dataset=ml100k.path, condition="genre", max_events=30, row_len=64, epochs=3,
                          model=LUMConfig(embedding_dim=16, num_layers=1, num_heads=2, max_positions=64,
                                          num_negatives=32))
    model, seqs, history = pretrain_lum(cfg)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    right = conditioned_retrieval(model, seqs, cfg)
    wrong = conditioned_retrieval(model, seqs, cfg, wrong_condition=True)
    assert right["events"] == wrong["events"] > 0 and 0.0 <= right["recall@10"] <= 1.0
    assert right["recall@10"] > wrong["recall@10"]
