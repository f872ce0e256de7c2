"""HSTU attention benchmark: forward + backward time of the padded reference, a plain
bucketed-padding variant, the fast jagged kernel and (on CUDA) the Triton kernel, on
long-tailed sequence lengths.

Lengths are lognormal with mean ~``--mean-len``, clipped to ``[1, --max-len]``, and one
sequence is set to ``--max-len`` so the batch's padded length is the maximum (the usual
case for a batch of 128 real users). Each figure is milliseconds per forward + backward
call (best of ``--repeats``), printed beside its ratio to the reference; a speed-up above
1.00x means faster than the reference.

Variants:

- ``reference``: :func:`pytorch_hstu_attention`, everything padded to ``L_max``.
- ``bucketed``: a plain bucketed-padding baseline written here: sequences grouped by
  power-of-two length, the reference run once per group on that group's sequences.
- ``jagged``: :func:`jagged_hstu_attention`, the library's fast path (cost-model buckets,
  query chunks for long buckets, custom autograd block).
- ``triton``: :func:`triton_hstu_attention`, the Triton kernels (CUDA only: on CPU Triton
  runs only under its interpreter, far too slow to time, and the variant is skipped with a
  note).

Every variant runs on ``--device`` (CUDA when there is one) in ``--dtype``; on CUDA the
timings synchronise the device.

Usage::

    .venv/bin/python bench/hstu_attention_bench.py [--batch 128] [--heads 2] [--dim 64]
        [--mean-len 100] [--max-len 1024] [--repeats 3] [--no-reference]
        [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402
from torchrec_genrec.ops.hstu_attention import (  # noqa: E402
    jagged_hstu_attention,
    pytorch_hstu_attention,
)
from torchrec_genrec.ops.hstu_attention_triton import triton_hstu_attention  # noqa: E402

Kernel = Callable[..., torch.Tensor]


def long_tailed_lengths(batch: int, mean_len: float, max_len: int, sigma: float, seed: int) -> np.ndarray:
    """Lognormal lengths with the given mean, clipped to [1, max_len]; the longest = max_len."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean_len) - sigma**2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, batch)), 1, max_len).astype(np.int64)
    lengths[int(np.argmax(lengths))] = max_len
    return lengths


def bucketed_padding_attention(
    max_seq_len: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: Optional[torch.Tensor] = None,
    pos_weights: Optional[torch.Tensor] = None,
    ts_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain baseline: group sequences by power-of-two length, run the reference per group."""
    T, H, _ = q.shape
    offsets = offsets.cpu()
    lengths = (offsets[1:] - offsets[:-1]).numpy()
    starts = offsets[:-1].numpy()
    groups: Dict[int, List[int]] = {}
    for b, n in enumerate(lengths):
        if n > 0:
            groups.setdefault(int(np.ceil(np.log2(n))), []).append(b)
    outs, rows_all = [], []
    for ids in groups.values():
        rows = np.concatenate([np.arange(starts[b], starts[b] + lengths[b]) for b in ids])
        rows_t = torch.from_numpy(rows).to(q.device)
        sub_off = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths[ids])])).to(q.device)
        outs.append(
            pytorch_hstu_attention(
                max_seq_len,
                q[rows_t],
                k[rows_t],
                v[rows_t],
                sub_off,
                timestamps[rows_t] if timestamps is not None else None,
                pos_weights,
                ts_weights,
            )
        )
        rows_all.append(rows)
    inverse = np.empty(T, dtype=np.int64)
    inverse[np.concatenate(rows_all)] = np.arange(T)
    return torch.cat(outs)[torch.from_numpy(inverse).to(q.device)]


def time_fwd_bwd(fn: Kernel, args: dict, grad: torch.Tensor, repeats: int) -> float:
    """Best wall time (ms) of forward + backward over ``repeats`` calls after one warm-up."""
    leaves = [args[n] for n in ("q", "k", "v", "pos_weights", "ts_weights")]
    cuda = grad.is_cuda
    best = float("inf")
    for i in range(repeats + 1):
        for x in leaves:
            x.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(**args)
        out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if i > 0:
            best = min(best, elapsed)
        del out
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64, help="Dqk = Dv")
    parser.add_argument("--mean-len", type=float, default=100.0)
    parser.add_argument("--max-len", type=int, default=1024, help="also max_seq_len N")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the (slow, memory-hungry) reference"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="of q, k, v and the bias weights")
    args = parser.parse_args()
    silence_known_noise()
    torch.manual_seed(args.seed)

    lengths = long_tailed_lengths(args.batch, args.mean_len, args.max_len, args.sigma, args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(device)
    T, H, D, N = int(offsets[-1]), args.heads, args.dim, args.max_len

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype).requires_grad_()

    inputs = dict(
        max_seq_len=N,
        q=leaf(torch.randn(T, H, D) * D**-0.5),
        k=leaf(torch.randn(T, H, D)),
        v=leaf(torch.randn(T, H, D)),
        offsets=offsets,
        timestamps=torch.cumsum(torch.randint(1, 10**5, (T,)), 0).to(device),
        pos_weights=leaf(torch.randn(2 * N - 1) * 0.1),
        ts_weights=leaf(torch.randn(129) * 0.1),
    )
    grad = torch.randn(T, H, D).to(device, dtype)
    pairs_real = float((lengths * (lengths + 1) // 2).sum())
    pairs_padded = float(args.batch * N * N)
    print(
        f"B={args.batch} H={H} D={D} N={N} T={T} lengths: mean {lengths.mean():.1f}, "
        f"median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
        f"causal pairs {pairs_real / 1e6:.2f}M vs padded {pairs_padded / 1e6:.1f}M; "
        f"threads {torch.get_num_threads()}; device {device}, {args.dtype}"
    )

    variants = [("jagged", jagged_hstu_attention), ("bucketed", bucketed_padding_attention)]
    if not args.no_reference:
        variants.append(("reference", pytorch_hstu_attention))
    if device.type == "cuda":
        variants.append(("triton", triton_hstu_attention))
    else:
        print("  triton: skipped (CUDA only; on CPU Triton runs only under its interpreter, too slow to time)")
    times: Dict[str, float] = {}
    for name, fn in variants:
        times[name] = time_fwd_bwd(fn, inputs, grad, args.repeats)
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak = f"process peak RSS so far {rss_gib:.1f} GiB"
        if device.type == "cuda":
            peak += f", peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        print(f"  measured {name:<9} {times[name]:9.1f} ms   ({peak})")

    base = times.get("reference")
    print(f"\n{'variant':<10} {'ms/call':>10} {'fast/this':>10} {'speed-up vs reference':>22}")
    for name, _ in variants:
        vs_ref = f"{base / times[name]:.2f}x" if base else "n/a"
        print(f"{name:<10} {times[name]:10.1f} {times['jagged'] / times[name]:10.3f} {vs_ref:>22}")


if __name__ == "__main__":
    main()
