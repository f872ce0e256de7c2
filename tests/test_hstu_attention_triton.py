"""Tests for the Triton HSTU attention (torchrec_genrec/ops/hstu_attention_triton.py).

The kernels are checked against the padded PyTorch reference, forward and all five
gradients (q, k, v, pos_weights, ts_weights), on ragged batches holding sequences of
length 0, 1, 2, the tile size - 1, + 1 and the configured maximum; with and without each
bias; in float32 (tight) and bfloat16 / float16 (against the float32 reference on the
same rounded inputs). Also: time buckets at their exact edges, strided inputs, an empty
batch, torch.compile (fullgraph), torch.export, ``torch.library.opcheck`` and the errors
when triton is missing or cannot run.

On CPU the kernels run under Triton's interpreter, which is chosen for the whole process
when triton is first imported (``TRITON_INTERPRET=1``); the rest of the suite has imported
triton long before (``torch._dynamo`` does). So the CPU cases run in one child process
started with the interpreter (this file run as a script); each test compares its case with
the reference computed here. On CUDA the same cases run in-process at real sizes.
"""

import os
import subprocess
import sys
import traceback
from typing import Dict, NamedTuple, Optional, Tuple

if __name__ == "__main__":  # the interpreter child: before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

from torchrec_genrec.ops import hstu_attention_triton as hstu_triton  # noqa: E402
from torchrec_genrec.ops.hstu_attention import (  # noqa: E402
    HSTUAttentionKernel,
    hstu_attention,
    pytorch_hstu_attention,
    time_bucket,
)
from torchrec_genrec.ops.hstu_attention_triton import triton_hstu_attention, triton_tiles  # noqa: E402

GRAD_NAMES = ("q", "k", "v", "pos_weights", "ts_weights")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Scale-relative tolerance per dtype: float32 against float32; the half types against the
#: float32 reference on their own (rounded) inputs, so only the kernels' casts count.
RTOL = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}
#: On CUDA the bias gradients are float32 sums of ~10^6 terms (added in another order).
CUDA_RTOL = {**RTOL, "float32": 5e-5}


class Case(NamedTuple):
    """One batch: lengths, shapes, dtype and which biases are on."""

    lengths: Tuple[int, ...]
    max_seq_len: int
    dtype: str = "float32"
    pos: bool = True
    ts: bool = True
    timestamps: bool = True
    heads: int = 2
    dqk: int = 8
    dv: int = 6
    num_buckets: int = 128
    unsorted_ts: bool = False  # event times out of order: negative gaps
    strided: bool = False  # q, k, v are column slices of one fused projection
    seed: int = 0


def edge_lengths(tile: int, max_seq_len: int) -> Tuple[int, ...]:
    """1, 2, tile - 1, tile, tile + 1, the maximum, an empty sequence and a short one."""
    return (1, 2, tile - 1, tile, tile + 1, max_seq_len, 0, 3)


CPU_TILE = triton_tiles(torch.device("cpu"), torch.float32, 8, 6).block_m
CPU_N = 2 * CPU_TILE + 8  # three query blocks
CPU_LENGTHS = edge_lengths(CPU_TILE, CPU_N)
BIASES = {"none": dict(pos=False, ts=False, timestamps=False), "pos": dict(ts=False),
          "ts": dict(pos=False), "both": {}}
CPU_CASES: Dict[str, Case] = {
    **{f"{dt}-{b}": Case(CPU_LENGTHS, CPU_N, dtype=dt, **kw)
       for dt in ("float32", "bfloat16") for b, kw in BIASES.items()},
    "float16-both": Case(CPU_LENGTHS, CPU_N, dtype="float16"),
    # ts_weights given without timestamps: no time bias, a zero gradient
    "float32-pos-ts_weights-unused": Case(CPU_LENGTHS, CPU_N, timestamps=False),
    # few buckets (most gaps clamp), unsorted times, D = BLOCK_D (no column mask), one head
    "float32-3-buckets-unsorted": Case(CPU_LENGTHS, CPU_N, num_buckets=3, unsorted_ts=True, heads=1, dqk=16,
                                       dv=32, seed=1),
    "float32-strided": Case(CPU_LENGTHS, CPU_N, strided=True, seed=2),
    "float32-empty-batch": Case((0, 0), CPU_N),
}


