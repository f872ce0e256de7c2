"""scripts/gpu_check.sh, the check a user runs on a CUDA machine, run here on the CPU
(`--device cpu --quick`): every step must pass and the report must carry what the GPU
report is read for. Slow (about 3 minutes on 2 cores): `pytest -m slow`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_the_cpu(ml100k, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(ml100k.path, store)  # the content steps write side-feature sets into it
    report, back = tmp_path / "report.json", tmp_path / "back"
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--store", str(store), "--device", "cpu", "--quick",
                          "--work", str(tmp_path / "work"), "--report", str(report), "--bring-back", str(back)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert result["all_ok"] and set(steps) >= {
        "doctor", "train_hstu", "train_sasrec", "train_mostpop", "rank_dlrm", "rank_onetrans", "rank_hstu",
        "content_sid_rqvae", "content_das", "lum_train", "lum_eval", "export_hstu_fp32", "predictor",
        "export_onetrans_int8", "ranker_predictor", "serve", "torchx_local_cwd"}
    assert {"torch", "torchrec", "python"} <= set(result["versions"])
    assert steps["train_hstu"]["tokens_per_second"] > 0 and 0 < steps["train_hstu"]["test"]["ndcg@10"] < 1
    assert steps["rank_onetrans"]["train_samples_per_s"] > 0 and 0 < steps["rank_onetrans"]["test"]["auc"] < 1
    assert steps["torchx_local_cwd"]["backend"] == "gloo" and steps["torchx_local_cwd"]["world_size"] == 1
    assert steps["predictor"]["output"]["max_abs_score_diff"] < 1e-4
    assert steps["serve"]["answer_items"] == 10
    # What comes back from a GPU machine re-exports here to the same scores.
    compare = subprocess.run([sys.executable, "scripts/gpu_check.py", "compare-scores", "--run", str(back),
                              "--scores", str(back / "scores.npz"), "--store", str(store)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert compare.returncode == 0 and json.loads(compare.stdout.strip().splitlines()[-1])["within_1e-4"]
