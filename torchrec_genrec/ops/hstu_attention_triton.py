"""HSTU attention in Triton: the jagged forward and backward as ``torch.library`` custom ops.

The same function as :func:`~torchrec_genrec.ops.hstu_attention.pytorch_hstu_attention`,
forward and backward (``q``, ``k``, ``v``, ``pos_weights``, ``ts_weights``), per sequence
``b`` and head ``h``::

    out_i = sum_{j <= i} SiLU(q_i . k_j + rab[i, j]) / N * v_j
    rab[i, j] = pos_weights[i - j + N - 1] + ts_weights[time_bucket(ts_i - ts_j)]

Kernels (``_hstu_attention_triton_kernels.py``):

- **Tiling.** Forward and ``dq``: one program per (query block of ``BLOCK_M`` rows, sequence,
  head) holds its ``q`` tile and an fp32 accumulator and walks key blocks of ``BLOCK_N``;
  ``dk``/``dv``: one program per (key block, sequence, head) walks the query blocks. Each
  step is ``q k^T`` (``tl.dot``, fp32 accumulation), the bias gathered for the tile,
  SiLU, and a second ``tl.dot``; nothing of size ``L x L`` is ever stored. Tile sizes
  per dtype and head dim: :func:`triton_tiles`. Inputs may be
  fp32, bf16 or fp16; the SiLU and everything after it run in fp32, the tiles fed to the
  second matmul are cast back to the input dtype (as FlashAttention does). fp32 matmuls
  follow ``torch.get_float32_matmul_precision()`` (``"highest"``: IEEE, else TF32).
- **Jagged layout.** No padding and no index plan: a program reads its sequence's start and
  length from ``offsets`` and addresses rows ``start + i`` directly; rows and columns past
  the length are masked. The grid is ``(B * H, cdiv(L_max, BLOCK))``; programs whose block
  starts past their own sequence's end return at once, and the forward and ``dq`` grids
  run their block ids backwards so the blocks with the most keys start first.
- **Causal skipping.** A query block stops at its own last row, a key block starts at the
  query block holding its first key: only the ``~L^2 / 2`` lower triangle (plus the
  diagonal tiles) is computed, the diagonal tiles masked elementwise.
- **Backward.** Scores are recomputed (nothing but the inputs is saved): one kernel writes
  ``dk``, ``dv`` and the bias gradients, a second one ``dq`` (recomputing rather than
  adding ``dq`` with atomics keeps it deterministic).
- **Bias gradients** accumulate with fp32 atomics into ``_GRAD_STRIPES`` partial rows
  (program ``p`` writes row ``p % stripes``), summed on the host. Atomics, because a
  per-block partial sum of the position gradient needs a row of ``2N - 1`` per program
  and the time buckets depend on the data, not on the tile; stripes, because every
  program hits the same few addresses (a handful of buckets, the same diagonals) and one
  row would serialise them. The position gradient is first summed per diagonal inside the
  tile (a skew by ``tl.gather``), so a tile adds ``BLOCK_M + BLOCK_N - 1`` values, not one
  per pair; the time-bucket gradient adds one value per pair. The summation order of the
  atomics varies, so these two gradients are not bitwise reproducible run to run
  (``dq``, ``dk``, ``dv`` and the forward are).
- **Time buckets** are bit-identical to :func:`~torchrec_genrec.ops.hstu_attention.time_bucket`:
  the kernel's float32 ``log`` gives a bucket within one of the reference's, and a table
  of exact integer bucket edges (computed once per ``num_buckets`` from the reference
  function itself) corrects it.

Registration: ``torchrec_genrec::hstu_attention_fwd`` and ``torchrec_genrec::hstu_attention_bwd``
with fake (meta) implementations and the forward's autograd, so ``torch.compile``
(``fullgraph=True``) and ``torch.export`` keep the op as one node instead of tracing into
Triton. Importing this module needs only torch; triton (``pip install triton==3.6.0``) is
imported at the first call.

Where it runs: CUDA tensors, compiled. CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported; ``torch._dynamo`` imports it),
which is slow and meant for tests; there the bf16 matmuls take their (bf16-rounded) tiles
in fp32, because the interpreter would multiply bf16 bit patterns as integers.
"""

