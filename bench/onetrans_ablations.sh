#!/usr/bin/env bash
# OneTrans ablations and scaling on ML-100K (seed 0), against the default recipe's run
# runs/rank_onetrans_s0 (bench/ranking_ml100k.sh): shared-only vs mixed parameters, no
# pyramid, learned-scorer selection (top-k / threshold), [SEP] merge, group-wise NS
# tokens, grouped training; depth 1/4 and sequence length 10/25. Then the table, each
# row's AUC/GAUC difference from the default with its paired-bootstrap interval.
# Finished runs are skipped. Training speed of the variants: bench/onetrans_bench.py.
# To fit the CPU budget the variants stop 1 epoch after their best (the default run: 2);
# validation AUC peaks within the first 1-3 epochs on ML-100K.
# SEED=1 (or 2) runs the same variants with that seed into runs/abl_<name>_s<seed>; the
# report then averages whatever seeds exist (ranking_report.py --named).
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
suffix=$([ "$SEED" = 0 ] && echo "" || echo "_s$SEED")
run() {
  local name=$1; shift
  [ -f runs/abl_$name$suffix/metrics.json ] && return 0
  .venv/bin/genrec rank --config apps/configs/ranking_ml100k.toml --set model.name=onetrans \
    --set train.output_dir=runs/abl_$name$suffix --set train.progress=false --set train.patience=1 \
    --set train.seed=$SEED "$@"
}
run shared --set model.onetrans.shared_ns_params=true
run nopyramid --set model.onetrans.pyramid=none
run scorer_topk --set model.onetrans.selection=scorer_topk
run scorer_threshold --set model.onetrans.selection=scorer_threshold
run sep --set model.onetrans.merge=sep
run groupwise --set model.onetrans.ns_tokenizer=group_wise
run grouped --set data.grouped=true
run grouped_10min --set data.grouped=true --set data.task.window_seconds=600
run depth1 --set model.onetrans.num_layers=1
run depth4 --set model.onetrans.num_layers=4
run len10 --set data.task.max_seq_len=10
run len25 --set data.task.max_seq_len=25
names=(shared nopyramid scorer_topk scorer_threshold sep groupwise grouped grouped_10min depth1 depth4 len10 len25)
# Each row: every seed that has a run (seed 0 in runs/abl_<name>, others in _s<seed>).
join() { local out=$1; shift; for d in "$@"; do [ -f "$d/metrics.json" ] && out="$out,$d"; done; echo "${out#,}"; }
args=("default=$(join "" runs/rank_onetrans_s0 runs/rank_onetrans_s1 runs/rank_onetrans_s2)")
for n in "${names[@]}"; do args+=("$n=$(join "" runs/abl_$n runs/abl_${n}_s1 runs/abl_${n}_s2)"); done
.venv/bin/python bench/ranking_report.py --named "${args[@]}"
