#!/usr/bin/env bash
# Reward model: the SFT actor (output/sft) + a scalar head, trained on preference pairs -> output/rm.
# No arguments: the embedded world's pairs, factual (Fact-RLHF) mode, held-out accuracy + figure/rm_rewards.png.
# Any argument overrides a default (python -m training.rm.main --help lists them), e.g. --no-factual.
# NUM_GPUS=2 bash run_rm_training.sh   -> two ranks (on CPU: two processes); HOSTFILE=... -> several nodes.
source "$(dirname "$0")/scripts/env.sh"
launch training.rm.main "$@"
