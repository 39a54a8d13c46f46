#!/usr/bin/env bash
# The 70B fp8 campaign on one H200 (it needs 73.4 GiB, more than an H100 leaves): the configs
# given, each as LABEL:MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS (empty = vLLM's default). A cold
# 70B start is 175-280 s, so one call fits about two configs; sweep.py skips what would not
# finish before the deadline. Rates sit at and past the planner's predicted 3.9 req/s.
#   bash benchmarks/h200/campaign-70b.sh planner:64:8192 seed:128:
#   bash benchmarks/h200/campaign-70b.sh defaults:: seqs96:96:8192
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) ;; *) echo "the 70B fp8 needs an H200, not '$gpu'" >&2; exit 2 ;; esac
configs=()
for c in "$@"; do configs+=(--config "$c"); done
exec bash "$here/device.sh" 70b --quantization fp8 --input-len 1024 --output-len 256 \
  --ttft-ms 2000 --itl-ms 60 --rates "${RATES:-4,5.5,7,inf}" --duration-s 12 --max-requests 140 \
  --prediction "$here/prediction-llama-3.1-70b.json" --deadline-s "${DEADLINE_S:-585}" \
  --min-left-s 250 --start-timeout-s 280 "${configs[@]}"
