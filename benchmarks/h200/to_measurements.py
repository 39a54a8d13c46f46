"""Turn sweep.py's --results lines into gpu_measurements.yaml runs (printed as YAML).

Usage: python to_measurements.py RESULTS.jsonl LABEL=FLAGS_FROM ... --source TEXT
  e.g. planner=planner defaults=vllm-defaults mnbt2k=sweep
Configs whose server never became healthy, or that were skipped, are left out.
"""

from __future__ import annotations

import json
import math
import sys

import yaml


def gpu_key(name: str | None) -> str:
    """gpu_measurements.yaml's GPU key from nvidia-smi's name; results written before sweep.py
    recorded the name all came from the lent H200."""
    if name is None or "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100"
    raise SystemExit(f"no GPU key for {name!r}")


def prompts_of(points: list[dict]) -> str:
    """fresh-per-rate when each rate's run had its own dataset seed (bench.py records it since
    rate_seed); results from before then gave every rate one seed and so reused prompts."""
    seeds = [p.get("seed") for p in points]
    if None not in seeds and len(set(seeds)) == len(seeds):
        return "fresh-per-rate"
    return "reused-across-rates"


def run_entry(result: dict, flags_from: str, source: str, read: str) -> dict:
    bench = result["bench"]
    workload = bench["workload"]
    points = []
    for p in bench["points"]:
        if not p.get("completed"):
            continue
        rate = p["request_rate"]
        points.append({
            "request_rate": rate if rate == "inf" else float(rate),
            "num_prompts": p["num_prompts"],
            "output_tokens_per_s": round(p["output_throughput"], 1),
            "requests_per_s": round(p["request_throughput"], 3),
            "goodput_requests_per_s": round(p["request_goodput"], 3),
            "ttft_p95_ms": round(p["latency_ms"]["ttft"]["p95"], 1),
            "tpot_p95_ms": round(p["latency_ms"]["tpot"]["p95"], 2),
            "itl_p95_ms": round(p["latency_ms"]["itl"]["p95"], 2),
            "slo_met": bool(p["slo_met"]),
        })
    pred = bench.get("prediction")
    quant = "fp8" if "--quantization" in result["serve_argv"] else "bf16"
    return {
        "model": result["model"],
        "quantization": quant,
        "gpu": gpu_key(result.get("gpu_name")),
        "tensor_parallel_size": 1,
        "vllm_version": "0.26.0",
        "weights": "dummy",
        "server_flags": {
            "max_num_seqs": result["max_num_seqs"],
            "max_num_batched_tokens": result["max_num_batched_tokens"],
        },
        "flags_from": flags_from,
        "prompts": prompts_of(bench["points"]),
        "workload": {
            "input_tokens": workload["input_tokens"],
            "output_tokens": workload["output_tokens"],
            "ttft_p95_ms": workload["ttft_p95_ms"],
            "itl_p95_ms": workload["itl_p95_ms"],
        },
        "predicted": None if pred is None else {
            "output_tokens_per_s": pred["output_tokens_per_s"],
            "ttft_ms": pred["ttft_ms"],
            "itl_ms": pred["itl_ms"],
        },
        "points": points,
        "source": source,
        "read": read,
    }


def main() -> None:
    if len(sys.argv) < 2 or "--source" not in sys.argv or "--read" not in sys.argv:
        raise SystemExit(f"usage: {sys.argv[0]} RESULTS.jsonl LABEL=FLAGS_FROM... --source TEXT --read DATE")
    path, *rest = sys.argv[1:]
    source = rest[rest.index("--source") + 1]
    read = rest[rest.index("--read") + 1]
    mapping = dict(arg.split("=", 1) for arg in rest if "=" in arg and not arg.startswith("--"))
    runs = []
    with open(path, encoding="utf-8") as lines:
        results = [json.loads(line) for line in lines]
    for result in results:
        if result["label"] in mapping and result.get("bench") and not result.get("error"):
            runs.append(run_entry(result, mapping[result["label"]], source, read))
    print(yaml.safe_dump(runs, sort_keys=False, width=100), end="")
    assert not any(math.isnan(p["output_tokens_per_s"]) for r in runs for p in r["points"])


if __name__ == "__main__":
    main()
