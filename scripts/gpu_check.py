"""Every recipe, short, on a CUDA machine: one JSON report of what works there.

``scripts/gpu_check.sh`` runs this. Each step is a separate process under its own timeout
(a hung or crashed step is recorded and the next one runs):

- ``genrec doctor`` (an untested but loading stack is reported and the check goes on);
- retrieval: HSTU and SASRec 2 epochs each, MostPop;
- ranking: DCNv2+DIN, OneTrans and the HSTU ranker, 1 epoch each;
- content: ``genrec content sid`` (RQ-VAE) and ``genrec content das``;
- LUM: ``genrec lum train`` 1 epoch and ``genrec lum eval``;
- export of the HSTU run (fp32) and the OneTrans run (int8), each loaded by its predictor on
  the CPU and on the device, scores compared; every test user's scores on the device are
  saved (``scores.npz``) so the same run exported elsewhere can be checked against them;
- ``genrec serve --device`` answering one ``/recommend``;
- ``torchx run -s local_cwd`` of the training component (nccl on a GPU).

Per step the report holds: ok / exit status / the error's last lines, seconds, the run's test
metrics, tokens (or samples) per second and peak GPU memory (``genrec --report``). With
``--bring-back DIR`` the HSTU run (its ``best`` checkpoint, config, metrics, test ranks) and
``scores.npz`` are copied to DIR (files of a few MiB each) for a CPU machine to re-export.

Usage (repository root)::

    bash scripts/gpu_check.sh --store STORE --report bench/results/gpu_check_h200.json
    bash scripts/gpu_check.sh --store STORE --device cpu --quick   # the script itself, on a CPU
    python scripts/gpu_check.py compare-scores --run RUN --scores scores.npz   # back on a CPU

The store is a prepared MovieLens-100K store (``genrec prepare movielens-100k``) with a
``minilm`` content set (``genrec content embed``); without one the content steps use TF-IDF.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENREC = [sys.executable, "-m", "torchrec_genrec.cli"]


class Checker:
    """Runs the steps and collects the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = os.path.abspath(args.work)
        self.steps: List[Dict[str, Any]] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                        PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p),
                        # torchx's local scheduler starts `torchrun`: this Python's own.
                        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)

    def run(self, name: str, argv: List[str], timeout: float, run_dir: Optional[str] = None,
            genrec: bool = True) -> Dict[str, Any]:
        """Runs one step; a failure is recorded, never raised."""
        report = os.path.join(self.work, "logs", f"{name}.report.json")
        log = os.path.join(self.work, "logs", f"{name}.log")
        command = [*GENREC, "--report", report, *argv] if genrec else argv
        entry: Dict[str, Any] = {"step": name, "command": " ".join(command[2:] if genrec else command)}
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            try:
                proc = subprocess.run(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                entry["exit"] = proc.returncode
            except subprocess.TimeoutExpired:
                entry["exit"] = "timeout"
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["ok"] = entry["exit"] == 0
        text = open(log, errors="replace").read()
        if not entry["ok"]:
            entry["error"] = text.strip().splitlines()[-15:]
        entry.update(peak_memory(report))
        if run_dir is not None:
            entry.update(run_summary(run_dir))
        blob = last_json(text)
        if blob is not None:
            entry["output"] = blob
        self.steps.append(entry)
        self.write_report()
        print(f"=== {name}: {'ok' if entry['ok'] else 'FAILED (' + str(entry['exit']) + ')'} "
              f"in {entry['seconds']} s", flush=True)
        return entry

    def write_report(self, final: bool = False) -> Dict[str, Any]:
        """The report so far, rewritten after every step (atomically): a check stopped by an
        outer time limit still leaves the steps it finished."""
        if not hasattr(self, "_versions"):
            self._versions = versions()
        report = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": self.args.device,
                  "quick": self.args.quick, "finished": final, "versions": self._versions,
                  "all_ok": final and all(s["ok"] for s in self.steps), "steps": self.steps}
        path = os.path.abspath(self.args.report)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        return report

    def retrieval(self, name: str, config: str, epochs: int, timeout: float, *extra: str) -> str:
        out = os.path.join(self.work, name)
        sets = [f"data.dataset={self.args.store}", f"train.output_dir={out}", f"train.epochs={epochs}",
                f"train.eval_every={epochs}", "train.resume=never", "train.progress=false", *extra]
        if self.args.quick:
            sets += ["train.max_steps=15"]
        self.run(name, ["train", "--config", config, *[a for s in sets for a in ("--set", s)]], timeout, out)
        return out


