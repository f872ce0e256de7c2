#!/usr/bin/env bash
# The default HSTU recipe on ML-100K on 1 rank (batch 128) and on 2 gloo ranks (64 each: the
# same global batch), and a 2 -> 1 re-shard (2 ranks train 40 epochs, 1 rank resumes to the
# recipe's end); then paired-bootstrap comparisons of the test metrics.
#   bash bench/ranks_ml100k.sh [OUT_DIR]    (about 15 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/ranks}
export PATH=$PWD/.venv/bin:$PATH
recipe=apps/configs/hstu_ml100k.toml
genrec prepare movielens-100k
common=(--set train.progress=false --set train.resume=never)
time genrec train --config $recipe --set train.output_dir=$out/one_rank "${common[@]}" > $out.one.log 2>&1 || { tail $out.one.log; exit 1; }
time env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m torchrec_genrec.cli train --config $recipe \
    --set train.output_dir=$out/two_ranks --set train.batch_size=64 "${common[@]}" > $out.two.log 2>&1 || { tail $out.two.log; exit 1; }
time env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m torchrec_genrec.cli train --config $recipe \
    --set train.output_dir=$out/two_then_one --set train.batch_size=64 --set train.epochs=40 "${common[@]}" > $out.reshard.log 2>&1 || { tail $out.reshard.log; exit 1; }
time genrec train --config $recipe --set train.output_dir=$out/two_then_one --set train.progress=false \
    --set train.resume=must >> $out.reshard.log 2>&1 || { tail $out.reshard.log; exit 1; }
for run in one_rank two_ranks two_then_one; do
  python -c "import json,sys; m=json.load(open('$out/$run/metrics.json')); t=m['metrics']['test']; tr=m['training']; print('$run', 'test hr@10 %.4f ndcg@10 %.4f' % (t['hr@10'], t['ndcg@10']), 'best epoch', tr['best_epoch'], 'epochs', tr['epochs_run'], 'resumed from', tr['resumed_from'], 'seconds', m['seconds'])"
done
genrec compare $out/two_ranks $out/one_rank
genrec compare $out/two_then_one $out/one_rank