# ---------------------------------------------------------------------------------------
# Inputs and runs (shared by the interpreter child and the CUDA tests)
# ---------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str = "cpu") -> Dict[str, Optional[torch.Tensor]]:
    """float32 inputs, rounded through ``case.dtype`` (both kernels see the same values)."""
    g = torch.Generator().manual_seed(case.seed)
    T, H = sum(case.lengths), case.heads
    dtype = DTYPES[case.dtype]
    if case.unsorted_ts:
        ts = torch.randint(0, 10**9, (T,), generator=g)
    else:  # rising irregularly over seconds to years
        gaps = torch.randint(0, 10, (T,), generator=g) ** torch.randint(0, 9, (T,), generator=g)
        ts = 1_600_000_000 + gaps.cumsum(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).float().to(device)

    return dict(
        q=rand(T, H, case.dqk, scale=case.dqk**-0.5),
        k=rand(T, H, case.dqk),
        v=rand(T, H, case.dv),
        offsets=torch.tensor((0,) + case.lengths).cumsum(0).to(device),
        timestamps=ts.to(device) if case.timestamps else None,
        pos_weights=rand(2 * case.max_seq_len - 1) if case.pos else None,
        ts_weights=rand(case.num_buckets + 1) if case.ts else None,
        grad_out=rand(T, H, case.dv),
    )


def run(kernel, case: Case, inputs, dtype: torch.dtype):
    """Forward + backward of ``kernel`` on ``dtype`` copies; returns float32 (out, {name: grad})."""
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in GRAD_NAMES if inputs[n] is not None}
    args = {n: inputs[n] for n in ("offsets", "timestamps", "pos_weights", "ts_weights")}
    args.update(leaves)
    if case.strided:
        fused = torch.cat([leaves["q"], leaves["k"], leaves["v"]], dim=-1).detach().requires_grad_()
        args["q"], args["k"], args["v"] = fused.split([case.dqk, case.dqk, case.dv], dim=-1)
    out = kernel(case.max_seq_len, **args)
    out.backward(inputs["grad_out"].to(out.dtype))
    grads = {n: x.grad for n, x in leaves.items()}
    if case.strided:
        grads["q"], grads["k"], grads["v"] = fused.grad.split([case.dqk, case.dqk, case.dv], dim=-1)
    grads = {n: (g.float() if g is not None else torch.zeros_like(leaves[n]).float()) for n, g in grads.items()}
    return out.detach().float(), grads


def run_triton(case: Case, device: str = "cpu"):
    return run(triton_hstu_attention, case, make_inputs(case, device), DTYPES[case.dtype])


def run_reference(case: Case, device: str = "cpu"):
    return run(pytorch_hstu_attention, case, make_inputs(case, device), torch.float32)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Relative to the element and to the tensor's scale (sums of many terms cancel)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=lambda m: f"{name}: {m}")


def compare(case: Case, result, reference, rtols: Dict[str, float] = RTOL) -> None:
    (out, grads), (ref_out, ref_grads) = result, reference
    rtol = rtols[case.dtype]
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, rtol, "out")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert_close(grads[name], ref_grads[name], rtol, f"d {name}")


def edge_timestamps(num_buckets: int, count: int) -> torch.Tensor:
    """Event times whose gaps from the first one sit exactly on bucket edges and one below."""
    edges = hstu_triton._time_bucket_edges(num_buckets, torch.device("cpu"))[1:-1]
    edges = edges[edges < 2**40].unique()
    pairs = torch.stack([edges - 1, edges], dim=1).reshape(-1)
    picks = pairs[torch.linspace(0, pairs.numel() - 1, count - 1).round().long()]
    return torch.cat([torch.zeros(1, dtype=torch.int64), picks])


def rab_probe(kernel, timestamps: torch.Tensor, ts_weights: torch.Tensor) -> torch.Tensor:
    """``SiLU(rab[i, j]) / N`` for every pair, read through one-hot values (``q = k = 0``)."""
    L, device = timestamps.numel(), timestamps.device
    v = torch.eye(L, device=device).view(L, 1, L)
    zeros = torch.zeros(L, 1, 4, device=device)
    return kernel(L, zeros, zeros, v, torch.tensor([0, L], device=device), timestamps, None, ts_weights).view(L, L)


# ---------------------------------------------------------------------------------------
# The interpreter child: every CPU case and check, saved for the tests below
# ---------------------------------------------------------------------------------------


