#!/usr/bin/env bash
# The project's test command (README, command 2): set up .venv, lint, then run the whole test suite.
#   bash tests/run.sh [PYTEST ARGS...]
# GPU and TensorRT tests skip with a reason where those are absent; everything else runs on CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup_env.sh
export WANDB_MODE=disabled OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"  # W&B tests set their own mode
.venv/bin/python -m ruff check .
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"
