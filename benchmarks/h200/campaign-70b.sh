#!/usr/bin/env bash
# The 70B fp8 campaign: the configs given, each as LABEL:MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS
# (empty = vLLM's default). A cold 70B start is 175-280 s, so one call fits about two configs;
# sweep.py skips what would not finish before the deadline.
# - H200: the 70B itself (73.4 GiB, more than an H100 leaves), at and past the planner's
#   predicted 3.9 req/s (prediction-llama-3.1-70b.json, planner:64:8192).
# - H100: a proxy with 40 of the 70B's 80 layers (models/llama-3.1-70b-40l.json;
#   ModelArch.with_layers) at half the inter-token target (30 ms), so the planner's batch sits
#   where the 70B's does (prediction-llama-3.1-70b-40l-h100.json, planner:48:8192, 5.83 req/s).
#   It tests the fp8 prediction on Hopper and the planner against vLLM's defaults for the 70B's
#   kernels; it is not the H200 proof.
#   bash benchmarks/h200/campaign-70b.sh planner:64:8192 defaults::     # H200
#   bash benchmarks/h200/campaign-70b.sh planner:48:8192 defaults::     # H100
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in
  *H200*) model=70b; itl=60; rates=4,5.5,7,inf; most=140; left=250; prediction=$here/prediction-llama-3.1-70b.json ;;
  *H100*) model=70b-40l; itl=30; rates=6,7.5,9,inf; most=200; left=200; prediction=$here/prediction-llama-3.1-70b-40l-h100.json ;;
  *) echo "no 70B campaign for GPU '$gpu'" >&2; exit 2 ;;
esac
configs=()
for c in "$@"; do configs+=(--config "$c"); done
exec bash "$here/device.sh" "$model" --quantization fp8 --input-len 1024 --output-len 256 \
  --ttft-ms 2000 --itl-ms "$itl" --rates "${RATES:-$rates}" --duration-s 12 --max-requests "$most" \
  --prediction "$prediction" --deadline-s "${DEADLINE_S:-585}" \
  --min-left-s "$left" --start-timeout-s 280 "${configs[@]}"
