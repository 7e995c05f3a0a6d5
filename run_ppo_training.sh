#!/usr/bin/env bash
# PPO: aligns the SFT actor (output/sft) with the factual reward model (output/rm) on the embedded
# world's prompts -> output/ppo. Any argument overrides a default (python -m training.ppo.main --help).
source "$(dirname "$0")/scripts/env.sh"
launch training.ppo.main "$@"
