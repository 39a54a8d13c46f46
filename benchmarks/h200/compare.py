"""Compare the configs of sweep.py's --results files: each config's goodput at the SLO and the
share of requests within it per offered rate, the planner against each other config over the
rates both ran (vLLM's per-run goodput, and DistServe's: the highest rate with 90 % of the
requests in SLO), and the planner's saturated tokens/s against its prediction.

Usage: python benchmarks/h200/compare.py RESULTS.jsonl [RESULTS.jsonl ...]
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from infra.ops.bench import ATTAINMENT_GOAL, BenchResult


def merged(paths: list[str]) -> dict[str, list[dict]]:
    """Results per model, one per (label, flags): a config run again in a later call (other rates,
    or the same rate again) adds its points to the earlier ones; the later measurement of a rate wins."""
    by_config: dict[tuple, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                result = json.loads(line)
                if not result.get("bench") or result.get("error"):
                    continue
                key = (result["model"], result["label"], result["max_num_seqs"], result["max_num_batched_tokens"])
                if key not in by_config:
                    by_config[key] = result
                    continue
                earlier = by_config[key]
                points = {p["request_rate"]: p for p in earlier["bench"]["points"]}
                points.update({p["request_rate"]: p for p in result["bench"]["points"]})
                later = dict(result, bench=dict(result["bench"], points=list(points.values())))
                if not later["bench"].get("prediction_vs_measurement"):
                    later["bench"]["prediction_vs_measurement"] = earlier["bench"].get("prediction_vs_measurement")
                by_config[key] = later
    by_model: dict[str, list[dict]] = defaultdict(list)
    for (model, *_), result in by_config.items():
        by_model[model].append(result)
    return by_model


def offered(result: dict) -> BenchResult:
    """A config's sweep with only its completed points at a finite offered rate."""
    bench = BenchResult.from_json(result["bench"])
    return replace(bench, points=[p for p in bench.points if p.completed and not math.isinf(p.request_rate)])


def over(bench: BenchResult, rates: set[float]) -> BenchResult:
    return replace(bench, points=[p for p in bench.points if p.request_rate in rates])


def main(paths: list[str]) -> None:
    for model, results in merged(paths).items():
        print(f"{model}: goodput (req/s) at the SLO, and the share of requests in SLO, per offered rate")
        # One entry per config; two calls may have run one label with different flags.
        sweeps = [offered(r) for r in results]
        for r, bench in zip(results, sweeps, strict=True):
            cells = ", ".join(
                f"{p.request_rate:g}: {p.request_goodput:.2f} {p.slo_attainment:.0%}"
                f"{'' if p.slo_met(bench.workload) else ' (p95 missed)'}"
                for p in sorted(bench.points, key=lambda p: p.request_rate)
            )
            flags = f"{r['max_num_seqs'] or 'default'}/{r['max_num_batched_tokens'] or 'default'}"
            print(f"  {r['label']:<10} {flags:<17} [{cells}]")
        planner = next((i for i, r in enumerate(results) if r["label"] == "planner"), None)
        if planner is None:
            continue
        # Each config against the planner over the rates both ran: a best goodput is only
        # comparable over the same ladder, and calls ran different ladders.
        shares = []
        ours = sweeps[planner]
        for i, (r, theirs) in enumerate(zip(results, sweeps, strict=True)):
            if i == planner:
                continue
            common = {p.request_rate for p in ours.points} & {p.request_rate for p in theirs.points}
            if not common:
                print(f"  planner vs {r['label']}: no offered rate both ran")
                continue
            mine, their = over(ours, common), over(theirs, common)
            best_mine, best_their = mine.best_goodput, their.best_goodput
            assert best_mine and best_their
            share = best_mine.request_goodput / best_their.request_goodput
            shares.append((share, r["label"]))
            print(f"  planner vs {r['label']:<9} over {sorted(common)}: {best_mine.request_goodput:.2f} "
                  f"vs {best_their.request_goodput:.2f} ({share:.1%})")
            print(f"  {'':<21} goodput at {ATTAINMENT_GOAL:.0%} in SLO: {mine.goodput_at_attainment()} vs "
                  f"{their.goodput_at_attainment()} req/s offered")
        if shares:
            share, label = min(shares)
            print(f"  planner's lowest share: {share:.1%} (of {label})")
        cmp = results[planner]["bench"].get("prediction_vs_measurement")
        if cmp and cmp["at_request_rate"] in ("inf", float("inf")):
            print(f"  planner saturated: {cmp['measured_output_tokens_per_s']:,.0f} tok/s measured vs "
                  f"{cmp['predicted_output_tokens_per_s']:,.0f} predicted ({cmp['output_tokens_per_s_error']:+.1%})")


if __name__ == "__main__":
    main(sys.argv[1:])