def peak_memory(report: str) -> Dict[str, Any]:
    """The peak GPU memory figures of a ``genrec --report`` file (none on a CPU, or when the
    command never finished)."""
    if not os.path.exists(report):
        return {}
    with open(report) as f:
        return {k: v for k, v in json.load(f).items() if k.startswith("peak_")}


def run_summary(run_dir: str) -> Dict[str, Any]:
    """Test metrics, throughput and backend from a run's ``metrics.json``."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        history = os.path.join(run_dir, "history.json")  # a LUM run
        rows = json.load(open(history))["history"] if os.path.exists(history) else []
        return {"last_epoch": rows[-1]} if rows else {}
    record = json.load(open(path))
    training = record.get("training", {})
    summary = {"test": record.get("metrics", {}).get("test")}
    for key in ("tokens_per_second", "train_samples_per_s", "train_seconds", "steps", "world_size", "backend",
                "device"):
        if key in training:
            summary[key] = training[key]
    return summary


def last_json(text: str) -> Optional[Any]:
    """The last JSON object a command printed (the content and check steps print one)."""
    end = text.rstrip().rfind("}")
    if end < 0:
        return None
    depth = 0
    for i in range(end, -1, -1):
        depth += {"}": 1, "{": -1}.get(text[i], 0)
        if depth == 0:
            try:
                return json.loads(text[i:end + 1])
            except ValueError:
                return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_step(checker: Checker, artifact: str, run: str, device: str, timeout: float) -> None:
    """``genrec serve --device`` answers one ``/recommend``; stopped with SIGINT (a clean exit
    that writes the command's report)."""
    port = free_port()
    report = os.path.join(checker.work, "logs", "serve.report.json")
    log = open(os.path.join(checker.work, "logs", "serve.log"), "w")
    entry: Dict[str, Any] = {"step": "serve", "command": f"genrec serve ARTIFACT --device {device} --port {port}"}
    print("=== serve", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([*GENREC, "--report", report, "serve", artifact, "--device", device, "--port", str(port)],
                            cwd=ROOT, env=checker.env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while time.perf_counter() - start < timeout and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        (history,) = test_histories(run, checker.args.store)[:1]
        body = json.dumps({"history": dataclasses.asdict(history), "k": 10}).encode()
        request = urllib.request.Request(f"{base}/recommend", data=body, headers={"Content-Type": "application/json"})
        sent = time.perf_counter()
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        entry["latency_ms"] = round((time.perf_counter() - sent) * 1e3, 2)
        entry["answer_items"] = len(answer.get("items", []))
        entry["ok"] = entry["answer_items"] == 10
    except Exception as e:  # noqa: BLE001 (the report says what went wrong)
        entry["ok"], entry["error"] = False, [f"{type(e).__name__}: {e}"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    entry["seconds"] = round(time.perf_counter() - start, 1)
    entry.update(peak_memory(report))
    if not entry["ok"]:
        entry.setdefault("error", []).extend(open(log.name, errors="replace").read().strip().splitlines()[-10:])
    checker.steps.append(entry)
    checker.write_report()
    print(f"=== serve: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s", flush=True)


def versions() -> Dict[str, Any]:
    import importlib.metadata as md
    import platform

    out: Dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec", "torchx", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import torch

    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return out


def check(args: argparse.Namespace) -> int:
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; pass --device cpu to check the script itself on a CPU")
    c = Checker(args)
    py = sys.executable
    epochs = 1 if args.quick else 2
    c.run("doctor", ["doctor"], 120)
    hstu = c.retrieval("train_hstu", "apps/configs/hstu_ml100k.toml", epochs, 300)
    c.retrieval("train_sasrec", "apps/configs/sasrec_ml100k.toml", epochs, 240)
    c.retrieval("train_mostpop", "apps/configs/mostpop_ml100k.toml", 1, 120)
    ranker = None
    for model in ("dlrm", "onetrans", "hstu"):
        out = os.path.join(c.work, f"rank_{model}")
        sets = [f"data.dataset={args.store}", f"model.name={model}", f"train.output_dir={out}", "train.epochs=1",
                "train.resume=never", "train.progress=false"] + (["train.max_steps=15"] if args.quick else [])
        c.run(f"rank_{model}", ["rank", "--config", "apps/configs/ranking_ml100k.toml",
                                *[a for s in sets for a in ("--set", s)]], 240, out)
        ranker = out if model == "onetrans" else ranker
    content = "minilm" if os.path.exists(os.path.join(args.store, "content", "minilm.safetensors")) else "gpucheck_tfidf"
    if content != "minilm":
        c.run("content_embed_tfidf", ["content", "embed", "--dataset", args.store, "--encoder", "tfidf",
                                      "--name", content], 120)
    c.run("content_sid_rqvae", ["content", "sid", "--dataset", args.store, "--content", content, "--method", "rqvae",
                                "--name", "gpucheck_sid"], 240)
    c.run("content_das", ["content", "das", "--dataset", args.store, "--content", content, "--epochs",
                          "1" if args.quick else "2", "--name", "gpucheck_das"], 240)
    lum = os.path.join(c.work, "lum")
    c.run("lum_train", ["lum", "train", "--config", "apps/configs/lum_ml100k.toml", "--set",
                        f"data.dataset={args.store}", "--set", "train.epochs=1", "--out", lum], 240, lum)
    c.run("lum_eval", ["lum", "eval", "--run", lum], 180)
    artifact = os.path.join(c.work, "artifact_hstu_fp32")
    c.run("export_hstu_fp32", ["export", hstu, "--out", artifact, "--precision", "fp32", "--overwrite"], 180)
    c.run("predictor", [py, os.path.abspath(__file__), "predictor-check", "--artifact", artifact, "--run", hstu, "--store",
                        args.store, "--device", args.device, "--scores", os.path.join(c.work, "scores.npz")],
          240, genrec=False)
    if args.bring_back:  # now, so that a later step running out of time cannot lose it
        bring_back(hstu, os.path.join(c.work, "scores.npz"), args.bring_back)
    ranker_artifact = os.path.join(c.work, "artifact_onetrans_int8")
    if ranker is not None:
        c.run("export_onetrans_int8", ["export", ranker, "--out", ranker_artifact, "--precision", "int8",
                                       "--overwrite"], 180)
        c.run("ranker_predictor", [py, os.path.abspath(__file__), "ranker-check", "--artifact", ranker_artifact,
                                   "--run", ranker, "--device", args.device], 180, genrec=False)
    serve_step(c, artifact, hstu, args.device, 120)
    torchx_out = os.path.join(c.work, "torchx_hstu")
    overrides = [f"data.dataset={args.store}", f"train.output_dir={torchx_out}", "train.epochs=1",
                 "train.eval_every=1", "train.resume=never", "train.progress=false"]
    overrides += ["train.max_steps=15"] if args.quick else []
    c.run("torchx_local_cwd", [py, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
                               "torchx_components/genrec.py:train", "--gpu", "0" if args.device == "cpu" else "1",
                               "--config", "apps/configs/hstu_ml100k.toml", *overrides], 300, torchx_out,
          genrec=False)

    report = c.write_report(final=True)
    print(json.dumps({s["step"]: ("ok" if s["ok"] else f"FAILED {s.get('exit', '')}") for s in c.steps}, indent=1))
    print(f"report: {args.report} (all ok: {report['all_ok']})")
    return 0 if report["all_ok"] else 1


def bring_back(run: str, scores: str, target: str) -> None:
    """The files a CPU machine needs to re-export the run and compare its scores."""
    os.makedirs(target, exist_ok=True)
    for name in ("metrics.json", "test_ranks.npz"):
        if os.path.exists(os.path.join(run, name)):
            shutil.copy2(os.path.join(run, name), target)
    best = os.path.join(run, "checkpoints", "best")
    if os.path.isdir(best):
        shutil.copytree(best, os.path.join(target, "checkpoints", "best"), dirs_exist_ok=True)
    if os.path.exists(scores):
        shutil.copy2(scores, target)


def test_histories(run: str, store: str = "", max_seq_len: int = 0):
    """Every test user's history (raw ids) under ``run``'s protocol, in user order."""
    from torchrec_genrec.data.batching import SequenceDataset
    from torchrec_genrec.data.splits import LeaveOneOut, Split
    from torchrec_genrec.inference.predictor import History

    record = json.load(open(os.path.join(run, "metrics.json")))
    data = record["config"]["data"]
    ds = SequenceDataset(store or record["dataset"]["path"], Split.TEST, max_seq_len or data["max_seq_len"],
                         LeaveOneOut(data["holdout"]), with_seen_items=True)
    histories = []
    for start in range(0, len(ds), 256):
        histories += [History(**h) for h in ds.raw_histories(ds[list(range(start, min(start + 256, len(ds))))])]
    return histories


def all_scores(predictor, histories) -> "Any":
    """``(U, I)`` cosine scores of every history against every item."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(histories), 256):
            prepared = [predictor.prepare(h) for h in histories[start:start + 256]]
            users = predictor.user_vectors(prepared)
            ids = torch.arange(predictor.num_items, device=users.device)
            out.append(predictor._index.cosine(users, ids).float().cpu().numpy())
    return np.concatenate(out)


def predictor_check(args: argparse.Namespace) -> int:
    """The artifact's predictor on the CPU and on ``--device``: the same scores and top 10."""
    import numpy as np

    from torchrec_genrec.inference.predictor import Predictor

    cpu = Predictor.load(args.artifact)
    histories = test_histories(args.run, args.store)
    on_cpu = all_scores(cpu, histories)
    device = Predictor.load(args.artifact, device=args.device)
    on_device = all_scores(device, histories)
    batch = histories[:64]
    device.recommend(batch, k=10)
    start = time.perf_counter()
    for _ in range(20):
        device.recommend(batch, k=10)
    same = [a.items == b.items for a, b in zip(cpu.recommend(histories[:200], k=10),
                                                device.recommend(histories[:200], k=10))]
    if args.scores:
        np.savez_compressed(args.scores, scores=on_device, users=np.arange(len(histories)))
    result = {"users": len(histories), "max_abs_score_diff": float(np.abs(on_cpu - on_device).max()),
              "same_top10_share": float(np.mean(same)),
              "recommend_batch64_ms": round((time.perf_counter() - start) / 20 * 1e3, 2)}
    print(json.dumps(result))
    return 0 if result["max_abs_score_diff"] < 1e-4 else 1


def ranker_check(args: argparse.Namespace) -> int:
    """The ranker artifact on the CPU and on ``--device`` scores test requests alike."""
    import numpy as np

    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.export import load_trained_ranker
    from torchrec_genrec.inference.predictor import History
    from torchrec_genrec.inference.ranker import RankerPredictor

    from torchrec_genrec.data.ranking_batching import RankingDataset

    _, _, data = load_trained_ranker(args.run)
    dataset = RankingDataset(data, Split.TEST)
    store = data.store
    raw_items, raw_users = store.item_raw_ids(), store.user_raw_ids()
    values = np.asarray(store.action_values)
    cpu = RankerPredictor.load(args.artifact)
    device = RankerPredictor.load(args.artifact, device=args.device)
    diffs, seconds = [], 0.0
    for r in range(0, len(dataset), max(len(dataset) // 50, 1)):
        e = int(dataset.events[r])
        past = np.arange(data.history_start[e], data.history_end[e])
        history = History(items=raw_items[data.item[past]].tolist(),
                          actions=values[np.asarray(store.action)[past]].tolist(),
                          timestamps=data.timestamp[past].tolist())
        candidates = raw_items[:100].tolist()
        request = (raw_users[data.user[e]], history, candidates, int(data.timestamp[e]))
        start = time.perf_counter()
        got = device.score(*request)
        seconds += time.perf_counter() - start
        diffs.append(float(np.abs(got - cpu.score(*request)).max()))
    result = {"requests": len(diffs), "candidates": 100, "max_abs_prob_diff": max(diffs),
              "score_ms": round(seconds / len(diffs) * 1e3, 2)}
    print(json.dumps(result))
    return 0 if result["max_abs_prob_diff"] < 1e-4 else 1


def compare_scores(args: argparse.Namespace) -> int:
    """Back on a CPU: export the brought-back run at fp32 here and compare its scores with the
    device's ``scores.npz``."""
    import tempfile

    import numpy as np

    from torchrec_genrec.export import export_run
    from torchrec_genrec.inference.predictor import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        export_run(args.run, os.path.join(tmp, "a"), precision="fp32")
        predictor = Predictor.load(os.path.join(tmp, "a"))
        ours = all_scores(predictor, test_histories(args.run, args.store))
    theirs = np.load(args.scores)["scores"]
    diff = float(np.abs(ours - theirs).max())
    print(json.dumps({"users": int(ours.shape[0]), "items": int(ours.shape[1]), "max_abs_score_diff": diff,
                      "within_1e-4": diff < 1e-4}))
    return 0 if diff < 1e-4 else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action")
    run = sub.add_parser("check", help="every step (the default)")
    for p in (parser, run):
        p.add_argument("--store", help="a prepared MovieLens-100K store")
        p.add_argument("--report", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
        p.add_argument("--work", default="/tmp/genrec_gpu_check", help="runs, artifacts and logs")
        p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to check this script on a CPU)")
        p.add_argument("--quick", action="store_true", help="15 steps per training run (a CPU's check)")
        p.add_argument("--bring-back", default="", help="copy the HSTU run and scores.npz here")
    pc = sub.add_parser("predictor-check")
    pc.add_argument("--artifact", required=True)
    pc.add_argument("--run", required=True, help="the exported run (its split protocol)")
    pc.add_argument("--store", required=True)
    pc.add_argument("--device", default="cuda")
    pc.add_argument("--scores", default="")
    rc = sub.add_parser("ranker-check")
    rc.add_argument("--artifact", required=True)
    rc.add_argument("--run", required=True)
    rc.add_argument("--device", default="cuda")
    cs = sub.add_parser("compare-scores")
    cs.add_argument("--run", required=True)
    cs.add_argument("--scores", required=True)
    cs.add_argument("--store", default="")
    args = parser.parse_args(argv)
    from torchrec_genrec.logging_utils import silence_known_noise

    silence_known_noise()
    if args.action in (None, "check"):
        if not args.store:
            parser.error("--store STORE is needed (a prepared MovieLens-100K store)")
        args.store = os.path.abspath(args.store)
        return check(args)
    return {"predictor-check": predictor_check, "ranker-check": ranker_check,
            "compare-scores": compare_scores}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
