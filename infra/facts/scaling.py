"""Facts and design values of autoscaling (``infra/facts/data/scaling.yaml``): CloudWatch and
Auto Scaling limits and semantics, each with its source, and the policy's design constants."""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import Field, model_validator

from infra.facts.catalog import DATA_DIR
from infra.facts.fact import Fact, Strict, read_yaml

SCALING_FILE = DATA_DIR / "scaling.yaml"


class CloudWatchFacts(Strict):
    metric_name_max_length: Fact[int]
    put_metric_data_max_metrics: Fact[int]
    put_metric_data_max_values_per_metric: Fact[int]


class TargetTrackingFacts(Strict):
    scale_out_datapoints: Fact[int]
    scale_in_datapoints: Fact[int]
    scale_in_below_target_fraction: Fact[float]
    semantics: Fact[str]
    multiple_policies: Fact[str]


class ProtectionFacts(Strict):
    all_protected_defers_termination: Fact[bool]
    max_instance_ids_per_call: Fact[int]


class WarmPoolFacts(Strict):
    excludes_mixed_and_spot: Fact[bool]
    needs_launch_lifecycle_hook: Fact[bool]


class ScheduleFacts(Strict):
    unchanged_value: Fact[int]
    default_time_zone: Fact[str]


class Signals(Strict):
    running: str
    waiting: str
    kv_cache: str


class PolicyDesign(Strict):
    namespace: str = Field(pattern=r"^[^:].{0,254}$")
    scrape_interval_s: int = Field(gt=0)
    metric_period_s: Literal[10, 30, 60]
    waiting_target_fraction_of_batch: float = Field(gt=0)
    kv_cache_default_target: float = Field(gt=0, lt=1)
    burst_waiting_of_target: list[float]
    burst_percent_increase: list[int]
    burst_evaluation_periods: int = Field(ge=1)
    protection_interval_s: int = Field(ge=1)
    protection_release_after_s: int = Field(ge=0)
    night_start_cron: str
    day_start_cron: str
    night_time_zone: str
    signals: Signals

    @model_validator(mode="after")
    def _steps(self) -> PolicyDesign:
        if len(self.burst_waiting_of_target) != len(self.burst_percent_increase) or not self.burst_waiting_of_target:
            raise ValueError("burst_waiting_of_target and burst_percent_increase must pair up")
        if sorted(self.burst_waiting_of_target) != self.burst_waiting_of_target:
            raise ValueError("burst_waiting_of_target must increase")
        if self.metric_period_s % self.scrape_interval_s:
            raise ValueError("metric_period_s must be a whole number of scrapes")
        return self


class ScalingFacts(Strict):
    cloudwatch: CloudWatchFacts
    target_tracking: TargetTrackingFacts
    instance_protection: ProtectionFacts
    warm_pool: WarmPoolFacts
    scheduled_actions: ScheduleFacts
    policy: PolicyDesign


@cache
def scaling_facts() -> ScalingFacts:
    return ScalingFacts.model_validate(read_yaml(SCALING_FILE))
