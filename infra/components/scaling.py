"""FleetScaling: the Auto Scaling policies, alarms and schedules that size the fleet on vLLM's
own signals. What they are and why: infra/plan/scaling.py (``scaling_policy_spec``) and docs/scaling.md.

The groups belong to the Fleet component; this one only takes their names:

* one group (single-node replicas): a target tracking policy, a burst step policy with its
  alarm, and the night schedules;
* one group per gang (multi-node replicas, in gang order): for every rung of the ladder an
  "on" and an "off" step policy (ExactCapacity) with their alarms, and the night schedules;
* a fixed-size fleet: nothing.

The warm pool is an argument of the group itself (``aws.autoscaling.Group(warm_pool=...)``;
pulumi-aws has no separate warm pool resource): the Fleet passes
``warm_pool_args(warm_pool_settings(stack_plan))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.errors import FleetError
from infra.facts.scaling import scaling_facts
from infra.plan.scaling import ScalingPolicySpec, SignalRole

# Metric math ids: "must start with a lowercase letter" (CloudWatch MetricDataQuery.Id).
RUNNING_ID, WAITING_ID, KV_ID, RESULT_ID = "running", "waiting", "kv", "load"


def warm_pool_args(settings: Mapping[str, Any] | None) -> aws.autoscaling.GroupWarmPoolArgs | None:
    """``warm_pool=`` for the Fleet's group from ``infra.plan.scaling.warm_pool_settings``, or
    None when the plan rules a warm pool out (``warm_pool_mode`` says why). A warm pool also needs
    a launch lifecycle hook on the group (AWS: create the hook before the pool); see docs/scaling.md."""
    if settings is None:
        return None
    return aws.autoscaling.GroupWarmPoolArgs(
        pool_state=settings["pool_state"],
        min_size=settings["min_size"],
        instance_reuse_policy=aws.autoscaling.GroupWarmPoolInstanceReusePolicyArgs(
            reuse_on_scale_in=settings["reuse_on_scale_in"]
        ),
    )


@dataclass(frozen=True)
class FleetScalingArgs:
    spec: ScalingPolicySpec  # infra/plan/scaling.py scaling_policy_spec
    # Fleet.group_names: the one fleet group, or gang-0, gang-1, ... in order.
    group_names: Sequence[pulumi.Input[str]]
    tags: Mapping[str, str]


class FleetScaling(pulumi.ComponentResource):
    policy_arns: dict[str, pulumi.Output[str]]
    alarm_arns: dict[str, pulumi.Output[str]]
    schedule_names: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: FleetScalingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:scaling:FleetScaling", name, None, opts)
        # Every check that can fail runs before the first resource is declared.
        spec = args.spec
        wanted = spec.max_replicas if spec.shape == "gang-ladder" else 1
        if len(args.group_names) != wanted:
            raise FleetError(
                f"FleetScaling {name}: {len(args.group_names)} group name(s) given; the {spec.shape} shape "
                f"of stack {spec.stack} has {wanted} group(s)"
            )
        self._spec = spec
        self._tags = dict(args.tags)
        self._child = pulumi.ResourceOptions(parent=self)
        self.policy_arns = {}
        self.alarm_arns = {}
        self.schedule_names = {}
        if spec.shape == "target-tracking":
            self._target_tracking(name, args.group_names[0])
            if spec.burst_steps:
                self._burst(name, args.group_names[0])
        elif spec.shape == "gang-ladder":
            for rung in spec.ladder:
                self._rung(name, args.group_names, rung.gang_index, rung.on_above, rung.off_below)
        if spec.night is not None:
            self._night(name, args.group_names)
        self.register_outputs(
            {
                "shape": spec.shape,
                "policyArns": self.policy_arns,
                "alarmArns": self.alarm_arns,
                "scheduleNames": self.schedule_names,
                "warmPool": spec.warm_pool[0],
            }
        )

    # --- single group -------------------------------------------------------------------------

    def _stat(self, metric_id: str, role: SignalRole, stat: str, dimension: str, value: pulumi.Input[str]) -> (
        aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricArgs
    ):
        spec = self._spec
        return aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricArgs(
            id=metric_id,
            return_data=False,
            metric_stat=aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatArgs(
                stat=stat,
                period=spec.period_s,
                metric=aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatMetricArgs(
                    namespace=spec.namespace,
                    metric_name=spec.signals[role].cloudwatch_name,
                    dimensions=[
                        aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricMetricStatMetricDimensionArgs(
                            name=dimension, value=value
                        )
                    ],
                ),
            ),
        )

    def _target_tracking(self, name: str, group: pulumi.Input[str]) -> None:
        spec = self._spec
        dim = spec.group_dimension
        if spec.metric == "waiting-requests":
            # Average over the group's replicas × replicas per node = requests in the system per instance.
            customized = aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationArgs(
                metrics=[
                    self._stat(RUNNING_ID, "running", "Average", dim, group),
                    self._stat(WAITING_ID, "waiting", "Average", dim, group),
                    aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricArgs(
                        id=RESULT_ID,
                        expression=f"({RUNNING_ID} + {WAITING_ID}) * {spec.replicas_per_node}",
                        label="vLLM requests in the system per instance",
                        return_data=True,
                    ),
                ]
            )
        else:
            customized = aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationArgs(
                namespace=spec.namespace,
                metric_name=spec.signals["kv_cache"].cloudwatch_name,
                statistic="Average",
                metric_dimensions=[
                    aws.autoscaling.PolicyTargetTrackingConfigurationCustomizedMetricSpecificationMetricDimensionArgs(
                        name=dim, value=group
                    )
                ],
            )
        policy = aws.autoscaling.Policy(
            f"{name}-target",
            autoscaling_group_name=group,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=spec.instance_warmup_s,
            target_tracking_configuration=aws.autoscaling.PolicyTargetTrackingConfigurationArgs(
                target_value=spec.setpoint,
                customized_metric_specification=customized,
                disable_scale_in=False,
            ),
            opts=self._child,
        )
        self.policy_arns["target"] = policy.arn

    def _burst(self, name: str, group: pulumi.Input[str]) -> None:
        spec = self._spec
        threshold = spec.burst_steps[0].lower
        policy = aws.autoscaling.Policy(
            f"{name}-burst",
            autoscaling_group_name=group,
            policy_type="StepScaling",
            adjustment_type="PercentChangeInCapacity",
            min_adjustment_magnitude=1,
            metric_aggregation_type="Average",
            estimated_instance_warmup=spec.instance_warmup_s,
            # Bounds are relative to the alarm's threshold (StepAdjustment, botocore model).
            step_adjustments=[
                aws.autoscaling.PolicyStepAdjustmentArgs(
                    scaling_adjustment=step.percent,
                    metric_interval_lower_bound=str(step.lower - threshold),
                    metric_interval_upper_bound=str(step.upper - threshold) if step.upper is not None else None,
                )
                for step in spec.burst_steps
            ],
            opts=self._child,
        )
        alarm = self._alarm(
            f"{name}-burst",
            f"{spec.stack}: a burst — at least {threshold:g} vLLM requests waiting per instance "
            f"for {spec.burst_evaluation_periods} minute(s)",
            policy,
            comparison_operator="GreaterThanOrEqualToThreshold",
            threshold=threshold,
            periods=spec.burst_evaluation_periods,
            queries=[
                _alarm_stat(spec, WAITING_ID, "waiting", "Average", spec.group_dimension, group),
                aws.cloudwatch.MetricAlarmMetricQueryArgs(
                    id=RESULT_ID,
                    expression=f"{WAITING_ID} * {spec.replicas_per_node}",
                    label="vLLM requests waiting per instance",
                    return_data=True,
                ),
            ],
            # No data: no replica serves yet, which is no burst.
            missing="notBreaching",
        )
        self.policy_arns["burst"] = policy.arn
        self.alarm_arns["burst"] = alarm.arn

    # --- gangs --------------------------------------------------------------------------------

    def _fleet_load_queries(self) -> list[aws.cloudwatch.MetricAlarmMetricQueryArgs]:
        """Fleet load in replicas' worth: the Sum over all serving heads of one period, divided by
        the scrapes per period (each head reports once per scrape)."""
        spec = self._spec
        samples = spec.samples_per_period
        dim, stack = spec.group_dimension, spec.stack
        if spec.metric == "waiting-requests":
            return [
                _alarm_stat(spec, RUNNING_ID, "running", "Sum", dim, stack),
                _alarm_stat(spec, WAITING_ID, "waiting", "Sum", dim, stack),
                aws.cloudwatch.MetricAlarmMetricQueryArgs(
                    id=RESULT_ID,
                    expression=f"({RUNNING_ID} + {WAITING_ID}) / {samples}",
                    label="vLLM requests in the system, fleet",
                    return_data=True,
                ),
            ]
        return [
            _alarm_stat(spec, KV_ID, "kv_cache", "Sum", dim, stack),
            aws.cloudwatch.MetricAlarmMetricQueryArgs(
                id=RESULT_ID, expression=f"{KV_ID} / {samples}", label="KV-cache use, fleet", return_data=True
            ),
        ]

    def _rung(
        self, name: str, groups: Sequence[pulumi.Input[str]], k: int, on_above: float, off_below: float
    ) -> None:
        spec = self._spec
        group = groups[k]
        for action, size, bound, threshold, periods, operator, missing in (
            ("on", spec.nodes_per_replica, "lower", on_above, spec.scale_out_datapoints, "GreaterThanThreshold", "notBreaching"),
            ("off", 0, "upper", off_below, spec.scale_in_datapoints, "LessThanThreshold", "missing"),
        ):
            policy = aws.autoscaling.Policy(
                f"{name}-gang-{k}-{action}",
                autoscaling_group_name=group,
                policy_type="StepScaling",
                # A gang is whole or absent: the group's size is set, never stepped.
                adjustment_type="ExactCapacity",
                estimated_instance_warmup=spec.instance_warmup_s,
                step_adjustments=[
                    aws.autoscaling.PolicyStepAdjustmentArgs(
                        scaling_adjustment=size,
                        metric_interval_lower_bound="0" if bound == "lower" else None,
                        metric_interval_upper_bound="0" if bound == "upper" else None,
                    )
                ],
                opts=self._child,
            )
            above_below = "above" if action == "on" else "below"
            alarm = self._alarm(
                f"{name}-gang-{k}-{action}",
                f"{spec.stack}: gang {k} {action} — fleet load {above_below} {threshold:g} for {periods} minute(s)",
                policy,
                comparison_operator=operator,
                threshold=threshold,
                periods=periods,
                queries=self._fleet_load_queries(),
                missing=missing,
            )
            self.policy_arns[f"gang-{k}-{action}"] = policy.arn
            self.alarm_arns[f"gang-{k}-{action}"] = alarm.arn

    # --- alarms -------------------------------------------------------------------------------

    def _alarm(
        self,
        resource_name: str,
        description: str,
        policy: aws.autoscaling.Policy,
        *,
        comparison_operator: str,
        threshold: float,
        periods: int,
        queries: list[aws.cloudwatch.MetricAlarmMetricQueryArgs],
        missing: str,
    ) -> aws.cloudwatch.MetricAlarm:
        """An alarm that runs ``policy`` once ``queries``' result crosses ``threshold`` in each of
        ``periods`` periods in a row."""
        return aws.cloudwatch.MetricAlarm(
            resource_name,
            alarm_description=description,
            comparison_operator=comparison_operator,
            threshold=threshold,
            evaluation_periods=periods,
            datapoints_to_alarm=periods,
            metric_queries=queries,
            treat_missing_data=missing,
            alarm_actions=[policy.arn],
            tags=self._tags,
            opts=self._child,
        )

    # --- night --------------------------------------------------------------------------------

    def _night(self, name: str, groups: Sequence[pulumi.Input[str]]) -> None:
        spec = self._spec
        night = spec.night
        assert night is not None
        unchanged = scaling_facts().scheduled_actions.unchanged_value.value
        # Only the minimum moves: desired capacity stays with the policies, so the night floor
        # lets target tracking shed load-free capacity gently and the morning minimum lifts it back.
        if spec.shape == "gang-ladder":
            targets = [(f"gang-{k}", groups[k], 0, spec.nodes_per_replica) for k in night.gang_indices]
        else:
            targets = [("fleet", groups[0], night.floor_instances, night.day_min_instances)]
        for key, group, night_min, day_min in targets:
            for when, cron, min_size in (("night", night.night_cron, night_min), ("day", night.day_cron, day_min)):
                schedule = aws.autoscaling.Schedule(
                    f"{name}-{key}-{when}",
                    scheduled_action_name=f"vllm-fleet-{spec.stack}-{key}-{when}",
                    autoscaling_group_name=group,
                    recurrence=cron,
                    time_zone=night.time_zone,
                    min_size=min_size,
                    max_size=unchanged,
                    desired_capacity=unchanged,
                    opts=self._child,
                )
                self.schedule_names[f"{key}-{when}"] = schedule.scheduled_action_name


def _alarm_stat(
    spec: ScalingPolicySpec, metric_id: str, role: SignalRole, stat: str, dimension: str, value: pulumi.Input[str]
) -> aws.cloudwatch.MetricAlarmMetricQueryArgs:
    return aws.cloudwatch.MetricAlarmMetricQueryArgs(
        id=metric_id,
        return_data=False,
        metric=aws.cloudwatch.MetricAlarmMetricQueryMetricArgs(
            namespace=spec.namespace,
            metric_name=spec.signals[role].cloudwatch_name,
            stat=stat,
            period=spec.period_s,
            dimensions={dimension: value},
        ),
    )
