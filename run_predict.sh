#!/usr/bin/env bash
# Answer a question file: bash run_predict.sh --model_path output/sft --data_path data/world/bench_objhal.jsonl
# Writes JSONL (question_id, image, prompt, text, model_id); python -m training.predict.main --help lists options.
source "$(dirname "$0")/scripts/env.sh"
python -m training.predict.main "$@"
