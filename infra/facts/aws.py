"""Typed access to ``infra/facts/data/aws_fleet.yaml``: the AWS and vLLM facts the components and
the policy pack rely on. Pure (no Pulumi), so the policy pack and the offline plan share it.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import Field

from infra.facts.catalog import DATA_DIR
from infra.facts.fact import Fact, Strict, read_yaml


class ApiRoute(Strict):
    method: Literal["GET", "POST"]
    path: str = Field(pattern=r"^/[A-Za-z0-9/_.-]+$")


class RuleLimits(Strict):
    values_per_condition: int = Field(gt=0)
    values_per_rule: int = Field(gt=0)


class Range(Strict):
    min: int
    max: int


class HealthyPercentage(Strict):
    min_low: int
    min_high: int
    max_low: int
    max_high: int
    max_spread: int


class Gp3(Strict):
    throughput_mib_s: int = Field(ge=125, le=1000)
    iops: int = Field(ge=3000, le=16000)


class EfaLayout(Strict):
    primary: Literal["interface", "efa"]
    card0_extra: Literal["efa-only"]
    other_cards: Literal["efa-only"]


class ExporterPorts(Strict):
    node_exporter: int = Field(ge=1, le=65535)
    dcgm_exporter: int = Field(ge=1, le=65535)


class CapacityBlockScope(Strict):
    instance_types: int = Field(ge=1)
    availability_zones: int = Field(ge=1)


class SnsTopicPolicy(Strict):
    principal: str
    actions: list[str]


class AwsFleetFacts(Strict):
    vllm_api_routes: Fact[list[ApiRoute]]
    vllm_health_path: Fact[str]
    alb_tls_policy: Fact[str]
    alb_rule_limits: Fact[RuleLimits]
    alb_forward_max_target_groups: Fact[int]
    lb_deregistration_delay_max_s: Fact[int]
    lifecycle_hook_heartbeat_s: Fact[Range]
    instance_refresh_healthy_percentage: Fact[HealthyPercentage]
    user_data_max_bytes: Fact[int]
    user_data_gzip: Fact[bool]
    gp3_volume: Fact[Gp3]
    efa_interface_layout: Fact[EfaLayout]
    efa_security_group: Fact[str]
    vpc_interface_endpoints: Fact[list[str]]
    vpc_gateway_endpoints: Fact[list[str]]
    exporter_ports: Fact[ExporterPorts]
    imds_target_lifecycle_state: Fact[str]
    initial_lifecycle_hook_force_new: Fact[bool]
    elb_capacity_wait: Fact[Literal["min_elb_capacity"]]
    capacity_block_scope: Fact[CapacityBlockScope]
    asg_group_metrics: Fact[list[str]]
    amp_sns_topic_policy: Fact[SnsTopicPolicy]
    name_limits: Fact[dict[str, dict[str, int]]]


@cache
def aws_fleet_facts() -> AwsFleetFacts:
    return AwsFleetFacts.model_validate(read_yaml(DATA_DIR / "aws_fleet.yaml"))
