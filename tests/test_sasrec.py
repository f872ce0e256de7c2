"""Tests of the SASRec jagged sequence encoder."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_genrec.modules.sasrec import SASRecConfig, SASRecEncoder

D = 16


def _encoder(seed: int = 0, **overrides: object) -> SASRecEncoder:
    torch.manual_seed(seed)
    config = SASRecConfig(**{"embedding_dim": D, "num_heads": 2, "max_seq_len": 12, **overrides})
    return SASRecEncoder(config).eval()


def _offsets(lengths: List[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


def test_output_shape_and_default_config() -> None:
    config = SASRecConfig()
    assert (config.embedding_dim, config.num_blocks, config.num_heads) == (50, 2, 1)
    assert (config.dropout, config.max_seq_len, config.ffn_dim) == (0.2, 200, None)
    encoder = SASRecEncoder(config)
    lengths = [3, 200, 1, 7]
    out = encoder(torch.randn(sum(lengths), 50), _offsets(lengths))
    assert out.shape == (211, 50) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert encoder.blocks[0].ffn.linear1.out_features == 50
    assert SASRecEncoder(SASRecConfig(embedding_dim=8, ffn_dim=32)).blocks[0].ffn.linear1.out_features == 32


def test_causality_later_token_leaves_earlier_outputs() -> None:
    encoder = _encoder()
    lengths = [6, 4]
    x = torch.randn(10, D)
    out = encoder(x, _offsets(lengths))
    changed = x.clone()
    changed[3] = torch.randn(D)  # position 3 of sequence 0
    out2 = encoder(changed, _offsets(lengths))
    torch.testing.assert_close(out2[:3], out[:3])  # earlier positions of sequence 0
    torch.testing.assert_close(out2[6:], out[6:])  # the other sequence
    assert not torch.allclose(out2[3:6], out[3:6])  # the token itself and later ones do change


def test_causality_in_the_gradient() -> None:
    encoder = _encoder()
    x = torch.randn(5, D, requires_grad=True)
    # Project on a random direction: a plain sum is constant after the final LayerNorm.
    (encoder(x, _offsets([5]))[2] * torch.randn(D)).sum().backward()
    assert x.grad[:3].abs().sum(dim=1).gt(0).all()
    assert x.grad[3:].eq(0).all()


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    which=st.integers(0, 4),
    seed=st.integers(0, 99),
)
def test_batch_independence(lengths: List[int], which: int, seed: int) -> None:
    """A sequence encodes the same alone as beside others of other lengths (padding is invisible)."""
    encoder = _encoder(seed=seed % 3)
    which = which % len(lengths)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), D, generator=generator)
    offsets = _offsets(lengths)
    batched = encoder(x, offsets)
    start, end = int(offsets[which]), int(offsets[which + 1])
    alone = encoder(x[start:end], _offsets([end - start]))
    torch.testing.assert_close(batched[start:end], alone, rtol=1e-4, atol=1e-5)


def test_padding_values_do_not_leak() -> None:
    """The longest sequence sets the padded width; the short one must not depend on it."""
    encoder = _encoder()
    short = torch.randn(2, D)
    out_a = encoder(torch.cat([short, torch.randn(9, D)]), _offsets([2, 9]))[:2]
    out_b = encoder(torch.cat([short, torch.randn(3, D)]), _offsets([2, 3]))[:2]
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)


def test_gradients_reach_inputs_and_parameters() -> None:
    encoder = _encoder().train()
    lengths = [4, 0, 1, 7]
    x = torch.randn(12, D, requires_grad=True)
    encoder(x, _offsets(lengths)).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum(dim=1).gt(0).all()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # Only the positions that occur (up to the longest sequence, 7) receive gradient.
    position_grad = encoder.position_embedding.weight.grad.abs().sum(dim=1)
    assert position_grad[:7].gt(0).all() and position_grad[7:].eq(0).all()


@pytest.mark.parametrize("lengths", [[0], [0, 0], [1], [1, 1, 1], [0, 1, 0, 3], []])
def test_empty_and_length_one_sequences(lengths: List[int]) -> None:
    encoder = _encoder().train()
    x = torch.randn(sum(lengths), D, requires_grad=True)
    out = encoder(x, _offsets(lengths))
    assert out.shape == (sum(lengths), D)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for parameter in encoder.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


def test_length_one_sees_only_itself() -> None:
    encoder = _encoder()
    x = torch.randn(4, D)
    out = encoder(x, _offsets([1, 3]))
    torch.testing.assert_close(out[:1], encoder(x[:1], _offsets([1])))
    torch.testing.assert_close(out[1:2], encoder(x[1:2], _offsets([1])))


def test_timestamps_are_ignored_and_dropout_only_in_training() -> None:
    encoder = _encoder(dropout=0.5)
    x, offsets = torch.randn(5, D), _offsets([2, 3])
    torch.testing.assert_close(encoder(x, offsets, torch.arange(5) * 1000), encoder(x, offsets))
    encoder.train()
    assert not torch.allclose(encoder(x, offsets), encoder(x, offsets))


def test_invalid_inputs_and_configs() -> None:
    encoder = _encoder(max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        encoder(torch.randn(5, D), _offsets([5]))
    with pytest.raises(ValueError, match="embeddings"):
        encoder(torch.randn(5, D + 1), _offsets([5]))
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(embedding_dim=50, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(dropout=1.0)


def test_learns_to_copy_the_previous_token() -> None:
    """Toy task: at each position, predict the id one step back (needs attention + positions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead
    try:
        accuracy = _train_copy_previous(steps=250)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.9, accuracy


def _train_copy_previous(steps: int) -> float:
    torch.manual_seed(0)
    vocab, dim, batch_size, max_len = 12, 16, 32, 10
    config = SASRecConfig(embedding_dim=dim, num_blocks=2, num_heads=1, dropout=0.0, max_seq_len=max_len)
    encoder = SASRecEncoder(config)
    table = torch.nn.Embedding(vocab, dim)
    readout = torch.nn.Linear(dim, vocab)
    optimizer = torch.optim.Adam([*encoder.parameters(), *table.parameters(), *readout.parameters()], lr=1e-2)

    def sample() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = torch.randint(2, max_len + 1, (batch_size,))
        offsets = _offsets(lengths.tolist())
        ids = torch.randint(0, vocab, (int(lengths.sum()),))
        starts = torch.repeat_interleave(offsets[:-1], lengths)
        has_previous = torch.arange(ids.numel()) > starts  # not the first of its sequence
        return ids, offsets, torch.roll(ids, 1), has_previous

    for _ in range(steps):
        ids, offsets, target, has_previous = sample()
        logits = readout(encoder(table(ids), offsets))
        loss = torch.nn.functional.cross_entropy(logits[has_previous], target[has_previous])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    encoder.eval()
    with torch.no_grad():
        ids, offsets, target, has_previous = sample()
        predicted = readout(encoder(table(ids), offsets)).argmax(dim=1)
    return (predicted[has_previous] == target[has_previous]).float().mean().item()
