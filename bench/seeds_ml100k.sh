#!/usr/bin/env bash
# HSTU vs SASRec vs MostPop on ML-100K over seeds 0-2 (same data path, loss, epoch cap and
# early-stopping rule), then paired-bootstrap intervals with per-user metrics averaged over
# the seeds.   bash bench/seeds_ml100k.sh [OUT_DIR]   (about 25 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/seeds}
export PATH=$PWD/.venv/bin:$PATH
genrec prepare movielens-100k
for seed in 0 1 2; do
  for model in hstu sasrec; do
    start=$SECONDS
    genrec train --config apps/configs/${model}_ml100k.toml \
        --set train.seed=$seed --set train.output_dir=$out/${model}_s$seed --set train.progress=false \
        --set train.resume=never > $out.${model}_s$seed.log 2>&1
    echo "$model seed $seed: $((SECONDS - start)) s"
  done
done
genrec train --config apps/configs/mostpop_ml100k.toml --set train.output_dir=$out/mostpop > $out.mostpop.log 2>&1
runs() { echo $out/${1}_s0,$out/${1}_s1,$out/${1}_s2; }
genrec compare $(runs hstu) $(runs sasrec)
genrec compare $(runs hstu) $out/mostpop
genrec compare $(runs sasrec) $out/mostpop
