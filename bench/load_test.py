"""Soak test of ``genrec serve`` on loopback: many requests, valid and not, with slow clients.

Starts the server on an artifact in a subprocess, then ``--concurrency`` client threads
(keep-alive HTTP/1.1) send ``--requests`` requests in all: /recommend with the run's test
histories, /score with 64 candidates, a share (``--bad-fraction``) of malformed ones of
every kind the server must refuse (bad JSON, unknown ids, empty and over-long histories, k
out of range, a body over the size limit, wrong field types) and a share
(``--unknown-fraction``) to paths that do not exist. Meanwhile ``--slow-clients`` threads
keep opening connections that stay idle, send half a request head, or stop sending a
body, and a probe calls ``/healthz`` every 50 ms. Pass, all of:

- no 5xx and no dropped request, every malformed request gets its 4xx, every unknown
  path 404;
- ``/healthz`` p99 <= 50 ms over the whole run;
- the server's RSS grows by at most 10% between the ``--window``-th request and the last;
- ``/metrics`` holds as many series at the end as after the first window (labels are bounded;
  only the values' digits grow).

Exit status 1 when any check fails.

Usage::

    .venv/bin/python bench/load_test.py --artifact artifacts/hstu_ml100k/int8 --run runs/hstu_ml100k \
        [--requests 50000] [--concurrency 16] [--server-threads 0] [--slow-clients 8]

On 2 cores (shared by the load generator, the probe and the server) 16 clients saturate
the server at about 320-380 req/s; it passes there since the inference thread renders the
JSON answers and the loop releases a batch's requests one iteration apart (before that,
/healthz waited behind whole batches: p99 about 145 ms).
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
from typing import Any, List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _probe(port: int, stop: Any, out: Any) -> None:
    """Calls /healthz every 50 ms until ``stop``; puts the latencies (seconds) on ``out``."""
    latencies: List[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - start)
        except (OSError, http.client.HTTPException):
            latencies.append(float("inf"))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stop.wait(0.05)
    out.put(latencies)


def _metrics_size(port: int) -> Tuple[int, int]:
    """``(bytes, series)`` of a /metrics scrape: the series (sample lines) must not grow."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return len(text.encode()), sum(1 for line in text.splitlines() if line and not line.startswith("#"))


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
             bad_fraction: float, unknown_fraction: float) -> Tuple[str, bytes, str, int]:
    """(path, body, kind, expected status class) of request ``i``."""
    h = histories[i % len(histories)]
    if rng.random() < unknown_fraction:
        return f"/no/such/path/{i}?q={rng.random()}", b"{}", "unknown_path", 404
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
    parser.add_argument("--run", default="runs/hstu_ml100k", help="the run the artifact was exported from "
                        "(its test histories are the requests)")
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--unknown-fraction", type=float, default=0.05)
    parser.add_argument("--slow-clients", type=int, default=8)
    parser.add_argument("--window", type=int, default=10000, help="the RSS and /metrics baseline request")
    parser.add_argument("--server-threads", type=int, default=0, help="the server's --threads (0: every core)")
    args = parser.parse_args()

    manifest = json.load(open(os.path.join(args.artifact, "manifest.json")))
    vocab = json.load(open(os.path.join(args.artifact, "vocab.json")))
    histories = _histories(args.run)
    port = _free_port()
    genrec = os.path.join(os.path.dirname(sys.executable), "genrec")
    server = subprocess.Popen([genrec, "serve", args.artifact, "--port", str(port), "--header-timeout-s", "2",
                               "--request-timeout-s", "2", "--threads", str(args.server_threads)],
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
                                                      args.bad_fraction, args.unknown_fraction)
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
                        metrics_size[done[0]] = _metrics_size(port)

        stop = threading.Event()
        health: List[float] = []
        slow = Counter()


        def slow_client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                kind = ["idle", "half_head", "stalled_body"][rng.randrange(3)]
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                    if kind == "half_head":
                        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\n")
                    elif kind == "stalled_body":
                        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 1000\r\n\r\n{\"history\"")
                    reply = sock.recv(4096)  # the server closes (b"") or answers 408
                    slow[f"{kind}:{'408' if b' 408 ' in reply else 'closed' if not reply else 'other'}"] += 1
                    sock.close()
                except OSError:
                    slow[f"{kind}:error"] += 1

        metrics_size = {}
        _metrics_size(port)  # the first scrape adds /metrics's own series: take it before the baseline
        start = time.perf_counter()
        # The probe is a process of its own: a thread here would time this process's GIL
        # (shared with the client threads), not the server.
        import multiprocessing

        probe_stop, probe_out = multiprocessing.Event(), multiprocessing.Queue()
        probe = multiprocessing.Process(target=_probe, args=(port, probe_stop, probe_out))
        probe.start()
        helpers = [threading.Thread(target=slow_client, args=(1000 + s,)) for s in range(args.slow_clients)]
        for t in helpers:
            t.start()
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        probe_stop.set()
        health.extend(probe_out.get(timeout=60))
        probe.join()
        for t in helpers:
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
    health_p99 = float(np.percentile(health, 99)) if health else float("inf")
    series_growth = metrics_size[args.requests][1] - metrics_size[args.window][1]
    print(f"{len(results)} requests, {args.concurrency} concurrent, {wall:.1f} s ({len(results) / wall:.0f} req/s) "
          f"against {args.artifact} ({manifest['precision']})")
    print("slow clients: " + ", ".join(f"{k}: {n}" for k, n in sorted(slow.items())))
    print(f"/healthz: {len(health)} probes, p50 {np.percentile(health, 50) * 1e3:.1f} ms, p99 {health_p99 * 1e3:.1f} ms, "
          f"max {max(health) * 1e3:.1f} ms")
    print(f"/metrics: {metrics_size[args.window][0]} bytes, {metrics_size[args.window][1]} series after {args.window} "
          f"requests; {metrics_size[args.requests][0]} bytes, {metrics_size[args.requests][1]} series after "
          f"{args.requests}")
    print("responses by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print("malformed requests by kind: " + ", ".join(
        f"{k}: {n}" for k, n in sorted(Counter(k for k, e, _, _ in results if e != 200).items())))
    print(f"well-formed: {len(good)}, latency p50 {np.percentile(good, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(good, 99) * 1e3:.1f} ms")
    print(f"server RSS after {args.window} requests {rss[args.window]:.1f} MiB, after {args.requests} "
          f"{rss[args.requests]:.1f} MiB ({growth:+.1%})")
    slow_other = sum(n for k, n in slow.items() if k.endswith((":other", ":error")))
    ok = (server_errors == 0 and not wrong and growth <= 0.10 and health_p99 <= 0.050 and series_growth == 0
          and slow_other == 0)
    print(f"5xx or dropped: {server_errors}; unexpected statuses: {dict(wrong) or 'none'}; slow clients not closed: "
          f"{slow_other}; /healthz p99 <= 50 ms: {health_p99 <= 0.050}; RSS growth within 10%: {growth <= 0.10}; "
          f"/metrics series bounded: {series_growth == 0} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
