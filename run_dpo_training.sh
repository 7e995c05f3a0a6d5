#!/usr/bin/env bash
# DPO family / ORPO. No arguments: DPO from the SFT actor (output/sft, made by run_sft.sh) on the
# embedded world's preference pairs -> output/dpo (plots in figure/).
#   bash run_dpo_training.sh --loss_type orpo --output_dir output/orpo
#   bash run_dpo_training.sh --loss_type listwise          # ranked lists of 3 (Plackett-Luce)
# Any argument overrides a default (python -m training.dpo.main --help lists them).
# NUM_GPUS=2 bash run_dpo_training.sh   -> two ranks (on CPU: two processes).
source "$(dirname "$0")/scripts/env.sh"
launch training.dpo.main "$@"
