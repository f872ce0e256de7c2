"""HSTU pointwise attention on jagged sequences: a padded reference and a fast jagged path.

HSTU ("Actions Speak Louder than Words", Zhai et al., ICML 2024) replaces softmax attention
by a pointwise SiLU. Per sequence ``b`` of length ``L_b`` and per head ``h``::

    A[i, j] = SiLU(q_i . k_j + rab[i, j]) / n     for j <= i (causal), 0 otherwise
    out_i   = sum_j A[i, j] v_j

``rab`` is a learned relative attention bias, shared by all heads, over positions and
log-bucketed time gaps::

    rab[i, j] = pos_weights[(i - j) + (N - 1)] + ts_weights[bucket(ts_i - ts_j)]
    bucket(d) = clamp(floor(ln(max(|d|, 1)) / 0.301), 0, num_buckets)

with ``N = max_seq_len``, ``pos_weights`` of shape ``(2N - 1,)`` and ``ts_weights`` of shape
``(num_buckets + 1,)`` (128 buckets in the paper). There is no ``1/sqrt(d)`` inside; a caller
that wants one scales ``q`` first.

Why ``n`` is the constant ``max_seq_len``: without a softmax nothing normalises a row, so the
divisor sets the output's scale. Dividing by the batch's longest sequence would make a user's
output depend on which other users share the batch (and on the batch size, through its
maximum), so training and serving would disagree. ``N`` is fixed by the config, so every
sequence is computed exactly as it would be on its own. Sequences longer than ``N`` must be
truncated by the caller; the ops refuse them.

Two kernels compute the same function, forward and backward:

- :func:`pytorch_hstu_attention` pads every sequence to the batch's longest, builds the full
  ``(B, H, L, L)`` score tensor with bias and masks, and unpads. Obviously right and
  ``O(B * L_max^2)`` in time and memory: the reference for tests.
- :func:`jagged_hstu_attention` never pays for the batch's padding. Sequences are sorted by
  length and cut into length buckets by a small dynamic programme that trades padding waste
  against per-bucket overhead; each bucket is padded only to its own longest length and
  computed as batched dense blocks, with the bias gathered per bucket too. Long buckets
  are split into query chunks so most of the masked upper triangle is never formed. The
  whole op is one custom autograd function (per chunk: bias broadcast into the score
  buffer, one ``baddbmm``, SiLU, a second matmul; backward with the fused
  ``silu_backward`` and ``index_add_`` for the bias), so no autograd graph of gathers,
  slices and masks is built. On 2 CPU cores, B = 128 long-tailed lengths (mean ~100,
  max 1024), H = 2, D = 64, forward + backward is ~0.13 s against ~18 s for the reference
  (bench/hstu_attention_bench.py).

A third computes it in Triton on CUDA: :func:`~torchrec_genrec.ops.hstu_attention_triton.triton_hstu_attention`
(``hstu_attention_triton.py``), jagged forward and backward kernels registered as
``torch.library`` custom ops. It is imported only when selected, so this module needs no triton.

:func:`hstu_attention` dispatches between them by :class:`HSTUAttentionKernel`.
"""

from __future__ import annotations

import enum
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from torchrec_genrec.ops.jagged import plan_length_buckets

__all__ = [
    "DEFAULT_NUM_TIME_BUCKETS",
    "HSTUAttentionKernel",
    "hstu_attention",
    "jagged_hstu_attention",
    "padded_hstu_attention",
    "pytorch_hstu_attention",
    "time_bucket",
]

#: Number of log-time buckets of the HSTU paper; ``ts_weights`` then has 129 entries.
DEFAULT_NUM_TIME_BUCKETS = 128
#: ``bucket(d) = floor(ln(|d|) / _LOG_BUCKET_WIDTH)``; 0.301 ~ ln(2) / 2.3, as in HSTU.
_LOG_BUCKET_WIDTH = 0.301


