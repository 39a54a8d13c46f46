"""The issue #15 proof on a GPU machine: serve one model under several batch settings (the
planner's flags, vLLM's own defaults, a sweep of --max-num-seqs), run the same rate sweep
against each with infra/ops/bench.py, and judge the planner's flags against the best.

A benchmark script, not a test: it prints numbers and writes JSON. It needs only vLLM and
the standard library (matplotlib for the PNGs if present), like infra/ops/bench.py:

    PYTHONPATH=. python scripts/gpu_bench_proof.py \\
      --model-dir ../shared/tools/gpu-vllm/models/llama-3.1-8b --served-name llama-3.1-8b \\
      --tokenizer TOKDIR --prediction pred-8b.json --rates 5,10,15,20,25,30,inf \\
      --configs planner=256:8192 defaults=: seqs128=128:8192 seqs512=512:8192 \\
      --serve-arg=--load-format=dummy --serve-arg=--max-model-len=8192 --out $OUT/proof-8b

``NAME=SEQS:TOKENS`` runs ``vllm serve`` with ``--max-num-seqs SEQS --max-num-batched-tokens
TOKENS``; an empty side leaves that flag to vLLM. The SLO comes from the prediction file's
``workload`` block (``vllm-fleet size ... --json``), or from --ttft-p95-ms/--itl-p95-ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The repo root is put on the path just above, so this import comes after it.
from infra.ops.bench import (
    BenchResult,
    Prediction,
    parse_rates,
    run_sweep,
    table_text,
    write_outputs,
)
from infra.workload import Workload

HEALTH_TIMEOUT_S = 1200


def parse_config(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    seqs, _, tokens = flags.partition(":")
    extra: list[str] = []
    if seqs:
        extra += ["--max-num-seqs", seqs]
    if tokens:
        extra += ["--max-num-batched-tokens", tokens]
    if not name:
        raise ValueError(f"--configs {text!r}: expected NAME=SEQS:TOKENS")
    return name, extra


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < HEALTH_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}; log tail:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vllm serve not healthy after {HEALTH_TIMEOUT_S} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(name: str, flags: list[str], result: BenchResult) -> dict[str, object]:
    best = result.best_goodput
    sat = result.saturated
    return {
        "config": name,
        "flags": flags,
        "best_goodput_requests_per_s": round(best.request_goodput, 3) if best else 0.0,
        "best_goodput_at_rate": (("inf" if math.isinf(best.request_rate) else best.request_rate) if best else None),
        "saturated_output_tokens_per_s": round(sat.output_throughput, 1) if sat else 0.0,
        "prediction_vs_measurement": result.comparison(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--served-name", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prediction", type=Path, help="`vllm-fleet size ... --json` output")
    parser.add_argument("--configs", nargs="+", required=True, help="NAME=SEQS:TOKENS; the first named 'planner' is judged")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vllm serve` argument (repeat)")
    parser.add_argument("--rates", default="1,2,4,8,inf")
    parser.add_argument("--input-tokens", type=int)
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--ttft-p95-ms", type=float)
    parser.add_argument("--itl-p95-ms", type=float)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=1500)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    doc = json.loads(args.prediction.read_text()) if args.prediction else {}
    wl = doc.get("workload", {})
    perf = doc.get("performance") or {}
    workload = Workload(
        args.input_tokens or wl.get("input_tokens"), args.output_tokens or wl.get("output_tokens"),
        args.ttft_p95_ms or wl.get("ttft_p95_ms"), args.itl_p95_ms or wl.get("itl_p95_ms"),
    )
    if None in (workload.input_tokens, workload.output_tokens, workload.ttft_p95_ms, workload.itl_p95_ms):
        parser.error("give --prediction with a workload block, or all of --input/--output-tokens, --ttft/--itl-p95-ms")
    prediction = Prediction(
        perf["max_num_seqs"], perf["output_tokens_per_s"], perf["requests_per_s"], perf["ttft_ms"], perf["itl_ms"]
    ) if perf.get("predicted") else None
    rates = parse_rates(args.rates)
    base_url = f"http://127.0.0.1:{args.port}"
    summaries = []
    for text in args.configs:
        name, flags = parse_config(text)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        log = out / "vllm-serve.log"
        argv = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model_dir,
            "--served-model-name", args.served_name, "--tokenizer", args.tokenizer, "--port", str(args.port),
            *flags, *args.serve_arg,
        ]
        print(f"== {name}: {' '.join(argv[3:])}", flush=True)
        with log.open("wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=os.environ)
        try:
            ready_s = wait_healthy(base_url, proc, log)
            print(f"   healthy after {ready_s:.0f} s", flush=True)
            result = run_sweep(
                base_url=base_url, model=args.served_name, tokenizer=args.tokenizer, workload=workload,
                rates=rates, out_dir=out, duration_s=args.duration_s, max_requests=args.max_requests,
                prediction=prediction if name == "planner" else None,
            )
        finally:
            stop(proc)
        write_outputs(result, out)
        print(table_text(result), flush=True)
        summaries.append(summarize(name, flags, result))

    best = max(summaries, key=lambda s: float(s["best_goodput_requests_per_s"]))  # type: ignore[arg-type]
    planner = next((s for s in summaries if s["config"] == "planner"), None)
    defaults = next((s for s in summaries if s["config"] == "defaults"), None)
    verdict: dict[str, object] = {"workload": workload.__dict__, "configs": summaries, "best": best["config"]}
    if planner is not None:
        mine = float(planner["best_goodput_requests_per_s"])  # type: ignore[arg-type]
        top = float(best["best_goodput_requests_per_s"])  # type: ignore[arg-type]
        verdict["planner_share_of_best_goodput"] = round(mine / top, 4) if top else None
        if defaults is not None:
            verdict["planner_at_least_defaults"] = mine >= float(defaults["best_goodput_requests_per_s"])  # type: ignore[arg-type]
    (args.out / "proof.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(json.dumps(verdict, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
