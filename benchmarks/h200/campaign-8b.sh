#!/usr/bin/env bash
# The 8B campaign on whichever lent GPU came (H200 or H100), in two calls that each fit the
# device's 10-minute limit; stage the wheels first (README.md here). Every rate has its own
# prompts (bench.py rate_seed), so no point is served from an earlier rate's prefix cache.
#   bash benchmarks/h200/campaign-8b.sh 1   # the planner's flags, vLLM's defaults, the seed guide's
#   bash benchmarks/h200/campaign-8b.sh 2   # the max_num_batched_tokens row of the sweep
set -euo pipefail
part=$1
here=$(cd "$(dirname "$0")" && pwd)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in
  # The planner's batch for one GPU (predict.py) and rates at and past its clean capacity.
  # The H100 campaign showed the configs differ only past capacity (1.3-1.6x), so the H200's
  # ladder reaches 1.5x its predicted 25.2 req/s.
  *H200*) seqs=256; prediction=$here/prediction-llama-3.1-8b.json; rates=25,31,37,inf; most=400 ;;
  *H100*) seqs=224; prediction=$here/prediction-llama-3.1-8b-h100.json; rates=16,20,24,inf; most=300 ;;
  *) echo "no 8B campaign for GPU '$gpu'" >&2; exit 2 ;;
esac
case "$part" in
  1) configs=(--config "planner:$seqs:8192" --config defaults:: --config seed:128:) ;;
  2) configs=(--config "mnbt4k:$seqs:4096" --config "mnbt16k:$seqs:16384" --config "seqs512:512:8192") ;;
  *) echo "part: 1 or 2, not '$part'" >&2; exit 2 ;;
esac
exec bash "$here/device.sh" 8b --input-len 1024 --output-len 256 --ttft-ms 2000 --itl-ms 40 \
  --rates "$rates" --duration-s 10 --max-requests "$most" --prediction "$prediction" \
  --deadline-s "${DEADLINE_S:-540}" --min-left-s 170 "${configs[@]}"
