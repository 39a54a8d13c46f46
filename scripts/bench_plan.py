#!/usr/bin/env python3
"""Benchmark: prints numbers, asserts nothing (targets live in the README, not in tests).

1. Cold `vllm-fleet plan prod-405b` wall time: a fresh process each run, as CI and
   reviewers run it (imports, vLLM's parser for argv validation, rendering, mocks).
2. The planner alone over the whole catalog: every model × quantization × context length
   against every instance type, in one warm process, by memory alone.
3. The performance model's cost: each fleet stack's sizing with aiconfigurator-core, first
   (engines compiled) and again (cached), in one process.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.config import load_stack_file, stack_names
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.plan.planner import SizingRequest, make_plan
from infra.plan.stack import sizing_request

CONTEXTS = (2048, 8192, 32768)
CONCURRENCY = 16


def cold_plan_seconds(stack: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "infra", "plan", stack, "--out", out, "--json"],
                cwd=ROOT, check=True, capture_output=True,
            )
            times.append(time.perf_counter() - start)
    return times


def catalog_sweep() -> tuple[int, int, float]:
    catalog = default_catalog()
    plans = infeasible = 0
    start = time.perf_counter()
    for name, arch in catalog.models.items():
        for quant in catalog.quantizations:
            for length in CONTEXTS:
                if length > arch.max_position_embeddings:
                    continue
                try:
                    make_plan(SizingRequest(name, arch, quant, length, CONCURRENCY, performance_model=False))
                    plans += 1
                except FleetError:
                    infeasible += 1
    return plans, infeasible, time.perf_counter() - start


def stack_sizing_seconds() -> list[tuple[str, float, float]]:
    rows = []
    for stack in stack_names("fleet"):
        req = sizing_request(load_stack_file(stack))
        start = time.perf_counter()
        make_plan(req)
        first = time.perf_counter() - start
        start = time.perf_counter()
        make_plan(req)
        rows.append((stack, first, time.perf_counter() - start))
    return rows


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    times = cold_plan_seconds("prod-405b", runs)
    print(f"cold `vllm-fleet plan prod-405b`: median {statistics.median(times):.2f} s, "
          f"min {min(times):.2f} s, max {max(times):.2f} s over {runs} runs")
    plans, infeasible, seconds = catalog_sweep()
    total = plans + infeasible
    catalog = default_catalog()
    print(f"planner sweep: {total} requests ({plans} planned, {infeasible} infeasible) over "
          f"{len(catalog.instances)} instance types in {seconds:.2f} s "
          f"= {1000 * seconds / total:.1f} ms per request")
    for stack, first, again in stack_sizing_seconds():
        print(f"sizing {stack} with the performance model: {first:.1f} s first, {again:.2f} s again")


if __name__ == "__main__":
    main()
