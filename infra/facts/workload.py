"""What requests look like and what their users must get: the one type the planner
(infra/plan/perf.py) and the load generator's driver (infra/ops/bench.py) share.

Standard library only: the bench driver runs on machines that have vLLM and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """A stack's `vllm-fleet:workload`, resolved (infra/config.py StackConfig.resolved_workload)."""

    input_tokens: int
    output_tokens: int
    ttft_p95_ms: float
    itl_p95_ms: float
    peak_requests_per_s: float | None = None
    concurrent_users: int | None = None  # requests in flight at peak, each waiting for its answer
