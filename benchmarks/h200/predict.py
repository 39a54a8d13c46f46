"""The planner's prediction for the proof replica: one H200 GPU (TP 1 × PP 1 on p5en.48xlarge's
GPU), the model, quantization and workload given. `vllm-fleet size` cannot return this layout
for a fleet (eight 1-GPU servers per node exceed an ALB's five target groups per node), so this
asks the planner's own steps for it: `evaluate` (memory) then `with_serving` (batch flags and
the calibrated performance model), and prints the same `performance` block as `size --json`,
which `python -m infra.ops.bench --prediction` reads.

  python benchmarks/h200/predict.py llama-3.1-70b fp8 60 > benchmarks/h200/prediction-llama-3.1-70b.json
"""

from __future__ import annotations

import json
import sys

from infra.facts.catalog import default_catalog
from infra.facts.workload import Workload
from infra.plan.planner import Layout, SizingRequest, evaluate, performance_json, with_serving

INSTANCE = "p5en.48xlarge"  # 8 × H200; the proof replica is one of its GPUs


def main(model: str, quantization: str, itl_p95_ms: float, ttft_p95_ms: float = 2000) -> dict:
    catalog = default_catalog()
    workload = Workload(1024, 256, ttft_p95_ms, itl_p95_ms)
    req = SizingRequest(model, catalog.models[model], quantization, 8192, 1, (INSTANCE,), 1, workload=workload)
    # One server on the node: the per-node server limit (an ALB's) is a fleet rule, not the
    # GPU's, and memory and performance are per GPU (the $ figures are then the whole node's).
    cand = evaluate(req, Layout(INSTANCE, 1, 1, 1, 1), catalog)
    if not cand.feasible:
        raise SystemExit(f"{model} {quantization} on one H200: {cand.reason}")
    cand = with_serving(req, cand, catalog)
    return {
        "model": model, "quantization": quantization, "gpu": "h200", "tensor_parallel_size": 1,
        "max_model_len": 8192, "kv_cache_tokens": cand.kv_cache_tokens,
        "workload": workload.__dict__, "performance": performance_json(cand),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], float(sys.argv[3])), indent=2))
