"""The fleet's CrossGuard policy pack: guardrails every ``pulumi preview/up`` must pass.

Validators are plain functions over a resource's type and (camelCase) properties, wrapped in
mandatory ``ResourceValidationPolicy`` objects; ``policy/__main__.py`` only builds the pack
from ``POLICIES``. Keeping the checks here lets the tests call each policy directly and run
the whole pack over the program's mocked resources, without the CLI (constructing a
``PolicyPack`` starts a gRPC server and never returns).

Properties arrive as a real policy run delivers them: secrets already unwrapped, so "is it a
secret" cannot be read from a value; the pack checks what can be: that the key's secret
version declares its value secret, and that no launch template carries a key-like string.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.plan.tags import IMAGES_REQUIRED_TAG_KEYS, INSTANCE_TYPE_TAG, REQUIRED_TAG_KEYS, ROLE_TAG
from infra.render.userdata import decode_user_data

PACK_NAME = "vllm-fleet-guardrails"

LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
AUTOSCALING_GROUP = "aws:autoscaling/group:Group"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SECURITY_GROUP_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS_RULE = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
SECRET_VERSION = "aws:secretsmanager/secretVersion:SecretVersion"
LISTENER = "aws:lb/listener:Listener"
LOAD_BALANCER = "aws:lb/loadBalancer:LoadBalancer"

# AWS resource types the program uses that take no ``tags`` (checked against the
# pulumi-aws classes by the tests).
TAGLESS_TYPES = frozenset(
    {
        "aws:iam/rolePolicy:RolePolicy",
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
        "aws:secretsmanager/secretVersion:SecretVersion",
        "aws:ec2/routeTableAssociation:RouteTableAssociation",
        "aws:autoscaling/policy:Policy",
        "aws:autoscaling/schedule:Schedule",
        "aws:autoscaling/lifecycleHook:LifecycleHook",
        "aws:s3/bucketPolicy:BucketPolicy",
        "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
        "aws:amp/alertManagerDefinition:AlertManagerDefinition",
    }
)

WORLD = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
HTTPS_PORT = 443
SSH_PORT = 22
MODERN_TLS_PREFIX = "ELBSecurityPolicy-TLS13-"

# Strings that must never be in user-data or tags: a literal key handed to vLLM, provider
# tokens, AWS access keys, private keys.
SECRET_PATTERNS = (
    re.compile(r"VLLM_API_KEY\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{8,}"),
    # As an argv token in any form: "--api-key=K", "--api-key K", YAML/JSON "--api-key", "K".
    re.compile(r"--api[-_]key['\"]?\s*[=,\s]\s*['\"]?[A-Za-z0-9_\-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*[=:]", re.IGNORECASE),
)

Validator = Callable[[ResourceValidationArgs, ReportViolation], None]
StackValidator = Callable[[StackValidationArgs, ReportViolation], None]
Policy = ResourceValidationPolicy | StackValidationPolicy
EFA_INTERFACE_TYPES = ("efa", "efa-only")


# --- helpers ---------------------------------------------------------------------------------
def tags_of(resource_type: str, props: Mapping[str, Any]) -> dict[str, str]:
    """A resource's tags; an Auto Scaling group lists them as {key, value, propagateAtLaunch}."""
    raw = props.get("tags")
    if resource_type == AUTOSCALING_GROUP:
        return {str(t.get("key")): str(t.get("value")) for t in raw or [] if isinstance(t, Mapping)}
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    return {}


def secret_like(text: str) -> str | None:
    for pattern in SECRET_PATTERNS:
        match = pattern.search(text)
        if match:
            return pattern.pattern
    return None


def _ports(low: Any, high: Any, protocol: Any) -> tuple[int, int]:
    if str(protocol) in ("-1", "all"):
        return 0, 65535
    lo = int(low) if low is not None else 0
    hi = int(high) if high is not None else lo
    return lo, hi


def _is_world(cidr: Any) -> bool:
    try:
        return ipaddress.ip_network(str(cidr), strict=False) in WORLD
    except ValueError:
        return False


