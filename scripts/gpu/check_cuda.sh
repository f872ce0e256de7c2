#!/usr/bin/env bash
# The CUDA checks of every recipe, as one script for a lent GPU machine (no package index
# there): train, evaluate, export and serve on the GPU, each step under its own timeout, the
# results as JSON in $OUT. Run from the repository root after the CUDA stack is installed:
#
#   bash rest/install_cuda_bundle.sh /tmp/cuda_parts rest /tmp/site     # see ../shared/gpu/
#   PYTHONPATH=/tmp/site:$PWD bash scripts/gpu/check_cuda.sh STORE_DIR
#
# STORE_DIR is a prepared MovieLens-100K store (`genrec prepare movielens-100k` here, copied
# in: a few MiB). Writes $OUT/log (everything printed) and $OUT/results.json (per step: exit
# status, seconds, the run's test metrics and throughput).
set -uo pipefail
store=${1:?usage: check_cuda.sh STORE_DIR}
out=${OUT:-/tmp/gpu_out}
work=/tmp/gpu_runs
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
g() { python3 -m torchrec_genrec.cli "$@"; }
steps=()
step() {  # step NAME TIMEOUT_S command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name" | tee -a "$out/log"
  timeout "$limit" "$@" >> "$out/log" 2>&1
  local code=$?
  steps+=("$name:$code:$((SECONDS - start))")
  echo "=== $name exit $code after $((SECONDS - start)) s" | tee -a "$out/log"
}
nvidia-smi -L >> "$out/log" 2>&1
common=(--set train.progress=false --set train.resume=never --set "data.dataset=$store")
step retrieval_hstu 240 g train --config apps/configs/hstu_ml100k.toml "${common[@]}" \
  --set train.output_dir=$work/hstu --set train.epochs=10 --set train.eval_every=5
step retrieval_hstu_bf16 180 g train --config apps/configs/hstu_ml100k.toml "${common[@]}" \
  --set train.output_dir=$work/hstu_bf16 --set train.epochs=4 --set train.eval_every=4 --set train.precision=bf16
step retrieval_sasrec 180 g train --config apps/configs/sasrec_ml100k.toml "${common[@]}" \
  --set train.output_dir=$work/sasrec --set train.epochs=4 --set train.eval_every=4
for m in dlrm onetrans hstu; do
  step rank_$m 180 g rank --config apps/configs/ranking_ml100k.toml "${common[@]}" --set model.name=$m \
    --set train.output_dir=$work/rank_$m --set train.epochs=1
done
step lum 180 g lum train --config apps/configs/lum_ml100k.toml --set "data.dataset=$store" --set train.epochs=2 \
  --out $work/lum
step lum_eval 120 g lum eval --run $work/lum
step export 120 g export $work/hstu --out $work/artifact --overwrite
step predictor_cuda 120 python3 - "$work/artifact" <<'PY'
import json, sys, time
from torchrec_genrec.inference.predictor import Predictor
cpu, gpu = Predictor.load(sys.argv[1]), Predictor.load(sys.argv[1], device="cuda")
h = {"items": cpu.item_ids[:20].tolist(), "actions": [next(iter(cpu._actions))] * 20, "timestamps": list(range(20))}
a, b = cpu.recommend([h], k=10)[0], gpu.recommend([h], k=10)[0]
start = time.perf_counter()
for _ in range(50):
    gpu.recommend([h] * 64, k=10)
print(json.dumps({"same_top10": a.items == b.items, "gpu_batch64_ms": (time.perf_counter() - start) / 50 * 1e3}))
PY
python3 - "$work" "$out/results.json" "${steps[@]}" <<'PY'
import json, os, sys
work, target, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
results = {}
for item in steps:
    name, code, seconds = item.rsplit(":", 2)
    entry = {"exit": int(code), "seconds": int(seconds)}
    run = {"retrieval_hstu": "hstu", "retrieval_hstu_bf16": "hstu_bf16", "retrieval_sasrec": "sasrec"}.get(
        name, name if name.startswith("rank_") else None)
    path = os.path.join(work, run or "-", "metrics.json")
    if os.path.exists(path):
        m = json.load(open(path))
        entry["test"] = m["metrics"].get("test")
        entry["training"] = {k: v for k, v in m.get("training", {}).items() if k != "history"}
    results[name] = entry
json.dump(results, open(target, "w"), indent=1)
print(json.dumps({k: (v["exit"], v["seconds"]) for k, v in results.items()}))
PY
