# Sourced by .ci/run (from the clone's root): where the virtual environment goes, and memory left for the tests.
# The install needs about 6 GB (torch's CUDA build). On a disk with too little room for it, beside a /dev/shm (memory)
# with room, the environment goes to /dev/shm and .venv links to it (a CI machine once had 4 GB free: pip failed with
# "No space left on device" before any test ran). An environment in memory is memory the tests don't have: each run
# holds a lock on its own while it lives and removes it when it exits, and a run finds and removes the ones left
# behind by runs that ended without removing theirs (killed ones, or runs of an earlier .ci/run: two such, 12.6 GB,
# once left a CI run's tests 4 GB of memory, and they stalled until CI's time limit, 90 minutes).
CI_SHM_DIR="${CI_SHM_DIR:-/dev/shm}"
ci_need_kb=$(( ${CI_VENV_NEED_GB:-7} * 1024 * 1024 ))
ci_tests_kb=$(( ${CI_TESTS_NEED_GB:-8} * 1024 * 1024 ))  # what the test workers take at most, beside the environment

ci_free_kb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }
ci_mem_kb() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
ci_gb() { echo "$(( $1 / 1048576 )) GB"; }

# environments under $CI_SHM_DIR whose run is gone (no process holds their lock) are removed
ci_sweep_stale_venvs() {
  local d
  for d in "$CI_SHM_DIR"/vlm_align_venv.*; do
    [ -d "$d" ] || continue
    if ( exec 8>>"$d/.lock" && flock -n 8 ); then
      echo "removing $d ($(du -sh "$d" 2>/dev/null | cut -f1)): an environment in memory that an ended run left" >&2
      rm -rf "$d"
    fi
  done
}

# the environment goes to memory when the disk lacks room for it (or CI_VENV_IN_SHM=1, to test this branch); when
# neither has room for it and the tests, say so and stop (rather than tests that stall for want of memory)
ci_place_venv() {
  ci_sweep_stale_venvs
  if [ -e .venv ] || { [ "${CI_VENV_IN_SHM:-0}" != 1 ] && [ "$(ci_free_kb .)" -ge "$ci_need_kb" ]; }; then
    return 0
  fi
  if [ "$(ci_free_kb "$CI_SHM_DIR")" -lt "$ci_need_kb" ] ||
     [ "$(ci_mem_kb)" -lt $(( ci_need_kb + ci_tests_kb )) ]; then
    echo "no room for the virtual environment: $(ci_gb "$(ci_free_kb .)") free on this disk," \
         "$(ci_gb "$(ci_free_kb "$CI_SHM_DIR")") in $CI_SHM_DIR and $(ci_gb "$(ci_mem_kb)") of memory available;" \
         "it needs ${CI_VENV_NEED_GB:-7} GB, and the tests ${CI_TESTS_NEED_GB:-8} GB of memory beside it" >&2
    return 1
  fi
  CI_VENV="$(mktemp -d "$CI_SHM_DIR/vlm_align_venv.XXXXXX")"
  exec 9>"$CI_VENV/.lock"
  flock 9
  trap 'rm -rf "$CI_VENV"; rm -f .venv' EXIT
  local why="$(ci_gb "$(ci_free_kb .)") free on this disk (the environment needs ${CI_VENV_NEED_GB:-7} GB)"
  if [ "${CI_VENV_IN_SHM:-0}" = 1 ]; then why="CI_VENV_IN_SHM=1"; fi
  echo "$why: the environment goes to $CI_VENV (memory), removed when this run ends" >&2
  ln -sfn "$CI_VENV" .venv
}