class Ingress:
    """One ingress permission, whichever resource declared it."""

    def __init__(
        self, protocol: Any, low: Any, high: Any, cidrs: Iterable[Any], sources: Iterable[Any], self_ref: bool
    ) -> None:
        self.protocol = str(protocol)
        self.low, self.high = _ports(low, high, protocol)
        self.cidrs = [str(c) for c in cidrs if c]
        self.sources = [s for s in sources if s is not None]
        self.self_ref = self_ref

    def covers(self, port: int) -> bool:
        return self.low <= port <= self.high


def _classic_ingress(rule: Mapping[str, Any], sources: list[Any]) -> Ingress:
    """A rule in the ec2.SecurityGroup/SecurityGroupRule shape (they differ in the source key)."""
    cidrs = [*(rule.get("cidrBlocks") or []), *(rule.get("ipv6CidrBlocks") or [])]
    return Ingress(rule.get("protocol"), rule.get("fromPort"), rule.get("toPort"), cidrs, sources, bool(rule.get("self")))


def ingresses(resource_type: str, props: Mapping[str, Any]) -> list[Ingress]:
    if resource_type == SECURITY_GROUP:
        return [
            _classic_ingress(rule, rule.get("securityGroups") or [])
            for rule in props.get("ingress") or []
            if isinstance(rule, Mapping)
        ]
    if resource_type == SECURITY_GROUP_RULE and props.get("type") == "ingress":
        return [_classic_ingress(props, [props.get("sourceSecurityGroupId")])]
    if resource_type == INGRESS_RULE:
        referenced = props.get("referencedSecurityGroupId")
        return [
            Ingress(
                props.get("ipProtocol"),
                props.get("fromPort"),
                props.get("toPort"),
                [props.get("cidrIpv4"), props.get("cidrIpv6")],
                [referenced],
                # Unknown ids (a preview of a new stack) cannot be compared; equal when known.
                referenced == props.get("securityGroupId"),
            )
        ]
    return []


