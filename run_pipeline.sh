#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded world, ending with a results table and figures.
#   SFT -> reward model (factual) -> DPO, ORPO (from SFT) and PPO (SFT actor + reward model)
#   -> every model answers the held-out benchmarks -> table (output/results.md) + bar charts (figure/).
# Arguments are passed to the SFT stage (e.g. --num_train_epochs 2 for a quicker run).
# A rerun keeps each stage that finished with the same command, code, data and inputs, continues one that
# was interrupted from its last resumable checkpoint (if it wrote one: --save_steps) and trains the rest
# anew (training/pipeline.py); PIPELINE_FRESH=1 retrains every stage.
source "$(dirname "$0")/scripts/env.sh"
source "$ROOT/scripts/stage.sh"  # (env.sh moved to $ROOT: a relative $0 names nothing now)
for arg in "$@"; do  # every later stage reads output/sft and data/world: SFT must write those
  case "$arg" in
    -h|--h|--he|--hel|--help)  # (given to SFT, as argparse's prefixes of --help too, it printed SFT's help, exited 0
      # and left output/sft's record as that command's)
      sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$ROOT/run_pipeline.sh"
      echo "SFT's arguments: python -m training.sft.main --help"
      exit 0;;
  esac
done
# --output_dir, --world_dir, --world_seed (--name VALUE or --name=VALUE: no command takes an abbreviation), on the
# command line or in a --config profile: SFT would write or read elsewhere, and exit 2
python -m training.pipeline check -- "$@" || exit $?
python -m training.pipeline prepare
stage output/sft -- run_sft.sh "$@"
stage output/rm output/sft -- run_rm_training.sh
stage output/dpo output/sft -- run_dpo_training.sh
stage output/orpo output/sft -- run_dpo_training.sh --loss_type orpo --output_dir output/orpo
stage output/ppo output/sft output/rm -- run_ppo_training.sh
models=(output/sft output/dpo output/orpo output/ppo)
python -m eval.run_embedded --models "${models[@]}" --world data/world --no-progress
# the results of these models alone (not another command's output/*/eval_embedded.json, such as an OPA-DPO's)
python -m eval.report --results "${models[@]/%//eval_embedded.json}" --table_file output/results.md --figure_dir figure
