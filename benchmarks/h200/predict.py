"""The planner's prediction for the proof replica: one H200 GPU (TP 1 × PP 1 on p5en.48xlarge's
GPU), or one H100 (p5.48xlarge's) when a fourth argument says h100, the model, quantization and workload given. `vllm-fleet size` cannot return this layout
for a fleet (eight 1-GPU servers per node exceed an ALB's five target groups per node), so this
asks the planner's own steps for it: `evaluate` (memory) then `with_serving` (batch flags and
the calibrated performance model), and prints the same `performance` block as `size --json`,
which `python -m infra.ops.bench --prediction` reads.

  python benchmarks/h200/predict.py llama-3.1-70b fp8 60 > benchmarks/h200/prediction-llama-3.1-70b.json
  python benchmarks/h200/predict.py llama-3.1-8b bf16 40 h100 > benchmarks/h200/prediction-llama-3.1-8b-h100.json
"""

from __future__ import annotations

import json
import sys

from infra.facts.catalog import default_catalog
from infra.facts.workload import Workload
from infra.plan.planner import Layout, SizingRequest, evaluate, performance_json, with_serving

# The proof replica is one GPU of an 8-GPU node: p5en.48xlarge (H200) or p5.48xlarge (H100).
INSTANCES = {"h200": "p5en.48xlarge", "h100": "p5.48xlarge"}


def main(model: str, quantization: str, itl_p95_ms: float, gpu: str = "h200", ttft_p95_ms: float = 2000) -> dict:
    instance = INSTANCES[gpu]
    catalog = default_catalog()
    workload = Workload(1024, 256, ttft_p95_ms, itl_p95_ms)
    req = SizingRequest(model, catalog.models[model], quantization, 8192, 1, (instance,), 1, workload=workload)
    # One server on the node: the per-node server limit (an ALB's) is a fleet rule, not the
    # GPU's, and memory and performance are per GPU (the $ figures are then the whole node's).
    cand = evaluate(req, Layout(instance, 1, 1, 1, 1), catalog)
    if not cand.feasible:
        raise SystemExit(f"{model} {quantization} on one {gpu.upper()}: {cand.reason}")
    cand = with_serving(req, cand, catalog)
    return {
        "model": model, "quantization": quantization, "gpu": gpu, "tensor_parallel_size": 1,
        "max_model_len": 8192, "kv_cache_tokens": cand.kv_cache_tokens,
        "workload": workload.__dict__, "performance": performance_json(cand),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), *sys.argv[4:5]), indent=2))