# --- validators ------------------------------------------------------------------------------
def validate_encrypted_volumes(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != LAUNCH_TEMPLATE:
        return
    mappings = [m for m in args.props.get("blockDeviceMappings") or [] if isinstance(m, Mapping)]
    if not mappings:
        report("declare the root volume (blockDeviceMappings) so its encryption is explicit", None)
    for mapping in mappings:
        ebs = mapping.get("ebs")
        if isinstance(ebs, Mapping) and str(ebs.get("encrypted")).lower() != "true":
            report(f"EBS volume {mapping.get('deviceName')} is not encrypted (ebs.encrypted must be \"true\")", None)


def validate_imdsv2(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != LAUNCH_TEMPLATE:
        return
    options = args.props.get("metadataOptions") or {}
    if options.get("httpTokens") != "required":
        report("instance metadata must require IMDSv2 tokens (metadataOptions.httpTokens = required)", None)
    hops = options.get("httpPutResponseHopLimit")
    if hops is not None and int(hops) > 2:
        report(f"metadata hop limit {hops} lets containers and forwarded traffic reach the role; use 1 or 2", None)


def validate_no_world_ingress(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for rule in ingresses(args.resource_type, args.props):
        for cidr in rule.cidrs:
            if _is_world(cidr) and not (rule.protocol == "tcp" and rule.low == rule.high == HTTPS_PORT):
                report(f"ingress from {cidr} on ports {rule.low}-{rule.high}: the internet may reach only HTTPS (443)", None)


def validate_nodes_admit_security_groups_only(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """The GPU nodes (app and metrics ports) take traffic only from named security groups."""
    if tags_of(args.resource_type, args.props).get(ROLE_TAG) != "node":
        return
    for rule in ingresses(args.resource_type, args.props):
        if rule.cidrs:
            report(
                f"node ingress on ports {rule.low}-{rule.high} from {', '.join(rule.cidrs)}: nodes admit only the "
                "load balancer's and the scrapers' security groups",
                None,
            )


def validate_no_ssh(args: ResourceValidationArgs, report: ReportViolation) -> None:
    for rule in ingresses(args.resource_type, args.props):
        if not rule.covers(SSH_PORT):
            continue
        if rule.cidrs or (rule.sources and not rule.self_ref):
            report(
                f"ingress on ports {rule.low}-{rule.high} includes SSH (22); use SSM Session Manager "
                "(only a group's own members may exchange all traffic, for EFA)",
                None,
            )


def validate_no_plaintext_secrets(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type == SECRET_VERSION:
        if "secretString" not in (args.opts.additional_secret_outputs or []):
            report("the secret version must mark secretString secret (additionalSecretOutputs)", None)
        return
    for key, value in tags_of(args.resource_type, args.props).items():
        pattern = secret_like(f"{key}={value}")
        if pattern:
            report(f"tag {key} looks like a credential ({pattern}); tags are readable by anyone who can describe", None)
    if args.resource_type != LAUNCH_TEMPLATE:
        return
    encoded = args.props.get("userData")
    if encoded is None:
        return
    text = decode_user_data(str(encoded))
    if text is None:
        report("userData is not base64 (of optionally gzipped text)", None)
        return
    pattern = secret_like(text)
    if pattern:
        report(f"userData contains a credential-like string ({pattern}); nodes fetch secrets at boot instead", None)


def validate_instance_types(args: ResourceValidationArgs, report: ReportViolation) -> None:
    planned = (args.get_config() or {}).get("plannedInstanceTypes") or []
    if args.resource_type == LAUNCH_TEMPLATE:
        instance_type = args.props.get("instanceType")
        tagged = tags_of(args.resource_type, args.props).get(INSTANCE_TYPE_TAG)
        if not instance_type:
            report("the launch template must name its instance type (one template per planned type)", None)
        elif tagged != instance_type:
            report(f"instanceType {instance_type} differs from its {INSTANCE_TYPE_TAG} tag {tagged!r}", None)
        elif planned and instance_type not in planned:
            report(f"instanceType {instance_type} is not in the plan ({', '.join(planned)})", None)
    elif args.resource_type == AUTOSCALING_GROUP and planned:
        policy = args.props.get("mixedInstancesPolicy") or {}
        overrides = (policy.get("launchTemplate") or {}).get("overrides") or []
        for override in overrides:
            instance_type = override.get("instanceType")
            if instance_type and instance_type not in planned:
                report(f"override instanceType {instance_type} is not in the plan ({', '.join(planned)})", None)


def validate_required_tags(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if not args.resource_type.startswith("aws:") or args.resource_type in TAGLESS_TYPES:
        return
    # A fleet's keys unless the pack config names others (an image-build stack's).
    required = tuple((args.get_config() or {}).get("requiredTagKeys") or REQUIRED_TAG_KEYS)
    tags = tags_of(args.resource_type, args.props)
    missing = [key for key in required if not tags.get(key)]
    if missing:
        report(f"missing tags: {', '.join(missing)}", None)
    if args.resource_type == AUTOSCALING_GROUP:
        unpropagated = [
            str(t.get("key"))
            for t in args.props.get("tags") or []
            if t.get("key") in required and not t.get("propagateAtLaunch")
        ]
        if unpropagated:
            report(f"tags not propagated to instances: {', '.join(unpropagated)}", None)
    if args.resource_type == LAUNCH_TEMPLATE:
        for spec in args.props.get("tagSpecifications") or []:
            absent = [key for key in required if not (spec.get("tags") or {}).get(key)]
            if absent:
                report(f"tagSpecifications[{spec.get('resourceType')}] lacks {', '.join(absent)}", None)


def validate_modern_tls(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != LISTENER or args.props.get("protocol") not in ("HTTPS", "TLS"):
        return
    policy = str(args.props.get("sslPolicy") or "")
    if not policy.startswith(MODERN_TLS_PREFIX):
        report(f"TLS listener policy {policy or '(default ELBSecurityPolicy-2016-08)'}: use a TLS 1.3 policy "
               f"({aws_fleet_facts().alb_tls_policy.value})", None)


def validate_alb_header_hygiene(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != LOAD_BALANCER or args.props.get("loadBalancerType") not in (None, "application"):
        return
    if args.props.get("dropInvalidHeaderFields") is not True:
        report("the ALB must drop invalid HTTP header fields (dropInvalidHeaderFields)", None)


def validate_replacement_keeps_capacity(args: ResourceValidationArgs, report: ReportViolation) -> None:
    if args.resource_type != AUTOSCALING_GROUP:
        return
    if args.props.get("targetGroupArns") and args.props.get("healthCheckType") != "ELB":
        report("a group behind a target group must use ELB health checks", None)
    refresh = args.props.get("instanceRefresh")
    if refresh:
        prefs = refresh.get("preferences") or {}
        low, high = prefs.get("minHealthyPercentage"), prefs.get("maxHealthyPercentage")
        if low is None or int(low) < 100 or high is None or int(high) <= 100:
            report(
                f"instance refresh min/max healthy {low}/{high}: must be 100 and above 100 (launch before terminate)",
                None,
            )


def validate_group_force_new_inputs(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """A group's initial_lifecycle_hooks are ForceNew (aws_fleet.yaml
    initial_lifecycle_hook_force_new): a changed hook replaces the group and every node in it.
    Only a launch hook, which must exist before the first instance, belongs there; a
    terminating hook's timeout follows the drain, so it is an aws.autoscaling.LifecycleHook."""
    if args.resource_type != AUTOSCALING_GROUP:
        return
    for hook in args.props.get("initialLifecycleHooks") or []:
        if isinstance(hook, Mapping) and hook.get("lifecycleTransition") != "autoscaling:EC2_INSTANCE_LAUNCHING":
            report(
                f"initial lifecycle hook {hook.get('name')!r} ({hook.get('lifecycleTransition')}): initial hooks "
                "are ForceNew, so changing it replaces the group; declare it as aws.autoscaling.LifecycleHook",
                None,
            )


def validate_group_waits_for_healthy_targets(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """A group behind target groups makes `pulumi up` wait until its first nodes serve
    (aws_fleet.yaml elb_capacity_wait); otherwise the deploy's smoke test meets no healthy target."""
    if args.resource_type != AUTOSCALING_GROUP or not args.props.get("targetGroupArns"):
        return
    floor = args.props.get("minSize") or 0
    waits = args.props.get("minElbCapacity") or args.props.get("waitForElbCapacity") or 0
    if int(floor) > 0 and int(waits) < int(floor):
        report(
            f"minElbCapacity {waits or 'unset'} below minSize {floor}: `pulumi up` would return before the "
            "load balancer has a healthy target",
            None,
        )


def validate_names_within_limits(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """Names and name prefixes AWS would reject as too long (aws_fleet.yaml name_limits)."""
    for prop, limit in aws_fleet_facts().name_limits.value.get(args.resource_type, {}).items():
        value = args.props.get(prop)
        if isinstance(value, str) and len(value) > limit:
            report(f"{prop} {value!r} has {len(value)} characters; AWS takes at most {limit}", None)


# --- stack validators (rules that relate several resources) -----------------------------------
def _of_type(args: StackValidationArgs, resource_type: str) -> list[PolicyResource]:
    return [r for r in args.resources if r.resource_type == resource_type]


def _self_rule(props: Mapping[str, Any], group_id: Any) -> bool:
    """An all-traffic rule of ``group_id`` that names the group itself (not a CIDR). In a
    preview of a new stack both ids are unknown (None): equal, like the rule the program writes."""
    return (
        str(props.get("ipProtocol")) == "-1"
        and "referencedSecurityGroupId" in props
        and not props.get("cidrIpv4")
        and not props.get("cidrIpv6")
        and props.get("securityGroupId") == group_id
        and props.get("referencedSecurityGroupId") == group_id
    )


def validate_efa_self_traffic(args: StackValidationArgs, report: ReportViolation) -> None:
    """EFA needs its security group to allow all traffic in AND out to the group itself;
    EFA traffic matches no CIDR rule (aws_fleet.yaml ``efa_security_group``)."""
    ingress_rules = [r.props for r in _of_type(args, INGRESS_RULE)]
    egress_rules = [r.props for r in _of_type(args, EGRESS_RULE)]
    for template in _of_type(args, LAUNCH_TEMPLATE):
        for nic in template.props.get("networkInterfaces") or []:
            if not isinstance(nic, Mapping) or nic.get("interfaceType") not in EFA_INTERFACE_TYPES:
                continue
            for group_id in nic.get("securityGroups") or [None]:
                for direction, rules in (("ingress", ingress_rules), ("egress", egress_rules)):
                    if not any(_self_rule(rule, group_id) for rule in rules):
                        report(
                            f"launch template {template.name}: EFA interface in security group {group_id or '(new)'} "
                            f"without an all-traffic {direction} rule to the group itself; "
                            f"EFA needs {aws_fleet_facts().efa_security_group.value}",
                            template.urn,
                        )
                break  # every interface of a template carries the same groups


NAT_GATEWAY = "aws:ec2/natGateway:NatGateway"
VPC_ENDPOINT = "aws:ec2/vpcEndpoint:VpcEndpoint"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
# An IAM action prefix whose PrivateLink service is named differently.
# CloudWatch metrics (cloudwatch:PutMetricData, the nodes' scaling signal) is
# com.amazonaws.<region>.monitoring (docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/cloudwatch-and-interface-VPC.html).
ENDPOINT_SERVICE_OF_PREFIX = {"aps": "aps-workspaces", "cloudwatch": "monitoring"}


def _called_services(policy_json: Any) -> set[str]:
    """The AWS services a role's inline policy lets it call directly: action prefixes, except
    statements only usable through another service (a kms:ViaService condition)."""
    try:
        doc = json.loads(str(policy_json))
    except ValueError:
        return set()
    services: set[str] = set()
    for statement in doc.get("Statement") or []:
        if "kms:ViaService" in json.dumps(statement.get("Condition") or {}):
            continue
        actions = statement.get("Action") or []
        for action in [actions] if isinstance(actions, str) else actions:
            prefix = str(action).split(":")[0]
            services.add(ENDPOINT_SERVICE_OF_PREFIX.get(prefix, prefix))
    return services


def validate_endpoints_only_reaches_every_api(args: StackValidationArgs, report: ReportViolation) -> None:
    """A VPC with endpoints and no NAT gateway reaches only the services it has endpoints for:
    every service a role's inline policy calls needs one (aws_fleet.yaml vpc_interface_endpoints)."""
    endpoints = _of_type(args, VPC_ENDPOINT)
    if not endpoints or _of_type(args, NAT_GATEWAY):
        return
    reachable = {str(e.props.get("serviceName") or "").split(".", 3)[-1] for e in endpoints}
    for policy_resource in _of_type(args, ROLE_POLICY):
        if policy_resource.props.get("policy") is None:
            continue  # built from ARNs a preview of a new stack does not know yet
        missing = sorted(_called_services(policy_resource.props["policy"]) - reachable)
        if missing:
            report(
                f"{policy_resource.name}: the role calls {', '.join(missing)}, which a network without NAT "
                "reaches only through VPC endpoints; none is declared",
                policy_resource.urn,
            )


def validate_capacity_block_scope(args: StackValidationArgs, report: ReportViolation) -> None:
    """A capacity block is one instance type in one AZ (aws_fleet.yaml capacity_block_scope):
    its templates share one type and reservation, and every group launches in one subnet."""
    scope = aws_fleet_facts().capacity_block_scope.value
    blocks = [
        t for t in _of_type(args, LAUNCH_TEMPLATE)
        if (t.props.get("instanceMarketOptions") or {}).get("marketType") == "capacity-block"
    ]  # fmt: skip
    if not blocks:
        return
    types = sorted({str(t.props.get("instanceType")) for t in blocks})
    if len(types) > scope.instance_types:
        report(f"capacity-block launch templates for {', '.join(types)}: a block reserves one instance type", None)
    for group in _of_type(args, AUTOSCALING_GROUP):
        subnets = group.props.get("vpcZoneIdentifiers") or []
        if len(subnets) > scope.availability_zones:
            report(
                f"group {group.name} launches capacity-block instances in {len(subnets)} subnets; a block is in "
                "one Availability Zone, so the group takes only the subnet there",
                group.urn,
            )
        overrides = ((group.props.get("mixedInstancesPolicy") or {}).get("launchTemplate") or {}).get("overrides") or []
        if len(overrides) > scope.instance_types:
            report(f"group {group.name} overrides {len(overrides)} instance types on a capacity block", group.urn)


# --- the policies ----------------------------------------------------------------------------
def _stack_policy(name: str, description: str, validate: StackValidator) -> StackValidationPolicy:
    return StackValidationPolicy(
        name=name, description=description, validate=validate, enforcement_level=EnforcementLevel.MANDATORY
    )


def _policy(name: str, description: str, validate: Validator, config_schema: PolicyConfigSchema | None = None) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=config_schema,
    )


def _string_list_config(key: str) -> PolicyConfigSchema:
    """A policy's configuration: one list of strings under ``key`` (the program's planned values)."""
    return PolicyConfigSchema(properties={key: {"type": "array", "items": {"type": "string"}}})


POLICIES: Sequence[Policy] = (
    _policy("ebs-volumes-encrypted", "Launch-template EBS volumes are declared and encrypted.", validate_encrypted_volumes),
    _policy("imdsv2-required", "Instances require IMDSv2 tokens with a short hop limit.", validate_imdsv2),
    _policy("no-world-ingress", "Nothing but HTTPS is open to 0.0.0.0/0 or ::/0.", validate_no_world_ingress),
    _policy(
        "nodes-admit-security-groups-only",
        "The GPU nodes' app and metrics ports admit only security groups, never CIDRs.",
        validate_nodes_admit_security_groups_only,
    ),
    _policy("no-ssh-ingress", "No security group admits SSH; nodes are reached through SSM.", validate_no_ssh),
    _policy(
        "no-plaintext-secrets",
        "No credential in user-data or tags; the API key's secret version keeps its value secret.",
        validate_no_plaintext_secrets,
    ),
    _policy(
        "instance-type-matches-plan",
        "Launch templates and overrides use the plan's instance types.",
        validate_instance_types,
        _string_list_config("plannedInstanceTypes"),
    ),
    _policy(
        "required-tags",
        "Every taggable resource carries the stack, model, quantization and plan tags (an image stack's: stack and image).",
        validate_required_tags,
        _string_list_config("requiredTagKeys"),
    ),
    _policy("modern-tls", "TLS listeners use a TLS 1.3 security policy.", validate_modern_tls),
    _policy("alb-drops-invalid-headers", "ALBs drop invalid header fields.", validate_alb_header_hygiene),
    _policy(
        "replacement-keeps-capacity",
        "Groups behind a load balancer use its health checks and refresh without dropping capacity.",
        validate_replacement_keeps_capacity,
    ),
    _policy(
        "group-force-new-inputs",
        "A group's ForceNew initial lifecycle hooks hold only its launch hook; the drain hook is a resource of its own.",
        validate_group_force_new_inputs,
    ),
    _policy(
        "group-waits-for-healthy-targets",
        "A group behind a load balancer makes the first `pulumi up` wait for healthy targets.",
        validate_group_waits_for_healthy_targets,
    ),
    _policy("names-within-limits", "Names and name prefixes fit AWS's length limits.", validate_names_within_limits),
    _stack_policy(
        "endpoints-only-reaches-every-api",
        "Without a NAT gateway, every AWS service a role calls has a VPC endpoint.",
        validate_endpoints_only_reaches_every_api,
    ),
    _stack_policy(
        "capacity-block-scope",
        "A capacity block's instances launch as one type in one Availability Zone.",
        validate_capacity_block_scope,
    ),
    _stack_policy(
        "efa-self-traffic",
        "A security group on an EFA interface allows all traffic in and out to itself.",
        validate_efa_self_traffic,
    ),
)


def policy_config(planned_instance_types: Sequence[str]) -> dict[str, Any]:
    """``--policy-pack-config`` content for a stack: the plan's instance types."""
    return {"instance-type-matches-plan": {"plannedInstanceTypes": list(planned_instance_types)}}


def images_policy_config() -> dict[str, Any]:
    """``--policy-pack-config`` content for an image-build stack: no model, no plan."""
    return {"required-tags": {"requiredTagKeys": list(IMAGES_REQUIRED_TAG_KEYS)}}


# --- running the pack without the CLI -------------------------------------------------------
class Violation:
    def __init__(self, policy: str, resource_type: str, name: str, message: str) -> None:
        self.policy, self.resource_type, self.name, self.message = policy, resource_type, name, message

    def __repr__(self) -> str:
        return f"{self.policy}: {self.resource_type} {self.name}: {self.message}"


def validation_args(
    resource_type: str,
    props: Mapping[str, Any],
    *,
    name: str = "r",
    urn: str | None = None,
    additional_secret_outputs: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
) -> ResourceValidationArgs:
    """What the engine hands a resource policy, built by hand."""
    options = PolicyResourceOptions(
        protect=False,
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=list(additional_secret_outputs),
        parent=None,
    )
    return ResourceValidationArgs(
        resource_type=resource_type,
        props=props,
        urn=urn or f"urn:pulumi:stack::vllm-fleet::{resource_type}::{name}",
        name=name,
        opts=options,
        provider=None,
        config=config,
    )


def stack_validation_args(
    resources: Iterable[tuple[str, str, Mapping[str, Any], Sequence[str]]], config: Mapping[str, Any] | None = None
) -> StackValidationArgs:
    """What the engine hands a stack policy, built by hand from (type, name, props, secret outputs)."""
    policy_resources = [
        PolicyResource(
            resource_type=resource_type,
            props=props,
            urn=f"urn:pulumi:stack::vllm-fleet::{resource_type}::{name}",
            name=name,
            opts=validation_args(resource_type, props, name=name, additional_secret_outputs=secret_outputs).opts,
            provider=None,
            parent=None,
            dependencies=[],
            property_dependencies={},
        )
        for resource_type, name, props, secret_outputs in resources
    ]
    return StackValidationArgs(resources=policy_resources, config=config)


def run_policy(policy: Policy, args: ResourceValidationArgs | StackValidationArgs) -> list[str]:
    messages: list[str] = []

    def report(message: str, urn: str | None = None) -> None:
        messages.append(message)

    policy.validate(args, report)  # type: ignore[arg-type]
    return messages


def check_resources(
    resources: Iterable[tuple[str, str, Mapping[str, Any], Sequence[str]]],
    pack_config: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Violation]:
    """Every policy over (type, name, engine-form props, additionalSecretOutputs) tuples,
    e.g. the offline plan's records; returns the violations (empty: the pack passes)."""
    resources = list(resources)
    violations: list[Violation] = []
    for policy in POLICIES:
        config = (pack_config or {}).get(policy.name)
        if isinstance(policy, StackValidationPolicy):
            violations += [
                Violation(policy.name, "stack", "-", m)
                for m in run_policy(policy, stack_validation_args(resources, config))
            ]
            continue
        for resource_type, name, props, secret_outputs in resources:
            args = validation_args(
                resource_type, props, name=name, additional_secret_outputs=secret_outputs, config=config
            )
            violations += [Violation(policy.name, resource_type, name, m) for m in run_policy(policy, args)]
    return violations


def require_pack_passes(records: Iterable[Any], pack_config: Mapping[str, Mapping[str, Any]]) -> None:
    """The pack over the offline plan's records (infra.preview.offline.ResourceRecord): one FleetError
    line naming the first violation, as `pulumi preview --policy-pack` would refuse."""
    violations = check_resources(
        [(r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", [])) for r in records if r.custom],
        pack_config,
    )
    if violations:
        first = violations[0]
        raise FleetError(
            f"policy {first.policy} fails on {first.resource_type} {first.name}: {first.message}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else "")
        )
