"""LUM's <condition, item> sequences and packing."""

import numpy as np
import pytest
import torch

from torchrec_genrec.data.lum import (block_causal_mask, condition_item_sequences, pack_sequences,
                                      padding_waste)
from torchrec_genrec.data.splits import GlobalTimeSplit
from torchrec_genrec.train.content import behaviour_log


@pytest.fixture(scope="module")
def sequences(ml100k):
    return condition_item_sequences(ml100k, behaviour_log(ml100k), "genre", max_events=50)


def test_conditions_precede_their_items_and_only_pre_cutoff_events_are_used(ml100k, sequences):
    s = sequences
    valid_start, _ = GlobalTimeSplit(0.1, 0.1).cutoffs(ml100k)
    assert int(s.timestamps.max()) < valid_start
    assert (s.lengths() % 2 == 0).all() and s.lengths().max() == 100
    tokens = torch.from_numpy(s.tokens)
    is_cond = s.is_condition(tokens)
    assert is_cond[0::2].all() and not is_cond[1::2].any()
    # The condition is the genre of the item right after it.
    items = s.space.from_tokens("item", tokens[1::2]).numpy()
    conds = s.space.from_tokens("condition", tokens[0::2]).numpy()
    genres = ml100k.item_features().column("genres").to_pylist()
    vocab = sorted({g for gs in genres for g in (gs or [])})
    for item, cond in list(zip(items, conds))[:200]:
        assert vocab[cond - 1] == genres[item][0]
    # Each user's most recent events, in time order.
    u = int(np.argmax(s.lengths()))
    ts = s.timestamps[s.offsets[u]:s.offsets[u + 1]]
    assert (np.diff(ts) >= 0).all()
    with pytest.raises(ValueError, match="unknown LUM condition"):
        condition_item_sequences(ml100k, behaviour_log(ml100k), "season")


def test_packing_places_every_sequence_once_without_overflow(sequences):
    lengths = sequences.lengths()
    rows = pack_sequences(lengths, row_len=256)
    placed = sorted(s for row in rows for s in row)
    assert placed == sorted(np.nonzero(lengths)[0].tolist())
    assert all(lengths[row].sum() <= 256 for row in rows)
    batch = sequences.packed_rows(rows[:4], 256)
    for r, row in enumerate(rows[:4]):
        got = batch.tokens[r][batch.segment[r] >= 0].numpy()
        want = np.concatenate([sequences.tokens[sequences.offsets[s]:sequences.offsets[s + 1]] for s in row])
        np.testing.assert_array_equal(got, want)
    waste = padding_waste(lengths, 256, rows)
    assert waste["packed_token_waste"] < waste["padded_token_waste"]
    assert waste["packed_token_waste"] < 0.15
    with pytest.raises(ValueError, match="does not fit"):
        pack_sequences(np.array([10, 300]), 256)


def test_block_causal_mask_keeps_users_apart():
    segment = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = block_causal_mask(segment)[0]
    assert mask[2, :3].all() and not mask[2, 3:].any()      # user 0 sees only itself, causally
    assert not mask[3, :3].any() and mask[4, 3:5].all()     # user 1 never sees user 0
    assert not mask[0, 1] and not mask[5].any()            # causal; padding attends to nothing
