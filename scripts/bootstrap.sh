#!/usr/bin/env bash
# Build (or reuse) the project's virtual environment with the pinned stack.
#
#   scripts/bootstrap.sh            # .venv with runtime + test tools
#   GENREC_VENV=/path scripts/bootstrap.sh
#
# Idempotent: a stamp records what was installed (requirement files, setup.cfg, Python
# version, CPU/CUDA variant); when nothing changed it returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${GENREC_VENV:-.venv}"
python="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  variant=cuda
else
  variant=cpu
fi

"$python" - <<'PY' || { echo "bootstrap: torchrec-genrec needs Python 3.10-3.12 (torch 2.13 wheels); found $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2; exit 1; }
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY

stamp_inputs() {
  cat requirements/*.txt setup.cfg pyproject.toml
  "$python" --version 2>&1
  echo "variant=$variant"
}
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
stamp="$venv/.genrec-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "bootstrap: installing the pinned stack ($variant) into $venv ..." >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# pip warns about every absent local index directory; the warnings are not errors.
filter() { grep -v -E "^WARNING: Location '.*' is ignored" || true; }
"${pip[@]}" -r "requirements/$variant.txt" 2>&1 | filter
"${pip[@]}" -r requirements/base.txt -r requirements/test.txt -r requirements/kubernetes.txt -r requirements/content.txt 2>&1 | filter
"${pip[@]}" --no-deps -r requirements/torchrec.txt 2>&1 | filter
"${pip[@]}" --no-deps --no-build-isolation -e . 2>&1 | filter
# Fail here, not in the first test, if the stack does not import together.
"$venv/bin/genrec" doctor --quiet
echo "$want" > "$stamp"
echo "bootstrap: done ($venv)" >&2
