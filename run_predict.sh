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
# NUM_GPUS=N (N > 1): N processes answer every N-th question each (--num_chunks / --chunk_idx), one per GPU (the
# first N of CUDA_VISIBLE_DEVICES when it is set), appending to one answers file; on a CPU-only machine N processes
# share the cores.
n="${NUM_GPUS:-1}"
if [ "$n" -le 1 ]; then
  exec python -m training.predict.main "$@"
fi
if [ "${DS_ACCELERATOR:-}" = "cpu" ]; then
  devices=""
  export OMP_NUM_THREADS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))
else
  count="$(python -c 'import torch; print(torch.cuda.device_count())')"
  devices="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((count - 1)))}"
  if [ "$(echo "$devices" | tr ',' '\n' | grep -c .)" -lt "$n" ] || [ "$count" -lt "$n" ]; then
    echo "NUM_GPUS=$n but there are $count GPUs (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})" >&2; exit 2
  fi
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM  # background processes ignore Ctrl-C: stop them too
for i in $(seq 0 $((n - 1))); do
  if [ -n "$devices" ]; then
    CUDA_VISIBLE_DEVICES="$(echo "$devices" | cut -d, -f$((i + 1)))" \
      python -m training.predict.main "$@" --num_chunks "$n" --chunk_idx "$i" &
  else
    python -m training.predict.main "$@" --num_chunks "$n" --chunk_idx "$i" &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
