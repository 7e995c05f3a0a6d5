#!/usr/bin/env bash
# The test suite (what CI runs): creates the virtual environment when it is missing.
# Tests run with the Hub offline: anything that would download fails loudly.
source "$(dirname "$0")/scripts/env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest tests -q "$@"
