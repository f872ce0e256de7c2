"""Tests for the target-aware (ranking) HSTU encoder (torchrec_genrec/modules/hstu_ranker.py).

The fast O(C * L) path is checked against the explicit (L + C) x (L + C) target-aware mask
(forward and backward), for candidate independence (one pass of C == C passes of one, any
order, any microbatching), for leaving the history untouched (its part is exactly
HSTULayer.forward_padded; one candidate == the causal encoder's next token), for empty
histories, and for ignoring whatever the padding holds.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import pytest
import torch

from torchrec_genrec.modules.hstu import HSTUConfig, HSTUEncoder
from torchrec_genrec.modules.hstu_ranker import HSTURankerEncoder, target_aware_hstu_layer, target_aware_reference

D, N = 8, 8  # width, max_seq_len
LENGTHS = [0, 3, 7, 1, 5]  # includes an empty history and the longest allowed (N - 1)
L = max(LENGTHS)


def make_encoder(pos: bool = True, time: bool = True, num_blocks: int = 2, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> HSTURankerEncoder:
    torch.manual_seed(seed)
    cfg = HSTUConfig(embedding_dim=D, num_blocks=num_blocks, num_heads=2, attention_dim=4, linear_dim=3,
                     max_seq_len=N, dropout=0.1, num_time_buckets=64, use_position_bias=pos, use_time_bias=time)
    enc = HSTURankerEncoder(cfg).to(dtype).eval()
    with torch.no_grad():  # biases large enough to matter in the comparisons
        for layer in enc.layers:
            for w in (layer.pos_weights, layer.ts_weights):
                if w is not None:
                    w.normal_(0, 0.5)
    return enc


def make_inputs(lengths: Sequence[int], num_cands: int, seq_len: int = L, dtype: torch.dtype = torch.float64,
                seed: int = 1) -> Dict[str, torch.Tensor]:
    """Random requests; padded history slots hold garbage (embeddings and timestamps)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    hist_ts = 1_000_000 + torch.randint(1, 5000, (b, seq_len), generator=g).cumsum(1)
    last = hist_ts[torch.arange(b), (lengths_t - 1).clamp(min=0)] if seq_len else torch.full((b,), 1_000_000)
    request = torch.where(lengths_t > 0, last, torch.full_like(last, 1_000_000))
    request = request + torch.randint(1, 60, (b,), generator=g)  # gaps in distinct log-time buckets
    cand_ts = request.view(b, 1) + torch.randint(0, 40, (b, num_cands), generator=g)  # per-candidate jitter
    return {
        "history": torch.randn(b, seq_len, D, generator=g, dtype=dtype),
        "lengths": lengths_t,
        "history_timestamps": hist_ts,
        "candidates": torch.randn(b, num_cands, D, generator=g, dtype=dtype),
        "cand_timestamps": cand_ts,
    }


