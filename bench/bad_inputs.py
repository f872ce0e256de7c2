"""Every kind of bad input the project knows of, and the message each gets.

Builds a small workspace (a synthetic store, a one-epoch run, its artifact, event files
in CSV and MovieLens-1M formats), then feeds each bad input to the real entry points —
``genrec`` commands in process, the HTTP server on loopback — and prints a markdown table
of input -> what came back. A row passes when the input is refused with exit status 2 (a
4xx for requests), a message that names the file, key or field, and no traceback; the
script exits 1 if any row fails.

Usage::

    .venv/bin/python bench/bad_inputs.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "apps", "configs", "hstu_ml100k.toml")
RANKING = os.path.join(ROOT, "apps", "configs", "ranking_ml100k.toml")
LUM = os.path.join(ROOT, "apps", "configs", "lum_ml100k.toml")


def genrec(*argv: str) -> Tuple[int, str]:
    """Runs ``genrec argv`` in process: its exit status and what it printed on stderr."""
    from torchrec_genrec import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse and a few commands exit this way
            code = e.code if isinstance(e.code, int) else 2
            if not isinstance(e.code, int) and e.code:
                print(e.code, file=err)
    return code, err.getvalue().strip()


def write(path: str, text: str, binary: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if binary else "w") as f:
        f.write(text)
    return path


def main() -> int:
    from torchrec_genrec.data.store import write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate
    from torchrec_genrec.logging_utils import silence_known_noise

    silence_known_noise()
    tmp = tempfile.mkdtemp(prefix="bad-inputs-")
    store = os.path.join(tmp, "store")
    write_store(generate(SyntheticConfig(num_users=60, num_items=40, num_events=900, min_seq_len=5, seed=2)), store)
    tiny = ["--set", f"data.dataset={store}", "--set", "data.max_seq_len=12", "--set", "train.batch_size=16",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "model.embedding_dim=16",
            "--set", "model.attention_dim=8", "--set", "model.linear_dim=8", "--set", "model.num_negatives=8"]
    run = os.path.join(tmp, "run")
    assert genrec("train", "--config", RECIPE, *tiny, "--set", f"train.output_dir={run}", "--set",
                  "train.epochs=1")[0] == 0
    artifact = os.path.join(tmp, "artifact")
    assert genrec("export", run, "--out", artifact)[0] == 0
    good_csv = write(os.path.join(tmp, "events.csv"), "user,item,timestamp\n" + "".join(
        f"{u},{(u + t) % 7},{100 * u + t}\n" for u in range(6) for t in range(4)))
    ml1m = os.path.join(tmp, "ml-1m")
    os.makedirs(ml1m)
    write(os.path.join(ml1m, "movies.dat"), "1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n")
    write(os.path.join(ml1m, "users.dat"), "1::F::1::10::48067\n2::M::56::16::70072\n")

    def ml1m_with(ratings: str) -> str:
        write(os.path.join(ml1m, "ratings.dat"), ratings)
        return ml1m

    def csv_case(text: str, *flags: str, binary: bool = False) -> Callable[[], Tuple[int, str]]:
        def run_case() -> Tuple[int, str]:
            path = write(os.path.join(tmp, "case.csv"), text, binary)
            return genrec("prepare", "csv", "--path", path, "--out", os.path.join(tmp, "case_store"), *flags)
        return run_case

    def tampered(edit: Callable[[str], None]) -> Callable[[], Tuple[int, str]]:
        def run_case() -> Tuple[int, str]:
            copy = os.path.join(tmp, "tampered")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(artifact, copy)
            edit(copy)
            return genrec("serve", copy, "--port", "1")
        return run_case

    def manifest_edit(fn: Callable[[dict], None]) -> Callable[[str], None]:
        def edit(copy: str) -> None:
            path = os.path.join(copy, "manifest.json")
            manifest = json.load(open(path))
            fn(manifest)
            json.dump(manifest, open(path, "w"))
        return edit

    def legacy_encoder(copy: str) -> None:
        import hashlib
        import zipfile

        path = os.path.join(copy, "encoder.pt2")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("version", "8.20")
            z.writestr("serialized_state_dict.json", b"\x80\x04pickled")
        manifest = json.load(open(os.path.join(copy, "manifest.json")))
        data = open(path, "rb").read()
        manifest["files"]["encoder.pt2"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        json.dump(manifest, open(os.path.join(copy, "manifest.json"), "w"))

    def symlinked_vocab(copy: str) -> None:
        outside = write(os.path.join(tmp, "outside.json"), "{}")
        os.remove(os.path.join(copy, "vocab.json"))
        os.symlink(outside, os.path.join(copy, "vocab.json"))

    def corrupt_best() -> Tuple[int, str]:
        copy = os.path.join(tmp, "run_copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        path = os.path.join(copy, "checkpoints", "best", ".metadata")
        with open(path, "r+b") as f:
            f.truncate(10)
        return genrec("export", copy, "--out", os.path.join(tmp, "from_corrupt"))

    def run_with(*settings: str, config: str = RECIPE, command: str = "train") -> Callable[[], Tuple[int, str]]:
        out = os.path.join(tmp, "runs", str(abs(hash(settings))))
        extra = [x for s in settings for x in ("--set", s)]
        base = tiny if config == RECIPE else ["--set", f"data.dataset={store}"]
        return lambda: genrec(command, "--config", config, *base, "--set", f"train.output_dir={out}", *extra)

    cases: List[Tuple[str, str, Callable[[], Tuple[int, str]]]] = [
        ("reader", "id of 200,000 digits", csv_case("user,item,timestamp\n1,2,3\n" + "9" * 200000 + ",2,4\n")),
        ("reader", "timestamp of 20 digits", csv_case("user,item,timestamp\n1,2,12345678901234567890\n")),
        ("reader", "NaN rating (MovieLens-1M)",
         lambda: genrec("prepare", "movielens-1m", "--path", ml1m_with("1::1::nan::978302109\n"), "--out",
                        os.path.join(tmp, "ml_store"))),
        ("reader", "negative item not in movies.dat",
         lambda: genrec("prepare", "movielens-1m", "--path", ml1m_with("1::-5::3::978302109\n"), "--out",
                        os.path.join(tmp, "ml_store"))),
        ("reader", "empty file", csv_case("")),
        ("reader", "header only", csv_case("user,item,timestamp\n")),
        ("reader", "a line with too few fields", csv_case("user,item,timestamp\n1,2,3\n1,2\n")),
        ("reader", "bytes that are not UTF-8", csv_case(b"user,item,timestamp\n1,caf\xe9,3\n", binary=True)),
        ("reader", "a directory instead of a file",
         lambda: genrec("prepare", "csv", "--path", tmp, "--out", os.path.join(tmp, "case_store"))),
        ("reader", "a column name repeated", csv_case("user,item,user,timestamp\n1,2,3,4\n")),
        ("reader", "a typo in a column flag", csv_case("user,item,time\n1,2,3\n")),
        ("reader", "an empty --delimiter", csv_case("user,item,timestamp\n1,2,3\n", "--delimiter", "")),
        ("store", "prepare into a directory of other files", lambda: genrec(
            "prepare", "csv", "--path", good_csv, "--out", os.path.dirname(good_csv))),
        ("config", "train.batch_size=0", run_with("train.batch_size=0")),
        ("config", "train.epochs=-1", run_with("train.epochs=-1")),
        ("config", "data.max_seq_len=0", run_with("data.max_seq_len=0")),
        ("config", "model.dropout=2", run_with("model.dropout=2")),
        ("config", "a typo in a key (train.epoch=3)", run_with("train.epoch=3")),
        ("config", "a wrong type (train.epochs=ten)", run_with("train.epochs=ten")),
        ("config", "an unknown choice (train.resume=maybe)", run_with("train.resume=maybe")),
        ("config", "eval.ks without 10", run_with("eval.ks=[5]")),
        ("config", "a config file that does not exist",
         lambda: genrec("train", "--config", os.path.join(tmp, "none.toml"))),
        ("config", "a config file that is not TOML",
         lambda: genrec("train", "--config", write(os.path.join(tmp, "bad.toml"), "[train\nepochs = 3\n"))),
        ("config", "ranker model.onetrans.merge=zip", run_with("model.onetrans.merge=zip", config=RANKING,
                                                               command="rank")),
        ("config", "ranker model.dlrm.cross_layers=-1", run_with("model.dlrm.cross_layers=-1", config=RANKING,
                                                                 command="rank")),
        ("config", "a sharding pin of an unknown type", run_with('plan.pins=["tokens:diagonal"]')),
        ("config", "a different model in a run's directory", lambda: genrec(
            "train", "--config", RECIPE, *tiny, "--set", f"train.output_dir={run}", "--set", "train.epochs=1",
            "--set", "model.num_blocks=3")),
        ("checkpoint", "train.resume=must without a checkpoint", run_with("train.resume=must")),
        ("checkpoint", "export of a run whose best checkpoint is truncated", corrupt_best),
        ("artifact", "encoder.pt2 in the legacy (pickled) layout", tampered(legacy_encoder)),
        ("artifact", "encoder.pt2 left out of the manifest",
         tampered(manifest_edit(lambda m: m["files"].pop("encoder.pt2")))),
        ("artifact", "vocab.json a symlink out of the artifact", tampered(symlinked_vocab)),
        ("artifact", 'precision "int4"', tampered(manifest_edit(lambda m: m.update(precision="int4")))),
        ("artifact", "manifest without its table", tampered(manifest_edit(lambda m: m.pop("table")))),
        ("artifact", "exported with another torch",
         tampered(manifest_edit(lambda m: m["versions"].update(torch="1.13.0")))),
        ("artifact", "a directory that is not an artifact", lambda: genrec("serve", tmp, "--port", "1")),
        ("export", "export over the run itself", lambda: genrec("export", run, "--out", run, "--overwrite")),
        ("export", "export of a directory that is not a run", lambda: genrec("export", store, "--out",
                                                                           os.path.join(tmp, "x"))),
        ("export", "export of a run another tool wrote", lambda: genrec(
            "export", os.path.dirname(write(os.path.join(tmp, "foreign", "metrics.json"), '{"auc": 0.7}')),
            "--out", os.path.join(tmp, "y"))),
        ("serve", "--max-body-bytes -1", lambda: genrec("serve", artifact, "--port", "1", "--max-body-bytes", "-1")),
    ]
    rows = []
    for kind, what, run_case in cases:
        code, message = run_case()
        last = message.splitlines()[-1] if message else ""
        ok = code == 2 and bool(last) and "Traceback" not in message
        rows.append((kind, what, str(code), last, ok))

    rows += request_cases(artifact)
    print("| kind | bad input | exit / status | message | clear |")
    print("|---|---|---|---|---|")
    for kind, what, code, message, ok in rows:
        text = message.replace("|", "\\|").replace(tmp, "<tmp>")
        text = text if len(text) <= 220 else text[:217] + "..."
        print(f"| {kind} | {what} | {code} | {text} | {'yes' if ok else 'NO'} |")
    failed = [r for r in rows if not r[4]]
    print(f"\n{len(rows)} bad inputs, {len(rows) - len(failed)} refused with a clear message, {len(failed)} not")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def request_cases(artifact: str) -> List[Tuple[str, str, str, str, bool]]:
    """Bad requests against the server (uvicorn on loopback, in a thread)."""
    import uvicorn

    from torchrec_genrec.inference.predictor import Predictor
    from torchrec_genrec.serving.app import ServeConfig, create_app

    predictor = Predictor.load(artifact)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, ServeConfig(max_body_bytes=4096, max_candidates=5)),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    action = next(iter(predictor._actions))
    items = predictor.item_ids[:3].tolist()
    history = {"items": items, "actions": [action] * 3, "timestamps": [1, 2, 3]}
    long_n = predictor.max_history + 1
    cases = [
        ("malformed JSON", "/recommend", b'{"history": {"items": [1,'),
        ("an unknown item id", "/recommend", {"history": {**history, "items": [-7] + items[1:]}, "k": 5}),
        ("an empty history", "/recommend", {"history": {"items": [], "actions": [], "timestamps": []}}),
        ("k = 0", "/recommend", {"history": history, "k": 0}),
        ("k larger than the catalogue", "/recommend", {"history": history, "k": 10**6}),
        ("a history longer than the model's", "/recommend", {"history": {
            "items": [items[0]] * long_n, "actions": [action] * long_n, "timestamps": list(range(long_n))}}),
        ("a string where k is a number", "/recommend", {"history": history, "k": "ten"}),
        ("fields of different lengths", "/recommend", {"history": {**history, "timestamps": [1]}}),
        ("an unknown field", "/recommend", {"history": history, "kk": 3}),
        ("a body over the limit", "/recommend", b'{"history": {"items": [' + b"1, " * 5000 + b"1]}}"),
        ("too many candidates", "/score", {"history": history, "candidates": predictor.item_ids[:6].tolist()}),
        ("an unknown candidate", "/score", {"history": history, "candidates": [10**9]}),
        ("an unknown path", "/no/such/path", {}),
    ]
    rows = []
    try:
        for what, path, body in cases:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    status, text = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode()
            try:
                message = json.loads(text).get("error") or json.loads(text).get("detail") or text
            except ValueError:
                message = text
            rows.append(("request", what, str(status), str(message), 400 <= status < 500 and bool(message)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return rows


if __name__ == "__main__":
    sys.exit(main())
