#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded world, ending with a results table and figures.
#   SFT -> reward model (factual) -> DPO, ORPO (from SFT) and PPO (SFT actor + reward model)
#   -> every model answers the held-out benchmarks -> table (output/results.md) + bar charts (figure/).
# Arguments are passed to the SFT stage (e.g. --num_train_epochs 2 for a quicker run).
source "$(dirname "$0")/scripts/env.sh"
bash run_sft.sh "$@"
bash run_rm_training.sh
bash run_dpo_training.sh
bash run_dpo_training.sh --loss_type orpo --output_dir output/orpo
bash run_ppo_training.sh
python -m eval.run_embedded --models output/sft output/dpo output/orpo output/ppo --world data/world --no-progress
python -m eval.report --results output/*/eval_embedded.json --table_file output/results.md --figure_dir figure
