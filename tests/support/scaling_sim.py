"""A replay of AWS target tracking (and the burst step policy) against a load trace, for the
scaling tests and the simulation figure (docs/scaling-simulation.png). Test-only: the fleet never
runs it; it checks ``infra.plan.scaling.scaling_policy_spec`` against AWS's documented semantics."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from infra.errors import FleetError
from infra.facts.scaling import scaling_facts
from infra.plan.scaling import ScalingPolicySpec


@dataclass(frozen=True)
class Workload:
    """How long one request holds a batch slot, and the first-token time of an idle replica."""

    service_time_s: float
    idle_ttft_s: float


@dataclass
class SimulationResult:
    step_s: float
    t_s: list[float]
    arrivals_per_s: list[float]
    desired: list[int]
    in_service: list[int]  # instances in the group (launching, serving or draining)
    serving: list[int]
    waiting: list[float]
    running: list[float]
    ttft_s: list[float]
    decisions: list[tuple[float, str, int, int]]  # (t, policy, desired before, desired after)
    launches: list[tuple[float, float]]  # (decided at, serving from)
    terminations: list[tuple[float, float]]  # (decided at, terminated at)


def simulate(
    spec: ScalingPolicySpec,
    arrivals_per_s: Sequence[float],
    workload: Workload,
    *,
    step_s: float = 10.0,
    protection: bool = True,
    release_after_s: float | None | Literal["policy"] = "policy",
    seed: int = 7,
) -> SimulationResult:
    """Replay ``arrivals_per_s`` (one value per step) through the fleet and its policies.

    The fleet is a fluid queue: ``serving × batch`` slots, each request holds one for
    ``service_time_s``; the rest wait. What AWS does, as documented (infra/facts/data/scaling.yaml):
    one-minute datapoints of the tracked value averaged over serving replicas; the high alarm
    after ``scale_out_datapoints`` datapoints above the set point, re-evaluated every minute
    while it holds, sets desired = ceil(capacity × metric / set point) where capacity leaves out
    instances still in their warm-up; the low alarm after ``scale_in_datapoints`` datapoints below
    ``scale_in_fraction`` × set point sets the same formula (counting terminating instances);
    the burst step policy adds its percentage of the capacity after one datapoint. A launched
    instance serves after the plan's time to ready. With ``protection``, a node picked for
    scale-in stops only once the node-side check finds it idle (Poisson in-flight count,
    seeded), as instance scale-in protection makes AWS wait, or once the scale-in has waited
    ``release_after_s`` (the node script's release; None: never).
    """
    if spec.shape != "target-tracking":
        raise FleetError(f"simulate: the {spec.shape} shape is not simulated (target tracking only)")
    rng = random.Random(seed)
    design = scaling_facts().policy
    release_after = design.protection_release_after_s if release_after_s == "policy" else release_after_s
    per_minute = round(60 / step_s)
    batch = spec.batch_per_instance
    ttr, warmup = spec.time_to_ready_s, spec.instance_warmup_s
    # Each instance: launch time (None for the initial ones), ready time.
    instances: list[dict[str, float]] = [{"launched": -1e9, "ready": -1e9} for _ in range(spec.min_instances)]
    pending_termination = 0
    desired = spec.min_instances
    in_system = 0.0
    res = SimulationResult(step_s, [], list(arrivals_per_s), [], [], [], [], [], [], [], [], [])
    minute_metric: list[float] = []
    minute_waiting: list[float] = []
    samples_metric: list[float] = []
    samples_waiting: list[float] = []
    termination_requests: list[float] = []
    for i, lam in enumerate(arrivals_per_s):
        t = i * step_s
        serving = [x for x in instances if x["ready"] <= t]
        slots = len(serving) * batch
        # Fluid queue: dN/dt = arrivals - min(N, slots) / service time, in 1 s sub-steps.
        substeps = max(1, round(step_s))
        dt = step_s / substeps
        for _ in range(substeps):
            in_system += lam * dt
            in_system -= min(in_system, slots) * (1 - math.exp(-dt / workload.service_time_s))
        running = min(in_system, slots)
        waiting = in_system - running
        throughput = running / workload.service_time_s
        ttft = workload.idle_ttft_s + (waiting / throughput if throughput > 0 else (math.inf if waiting > 0 else 0.0))
        if serving:
            if spec.metric == "waiting-requests":
                samples_metric.append(in_system / len(serving))
            else:
                # KV use ~ running share of the slots (the plan sizes KV for a full batch).
                samples_metric.append(running / slots * 1.0)
            samples_waiting.append(waiting / len(serving))
        # Scale-in protection: drop nodes picked for termination once one is found idle.
        if pending_termination and len(serving) > 0:
            per_node = in_system / len(serving)
            checks = step_s / design.protection_interval_s
            p_idle_step = 1 - (1 - math.exp(-per_node)) ** checks if protection else 1.0
            # Past the release time every busy node lets go, and AWS takes one at once.
            released = release_after is not None and t - termination_requests[0] >= release_after
            while pending_termination and serving and (released or rng.random() < p_idle_step):
                victim = max(serving, key=lambda x: x["launched"])
                instances.remove(victim)
                serving.remove(victim)
                pending_termination -= 1
                res.terminations.append((termination_requests.pop(0), t))
        # Policies run on whole minutes.
        if (i + 1) % per_minute == 0:
            if samples_metric:
                minute_metric.append(sum(samples_metric) / len(samples_metric))
                minute_waiting.append(sum(samples_waiting) / len(samples_waiting))
            samples_metric, samples_waiting = [], []
            warm = [x for x in instances if t - x["launched"] >= warmup]
            capacity_out = len(warm) if warm else len(serving)
            before = desired
            wanted = desired
            high = minute_metric[-spec.scale_out_datapoints:]
            if len(high) == spec.scale_out_datapoints and all(m > spec.setpoint for m in high):
                wanted = max(wanted, math.ceil(capacity_out * minute_metric[-1] / spec.setpoint))
                policy = "target-tracking-out"
            else:
                policy = ""
            if minute_waiting and minute_waiting[-1] >= spec.burst_threshold:
                step = [s for s in spec.burst_steps if minute_waiting[-1] >= s.lower][-1]
                burst = capacity_out + max(1, math.ceil(capacity_out * step.percent / 100))
                if burst > wanted:
                    wanted, policy = burst, "burst-step"
            low = minute_metric[-spec.scale_in_datapoints:]
            if (
                wanted == desired
                and len(low) == spec.scale_in_datapoints
                and all(m < spec.scale_in_fraction * spec.setpoint for m in low)
                and len(instances) == desired  # AWS does not scale in while scaling out
            ):
                shrink = math.ceil(len(instances) * minute_metric[-1] / spec.setpoint)
                if shrink < desired:
                    wanted, policy = shrink, "target-tracking-in"
            wanted = min(spec.max_instances, max(spec.min_instances, wanted))
            if wanted != before:
                desired = wanted
                res.decisions.append((t, policy, before, desired))
                alive = len(instances) - pending_termination
                # Nodes still waiting to be scaled in are in service: a higher desired capacity
                # keeps them (AWS then has nothing to terminate) before it launches new ones.
                kept = min(pending_termination, max(0, desired - alive))
                pending_termination -= kept
                del termination_requests[:kept]
                alive += kept
                for _ in range(desired - alive):
                    instances.append({"launched": t, "ready": t + ttr})
                    res.launches.append((t, t + ttr))
                for _ in range(alive - desired):
                    pending_termination += 1
                    termination_requests.append(t)
        res.t_s.append(t)
        res.desired.append(desired)
        res.in_service.append(len(instances))
        res.serving.append(len([x for x in instances if x["ready"] <= t]))
        res.waiting.append(waiting)
        res.running.append(running)
        res.ttft_s.append(ttft)
    return res


def diurnal_trace(
    *,
    hours: float,
    step_s: float,
    night_rate: float,
    peak_rate: float,
    peak_hour: float,
    burst_start_h: float,
    burst_minutes: float,
    burst_extra_rate: float,
    start_hour: float = 0.0,
) -> list[float]:
    """Arrivals per second: a smooth day (lowest 12 h from the peak) plus a rectangular burst."""
    rates = []
    for i in range(int(hours * 3600 / step_s)):
        hour = start_hour + i * step_s / 3600
        phase = math.cos(2 * math.pi * (hour - peak_hour) / 24)  # 1 at the peak, -1 twelve hours off
        rate = night_rate + (peak_rate - night_rate) * (1 + phase) / 2
        if burst_start_h <= hour < burst_start_h + burst_minutes / 60:
            rate += burst_extra_rate
        rates.append(rate)
    return rates
