"""A stack plan with its artifacts: plans the stack (infra/plan/stack.py), renders each
fallback instance type's node and user-data and the monitoring config, and writes them out.

Pure apart from the optional import of vLLM for validation; no Pulumi.
"""

from __future__ import annotations

import json
from pathlib import Path

from infra.config import StackConfig
from infra.facts.catalog import default_catalog
from infra.plan.node.from_plan import node_spec
from infra.plan.node.serve_args import build_serve_argv, served_model_name
from infra.plan.planner import make_plan
from infra.plan.stack import StackPlan, sizing_request, validate_argv
from infra.plan.tags import STACK_TAG
from infra.render.monitoring import MonitoringSpec, render_monitoring
from infra.render.node import render_node, render_user_data


def build_stack_plan(config: StackConfig, *, validate: bool = True) -> StackPlan:
    plan = make_plan(sizing_request(config))
    argv = build_serve_argv(config, plan)
    validation = validate_argv(argv) if validate else "validation not requested"
    for fallback in plan.fallbacks[1:]:
        if validate:
            validate_argv(build_serve_argv(config, plan, fallback))
    stack_plan = StackPlan(config, plan, argv, validation)
    for rung in plan.fallbacks:
        spec = node_spec(config, plan, rung, api_key_secret_id=stack_plan.api_key_secret_name)
        stack_plan.node_specs[rung.layout.instance_type] = spec
        stack_plan.user_data[rung.layout.instance_type] = render_user_data(spec)
    stack_plan.artifacts.update(render_artifacts(stack_plan))
    return stack_plan


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


def render_artifacts(stack_plan: StackPlan) -> dict[str, str]:
    summary = {
        "stack": stack_plan.config.stack,
        **stack_plan.plan.summary(),
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
    for instance_type, user_data in stack_plan.user_data.items():
        files[f"user-data/{instance_type}.yaml"] = user_data
    if stack_plan.config.monitoring.mode != "none":
        for path, content in render_monitoring(monitoring_spec(stack_plan)).items():
            files[f"monitoring/{path}"] = content
    return files


def write_artifacts(stack_plan: StackPlan, target: Path) -> list[Path]:
    """Write every artifact under ``target`` (created), returning the paths, sorted."""
    written = []
    for rel, content in sorted(stack_plan.artifacts.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
