"""The HTTP server: answers, micro-batches, and turns every bad request into a clear 4xx."""

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from torchrec_genrec.inference.predictor import History, Predictor
from torchrec_genrec.serving.app import ServeConfig, create_app

from conftest import http_server


@pytest.fixture(scope="module")
def server(tiny_artifacts):
    predictor = Predictor.load(tiny_artifacts["int8"])
    app = create_app(predictor, ServeConfig(max_batch=16, max_wait_ms=20, max_body_bytes=20000, max_candidates=50))
    with http_server(app) as url:
        yield url, predictor


def _call(url, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _history(predictor, n=3):
    action = next(iter(predictor._actions))
    return {"items": predictor.item_ids[:n].tolist(), "actions": [action] * n, "timestamps": list(range(100, 100 + n))}


def test_recommend_and_score_agree_with_the_predictor(server):
    url, predictor = server
    h = _history(predictor)
    status, body = _call(url, "/recommend", {"history": h, "k": 5, "exclude": [predictor.item_ids[10].item()]})
    assert status == 200
    rec = json.loads(body)
    [expected] = predictor.recommend([History(**h)], k=5, exclude=[[predictor.item_ids[10].item()]])
    assert rec["items"] == expected.items
    assert rec["scores"] == pytest.approx(expected.scores, abs=1e-6)
    status, body = _call(url, "/score", {"history": h, "candidates": rec["items"]})
    assert status == 200 and json.loads(body)["scores"] == pytest.approx(rec["scores"], abs=1e-6)
    status, body = _call(url, "/healthz")
    assert status == 200 and json.loads(body)["precision"] == "int8"


def test_concurrent_requests_are_batched_and_answered_each_their_own(server):
    url, predictor = server
    histories = [_history(predictor, n) for n in range(1, 17)]

    def ask(h):
        return _call(url, "/recommend", {"history": h, "k": 3})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, histories))
    expected = predictor.recommend([History(**h) for h in histories], k=3)
    for (status, body), exp in zip(answers, expected):
        assert status == 200 and json.loads(body)["items"] == exp.items
    _, metrics = _call(url, "/metrics")
    text = metrics.decode()
    # Some encoder pass served more than one request.
    count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("genrec_batch_size_count")))
    requests = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('genrec_requests_total{endpoint="/recommend",status="200"}'))
    assert count < requests


