"""The policy pack, without the CLI: each policy against a violating and a compliant resource
(so every check can fail), then the whole pack over every stack's mocked resources (must pass).
"""

from __future__ import annotations

import ast
import base64
import gzip
import inspect
import re
from functools import cache
from pathlib import Path
from typing import Any

import pulumi_aws as aws
import pytest
import yaml

from infra.config import StackConfig, load_stack_file
from infra.plan.build import build_stack_plan
from infra.plan.scaling import ladder_types
from infra.plan.stack import StackPlan
from infra.plan.tags import INSTANCE_TYPE_TAG, REQUIRED_TAG_KEYS, ROLE_TAG
from infra.preview import offline, policies
from infra.preview.offline import ResourceRecord
from tests.test_program import REFUSED, STACKS

POLICY_DIR = Path(__file__).resolve().parent.parent / "policy"
TAGS = {key: "x" for key in REQUIRED_TAG_KEYS}


def policy(name: str) -> Any:
    (found,) = [p for p in policies.POLICIES if p.name == name]
    return found


def violations(
    name: str, resource_type: str, props: dict[str, Any], *, secret_outputs: tuple[str, ...] = (), config: Any = None
) -> list[str]:
    args = policies.validation_args(resource_type, props, additional_secret_outputs=secret_outputs, config=config)
    return policies.run_policy(policy(name), args)


def user_data(text: str, *, packed: bool = True) -> str:
    raw = text.encode()
    return base64.b64encode(gzip.compress(raw, mtime=0) if packed else raw).decode()


def good_template(**overrides: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "instanceType": "p5.48xlarge",
        "metadataOptions": {"httpTokens": "required", "httpPutResponseHopLimit": 1},
        "blockDeviceMappings": [{"deviceName": "/dev/sda1", "ebs": {"encrypted": "true", "volumeType": "gp3"}}],
        "userData": user_data("#cloud-config\nruncmd: [[systemctl, start, vllm-fleet.target]]\n"),
        "tags": {**TAGS, INSTANCE_TYPE_TAG: "p5.48xlarge"},
        "tagSpecifications": [{"resourceType": "instance", "tags": TAGS}],
    }
    props.update(overrides)
    return props


def test_pack_is_mandatory_and_named() -> None:
    names = [p.name for p in policies.POLICIES]
    assert len(names) == len(set(names)) >= 10
    assert all(p.enforcement_level == policies.EnforcementLevel.MANDATORY for p in policies.POLICIES)