def without_time(inputs: Dict[str, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
    return {**inputs, "history_timestamps": None, "cand_timestamps": None}


@pytest.mark.parametrize("num_cands,pos,time,ts_given", [
    (1, True, True, True), (5, True, True, True), (5, False, True, True), (5, True, False, True),
    (3, False, False, True), (5, True, True, False),
])
def test_matches_target_aware_reference(num_cands: int, pos: bool, time: bool, ts_given: bool) -> None:
    enc = make_encoder(pos, time)
    inputs = make_inputs(LENGTHS, num_cands)
    if not ts_given:
        inputs = without_time(inputs)
    valid = torch.rand(len(LENGTHS), num_cands, generator=torch.Generator().manual_seed(5)) > 0.3
    valid[:, 0] = True
    with torch.no_grad():
        out = enc(**inputs, cand_valid=valid)
        ref = target_aware_reference(enc, **inputs)
    assert out.shape == (len(LENGTHS), num_cands, D)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-10, rtol=1e-10)
    assert (out[~valid] == 0).all()


def test_matches_reference_float32() -> None:
    enc = make_encoder(dtype=torch.float32)
    inputs = make_inputs(LENGTHS, 4, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(enc(**inputs), target_aware_reference(enc, **inputs), atol=1e-5, rtol=1e-5)


def test_candidates_do_not_see_each_other() -> None:
    enc = make_encoder()
    inputs = make_inputs(LENGTHS, 5)
    with torch.no_grad():
        out = enc(**inputs)
        for c in range(5):  # C passes of one candidate each
            one = {**inputs, "candidates": inputs["candidates"][:, c:c + 1],
                   "cand_timestamps": inputs["cand_timestamps"][:, c:c + 1]}
            torch.testing.assert_close(enc(**one)[:, 0], out[:, c], atol=1e-12, rtol=1e-12)
        perm = torch.tensor([3, 0, 4, 2, 1])
        shuffled = {**inputs, "candidates": inputs["candidates"][:, perm],
                    "cand_timestamps": inputs["cand_timestamps"][:, perm]}
        torch.testing.assert_close(enc(**shuffled), out[:, perm], atol=1e-12, rtol=1e-12)
        for chunk in (1, 2, 5, 7):  # M-FALCON microbatches
            torch.testing.assert_close(enc(**inputs, candidate_chunk_size=chunk), out, atol=1e-12, rtol=1e-12)


def test_history_part_is_forward_padded_and_ignores_candidates() -> None:
    enc = make_encoder()
    inputs = make_inputs(LENGTHS, 4)
    x, xc, cand_pos = enc._preprocess(inputs["history"], inputs["lengths"], inputs["candidates"])
    layer = enc.layers[0]
    args = (x, inputs["lengths"], inputs["history_timestamps"])
    with torch.no_grad():
        hist, cand = target_aware_hstu_layer(layer, *args, xc, inputs["cand_timestamps"], cand_pos)
        torch.testing.assert_close(hist, layer.forward_padded(*args), atol=0, rtol=0)
        hist2, _ = target_aware_hstu_layer(layer, *args, torch.randn_like(xc), inputs["cand_timestamps"] + 9, cand_pos)
        torch.testing.assert_close(hist2, hist, atol=0, rtol=0)
        hist0, cand0 = target_aware_hstu_layer(layer, *args, xc[:, :0], inputs["cand_timestamps"][:, :0], cand_pos)
        torch.testing.assert_close(hist0, hist, atol=0, rtol=0)
        assert cand0.shape == (len(LENGTHS), 0, D)
        none, _ = target_aware_hstu_layer(layer, *args, xc, inputs["cand_timestamps"], cand_pos, compute_history=False)
        assert none is None
        assert enc(**{**inputs, "candidates": xc[:, :0], "cand_timestamps": inputs["cand_timestamps"][:, :0]}).shape \
            == (len(LENGTHS), 0, D)


def test_one_candidate_is_the_causal_encoders_next_token() -> None:
    """With HSTUEncoder's weights, a single candidate is the causal encoder run on the
    history followed by the candidate, read at the candidate (position lengths[b])."""
    ranker = make_encoder()
    causal = HSTUEncoder(ranker.config).to(torch.float64).eval()
    causal.load_state_dict(ranker.state_dict())
    inputs = make_inputs(LENGTHS, 1)
    b = len(LENGTHS)
    lengths = inputs["lengths"]
    seq = torch.cat([inputs["history"], torch.zeros(b, 1, D, dtype=torch.float64)], dim=1)
    ts = torch.cat([inputs["history_timestamps"], torch.zeros(b, 1, dtype=torch.int64)], dim=1)
    rows = torch.arange(b)
    seq[rows, lengths] = inputs["candidates"][:, 0]
    ts[rows, lengths] = inputs["cand_timestamps"][:, 0]
    with torch.no_grad():
        torch.testing.assert_close(ranker(**inputs)[:, 0], causal.forward_padded_last(seq, lengths + 1, ts),
                                   atol=1e-10, rtol=1e-10)


def test_empty_histories() -> None:
    """lengths == 0 (also with L == 0): candidates see only themselves, no NaN."""
    enc = make_encoder()
    padded = make_inputs([0, 0], 3, seq_len=4)
    bare = make_inputs([0, 0], 3, seq_len=0)
    bare.update(candidates=padded["candidates"], cand_timestamps=padded["cand_timestamps"])
    with torch.no_grad():
        out = enc(**padded)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(enc(**bare), out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(target_aware_reference(enc, **bare), out, atol=1e-10, rtol=1e-10)


def test_gradients_match_reference() -> None:
    enc = make_encoder()
    ref_enc = make_encoder()
    ref_enc.load_state_dict(enc.state_dict())
    inputs = make_inputs(LENGTHS, 4)
    valid = torch.ones(len(LENGTHS), 4, dtype=torch.bool)
    valid[1, 2] = valid[3, 0] = False
    weight = torch.randn(len(LENGTHS), 4, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def run(model, fast: bool):
        hist = inputs["history"].clone().requires_grad_(True)
        cand = inputs["candidates"].clone().requires_grad_(True)
        args = {**inputs, "history": hist, "candidates": cand}
        out = model(**args, cand_valid=valid) if fast else target_aware_reference(model, **args) * valid.unsqueeze(2)
        (out * weight).sum().backward()
        return hist.grad, cand.grad

    g_hist, g_cand = run(enc, True)
    r_hist, r_cand = run(ref_enc, False)
    torch.testing.assert_close(g_hist, r_hist, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g_cand, r_cand, atol=1e-10, rtol=1e-8)
    for (name, p), (_, q) in zip(enc.named_parameters(), ref_enc.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8, msg=name)
    hist_valid = torch.arange(L).view(1, L) < inputs["lengths"].view(-1, 1)
    assert (g_hist[hist_valid].abs().sum(-1) > 0).all()  # every real history token is read
    assert (g_hist[~hist_valid] == 0).all()  # padding, and the empty history, get nothing
    assert (g_cand[valid].abs().sum(-1) > 0).all() and (g_cand[~valid] == 0).all()


def test_padding_does_not_change_outputs() -> None:
    enc = make_encoder()
    inputs = make_inputs(LENGTHS, 4)
    valid = torch.ones(len(LENGTHS), 4, dtype=torch.bool)
    valid[2, 1] = False
    pad = torch.arange(L).view(1, L) >= inputs["lengths"].view(-1, 1)
    changed = dict(inputs)
    changed["history"] = inputs["history"].clone()
    changed["history"][pad] = 1e6 * torch.randn(int(pad.sum()), D, dtype=torch.float64)
    changed["history"][0, 0] = float("nan")  # row 0 has an empty history
    changed["history_timestamps"] = torch.where(pad, torch.randint(0, 10**12, pad.shape), inputs["history_timestamps"])
    changed["candidates"] = inputs["candidates"].clone()
    changed["candidates"][2, 1] = float("nan")  # an invalid (padding) candidate
    with torch.no_grad():
        out = enc(**inputs, cand_valid=valid)
        out2 = enc(**changed, cand_valid=valid)
    assert torch.isfinite(out2).all()
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_input_checks() -> None:
    enc = make_encoder()
    inputs = make_inputs([2, 3], 2)
    for bad in ([N, 3], [-1, 3], [2, L + 1]):  # lengths + 1 > max_seq_len, negative, > L
        with pytest.raises(ValueError, match="lengths"):
            enc(**{**inputs, "lengths": torch.tensor(bad)})
    with pytest.raises(ValueError, match="both"):
        enc(**{**inputs, "cand_timestamps": None})
    with pytest.raises(ValueError, match="candidates"):
        enc(**{**inputs, "candidates": inputs["candidates"][:1]})
    with pytest.raises(ValueError, match="candidate_chunk_size"):
        enc(**inputs, candidate_chunk_size=0)
