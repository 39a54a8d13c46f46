"""`vllm-fleet bench` / `python -m infra.ops.bench` against the session's real CPU vLLM server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.facts.workload import Workload
from infra.ops.bench import (
    BenchResult,
    Prediction,
    RatePoint,
    bench_serve_argv,
    parse_rates,
    prompts_for_rate,
    rate_seed,
    run_sweep,
    table_text,
    write_outputs,
)
from tests.support.vllm_server import VllmServer

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("pulumi", "typer", "rich", "boto3", "pydantic", "yaml", "jinja2", "aiconfigurator_core")


def test_bench_module_imports_only_the_standard_library() -> None:
    """The lead runs it on a GPU machine that has vLLM and nothing else of ours."""
    code = (
        "import sys, infra.ops.bench; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == ""


def test_rates_and_request_bounds() -> None:
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError, match="must be positive"):
        parse_rates("0")
    assert prompts_for_rate(2.0, 30, 1000, 10) == 60
    assert prompts_for_rate(0.1, 30, 1000, 10) == 10
    assert prompts_for_rate(math.inf, 30, 500, 10) == 500


def _point(rate: float, completed: int, in_slo: int, duration_s: float) -> RatePoint:
    """A rate's result as vLLM reports it: throughput and goodput both over the run's duration."""
    return RatePoint(rate, completed, completed=completed, duration_s=duration_s,
                     request_throughput=completed / duration_s, request_goodput=in_slo / duration_s)


def test_goodput_at_attainment_is_the_highest_rate_with_90_percent_in_slo() -> None:
    """DistServe's goodput, on the H200's 70B fp8 run (2026-12-06): the planner kept 61 of 66
    requests in SLO at 5.5 req/s and drained its queue later; vLLM's defaults kept 57 of 66 and
    finished sooner, so vLLM's per-run goodput ranks them the other way round."""
    work = Workload(1024, 256, 2000, 60)
    planner = BenchResult("u", "m", work, None, [_point(4, 48, 48, 19.4), _point(5.5, 66, 61, 22.8),
                                                  _point(7, 84, 59, 26.1), _point(math.inf, 140, 9, 37.3)])
    defaults = BenchResult("u", "m", work, None, [_point(4, 48, 48, 19.4), _point(5.5, 66, 57, 20.8),
                                                   _point(7, 84, 52, 21.3), _point(math.inf, 140, 0, 31.7)])
    assert planner.points[1].slo_attainment == pytest.approx(61 / 66)
    assert (planner.goodput_at_attainment(), defaults.goodput_at_attainment()) == (5.5, 4)
    assert planner.points[1].request_goodput < defaults.points[1].request_goodput
    # Every lower rate must attain it too; a sweep whose first rate misses has none.
    assert BenchResult("u", "m", work, None, [_point(1, 10, 5, 5), _point(2, 10, 10, 5)]).goodput_at_attainment() is None
    assert planner.goodput_at_attainment(goal=0.95) == 4
    # A rate that failed outright has no attainment.
    assert RatePoint(3.0, 10, error="refused").slo_attainment is None


def test_a_result_reads_back_from_its_json() -> None:
    work = Workload(1024, 256, 2000, 60)
    lat = {m: {"p50": 1.0, "p95": 2.0, "p99": 3.0, "mean": 1.5} for m in ("ttft", "tpot", "itl", "e2el")}
    result = BenchResult("http://x", "m", work, 8, [_point(4, 48, 40, 20), _point(math.inf, 100, 0, 30)],
                         Prediction(64, 1000.0, 3.9, 1600.0, 57.0))
    for p in result.points:
        p.latency_ms = lat
    doc = json.loads(json.dumps(result.to_json()))
    back = BenchResult.from_json(doc)
    assert back.to_json() == doc
    assert doc["points"][0]["slo_attainment"] == pytest.approx(40 / 48, abs=1e-4)
    # A bench.json written before slo_attainment existed (results/2026-12-04-*.jsonl) still reads.
    for p in doc["points"]:
        del p["slo_attainment"]
    assert BenchResult.from_json(doc).points[0].slo_attainment == pytest.approx(40 / 48)