class HSTUAttentionKernel(enum.Enum):
    """Which implementation :func:`hstu_attention` runs.

    - ``PYTORCH``: :func:`pytorch_hstu_attention`, padded to the batch's longest sequence.
    - ``JAGGED``: :func:`jagged_hstu_attention`, length-bucketed, no batch-wide padding.
    - ``TRITON``: :func:`~torchrec_genrec.ops.hstu_attention_triton.triton_hstu_attention`,
      Triton kernels over the jagged layout (CUDA; needs ``pip install triton==3.6.0``).
    """

    PYTORCH = "pytorch"
    JAGGED = "jagged"
    TRITON = "triton"


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


def time_bucket(delta: torch.Tensor, num_buckets: int = DEFAULT_NUM_TIME_BUCKETS) -> torch.Tensor:
    """Log-scale bucket of a time gap: ``clamp(floor(ln(max(|d|, 1)) / 0.301), 0, num_buckets)``.

    Args:
        delta (torch.Tensor): time gaps ``ts_i - ts_j`` (integer, or float), any shape;
            computed in float32, so bucket edges are exact to ~1e-7 relative.
        num_buckets (int): the largest bucket id; ``ts_weights`` has ``num_buckets + 1`` rows.

    Returns:
        torch.Tensor: int64 bucket ids in ``[0, num_buckets]``, shape of ``delta``.

    Example::

        time_bucket(torch.tensor([0, 1, 2, 10, 10**9]))  # tensor([0, 0, 2, 7, 68])
    """
    return _time_bucket_(delta.to(torch.float32, copy=True), num_buckets)