def _check_compile() -> None:
    """torch.compile(fullgraph=True) keeps the op whole, forward and backward."""
    case = CPU_CASES["float32-both"]
    inputs = make_inputs(case)
    eager = run(triton_hstu_attention, case, inputs, torch.float32)
    compiled = run(torch.compile(triton_hstu_attention, fullgraph=True, backend="aot_eager"), case, inputs,
                   torch.float32)
    compare(case, compiled, eager)


def _check_export() -> None:
    """torch.export sees one op node (no Triton inside the graph) and runs it."""
    case = CPU_CASES["float32-both"]
    inputs = make_inputs(case)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, offsets, timestamps, pos_weights, ts_weights):
            return triton_hstu_attention(case.max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)

    args = tuple(inputs[n] for n in ("q", "k", "v", "offsets", "timestamps", "pos_weights", "ts_weights"))
    exported = torch.export.export(Attention(), args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == ["torchrec_genrec.hstu_attention_fwd.default"], targets
    torch.testing.assert_close(exported.module()(*args), Attention()(*args), rtol=0, atol=0)


def _check_opcheck() -> None:
    """Schema, fake (meta) implementations and autograd registration of both ops."""
    case = Case((3, 0, 17), 20, seed=3)
    inputs = make_inputs(case)
    names = ("q", "k", "v", "offsets", "timestamps", "pos_weights", "ts_weights")
    args = [inputs[n].requires_grad_() if n in GRAD_NAMES else inputs[n] for n in names]
    torch.library.opcheck(torch.ops.torchrec_genrec.hstu_attention_fwd, (case.max_seq_len, *args))
    bwd_args = (case.max_seq_len, inputs["grad_out"], *[a.detach() for a in args], True, True)
    torch.library.opcheck(torch.ops.torchrec_genrec.hstu_attention_bwd, bwd_args)


def _check_dispatcher() -> None:
    inputs = make_inputs(CPU_CASES["float32-both"])
    del inputs["grad_out"]
    out = hstu_attention(CPU_N, **inputs, kernel=HSTUAttentionKernel("triton"))
    torch.testing.assert_close(out, triton_hstu_attention(CPU_N, **inputs), rtol=0, atol=0)


def _interpreter_child(path: str) -> None:
    results: Dict[str, object] = {}
    for name, case in CPU_CASES.items():
        try:
            results[name] = run_triton(case)
        except Exception:
            results[name] = traceback.format_exc()
    ts = edge_timestamps(128, 24)
    ts_weights = torch.randn(129, generator=torch.Generator().manual_seed(0))
    results["rab-probe"] = rab_probe(triton_hstu_attention, ts, ts_weights)
    for check in (_check_compile, _check_export, _check_opcheck, _check_dispatcher):
        try:
            check()
            results[check.__name__] = None
        except Exception:
            results[check.__name__] = traceback.format_exc()
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> Dict[str, object]:
    path = tmp_path_factory.mktemp("hstu_triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(path)


def _result(interpreted: Dict[str, object], name: str):
    result = interpreted[name]
    if isinstance(result, str):
        pytest.fail(f"{name} raised in the interpreter child:\n{result}")
    return result


# ---------------------------------------------------------------------------------------
# CPU: Triton's interpreter
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_matches_reference_interpreted(interpreted, name: str) -> None:
    case = CPU_CASES[name]
    compare(case, _result(interpreted, name), run_reference(case))


def test_time_bucket_edges_match_reference_interpreted(interpreted) -> None:
    """Gaps exactly on bucket edges and one below get the reference's bucket (and bias)."""
    ts = edge_timestamps(128, 24)
    ts_weights = torch.randn(129, generator=torch.Generator().manual_seed(0))
    expected = rab_probe(pytorch_hstu_attention, ts, ts_weights)
    torch.testing.assert_close(_result(interpreted, "rab-probe"), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("check", ["_check_compile", "_check_export", "_check_opcheck", "_check_dispatcher"])
def test_torch_integration_interpreted(interpreted, check: str) -> None:
    assert _result(interpreted, check) is None


# ---------------------------------------------------------------------------------------
# CPU: no triton execution
# ---------------------------------------------------------------------------------------


def test_time_bucket_edge_table() -> None:
    """Entry k is the least |gap| whose reference bucket reaches k."""
    for num_buckets in (128, 3, 200):
        edges = hstu_triton._time_bucket_edges(num_buckets, torch.device("cpu"))
        assert edges.shape == (num_buckets + 2,) and edges[0] == 0 and edges[-1] == 2**63 - 1
        inner = edges[1:-1]
        reachable = inner < 2**63 - 1
        k = torch.arange(1, num_buckets + 1)
        edge, k = inner[reachable], k[reachable]
        assert bool((time_bucket(edge, num_buckets) >= k).all())
        assert bool((time_bucket(edge - 1, num_buckets) < k).all())
        assert torch.equal(time_bucket(-edge, num_buckets), time_bucket(edge, num_buckets))
    assert int(reachable.sum()) == 145  # floor(ln(2**63) / 0.301): larger buckets are never reached


def test_missing_triton_names_the_requirement(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(hstu_triton, "_kernels_module", None)
    case = CPU_CASES["float32-both"]
    inputs = make_inputs(case)
    del inputs["grad_out"]
    with pytest.raises(ImportError, match=r"pip install triton==3\.6\.0"):
        triton_hstu_attention(case.max_seq_len, **inputs)
    with pytest.raises(ImportError, match=r"pip install triton==3\.6\.0"):
        hstu_attention(case.max_seq_len, **inputs, kernel=HSTUAttentionKernel.TRITON)


def test_cpu_without_interpreter_is_refused() -> None:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.standard.sigmoid, InterpretedFunction):
        pytest.skip("this process runs Triton's interpreter")
    inputs = make_inputs(CPU_CASES["float32-both"])
    del inputs["grad_out"]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*use model.kernel=jagged"):
        triton_hstu_attention(CPU_N, **inputs)


def test_rejects_bad_inputs() -> None:
    inputs = make_inputs(CPU_CASES["float32-both"])
    del inputs["grad_out"]
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        triton_hstu_attention(CPU_N - 1, **{**inputs, "pos_weights": torch.zeros(2 * CPU_N - 3)})
    with pytest.raises(ValueError, match="share one of"):
        triton_hstu_attention(CPU_N, **{**inputs, "v": inputs["v"].double()})


# ---------------------------------------------------------------------------------------
# CUDA: compiled kernels at real sizes
# ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU runs the interpreter cases)")
CUDA_N = 1024


def cuda_case(dtype: str, bias: str, dim: int = 64, heads: int = 4, **kw) -> Case:
    tile = triton_tiles(torch.device("cuda"), DTYPES[dtype], dim, dim).block_m
    g = torch.Generator().manual_seed(7)
    # a long-tailed batch around the edge lengths
    tail = tuple(int(x) for x in torch.randint(1, CUDA_N, (8,), generator=g) // torch.randint(1, 8, (8,), generator=g))
    return Case(edge_lengths(tile, CUDA_N) + tail, CUDA_N, dtype=dtype, heads=heads, dqk=dim, dv=dim,
                **{**BIASES[bias], **kw})


@pytest.fixture
def highest_precision():
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@cuda
@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_matches_reference_cuda(dtype: str, bias: str, highest_precision) -> None:
    case = cuda_case(dtype, bias)
    compare(case, run_triton(case, "cuda"), run_reference(case, "cuda"), CUDA_RTOL)


@cuda
@pytest.mark.parametrize("case", [
    dict(dim=128, num_buckets=3, unsorted_ts=True),
    dict(dim=32, strided=True, heads=2),
    dict(dim=256, heads=1),
], ids=["d128-unsorted", "d32-strided", "d256"])
def test_matches_reference_cuda_shapes(case, highest_precision) -> None:
    c = cuda_case("bfloat16", "both", **case)
    compare(c, run_triton(c, "cuda"), run_reference(c, "cuda"), CUDA_RTOL)


@cuda
def test_time_bucket_edges_cuda() -> None:
    ts = edge_timestamps(128, 64).cuda()
    ts_weights = torch.randn(129, device="cuda")
    torch.testing.assert_close(rab_probe(triton_hstu_attention, ts, ts_weights),
                               rab_probe(pytorch_hstu_attention, ts, ts_weights), rtol=1e-5, atol=1e-7)


@cuda
def test_compile_inductor_cuda(highest_precision) -> None:
    case = cuda_case("bfloat16", "both")
    inputs = make_inputs(case, "cuda")
    eager = run(triton_hstu_attention, case, inputs, torch.bfloat16)
    compiled = run(torch.compile(triton_hstu_attention, fullgraph=True), case, inputs, torch.bfloat16)
    compare(case, compiled, eager)


if __name__ == "__main__":
    _interpreter_child(sys.argv[1])
