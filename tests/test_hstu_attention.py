"""Tests for the HSTU attention op (torchrec_genrec/ops/hstu_attention.py).

The fast jagged kernel is checked against the padded reference on random ragged batches,
forward and backward (q, k, v, pos_weights, ts_weights), with its bucketing and query
chunking forced through their edge cases. Both kernels are checked for causality and for
batch independence (the reason the divisor is the constant max_seq_len), and the time
bucket against the formula.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from torchrec_genrec.ops import hstu_attention as hstu
from torchrec_genrec.ops.hstu_attention import (
    HSTUAttentionKernel,
    hstu_attention,
    jagged_hstu_attention,
    pytorch_hstu_attention,
    time_bucket,
)

KERNELS = [pytorch_hstu_attention, jagged_hstu_attention]
GRAD_NAMES = ("q", "k", "v", "pos_weights", "ts_weights")


def make_inputs(
    lengths: Sequence[int],
    max_seq_len: int,
    heads: int = 2,
    dqk: int = 4,
    dv: int = 3,
    seed: int = 0,
    timestamps: bool = True,
    pos: bool = True,
    ts: bool = True,
    num_buckets: int = 128,
) -> Dict[str, Optional[torch.Tensor]]:
    """Random jagged inputs; timestamps rise irregularly over seconds to years."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    offsets = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)
    gaps = torch.randint(0, 10, (T,), generator=g) ** torch.randint(0, 9, (T,), generator=g)
    return dict(
        q=torch.randn(T, heads, dqk, generator=g),
        k=torch.randn(T, heads, dqk, generator=g),
        v=torch.randn(T, heads, dv, generator=g),
        offsets=offsets,
        timestamps=(1_600_000_000 + gaps.cumsum(0)) if timestamps else None,
        pos_weights=torch.randn(2 * max_seq_len - 1, generator=g) if pos else None,
        ts_weights=torch.randn(num_buckets + 1, generator=g) if ts else None,
    )


def run(kernel, max_seq_len: int, inputs: Dict[str, Optional[torch.Tensor]], grad_seed: int = 1):
    """Forward + backward on fresh leaf copies; returns (output, {name: grad})."""
    leaves = {n: inputs[n].clone().requires_grad_() for n in GRAD_NAMES if inputs[n] is not None}
    args = {**inputs, **leaves}
    out = kernel(max_seq_len, **args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * grad_out).sum().backward()
    grads = {n: (x.grad if x.grad is not None else torch.zeros_like(x)) for n, x in leaves.items()}
    return out.detach(), grads


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the element and to the tensor's scale (sums of many terms cancel)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6))


@contextmanager
def fast_path_settings(chunk: int, chunk_above: int, overhead: float) -> Iterator[None]:
    """Temporarily sets the fast path's query chunking and bucket overhead."""
    saved = (hstu._QUERY_CHUNK, hstu._QUERY_CHUNK_ABOVE, hstu._BUCKET_OVERHEAD_PAIRS)
    hstu._QUERY_CHUNK, hstu._QUERY_CHUNK_ABOVE, hstu._BUCKET_OVERHEAD_PAIRS = chunk, chunk_above, overhead
    try:
        yield
    finally:
        hstu._QUERY_CHUNK, hstu._QUERY_CHUNK_ABOVE, hstu._BUCKET_OVERHEAD_PAIRS = saved


