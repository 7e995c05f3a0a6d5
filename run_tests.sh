#!/usr/bin/env bash
# The test suite (what CI runs): creates the virtual environment when it is missing.
# Tests run with the Hub offline: anything that would download fails loudly.
# They run in parallel worker processes (pytest-xdist), one per core and at most 4 (each holds a few GB), a test
# file's tests in one worker (they share module fixtures); TEST_WORKERS=1 runs them in this process.
source "$(dirname "$0")/scripts/env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cores="$(nproc)"
workers="${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "TEST_WORKERS=$workers: expected a whole number of worker processes, at least 1 (unset: one per core," \
       "at most 4)" >&2
  exit 2
fi
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS=$(( cores > workers ? cores / workers : 1 ))  # threads of one worker spin against another's
  python -m pytest tests -q -n "$workers" --dist loadfile "$@"
else
  python -m pytest tests -q "$@"
fi