def _time_bucket_(x: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """:func:`time_bucket` of float32 gaps ``x``, overwriting ``x``.

    Computed in float32 (``|d|`` rounded to 24 bits, then ``ln``); ``floor`` is the
    truncation to int64, exact because the value is >= 0 after ``max(|d|, 1)``.
    """
    x.abs_().clamp_(min=1).log_().div_(_LOG_BUCKET_WIDTH)
    return x.clamp_(max=num_buckets).to(torch.int64)


def _check_inputs(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """Validates shapes; returns the sequence lengths ``(B,)`` as a CPU int64 tensor."""
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be (T, H, Dv) with (T, H) = {tuple(q.shape[:2])}, got {tuple(v.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be (B + 1,), got {tuple(offsets.shape)}")
    off = offsets.detach().to("cpu", torch.int64)
    lengths = off[1:] - off[:-1]
    if int(off[0]) != 0 or int(off[-1]) != q.shape[0] or bool((lengths < 0).any()):
        raise ValueError(f"offsets must rise from 0 to T={q.shape[0]}, got {off.tolist()[:8]}...")
    if lengths.numel() > 0 and int(lengths.max()) > max_seq_len:
        raise ValueError(
            f"a sequence of length {int(lengths.max())} exceeds max_seq_len={max_seq_len}; truncate it first"
        )
    if timestamps is not None and timestamps.shape != (q.shape[0],):
        raise ValueError(f"timestamps must be (T,) = ({q.shape[0]},), got {tuple(timestamps.shape)}")
    if pos_weights is not None and pos_weights.shape != (2 * max_seq_len - 1,):
        raise ValueError(
            f"pos_weights must be (2N - 1,) = ({2 * max_seq_len - 1},), got {tuple(pos_weights.shape)}"
        )
    if ts_weights is not None and ts_weights.dim() != 1:
        raise ValueError(f"ts_weights must be (num_buckets + 1,), got {tuple(ts_weights.shape)}")
    return lengths


def _relative_bias(
    max_seq_len: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    ts_rows: Optional[torch.Tensor],
    ts_cols: Optional[torch.Tensor],
    pos_weights: Optional[torch.Tensor],
    ts_weights: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """``rab[b, i, j]`` for query positions ``rows`` and key positions ``cols``.

    Args:
        max_seq_len (int): ``N``.
        rows (torch.Tensor): ``(M,)`` query positions within their sequences.
        cols (torch.Tensor): ``(K,)`` key positions.
        ts_rows (Optional[torch.Tensor]): ``(B, M)`` query timestamps.
        ts_cols (Optional[torch.Tensor]): ``(B, K)`` key timestamps.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)``.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)``.

    Returns:
        Optional[torch.Tensor]: ``(B, M, K)``, or ``(1, M, K)`` with position bias only, or
        None when there is no bias at all.
    """
    rab: Optional[torch.Tensor] = None
    if pos_weights is not None:
        rel = rows.view(-1, 1) - cols.view(1, -1) + (max_seq_len - 1)
        rab = pos_weights[rel].unsqueeze(0)
    if ts_weights is not None and ts_rows is not None and ts_cols is not None:
        buckets = time_bucket(ts_rows.unsqueeze(2) - ts_cols.unsqueeze(1), ts_weights.numel() - 1)
        ts_bias = ts_weights[buckets]
        rab = ts_bias if rab is None else rab + ts_bias
    return rab


# ----------------------------------------------------------------------------------------
# Reference: pad to the batch's longest sequence
# ----------------------------------------------------------------------------------------


def _pad(values: torch.Tensor, seq_ids: torch.Tensor, pos: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Jagged ``(T, ...)`` -> zero-padded ``(B, L, ...)``."""
    padded = values.new_zeros((B, L) + tuple(values.shape[1:]))
    return padded.index_put((seq_ids, pos), values)


def pytorch_hstu_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU causal SiLU attention, reference version: pads every sequence to the longest.

    Costs ``O(B * H * L_max^2)`` time and memory whatever the real lengths are; use it to
    check faster kernels, not to train.

    Args:
        max_seq_len (int): ``N``, the configured maximum length; the attention divisor and
            the size of the position bias. Every sequence must satisfy ``L_b <= N``.
        q (torch.Tensor): ``(T, H, Dqk)`` queries, jagged over the batch.
        k (torch.Tensor): ``(T, H, Dqk)`` keys.
        v (torch.Tensor): ``(T, H, Dv)`` values.
        offsets (torch.Tensor): ``(B + 1,)`` int64, ``offsets[0] == 0``, ``offsets[-1] == T``;
            sequence ``b`` is rows ``offsets[b]:offsets[b + 1]``. Empty sequences allowed.
        timestamps (Optional[torch.Tensor]): ``(T,)`` int64 event times; None for no time bias.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)`` position bias, indexed by
            ``(i - j) + N - 1``; None for no position bias.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)`` time bias, indexed by
            :func:`time_bucket` of ``ts_i - ts_j``; None for no time bias.

    Returns:
        torch.Tensor: ``(T, H, Dv)`` attention output, jagged like ``q``.

    Example::

        # B = 2 sequences, lengths 2 and 3, H = 1 head:
        #   offsets = [0, 2, 5]
        #   q rows:  [q00 q01 | q10 q11 q12]
        out = pytorch_hstu_attention(
            200, q, k, v, torch.tensor([0, 2, 5]),
            timestamps=ts, pos_weights=pos_w, ts_weights=ts_w,
        )  # (5, 1, Dv); out[1] = (SiLU(q01.k00 + rab) v00 + SiLU(q01.k01 + rab) v01) / 200
    """
    lengths = _check_inputs(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
    T, H, _ = q.shape
    B = lengths.numel()
    L = int(lengths.max()) if B > 0 else 0
    if T == 0 or L == 0:
        return v.new_zeros((0, H, v.shape[2])) + 0.0 * v.sum()

    device = q.device
    lengths = lengths.to(device)
    seq_ids = torch.repeat_interleave(torch.arange(B, device=device), lengths)  # (T,)
    pos = torch.arange(T, device=device) - offsets.to(device)[seq_ids]  # (T,)

    q_pad = _pad(q, seq_ids, pos, B, L)  # (B, L, H, Dqk)
    k_pad = _pad(k, seq_ids, pos, B, L)
    v_pad = _pad(v, seq_ids, pos, B, L)  # (B, L, H, Dv)
    ts_pad = _pad(timestamps, seq_ids, pos, B, L) if timestamps is not None else None
    out_pad = padded_hstu_attention(max_seq_len, q_pad, k_pad, v_pad, lengths, ts_pad, pos_weights, ts_weights)
    return out_pad[seq_ids, pos]  # (T, H, Dv)


def padded_hstu_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU causal SiLU attention on right-padded sequences: the core of the reference.

    No data-dependent Python control flow, so ``torch.export`` traces it with dynamic
    ``B`` and ``L`` (the inference encoder is exported this way).

    Args:
        max_seq_len (int): ``N``, the attention divisor and the size of the position bias.
        q (torch.Tensor): ``(B, L, H, Dqk)``.
        k (torch.Tensor): ``(B, L, H, Dqk)``.
        v (torch.Tensor): ``(B, L, H, Dv)``.
        lengths (torch.Tensor): ``(B,)`` valid positions per row, ``<= L``.
        timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)``, or None.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)``, or None.

    Returns:
        torch.Tensor: ``(B, L, H, Dv)``; rows past a sequence's length are zero.

    Example::

        out = padded_hstu_attention(200, q, k, v, torch.tensor([2, 3]))  # q: (2, 3, 1, Dqk)
    """
    B, L = q.shape[0], q.shape[1]
    positions = torch.arange(L, device=q.device)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # (B, H, L, L)
    rab = _relative_bias(max_seq_len, positions, positions, timestamps, timestamps, pos_weights, ts_weights)
    if rab is not None:
        scores = scores + rab.unsqueeze(1)  # (B | 1, 1, L, L): shared across heads
    causal = positions.view(L, 1) >= positions.view(1, L)  # (L, L): j <= i
    valid = positions.view(1, L) < lengths.to(q.device).view(B, 1)  # (B, L)
    mask = causal.view(1, L, L) & valid.view(B, L, 1) & valid.view(B, 1, L)  # (B, L, L)
    attn = F.silu(scores) / max_seq_len * mask.unsqueeze(1).to(scores.dtype)
    return torch.einsum("bhij,bjhd->bihd", attn, v)  # (B, L, H, Dv)


# ----------------------------------------------------------------------------------------
# Fast path: length buckets of dense blocks
# ----------------------------------------------------------------------------------------


#: Fixed price of one more bucket (and of one more query chunk in it), in score entries
#: ``(query, key)``: about the Python and op overhead of a chunk's forward and backward
#: on CPU, against ~30 ns per entry of work at H = 2, D = 64 (tuned with
#: bench/hstu_attention_bench.py; the result is flat within +-10% over 8k .. 32k).
_BUCKET_OVERHEAD_PAIRS = 16384.0
#: Buckets longer than ``_QUERY_CHUNK_ABOVE`` are computed in query chunks of
#: ``_QUERY_CHUNK`` rows, so that most of the masked upper triangle is never formed.
_QUERY_CHUNK = 128
_QUERY_CHUNK_ABOVE = 192


class _Bucket(NamedTuple):
    """One length bucket of the fast path's plan.

    ``n`` sequences padded to ``P`` tokens, laid out as ``(n, H, P)`` rows starting at row
    ``begin`` of the concatenated blocks. ``rows`` ``(n * H * P,)`` indexes the flattened
    ``(T * H, D)`` values, a padding slot repeating its sequence's last token;
    ``grad_rows`` is the same but with padding at ``T * H``, a zero row appended to the
    output gradient; ``tokens`` ``(n, P)`` indexes the ``(T,)`` timestamps like ``rows``;
    ``chunk`` is the query chunk length.
    """

    n: int
    P: int
    begin: int
    rows: torch.Tensor
    grad_rows: torch.Tensor
    tokens: torch.Tensor
    chunk: int


class _JaggedHSTUAttention(torch.autograd.Function):
    """The fast path's forward and backward in one autograd node.

    Per bucket: gather q, k, v into dense ``(n, H, P, D)`` blocks, then per
    query chunk ``[r0, r1)`` against keys ``[0, r1)``: bias ``(n, M, K)`` gathered for the
    chunk and broadcast over heads into the score buffer, one ``baddbmm`` adds ``q k^T``,
    ``SiLU``, ``tril(r0)``, a second matmul writes the chunk's output in place. Saves the
    dense blocks, scores, attention and time-bucket ids (only when a gradient is wanted, so
    inference holds one chunk at a time); the backward recomputes nothing,
    uses the fused ``aten.silu_backward`` and accumulates the bias gradients with
    ``index_add_``. Outputs and gradients return to jagged order by gathers (each real
    ``(t, h)`` row appears exactly once in the blocks), never by scatters.

    Padding sits after each sequence's end and repeats its last token, so no copy with a
    zero row is needed: a real query ``i < L_b`` never sees a padding key ``j >= L_b``
    (``tril`` writes exact zeros there), padding queries' outputs are never gathered, and
    in backward their output gradient is zero (``grad_rows``), so they send nothing to the
    real keys and values.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos_weights: Optional[torch.Tensor],
        ts_weights: Optional[torch.Tensor],
        timestamps: Optional[torch.Tensor],
        buckets: List[_Bucket],
        inverse: torch.Tensor,
        max_seq_len: int,
        save_for_backward: bool,
    ) -> torch.Tensor:
        T, H, Dqk = q.shape
        Dv = v.shape[2]
        q_rows, k_rows, v_rows = (x.reshape(T * H, x.shape[2]) for x in (q, k, v))
        ts_f64 = None
        if timestamps is not None and ts_weights is not None:
            # float64 is exact for |ts| < 2**53; gaps are then rounded once, to float32.
            ts_f64 = timestamps.to(torch.float64)
        num_ts = 0 if ts_weights is None else ts_weights.numel() - 1
        total = sum(b.n * H * b.P for b in buckets)
        out_all = q.new_empty((total, Dv))
        saved: List[List[Tuple[torch.Tensor, ...]]] = []
        blocks: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for b in buckets:
            n, P = b.n, b.P
            qb = q_rows.index_select(0, b.rows).view(n, H, P, Dqk)
            kb = k_rows.index_select(0, b.rows).view(n, H, P, Dqk)
            vb = v_rows.index_select(0, b.rows).view(n, H, P, Dv)
            ob = out_all[b.begin : b.begin + n * H * P].view(n, H, P, Dv)
            ts_b = ts_f64[b.tokens] if ts_f64 is not None else None  # (n, P) float64
            per_chunk: List[Tuple[torch.Tensor, ...]] = []
            for r0 in range(0, P, b.chunk):
                r1 = min(P, r0 + b.chunk)
                M = r1 - r0
                rel = _relative_positions(r0, r1, max_seq_len, q.device) if pos_weights is not None else None
                ts_ids = None
                rab: Optional[torch.Tensor] = None  # (n | 1, M, r1)
                if ts_b is not None:
                    gaps = q.new_empty((n, M, r1), dtype=torch.float32)
                    torch.sub(ts_b[:, r0:r1, None], ts_b[:, None, :r1], out=gaps)
                    ts_ids = _time_bucket_(gaps, num_ts)
                    rab = ts_weights[ts_ids]
                if rel is not None:
                    pos_bias = pos_weights[rel]
                    rab = pos_bias.unsqueeze(0) if rab is None else rab.add_(pos_bias)
                q_c = qb[:, :, r0:r1].reshape(n * H, M, Dqk)
                k_c = kb[:, :, :r1].reshape(n * H, r1, Dqk)
                if rab is None:
                    scores = torch.bmm(q_c, k_c.transpose(1, 2)).view(n, H, M, r1)
                else:
                    scores = rab.unsqueeze(1).expand(n, H, M, r1).contiguous()
                    scores.view(n * H, M, r1).baddbmm_(q_c, k_c.transpose(1, 2))
                attn = F.silu(scores).tril_(r0)
                if M == P:  # one chunk: write the block's output directly
                    torch.matmul(attn, vb, out=ob)
                else:
                    ob[:, :, r0:r1] = torch.matmul(attn, vb[:, :, :r1])
                if save_for_backward:
                    per_chunk.append((scores, attn, rel, ts_ids))
            if save_for_backward:
                saved.append(per_chunk)
                blocks.append((qb, kb, vb))
        out_all.mul_(1.0 / max_seq_len)
        ctx.saved_chunks = saved
        ctx.blocks = blocks
        ctx.buckets = buckets
        ctx.inverse = inverse
        ctx.shapes = (T, H, Dqk, Dv, total, max_seq_len)
        ctx.pos_numel = None if pos_weights is None else pos_weights.numel()
        ctx.ts_numel = None if ts_weights is None else ts_weights.numel()
        return out_all.index_select(0, inverse).view(T, H, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        T, H, Dqk, Dv, total, max_seq_len = ctx.shapes
        g_ext = _with_zero_row(grad_out.reshape(T * H, Dv) * (1.0 / max_seq_len))
        grad_q_all = grad_out.new_empty((total, Dqk))
        grad_k_all = grad_out.new_empty((total, Dqk))
        grad_v_all = grad_out.new_empty((total, Dv))
        want_pos = ctx.pos_numel is not None and ctx.needs_input_grad[3]
        want_ts = ctx.ts_numel is not None and ctx.needs_input_grad[4]
        grad_pos = grad_out.new_zeros(ctx.pos_numel) if want_pos else None
        grad_ts = grad_out.new_zeros(ctx.ts_numel) if want_ts else None
        for b, (qb, kb, vb), per_chunk in zip(ctx.buckets, ctx.blocks, ctx.saved_chunks):
            n, P = b.n, b.P
            sl = slice(b.begin, b.begin + n * H * P)
            gb = g_ext.index_select(0, b.grad_rows).view(n, H, P, Dv)
            gq = grad_q_all[sl].view(n, H, P, Dqk)
            gk = grad_k_all[sl].view(n, H, P, Dqk)
            gv = grad_v_all[sl].view(n, H, P, Dv)
            whole = b.chunk == P
            if not whole:
                gk.zero_()
                gv.zero_()
            for (scores, attn, rel, ts_ids), r0 in zip(per_chunk, range(0, P, b.chunk)):
                r1 = min(P, r0 + b.chunk)
                g_c = gb[:, :, r0:r1]
                grad_attn = torch.matmul(g_c, vb[:, :, :r1].transpose(-1, -2))
                grad_s = torch.ops.aten.silu_backward.grad_input(grad_attn, scores, grad_input=grad_attn)
                grad_s.tril_(r0)
                if whole:
                    torch.matmul(attn.transpose(-1, -2), g_c, out=gv)
                    torch.matmul(grad_s, kb, out=gq)
                    torch.matmul(grad_s.transpose(-1, -2), qb, out=gk)
                else:
                    gv[:, :, :r1] += torch.matmul(attn.transpose(-1, -2), g_c)
                    gq[:, :, r0:r1] = torch.matmul(grad_s, kb[:, :, :r1])
                    gk[:, :, :r1] += torch.matmul(grad_s.transpose(-1, -2), qb[:, :, r0:r1])
                if grad_pos is not None or grad_ts is not None:
                    grad_rab = grad_s.sum(1)  # (n, M, r1): the bias is shared by the heads
                    if grad_ts is not None and ts_ids is not None:
                        grad_ts.index_add_(0, ts_ids.view(-1), grad_rab.view(-1))
                    if grad_pos is not None:
                        grad_pos.index_add_(0, rel.reshape(-1), grad_rab.sum(0).view(-1))
        inv = ctx.inverse
        grad_q = grad_q_all.index_select(0, inv).view(T, H, Dqk)
        grad_k = grad_k_all.index_select(0, inv).view(T, H, Dqk)
        grad_v = grad_v_all.index_select(0, inv).view(T, H, Dv)
        return grad_q, grad_k, grad_v, grad_pos, grad_ts, None, None, None, None, None


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """``(R, D)`` -> ``(R + 1, D)`` with a zero last row (the padding row)."""
    return torch.cat([x, x.new_zeros((1, x.shape[1]))])


def _relative_positions(r0: int, r1: int, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """``(i - j) + N - 1`` for query rows ``r0 .. r1 - 1`` and key columns ``0 .. r1 - 1``."""
    rows = torch.arange(r0, r1, device=device).view(-1, 1)
    return rows - torch.arange(r1, device=device).view(1, -1) + (max_seq_len - 1)


def _chunk_len(P: int) -> int:
    """Query chunk length for a bucket padded to ``P``: whole when short, else ``_QUERY_CHUNK``."""
    return P if P <= _QUERY_CHUNK_ABOVE else _QUERY_CHUNK


def _block_work(P: np.ndarray) -> np.ndarray:
    """Score entries formed for one sequence padded to ``P`` (chunked when long), plus a
    per-token term for the gathers and the ``O(P * D)`` matmul edges."""
    P = P.astype(np.float64)
    c = np.where(P <= _QUERY_CHUNK_ABOVE, P, _QUERY_CHUNK)
    m = np.ceil(P / c)
    # chunks r = 1 .. m - 1 are c x (r c); the last is (P - (m - 1) c) x P
    pairs = c * c * (m - 1) * m / 2 + (P - (m - 1) * c) * P
    return pairs + 16.0 * P


def _plan_buckets(lengths: np.ndarray, overhead: float) -> List[Tuple[np.ndarray, int]]:
    """Length buckets of the fast path: :func:`plan_length_buckets` with ``work(P)`` the
    score entries one sequence padded to ``P`` costs (:func:`_block_work`) and one call
    per query chunk."""
    return plan_length_buckets(lengths, _block_work,
                               lambda P: np.ceil(P / np.array([_chunk_len(int(p)) for p in P])), overhead)


def jagged_hstu_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """HSTU causal SiLU attention on jagged sequences without batch-wide padding.

    Same function, arguments and result as :func:`pytorch_hstu_attention`, forward and
    backward. Sequences are grouped into length buckets (a dynamic programme over the
    sorted lengths balances padding waste against per-bucket overhead); each bucket is
    padded only to its own longest member and computed as batched dense blocks, long ones
    in query chunks that skip most of the masked upper triangle. The relative bias is
    gathered per bucket (per chunk) too. Work is ``O(H * sum_b L_b^2)`` plus a little
    in-bucket padding, instead of ``O(B * H * L_max^2)``.

    Args:
        max_seq_len (int): ``N``, the configured maximum length; the attention divisor and
            the size of the position bias. Every sequence must satisfy ``L_b <= N``.
        q (torch.Tensor): ``(T, H, Dqk)`` queries, jagged over the batch.
        k (torch.Tensor): ``(T, H, Dqk)`` keys.
        v (torch.Tensor): ``(T, H, Dv)`` values.
        offsets (torch.Tensor): ``(B + 1,)`` int64, ``offsets[0] == 0``, ``offsets[-1] == T``.
            Empty sequences allowed.
        timestamps (Optional[torch.Tensor]): ``(T,)`` int64 event times; None for no time bias.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)`` position bias; None for none.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)`` time bias; None for none.

    Returns:
        torch.Tensor: ``(T, H, Dv)`` attention output, jagged like ``q``.

    Example::

        # B = 3 sequences, lengths 2, 0 and 3 (T = 5), H = 2 heads, Dqk = 8, Dv = 4:
        #   offsets = [0, 2, 2, 5]
        #   q rows:  [q00 q01 | | q20 q21 q22]
        q, k = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
        v = torch.randn(5, 2, 4)
        out = jagged_hstu_attention(
            200, q, k, v, torch.tensor([0, 2, 2, 5]),
            timestamps=torch.tensor([10, 70, 5, 9, 3600]),
            pos_weights=torch.zeros(399), ts_weights=torch.zeros(129),
        )  # (5, 2, 4)
    """
    lengths = _check_inputs(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
    T, H, Dqk = q.shape
    Dv = v.shape[2]
    buckets = _plan_buckets(lengths.numpy(), _BUCKET_OVERHEAD_PAIRS)
    if not buckets:
        return v.new_zeros((0, H, Dv)) + 0.0 * v.sum()

    device = q.device
    starts = offsets.detach().to("cpu", torch.int64).numpy()[:-1]
    len_np = lengths.numpy()
    heads = np.arange(H, dtype=np.int64)

    # Index plan (numpy, once): bucket (ids, P) is a block (n, H, P) whose rows read row
    # tok * H + h of the flattened (T * H, D) values; padding repeats the last token.
    plan: List[_Bucket] = []
    row_index: List[np.ndarray] = []
    begin = 0
    for ids, P in buckets:
        pos = np.arange(P, dtype=np.int64)
        valid = pos[None, :] < len_np[ids][:, None]  # (n, P)
        tok = starts[ids][:, None] + np.minimum(pos[None, :], len_np[ids][:, None] - 1)
        rows = (tok[:, None, :] * H + heads[None, :, None]).reshape(-1)
        grad_rows = np.where(valid[:, None, :].repeat(H, axis=1).reshape(-1), rows, T * H)
        plan.append(
            _Bucket(
                n=ids.size,
                P=P,
                begin=begin,
                rows=torch.from_numpy(rows).to(device),
                grad_rows=torch.from_numpy(grad_rows).to(device),
                tokens=torch.from_numpy(tok).to(device),
                chunk=_chunk_len(P),
            )
        )
        row_index.append(grad_rows)
        begin += rows.size
    all_rows = np.concatenate(row_index)
    real = all_rows < T * H
    inverse = np.empty(T * H, dtype=np.int64)
    inverse[all_rows[real]] = np.nonzero(real)[0]  # jagged row t * H + h -> its block row
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, pos_weights, ts_weights)
    )
    if torch.is_autocast_enabled(q.device.type):
        # The blocked kernel writes scores into fp32 bias buffers in place: under mixed
        # precision it runs in fp32 (the projections around it run in the autocast dtype).
        with torch.autocast(device_type=q.device.type, enabled=False):
            return _JaggedHSTUAttention.apply(
                q.float(), k.float(), v.float(), pos_weights, ts_weights, timestamps, plan,
                torch.from_numpy(inverse).to(device), max_seq_len, needs_grad,
            )
    return _JaggedHSTUAttention.apply(
        q,
        k,
        v,
        pos_weights,
        ts_weights,
        timestamps,
        plan,
        torch.from_numpy(inverse).to(device),
        max_seq_len,
        needs_grad,
    )


# ----------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------


def hstu_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
    kernel: HSTUAttentionKernel = HSTUAttentionKernel.JAGGED,
) -> torch.Tensor:
    """HSTU causal SiLU attention with relative bias on jagged sequences.

    ``out_i = sum_{j <= i} SiLU(q_i . k_j + rab[i, j]) / max_seq_len * v_j`` per sequence and
    head, with ``rab[i, j] = pos_weights[i - j + N - 1] + ts_weights[time_bucket(ts_i - ts_j)]``.

    Args:
        max_seq_len (int): ``N``, the configured maximum length (not the batch's).
        q (torch.Tensor): ``(T, H, Dqk)``.
        k (torch.Tensor): ``(T, H, Dqk)``.
        v (torch.Tensor): ``(T, H, Dv)``.
        offsets (torch.Tensor): ``(B + 1,)`` int64 sequence offsets into the ``T`` rows.
        timestamps (Optional[torch.Tensor]): ``(T,)`` int64, or None for no time bias.
        pos_weights (Optional[torch.Tensor]): ``(2N - 1,)``, or None.
        ts_weights (Optional[torch.Tensor]): ``(num_buckets + 1,)``, or None.
        kernel (HSTUAttentionKernel): ``JAGGED`` (default, fast on CPU), ``PYTORCH``
            (padded reference) or ``TRITON`` (CUDA kernels; needs triton).

    Returns:
        torch.Tensor: ``(T, H, Dv)``.

    Example::

        # lengths [2, 3]: offsets [0, 2, 5]; H = 1
        out = hstu_attention(200, q, k, v, torch.tensor([0, 2, 5]))  # (5, 1, Dv)
    """
    if kernel == HSTUAttentionKernel.PYTORCH:
        fn = pytorch_hstu_attention
    elif kernel == HSTUAttentionKernel.JAGGED:
        fn = jagged_hstu_attention
    elif kernel == HSTUAttentionKernel.TRITON:
        # Imported here: that module imports this one (and triton, at its first call).
        from torchrec_genrec.ops.hstu_attention_triton import triton_hstu_attention as fn
    else:
        raise ValueError(f"unknown HSTU attention kernel {kernel!r}")
    return fn(max_seq_len, q, k, v, offsets, timestamps, pos_weights, ts_weights)
