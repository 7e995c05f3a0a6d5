#!/usr/bin/env bash
# SFT: trains the actor. No arguments: the tiny VLM on the embedded world -> output/sft.
# Any argument overrides a default (python -m training.sft.main --help lists them).
# NUM_GPUS=2 bash run_sft.sh   -> two ranks (on CPU: two processes); HOSTFILE=... -> several nodes.
source "$(dirname "$0")/scripts/env.sh"
launch training.sft.main "$@"
