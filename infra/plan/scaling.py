"""Autoscaling on inference load: the policy, the node-side artifacts, and their
CloudWatch signals. Pure: no Pulumi (infra/components/scaling.py builds the
resources from ``scaling_policy_spec``).

What scales, and on what:

* Single-node replicas (one Auto Scaling group): a target tracking policy on vLLM's own queue,
  per instance. ``waiting-requests`` tracks requests in the system per instance,
  ``(vllm:num_requests_running + vllm:num_requests_waiting) × replicas per node``, with the set
  point "the batch minus ``target`` free slots": unlike waiting alone (zero whenever a replica
  has a free slot, so target tracking would shed capacity that is in use) it grows in
  proportion to the load and shrinks in proportion to the instances, which is what target
  tracking needs; and a set point below a full batch keeps headroom while new nodes boot. ``kv-cache-usage`` tracks the average ``vllm:kv_cache_usage_perc``. A step
  policy on waiting requests reacts to bursts within one minute instead of three. Scale-in is
  target tracking's own (15 minutes below 90 % of the set point); no policy scales in faster.
* Multi-node replicas ("gangs", one group per replica, each 0 or ``nodes_per_replica``
  instances): metric target tracking cannot work on a group whose only two sizes are empty and
  whole. Instead every spare gang k gets a rung of a ladder: fleet load (the sum over serving
  heads, dimension Stack) above k set points turns gang k on (ExactCapacity), below 90 % of
  that for 15 minutes turns it off. Gang 0 never gets a rung: with no replica serving there is
  no vLLM metric to scale on.
* A fleet whose minimum and maximum are the same nodes is fixed: no policies.

The metrics reach CloudWatch from each node: the image's scaling-signal scrapes vLLM's /metrics
and calls PutMetricData (images/scripts/node-scaling-signal.sh), renamed ``vllm:x`` → ``vllm_x``. Facts and design values:
infra/facts/data/scaling.yaml. Metric names: infra/facts/data/vllm_metrics.yaml. Design notes: docs/scaling.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from infra.errors import FleetError
from infra.facts.scaling import scaling_facts
from infra.facts.vllm_metrics import default_metric_catalog
from infra.plan.planner import Layout, Plan
from infra.plan.stack import StackPlan

Metric = Literal["waiting-requests", "kv-cache-usage"]
Shape = Literal["target-tracking", "gang-ladder", "fixed"]
WarmPoolMode = Literal["off", "stopped"]
SignalRole = Literal["running", "waiting", "kv_cache"]

# Dimension names the metrics carry (labels put on the series by the scrape config).
ASG_DIMENSION = "AutoScalingGroupName"
STACK_DIMENSION = "Stack"



# ---------------------------------------------------------------------------------------------
# The signals: vLLM gauges from the metric catalog, and their CloudWatch names


@dataclass(frozen=True)
class ScalingSignal:
    role: SignalRole
    prometheus_name: str  # as vLLM exposes it (infra/facts/data/vllm_metrics.yaml)
    cloudwatch_name: str  # after the scrape config's rename
    unit: str  # CloudWatch unit scaling-signal publishes it with


def cloudwatch_metric_name(prometheus_name: str) -> str:
    """``vllm:num_requests_waiting`` → ``vllm_num_requests_waiting``.

    CloudWatch would accept the colon (MetricName has no pattern), but metric math, SEARCH and
    Metrics Insights need such names quoted; an underscore keeps every query plain.
    """
    name = prometheus_name.replace(":", "_")
    limit = scaling_facts().cloudwatch.metric_name_max_length.value
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or len(name) > limit:
        raise FleetError(f"metric {prometheus_name!r}: no CloudWatch name (letters, digits, _; ≤ {limit})")
    return name


@cache
def scaling_signals() -> dict[SignalRole, ScalingSignal]:
    """The three gauges, checked against the metric catalog: names are never written twice."""
    catalog = default_metric_catalog()
    vllm = {m.name: m for m in catalog.exporters["vllm"].metrics}
    units: dict[SignalRole, str] = {"running": "Count", "waiting": "Count", "kv_cache": "None"}
    found: dict[SignalRole, ScalingSignal] = {}
    names = scaling_facts().policy.signals
    roles: tuple[SignalRole, ...] = ("running", "waiting", "kv_cache")
    for role in roles:
        name = getattr(names, role)
        metric = vllm.get(name)
        if metric is None or metric.type != "gauge":
            raise FleetError(f"scaling signal {role} = {name!r}: not a vLLM gauge in infra/facts/data/vllm_metrics.yaml")
        found[role] = ScalingSignal(role, name, cloudwatch_metric_name(name), units[role])
    return found


# ---------------------------------------------------------------------------------------------
# Capacity arithmetic shared with the Fleet


def instances_for(replicas: int, layout: Layout) -> int:
    """Nodes that run ``replicas`` replicas: whole nodes, and whole gangs."""
    return math.ceil(replicas / layout.replicas_per_node) * layout.nodes_per_replica


def ladder_types(stack_plan: StackPlan) -> list[str]:
    """Instance types the fleet may launch, preferred first (the same rule as the Fleet's):
    a capacity block is bought for one type, so it pins the ladder to the plan's choice."""
    plan = stack_plan.plan
    types = [c.layout.instance_type for c in plan.fallbacks] or [plan.layout.instance_type]
    if stack_plan.config.capacity.market == "capacity-block":
        return types[:1]
    return types


def uses_mixed_instances(stack_plan: StackPlan) -> bool:
    """Whether the Fleet's single group gets a mixed instances policy (several types, or Spot)."""
    return len(ladder_types(stack_plan)) > 1 or stack_plan.config.capacity.market == "spot"


def log_group_name(stack: str) -> str:
    """The fleet's log group (the Fleet creates it; the nodes ship no logs to it yet)."""
    return f"/vllm-fleet/{stack}"


def warm_time_to_ready_s(plan: Plan) -> float:
    """A stopped warm-pool instance kept its root volume: boot, import and engine init, no download."""
    ttr = plan.time_to_ready
    return ttr.instance_boot_s + ttr.import_vllm_s + ttr.engine_init_s


# ---------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class BurstStep:
    """Waiting requests per instance in [lower, upper) add ``percent`` % of the instances."""

    lower: float
    upper: float | None
    percent: int


@dataclass(frozen=True)
class LadderRung:
    """Gang ``gang_index`` serves while fleet load is above ``on_above`` (3 minutes) and until
    it stays below ``off_below`` for 15 minutes."""

    gang_index: int
    on_above: float
    off_below: float


@dataclass(frozen=True)
class NightFloor:
    floor_replicas: int
    floor_instances: int
    day_min_instances: int
    night_cron: str
    day_cron: str
    time_zone: str
    # Gangs that are on by day and may go off at night (gang-ladder shape only).
    gang_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScalingPolicySpec:
    stack: str
    shape: Shape
    metric: Metric
    namespace: str
    signals: dict[SignalRole, ScalingSignal]
    concurrency: int  # --max-num-seqs of one replica: the largest batch that meets the SLO (infra/plan/perf.py)
    replicas_per_node: int
    nodes_per_replica: int
    min_replicas: int
    max_replicas: int
    min_instances: int
    max_instances: int
    target: float  # in the user's units: waiting requests per instance, or a KV-cache fraction
    target_is_default: bool
    setpoint: float  # the tracked value per instance (gangs: per replica)
    time_to_ready_s: float
    instance_warmup_s: int
    scale_in_fraction: float
    scale_out_datapoints: int
    scale_in_datapoints: int
    period_s: int
    scrape_interval_s: int
    burst_steps: tuple[BurstStep, ...] = ()
    burst_evaluation_periods: int = 1
    ladder: tuple[LadderRung, ...] = ()
    night: NightFloor | None = None
    warm_pool: tuple[WarmPoolMode, str] = ("off", "")
    group_dimension: str = ASG_DIMENSION

    @property
    def batch_per_instance(self) -> int:
        return self.concurrency * self.replicas_per_node

    @property
    def burst_threshold(self) -> float:
        return self.burst_steps[0].lower if self.burst_steps else math.inf

    @property
    def samples_per_period(self) -> int:
        return self.period_s // self.scrape_interval_s


def _config_key(key: str) -> str:
    return f"vllm-fleet:scaling.{key}"


def _target(stack_plan: StackPlan, metric: Metric) -> tuple[float, bool]:
    """The user's target, or the default derived from the plan; checked against its units."""
    design = scaling_facts().policy
    given = stack_plan.config.scaling.target
    layout = stack_plan.plan.layout
    if metric == "kv-cache-usage":
        if given is not None and not 0 < given < 1:
            raise FleetError(
                f"{_config_key('target')} = {given}: kv-cache-usage is a 0-1 fraction "
                "(vllm:kv_cache_usage_perc); use e.g. 0.7"
            )
        return (given, False) if given is not None else (design.kv_cache_default_target, True)
    per = 1 if layout.nodes_per_replica > 1 else layout.replicas_per_node
    batch = stack_plan.plan.max_num_seqs * per
    if given is not None:
        if given >= batch:
            raise FleetError(
                f"{_config_key('target')} = {given}: waiting-requests keeps this many batch slots free per "
                f"{'replica' if per == 1 and layout.nodes_per_replica > 1 else 'instance'}; it must be below the "
                f"batch of {batch} (max_num_seqs at the SLO × replicas per node)"
            )
        return given, False
    return max(1.0, batch * design.waiting_target_fraction_of_batch), True


def _night(stack_plan: StackPlan, min_instances: int, shape: Shape) -> NightFloor | None:
    config = stack_plan.config
    floor = config.scaling.night_floor
    if floor is None:
        return None
    cap, layout = config.capacity, stack_plan.plan.layout
    if shape == "fixed":
        raise FleetError(
            f"{_config_key('nightFloor')} = {floor}: the fleet is fixed at {min_instances} node(s) "
            f"({cap.min_replicas}..{cap.max_replicas} replicas fit the same nodes); nothing scales at night"
        )
    if floor >= cap.min_replicas:
        raise FleetError(
            f"{_config_key('nightFloor')} = {floor}: must be below vllm-fleet:capacity.minReplicas "
            f"({cap.min_replicas}); at night the fleet may shrink to this many replicas"
        )
    floor_instances = instances_for(floor, layout)
    if floor_instances >= min_instances:
        raise FleetError(
            f"{_config_key('nightFloor')} = {floor}: {floor} and {cap.min_replicas} replicas both take "
            f"{min_instances} node(s) at {layout.replicas_per_node} replicas per node; use a smaller floor"
        )
    design = scaling_facts().policy
    gangs = tuple(range(floor, cap.min_replicas)) if shape == "gang-ladder" else ()
    return NightFloor(
        floor, floor_instances, min_instances, design.night_start_cron, design.day_start_cron,
        design.night_time_zone, gangs,
    )


def scaling_policy_spec(stack_plan: StackPlan) -> ScalingPolicySpec:
    """The whole policy from the plan and ``vllm-fleet:scaling``; FleetError on bad input."""
    facts = scaling_facts()
    design, tt = facts.policy, facts.target_tracking
    config, plan = stack_plan.config, stack_plan.plan
    layout, cap = plan.layout, config.capacity
    metric: Metric = config.scaling.metric
    min_instances, max_instances = instances_for(cap.min_replicas, layout), instances_for(cap.max_replicas, layout)
    gangs = layout.nodes_per_replica > 1
    shape: Shape = "fixed" if min_instances == max_instances else ("gang-ladder" if gangs else "target-tracking")
    target, is_default = _target(stack_plan, metric)
    per = 1 if gangs else layout.replicas_per_node  # gangs are counted per replica
    # The batch each replica serves within the SLO is its capacity: the setpoint keeps
    # `target` of those slots free for arrivals while new capacity boots.
    setpoint = target if metric == "kv-cache-usage" else plan.max_num_seqs * per - target
    steps: tuple[BurstStep, ...] = ()
    if shape == "target-tracking" and metric == "waiting-requests":
        bounds = [m * target for m in design.burst_waiting_of_target]
        steps = tuple(
            BurstStep(lower, bounds[i + 1] if i + 1 < len(bounds) else None, pct)
            for i, (lower, pct) in enumerate(zip(bounds, design.burst_percent_increase, strict=True))
        )
    night = _night(stack_plan, min_instances, shape)
    ladder: tuple[LadderRung, ...] = ()
    if shape == "gang-ladder":
        lowest_floor = night.floor_replicas if night else cap.min_replicas
        frac = tt.scale_in_below_target_fraction.value
        ladder = tuple(
            LadderRung(k, on_above=k * setpoint, off_below=frac * k * setpoint)
            for k in range(max(1, lowest_floor), cap.max_replicas)
        )
    return ScalingPolicySpec(
        stack=config.stack,
        shape=shape,
        metric=metric,
        namespace=design.namespace,
        signals=scaling_signals(),
        concurrency=plan.max_num_seqs,
        replicas_per_node=layout.replicas_per_node,
        nodes_per_replica=layout.nodes_per_replica,
        min_replicas=cap.min_replicas,
        max_replicas=cap.max_replicas,
        min_instances=min_instances,
        max_instances=max_instances,
        target=target,
        target_is_default=is_default,
        setpoint=setpoint,
        time_to_ready_s=plan.time_to_ready.total_s,
        instance_warmup_s=plan.startup_timeout_s,
        scale_in_fraction=tt.scale_in_below_target_fraction.value,
        scale_out_datapoints=tt.scale_out_datapoints.value,
        scale_in_datapoints=tt.scale_in_datapoints.value,
        period_s=design.metric_period_s,
        scrape_interval_s=design.scrape_interval_s,
        burst_steps=steps,
        burst_evaluation_periods=design.burst_evaluation_periods,
        ladder=ladder,
        night=night,
        warm_pool=warm_pool_mode(stack_plan),
        group_dimension=STACK_DIMENSION if gangs else ASG_DIMENSION,
    )


def warm_pool_mode(stack_plan: StackPlan) -> tuple[WarmPoolMode, str]:
    """Whether the fleet's group gets a warm pool of stopped, pre-initialized instances, and why."""
    config, plan = stack_plan.config, stack_plan.plan
    layout, cap = plan.layout, config.capacity
    if layout.nodes_per_replica > 1:
        return "off", (
            f"replicas span {layout.nodes_per_replica} nodes: gangs start whole, one group each, "
            "and a launch hook holds them until the gang serves"
        )
    if cap.market == "spot":
        return "off", "Spot market: PutWarmPool refuses groups whose launch template requests Spot"
    if uses_mixed_instances(stack_plan):
        return "off", (
            f"the group has a mixed instances policy over {', '.join(ladder_types(stack_plan))}: "
            "PutWarmPool refuses such groups"
        )
    if cap.market == "capacity-block":
        return "off", "capacity block: the reserved instances are paid for the whole block, keep them in service"
    if config.serving.weights_source == "local-nvme":
        return "off", "weights on instance-store NVMe, which a stopped instance loses: it would download them again"
    if instances_for(cap.min_replicas, layout) == instances_for(cap.max_replicas, layout):
        return "off", "fixed size: no scale-out to pre-warm for"
    warm, cold = warm_time_to_ready_s(plan), plan.time_to_ready.total_s
    return "stopped", (
        f"single-type on-demand group: a stopped warm instance keeps its root volume with the weights, "
        f"ready in ~{warm:.0f} s instead of ~{cold:.0f} s, at the price of its EBS volume while stopped"
    )


def warm_pool_settings(stack_plan: StackPlan) -> dict[str, Any] | None:
    """The warm pool for the Fleet's group as plain values (None when off): the Pulumi layer's
    ``warm_pool_args`` turns them into ``aws.autoscaling.GroupWarmPoolArgs``."""
    mode, _ = warm_pool_mode(stack_plan)
    if mode == "off":
        return None
    # One stopped instance always waiting; the pool refills up to the group's maximum.
    return {"pool_state": "Stopped", "min_size": 1, "reuse_on_scale_in": False}


def _fmt(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def describe_scaling(stack_plan: StackPlan) -> list[str]:
    """The policy in words, for ``vllm-fleet plan``: metric, target, how fast up, how slow down."""
    spec = scaling_policy_spec(stack_plan)
    plan = stack_plan.plan
    layout = plan.layout
    sig = spec.signals
    sizes = (
        f"{spec.min_instances}..{spec.max_instances} instance(s) for {spec.min_replicas}..{spec.max_replicas} "
        f"replica(s) ({layout.replicas_per_node} per {layout.instance_type} node"
        + (f", {layout.nodes_per_replica} nodes per replica" if layout.nodes_per_replica > 1 else "")
        + ")"
    )
    lines = [f"fleet: {sizes}"]
    if spec.shape == "fixed":
        lines.append("scaling: none — the minimum and maximum are the same nodes")
        lines.append(f"warm pool: {spec.warm_pool[0]} — {spec.warm_pool[1]}")
        return lines
    default = " (default: a quarter of the batch, at least 1)" if spec.target_is_default else ""
    ready = f"~{spec.time_to_ready_s:.0f} s (modeled time to ready)"
    down = (
        f"down: only after {spec.scale_in_datapoints} minutes below "
        f"{_fmt(spec.scale_in_fraction * spec.setpoint)}"
    )
    if spec.metric == "waiting-requests":
        what = f"requests in the system ({sig['running'].prometheus_name} + {sig['waiting'].prometheus_name})"
    else:
        kv_default = " (default)" if spec.target_is_default else ""
        what = f"KV-cache use ({sig['kv_cache'].prometheus_name}, target {_fmt(spec.target)}{kv_default})"
    if spec.shape == "target-tracking":
        lines.append(
            f"scaling: target tracking on {what} per instance, CloudWatch {spec.namespace}/"
            f"{', '.join(s.cloudwatch_name for s in sig.values())} by {spec.group_dimension}"
        )
        if spec.metric == "waiting-requests":
            lines.append(
                f"target: {_fmt(spec.setpoint)} of {spec.batch_per_instance} batch slots busy per instance "
                f"(max_num_seqs {spec.concurrency} at the SLO × {spec.replicas_per_node} replica(s) per node), keeping "
                f"{_fmt(spec.target)} free for arrivals while new capacity boots{default}"
            )
        lines.append(
            f"up: after {spec.scale_out_datapoints} minutes above target, to ceil(instances × load / "
            f"{_fmt(spec.setpoint)}); new capacity serves after {ready}, and counts as warming for "
            f"{spec.instance_warmup_s} s"
        )
        for step in spec.burst_steps:
            upper = f"..{_fmt(step.upper)}" if step.upper is not None else "+"
            lines.append(
                f"burst: {_fmt(step.lower)}{upper} waiting per instance for {spec.burst_evaluation_periods} "
                f"minute adds {step.percent}% of the instances at once (at least 1)"
            )
    else:
        lines.append(
            f"scaling: a ladder of whole gangs on fleet {what}, summed over serving heads "
            f"(CloudWatch {spec.namespace}, by {spec.group_dimension}); target per replica {_fmt(spec.setpoint)}"
        )
        for rung in spec.ladder:
            lines.append(
                f"gang {rung.gang_index}: on above {_fmt(rung.on_above)} for {spec.scale_out_datapoints} "
                f"minutes, off below {_fmt(rung.off_below)} for {spec.scale_in_datapoints} minutes; serves after {ready}"
            )
    if spec.shape == "gang-ladder":
        down = f"down: a gang goes off only after {spec.scale_in_datapoints} minutes below its rung"
    lines.append(
        f"{down}, never below {spec.min_instances} instance(s); a node protects itself from scale-in while "
        "vLLM has requests, and a terminating node drains before it stops"
    )
    if spec.night is not None:
        n = spec.night
        floor_note = " — no replica serves at night, and nothing can scale up from zero" if n.floor_replicas == 0 else ""
        lines.append(
            f"night: floor {n.floor_replicas} replica(s) ({n.floor_instances} instance(s)) from '{n.night_cron}' "
            f"to '{n.day_cron}' {n.time_zone}{floor_note}"
        )
    else:
        lines.append("night: no schedule (set vllm-fleet:scaling.nightFloor for a lower night minimum)")
    lines.append(f"warm pool: {spec.warm_pool[0]} — {spec.warm_pool[1]}")
    return lines


# ---------------------------------------------------------------------------------------------
# The node's side: the environment of scaling-signal (images/scripts/node-scaling-signal.sh),
# which publishes the gauges and sets scale-in protection; infra/render/node.py renders its units.


def node_scaling_environment(stack: str, region: str, ports: Sequence[int], gang: bool) -> dict[str, str]:
    """What scaling-signal reads: the same names, dimensions and units the policies and alarms
    query (FleetScaling, built from the same facts)."""
    facts = scaling_facts()
    signals = scaling_signals()
    # A gang's ladder sums the heads by stack; a fleet's target tracking reads its group.
    dims: tuple[tuple[str, ...], ...] = ((STACK_DIMENSION,),) if gang else ((ASG_DIMENSION,), (STACK_DIMENSION,))
    cloudwatch = facts.cloudwatch
    if len(signals) * len(dims) > cloudwatch.put_metric_data_max_metrics.value or len(ports) > (
        cloudwatch.put_metric_data_max_values_per_metric.value
    ):
        raise FleetError(f"{len(signals)} gauges × {len(dims)} dimension sets × {len(ports)} replicas: over one PutMetricData call")
    return {
        "SCALING_REGION": region,
        "SCALING_STACK": stack,
        "SCALING_NAMESPACE": facts.policy.namespace,
        "SCALING_PORTS": " ".join(str(p) for p in ports),
        "SCALING_GANG": "true" if gang else "false",
        "SCALING_METRICS": " ".join(f"{s.prometheus_name}={s.cloudwatch_name}={s.unit}" for s in signals.values()),
        "SCALING_RUNNING": signals["running"].prometheus_name,
        "SCALING_WAITING": signals["waiting"].prometheus_name,
        "SCALING_DIMENSIONS": " ".join(",".join(d) for d in dims),
        "SCALING_RELEASE_AFTER_S": str(facts.policy.protection_release_after_s),
        "SCALING_MAX_IDS": str(facts.instance_protection.max_instance_ids_per_call.value),
        "SCALING_PUBLISH_INTERVAL_S": str(facts.policy.scrape_interval_s),
    }


def node_scaling_interval_s() -> int:
    """How often the node's timer runs scaling-signal (its protection check)."""
    return scaling_facts().policy.protection_interval_s