import importlib
from types import ModuleType
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from torchrec_genrec.ops.hstu_attention import _check_inputs, time_bucket

__all__ = ["TRITON_REQUIREMENT", "TritonTiles", "triton_hstu_attention", "triton_tiles"]

#: The Triton release the kernels are written and tested against.
TRITON_REQUIREMENT = "triton==3.6.0"
#: Partial rows the bias-gradient atomics are spread over (see the module notes).
_GRAD_STRIPES = 64
_INT64_MAX = 2**63 - 1


class TritonTiles(NamedTuple):
    """Launch shape of the kernels: query rows and key rows per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def triton_tiles(device: torch.device, dtype: torch.dtype, dqk: int, dv: int) -> TritonTiles:
    """Tile sizes the kernels use for ``dtype`` inputs on ``device`` with head dims ``dqk``, ``dv``.

    Under the interpreter (CPU): 16 x 16, the smallest ``tl.dot`` takes, so that short test
    sequences already span several tiles. On CUDA, chosen from the register and shared
    memory use of the kernels compiled for sm_90, not yet from timings: bf16/fp16
    64 x 64 with 8 warps up to ``D = 128`` (no register spills up to ``D = 64`` but a few
    bytes in the ``dk``/``dv`` kernel with both biases), 32 x 32 above; fp32, whose IEEE
    products do not run on tensor cores, 32 x 32.

    Example::

        triton_tiles(torch.device("cuda"), torch.bfloat16, 64, 64)  # TritonTiles(64, 64, 8, 2)
    """
    if device.type != "cuda":
        return TritonTiles(16, 16, 1, 1)
    d = max(dqk, dv)
    if dtype == torch.float32:
        return TritonTiles(32, 32, 4 if d <= 64 else 8, 2 if d <= 128 else 1)
    if d <= 128:
        return TritonTiles(64, 64, 8, 2)
    return TritonTiles(32, 32, 4, 1)


# ----------------------------------------------------------------------------------------
# Loading triton and the kernels
# ----------------------------------------------------------------------------------------

_kernels_module: Optional[ModuleType] = None


def _kernels(device: torch.device) -> Tuple[ModuleType, bool]:
    """The kernels module, loaded in the mode triton runs in, and whether that mode is the
    interpreter; clear errors when triton is missing or cannot run on ``device``."""
    global _kernels_module
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as e:
        raise ImportError(
            f"HSTUAttentionKernel.TRITON needs Triton, which is not installed: pip install {TRITON_REQUIREMENT}"
        ) from e
    # Triton's own library functions (tl.sum, tl.sigmoid, ...) are compiled or interpreted
    # for the whole process, as TRITON_INTERPRET was when triton was first imported.
    interpreted = isinstance(triton.language.standard.sigmoid, InterpretedFunction)
    if not interpreted and device.type != "cuda":
        raise RuntimeError(
            f"HSTUAttentionKernel.TRITON runs on CUDA tensors; got {device.type} tensors. On CPU it runs "
            "only under Triton's interpreter (slow, for tests): set TRITON_INTERPRET=1 before triton is "
            "first imported (importing torch._dynamo imports it). To train on a CPU, use model.kernel=jagged."
        )
    if _kernels_module is None:
        if interpreted:
            _let_interpreter_loop_to_tensor_bounds()
        with triton.knobs.runtime.scope():
            # Our kernels must be built like triton's library functions, whatever the
            # environment says now.
            triton.knobs.runtime.interpret = interpreted
            _kernels_module = importlib.import_module("torchrec_genrec.ops._hstu_attention_triton_kernels")
    return _kernels_module, interpreted


def _let_interpreter_loop_to_tensor_bounds() -> None:
    """Lets Triton 3.6's interpreter run ``range(0, n)`` with a tensor ``n``.

    It converts the bound with ``int()`` of a one-element array, which numpy >= 2.4
    refuses (fixed in later triton releases); the kernels' loop bounds are per-sequence
    tensors. Patched only when numpy refuses, and only for the interpreter.
    """
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_one_element_index", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._one_element_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


_edge_tables: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _time_bucket_edges(num_buckets: int, device: torch.device) -> torch.Tensor:
    """``(num_buckets + 2,)`` int64: entry ``k`` is the least integer ``|d|`` with
    ``time_bucket(d) >= k`` (0 for ``k = 0``, int64 max when no gap reaches ``k``).

    Found by bisection on :func:`time_bucket` itself (monotone in ``|d|``), so the kernel's
    buckets equal the reference's at every gap, edges included.
    """
    key = (num_buckets, device)
    if key not in _edge_tables:
        targets = torch.arange(1, num_buckets + 1, dtype=torch.int64)
        lo = torch.zeros_like(targets)  # bucket(lo) < target
        hi = torch.full_like(targets, _INT64_MAX)  # bucket(hi) >= target, if reachable
        reachable = time_bucket(hi, num_buckets) >= targets
        for _ in range(64):
            mid = lo + (hi - lo) // 2
            up = time_bucket(mid, num_buckets) >= targets
            hi = torch.where(up, mid, hi)
            lo = torch.where(up, lo, mid)
        edges = torch.where(reachable, hi, torch.full_like(hi, _INT64_MAX))
        table = torch.cat([torch.zeros(1, dtype=torch.int64), edges, torch.tensor([_INT64_MAX])])
        _edge_tables[key] = table.to(device)
    return _edge_tables[key]


# ----------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its last dim is contiguous (the kernels take row and head strides), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


class _Launch(NamedTuple):
    """What every kernel launch shares."""

    kernels: ModuleType
    tiles: TritonTiles
    batch_heads: int
    max_len: int
    offsets: torch.Tensor
    ts: torch.Tensor
    pos_w: torch.Tensor
    ts_w: torch.Tensor
    edges: torch.Tensor
    has_pos: bool
    has_ts: bool
    num_ts_buckets: int
    block_dqk: int
    block_dv: int
    precision: str
    upcast: bool


def _prepare(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
) -> _Launch:
    lengths = _check_inputs(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one of float32, bfloat16, float16; got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    kernels, interpreted = _kernels(device)
    tiles = triton_tiles(device, q.dtype, q.shape[2], v.shape[2])
    has_pos = pos_weights is not None
    has_ts = ts_weights is not None and timestamps is not None
    offsets_dev = offsets.to(device=device, dtype=torch.int64).contiguous()
    num_ts_buckets = ts_weights.numel() - 1 if ts_weights is not None else 0
    return _Launch(
        kernels=kernels,
        tiles=tiles,
        batch_heads=lengths.numel() * q.shape[1],
        max_len=int(lengths.max()) if lengths.numel() else 0,
        offsets=offsets_dev,
        # Unused pointer arguments get any tensor of the right kind.
        ts=timestamps.to(device=device, dtype=torch.int64).contiguous() if has_ts else offsets_dev,
        pos_w=pos_weights.detach().contiguous() if has_pos else q,
        ts_w=ts_weights.detach().contiguous() if has_ts else q,
        edges=_time_bucket_edges(num_ts_buckets, device) if has_ts else offsets_dev,
        has_pos=has_pos,
        has_ts=has_ts,
        num_ts_buckets=num_ts_buckets,
        block_dqk=max(16, 1 << (q.shape[2] - 1).bit_length()),
        block_dv=max(16, 1 << (v.shape[2] - 1).bit_length()),
        precision=_dot_precision(q.dtype),
        upcast=interpreted and q.dtype == torch.bfloat16,
    )


def _strides(*xs: torch.Tensor) -> Tuple[int, ...]:
    return tuple(s for x in xs for s in (x.stride(0), x.stride(1)))


def _forward(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    q, k, v = (_unit_last_stride(x.detach()) for x in (q, k, v))
    run = _prepare(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    out = q.new_empty((T, H, Dv))
    if T == 0 or run.max_len == 0:
        return out.zero_()
    t = run.tiles
    run.kernels._hstu_fwd_kernel[(run.batch_heads, -(-run.max_len // t.block_m))](
        q, k, v, out, run.offsets, run.ts, run.pos_w, run.ts_w, run.edges,
        *_strides(q, k, v, out),
        H, Dqk, Dv, max_seq_len, run.num_ts_buckets, 1.0 / max_seq_len,
        HAS_POS=run.has_pos, HAS_TS=run.has_ts,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_DQK=run.block_dqk, BLOCK_DV=run.block_dv,
        DOT_PRECISION=run.precision, UPCAST=run.upcast, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


def _backward(
    max_seq_len: int,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
    want_pos: bool,
    want_ts: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, do = (_unit_last_stride(x.detach()) for x in (q, k, v, grad_out.to(q.dtype)))
    run = _prepare(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
    want_pos = want_pos and run.has_pos
    want_ts = want_ts and run.has_ts
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    dq, dk, dv = (torch.zeros(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    pos_numel = 2 * max_seq_len - 1
    dpos = torch.zeros((_GRAD_STRIPES, pos_numel) if want_pos else (1, 1), device=q.device, dtype=torch.float32)
    dts = torch.zeros((_GRAD_STRIPES, run.num_ts_buckets + 1) if want_ts else (1, 1),
                      device=q.device, dtype=torch.float32)
    if T > 0 and run.max_len > 0:
        t = run.tiles
        common = dict(
            HAS_POS=run.has_pos, HAS_TS=run.has_ts, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_DQK=run.block_dqk, BLOCK_DV=run.block_dv, DOT_PRECISION=run.precision, UPCAST=run.upcast,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )
        run.kernels._hstu_bwd_dkdv_kernel[(run.batch_heads, -(-run.max_len // t.block_n))](
            q, k, v, do, dk, dv, run.offsets, run.ts, run.pos_w, run.ts_w, run.edges, dpos, dts,
            *_strides(q, k, v, do, dk, dv),
            H, Dqk, Dv, max_seq_len, run.num_ts_buckets, 1.0 / max_seq_len, _GRAD_STRIPES,
            POS_GRAD=want_pos, TS_GRAD=want_ts,
            BLOCK_DIAG=1 << (t.block_m + t.block_n - 2).bit_length(), **common,
        )
        run.kernels._hstu_bwd_dq_kernel[(run.batch_heads, -(-run.max_len // t.block_m))](
            q, k, v, do, dq, run.offsets, run.ts, run.pos_w, run.ts_w, run.edges,
            *_strides(q, k, v, do, dq),
            H, Dqk, Dv, max_seq_len, run.num_ts_buckets, 1.0 / max_seq_len, **common,
        )
    grad_pos = dpos.sum(0).to(pos_weights.dtype) if want_pos else q.new_empty(0)
    grad_ts = dts.sum(0).to(ts_weights.dtype) if want_ts else q.new_empty(0)
    return dq, dk, dv, grad_pos, grad_ts


# ----------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("torchrec_genrec::hstu_attention_fwd", mutates_args=())
def hstu_attention_fwd(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """Forward op: the arguments and result of :func:`triton_hstu_attention`."""
    return _forward(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)


@hstu_attention_fwd.register_fake
def _hstu_attention_fwd_fake(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.custom_op("torchrec_genrec::hstu_attention_bwd", mutates_args=())
def hstu_attention_bwd(
    max_seq_len: int,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
    want_pos: bool,
    want_ts: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op: ``(dq, dk, dv, d pos_weights, d ts_weights)`` for ``grad_out (T, H, Dv)``.

    A bias gradient that is not wanted (or whose bias is absent: no ``pos_weights``; no
    ``ts_weights`` or no ``timestamps``) comes back as an empty ``(0,)`` tensor.
    """
    return _backward(max_seq_len, grad_out, q, k, v, offsets, timestamps, pos_weights, ts_weights, want_pos, want_ts)


