"""A stack's whole offline plan: config → sizing plan → validated argv → rendered artifacts.

Pure apart from the optional import of vLLM for validation; no Pulumi. The Pulumi program
and ``vllm-fleet plan`` both start from ``build_stack_plan`` so they can never disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from infra.config import PROJECT, StackConfig, check_serving_fits_model, resolve_model
from infra.facts.catalog import default_catalog
from infra.plan.node.from_plan import node_spec
from infra.plan.node.serve_args import build_serve_argv, served_model_name
from infra.plan.node.spec import NodeSpec
from infra.plan.planner import Plan, SizingRequest, make_plan
from infra.render.monitoring import MonitoringSpec, render_monitoring
from infra.render.node import render_node, render_user_data

VALIDATED = "validated"
# The tag that marks a fleet's GPU nodes: Prometheus discovers them by it, and the ASG
# propagates it at launch (infra/components/fleet.py).
STACK_TAG_KEY = "vllm-fleet:stack"


@dataclass(frozen=True)
class StackPlan:
    config: StackConfig
    plan: Plan
    serve_argv: list[str]
    argv_validation: str  # VALIDATED, or the loud reason validation was skipped
    artifacts: dict[str, str] = field(default_factory=dict)  # relative path → content
    # cloud-init user-data per instance type of the fallback ladder (each type runs vLLM
    # with its own parallelism), filled from infra/render/node.py.
    user_data: dict[str, str] = field(default_factory=dict)
    node_specs: dict[str, NodeSpec] = field(default_factory=dict)  # instance type → spec

    @property
    def warnings(self) -> list[str]:
        """Things a reviewer should see that are allowed but risky."""
        found = []
        revision = self.config.model.revision
        if not re.fullmatch(r"[0-9a-f]{40}", revision) and not self.config.stack.startswith("dev"):
            found.append(
                f"vllm-fleet:model.revision = {revision!r} is not a commit sha: nodes booted on "
                "different days may load different weights; pin the repo's commit"
            )
        capacity = self.plan.chosen.capacity
        needed = capacity.replicas_needed if capacity is not None else None
        if needed is not None and capacity is not None and needed > self.config.capacity.max_replicas:
            found.append(
                f"vllm-fleet:capacity.maxReplicas = {self.config.capacity.max_replicas}: the workload's peak of "
                f"{capacity.peak_requests_per_s or 0:,.1f} requests/s needs {needed} replicas at the SLO"
            )
        return found

    @property
    def autoscaling_group_name(self) -> str:
        """The prefix every Auto Scaling group of the stack is named with (AWS adds a suffix);
        the deployed monitoring config carries the exact names, known only after creation."""
        return group_name_prefix(self.config.stack)

    @property
    def api_key_secret_name(self) -> str:
        """Deterministic, so user-data can name it without waiting for a Pulumi Output."""
        return f"vllm-fleet/{self.config.stack}/api-key"


def group_name_prefix(stack: str) -> str:
    """Every group of the stack is named ``vllm-fleet.<stack>.<key>-<suffix>``: the dots make
    the IAM pattern match this stack's groups only (stack names have none)."""
    return f"vllm-fleet.{stack}."


def sizing_request(config: StackConfig) -> SizingRequest:
    name, arch = resolve_model(config)
    check_serving_fits_model(
        arch, config.serving.quantization, config.serving.max_model_len,
        quant_key=f"{PROJECT}:serving.quantization", len_key=f"{PROJECT}:serving.maxModelLen",
        from_config_json=config.model.catalog is None,
    )
    return SizingRequest(
        model_name=name,
        arch=arch,
        quantization=config.serving.quantization,
        max_model_len=config.serving.max_model_len,
        concurrency=config.serving.concurrency,
        instance_types=tuple(config.capacity.instance_types),
        max_nodes_per_replica=config.capacity.max_nodes_per_replica,
        weights_source=config.serving.weights_source,
        workload=config.resolved_workload(),
        region=config.region,
        market=config.capacity.market,
        max_replicas_per_node=max_servers_per_node(config),
    )


def max_servers_per_node(config: StackConfig) -> int:
    """Each vLLM server on a node has its own port and target group: an ALB's forward action
    takes a few (aws_fleet.yaml), an NLB listener one (infra/components/endpoint.py)."""
    from infra.facts.aws import aws_fleet_facts

    if config.endpoint.type == "nlb":
        return 1
    return aws_fleet_facts().alb_forward_max_target_groups.value


def validate_argv(argv: list[str], *, required: bool = False) -> str:
    """Check argv with the pinned vLLM's parser; say loudly when vLLM isn't importable."""
    from infra.plan.node import vllm_cli

    if not vllm_cli.vllm_importable():
        if required:
            raise RuntimeError("vLLM must be importable to validate serve argv here")
        # Flag names, switches and arities still are checked, against the pinned parser's table.
        vllm_cli.check_serve_flags(argv)
        return (
            "vLLM is not importable here: the serve flags were checked against the pinned parser's "
            "flag table, but their values were NOT validated by vLLM's parser"
        )
    vllm_cli.validate_serve_argv(argv)
    return VALIDATED


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
        stack_tag_key=STACK_TAG_KEY,
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
