"""Load test of ``genrec serve`` on loopback: a bounded stream of requests, some malformed.

Starts the server on an artifact in a subprocess, then ``--concurrency`` client threads
(keep-alive HTTP/1.1) send ``--requests`` requests in all: /recommend with real ML-100K
test histories, /score with 64 candidates, and a share (``--bad-fraction``) of malformed
ones of every kind the server must refuse (bad JSON, unknown ids, empty and over-long
histories, k out of range, a body over the size limit, wrong field types). Reports:

- responses by status; 5xx must be zero, and each malformed request must get its 4xx;
- latency p50 / p99 of the well-formed requests, and requests/s;
- the server's RSS after the first 5k requests and after the last (the 20k-th): growth
  over 10% fails.

Exit status 1 when any check fails.

Usage::

    .venv/bin/python bench/load_test.py --artifact artifacts/hstu_ml100k/int8 [--requests 20000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _histories(run_dir: str) -> List[dict]:
    """Test histories of the run the artifact came from, as a client would send them."""
    from torchrec_genrec.data.batching import SequenceDataset
    from torchrec_genrec.data.splits import LeaveOneOut, Split
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig as RecipeConfig
    from torchrec_genrec.config import from_dict

    record = json.load(open(os.path.join(run_dir, "metrics.json")))
    cfg = from_dict(RecipeConfig, record["config"], "metrics.json")
    ds = SequenceDataset(record["dataset"]["path"], Split.TEST, cfg.data.max_seq_len, LeaveOneOut(cfg.data.holdout))
    return ds.raw_histories(ds[list(range(len(ds)))])


def _request(i: int, rng: random.Random, histories: List[dict], item_ids: List, max_history: int,
             bad_fraction: float) -> Tuple[str, bytes, str, int]:
    """(path, body, kind, expected status class) of request ``i``."""
    h = histories[i % len(histories)]
    if rng.random() < bad_fraction:
        kind = ["bad_json", "unknown_item", "empty", "k_zero", "oversize", "too_long", "wrong_type"][i % 7]
        body = {"history": h, "k": 10}
        if kind == "bad_json":
            return "/recommend", b'{"history": {"items": [1, 2', kind, 400
        if kind == "unknown_item":
            body["history"] = {**h, "items": [-12345] + h["items"][1:]}
        elif kind == "empty":
            body["history"] = {"items": [], "actions": [], "timestamps": []}
        elif kind == "k_zero":
            body["k"] = 0
        elif kind == "oversize":
            return "/recommend", b'{"history": {"items": [' + b"1, " * 600000 + b"1]}}", kind, 413
        elif kind == "too_long":
            n = max_history + 1
            body["history"] = {"items": [item_ids[j % len(item_ids)] for j in range(n)],
                               "actions": [h["actions"][0]] * n, "timestamps": list(range(n))}
        elif kind == "wrong_type":
            body["k"] = "ten"
        return "/recommend", json.dumps(body).encode(), kind, 413 if kind == "oversize" else 422
    if rng.random() < 0.2:
        cands = rng.sample(item_ids, 64)
        return "/score", json.dumps({"history": h, "candidates": cands}).encode(), "score", 200
    return "/recommend", json.dumps({"history": h, "k": 10}).encode(), "recommend", 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="artifacts/hstu_ml100k/int8")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--window", type=int, default=5000, help="requests per RSS window")
    args = parser.parse_args()

    manifest = json.load(open(os.path.join(args.artifact, "manifest.json")))
    vocab = json.load(open(os.path.join(args.artifact, "vocab.json")))
    histories = _histories(manifest["run"]["dir"])
    port = _free_port()
    genrec = os.path.join(os.path.dirname(sys.executable), "genrec")
    server = subprocess.Popen([genrec, "serve", args.artifact, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print(server.stdout.read() if server.poll() is not None else "server did not come up")
                return 1
            time.sleep(0.2)

        lock = threading.Lock()
        next_index = [0]
        done = [0]
        results: List[Tuple[str, int, int, float]] = []  # kind, expected, status, seconds
        rss = {}

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while True:
                with lock:
                    i = next_index[0]
                    if i >= args.requests:
                        return
                    next_index[0] += 1
                path, body, kind, expected = _request(i, rng, histories, vocab["item_ids"], manifest["max_history"],
                                                      args.bad_fraction)
                start = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                    if response.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                except (OSError, http.client.HTTPException):
                    status = -1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                elapsed = time.perf_counter() - start
                with lock:
                    results.append((kind, expected, status, elapsed))
                    done[0] += 1
                    if done[0] in (args.window, args.requests):
                        rss[done[0]] = _rss_mb(server.pid)

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)

    statuses = Counter(status for _, _, status, _ in results)
    server_errors = sum(n for s, n in statuses.items() if s >= 500 or s < 0)
    wrong = Counter(kind for kind, expected, status, _ in results if status != expected)
    good = np.array([t for kind, _, status, t in results if kind in ("recommend", "score") and status == 200])
    growth = rss[args.requests] / rss[args.window] - 1
    print(f"{len(results)} requests, {args.concurrency} concurrent, {wall:.1f} s ({len(results) / wall:.0f} req/s) "
          f"against {args.artifact} ({manifest['precision']})")
    print("responses by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print("malformed requests by kind: " + ", ".join(
        f"{k}: {n}" for k, n in sorted(Counter(k for k, e, _, _ in results if e != 200).items())))
    print(f"well-formed: {len(good)}, latency p50 {np.percentile(good, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(good, 99) * 1e3:.1f} ms")
    print(f"server RSS after {args.window} requests {rss[args.window]:.1f} MiB, after {args.requests} "
          f"{rss[args.requests]:.1f} MiB ({growth:+.1%})")
    ok = server_errors == 0 and not wrong and growth <= 0.10
    print(f"5xx or dropped: {server_errors}; unexpected statuses: {dict(wrong) or 'none'}; "
          f"RSS growth within 10%: {growth <= 0.10} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
