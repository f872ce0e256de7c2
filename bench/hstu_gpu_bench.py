"""HSTU on a GPU: the attention op and the whole model, measured in one run.

1. **Matmul peak**: the device's measured bf16 matmul rate (the MFU denominator).
2. **Attention op**, forward + backward, on long-tailed lengths at each ``--max-lens``:
   the jagged Triton kernel (bf16 inputs, fp32 accumulation), the jagged PyTorch path, the
   padded PyTorch reference, and ``scaled_dot_product_attention`` (flash backend, causal,
   bf16) on the same batch padded — a softmax attention, so a speed anchor, not the same
   function. Useful TFLOP/s count the causal pairs of real tokens only: forward 4·D per
   pair and head (q·k and the weighted sum of v), backward twice that.
3. **Whole model** (``--model-steps`` > 0): ``genrec train`` of ``--recipe`` for a fixed
   number of steps with the pipeline and ``torch.compile`` switched on and off; training
   tokens/s, MFU against (1) and peak memory. The recipe's store must exist (``genrec
   prepare synthetic ...``, see the recipe's header).

Prints a table per part with ratios (Triton vs each other variant) and writes everything
to ``--json``. On a CPU it runs what it can (the PyTorch paths at small sizes) and says what
it skipped.

Usage::

    python bench/hstu_gpu_bench.py --json bench/results/hstu_gpu_h200.json
    python bench/hstu_gpu_bench.py --max-lens 256 --batch 8 --model-steps 0     # a CPU's smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hstu_attention_bench import long_tailed_lengths  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402
from torchrec_genrec.ops.hstu_attention import jagged_hstu_attention, pytorch_hstu_attention  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best wall time of ``fn`` in ms over ``repeats`` calls after a warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = best_ms(lambda: a @ b, device, repeats)
    return 2 * n**3 / (ms / 1e3) / 1e12


def attention_case(max_len: int, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    lengths = long_tailed_lengths(args.batch, max_len * args.mean_fraction, max_len, args.sigma, args.seed)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(device)
    t, h, d, n = int(offsets[-1]), args.heads, args.dim, max_len
    pairs = float((lengths * (lengths + 1) // 2).sum())
    useful_flops = 3 * 4 * d * h * pairs  # forward 4·D per pair and head, backward 2x
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(args.seed)

    def leaf(shape, scale, dtype):
        return (torch.randn(shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    def inputs(dtype):
        return dict(max_seq_len=n, q=leaf((t, h, d), d**-0.5, dtype), k=leaf((t, h, d), 1.0, dtype),
                    v=leaf((t, h, d), 1.0, dtype), offsets=offsets,
                    timestamps=torch.cumsum(torch.randint(1, 10**5, (t,), generator=gen), 0).to(device),
                    pos_weights=leaf((2 * n - 1,), 0.1, dtype), ts_weights=leaf((129,), 0.1, dtype))

    def fwd_bwd(fn, kwargs):
        grad = torch.ones(t, h, d, device=device, dtype=kwargs["q"].dtype)

        def step():
            for name in ("q", "k", "v", "pos_weights", "ts_weights"):
                kwargs[name].grad = None
            fn(**kwargs).backward(grad)
        return step

    case: Dict[str, Any] = {"max_len": n, "batch": args.batch, "heads": h, "dim": d, "tokens": t,
                            "mean_len": float(lengths.mean()), "causal_pairs": pairs, "variants": {}}
    variants: List[tuple] = []
    if device.type == "cuda":
        from torchrec_genrec.ops.hstu_attention_triton import triton_hstu_attention

        variants.append(("triton bf16", lambda: fwd_bwd(triton_hstu_attention, inputs(torch.bfloat16))))
    else:
        case["skipped"] = ["triton (CUDA only)"]
    variants.append((f"jagged {'bf16' if low != torch.float32 else 'fp32'}",
                     lambda: fwd_bwd(jagged_hstu_attention, inputs(low))))
    padded_bytes = args.batch * h * n * n * 4 * 3  # scores, their gradient, the mask
    if padded_bytes < args.reference_limit_gib * 2**30:
        variants.append(("padded reference fp32", lambda: fwd_bwd(pytorch_hstu_attention, inputs(torch.float32))))
    else:
        case.setdefault("skipped", []).append(f"padded reference (~{padded_bytes / 2**30:.0f} GiB)")
    if device.type == "cuda":
        def sdpa():
            q, k, v = (torch.randn(args.batch, h, n, d, device=device, dtype=torch.bfloat16, generator=None)
                       .requires_grad_() for _ in range(3))
            grad = torch.ones_like(q)

            def step():
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
            return step
        variants.append(("SDPA flash bf16 (padded)", sdpa))
    for name, make in variants:
        try:
            step = make()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = best_ms(step, device, args.repeats)
            entry = {"ms": round(ms, 3), "useful_tflops": round(useful_flops / (ms / 1e3) / 1e12, 3)}
            if device.type == "cuda":
                entry["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except Exception as e:  # noqa: BLE001 (an out-of-memory variant is a result, not a crash)
            entry = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        case["variants"][name] = entry
        del make
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return case


def model_flops_per_token(cfg: Dict[str, Any], mean_len: float) -> float:
    """Training FLOPs per token of the HSTU encoder (forward + backward = 3x forward):
    the four projections and the output layer per block, plus attention over on average
    ``mean_len / 2`` earlier tokens."""
    m = cfg["model"]
    d, h, dqk, dv, blocks = m["embedding_dim"], m["num_heads"], m["attention_dim"], m["linear_dim"], m["num_blocks"]
    dense = 2 * d * h * (2 * dv + 2 * dqk) + 2 * h * dv * d
    attention = 2 * h * (dqk + dv) * mean_len / 2
    return 3.0 * blocks * (dense + attention)


def model_runs(args: argparse.Namespace, peak_tflops: Optional[float]) -> List[Dict[str, Any]]:
    import tomllib

    with open(args.recipe, "rb") as f:
        cfg = tomllib.load(f)
    runs = []
    for pipeline, compile_ in (("sparse_dist", False), ("none", False), ("sparse_dist", True)):
        out = os.path.join(args.work, f"model_{pipeline}_{'compile' if compile_ else 'eager'}")
        report = out + ".report.json"
        sets = [f"train.output_dir={out}", f"train.max_steps={args.model_steps}", "train.epochs=1",
                f"train.pipeline={pipeline}", f"train.compile={'true' if compile_ else 'false'}",
                "train.resume=never", "train.progress=false", "train.checkpoint=false", *args.set]
        command = [sys.executable, "-m", "torchrec_genrec.cli", "--report", report, "train", "--config", args.recipe]
        for s in sets:
            command += ["--set", s]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.model_timeout)
        entry: Dict[str, Any] = {"pipeline": pipeline, "compile": compile_, "exit": proc.returncode,
                                 "seconds": round(time.perf_counter() - start, 1)}
        metrics = os.path.join(out, "metrics.json")
        if proc.returncode == 0 and os.path.exists(metrics):
            record = json.load(open(metrics))
            training = record["training"]
            tokens = training["tokens_per_second"]
            users = record["dataset"]["num_users"]
            mean_len = min(record["dataset"]["num_events"] / max(users, 1), cfg["data"]["max_seq_len"])
            entry.update(tokens_per_s=tokens, peak_gpu_memory_gib=(training.get("peak_gpu_memory_bytes") or 0) / 2**30)
            if peak_tflops:
                entry["mfu"] = round(tokens * model_flops_per_token(cfg, mean_len) / (peak_tflops * 1e12), 4)
        else:
            entry["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-10:]
        runs.append(entry)
        print(f"  model pipeline={pipeline} compile={compile_}: {entry.get('tokens_per_s', 'failed')} tokens/s", flush=True)
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-lens", default="1024,4096,8192")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128, help="Dqk = Dv per head")
    parser.add_argument("--mean-fraction", type=float, default=0.25, help="mean length as a share of max")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal shape of the lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-limit-gib", type=float, default=60.0,
                        help="skip the padded reference when its score tensors would exceed this")
    parser.add_argument("--recipe", default=os.path.join(ROOT, "apps", "configs", "hstu_synthetic_gpu.toml"))
    parser.add_argument("--model-steps", type=int, default=60, help="0 skips the whole-model part")
    parser.add_argument("--model-timeout", type=float, default=240)
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for the model runs")
    parser.add_argument("--work", default="/tmp/hstu_gpu_bench")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    silence_known_noise()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.work, exist_ok=True)
    result: Dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}
    peak = None
    if device.type == "cuda":
        peak = matmul_tflops(device, torch.bfloat16, 8192, args.repeats)
        result["bf16_matmul_tflops"] = round(peak, 1)
        print(f"bf16 matmul 8192^3: {peak:.1f} TFLOP/s")
    else:
        result["fp32_matmul_tflops"] = round(matmul_tflops(device, torch.float32, 1024, args.repeats), 3)
    result["attention"] = []
    for max_len in [int(x) for x in args.max_lens.split(",")]:
        case = attention_case(max_len, args, device)
        result["attention"].append(case)
        print(f"\nattention fwd+bwd, B={case['batch']} H={case['heads']} D={case['dim']} max {max_len}, "
              f"mean length {case['mean_len']:.0f}, {case['tokens']} tokens"
              + (f" (skipped: {', '.join(case['skipped'])})" if case.get("skipped") else ""))
        first = next((v for v in case["variants"].values() if "ms" in v), None)
        print(f"  {'variant':<26} {'ms':>9} {'useful TFLOP/s':>15} {'ms vs the first':>16}")
        for name, v in case["variants"].items():
            if "ms" in v:
                print(f"  {name:<26} {v['ms']:>9.2f} {v['useful_tflops']:>15.2f} {v['ms'] / first['ms']:>15.2f}x")
            else:
                print(f"  {name:<26} {v['error']}")
    if args.model_steps > 0 and device.type == "cuda":
        result["model"] = model_runs(args, peak)
    elif args.model_steps > 0:
        result["model_skipped"] = "the GPU recipe's whole-model runs need CUDA"
        print("\nwhole model: skipped (needs CUDA)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
