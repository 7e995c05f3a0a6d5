#!/usr/bin/env bash
# Answer a question file: bash run_predict.sh --model_path output/sft --data_path data/world/bench_objhal.jsonl
#   writes JSONL (question_id, image, prompt, text, model_id); python -m training.predict.main --help lists options.
# Generate and score a benchmark: bash run_predict.sh --benchmark NAME --model_path P --data D [...]
#   NAME: objhal pope amber mmhal llava_bench embedded; python -m eval.benchmark --help lists options.
source "$(dirname "$0")/scripts/env.sh"
# NUM_GPUS=N (N > 1): N processes answer every N-th question each, one per GPU (the first N of CUDA_VISIBLE_DEVICES
# when it is set), into one answers file (training/predict/parallel.py); with --benchmark they generate its answers
# (--num_processes N). On a CPU-only machine the N processes share the cores.
n="${NUM_GPUS:-1}"
for arg in "$@"; do
  if [ "$arg" = "--benchmark" ] || [[ "$arg" == --benchmark=* ]]; then
    if [ "$n" -gt 1 ]; then exec python -m eval.benchmark "$@" --num_processes "$n"; fi
    exec python -m eval.benchmark "$@"
  fi
done
if [ "$n" -le 1 ]; then
  exec python -m training.predict.main "$@"
fi
exec python -m training.predict.parallel "$n" "$@"
