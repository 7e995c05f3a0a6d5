#!/usr/bin/env bash
# The test suite (what CI runs): creates the virtual environment when it is missing.
# Tests run with the Hub offline: anything that would download fails loudly.
# They run in parallel worker processes (pytest-xdist), one per core and at most 4 (each holds a few GB), a test
# file's tests in one worker (they share module fixtures); TEST_WORKERS=1 runs them in this process.
# A test that runs past TEST_TIMEOUT seconds (default 900) fails with its stack, so a stalled test is named instead of
# the run stalling until CI's own time limit. The slowest took 66 s (`--durations`, stop 41), and the first test that
# needs one of DeepSpeed's ops compiles it on a new machine (84-97 s each).
omp_given="${OMP_NUM_THREADS:-}"  # the user's, which wins (as in env.sh)
source "$(dirname "$0")/scripts/env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
workers="${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
require_count TEST_WORKERS "$workers" "worker processes" "one per core, at most 4"
timeout="${TEST_TIMEOUT:-900}"
require_count TEST_TIMEOUT "$timeout" "seconds" "900"
if [ "$workers" -gt 1 ]; then
  export OMP_NUM_THREADS="${omp_given:-$(core_share "$workers")}"  # a worker's threads spin against another's
  python -m pytest tests -q --timeout "$timeout" -n "$workers" --dist loadfile "$@"
else
  python -m pytest tests -q --timeout "$timeout" "$@"
fi
