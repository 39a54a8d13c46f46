"""Served benchmark of vLLM engine configs on one GPU: `vllm serve` per config, then the
workload's shape offered at a ladder of Poisson request rates by `python -m infra.ops.bench`
(vLLM's own `vllm bench serve` underneath), goodput counted at the SLO. One JSON line per config on stdout and in --results.

Every config runs the same model folder (real config.json, synthetic tokenizer from
make_model_dir.py, dummy weights), the same workload and the same SLO; only
--max-num-seqs / --max-num-batched-tokens differ (absent = vLLM's own default).

Usage:
  python sweep.py --model-dir DIR --served-name NAME [--quantization fp8] \
     --input-len 1024 --output-len 256 --ttft-ms 2000 --itl-ms 40 \
     --rates 18,24,30 --duration-s 15 --max-requests 600 --prediction pred.json \
     --deadline-s 560 --out DIR --results FILE \
     --config planner:256:8192:18/24/30/inf --config defaults:: --config seed:128:
Configs run in the order given; one that would start after --deadline-s is skipped and
reported as skipped (the call must end inside the device's 10-minute limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VLLM = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
PORT = 8011


def parse_config(text: str) -> dict:
    """LABEL:MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS[:RATES]; an empty field is vLLM's default,
    RATES (e.g. 18/24/30/inf) overrides --rates for this config."""
    label, seqs, mnbt, rates = (text.split(":") + ["", "", ""])[:4]
    return {
        "label": label,
        "max_num_seqs": int(seqs) if seqs else None,
        "max_num_batched_tokens": int(mnbt) if mnbt else None,
        "rates": rates.replace("/", ","),
    }


def port_answers() -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
        return True
    except OSError:
        return False


def wait_healthy(proc: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError("vllm serve not healthy in time")


def scrape(name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def log_facts(log: str) -> dict:
    facts: dict = {}
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", log)
    if m:
        facts["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    m = re.search(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", log)
    if m:
        facts["max_concurrency_at_max_model_len"] = float(m.group(2))
    m = re.search(r"max_num_seqs=(\d+)", log)
    if m:
        facts["engine_max_num_seqs"] = int(m.group(1))
    m = re.search(r"max_num_batched_tokens=(\d+)", log)
    if m:
        facts["engine_max_num_batched_tokens"] = int(m.group(1))
    return facts


def run_config(args: argparse.Namespace, config: dict, out: Path) -> dict:
    label = config["label"]
    serve = [
        *VLLM, "serve", args.model_dir, "--served-model-name", args.served_name,
        "--load-format", "dummy", "--max-model-len", str(args.max_model_len),
        "--gpu-memory-utilization", "0.9", "--port", str(PORT), "--host", "127.0.0.1",
        # What the fleet's rendered argv also passes (infra/plan/node/serve_args.py).
        "--enable-prefix-caching", "--dtype", "bfloat16",
    ]
    if args.quantization:
        serve += ["--quantization", args.quantization]
    serve += args.extra_serve_arg
    if config["max_num_seqs"] is not None:
        serve += ["--max-num-seqs", str(config["max_num_seqs"])]
    if config["max_num_batched_tokens"] is not None:
        serve += ["--max-num-batched-tokens", str(config["max_num_batched_tokens"])]
    log_path = out / f"serve-{args.served_name}-{label}.log"
    if port_answers():
        # A server left from an earlier call would answer in this config's place (it happened:
        # results/2026-12-04-call2-8b.jsonl), so refuse rather than measure the wrong server.
        return {"model": args.served_name, **config, "error": f"port {PORT} already serves: stop the old server"}
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"model": args.served_name, **config, "serve_argv": serve[len(VLLM):]}
    try:
        result["launch_to_healthy_s"] = round(wait_healthy(proc, args.start_timeout_s), 1)
        preempt0 = scrape("vllm:num_preemptions_total") or 0.0
        # The load generator is the project's own `vllm-fleet bench` driver (infra/ops/bench.py,
        # stdlib + vLLM only), which runs vLLM's `vllm bench serve` once per offered rate.
        bench_out = out / f"bench-{args.served_name}-{label}"
        bench = [
            sys.executable, "-m", "infra.ops.bench", "--base-url", f"http://127.0.0.1:{PORT}",
            "--model", args.served_name, "--tokenizer", args.model_dir,
            "--input-tokens", str(args.input_len), "--output-tokens", str(args.output_len),
            "--ttft-p95-ms", str(args.ttft_ms), "--itl-p95-ms", str(args.itl_ms),
            "--rates", config["rates"] or args.rates, "--duration-s", str(args.duration_s),
            "--max-requests", str(args.max_requests), "--out", str(bench_out),
        ]
        if args.prediction:
            bench += ["--prediction", args.prediction]
        b0 = time.monotonic()
        done = subprocess.run(bench, check=False, capture_output=True, text=True, timeout=args.bench_timeout_s,
                              cwd=Path(__file__).resolve().parents[2])
        result["bench_wall_s"] = round(time.monotonic() - b0, 1)
        print(done.stdout[-3000:], flush=True)
        if done.returncode != 0:
            result["error"] = "bench failed: " + (done.stdout + done.stderr)[-800:]
        else:
            result["bench"] = json.loads((bench_out / "bench.json").read_text())
        result["preemptions"] = (scrape("vllm:num_preemptions_total") or 0.0) - preempt0
    except Exception as exc:  # noqa: BLE001 - one config failing must not lose the others
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result.update(log_facts(log_path.read_text(errors="replace")))
    result["config_wall_s"] = round(time.monotonic() - t0, 1)
    if "error" in result:
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return result


def summary(result: dict) -> dict:
    """The few numbers worth a line of stdout; the whole result goes to --results."""
    keep = {k: result[k] for k in ("model", "label", "max_num_seqs", "max_num_batched_tokens",
                                   "launch_to_healthy_s", "kv_cache_tokens", "preemptions",
                                   "config_wall_s", "skipped", "error") if k in result}
    bench = result.get("bench") or {}
    keep["best_goodput_rps"] = bench.get("best_goodput_requests_per_s")
    keep["points"] = [
        [p["request_rate"], round(p["request_goodput"], 2), round(p["output_throughput"]),
         round(p["latency_ms"]["ttft"]["p95"]), round(p["latency_ms"]["tpot"]["p95"], 1)]
        for p in bench.get("points", []) if p.get("completed")
    ]
    keep["vs_prediction"] = bench.get("prediction_vs_measurement")
    return keep


def gpu_model_name() -> str | None:
    """The GPU the results come from (the lent machine may be an H200 or an H100)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.stdout.strip() else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--served-name", required=True)
    p.add_argument("--quantization")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--input-len", type=int, required=True)
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--rates", required=True, help="offered request rates, e.g. 18,24,30")
    p.add_argument("--duration-s", type=float, required=True, help="offered load per rate")
    p.add_argument("--max-requests", type=int, required=True, help="most requests per rate (and for inf)")
    p.add_argument("--prediction", help="the planner's `size --json` for this model, to compare")
    p.add_argument("--ttft-ms", type=float, required=True)
    p.add_argument("--itl-ms", type=float, required=True)
    p.add_argument("--deadline-s", type=float, required=True, help="skip configs that would start after this")
    p.add_argument("--min-left-s", type=float, default=120, help="a config needs at least this much time")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--bench-timeout-s", type=float, default=400)
    p.add_argument("--extra-serve-arg", action="append", default=[], help="e.g. CPU-only flags in a local dry run")
    p.add_argument("--config", action="append", required=True, type=parse_config)
    p.add_argument("--out", required=True, help="folder for the server logs and vLLM's result files")
    p.add_argument("--results", required=True, help="JSON lines, one per config, appended as each ends")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    gpu_name = gpu_model_name()
    for config in args.config:
        if time.monotonic() - start > args.deadline_s - args.min_left_s:
            result = {"model": args.served_name, **config, "skipped": "device time"}
        else:
            result = run_config(args, config, out)
        result["gpu_name"] = gpu_name
        with Path(args.results).open("a") as f:
            f.write(json.dumps(result) + "\n")
        print("SWEEP " + json.dumps(summary(result)), flush=True)


if __name__ == "__main__":
    main()