@pytest.mark.parametrize("body,raw,status,message", [
    (None, b"{not json", 400, "malformed JSON"),
    ({"history": {"items": [10**9], "actions": [1], "timestamps": [1]}}, None, 422, "unknown item id"),
    ({"history": {"items": [], "actions": [], "timestamps": []}}, None, 422, "empty history"),
    ({"history": "HISTORY", "k": 0}, None, 422, "k must be"),
    ({"history": "HISTORY", "k": "ten"}, None, 422, "k: Input should be a valid integer"),
    ({"history": "HISTORY", "extra": 1}, None, 422, "extra: Extra inputs are not permitted"),
    ({"history": "LONG"}, None, 422, "at most"),
    ({"history": "HISTORY", "pad": "x" * 30000}, None, 413, "over 20000 bytes"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, raw, status, message):
    url, predictor = server
    if body is not None:
        body = dict(body)
        if body["history"] == "HISTORY":
            body["history"] = _history(predictor)
        elif body["history"] == "LONG":
            body["history"] = _history(predictor, predictor.max_history + 1)
    got, payload = _call(url, "/recommend", body, raw)
    assert got == status
    assert message in json.loads(payload)["error"]
    assert _call(url, "/recommend", {"history": _history(predictor), "k": 2})[0] == 200


def test_score_limits(server):
    url, predictor = server
    h = _history(predictor)
    assert _call(url, "/score", {"history": h, "candidates": []})[0] == 422
    status, body = _call(url, "/score", {"history": h, "candidates": predictor.item_ids[:51].tolist()})
    assert status == 422 and "at most 50" in json.loads(body)["error"]
    status, body = _call(url, "/score", {"history": h, "candidates": [10**9]})
    assert status == 422 and "unknown candidate id" in json.loads(body)["error"]


def test_genrec_serve_command_starts_and_answers(tiny_artifacts):
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "torchrec_genrec.cli", "serve", tiny_artifacts["fp32"],
                               "--port", str(port), "--max-batch", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                status, body = _call(f"http://127.0.0.1:{port}", "/healthz")
                break
            except urllib.error.URLError:
                assert time.time() < deadline, "genrec serve did not come up"
                time.sleep(0.2)
        assert status == 200 and json.loads(body)["precision"] == "fp32"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _series(metrics_text):
    """The sample names with their labels in a Prometheus text page (values dropped)."""
    return sorted(line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#"))


def test_metrics_stay_bounded_whatever_paths_clients_send(server):
    """Every unknown path counts under one label: /metrics keeps its size after 1,000 of them."""
    url, predictor = server
    assert _call(url, "/recommend", {"history": _history(predictor), "k": 3})[0] == 200
    for i in range(50):
        _call(url, f"/warm-up-{i}")
    _call(url, "/metrics")  # the first scrape adds /metrics's own series
    before = _call(url, "/metrics")[1].decode()
    for i in range(1000):
        assert _call(url, f"/no/such/path/{i}?q={i}")[0] == 404
    text = _call(url, "/metrics")[1].decode()
    assert _series(text) == _series(before)  # the same label sets; only counter values grew
    assert len(text.encode()) <= len(before.encode()) + 64
    assert "/no/such/path" not in text and 'endpoint="unmatched",status="404"' in text
    assert 'endpoint="/recommend",status="200"' in text


def _guarded_server(tiny_artifacts, **limits):
    from torchrec_genrec.serving.app import guarded_h11_protocol

    predictor = Predictor.load(tiny_artifacts["int8"])
    config = ServeConfig(**limits)
    return http_server(create_app(predictor, config), http=guarded_h11_protocol(config.header_timeout_s),
                       timeout_keep_alive=config.keep_alive_s), predictor


def _closed_within(sock, seconds):
    """Whether the server closes ``sock`` within ``seconds`` (recv returns b'' or resets)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_idle_half_sent_and_slow_connections_are_not_held(tiny_artifacts):
    server, predictor = _guarded_server(tiny_artifacts, header_timeout_s=0.5, request_timeout_s=0.5, keep_alive_s=1)
    with server as url:
        port = int(url.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        start = time.time()
        assert _closed_within(idle, 5) and _closed_within(half, 5)
        assert time.time() - start < 4
        # A body that stops arriving gets 408, and the server answers the next request.
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"history\"")
        slow.settimeout(5)
        assert b" 408 " in slow.recv(4096).split(b"\r\n", 1)[0] + b" "
        body = {"history": _history(predictor), "k": 2}
        assert _call(url, "/recommend", body)[0] == 200


@pytest.mark.parametrize("flag,value,message", [
    ("--max-body-bytes", "-1", "--max-body-bytes must be in [1024, 2**30]"),
    ("--max-batch", "0", "--max-batch must be >= 1"),
    ("--header-timeout-s", "0", "--header-timeout-s must be > 0"),
    ("--max-wait-ms", "-5", "--max-wait-ms must be in [0, 10000]"),
    ("--threads", "-1", "--threads must be >= 0"),
])
def test_serve_refuses_bad_limits_at_start_up(tiny_artifacts, capsys, flag, value, message):
    from torchrec_genrec import cli

    assert cli.main(["serve", tiny_artifacts["int8"], "--port", "1", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_serve_device_option_is_checked(tiny_artifacts, capsys):
    """`--device` serves a retrieval artifact on the CPU or an available GPU; anything else
    is refused at start-up (CUDA where there is none included)."""
    import torch

    from torchrec_genrec import cli

    assert cli.main(["serve", tiny_artifacts["int8"], "--port", "1", "--device", "tpu"]) == 2
    assert "is not a device: use cpu or cuda" in capsys.readouterr().err
    assert cli.main(["serve", tiny_artifacts["int8"], "--port", "1", "--device", "meta"]) == 2
    assert "serving runs on cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["serve", tiny_artifacts["int8"], "--port", "1", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    cpu = Predictor.load(tiny_artifacts["int8"], device="cpu")
    history = _history(cpu)
    default = Predictor.load(tiny_artifacts["int8"])
    assert cpu.recommend([history], k=5)[0] == default.recommend([history], k=5)[0]
