#!/usr/bin/env bash
# The ranking comparison of issue #6 on ML-100K: DCNv2+DIN vs OneTrans vs the HSTU ranker,
# seeds 0-2 (or SEEDS="..."), then the paired-bootstrap table (bench/ranking_report.py).
# ~40 min on 2 CPU cores. Runs go to runs/rank_<model>_s<seed>; finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
MODELS=${MODELS:-"dlrm onetrans hstu"}
for seed in $SEEDS; do
  for model in $MODELS; do
    out=runs/rank_${model}_s${seed}
    [ -f "$out/metrics.json" ] && continue
    .venv/bin/genrec rank --config apps/configs/ranking_ml100k.toml --set model.name=$model \
      --set train.seed=$seed --set train.output_dir=$out --set train.progress=false "$@"
  done
done
.venv/bin/python bench/ranking_report.py --baseline dlrm --models $MODELS --seeds $SEEDS
