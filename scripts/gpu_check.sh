#!/usr/bin/env bash
# Every recipe, short, on a CUDA machine, each step under its own timeout: one JSON report
# (versions, GPU, per step ok/error, seconds, metrics, tokens/s, peak GPU memory).
#
#   bash scripts/gpu_check.sh --store STORE [--report FILE] [--bring-back DIR]
#   bash scripts/gpu_check.sh --store STORE --device cpu --quick    # check the script on a CPU
#
# STORE is a prepared MovieLens-100K store (`genrec prepare movielens-100k`; a few MiB, it
# can be copied to the GPU machine). Where the pinned CUDA stack cannot be installed, install
# the nearest one that loads (../shared/gpu/: torch 2.11 + fbgemm-gpu 1.6.0 + torchrec 1.6.1)
# and put it on PYTHONPATH: `genrec doctor` reports it as untested and the check goes on.
# scripts/gpu_check.py says what each step does.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
exec "$py" scripts/gpu_check.py check "$@"
