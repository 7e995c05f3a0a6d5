#!/usr/bin/env bash
# OPA-DPO end to end: rollouts of the policy -> expert correction (per-sentence report) -> OPA LoRA-SFT
# on ground-truth and revised answers -> OPA-DPO (four pairs + anchor). No arguments: from output/sft
# (run_sft.sh) on 600 embedded-world prompts with the ground-truth expert -> output/opa_dpo.
#   bash run_opa_dpo.sh --step rollout|correct|sft|dpo       # one step (each resumable)
#   bash run_opa_dpo.sh [--step NAME] --force                # redo that step (no --step: every step)
#   bash run_opa_dpo.sh --expert chat --expert_url URL --expert_model NAME --expert_api_key_env VAR
# python -m training.dpo.opa.main --help lists every option.
source "$(dirname "$0")/scripts/env.sh"
python -m training.dpo.opa.main "$@"