@hstu_attention_bwd.register_fake
def _hstu_attention_bwd_fake(max_seq_len, grad_out, q, k, v, offsets, timestamps, pos_weights, ts_weights,
                             want_pos, want_ts):
    grad_pos = pos_weights.new_empty(pos_weights.shape) if want_pos and pos_weights is not None else q.new_empty(0)
    has_ts = want_ts and ts_weights is not None and timestamps is not None
    grad_ts = ts_weights.new_empty(ts_weights.shape) if has_ts else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_pos, grad_ts


def _setup_context(ctx, inputs, output) -> None:
    max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights = inputs
    ctx.save_for_backward(q, k, v, offsets, timestamps, pos_weights, ts_weights)
    ctx.max_seq_len = max_seq_len


def _autograd_backward(ctx, grad_out: torch.Tensor):
    q, k, v, offsets, timestamps, pos_weights, ts_weights = ctx.saved_tensors
    want_pos = pos_weights is not None and ctx.needs_input_grad[6]
    want_ts = ts_weights is not None and timestamps is not None and ctx.needs_input_grad[7]
    dq, dk, dv, grad_pos, grad_ts = hstu_attention_bwd(
        ctx.max_seq_len, grad_out, q, k, v, offsets, timestamps, pos_weights, ts_weights, want_pos, want_ts
    )
    return None, dq, dk, dv, None, None, grad_pos if want_pos else None, grad_ts if want_ts else None


