#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install reformer-dist into it.
#   bash launch/setup_env.sh [EXTRAS]        # default extras: test,dev,serve
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so pip never
# downloads the multi-GB CUDA build; with a GPU, the default (CUDA) wheel and the `gpu` extra are used.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-test,dev,serve}"
python="${PYTHON:-python3}"
venv="${REFORMER_VENV:-.venv}"

"$python" - <<'PY' || { echo "reformer-dist needs Python >= 3.10" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 10))
PY

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
stamp="$venv/.reformer-dist-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$extras:$(sha256sum pyproject.toml | cut -c1-16)" ]; then
  echo "[setup] $venv is up to date"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch and the gpu extra"
  extras="$extras,gpu"
  "${pip[@]}" "torch==2.13.0"
else
  echo "[setup] no GPU: installing the CPU build of torch"
  # Only torch itself comes from the CPU index (its dependencies from the default index, below); where
  # that index is unreachable, fall back to the default one (mirrors that already serve a CPU wheel).
  "${pip[@]}" --no-deps --retries 0 --timeout 15 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    || "${pip[@]}" "torch==2.13.0"
fi
echo "[setup] installing reformer-dist[$extras]"
"${pip[@]}" -e ".[$extras]"
echo "${1:-test,dev,serve}:$(sha256sum pyproject.toml | cut -c1-16)" > "$stamp"
