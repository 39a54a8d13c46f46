#!/usr/bin/env bash
# The 70B fp8's kernels on one H100, which cannot hold its 80 layers (73.4 GiB): a proxy with 40
# of them (models/llama-3.1-70b-40l.json; ModelArch.with_layers), every layer the 70B's shape,
# at half the 70B's inter-token target (30 ms), so the planner's batch sits where the 70B's does.
# It tests the fp8 prediction on Hopper and planner vs vLLM's defaults; it is not the H200 proof.
# Rates sit at and past the planner's predicted 5.83 req/s (prediction-llama-3.1-70b-40l-h100.json).
#   bash benchmarks/h200/campaign-70b-40l-h100.sh planner:48:8192 defaults:: seed:128:
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H100*) ;; *) echo "the 40-layer proxy is for an H100, not '$gpu' (an H200 runs campaign-70b.sh)" >&2; exit 2 ;; esac
configs=()
for c in "$@"; do configs+=(--config "$c"); done
exec bash "$here/device.sh" 70b-40l --quantization fp8 --input-len 1024 --output-len 256 \
  --ttft-ms 2000 --itl-ms 30 --rates "${RATES:-6,7.5,9,inf}" --duration-s 12 --max-requests 200 \
  --prediction "$here/prediction-llama-3.1-70b-40l-h100.json" --deadline-s "${DEADLINE_S:-585}" \
  --min-left-s 200 --start-timeout-s 240 "${configs[@]}"
