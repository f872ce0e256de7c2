#!/usr/bin/env bash
# The ranker study of the content issue on ML-100K (DCNv2+DIN ranker, seeds 0-2):
# one training epoch per run (the IDs-only ranker's best epoch was 0 on every seed in the ranking
# study), IDs only vs + semantic IDs vs + DAS vs + MUSE (SimTier, SA-TA, both; raw vs MoCo-adapted
# content), and item representations ID-only / SID-only / hashed-ID + SID. Needs the sets
# of bench/content_ml100k.sh. Runs go to runs/c7_<variant>_s<seed> (finished runs are
# skipped); QUEUES=2 runs two single-threaded queues side by side. Then the report:
#   .venv/bin/python bench/content_report.py
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
QUEUES=${QUEUES:-2}
# EPOCHS=4 PATIENCE=1 PREFIX=c7e VARIANTS="ids sid_only small_sid small": the longer study.
EPOCHS=${EPOCHS:-1}
PATIENCE=${PATIENCE:-2}
PREFIX=${PREFIX:-c7}
declare -A V
V[ids]=""
V[sid]="--set model.sid=sid_rqkmeans"
V[das]="--set model.sid=das --set model.das=das"
V[simtier]="--set model.content=minilm --set model.muse=simtier --set data.task.lifelong_len=1000"
V[sata]="--set model.content=minilm --set model.muse=sata --set data.task.lifelong_len=1000"
V[both]="--set model.content=minilm --set model.muse=both --set data.task.lifelong_len=1000"
V[both_scl]="--set model.content=minilm_scl --set model.muse=both --set data.task.lifelong_len=1000"
V[sid_only]="--set model.sid=sid_rqkmeans --set model.item_ids=none"
V[small_sid]="--set model.sid=sid_rqkmeans --set model.item_ids=hashed --set model.item_hash_rows=256"
V[small]="--set model.item_ids=hashed --set model.item_hash_rows=256"
# LUM features (issue #8): the sets lum_genre_s<seed> of `python bench/lum_features.py --seeds 0 1 2`,
# LUM pre-trained with the ranker's seed.
V[lum]="--set model.lum=lum_genre_s{seed}"
V[lum_hour]="--set model.lum=lum_hour_s{seed}"   # --condition hour: the request's 3-hour bucket
# The same LUMs' sets with point-in-time interests for training samples (--point-in-time).
V[lum_pit]="--set model.lum=lum_genre_pit_s{seed}"
# Cross-fitted LUMs (--folds 2 --point-in-time): every vector out of sample for its user.
V[lum_xfit]="--set model.lum=lum_genre_xfit_s{seed}"
VARIANTS=${VARIANTS:-"ids sid simtier sata both das both_scl sid_only small_sid small"}
jobs=()
for seed in $SEEDS; do for v in $VARIANTS; do jobs+=("$v:$seed"); done; done
run_queue() {
  local q=$1 i=0
  for job in "${jobs[@]}"; do
    if [ $((i % QUEUES)) -eq "$q" ]; then
      v=${job%:*}; seed=${job#*:}; out=runs/${PREFIX}_${v}_s${seed}
      if [ ! -f "$out/metrics.json" ]; then
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=$((QUEUES > 1 ? 1 : 2)) .venv/bin/genrec rank --config apps/configs/ranking_ml100k.toml \
          --set model.name=dlrm --set train.seed=$seed --set train.epochs=$EPOCHS --set train.patience=$PATIENCE \
          --set train.output_dir=$out \
          --set train.progress=false ${V[$v]//\{seed\}/$seed} > "$out.log" 2>&1 || echo "FAILED $out"
      fi
    fi
    i=$((i + 1))
  done
}
for q in $(seq 0 $((QUEUES - 1))); do run_queue "$q" & done
wait
