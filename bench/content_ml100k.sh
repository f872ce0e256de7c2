#!/usr/bin/env bash
# Builds the side-feature sets of the content / semantic-ID / DAS study on ML-100K and
# prints their quality reports (codebook usage, collisions, reconstruction, co-consumption
# lift, content i2i recall). Every behaviour model reads only events before the ranking
# split's validation cutoff.
#   bash bench/content_ml100k.sh            # ~15 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
g=.venv/bin/genrec
export HF_HUB_OFFLINE=1
$g content embed --encoder minilm --name minilm
$g content adapt --content minilm --name minilm_scl --epochs 5
$g content sid --content minilm --method rqkmeans --name sid_rqkmeans
$g content sid --content minilm --method rqvae --name sid_rqvae
$g content das --content minilm --name das --epochs 20
# The same DAS without alignment (lambda_align 0) and with ten times more: codes before and
# after alignment.
$g content das --content minilm --name das_a0 --epochs 20 --lambda-align 0
$g content das --content minilm --name das_a1 --epochs 20 --lambda-align 1
$g content report --sets minilm minilm_scl sid_rqkmeans sid_rqvae das_a0 das das_a1
