#!/usr/bin/env bash
# Runs on the lent H200 (see benchmarks/h200/README.md): installs the staged vLLM 0.26.0 once,
# makes the model folders, then runs sweep.py with the arguments given.
#   bash benchmarks/h200/device.sh MODEL(8b|70b) SWEEP_ARGS...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=$1; shift
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c 'import vllm' 2>/dev/null; then
  t0=$(date +%s)
  for d in .gpu/deps .gpu/p*; do [ -d "$d" ] && bash "$d/stage.sh" >/dev/null; done
  bash "$(ls -d .gpu/*/ | head -1)install.sh"
  echo "INSTALL_S $(( $(date +%s) - t0 ))"
fi
dir=/tmp/models/llama-3.1-$model
[ -f "$dir/tokenizer.json" ] || python3 "$here/make_model_dir.py" "benchmarks/h200/models/llama-3.1-$model.json" "$dir"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
# A server that an earlier, timed-out call left behind holds the GPU and the port.
pkill -f '[e]ntrypoints.cli.main serve' && sleep 10 || true
out=${OUT:-/tmp/out}
mkdir -p "$out"
status=0
python3 "$here/sweep.py" --model-dir "$dir" --served-name "llama-3.1-$model" --out "/tmp/sweep-$model" \
  --results "$out/results-$model.jsonl" "$@" || status=$?
tar -czf "$out/logs-$model.tar.gz" -C /tmp "sweep-$model" 2>/dev/null || true
exit $status
