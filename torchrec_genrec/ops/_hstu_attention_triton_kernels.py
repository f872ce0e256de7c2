"""Triton kernels of the jagged HSTU attention: forward, ``dk``/``dv`` (+ bias gradients), ``dq``.

Imported only by :mod:`torchrec_genrec.ops.hstu_attention_triton` (which imports triton
lazily and loads this module in the mode triton was started in, compiled or interpreted);
the design is described there.

Shapes, per sequence ``b`` (rows ``offsets[b]:offsets[b + 1]``, length ``L``) and head ``h``:
``q, k (T, H, Dqk)``, ``v, out, grad_out (T, H, Dv)``; every row pointer is
``base + t * stride_t + h * stride_h`` with a unit stride along ``D``.
"""

import triton
import triton.language as tl


@triton.jit
def _time_bucket(gap, TS_EDGES, num_ts_buckets):
    """Bucket of int64 time gaps, bit-identical to ``hstu_attention.time_bucket``.

    ``floor(ln(max(|d|, 1)) / 0.301)`` in float32 lands within one bucket of the reference
    whatever the ``log`` implementation (ulp differences only matter at bucket edges);
    ``TS_EDGES[k]`` (the least integer ``|d|`` whose reference bucket is ``>= k``, with
    ``TS_EDGES[0] = 0`` and ``TS_EDGES[num_ts_buckets + 1] = int64 max``) then moves it to
    the exact one.
    """
    mag = tl.abs(gap)
    approx = tl.log(tl.maximum(mag.to(tl.float32), 1.0)) / 0.301
    bucket = tl.minimum(approx.to(tl.int32), num_ts_buckets)
    lower = tl.load(TS_EDGES + bucket)
    upper = tl.load(TS_EDGES + bucket + 1)
    return bucket - (mag < lower).to(tl.int32) + (mag >= upper).to(tl.int32)


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``UPCAST``: Triton's interpreter multiplies bf16
    tiles as raw integers, so it gets them in fp32 (exact: bf16 products fit fp32)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, OUT, OFFSETS, TS, POS_W, TS_W, TS_EDGES,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, dqk, dv, max_seq_len, num_ts_buckets, inv_n,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: query rows ``[m0, m0 + BLOCK_M)`` of one (sequence, head), all its keys."""
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    # Block ids run backwards so the heaviest query blocks (the most keys) start first.
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    start = tl.load(OFFSETS + b)
    seq_len = (tl.load(OFFSETS + b + 1) - start).to(tl.int32)
    if m0 >= seq_len:  # the grid covers the batch's longest sequence
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len
    rows = start + offs_m  # int64: T * stride may pass 2**31
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
    ts_m = tl.load(TS + rows, mask=row_ok, other=0) if HAS_TS else 0

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # Causal: keys past the block's last query are never visited.
    for n0 in range(0, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        cols = start + offs_n
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_dqk[None, :],
                    mask=col_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < dv), other=0.0)
        # j <= i < L also keeps every bias index in range.
        valid = (offs_m[:, None] >= offs_n[None, :]) & row_ok[:, None]
        s = _mm(q, tl.trans(k), DOT_PRECISION, UPCAST)
        if HAS_POS:
            rel = offs_m[:, None] - offs_n[None, :] + (max_seq_len - 1)
            s += tl.load(POS_W + rel, mask=valid, other=0.0).to(tl.float32)
        if HAS_TS:
            ts_n = tl.load(TS + cols, mask=col_ok, other=0)
            bucket = _time_bucket(ts_m[:, None] - ts_n[None, :], TS_EDGES, num_ts_buckets)
            s += tl.load(TS_W + bucket, mask=valid, other=0.0).to(tl.float32)
        p = tl.where(valid, s * tl.sigmoid(s), 0.0)
        acc += _mm(p.to(v.dtype), v, DOT_PRECISION, UPCAST)

    tl.store(OUT + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
             (acc * inv_n).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < dv))


@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, OFFSETS, TS, POS_W, TS_W, TS_EDGES, DPOS, DTS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, dqk, dv, max_seq_len, num_ts_buckets, inv_n, num_stripes,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr, POS_GRAD: tl.constexpr, TS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DIAG: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: key rows ``[n0, n0 + BLOCK_N)`` of one (sequence, head), every query at
    or after them; writes ``dk``, ``dv`` and adds this program's share of the bias gradients.

    Tiles are kept transposed (keys x queries) so ``dk`` and ``dv`` are plain ``A @ B`` products.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    n0 = tl.program_id(1) * BLOCK_N
    start = tl.load(OFFSETS + b)
    seq_len = (tl.load(OFFSETS + b + 1) - start).to(tl.int32)
    if n0 >= seq_len:
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_len
    cols = start + offs_n
    k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_dqk[None, :],
                mask=col_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < dv), other=0.0)
    ts_n = tl.load(TS + cols, mask=col_ok, other=0) if HAS_TS else 0
    # Bias gradients go to one of num_stripes partial rows, summed on the host afterwards.
    stripe = (pid_bh * tl.num_programs(1) + tl.program_id(1)) % num_stripes

    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # Causal: query blocks before the one holding key n0 never see these keys.
    for m0 in range((n0 // BLOCK_M) * BLOCK_M, seq_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        rows = start + offs_m
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                    mask=row_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < dv), other=0.0)
        valid = (offs_m[None, :] >= offs_n[:, None]) & row_ok[None, :]  # (keys, queries)
        s = _mm(k, tl.trans(q), DOT_PRECISION, UPCAST)
        if HAS_POS:
            rel = offs_m[None, :] - offs_n[:, None] + (max_seq_len - 1)
            s += tl.load(POS_W + rel, mask=valid, other=0.0).to(tl.float32)
        if HAS_TS:
            ts_m = tl.load(TS + rows, mask=row_ok, other=0)
            bucket = _time_bucket(ts_m[None, :] - ts_n[:, None], TS_EDGES, num_ts_buckets)
            s += tl.load(TS_W + bucket, mask=valid, other=0.0).to(tl.float32)
        sig = tl.sigmoid(s)
        p = tl.where(valid, s * sig, 0.0)
        dv_acc += _mm(p.to(do.dtype), do, DOT_PRECISION, UPCAST)
        dp = _mm(v, tl.trans(do), DOT_PRECISION, UPCAST)
        # d SiLU(s) / ds = sig * (1 + s * (1 - sig)); the 1/N is applied once, at the end.
        ds = tl.where(valid, dp * sig * (1.0 + s * (1.0 - sig)), 0.0)
        dk += _mm(ds.to(q.dtype), q, DOT_PRECISION, UPCAST)
        if POS_GRAD:
            # All pairs of a diagonal i - j share one weight: skew the tile so each diagonal
            # is a column (row r, column t holds ds[r, r + t - (BLOCK_N - 1)]), sum the
            # columns, and add BLOCK_M + BLOCK_N - 1 values instead of one per pair.
            t = tl.arange(0, BLOCK_DIAG)
            c = tl.arange(0, BLOCK_N)[:, None] + t[None, :] - (BLOCK_N - 1)
            inside = (c >= 0) & (c < BLOCK_M)
            skewed = tl.gather(ds, tl.minimum(tl.maximum(c, 0), BLOCK_M - 1), axis=1)
            diag = tl.sum(tl.where(inside, skewed, 0.0), axis=0) * inv_n
            delta = m0 - n0 + t - (BLOCK_N - 1)  # i - j of column t
            tl.atomic_add(DPOS + stripe * (2 * max_seq_len - 1) + delta + (max_seq_len - 1), diag,
                          mask=(t < BLOCK_M + BLOCK_N - 1) & (delta >= 0) & (delta < seq_len))
        if TS_GRAD:
            # Buckets follow the data, not the tile: one atomic per pair (see the module notes).
            tl.atomic_add(DTS + stripe * (num_ts_buckets + 1) + bucket, ds * inv_n, mask=valid)

    tl.store(DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_dqk[None, :],
             (dk * inv_n).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dqk[None, :] < dqk))
    tl.store(DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_dv[None, :],
             (dv_acc * inv_n).to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < dv))


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ, OFFSETS, TS, POS_W, TS_W, TS_EDGES,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_heads, dqk, dv, max_seq_len, num_ts_buckets, inv_n,
    HAS_POS: tl.constexpr, HAS_TS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: ``dq`` of query rows ``[m0, m0 + BLOCK_M)`` of one (sequence, head).

    Recomputes the scores rather than adding ``dq`` from the key-block programs with
    atomics: the result is deterministic and needs no fp32 scratch copy of ``dq``.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    start = tl.load(OFFSETS + b)
    seq_len = (tl.load(OFFSETS + b + 1) - start).to(tl.int32)
    if m0 >= seq_len:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len
    rows = start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < dv), other=0.0)
    ts_m = tl.load(TS + rows, mask=row_ok, other=0) if HAS_TS else 0

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    for n0 in range(0, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        cols = start + offs_n
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_dqk[None, :],
                    mask=col_ok[:, None] & (offs_dqk[None, :] < dqk), other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < dv), other=0.0)
        valid = (offs_m[:, None] >= offs_n[None, :]) & row_ok[:, None]
        s = _mm(q, tl.trans(k), DOT_PRECISION, UPCAST)
        if HAS_POS:
            rel = offs_m[:, None] - offs_n[None, :] + (max_seq_len - 1)
            s += tl.load(POS_W + rel, mask=valid, other=0.0).to(tl.float32)
        if HAS_TS:
            ts_n = tl.load(TS + cols, mask=col_ok, other=0)
            bucket = _time_bucket(ts_m[:, None] - ts_n[None, :], TS_EDGES, num_ts_buckets)
            s += tl.load(TS_W + bucket, mask=valid, other=0.0).to(tl.float32)
        sig = tl.sigmoid(s)
        dp = _mm(do, tl.trans(v), DOT_PRECISION, UPCAST)
        ds = tl.where(valid, dp * sig * (1.0 + s * (1.0 - sig)), 0.0)
        dq += _mm(ds.to(k.dtype), k, DOT_PRECISION, UPCAST)

    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_dqk[None, :],
             (dq * inv_n).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dqk[None, :] < dqk))
