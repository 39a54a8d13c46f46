"""A day of load through the fleet's target tracking policy (tests/support/scaling_sim.py ``simulate``): a
diurnal ramp plus a burst above the fleet's maximum, for the prod-70b stack's plan.

The replay follows AWS's documented behaviour (infra/facts/data/scaling.yaml): 1-minute datapoints,
scale-out after 3 above the set point to ceil(capacity × metric / set point) with warming
instances left out of the capacity, the burst step after 1, scale-in only after 15 datapoints
below 90 % of the set point; new instances serve after the plan's time to ready; nodes picked for
scale-in leave only when idle (scale-in protection). It writes the queue and latency curve to
build/artifacts/scaling-simulation.png; with --snapshot-update also to docs/scaling-simulation.png.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import pytest

from infra.config import load_stack_file
from infra.errors import FleetError
from infra.facts.scaling import scaling_facts
from infra.plan.build import build_stack_plan
from infra.plan.scaling import ScalingPolicySpec, scaling_policy_spec
from tests.support.scaling_sim import SimulationResult, Workload, diurnal_trace, simulate

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "build" / "artifacts" / "scaling-simulation.png"
DOCS_COPY = ROOT / "docs" / "scaling-simulation.png"
STEP_S = 10.0
# A chat request holding a slot ~12 s (a few hundred output tokens), first token ~0.3 s when idle.
WORKLOAD = Workload(service_time_s=12.0, idle_ttft_s=0.3)
BURST_START_H = 7.0


@pytest.fixture(scope="module")
def spec() -> ScalingPolicySpec:
    return scaling_policy_spec(build_stack_plan(load_stack_file("prod-70b"), validate=False))


def day_trace(spec: ScalingPolicySpec) -> list[float]:
    """Rates in units of one instance's throughput (batch / service time): night at 0.4 of one
    instance, a 14:00 peak at 2.3 instances, and a 20-minute burst at 07:00 adding 1.5 instances."""
    per_instance = spec.batch_per_instance / WORKLOAD.service_time_s
    return diurnal_trace(
        hours=24, step_s=STEP_S, night_rate=0.4 * per_instance, peak_rate=2.3 * per_instance,
        peak_hour=14, burst_start_h=BURST_START_H, burst_minutes=20, burst_extra_rate=1.5 * per_instance,
    )


@pytest.fixture(scope="module")
def day(spec: ScalingPolicySpec) -> SimulationResult:
    return simulate(spec, day_trace(spec), WORKLOAD, step_s=STEP_S)


def test_fleet_stays_within_its_bounds(spec: ScalingPolicySpec, day: SimulationResult) -> None:
    assert min(day.desired) >= spec.min_instances and max(day.desired) <= spec.max_instances
    assert min(day.in_service) >= spec.min_instances and max(day.in_service) <= spec.max_instances
    assert max(day.desired) == spec.max_instances  # the peak needs the whole fleet


def test_capacity_arrives_within_the_modeled_warmup(spec: ScalingPolicySpec, day: SimulationResult) -> None:
    assert day.launches, "the day must scale out"
    for decided, serving in day.launches:
        assert serving - decided == pytest.approx(spec.time_to_ready_s)
        assert serving - decided <= spec.instance_warmup_s
        i = math.ceil(serving / STEP_S)
        assert day.serving[i] > day.serving[int(decided / STEP_S)] or day.serving[i] == spec.max_instances


def test_scale_out_is_fast_and_scale_in_waits(spec: ScalingPolicySpec, day: SimulationResult) -> None:
    burst_t = BURST_START_H * 3600
    first_burst_decision = min(t for t, policy, *_ in day.decisions if t >= burst_t) - burst_t
    ins = [(t, before, after) for t, policy, before, after in day.decisions if policy == "target-tracking-in"]
    outs = [(t, policy) for t, policy, before, after in day.decisions if after > before]
    print(f"\nset point {spec.setpoint:g}/instance; decisions:")
    for t, policy, before, after in day.decisions:
        print(f"  {t / 3600:5.2f} h  {policy:20s} {before} -> {after}")
    assert first_burst_decision <= 2 * 60, "the burst step acts within a minute or two"
    assert any(policy == "burst-step" for _, policy in outs)
    assert ins, "the evening trough sheds capacity"
    for t, _, _ in ins:
        # 15 one-minute datapoints below 90 % of the set point precede every scale-in.
        lo, hi = int((t - 15 * 60) / STEP_S), int(t / STEP_S)
        for j in range(lo + 1, hi):
            load = day.waiting[j] + day.running[j]
            assert load / max(day.serving[j], 1) < spec.setpoint
    for decided, left in day.terminations:
        assert left >= decided


def test_queue_and_latency_numbers(spec: ScalingPolicySpec, day: SimulationResult) -> None:
    minutes = STEP_S / 60
    slo_s = 1.0
    over = sum(minutes for x in day.ttft_s if x > slo_s)
    peak_wait = max(day.waiting)
    used = node_hours(day)
    print(
        f"\nprod-70b day: peak queue {peak_wait:.0f} requests, worst TTFT {max(day.ttft_s):.1f} s, "
        f"{over:.0f} min with TTFT > {slo_s:g} s, {used:.1f} node-hours "
        f"(always-max: {spec.max_instances * 24} node-hours)"
    )
    assert used < spec.max_instances * 24
    assert over < 120  # the burst and the morning ramp cost at most two hours of slow first tokens


def test_protection_delays_scale_in_but_never_blocks_it(spec: ScalingPolicySpec) -> None:
    trace = day_trace(spec)
    guarded = simulate(spec, trace, WORKLOAD, step_s=STEP_S, protection=True)
    free = simulate(spec, trace, WORKLOAD, step_s=STEP_S, protection=False)
    never = simulate(spec, trace, WORKLOAD, step_s=STEP_S, protection=True, release_after_s=None)
    delay = [left - decided for decided, left in guarded.terminations]
    release = scaling_facts().policy.protection_release_after_s
    print(
        f"\nscale-in under protection: {len(delay)} terminations, waits up to {max(delay) / 60:.1f} min; "
        f"without the release after {release} s: {len(never.terminations)} terminations, "
        f"{node_hours(never):.1f} node-hours instead of {node_hours(guarded):.1f}"
    )
    # Without protection a node leaves at the next step; with it, within the release time.
    assert all(0 < left - decided <= STEP_S for decided, left in free.terminations)
    assert guarded.terminations and all(0 < d <= release + STEP_S for d in delay)
    # Busy-only protection never finds an idle node under daytime load: it costs node-hours.
    assert len(never.terminations) < len(guarded.terminations)
    assert node_hours(never) > node_hours(guarded)


def node_hours(result: SimulationResult) -> float:
    return sum(result.in_service) * result.step_s / 3600


def test_only_target_tracking_is_simulated() -> None:
    gangs = scaling_policy_spec(build_stack_plan(load_stack_file("prod-405b"), validate=False))
    with pytest.raises(FleetError, match="gang-ladder shape is not simulated"):
        simulate(gangs, [1.0], WORKLOAD)


def test_plot(spec: ScalingPolicySpec, day: SimulationResult, pytestconfig: pytest.Config) -> None:
    hours = [t / 3600 for t in day.t_s]
    per_instance = spec.batch_per_instance / WORKLOAD.service_time_s
    fig, (load_ax, queue_ax, ttft_ax) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    load_ax.plot(hours, [r / per_instance for r in day.arrivals_per_s], label="offered load (instances' worth)", color="0.4")
    load_ax.step(hours, day.desired, where="post", label="desired instances", color="tab:blue")
    load_ax.step(hours, day.serving, where="post", label="serving instances", color="tab:green")
    load_ax.set_ylabel("instances")
    load_ax.legend(loc="upper left", fontsize=8)
    load_ax.set_title(
        f"prod-70b: target tracking on running+waiting per instance (set point {spec.setpoint:g}), "
        f"{spec.min_instances}..{spec.max_instances} instances, time to ready {spec.time_to_ready_s:.0f} s"
    )
    queue_ax.plot(hours, day.waiting, color="tab:red", label="vllm:num_requests_waiting (fleet)")
    queue_ax.plot(hours, day.running, color="tab:purple", label="vllm:num_requests_running (fleet)")
    queue_ax.set_ylabel("requests")
    queue_ax.legend(loc="upper left", fontsize=8)
    ttft_ax.plot(hours, day.ttft_s, color="tab:orange", label="modeled time to first token")
    ttft_ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8, label="1 s SLO")
    ttft_ax.set_yscale("log")
    ttft_ax.set_ylabel("seconds")
    ttft_ax.set_xlabel("hour of day")
    ttft_ax.legend(loc="upper left", fontsize=8)
    for ax in (load_ax, queue_ax, ttft_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata so the same simulation gives the same bytes.
    fig.savefig(ARTIFACT, dpi=90, metadata={"Software": None})
    plt.close(fig)
    assert ARTIFACT.stat().st_size > 10_000
    if pytestconfig.getoption("--snapshot-update"):
        shutil.copyfile(ARTIFACT, DOCS_COPY)
    assert DOCS_COPY.is_file(), f"no {DOCS_COPY}; regenerate with --snapshot-update"
