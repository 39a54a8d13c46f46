"""A stack plan's artifacts, a value of their own: each fallback instance type's node and
user-data and the monitoring config, rendered from the plan (infra/plan/stack.py), and
written out.

Pure apart from the optional import of vLLM for validation; no Pulumi.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from infra.facts.catalog import default_catalog
from infra.plan.node.serve_args import served_model_name
from infra.plan.stack import StackPlan
from infra.plan.tags import STACK_TAG
from infra.render.monitoring import MonitoringSpec, render_monitoring
from infra.render.node import render_node, render_user_data


def monitoring_spec(stack_plan: StackPlan) -> MonitoringSpec:
    config, plan = stack_plan.config, stack_plan.plan
    instance = default_catalog().instances[plan.layout.instance_type]
    return MonitoringSpec(
        stack_name=config.stack,
        region=config.region,
        stack_tag_key=STACK_TAG,
        stack_tag_value=config.stack,
        time_to_ready_s=plan.time_to_ready.total_s,
        instance_type=plan.layout.instance_type,
        instance_hourly_usd=instance.on_demand_usd_per_hour or 0.0,
        model_name=served_model_name(config, plan.request.model_name),
        autoscaling_group_name=stack_plan.autoscaling_group_name,
        sns_topic_arn=config.monitoring.sns_topic_arn,
        webhook_url=config.monitoring.webhook_url,
        # One TTFT SLO: the one the plan sized batches for (monitoring.ttftP95SloS unless
        # workload.ttftP95Ms states it).
        ttft_p95_slo_s=plan.workload.ttft_p95_ms / 1000,
        # A replica's worth of sequences waiting means the fleet is a replica short.
        queue_threshold=plan.max_num_seqs,
        vllm_port=config.serving.port,
    )


@dataclass(frozen=True)
class StackArtifacts:
    """Files to write under build/<stack>/: relative path → content. Read-only; ``with_files``
    gives a new value with more (the offline preview's resources.json, for one)."""

    files: Mapping[str, str]

    def with_files(self, more: Mapping[str, str]) -> StackArtifacts:
        return StackArtifacts(MappingProxyType({**self.files, **more}))


def stack_user_data(stack_plan: StackPlan) -> dict[str, str]:
    """The cloud-init user-data of every type of the fallback ladder, the chosen type first."""
    return {instance_type: render_user_data(spec) for instance_type, spec in stack_plan.node_specs.items()}


def render_artifacts(stack_plan: StackPlan) -> StackArtifacts:
    summary = {
        "stack": stack_plan.config.stack,
        **stack_plan.plan.summary().as_json(),
        "serve_argv": stack_plan.serve_argv,
        "argv_validation": stack_plan.argv_validation,
        "warnings": stack_plan.warnings,
    }
    files = {
        "plan.json": json.dumps(summary, indent=2) + "\n",
        "vllm-serve.argv": "\n".join(stack_plan.serve_argv) + "\n",
    }
    chosen_type = stack_plan.plan.layout.instance_type
    for path, content in render_node(stack_plan.node_specs[chosen_type]).items():
        files[f"node/{path}"] = content
    for instance_type, user_data in stack_user_data(stack_plan).items():
        files[f"user-data/{instance_type}.yaml"] = user_data
    if stack_plan.config.monitoring.mode != "none":
        for path, content in render_monitoring(monitoring_spec(stack_plan)).items():
            files[f"monitoring/{path}"] = content
    return StackArtifacts(MappingProxyType(files))


def write_artifacts(artifacts: StackArtifacts, target: Path) -> list[Path]:
    """Write every artifact under ``target`` (created), returning the paths, sorted."""
    written = []
    for rel, content in sorted(artifacts.files.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