def _dataset_prompts(argv: list[str]) -> list[str]:
    """The prompts `vllm bench serve ARGV` sends: vLLM's own parser, tokenizer and dataset code
    (vllm/benchmarks/serve.py main builds input_requests the same way)."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    return [r.prompt for r in get_samples(args, get_tokenizer(args.tokenizer))]


def test_no_rate_of_a_sweep_resends_an_earlier_rates_prompts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Each run starts with the same random dataset when the seed is shared, so a later rate's
    prefills would come from the server's prefix cache (measured on the H100: 48% hits at
    the third rate). The prompts are what vLLM's dataset code builds from the argv we pass."""
    workload = Workload(input_tokens=64, output_tokens=8, ttft_p95_ms=1000, itl_p95_ms=100)

    def prompts(rate: float, num_prompts: int, seed: int) -> list[str]:
        return _dataset_prompts(bench_serve_argv(
            base_url="http://127.0.0.1:1", model="m", tokenizer=str(tiny_llama_dir), workload=workload,
            rate=rate, num_prompts=num_prompts, max_concurrency=None, result_dir=tmp_path,
            result_filename="r.json", seed=seed,
        ))

    def heads(texts: list[str]) -> list[str]:
        # What a prefix cache matches: the start (vLLM may trim a prompt's tail to fit its length).
        return [t[:24] for t in texts]

    first, second = heads(prompts(2.0, 6, rate_seed(0, 0))), heads(prompts(4.0, 12, rate_seed(0, 1)))
    assert len(first) == 6 and len(second) == 12
    # Each prompt is a run of token ids from a random offset: two runs share a prompt only when
    # two offsets coincide, which this tiny tokenizer's few hundred ids allow now and then
    # (Llama 3's 128,256 do not).
    assert second[:6] != first and len(set(first) & set(second)) <= 2
    # The mechanism, shown with one seed for both: the longer run opens with the shorter's prompts.
    assert heads(prompts(4.0, 12, rate_seed(0, 0)))[:6] == first


def test_sweep_against_the_cpu_vllm(vllm_server: VllmServer, tiny_llama_dir: Path, tmp_path: Path) -> None:
    workload = Workload(input_tokens=32, output_tokens=16, ttft_p95_ms=5000, itl_p95_ms=500)
    prediction = Prediction(max_num_seqs=4, output_tokens_per_s=100.0, requests_per_s=6.0, ttft_ms=200.0, itl_ms=20.0)
    result = run_sweep(
        base_url=vllm_server.base_url, model=vllm_server.served_model_name, tokenizer=str(tiny_llama_dir),
        workload=workload, rates=[2.0, math.inf], out_dir=tmp_path, duration_s=3, max_requests=8,
        min_requests=4, max_concurrency=4, api_key=vllm_server.api_key, prediction=prediction,
    )
    assert [p.error for p in result.points] == [None, None]
    low, high = result.points
    assert (low.num_prompts, high.num_prompts) == (6, 8)
    assert (low.seed, high.seed) == (0, 1)
    for point in result.points:
        assert point.completed == point.num_prompts and point.failed == 0
        assert point.output_throughput > 0
        # Every request produced exactly output_tokens tokens (ignore_eos).
        assert point.output_throughput * point.duration_s == pytest.approx(point.completed * 16, rel=0.01)
        assert 0 <= point.request_goodput <= point.request_throughput + 1e-9
        lat = point.latency_ms
        assert 0 < lat["ttft"]["p50"] <= lat["ttft"]["p95"] <= lat["ttft"]["p99"]
        assert 0 < lat["itl"]["p50"] <= lat["itl"]["p95"] <= lat["itl"]["p99"]
        assert lat["e2el"]["p50"] >= lat["ttft"]["p50"]
    comparison = result.comparison()
    assert comparison is not None and comparison["at_request_rate"] == math.inf
    assert comparison["measured_output_tokens_per_s"] == round(high.output_throughput, 1)
    written = write_outputs(result, tmp_path)
    doc = json.loads(written["json"].read_text())
    assert [p["request_rate"] for p in doc["points"]] == [2.0, "inf"]
    assert doc["prediction_vs_measurement"]["predicted_output_tokens_per_s"] == 100.0
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = table_text(result)
    assert "SLO: TTFT p95 ≤ 5000 ms" in table and "predicted 100 tok/s" in table
    for point, written_point in zip(result.points, doc["points"], strict=True):
        assert written_point["slo_attainment"] == pytest.approx(point.request_goodput / point.request_throughput, abs=1e-4)
    assert doc["goodput_at_attainment_requests_per_s"] == result.goodput_at_attainment()
    assert "goodput at 90% in SLO (DistServe's): " in table