hstu_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_hstu_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU causal SiLU attention on jagged sequences, in Triton (forward and backward).

    Same function, arguments and result as
    :func:`~torchrec_genrec.ops.hstu_attention.pytorch_hstu_attention`; gradients for ``q``,
    ``k``, ``v``, ``pos_weights`` and ``ts_weights``. One call is the custom op
    ``torch.ops.torchrec_genrec.hstu_attention_fwd`` (its backward
    ``torchrec_genrec::hstu_attention_bwd``), opaque to ``torch.compile`` and
    ``torch.export``. ``q``, ``k``, ``v`` share a dtype: float32, bfloat16 or float16
    (fp32 accumulation); the bias weights may be of any float dtype. Needs triton
    (``pip install triton==3.6.0``) and CUDA tensors, or Triton's interpreter on CPU.

    Args:
        max_seq_len (int): ``N``, the configured maximum length; the attention divisor and
            the size of the position bias. Every sequence must satisfy ``L_b <= N``.
        q (torch.Tensor): ``(T, H, Dqk)`` queries, jagged over the batch; any row and head
            strides, unit stride along ``Dqk``.
        k (torch.Tensor): ``(T, H, Dqk)`` keys.
        v (torch.Tensor): ``(T, H, Dv)`` values.
        offsets (torch.Tensor): ``(B + 1,)`` int64, ``offsets[0] == 0``, ``offsets[-1] == T``.
            Empty sequences allowed.
        timestamps (Optional[torch.Tensor]): ``(T,)`` int64 event times; None for no time bias.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)`` position bias; None for none.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)`` time bias; None for none.

    Returns:
        torch.Tensor: ``(T, H, Dv)`` attention output in ``q``'s dtype, jagged like ``q``.

    Example::

        # B = 3 sequences, lengths 2, 0 and 3 (T = 5), H = 2 heads, Dqk = 8, Dv = 4:
        #   offsets = [0, 2, 2, 5]
        #   q rows:  [q00 q01 | | q20 q21 q22]
        q, k = torch.randn(5, 2, 8, device="cuda"), torch.randn(5, 2, 8, device="cuda")
        v = torch.randn(5, 2, 4, device="cuda")
        out = triton_hstu_attention(
            200, q, k, v, torch.tensor([0, 2, 2, 5], device="cuda"),
            timestamps=torch.tensor([10, 70, 5, 9, 3600], device="cuda"),
            pos_weights=torch.zeros(399, device="cuda"), ts_weights=torch.zeros(129, device="cuda"),
        )  # (5, 2, 4)
    """
    return hstu_attention_fwd(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
