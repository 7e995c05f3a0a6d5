#!/usr/bin/env bash
# Answer a question file: bash run_predict.sh --model_path output/sft --data_path data/world/bench_objhal.jsonl
#   writes JSONL (question_id, image, prompt, text, model_id); python -m training.predict.main --help lists options.
# Generate and score a benchmark: bash run_predict.sh --benchmark NAME --model_path P --data D [...]
#   NAME: objhal pope amber mmhal llava_bench embedded; python -m eval.benchmark --help lists options.
source "$(dirname "$0")/scripts/env.sh"
for arg in "$@"; do
  if [ "$arg" = "--benchmark" ] || [[ "$arg" == --benchmark=* ]]; then
    exec python -m eval.benchmark "$@"
  fi
done
exec python -m training.predict.main "$@"
