"""The endpoint's decisions: which load balancers are allowed (only the API is ever exposed),
and the ALB listener rules that forward exactly the API routes. The Endpoint component
(infra/components/endpoint.py) declares them.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.config import EndpointSection
from infra.errors import FleetError
from infra.facts.aws import ApiRoute, RuleLimits, aws_fleet_facts


def check_endpoint(section: EndpointSection, *, replica_slots: int, deregistration_delay_s: int) -> None:
    """Preview-time checks of the stack's endpoint section, with the plan's vLLM servers per node
    (one target group each) and drain: refuse an endpoint that would expose more than the API."""
    facts = aws_fleet_facts()
    lb_type, internal, certificate_arn = section.type, section.internal, section.certificate_arn
    if not internal and not certificate_arn:
        raise FleetError(
            "vllm-fleet:endpoint.certificateArn: required when endpoint.internal is false "
            "(a public endpoint must use TLS; plain HTTP is allowed only for internal endpoints)"
        )
    if lb_type == "nlb" and not internal:
        raise FleetError(
            "vllm-fleet:endpoint.type = \"nlb\": not allowed with internal: false (an NLB cannot filter "
            "paths, so /metrics, /tokenize and vLLM's other unauthenticated endpoints would be public; use alb)"
        )
    if lb_type == "nlb" and replica_slots > 1:
        raise FleetError(
            f"vllm-fleet:endpoint.type = \"nlb\": the plan runs {replica_slots} vLLM servers per node "
            "on separate ports, which needs an ALB's weighted forward; use alb"
        )
    most = facts.alb_forward_max_target_groups.value
    if replica_slots > most:
        raise FleetError(
            f"the plan runs {replica_slots} vLLM servers per node; an ALB forwards to at most {most} "
            "target groups (one per server port): allow larger tensor parallelism or fewer GPUs per node "
            "(vllm-fleet:capacity.instanceTypes)"
        )
    if not section.allowed_cidrs:
        raise FleetError("vllm-fleet:endpoint.allowedCidrs: empty; list the client CIDRs that may call the API")
    if deregistration_delay_s > facts.lb_deregistration_delay_max_s.value:
        raise FleetError(
            f"vllm-fleet:serving.shutdownTimeoutS = {deregistration_delay_s}: the load balancer drains "
            f"for at most {facts.lb_deregistration_delay_max_s.value} s"
        )


def route_rules(routes: Sequence[ApiRoute], limits: RuleLimits) -> list[tuple[str, list[str]]]:
    """(method, paths) per listener rule: one method condition plus one path condition,
    within ALB's per-condition and per-rule comparison-string limits."""
    per_rule = min(limits.values_per_condition, limits.values_per_rule - 1)
    by_method: dict[str, list[str]] = {}
    for route in routes:
        by_method.setdefault(route.method, []).append(route.path)
    rules: list[tuple[str, list[str]]] = []
    for method, paths in by_method.items():
        for start in range(0, len(paths), per_rule):
            rules.append((method, paths[start : start + per_rule]))
    return rules
