# Sourced by run_pipeline.sh (after scripts/env.sh): run a stage unless a rerun can keep it.
# stage OUT [DEP ...] -- SCRIPT [ARGS ...]: run SCRIPT, whose output is OUT and which starts from the DEPs
stage() {
  local out="$1" deps=() state
  shift
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do deps+=("$1"); shift; done
  if [ "$#" -lt 2 ]; then echo "stage: usage: stage OUT [DEP ...] -- SCRIPT [ARGS ...]" >&2; return 2; fi
  shift
  state="$(python -m training.pipeline begin "$out" --after "${deps[@]}" -- "$@")"
  case "$state" in
    skip) echo "== $out: finished earlier with this command, code and inputs: kept (PIPELINE_FRESH=1 retrains)"
          return 0 ;;
    resume) echo "== $out: continuing its interrupted run"; bash "$@" --resume ;;
    *) echo "== $out: training (no finished or interrupted run with this command, code and inputs)"
       bash "$@" ;;
  esac
  python -m training.pipeline end "$out" -- "$@"
}
