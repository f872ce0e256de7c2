"""Tests of the OneTrans stack: mixed parameterisation, causality, pyramid, selection, KV cache."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from torchrec_genrec.modules.onetrans import (
    OneTrans,
    OneTransConfig,
    flops_per_sample,
    pyramid_schedule,
)

B, S, D, L_NS = 3, 7, 16, 3
EPS = 1e-6  # the module's RMSNorm eps


def _model(seed: int = 0, **overrides: object) -> OneTrans:
    torch.manual_seed(seed)
    config = OneTransConfig(**{"embedding_dim": D, "num_heads": 2, "num_layers": 2, "num_ns_tokens": L_NS,
                               **overrides})
    return OneTrans(config).eval()


def _inputs(seed: int = 1):
    """Left-padded S-tokens with 7, 4 and 0 valid tokens, and NS-tokens."""
    g = torch.Generator().manual_seed(seed)
    s_tokens = torch.randn(B, S, D, generator=g)
    lengths = torch.tensor([7, 4, 0])
    s_valid = torch.arange(S).unsqueeze(0) >= (S - lengths).unsqueeze(1)
    ns_tokens = torch.randn(B, L_NS, D, generator=g)
    return s_tokens, s_valid, ns_tokens


# ---- an independent reference: every token on its own, plain Python loops ----

def _token_weights(model: OneTrans, layer_index: int, ns_index: Optional[int]) -> Dict[str, object]:
    """Per-token functions for one token of one layer: S-tokens (ns_index None) on the shared
    modules, NS-token i on row i of the per-token banks."""
    layer = model.layers[layer_index]
    if ns_index is None or layer.ns_weights is None:
        w = layer.s_weights
        return {
            "attention_norm": lambda x: F.rms_norm(x, (D,), w.attention_norm.weight, EPS),
            "qkv": lambda x: F.linear(x, w.qkv.weight, w.qkv.bias),
            "attention_output": lambda x: F.linear(x, w.attention_output.weight, w.attention_output.bias),
            "ffn_norm": lambda x: F.rms_norm(x, (D,), w.ffn_norm.weight, EPS),
            "ffn_in": lambda x: F.linear(x, w.ffn_in.weight, w.ffn_in.bias),
            "ffn_out": lambda x: F.linear(x, w.ffn_out.weight, w.ffn_out.bias),
        }
    w, i = layer.ns_weights, ns_index
    return {
        "attention_norm": lambda x: F.rms_norm(x, (D,), w.attention_norm.weight[i], EPS),
        "qkv": lambda x: x @ w.qkv.weight[i] + w.qkv.bias[i],
        "attention_output": lambda x: x @ w.attention_output.weight[i] + w.attention_output.bias[i],
        "ffn_norm": lambda x: F.rms_norm(x, (D,), w.ffn_norm.weight[i], EPS),
        "ffn_in": lambda x: x @ w.ffn_in.weight[i] + w.ffn_in.bias[i],
        "ffn_out": lambda x: x @ w.ffn_out.weight[i] + w.ffn_out.bias[i],
    }


def _reference(model: OneTrans, s_tokens: torch.Tensor, s_valid: torch.Tensor,
               ns_tokens: torch.Tensor) -> torch.Tensor:
    """OneTrans with recency selection, row by row and token by token."""
    assert model.config.selection == "recency"
    h = model.config.num_heads
    dh = D // h
    rows = []
    for b in range(s_tokens.shape[0]):
        tokens = [{"pos": p, "valid": bool(s_valid[b, p]), "x": s_tokens[b, p], "ns": None} for p in range(S)]
        tokens += [{"pos": S + i, "valid": True, "x": ns_tokens[b, i], "ns": i} for i in range(L_NS)]
        for layer_index, keep in enumerate(model.pyramid_schedule(S)):
            for t in tokens:
                t["w"] = _token_weights(model, layer_index, t["ns"])
                t["q"], t["k"], t["v"] = t["w"]["qkv"](t["w"]["attention_norm"](t["x"])).split(D)
            s_side = [t for t in tokens if t["ns"] is None]
            queries = s_side[len(s_side) - keep:] + [t for t in tokens if t["ns"] is not None]
            new_tokens = []
            for t in queries:
                visible = [u for u in tokens if (u["valid"] and u["pos"] <= t["pos"]) or u is t]
                heads = []
                for head in range(h):
                    sl = slice(head * dh, (head + 1) * dh)
                    scores = torch.stack([t["q"][sl] @ u["k"][sl] for u in visible]) / math.sqrt(dh)
                    weights = torch.softmax(scores, dim=0)
                    heads.append(sum(wt * u["v"][sl] for wt, u in zip(weights, visible)))
                w = t["w"]
                x = t["x"] + w["attention_output"](torch.cat(heads))
                x = x + w["ffn_out"](F.gelu(w["ffn_in"](w["ffn_norm"](x))))
                new_tokens.append({**t, "x": x})
            tokens = new_tokens
        final = model.final_norm.weight
        rows.append(torch.stack([
            F.rms_norm(t["x"], (D,), final if final.dim() == 1 else final[t["ns"]], EPS)
            for t in tokens if t["ns"] is not None]))
    return torch.stack(rows)


@pytest.mark.parametrize("pyramid", ["none", "linear"])
def test_mixed_parameterisation_matches_per_token_loop(pyramid: str) -> None:
    model = _model(pyramid=pyramid)
    # Norm scales away from 1, so a norm applied with the wrong token's weights shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    s_tokens, s_valid, ns_tokens = _inputs()
    torch.testing.assert_close(model(s_tokens, s_valid, ns_tokens),
                               _reference(model, s_tokens, s_valid, ns_tokens), atol=1e-5, rtol=1e-5)


def test_shared_ns_params_use_the_s_weights() -> None:
    shared = _model(seed=0, shared_ns_params=True)
    mixed = _model(seed=1)
    assert all(layer.ns_weights is None for layer in shared.layers)
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in mixed.parameters())
    # A mixed model whose every NS-token bank row holds the shared weights computes the same.
    with torch.no_grad():
        for src, dst in zip(shared.layers, mixed.layers):
            dst.s_weights.load_state_dict(src.s_weights.state_dict())
            for name in ["qkv", "attention_output", "ffn_in", "ffn_out"]:
                linear = getattr(src.s_weights, name)
                getattr(dst.ns_weights, name).weight.copy_(linear.weight.t().expand(L_NS, -1, -1))
                getattr(dst.ns_weights, name).bias.copy_(linear.bias.expand(L_NS, -1))
            for name in ["attention_norm", "ffn_norm"]:
                getattr(dst.ns_weights, name).weight.copy_(getattr(src.s_weights, name).weight.expand(L_NS, -1))
        mixed.final_norm.weight.copy_(shared.final_norm.weight.expand(L_NS, -1))
    s_tokens, s_valid, ns_tokens = _inputs()
    torch.testing.assert_close(mixed(s_tokens, s_valid, ns_tokens), shared(s_tokens, s_valid, ns_tokens))


def test_output_shape_and_rows_without_s_tokens() -> None:
    model = _model(num_layers=3)
    s_tokens, s_valid, ns_tokens = _inputs()
    out = model(s_tokens, s_valid, ns_tokens)
    assert out.shape == (B, L_NS, D) and torch.isfinite(out).all()
    # Row 2 has no valid S-token: the same as a request with no S columns at all.
    empty = model(torch.zeros(1, 0, D), torch.zeros(1, 0, dtype=torch.bool), ns_tokens[2:])
    torch.testing.assert_close(out[2:], empty)
    assert OneTransConfig().ffn_hidden_dim == 4 * 64


@pytest.mark.parametrize("selection", ["recency", "scorer_topk"])
def test_padding_content_is_ignored(selection: str) -> None:
    model = _model(selection=selection)
    s_tokens, s_valid, ns_tokens = _inputs()
    changed = s_tokens.clone()
    changed[~s_valid] = 1e4 * torch.randn(int((~s_valid).sum()), D)
    changed[2] = float("nan")  # row 2 is all padding
    torch.testing.assert_close(model(changed, s_valid, ns_tokens), model(s_tokens, s_valid, ns_tokens))


def test_causality_on_the_s_side() -> None:
    model = _model(pyramid="none", num_layers=3)
    s_tokens, s_valid, _ = _inputs()
    changed = s_tokens.clone()
    changed[0, 4] += 1.0
    before, after = model.encode_sequence(s_tokens, s_valid), model.encode_sequence(changed, s_valid)
    for layer in range(3):
        torch.testing.assert_close(after.keys[layer][0, :4], before.keys[layer][0, :4])
        torch.testing.assert_close(after.values[layer][0, :4], before.values[layer][0, :4])
        torch.testing.assert_close(after.keys[layer][1:], before.keys[layer][1:])  # other rows
    assert not torch.allclose(after.keys[1][0, 4:], before.keys[1][0, 4:])


def test_causality_among_ns_tokens() -> None:
    model = _model()
    s_tokens, s_valid, ns_tokens = _inputs()
    out = model(s_tokens, s_valid, ns_tokens)
    changed = ns_tokens.clone()
    changed[:, 1] += 1.0
    out2 = model(s_tokens, s_valid, changed)
    torch.testing.assert_close(out2[:, 0], out[:, 0])
    assert not torch.allclose(out2[:, 1], out[:, 1]) and not torch.allclose(out2[:, 2], out[:, 2])


def test_pyramid_schedule() -> None:
    config = OneTransConfig(num_layers=3)
    assert pyramid_schedule(config, 7) == [5, 2, 0]
    assert pyramid_schedule(dataclasses.replace(config, pyramid_min_s_tokens=3), 7) == [6, 4, 3]
    assert pyramid_schedule(dataclasses.replace(config, pyramid_min_s_tokens=9), 7) == [7, 7, 7]
    assert pyramid_schedule(dataclasses.replace(config, pyramid="none"), 7) == [7, 7, 7]
    assert pyramid_schedule(OneTransConfig(num_layers=2), 7) == [3, 0]  # 3.5 dropped rounds up to 4
    assert pyramid_schedule(config, 0) == [0, 0, 0]


def test_recency_keeps_the_most_recent_tokens() -> None:
    model = _model(num_layers=3)
    s_tokens, s_valid, _ = _inputs()
    cache = model.encode_sequence(s_tokens, s_valid)
    assert [k.shape[1] for k in cache.keys] == [7, 5, 2]
    assert cache.positions[1].tolist() == [[2, 3, 4, 5, 6]] * B
    assert cache.positions[2].tolist() == [[5, 6]] * B
    assert cache.valid[1].tolist()[1] == [False, True, True, True, True]  # row 1: positions 3..6 valid
    assert not cache.valid[1][2].any()  # row 2 has no valid token to keep


def test_scorer_topk_keeps_the_top_scored_valid_tokens_in_order() -> None:
    model = _model(selection="scorer_topk", num_layers=3)
    s_tokens, s_valid, _ = _inputs()
    cache = model.encode_sequence(s_tokens, s_valid)
    layer = model.layers[0]
    states = s_tokens.masked_fill(~s_valid.unsqueeze(-1), 0.0)
    scores = layer.scorer(layer.s_weights.attention_norm(states)).squeeze(-1).masked_fill(~s_valid, float("-inf"))
    for row, num_valid in [(0, 7), (1, 4)]:
        expected = sorted(scores[row].topk(5).indices.tolist())
        assert cache.positions[1][row].tolist() == expected
        assert int(cache.valid[1][row].sum()) == min(5, num_valid)


def test_scorer_gets_gradients() -> None:
    model = _model(selection="scorer_topk").train()
    s_tokens, s_valid, ns_tokens = _inputs()
    (model(s_tokens, s_valid, ns_tokens) * torch.randn(B, L_NS, D)).sum().backward()
    grad = model.layers[0].scorer.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_scorer_threshold() -> None:
    s_tokens, s_valid, ns_tokens = _inputs()
    topk = _model(selection="scorer_topk")
    never = _model(selection="scorer_threshold", score_threshold=0.0)
    torch.testing.assert_close(never(s_tokens, s_valid, ns_tokens), topk(s_tokens, s_valid, ns_tokens))
    always = _model(selection="scorer_threshold", score_threshold=0.5, pyramid="none")
    with torch.no_grad():
        always.layers[0].scorer.bias.fill_(-20.0)  # every sigmoid(score) < 0.5
    cache = always.encode_sequence(s_tokens, s_valid)
    assert cache.valid[0].any() and not cache.valid[1].any()
    assert torch.isfinite(always(s_tokens, s_valid, ns_tokens)).all()


@pytest.mark.parametrize("pyramid", ["none", "linear"])
@pytest.mark.parametrize("selection", ["recency", "scorer_topk", "scorer_threshold"])
def test_cached_forward_equals_full_forward(pyramid: str, selection: str) -> None:
    model = _model(pyramid=pyramid, selection=selection, num_layers=3, score_threshold=0.45)
    s_tokens, s_valid, _ = _inputs()
    cache = model.encode_sequence(s_tokens, s_valid)
    request_index = torch.tensor([0, 0, 0, 1, 1, 2])  # request 2 has no valid S-token
    candidates = torch.randn(len(request_index), L_NS, D)
    cached = model.forward_cached(cache, candidates, request_index)
    full = model(s_tokens[request_index], s_valid[request_index], candidates)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert torch.isfinite(cached).all()


@pytest.mark.parametrize("overrides, field", [
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"num_layers": 0}, "num_layers"),
    ({"num_heads": 3}, "num_heads"),
    ({"ffn_dim": 0}, "ffn_dim"),
    ({"num_ns_tokens": 0}, "num_ns_tokens"),
    ({"dropout": 1.0}, "dropout"),
    ({"pyramid": "log"}, "pyramid"),
    ({"pyramid_min_s_tokens": -1}, "pyramid_min_s_tokens"),
    ({"selection": "random"}, "selection"),
    ({"score_threshold": 1.5}, "score_threshold"),
])
def test_config_validation(overrides: Dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OneTransConfig(**overrides)


def test_input_validation() -> None:
    model = _model()
    s_tokens, s_valid, ns_tokens = _inputs()
    with pytest.raises(ValueError, match="ns_tokens"):
        model(s_tokens, s_valid, ns_tokens[:, :2])
    with pytest.raises(ValueError, match="s_valid"):
        model(s_tokens, s_valid.float(), ns_tokens)
    with pytest.raises(ValueError, match="request_index"):
        model.forward_cached(model.encode_sequence(s_tokens, s_valid), ns_tokens, torch.tensor([0, 1]))


def test_flops_pyramid_saves() -> None:
    config = OneTransConfig(embedding_dim=D, num_layers=3, num_ns_tokens=L_NS)
    assert flops_per_sample(config, 64) < flops_per_sample(config, 64, pyramid="none")
    # No S-token: per layer the NS projections, NS-by-NS attention, output projection and FFN.
    f = config.ffn_hidden_dim
    per_layer = L_NS * D * 3 * D + 2 * L_NS * L_NS * D + L_NS * (D * D + 2 * D * f)
    assert flops_per_sample(config, 0, pyramid="none") == 3 * per_layer
    scored = dataclasses.replace(config, selection="scorer_topk", pyramid="none")
    assert flops_per_sample(scored, 64) == flops_per_sample(config, 64, pyramid="none") + 3 * 64 * D


@pytest.mark.parametrize("request_index", [
    [1, 0, 2, 0, 1, 0],  # interleaved candidates, uneven counts: the padded per-request grid
    [0, 1, 2],  # one candidate per request, in order: the grid is the candidates themselves
    [2, 2, 0, 0],  # request 1 has no candidate
    [0, 0, 1, 0, 0, 0, 0, 2, 0, 0],  # skewed counts: request 0 takes several grid rows
    [],  # no candidate at all
])
def test_cached_forward_candidate_layouts(request_index: list) -> None:
    model = _model(num_layers=3)
    s_tokens, s_valid, _ = _inputs()
    index = torch.tensor(request_index, dtype=torch.int64)
    candidates = torch.randn(len(request_index), L_NS, D)
    cached = model.forward_cached(model.encode_sequence(s_tokens, s_valid), candidates, index)
    assert cached.shape == (len(request_index), L_NS, D)
    torch.testing.assert_close(cached, model(s_tokens[index], s_valid[index], candidates), atol=1e-5, rtol=0)


@pytest.mark.parametrize("row", [0, 1, 2])  # 7, 4 and 0 valid S-tokens
@pytest.mark.parametrize("selection", ["recency", "scorer_threshold"])
def test_cached_forward_single_request(row: int, selection: str) -> None:
    """The serving case: one request (its padding dropped from the cache) and many candidates."""
    model = _model(num_layers=3, selection=selection, score_threshold=0.45)
    s_tokens, s_valid, _ = _inputs()
    s_tokens, s_valid = s_tokens[row:row + 1], s_valid[row:row + 1]
    candidates, index = torch.randn(5, L_NS, D), torch.zeros(5, dtype=torch.int64)
    cached = model.forward_cached(model.encode_sequence(s_tokens, s_valid), candidates, index)
    full = model(s_tokens.expand(5, -1, -1), s_valid.expand(5, -1), candidates)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    # No S column at all.
    empty = model.encode_sequence(torch.zeros(1, 0, D), torch.zeros(1, 0, dtype=torch.bool))
    torch.testing.assert_close(model.forward_cached(empty, candidates, index),
                               model(torch.zeros(5, 0, D), torch.zeros(5, 0, dtype=torch.bool), candidates))


def test_cached_forward_rejects_unknown_requests() -> None:
    model = _model()
    s_tokens, s_valid, ns_tokens = _inputs()
    cache = model.encode_sequence(s_tokens, s_valid)
    for index in ([0, 1, 3], [0, -1, 1]):
        with pytest.raises(ValueError, match="request_index"):
            model.forward_cached(cache, ns_tokens, torch.tensor(index))
    with pytest.raises(ValueError, match="request_index"):
        model.forward_cached(model.encode_sequence(s_tokens[:1], s_valid[:1]), ns_tokens, torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("request_index, selection, shared_ns_params", [
    ([1, 0, 2, 0, 1, 0], "recency", False),  # several requests: the padded grid
    ([1, 0, 2, 0, 1, 0], "scorer_topk", True),
    ([0, 0, 0], "scorer_topk", False),  # one request: its cache without padding
])
def test_cached_forward_gradients_match_full_forward(request_index: list, selection: str,
                                                     shared_ns_params: bool) -> None:
    """Training runs Stage II too: its gradients (into the NS-tokens, and through the cached keys
    and values into the S-tokens and every weight) equal the full forward's."""
    model = _model(selection=selection, shared_ns_params=shared_ns_params, num_layers=3).double().train()
    s_tokens, s_valid, _ = _inputs()
    index = torch.tensor(request_index)
    if len(set(request_index)) == 1:  # a single cached request
        s_tokens, s_valid, index = s_tokens[1:2], s_valid[1:2], torch.zeros_like(index)
    s_tokens = s_tokens.double()
    candidates = torch.randn(len(request_index), L_NS, D, dtype=torch.float64)
    weights = torch.randn(len(request_index), L_NS, D, dtype=torch.float64)

    def grads(cached: bool):
        model.zero_grad()
        s = s_tokens.clone().requires_grad_(True)
        ns = candidates.clone().requires_grad_(True)
        if cached:
            out = model.forward_cached(model.encode_sequence(s, s_valid), ns, index)
        else:
            out = model(s[index], s_valid[index], ns)
        (out * weights).sum().backward()
        return [s.grad, ns.grad] + [p.grad if p.grad is not None else torch.zeros_like(p)
                                    for p in model.parameters()]

    for got, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def test_cached_forward_dropout_in_training() -> None:
    model = _model(dropout=0.5).train()
    s_tokens, s_valid, _ = _inputs()
    index = torch.tensor([0, 2, 1, 0])
    candidates = torch.randn(4, L_NS, D, requires_grad=True)
    out = model.forward_cached(model.encode_sequence(s_tokens, s_valid), candidates, index)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(candidates.grad).all()
    with torch.no_grad():
        again = model.forward_cached(model.encode_sequence(s_tokens, s_valid), candidates, index)
    assert not torch.allclose(out, again)  # dropout is live in training mode
    model.eval()
    with torch.no_grad():
        cached = model.forward_cached(model.encode_sequence(s_tokens, s_valid), candidates, index)
        torch.testing.assert_close(cached, model(s_tokens[index], s_valid[index], candidates), atol=1e-5, rtol=0)


def test_cached_forward_many_ns_tokens_and_wide_heads() -> None:
    """Larger NS-part matrices (8 NS-tokens, heads of 32) take the batched-matmul branch."""
    torch.manual_seed(0)
    model = OneTrans(OneTransConfig(embedding_dim=64, num_heads=2, num_layers=2, num_ns_tokens=8)).eval()
    g = torch.Generator().manual_seed(1)
    s_tokens = torch.randn(2, 6, 64, generator=g)
    s_valid = torch.tensor([[True] * 6, [False] * 4 + [True] * 2])
    for index in ([1, 0, 0, 1, 0], [0, 0, 0]):
        request_index = torch.tensor(index)
        rows = slice(None) if len(set(index)) > 1 else slice(1, 2)  # [0, 0, 0]: request 1 alone
        candidates = torch.randn(len(index), 8, 64, generator=g)
        cached = model.forward_cached(model.encode_sequence(s_tokens[rows], s_valid[rows]), candidates, request_index)
        full = model(s_tokens[rows][request_index], s_valid[rows][request_index], candidates)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