def test_a_worker_that_dies_is_replaced_for_the_next_rate(
    vllm_server: VllmServer, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The worker interpreter serves every rate; one that dies (a crash, the OOM killer) fails its
    own rate only. The interpreter given is a wrapper whose first start exits 3, as a worker that
    died would, and whose later starts are the real Python."""
    marker = tmp_path / "started-once"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\n[ -e {marker} ] || {{ touch {marker}; exit 3; }}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    workload = Workload(input_tokens=32, output_tokens=16, ttft_p95_ms=5000, itl_p95_ms=500)
    result = run_sweep(
        base_url=vllm_server.base_url, model=vllm_server.served_model_name, tokenizer=str(tiny_llama_dir),
        workload=workload, rates=[math.inf, math.inf], out_dir=tmp_path / "out", duration_s=2, max_requests=4,
        min_requests=4, api_key=vllm_server.api_key, python=str(wrapper),
    )
    first, second = result.points
    assert first.error is not None and first.error.startswith("vllm bench serve exited 3")
    assert second.error is None and second.completed == 4


def test_vllm_fleet_bench_uses_the_stacks_workload_and_prediction(
    vllm_server: VllmServer, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """`vllm-fleet bench dev-8b` against the session's server (which runs dev-8b's argv):
    the stack's SLO and served name, shorter requests so a CPU finishes them."""
    run = subprocess.run(
        [sys.executable, "-m", "infra", "bench", "dev-8b", "--url", vllm_server.openai_base_url,
         "--tokenizer", str(tiny_llama_dir), "--key-env", "BENCH_KEY", "--rates", "inf", "--max-requests", "4",
         "--duration-s", "5", "--input-tokens", "24", "--output-tokens", "8", "--out", str(tmp_path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "BENCH_KEY": vllm_server.api_key, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["model"] == vllm_server.served_model_name
    assert doc["workload"]["ttft_p95_ms"] == 1000 and doc["workload"]["itl_p95_ms"] == 50
    assert doc["points"][0]["completed"] == 4
    assert doc["prediction"]["output_tokens_per_s"] > 0  # the plan's g6e.xlarge prediction
    assert doc["prediction_vs_measurement"]["measured_output_tokens_per_s"] > 0
    assert (tmp_path / "bench.png").is_file() and (tmp_path / "bench.txt").is_file()


def _compare(*names: str) -> str:
    results = [str(REPO / "benchmarks/h200/results" / n) for n in names]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/h200/compare.py"), *results],
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_compare_ranks_the_h200_campaign_by_both_goodputs() -> None:
    """The README's H200 claims, from the raw files: by vLLM's per-run goodput the planner is
    at 97.9 % / 98.0 % of vLLM's defaults; by DistServe's it is at or above them."""
    out = _compare("2026-12-06-call5-h200-70b.jsonl", "2026-12-06-call6-h200-8b.jsonl")
    assert "planner vs defaults  over [4.0, 5.5, 7.0]: 2.68 vs 2.74 (97.9%)" in out
    assert "planner vs defaults  over [25.0, 31.0, 37.0]: 22.37 vs 22.82 (98.0%)" in out
    goodputs = [line.split("in SLO: ")[1] for line in out.splitlines() if "goodput at 90% in SLO" in line]
    assert goodputs == ["5.5 vs 4.0 req/s offered", "31.0 vs 31.0 req/s offered", "31.0 vs 25.0 req/s offered"]
    assert "5.5: 2.68 92%, 7: 2.26 70% (p95 missed)" in out


def test_compare_keeps_one_label_run_with_different_flags_apart() -> None:
    """Calls of 2026-12-04 and 05 ran the planner at 256 (H200) and 240 (H100) sequences."""
    out = _compare("2026-12-04-call1-8b.jsonl", "2026-12-04-call2-8b.jsonl", "2026-12-05-call1-h100-8b.jsonl")
    assert "planner    256/8192" in out and "planner    240/8192" in out
    assert "planner vs planner   over [38.0]" in out
