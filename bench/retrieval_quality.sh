#!/usr/bin/env bash
# Retrieval quality on ML-100K and the planted benchmark, as one job (about 90 minutes on 2 CPU cores):
#  1. the training objectives, 3 seeds, both seen-item protocols (bench/retrieval_objectives.py);
#  2. `genrec tune` of HSTU and of SASRec with the same search space and the same number of
#     trials (a fair fight), selected on validation NDCG@10;
#  3. each tuned recipe over seeds 0-2, compared with a paired bootstrap under both protocols;
#  4. the planted-structure benchmark's oracle ratio with the default and the best objective.
#   bash bench/retrieval_quality.sh [OUT_DIR]      TRIALS=8 SEEDS=0,1,2
set -euo pipefail
out=${1:-runs/quality}
trials=${TRIALS:-8}
seeds=${SEEDS:-0,1,2}
export PATH=$PWD/.venv/bin:$PATH
mkdir -p "$out"
genrec prepare movielens-100k
python bench/retrieval_objectives.py --out "$out/objectives" --seeds "$seeds" | tee "$out/objectives.md"
# The same budget for both encoders: the same space, trials, epoch cap and patience.
budget=(--set train.epochs=60 --set train.patience=10 --set train.tensorboard=false --set train.progress=false)
for model in hstu sasrec; do
  start=$SECONDS
  genrec tune --config apps/configs/${model}_ml100k.toml --space apps/search/retrieval.toml --trials "$trials" \
      --out "$out/tune_$model" "${budget[@]}" | tee "$out/tune_$model.txt"
  echo "tune $model: $((SECONDS - start)) s" | tee -a "$out/tune_$model.txt"
done
runs=()
for model in hstu sasrec; do
  list=""
  for seed in ${seeds//,/ }; do
    genrec train --config "$out/tune_$model/best.toml" --set train.seed=$seed \
        --set "train.output_dir=$out/best_${model}_s$seed" --set train.resume=never > "$out/best_${model}_s$seed.log" 2>&1
    list="$list${list:+,}$out/best_${model}_s$seed"
  done
  runs+=("$list")
done
genrec compare "${runs[0]}" "${runs[1]}" | tee "$out/compare_tuned.txt"
genrec compare "${runs[0]}" "${runs[1]}" --seen ranked | tee "$out/compare_tuned_ranked.txt"
python bench/planted_structure.py --out "$out/planted" --models hstu --depths 2 --lengths 128 --epochs 30 \
    | tee "$out/planted_default.md"
python bench/planted_structure.py --out "$out/planted" --models hstu --depths 2 --lengths 128 --epochs 30 \
    --set model.loss=full_softmax --tag _full | tee "$out/planted_full.md"
