"""A stack's whole offline plan, an immutable value of decisions: config → sizing plan →
validated argv → one node spec per instance type of the fallback ladder.

Pure apart from the optional import of vLLM for validation; no Pulumi. The Pulumi program
and ``vllm-fleet plan`` both start from ``build_stack_plan`` (infra/plan/build.py) so they
can never disagree;
infra/render/stack.py renders a plan's artifacts as a value of their own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from infra.config import PROJECT, StackConfig, check_serving_fits_model, resolve_model
from infra.plan.node.spec import NodeSpec
from infra.plan.planner import Plan, SizingRequest

VALIDATED = "validated"


@dataclass(frozen=True)
class StackPlan:
    config: StackConfig
    plan: Plan
    serve_argv: list[str]
    argv_validation: str  # VALIDATED, or the loud reason validation was skipped
    # Instance type → its node, for every type of the fallback ladder (each type runs vLLM
    # with its own parallelism), the chosen type first. Read-only.
    node_specs: Mapping[str, NodeSpec]

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
        return api_key_secret_name(self.config.stack)


def api_key_secret_name(stack: str) -> str:
    """Deterministic, so user-data can name it without waiting for a Pulumi Output."""
    return f"vllm-fleet/{stack}/api-key"


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
