"""The fleet's front door: a load balancer that exposes only the OpenAI API.

An ALB terminates TLS (a modern TLS 1.3 policy) and forwards exactly the API routes the
fleet serves (infra/facts/data/aws_fleet.yaml ``vllm_api_routes``); everything else — /metrics,
/tokenize, /scale_elastic_ep, /docs … which vLLM serves without the API key — gets a 404
from the listener itself. One target group per vLLM server slot on a node (a node runs
``replicas_per_node`` servers on consecutive ports), least-outstanding-requests balancing,
no stickiness, and a deregistration delay that covers vLLM's own shutdown drain.

An NLB works at L4 and cannot filter paths: every unauthenticated vLLM endpoint would be
reachable by whoever reaches the NLB. So an NLB is allowed only internal (inside the VPC,
from ``allowedCidrs``); a public NLB is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_aws as aws

from infra.components.security_group import SecurityGroupRules, security_group
from infra.facts.aws import aws_fleet_facts
from infra.plan.endpoint import route_rules
from infra.plan.public_api import NOT_FOUND_BODY


@dataclass(frozen=True)
class EndpointArgs:
    stack: str
    vpc_id: pulumi.Input[str]
    vpc_cidr: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    tags: Mapping[str, str]
    app_port: int
    replica_slots: int
    deregistration_delay_s: int
    lb_type: Literal["alb", "nlb"]
    internal: bool
    allowed_cidrs: Sequence[str]
    certificate_arn: str | None
    idle_timeout_s: int


class Endpoint(pulumi.ComponentResource):
    url: pulumi.Output[str]
    dns_name: pulumi.Output[str]
    load_balancer_arn: pulumi.Output[str]
    load_balancer_arn_suffix: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    target_group_arns: list[pulumi.Output[str]]
    target_group_arn_suffixes: list[pulumi.Output[str]]

    def __init__(self, name: str, args: EndpointArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:endpoint:Endpoint", name, None, opts)
        # The program checked these values (infra/plan/endpoint.py check_endpoint) before declaring
        # any resource, so a refused endpoint leaves nothing half-created.
        facts = aws_fleet_facts()
        child = pulumi.ResourceOptions(parent=self)
        tags = {**args.tags, "vllm-fleet:role": "endpoint"}
        tls = args.certificate_arn is not None
        listen_port = 443 if tls else 80
        last_port = args.app_port + args.replica_slots - 1

        sg = security_group(
            f"{name}-sg", vpc_id=args.vpc_id, name_tag=f"{args.stack}-endpoint", tags=tags, opts=child,
            description=f"{args.stack} API load balancer: clients in allowedCidrs on {listen_port} only",
        )
        rules = SecurityGroupRules(name, sg.id, tags, child)
        for i, cidr in enumerate(args.allowed_cidrs):
            rules.ingress(str(i), f"API clients {cidr}", ports=listen_port, cidr=cidr)
        rules.egress(
            "nodes", "vLLM servers on the nodes (requests and health checks)",
            ports=(args.app_port, last_port), cidr=args.vpc_cidr,
        )

        is_alb = args.lb_type == "alb"
        lb = aws.lb.LoadBalancer(
            f"{name}-lb",
            load_balancer_type="application" if is_alb else "network",
            internal=args.internal,
            subnets=list(args.subnet_ids),
            security_groups=[sg.id],
            idle_timeout=args.idle_timeout_s if is_alb else None,
            drop_invalid_header_fields=True if is_alb else None,
            tags={**tags, "Name": f"{args.stack}-api"},
            opts=child,
        )

        health = aws.lb.TargetGroupHealthCheckArgs(
            enabled=True,
            protocol="HTTP",
            path=facts.vllm_health_path.value,
            port="traffic-port",
            matcher="200",
            interval=15,
            timeout=5,
            healthy_threshold=2,
            unhealthy_threshold=3,
        )
        target_groups: list[aws.lb.TargetGroup] = []
        for slot in range(args.replica_slots):
            target_groups.append(
                aws.lb.TargetGroup(
                    f"{name}-tg-{slot}",
                    port=args.app_port + slot,
                    protocol="HTTP" if is_alb else "TCP",
                    target_type="instance",
                    vpc_id=args.vpc_id,
                    health_check=health,
                    # Outlasts the longest stream and vLLM's --shutdown-timeout (infra/plan/drain.py):
                    # the node stops vLLM only after this, or once nothing is in flight.
                    deregistration_delay=args.deregistration_delay_s,
                    load_balancing_algorithm_type="least_outstanding_requests" if is_alb else None,
                    stickiness=aws.lb.TargetGroupStickinessArgs(type="lb_cookie", enabled=False) if is_alb else None,
                    tags={**tags, "Name": f"{args.stack}-vllm-{slot}", "vllm-fleet:port": str(args.app_port + slot)},
                    opts=child,
                )
            )

        # An ALB answers only the OpenAI API routes and 404s the rest; an NLB forwards TCP/TLS.
        if is_alb:
            protocol = "HTTPS" if tls else "HTTP"
            default_action = aws.lb.ListenerDefaultActionArgs(
                type="fixed-response",
                fixed_response=aws.lb.ListenerDefaultActionFixedResponseArgs(
                    content_type="application/json", message_body=NOT_FOUND_BODY, status_code="404"
                ),
            )
        else:
            protocol = "TLS" if tls else "TCP"
            default_action = aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=target_groups[0].arn)
        listener = aws.lb.Listener(
            f"{name}-listener",
            load_balancer_arn=lb.arn,
            port=listen_port,
            protocol=protocol,
            ssl_policy=facts.alb_tls_policy.value if tls else None,
            certificate_arn=args.certificate_arn,
            default_actions=[default_action],
            tags=tags,
            opts=child,
        )
        if is_alb:
            forward = self._forward_action(target_groups)
            for i, (method, paths) in enumerate(route_rules(facts.vllm_api_routes.value, facts.alb_rule_limits.value)):
                aws.lb.ListenerRule(
                    f"{name}-api-{i}",
                    listener_arn=listener.arn,
                    priority=10 * (i + 1),
                    conditions=[
                        aws.lb.ListenerRuleConditionArgs(
                            http_request_method=aws.lb.ListenerRuleConditionHttpRequestMethodArgs(values=[method])
                        ),
                        aws.lb.ListenerRuleConditionArgs(
                            path_pattern=aws.lb.ListenerRuleConditionPathPatternArgs(values=paths)
                        ),
                    ],
                    actions=[forward],
                    tags=tags,
                    opts=child,
                )

        scheme = "https" if tls else "http"
        self.dns_name = lb.dns_name
        self.url = lb.dns_name.apply(lambda dns: f"{scheme}://{dns}")
        self.load_balancer_arn = lb.arn
        self.load_balancer_arn_suffix = lb.arn_suffix
        self.security_group_id = sg.id
        self.target_group_arns = [tg.arn for tg in target_groups]
        self.target_group_arn_suffixes = [tg.arn_suffix for tg in target_groups]
        self.register_outputs(
            {
                "url": self.url,
                "loadBalancerArn": self.load_balancer_arn,
                "securityGroupId": self.security_group_id,
                "targetGroupArns": self.target_group_arns,
                "listenerArn": listener.arn,
            }
        )

    @staticmethod
    def _forward_action(target_groups: list[aws.lb.TargetGroup]) -> aws.lb.ListenerRuleActionArgs:
        if len(target_groups) == 1:
            return aws.lb.ListenerRuleActionArgs(type="forward", target_group_arn=target_groups[0].arn)
        # Several vLLM servers per node: spread requests evenly over their target groups.
        return aws.lb.ListenerRuleActionArgs(
            type="forward",
            forward=aws.lb.ListenerRuleActionForwardArgs(
                target_groups=[
                    aws.lb.ListenerRuleActionForwardTargetGroupArgs(arn=tg.arn, weight=1) for tg in target_groups
                ],
                stickiness=aws.lb.ListenerRuleActionForwardStickinessArgs(enabled=False, duration=1),
            ),
        )
