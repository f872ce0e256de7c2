#!/usr/bin/env bash
# The last call of a session on a lent GPU machine (no package index there), after the CUDA
# bundle's two large parts were carried in earlier calls and copied to /tmp/cuda_parts:
#
#   here:   ../shared/gpu/make_cuda_bundle.sh .cuda        # .cuda/ in .git/info/exclude
#           cp -r $GENREC_HOME/datasets/movielens-100k .cuda/store
#   call 1: carry .cuda/part1 -> mkdir -p /tmp/cuda_parts && cp .cuda/part1/* /tmp/cuda_parts/
#   call 2: carry .cuda/part2 -> cp .cuda/part2/* /tmp/cuda_parts/
#   call 3: carry .cuda/rest and .cuda/store -> bash scripts/gpu/device_session.sh check
#   call 4 (time left): bash scripts/gpu/device_session.sh bench
#
# check: scripts/gpu_check.sh (every recipe on CUDA), report + the HSTU run to bring back in
# $OUT; bench: bench/hstu_gpu_bench.py's attention part. Each stays under the 600 s call limit.
set -uo pipefail
what=${1:-check}
out=${OUT:?run through the device tool: \$OUT is where results go}
if [ ! -d /tmp/site/torchrec ]; then
  mkdir -p /tmp/rest && cp -r .cuda/rest/. /tmp/rest/   # the repository copy is replaced next call
  bash /tmp/rest/install_cuda_bundle.sh /tmp/cuda_parts /tmp/rest /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHON=python3
case $what in
  check)
    rm -rf /tmp/store && cp -r .cuda/store /tmp/store
    timeout 540 bash scripts/gpu_check.sh --store /tmp/store --report "$out/gpu_check_h200.json" \
        --bring-back "$out/back" --work /tmp/gpu_check
    cp /tmp/gpu_check/logs/*.log "$out/" 2>/dev/null ;;
  bench)
    timeout 540 python3 bench/hstu_gpu_bench.py --model-steps 0 --json "$out/hstu_gpu_h200.json" ;;
  *) echo "usage: device_session.sh check|bench" >&2; exit 2 ;;
esac