def test_policy_entry_point_only_builds_the_pack() -> None:
    """Building a PolicyPack starts a gRPC server that never returns, so the entry point must
    hold nothing else: one PolicyPack(...) statement over infra.preview.policies.POLICIES."""
    tree = ast.parse((POLICY_DIR / "__main__.py").read_text())
    statements = [s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom)) and not (
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    (build,) = statements
    assert isinstance(build, ast.Expr) and isinstance(build.value, ast.Call)
    assert getattr(build.value.func, "id", None) == "PolicyPack"
    assert "POLICIES" in ast.unparse(build.value)
    manifest = yaml.safe_load((POLICY_DIR / "PulumiPolicy.yaml").read_text())
    assert manifest["runtime"]["name"] == "python"
    assert (POLICY_DIR / manifest["runtime"]["options"]["virtualenv"] / "bin" / "python").exists()


# --- each policy can fail ----------------------------------------------------------------------
def test_ebs_volumes_encrypted() -> None:
    name, lt = "ebs-volumes-encrypted", policies.LAUNCH_TEMPLATE
    assert violations(name, lt, good_template()) == []
    plain = good_template(blockDeviceMappings=[{"deviceName": "/dev/sda1", "ebs": {"encrypted": "false"}}])
    assert violations(name, lt, plain) == ['EBS volume /dev/sda1 is not encrypted (ebs.encrypted must be "true")']
    assert violations(name, lt, good_template(blockDeviceMappings=[]))  # implicit AMI default


def test_imdsv2_required() -> None:
    name, lt = "imdsv2-required", policies.LAUNCH_TEMPLATE
    assert violations(name, lt, good_template()) == []
    assert violations(name, lt, good_template(metadataOptions={"httpTokens": "optional"}))
    assert violations(name, lt, good_template(metadataOptions={}))
    assert violations(name, lt, good_template(metadataOptions={"httpTokens": "required", "httpPutResponseHopLimit": 5}))


@pytest.mark.parametrize(
    ("resource_type", "props"),
    [
        (policies.INGRESS_RULE, {"ipProtocol": "tcp", "fromPort": 8000, "toPort": 8000, "cidrIpv4": "0.0.0.0/0"}),
        (policies.INGRESS_RULE, {"ipProtocol": "tcp", "fromPort": 9100, "toPort": 9100, "cidrIpv6": "::/0"}),
        (policies.SECURITY_GROUP, {"ingress": [{"protocol": "tcp", "fromPort": 8000, "toPort": 8007, "cidrBlocks": ["0.0.0.0/0"]}]}),
        (policies.SECURITY_GROUP_RULE, {"type": "ingress", "protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}),
    ],
)
def test_no_world_ingress_catches_open_ports(resource_type: str, props: dict[str, Any]) -> None:
    assert violations("no-world-ingress", resource_type, props)


def test_no_world_ingress_allows_public_https_only() -> None:
    https = {"ipProtocol": "tcp", "fromPort": 443, "toPort": 443, "cidrIpv4": "0.0.0.0/0"}
    assert violations("no-world-ingress", policies.INGRESS_RULE, https) == []
    assert violations("no-world-ingress", policies.SECURITY_GROUP_RULE, {"type": "egress", "protocol": "-1", "cidrBlocks": ["0.0.0.0/0"]}) == []


def test_nodes_admit_security_groups_only() -> None:
    name = "nodes-admit-security-groups-only"
    by_group = {"ipProtocol": "tcp", "fromPort": 8000, "toPort": 8000, "referencedSecurityGroupId": "sg-1", "tags": {ROLE_TAG: "node"}}
    assert violations(name, policies.INGRESS_RULE, by_group) == []
    by_cidr = {"ipProtocol": "tcp", "fromPort": 9400, "toPort": 9400, "cidrIpv4": "10.0.0.0/8", "tags": {ROLE_TAG: "node"}}
    assert violations(name, policies.INGRESS_RULE, by_cidr)
    # The load balancer's rules are CIDR-based by design; the policy is about the nodes.
    assert violations(name, policies.INGRESS_RULE, {**by_cidr, "tags": {ROLE_TAG: "endpoint"}}) == []


def test_no_ssh_ingress() -> None:
    name = "no-ssh-ingress"
    ssh = {"ipProtocol": "tcp", "fromPort": 22, "toPort": 22, "cidrIpv4": "10.0.0.0/8"}
    assert violations(name, policies.INGRESS_RULE, ssh)
    wide = {"ipProtocol": "tcp", "fromPort": 0, "toPort": 1024, "referencedSecurityGroupId": "sg-other", "securityGroupId": "sg-me"}
    assert violations(name, policies.INGRESS_RULE, wide)
    inline = {"ingress": [{"protocol": "-1", "fromPort": 0, "toPort": 0, "securityGroups": ["sg-other"]}]}
    assert violations(name, policies.SECURITY_GROUP, inline)
    gang = {"ipProtocol": "-1", "referencedSecurityGroupId": "sg-me", "securityGroupId": "sg-me"}
    assert violations(name, policies.INGRESS_RULE, gang) == []
    api = {"ipProtocol": "tcp", "fromPort": 8000, "toPort": 8001, "referencedSecurityGroupId": "sg-lb"}
    assert violations(name, policies.INGRESS_RULE, api) == []


def test_no_plaintext_secrets() -> None:
    name, lt = "no-plaintext-secrets", policies.LAUNCH_TEMPLATE
    assert violations(name, lt, good_template()) == []
    leaked = "#cloud-config\nwrite_files:\n  - path: /etc/vllm.env\n    content: VLLM_API_KEY=offline4d8f2e9a1b\n"
    assert violations(name, lt, good_template(userData=user_data(leaked)))
    assert violations(name, lt, good_template(userData=user_data(leaked, packed=False)))
    argv = "#cloud-config\nruncmd: [[vllm, serve, m, --api-key, s3cretValue123]]\n"
    assert violations(name, lt, good_template(userData=user_data(argv)))
    assert violations(name, lt, good_template(userData=user_data("token: hf_" + "a" * 34)))
    assert violations(name, lt, good_template(userData="not base64!"))
    # Naming the variable without a value (the node reads it from a credential) is fine.
    assert violations(name, lt, good_template(userData=user_data("#cloud-config\n# sets VLLM_API_KEY from $CREDENTIALS_DIRECTORY\n"))) == []
    assert violations(name, policies.AUTOSCALING_GROUP, {"tags": [{"key": "debug", "value": "AKIAABCDEFGHIJKLMNOP"}]})
    version = policies.SECRET_VERSION
    assert violations(name, version, {"secretString": "x"})
    assert violations(name, version, {"secretString": "x"}, secret_outputs=("secretString",)) == []


def test_instance_type_matches_plan() -> None:
    name, lt = "instance-type-matches-plan", policies.LAUNCH_TEMPLATE
    config = {"plannedInstanceTypes": ["p5.48xlarge", "p4de.24xlarge"]}
    assert violations(name, lt, good_template(), config=config) == []
    assert violations(name, lt, good_template(instanceType="g6.xlarge"), config=config)  # tag mismatch
    retagged = good_template(instanceType="g6.xlarge", tags={**TAGS, INSTANCE_TYPE_TAG: "g6.xlarge"})
    assert violations(name, lt, retagged) == []  # no plan given: the tag alone must agree
    assert violations(name, lt, retagged, config=config)
    assert violations(name, lt, good_template(instanceType=None))
    group = {"mixedInstancesPolicy": {"launchTemplate": {"overrides": [{"instanceType": "p5.48xlarge"}, {"instanceType": "g5.xlarge"}]}}}
    assert violations(name, policies.AUTOSCALING_GROUP, group, config=config) == ["override instanceType g5.xlarge is not in the plan (p5.48xlarge, p4de.24xlarge)"]


def test_required_tags() -> None:
    name = "required-tags"
    assert violations(name, "aws:ec2/vpc:Vpc", {"tags": TAGS}) == []
    assert violations(name, "aws:ec2/vpc:Vpc", {"tags": {"vllm-fleet:stack": "s"}})
    assert violations(name, "aws:iam/rolePolicy:RolePolicy", {}) == []  # takes no tags
    unpropagated = {"tags": [{"key": k, "value": "x", "propagateAtLaunch": k != "vllm-fleet:plan-id"} for k in REQUIRED_TAG_KEYS]}
    assert violations(name, policies.AUTOSCALING_GROUP, unpropagated) == ["tags not propagated to instances: vllm-fleet:plan-id"]
    untagged_instances = good_template(tagSpecifications=[{"resourceType": "instance", "tags": {}}])
    assert violations(name, policies.LAUNCH_TEMPLATE, untagged_instances)


def test_modern_tls_and_header_hygiene() -> None:
    assert violations("modern-tls", policies.LISTENER, {"protocol": "HTTPS", "sslPolicy": "ELBSecurityPolicy-2016-08"})
    assert violations("modern-tls", policies.LISTENER, {"protocol": "HTTPS"})
    assert violations("modern-tls", policies.LISTENER, {"protocol": "HTTPS", "sslPolicy": "ELBSecurityPolicy-TLS13-1-2-2021-06"}) == []
    assert violations("alb-drops-invalid-headers", policies.LOAD_BALANCER, {"loadBalancerType": "application"})
    assert violations("alb-drops-invalid-headers", policies.LOAD_BALANCER, {"loadBalancerType": "network"}) == []


def test_replacement_keeps_capacity() -> None:
    name, group = "replacement-keeps-capacity", policies.AUTOSCALING_GROUP
    good = {"targetGroupArns": ["arn"], "healthCheckType": "ELB",
            "instanceRefresh": {"preferences": {"minHealthyPercentage": 100, "maxHealthyPercentage": 110}}}  # fmt: skip
    assert violations(name, group, good) == []
    assert violations(name, group, {**good, "healthCheckType": "EC2"})
    assert violations(name, group, {**good, "instanceRefresh": {"preferences": {"minHealthyPercentage": 90}}})


# --- the pack over the program -------------------------------------------------------------------
@cache
def plan(stack: str) -> StackPlan:
    config: StackConfig = load_stack_file(stack)
    if stack in REFUSED:
        # The refused stack's shape still gets the guardrails: with room for one more node.
        layout = build_stack_plan(config, validate=False).plan.layout
        config = config.model_copy(update={"capacity": config.capacity.model_copy(
            update={"max_replicas": (config.capacity.max_replicas // layout.replicas_per_node + 1) * layout.replicas_per_node})})  # fmt: skip
    return build_stack_plan(config, validate=False)


def resources(records: list[ResourceRecord]) -> list[tuple[str, str, dict[str, Any], list[str]]]:
    return [(r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", [])) for r in records if r.custom]


@pytest.mark.parametrize("preview", [True, False], ids=["preview", "update"])
@pytest.mark.parametrize("stack", STACKS)
def test_pack_passes_on_every_stack(stack: str, preview: bool) -> None:
    stack_plan = plan(stack)
    records = offline.preview_resources(stack_plan, preview=preview)
    found = policies.check_resources(resources(records), policies.policy_config(ladder_types(stack_plan)))
    assert found == [], "\n".join(map(repr, found))


def test_pack_catches_a_tampered_program() -> None:
    """The same records, one property flipped each: the pack must notice every one."""
    stack_plan = plan("prod-405b")
    records = offline.preview_resources(stack_plan, preview=False)
    base = resources(records)
    planned = ladder_types(stack_plan)

    def tamper(resource_type: str, change: Any) -> list[policies.Violation]:
        changed = []
        for rtype, name, props, secrets in base:
            if rtype == resource_type:
                props = change(dict(props))
            changed.append((rtype, name, props, secrets))
        return policies.check_resources(changed, policies.policy_config(planned))

    assert {v.policy for v in tamper(policies.LAUNCH_TEMPLATE, lambda p: {**p, "metadataOptions": {"httpTokens": "optional"}})} == {"imdsv2-required"}
    assert {v.policy for v in tamper(policies.LAUNCH_TEMPLATE, lambda p: {**p, "instanceType": "g6e.xlarge"})} == {"instance-type-matches-plan"}
    opened = tamper(policies.INGRESS_RULE, lambda p: {**p, "cidrIpv4": "0.0.0.0/0", "referencedSecurityGroupId": None})
    assert {"no-world-ingress", "nodes-admit-security-groups-only"} <= {v.policy for v in opened}


def test_tagless_types_match_pulumi_aws() -> None:
    """TAGLESS_TYPES is exactly the program's AWS types whose class takes no ``tags``."""
    records = offline.preview_resources(plan("prod-405b"), preview=True) + offline.preview_resources(plan("dev-8b"), preview=True)
    types = {r.type for r in records if r.custom and r.type.startswith("aws:")}
    classes = {
        "aws:iam/rolePolicy:RolePolicy": aws.iam.RolePolicy,
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment": aws.iam.RolePolicyAttachment,
        "aws:secretsmanager/secretVersion:SecretVersion": aws.secretsmanager.SecretVersion,
        "aws:ec2/routeTableAssociation:RouteTableAssociation": aws.ec2.RouteTableAssociation,
        "aws:autoscaling/policy:Policy": aws.autoscaling.Policy,
        "aws:autoscaling/schedule:Schedule": aws.autoscaling.Schedule,
        "aws:autoscaling/lifecycleHook:LifecycleHook": aws.autoscaling.LifecycleHook,
        "aws:ec2/vpc:Vpc": aws.ec2.Vpc,
        "aws:autoscaling/group:Group": aws.autoscaling.Group,
        "aws:lb/listenerRule:ListenerRule": aws.lb.ListenerRule,
        "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": aws.vpc.SecurityGroupIngressRule,
    }
    for resource_type, cls in classes.items():
        takes_tags = "tags" in inspect.signature(cls._internal_init).parameters
        assert takes_tags == (resource_type not in policies.TAGLESS_TYPES), resource_type
    tagless_used = {t for t in types if t in policies.TAGLESS_TYPES}
    # The AMP alert manager definition exists only in managed monitoring mode, which no
    # stack file uses; tests/test_monitoring_component.py checks it against pulumi-aws.
    assert tagless_used == set(policies.TAGLESS_TYPES) - {"aws:amp/alertManagerDefinition:AlertManagerDefinition"}
    for record in records:
        if record.custom and record.type.startswith("aws:") and record.type not in policies.TAGLESS_TYPES:
            assert "tags" in record.engine_inputs, f"{record.type} {record.name} has no tags"


# --- rules that relate several resources (stack policies) ------------------------------------------
def stack_violations(name: str, resources: list[tuple[str, str, dict[str, Any], list[str]]]) -> list[str]:
    return policies.run_policy(policy(name), policies.stack_validation_args(resources))


@pytest.mark.parametrize("preview", [True, False], ids=["preview", "update"])
def test_efa_groups_allow_all_traffic_to_themselves_both_ways(preview: bool) -> None:
    """EFA matches only rules that name the group itself: the gang stack's node group needs a
    self-referencing egress rule as well as the ingress one (a 0.0.0.0/0 egress is not enough)."""
    base = resources(offline.preview_resources(plan("prod-405b"), preview=preview))
    assert stack_violations("efa-self-traffic", base) == []
    # The program before the fix: ingress to itself, egress only to 0.0.0.0/0.
    without_self_egress = [r for r in base if not (r[0] == policies.EGRESS_RULE and r[1] == "fleet-out-gang")]
    found = stack_violations("efa-self-traffic", without_self_egress)
    assert found and all("egress rule to the group itself" in m for m in found)
    without_self_ingress = [r for r in base if not (r[0] == policies.INGRESS_RULE and r[1] == "fleet-in-gang")]
    assert any("ingress rule" in m for m in stack_violations("efa-self-traffic", without_self_ingress))
    # A single-node stack has no EFA interfaces and needs no such rule.
    assert stack_violations("efa-self-traffic", resources(offline.preview_resources(plan("dev-8b"), preview=preview))) == []


def test_efa_self_rule_must_name_the_group_not_a_cidr() -> None:
    template = {"networkInterfaces": [{"interfaceType": "efa-only", "securityGroups": ["sg-1"]}]}
    self_in = {"ipProtocol": "-1", "securityGroupId": "sg-1", "referencedSecurityGroupId": "sg-1"}
    world_out = {"ipProtocol": "-1", "securityGroupId": "sg-1", "cidrIpv4": "0.0.0.0/0"}
    other_out = {"ipProtocol": "-1", "securityGroupId": "sg-1", "referencedSecurityGroupId": "sg-2"}
    lt = (policies.LAUNCH_TEMPLATE, "lt", template, [])
    ingress = (policies.INGRESS_RULE, "in", self_in, [])
    for egress in (world_out, other_out):
        assert stack_violations("efa-self-traffic", [lt, ingress, (policies.EGRESS_RULE, "out", egress, [])])
    assert stack_violations("efa-self-traffic", [lt, ingress, (policies.EGRESS_RULE, "out", self_in, [])]) == []


def test_group_holds_no_force_new_drain_hook() -> None:
    """The program before the fix put the drain hook (timeout from shutdownTimeoutS) among the
    group's ForceNew initial hooks: a new shutdown timeout replaced the group."""
    name, group = "group-force-new-inputs", policies.AUTOSCALING_GROUP
    drain = {"name": "drain", "lifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING", "heartbeatTimeout": 660}
    ready = {"name": "gang-ready", "lifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING", "heartbeatTimeout": 900}
    assert violations(name, group, {"initialLifecycleHooks": [drain]})
    assert violations(name, group, {"initialLifecycleHooks": [ready, drain]})
    assert violations(name, group, {"initialLifecycleHooks": [ready]}) == []
    assert violations(name, group, {}) == []


def test_group_waits_for_healthy_targets() -> None:
    """Before the fix no group set min_elb_capacity: `pulumi up` returned with no healthy target."""
    name, group = "group-waits-for-healthy-targets", policies.AUTOSCALING_GROUP
    attached = {"targetGroupArns": ["arn"], "minSize": 2}
    assert violations(name, group, attached)
    assert violations(name, group, {**attached, "minElbCapacity": 1})
    assert violations(name, group, {**attached, "minElbCapacity": 2}) == []
    assert violations(name, group, {"targetGroupArns": ["arn"], "minSize": 0}) == []  # scale from zero
    assert violations(name, group, {"minSize": 2}) == []  # a gang registers its head itself


def endpoints_only(stack: str) -> StackPlan:
    config = plan(stack).config
    config = config.model_copy(update={
        "network": config.network.model_copy(update={"egress": "endpoints-only"}),
        "endpoint": config.endpoint.model_copy(update={"internal": True}),
        "monitoring": config.monitoring.model_copy(update={"mode": "none"}),
    })  # fmt: skip
    return build_stack_plan(config, validate=False)


@pytest.mark.parametrize("stack", ["prod-405b", "dev-8b"])
def test_endpoints_only_network_reaches_every_api_the_nodes_call(stack: str) -> None:
    """Before the fix the endpoints-only network had no autoscaling, ec2 or
    elasticloadbalancing endpoint: the drain hook, gang discovery and head registration hung."""
    stack_plan = endpoints_only(stack)
    if stack_plan.config.serving.weights_source not in ("s3", "ebs-initialized", "ebs-lazy", "local-nvme"):
        stack_plan = build_stack_plan(
            stack_plan.config.model_copy(update={"serving": stack_plan.config.serving.model_copy(update={"weights_source": "s3"})}),
            validate=False,
        )
    base = resources(offline.preview_resources(stack_plan, preview=False))
    assert stack_violations("endpoints-only-reaches-every-api", base) == []
    old_services = ("autoscaling", "ec2", "elasticloadbalancing")
    before_fix = [r for r in base if not (r[0] == policies.VPC_ENDPOINT and r[2]["serviceName"].endswith(old_services))]
    (found,) = stack_violations("endpoints-only-reaches-every-api", before_fix)
    gangs = stack_plan.plan.layout.nodes_per_replica > 1
    assert found.startswith("fleet-node-policy: the role calls ")
    assert ("ec2" in found and "elasticloadbalancing" in found) == gangs and "autoscaling" in found
    # With a NAT gateway the same missing endpoints are no violation.
    with_nat = before_fix + [(policies.NAT_GATEWAY, "nat", {}, [])]
    assert stack_violations("endpoints-only-reaches-every-api", with_nat) == []


def test_capacity_block_is_one_type_in_one_zone() -> None:
    """Before the fix the block's group spanned every private subnet (several AZs)."""
    name = "capacity-block-scope"
    block = {"instanceType": "p5.48xlarge", "instanceMarketOptions": {"marketType": "capacity-block"}}
    lt = (policies.LAUNCH_TEMPLATE, "lt", block, [])
    one_zone = (policies.AUTOSCALING_GROUP, "g", {"vpcZoneIdentifiers": ["subnet-a"]}, [])
    two_zones = (policies.AUTOSCALING_GROUP, "g", {"vpcZoneIdentifiers": ["subnet-a", "subnet-b"]}, [])
    assert stack_violations(name, [lt, one_zone]) == []
    assert stack_violations(name, [lt, two_zones])
    other_type = (policies.LAUNCH_TEMPLATE, "lt2", {**block, "instanceType": "p4de.24xlarge"}, [])
    assert stack_violations(name, [lt, other_type, one_zone])
    on_demand = (policies.LAUNCH_TEMPLATE, "lt", {"instanceType": "p5.48xlarge"}, [])
    assert stack_violations(name, [on_demand, two_zones]) == []


@pytest.mark.parametrize("preview", [True, False], ids=["preview", "update"])
def test_pack_passes_on_the_images_stack(preview: bool) -> None:
    """An image-build stack has no model or plan: with its pack config (stack and image tags)
    it passes; with the fleet's required tags (the pack before the fix) it did not."""
    from infra.config import load_any_stack_file

    config = load_any_stack_file("images")
    found = resources(offline.preview_resources(config, preview=preview))
    assert policies.check_resources(found, policies.images_policy_config()) == []
    assert {v.policy for v in policies.check_resources(found)} == {"required-tags"}
    script = next(r for r in found if r[0] == "aws:s3/bucketObjectv2:BucketObjectv2")
    assert script[2]["tags"]["vllm-fleet:image"]


def test_program_arns_name_the_partition() -> None:
    """ARNs the program writes name the stack's partition (from aws.get_partition), so a stack
    in aws-cn or aws-us-gov gets valid policies. Before the fix the image component wrote
    arn:aws: literals (and the ManagedPolicy enum's aws-partition ARNs)."""
    root = Path(__file__).resolve().parent.parent / "infra"
    literal = re.compile(r"""["']arn:aws:|ManagedPolicy\.""")
    found = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted([*root.glob("components/*.py"), *root.glob("program/*.py"), root / "render" / "monitoring_host.py"])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert found == []


def test_image_policies_follow_the_partition() -> None:
    from infra.config import load_any_stack_file

    config = load_any_stack_file("images")
    mocks = offline.OfflineMocks(
        region="cn-north-1",
        preview=False,
        invoke_handlers={"aws:index/getPartition:getPartition": lambda a: {"partition": "aws-cn", "id": "aws-cn"}},
    )
    from infra.program.images import deploy_images

    run = offline.run_offline(lambda: deploy_images(config), project="vllm-fleet", stack="images", mocks=mocks, preview=False)
    attachments = [r.engine_inputs["policyArn"] for r in run.records if r.type == "aws:iam/rolePolicyAttachment:RolePolicyAttachment"]
    assert attachments and all(arn.startswith("arn:aws-cn:iam::aws:policy/") for arn in attachments)


def test_names_stay_within_aws_limits() -> None:
    """A 40-character image name (the most config allows) made a 57-character bucket prefix
    (S3 takes 37): the pack catches that, and the image component now fits its prefixes."""
    from infra.config import load_any_stack_file
    from infra.plan.names import fit_prefix

    name, bucket = "names-within-limits", "aws:s3/bucket:Bucket"
    assert violations(name, bucket, {"bucketPrefix": "vllm-fleet-" + "x" * 40 + "-bake-"})
    assert violations(name, bucket, {"bucketPrefix": "vllm-fleet-short-bake-"}) == []
    assert violations(name, "aws:iam/role:Role", {"namePrefix": "r" * 39})
    config = load_any_stack_file("images")
    longest = config.model_copy(update={"bake": config.bake.model_copy(update={"name": "vllm-0-32-0-" + "x" * 28})})
    assert len(longest.bake.name) == 40
    found = resources(offline.preview_resources(longest, preview=True))
    assert policies.check_resources(found, policies.images_policy_config()) == []
    (bucket_props,) = [props for rtype, _, props, _ in found if rtype == bucket]
    prefix = bucket_props["bucketPrefix"]
    assert len(prefix) <= 37 and prefix.startswith("vllm-fleet-vllm-0-32-0-") and prefix.endswith("-")
    other = fit_prefix("vllm-fleet-vllm-0-32-0-" + "y" * 28 + "-bake-", bucket, "bucketPrefix")
    assert other != prefix and len(other) <= 37  # two long names stay distinct


def test_retained_objects_live_in_a_retained_bucket() -> None:
    """The bake scripts are retained (older component versions use them), but their bucket had
    force_destroy: destroying the stack deleted them anyway. Now the bucket (and its public
    access block and encryption) is retained and not force-destroyed."""
    from infra.config import load_any_stack_file

    records = offline.preview_resources(load_any_stack_file("images"), preview=True)
    retained = [r for r in records if r.options.get("retainOnDelete")]
    assert any(r.type == "aws:s3/bucketObjectv2:BucketObjectv2" for r in retained)
    for bucket in [r for r in records if r.type == "aws:s3/bucket:Bucket"]:
        assert bucket.options.get("retainOnDelete") and not bucket.engine_inputs.get("forceDestroy")
        guards = [r for r in records if r.type.startswith("aws:s3/bucket") and r.type != bucket.type]
        assert guards and all(r.options.get("retainOnDelete") for r in guards if "Object" not in r.type)


def test_no_deprecated_resource_types() -> None:
    """pulumi-aws 7 renamed s3.BucketV2 (and its *V2 family) to s3.Bucket …; the old classes
    still work but warn. No resource the program (fleet or image stack) declares is one."""
    import importlib
    import sys as _sys

    from infra.config import load_any_stack_file

    records = offline.preview_resources(plan("prod-405b"), preview=True) + offline.preview_resources(
        load_any_stack_file("images"), preview=True
    )
    types = {r.type for r in records if r.custom and r.type.startswith("aws:")}
    checked = 0
    for type_token in types:
        module, kind = type_token.split(":")[1].split("/")[0], type_token.split(":")[2]
        cls = getattr(importlib.import_module(f"pulumi_aws.{module}"), kind)
        source = Path(_sys.modules[cls.__module__].__file__ or "").read_text()
        assert f"{cls.__name__} has been deprecated" not in source, type_token
        checked += 1
    assert checked == len(types) > 20
    # The check can fail: the deprecated class says so in its module.
    assert "BucketV2 has been deprecated" in Path(_sys.modules[aws.s3.BucketV2.__module__].__file__ or "").read_text()
