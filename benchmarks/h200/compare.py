"""Compare the configs of sweep.py's --results files: each config's best goodput at the SLO over
the rates they all ran, the planner's share of the best and of vLLM's defaults, and the
planner's saturated tokens/s against its prediction.

Usage: python benchmarks/h200/compare.py RESULTS.jsonl [RESULTS.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


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


def main(paths: list[str]) -> None:
    for model, results in merged(paths).items():
        # Only rates every config ran count, so each best goodput is over the same ladder.
        common = set.intersection(*(
            {p["request_rate"] for p in r["bench"]["points"] if p.get("completed") and p["request_rate"] != "inf"}
            for r in results
        ))
        print(f"{model}: best goodput (req/s) at the SLO over offered rates {sorted(common)}")
        if not common:
            print("  no offered rate that every config ran")
            continue
        best: dict[str, float] = {}
        for r in results:
            points = [p for p in r["bench"]["points"] if p["request_rate"] in common]
            good = max(points, key=lambda p: p["request_goodput"])
            best[r["label"]] = good["request_goodput"]
            cells = ", ".join(
                f"{p['request_rate']:g}: {p['request_goodput']:.2f}{'' if p['slo_met'] else ' (SLO missed)'}"
                for p in sorted(points, key=lambda p: p["request_rate"])
            )
            flags = f"{r['max_num_seqs'] or 'default'}/{r['max_num_batched_tokens'] or 'default'}"
            print(f"  {r['label']:<10} {flags:<17} best {good['request_goodput']:.2f} at {good['request_rate']:g}  [{cells}]")
        top = max(best.values())
        if "planner" in best:
            line = f"  planner: {best['planner'] / top:.1%} of the best"
            if "defaults" in best:
                line += f", {best['planner'] / best['defaults']:.1%} of vLLM's defaults"
            print(line)
        for r in results:
            cmp = r["bench"].get("prediction_vs_measurement")
            if r["label"] == "planner" and cmp and cmp["at_request_rate"] in ("inf", float("inf")):
                print(f"  planner saturated: {cmp['measured_output_tokens_per_s']:,.0f} tok/s measured vs "
                      f"{cmp['predicted_output_tokens_per_s']:,.0f} predicted ({cmp['output_tokens_per_s_error']:+.1%})")


if __name__ == "__main__":
    main(sys.argv[1:])
