#!/usr/bin/env bash
# The GPU check, unattended: one command, no edits, a hard 10-minute limit, results in one JSON file
# (benchmarks/results/gpu_check.json, rewritten after every stage). Without a GPU (or with --dry-run)
# it says so and runs the same plan with the tiny model on the CPU: those are not GPU figures.
#
#   benchmarks/gpu_check.sh             # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run   # anywhere: checks the wiring
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# hard limit: TERM at 10 minutes, KILL 15 s later; the JSON holds whatever was measured by then
exec timeout --kill-after=15 600 "$PY" benchmarks/gpu_check.py "$@"