def compare_kernels(max_seq_len: int, inputs: Dict[str, Optional[torch.Tensor]]) -> None:
    """The fast path against the reference, forward and backward, in float32 and in float64.

    In float32 a bias gradient is a sum of many terms that may cancel, so its rounding error
    is not relative to its (small) result: there both are held to the float64 reference,
    the fast path allowed 8x the float32 reference's own error on top of the relative bound.
    In float64 the two must agree to the relative bound alone."""
    exact = {n: (x.double() if x is not None and x.is_floating_point() else x) for n, x in inputs.items()}
    truth_out, truth_grads = run(pytorch_hstu_attention, max_seq_len, exact)
    fast64_out, fast64_grads = run(jagged_hstu_attention, max_seq_len, exact)
    ref_out, ref_grads = run(pytorch_hstu_attention, max_seq_len, inputs)
    out, grads = run(jagged_hstu_attention, max_seq_len, inputs)
    assert out.shape == ref_out.shape
    assert grads.keys() == ref_grads.keys() == truth_grads.keys()
    names = ["out", *grads]
    pick = lambda d, o, n: o if n == "out" else d[n]  # noqa: E731
    for name in names:
        truth = pick(truth_grads, truth_out, name)
        assert_close(pick(fast64_grads, fast64_out, name), truth)
        fast, reference = pick(grads, out, name).double(), pick(ref_grads, ref_out, name).double()
        reference_error = float((reference - truth).abs().max()) if truth.numel() else 0.0
        scale = float(truth.abs().max()) if truth.numel() else 0.0
        torch.testing.assert_close(fast, truth, rtol=1e-5, atol=1e-5 * max(scale, 1e-6) + 8 * reference_error,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# Fast vs reference
# ---------------------------------------------------------------------------------------


@st.composite
def ragged_cases(draw):
    max_seq_len = draw(st.integers(1, 24))
    lengths = draw(
        st.lists(
            st.one_of(st.sampled_from([0, 1, max_seq_len]), st.integers(0, max_seq_len)),
            min_size=1,
            max_size=7,
        )
    )
    return dict(
        max_seq_len=max_seq_len,
        lengths=lengths,
        heads=draw(st.integers(1, 3)),
        dqk=draw(st.integers(1, 6)),
        dv=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
        timestamps=draw(st.booleans()),
        pos=draw(st.booleans()),
        ts=draw(st.booleans()),
        num_buckets=draw(st.sampled_from([128, 3])),
        # (chunk, chunk above, bucket overhead): defaults, tiny chunks, one bucket per
        # distinct length, everything in one bucket.
        fast=draw(st.sampled_from([None, (2, 3, 0.0), (3, 5, 1e12), (4, 4, 16.0)])),
    )


@settings(max_examples=60, deadline=None)
@given(case=ragged_cases())
# Every pair at relative position 0: the position-bias gradient is one sum of terms that cancel.
@example(case=dict(max_seq_len=1, lengths=[1, 1, 1, 1, 1], heads=2, dqk=2, dv=3, seed=65536, timestamps=False,
                   pos=True, ts=False, num_buckets=128, fast=None))
def test_jagged_matches_reference_forward_and_backward(case) -> None:
    inputs = make_inputs(
        case["lengths"],
        case["max_seq_len"],
        heads=case["heads"],
        dqk=case["dqk"],
        dv=case["dv"],
        seed=case["seed"],
        timestamps=case["timestamps"],
        pos=case["pos"],
        ts=case["ts"],
        num_buckets=case["num_buckets"],
    )
    if case["fast"] is None:
        compare_kernels(case["max_seq_len"], inputs)
    else:
        with fast_path_settings(*case["fast"]):
            compare_kernels(case["max_seq_len"], inputs)


def test_jagged_matches_reference_with_default_chunking() -> None:
    # Lengths beyond the default chunk threshold, so real query chunks run.
    lengths = [300, 5, 0, 257, 1, 40, 41]
    compare_kernels(320, make_inputs(lengths, 320, heads=2, dqk=8, dv=5, seed=3))


@pytest.mark.parametrize("lengths", [[1], [9], [0], [0, 0], [6, 0, 1]])
def test_single_and_degenerate_batches(lengths: List[int]) -> None:
    inputs = make_inputs(lengths, 9, heads=1, dqk=2, dv=5)
    compare_kernels(9, inputs)
    out = jagged_hstu_attention(9, **inputs)
    assert out.shape == (sum(lengths), 1, 5)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def test_length_one_sequence_is_silu_of_self_over_n() -> None:
    inputs = make_inputs([1], 7, heads=2, dqk=3, dv=2, timestamps=False, pos=False, ts=False)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    expected = silu((q * k).sum(-1, keepdim=True)) / 7 * v
    for kernel in KERNELS:
        assert_close(kernel(7, **inputs), expected)


def test_dispatcher_selects_kernels() -> None:
    inputs = make_inputs([4, 0, 3], 5)
    pairs = [
        (HSTUAttentionKernel.PYTORCH, pytorch_hstu_attention),
        (HSTUAttentionKernel.JAGGED, jagged_hstu_attention),
    ]
    for kernel, fn in pairs:
        torch.testing.assert_close(hstu_attention(5, **inputs, kernel=kernel), fn(5, **inputs), rtol=0, atol=0)
    assert_close(hstu_attention(5, **inputs), pytorch_hstu_attention(5, **inputs))


# ---------------------------------------------------------------------------------------
# Properties of both kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS, ids=["pytorch", "jagged"])
def test_causality(kernel) -> None:
    lengths = [7, 12, 3]
    inputs = make_inputs(lengths, 12, seed=5)
    base = kernel(12, **inputs)
    start, t = 7, 5  # token 5 of sequence 1
    changed = dict(inputs)
    for name in ("q", "k", "v"):
        changed[name] = inputs[name].clone()
        changed[name][start + t] += 3.0
    changed["timestamps"] = inputs["timestamps"].clone()
    changed["timestamps"][start + t :] += 10**6  # shifts later gaps only
    out = kernel(12, **changed)
    torch.testing.assert_close(out[: start + t], base[: start + t], rtol=0, atol=0)
    torch.testing.assert_close(out[start + 12 :], base[start + 12 :], rtol=0, atol=0)
    assert not torch.equal(out[start + t], base[start + t])


@pytest.mark.parametrize("kernel", KERNELS, ids=["pytorch", "jagged"])
def test_batch_independence(kernel) -> None:
    """A sequence's output is the same alone as in any batch: n is max_seq_len, not L_max."""
    N = 40
    lengths = [6, 40, 0, 17, 1, 23]
    inputs = make_inputs(lengths, N, seed=11)
    batched = kernel(N, **inputs)
    offsets = inputs["offsets"]
    for b, L in enumerate(lengths):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        alone = dict(inputs)
        for name in ("q", "k", "v", "timestamps"):
            alone[name] = inputs[name][lo:hi]
        alone["offsets"] = torch.tensor([0, L])
        assert_close(kernel(N, **alone), batched[lo:hi], rtol=1e-6)


def test_divisor_is_max_seq_len() -> None:
    inputs = make_inputs([3, 5], 8, timestamps=False, pos=False, ts=False)
    for kernel in KERNELS:
        assert_close(kernel(16, **inputs) * 2, kernel(8, **inputs))


def test_rejects_sequences_longer_than_max_seq_len() -> None:
    inputs = make_inputs([3, 6], 6)
    for kernel in KERNELS:
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            kernel(5, **{**inputs, "pos_weights": torch.zeros(9)})


def test_rejects_bad_shapes() -> None:
    inputs = make_inputs([3, 2], 4)
    with pytest.raises(ValueError, match="offsets"):
        jagged_hstu_attention(4, **{**inputs, "offsets": torch.tensor([0, 3, 4])})
    with pytest.raises(ValueError, match="pos_weights"):
        jagged_hstu_attention(4, **{**inputs, "pos_weights": torch.zeros(8)})
    with pytest.raises(ValueError, match="k must"):
        pytorch_hstu_attention(4, **{**inputs, "k": inputs["k"][:, :, :2]})


# ---------------------------------------------------------------------------------------
# Time buckets
# ---------------------------------------------------------------------------------------


def test_time_bucket_values() -> None:
    delta = torch.tensor([0, 1, 2, 10, 10**9, -10, -(10**9)])
    # floor(ln 2 / 0.301) = 2, floor(ln 10 / 0.301) = 7, floor(ln 1e9 / 0.301) = 68
    assert time_bucket(delta).tolist() == [0, 0, 2, 7, 68, 7, 68]
    assert time_bucket(delta, num_buckets=5).tolist() == [0, 0, 2, 5, 5, 5, 5]
    assert time_bucket(torch.tensor([2**62])).tolist() == [min(128, math.floor(62 * math.log(2) / 0.301))]
    assert time_bucket(delta).dtype == torch.int64


def test_time_bucket_matches_formula_away_from_edges() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.cat([torch.arange(-50, 3000), torch.randint(-(10**12), 10**12, (20000,), generator=g)])
    exact = [math.log(max(abs(d), 1)) / 0.301 for d in delta.tolist()]
    expected = torch.tensor([min(128, max(0, math.floor(x))) for x in exact])
    away = torch.tensor([abs(x - round(x)) > 1e-5 or x == 0.0 for x in exact])
    assert torch.equal(time_bucket(delta)[away], expected[away])
    assert int(away.sum()) > 0.99 * delta.numel()


def test_no_grad_and_partial_grad() -> None:
    """Inference (nothing saved) and gradients for only some inputs match the reference."""
    inputs = make_inputs([5, 0, 200, 9], 200, seed=7)
    with torch.no_grad():
        assert_close(jagged_hstu_attention(200, **inputs), pytorch_hstu_attention(200, **inputs))
    grads = []
    for kernel in KERNELS:
        q = inputs["q"].clone().requires_grad_()
        kernel(200, **{**inputs, "q": q}).square().sum().backward()
        grads.append(q.grad)
    assert_close(grads[1], grads[0])

