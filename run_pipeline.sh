#!/usr/bin/env bash
# The main job: every stage that exists, on the embedded world, ending with a results table.
#   SFT (tiny VLM on the embedded world) -> prediction + scoring on the held-out benchmarks.
# Outputs under output/; the table also goes to output/results.md.
source "$(dirname "$0")/scripts/env.sh"
bash run_sft.sh "$@"
python -m eval.run_embedded --models output/sft --world data/world --table_file output/results.md
