"""The Pulumi program under mocks, for every stack file: what it declares, and the security and
reliability properties of what it declares. Runs in-process (infra/preview/offline.py): each run gets
its own event loop and isolated Pulumi settings; no CLI, no cloud.

Snapshots of each stack's resource graph: tests/__snapshots__/test_program/ (preview
mode; user-data bodies normalised). Regenerate deliberately with --snapshot-update.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pulumi.runtime import settings
from syrupy.assertion import SnapshotAssertion

from infra.components.api_key import ApiKey, ApiKeyArgs
from infra.config import StackConfig, load_stack_file, stack_names
from infra.errors import FleetError
from infra.facts.aws import RuleLimits, aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.plan.build import build_stack_plan
from infra.plan.capacity import GANG_READY_HEARTBEAT_S, capacity_layout
from infra.plan.drain import SLOWEST_STREAM_TOKENS_PER_S
from infra.plan.endpoint import route_rules
from infra.plan.iam import PolicyInputs, node_policy_document
from infra.plan.scaling import instances_for, ladder_types
from infra.plan.stack import StackPlan
from infra.plan.tags import INSTANCE_TYPE_TAG, REQUIRED_TAG_KEYS, TARGET_GROUP_TAG, stack_tags
from infra.preview import offline, policies
from infra.preview.offline import OfflineRun, ResourceRecord
from infra.program.stack import deploy
from infra.render.node import render_user_data
from infra.render.userdata import decode_user_data, encode_user_data, encoded_user_data
from tests.support.pulumi_mocks import PulumiHarness, pulumi_mocks  # noqa: F401 - the fixture
from tests.support.snapshots import text_extension

STACKS = stack_names("fleet")  # image-build stacks have no model to plan
# Stacks the program refuses as written, with the reason. A stack leaves this list when its
# file is fixed (the test below then fails until the entry is removed).
REFUSED: dict[str, str] = {}

LT = "aws:ec2/launchTemplate:LaunchTemplate"
ASG = "aws:autoscaling/group:Group"
TG = "aws:lb/targetGroup:TargetGroup"
LISTENER = "aws:lb/listener:Listener"
RULE = "aws:lb/listenerRule:ListenerRule"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
SECRET = "aws:secretsmanager/secret:Secret"
SECRET_VERSION = "aws:secretsmanager/secretVersion:SecretVersion"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
PLACEMENT = "aws:ec2/placementGroup:PlacementGroup"
PASSWORD = "random:index/randomPassword:RandomPassword"
HOOK = "aws:autoscaling/lifecycleHook:LifecycleHook"


# --- building plans and runs (cached: each run is a whole program under mocks) ---------------
@cache
def stack_plan(stack: str) -> StackPlan:
    return build_stack_plan(load_stack_file(stack), validate=False)


def plan_for(config: StackConfig) -> StackPlan:
    return build_stack_plan(config, validate=False)


@cache
def stack_run(stack: str, preview: bool) -> OfflineRun:
    return offline.run_stack(stack_plan(stack), preview=preview)


def deployable(stack: str) -> str:
    if stack in REFUSED:
        pytest.fail(f"{stack} is refused by design ({REFUSED[stack]}); test it through test_refused_stacks")
    return stack


def of_type(run: OfflineRun, type_token: str, component: str | None = None) -> list[ResourceRecord]:
    """Records of a type, optionally only those inside one component type (e.g. the Fleet's
    role, not the monitoring host's)."""
    return sorted(
        (r for r in run.records if r.type == type_token and (component is None or r.parent_type == component)),
        key=lambda r: r.name,
    )


def one(run: OfflineRun, type_token: str, name: str) -> ResourceRecord:
    found = [r for r in run.records if r.type == type_token and r.name == name]
    assert len(found) == 1, f"{len(found)} × {type_token} {name}"
    return found[0]


def with_capacity(config: StackConfig, **changes: Any) -> StackConfig:
    return config.model_copy(update={"capacity": config.capacity.model_copy(update=changes)})


def with_section(config: StackConfig, section: str, **changes: Any) -> StackConfig:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=changes)})


DEPLOYABLE = [s for s in STACKS if s not in REFUSED]
RUNS = [(s, p) for s in DEPLOYABLE for p in (True, False)]


def test_stack_files_found() -> None:
    assert len(STACKS) >= 4, STACKS
    assert DEPLOYABLE, "every stack is refused"


def test_a_group_with_no_room_to_surge_is_refused() -> None:
    # At most as many replicas as one node holds: always exactly one node, so an instance
    # refresh could only replace it by first dropping all capacity.
    packed = stack_plan("prod-70b-awq")
    per_node = packed.plan.layout.replicas_per_node
    assert per_node > 1
    config = with_section(packed.config, "capacity", min_replicas=1, max_replicas=per_node)
    with pytest.raises(FleetError, match="room for one more node"):
        offline.run_stack(build_stack_plan(config, validate=False), preview=True)


# --- structure -------------------------------------------------------------------------------
@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_components_own_every_resource(stack: str, preview: bool) -> None:
    run = stack_run(deployable(stack), preview)
    components = {r.urn: r for r in run.records if not r.custom}
    assert {r.type for r in components.values()} == {
        "vllm-fleet:network:Network",
        "vllm-fleet:api_key:ApiKey",
        "vllm-fleet:endpoint:Endpoint",
        "vllm-fleet:fleet:Fleet",
        "vllm-fleet:scaling:FleetScaling",
        "vllm-fleet:monitoring:Monitoring",
        "vllm-fleet:secrets:GeneratedSecret",
        *(["vllm-fleet:storage:PrivateBucket"] if stack_plan(stack).config.monitoring.mode == "self-hosted" else []),
    }
    for record in run.records:
        if record.custom:
            assert record.parent_urn in components, f"{record.type} {record.name} is not inside a component"
            owner = components[record.parent_urn].name
            assert record.name == owner or record.name.startswith(owner + "-")


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_launch_templates_per_ladder_type(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    templates = of_type(run, LT)
    types = ladder_types(plan)
    assert sorted(lt.inputs["instanceType"] for lt in templates) == sorted(types)
    weights_gib = math.ceil(plan.plan.weights_bytes / 1024**3)
    gangs = plan.plan.layout.nodes_per_replica > 1
    for lt in templates:
        props = lt.engine_inputs
        instance_type = props["instanceType"]
        # IMDSv2 only, no hop beyond the instance, tags readable for gang discovery.
        assert props["metadataOptions"] == {
            "httpEndpoint": "enabled",
            "httpTokens": "required",
            "httpPutResponseHopLimit": 1,
            "instanceMetadataTags": "enabled",
        }
        (root,) = props["blockDeviceMappings"]
        assert root["deviceName"] == offline.MOCK_AMI_ROOT_DEVICE  # data sources answer in previews too
        ebs = root["ebs"]
        assert ebs["encrypted"] == "true" and ebs["volumeType"] == "gp3" and ebs["deleteOnTermination"] == "true"
        assert ebs["volumeSize"] >= weights_gib + 1
        # user-data: base64 of gzip of exactly this type's rendered cloud-config.
        packed = base64.b64decode(props["userData"], validate=True)
        assert packed[:2] == b"\x1f\x8b"
        assert gzip.decompress(packed).decode() == render_user_data(plan.node_specs[instance_type])
        assert decode_user_data(props["userData"]) == render_user_data(plan.node_specs[instance_type])
        assert props["updateDefaultVersion"] is True
        assert props["tags"][INSTANCE_TYPE_TAG] == instance_type
        assert {s["resourceType"] for s in props["tagSpecifications"]} == {"instance", "volume", "network-interface"}
        nics = props["networkInterfaces"]
        assert all(n["securityGroups"] and n["deleteOnTermination"] == "true" for n in nics)
        assert "vpcSecurityGroupIds" not in props
        if gangs:
            efa = default_catalog().instances[instance_type].efa_interfaces
            kinds = sorted((n["networkCardIndex"], n["deviceIndex"], n["interfaceType"]) for n in nics)
            assert kinds == [(0, 0, "interface"), (0, 1, "efa-only")] + [(c, 0, "efa-only") for c in range(1, efa)]
        else:
            assert len(nics) == 1 and "interfaceType" not in nics[0]


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_no_key_anywhere_but_the_secret_version(stack: str, preview: bool) -> None:
    run = stack_run(deployable(stack), preview)
    version = one(run, SECRET_VERSION, "api-key-version")
    assert version.secret_paths == ("secretString",)
    assert version.inputs["secretString"] == offline.SECRET_MASK
    assert "secretString" in version.options["additionalSecretOutputs"]
    # One owner for the key's value: Pulumi writes the first version and never diffs it again
    # (rotate-key owns the rest), and exports no key that rotation would make stale.
    assert version.options["ignoreChanges"] == ["secretString"]
    assert "apiKey" not in run.outputs
    if not preview:
        key = version.engine_inputs["secretString"]
        assert key.startswith("offline-")
        for record in run.records:
            if record is not version:
                assert key not in json.dumps(record.engine_inputs), f"key leaks into {record.type} {record.name}"
                for lt_text in [decode_user_data(record.engine_inputs["userData"])] if record.type == LT else []:
                    assert key not in lt_text
        assert key not in offline.resources_json(run.records)
        assert key not in offline.resource_tree_text(run.records)
        assert run.outputs["apiKeySecretArn"].startswith("arn:aws:secretsmanager:")
    secret = one(run, SECRET, "api-key-secret")
    assert secret.inputs["name"] == stack_plan(stack).api_key_secret_name
    assert secret.inputs["recoveryWindowInDays"] >= 7
    assert secret.options["protect"] is True
    # Stateful: the nodes' logs and the monitoring host (its TSDB) are protected too.
    (log_group,) = of_type(run, "aws:cloudwatch/logGroup:LogGroup", "vllm-fleet:fleet:Fleet")
    assert log_group.options["protect"] is True
    for host in of_type(run, "aws:ec2/instance:Instance"):
        assert host.options["protect"] is True


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_nodes_reachable_only_from_lb_and_scrapers(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    rules = {r.name: r.engine_inputs for r in of_type(run, INGRESS)}
    port = plan.config.serving.port
    last = port + plan.plan.layout.replicas_per_node - 1
    node_rules = {n: r for n, r in rules.items() if n.startswith("fleet-")}
    assert {(r["fromPort"], r["toPort"]) for n, r in node_rules.items() if n != "fleet-in-gang"} == {
        (port, last), (9100, 9100), (9400, 9400)
    }
    for name, rule in rules.items():
        # No SSH anywhere: only the gang's all-traffic rule from its own group covers 22.
        low, high = rule.get("fromPort"), rule.get("toPort")
        if rule["ipProtocol"] == "-1" or (low is not None and low <= 22 <= high):
            assert name == "fleet-in-gang" and rule["referencedSecurityGroupId"] == rule["securityGroupId"]
    for name, rule in node_rules.items():
        assert "cidrIpv4" not in rule and "cidrIpv6" not in rule, name
    endpoint_rules = {n: r for n, r in rules.items() if n.startswith("endpoint-")}
    listen = 443 if plan.config.endpoint.certificate_arn else 80
    assert sorted(r["cidrIpv4"] for r in endpoint_rules.values()) == sorted(plan.config.endpoint.allowed_cidrs)
    assert all(r["fromPort"] == r["toPort"] == listen for r in endpoint_rules.values())
    if not preview:
        endpoint_sg = one(run, "aws:ec2/securityGroup:SecurityGroup", "endpoint-sg")
        scrapers = run.outputs["scraperSecurityGroupId"]
        assert node_rules["fleet-in-api"]["referencedSecurityGroupId"] != scrapers
        assert node_rules["fleet-in-vllm-metrics"]["referencedSecurityGroupId"] == scrapers
        assert endpoint_sg.engine_inputs["vpcId"] == run.outputs["vpcId"]
    assert ("fleet-in-gang" in rules) == (plan.plan.layout.nodes_per_replica > 1)


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_listener_forwards_only_the_api(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    (listener,) = of_type(run, LISTENER)
    props = listener.engine_inputs
    (default,) = props["defaultActions"]
    assert default["type"] == "fixed-response" and default["fixedResponse"]["statusCode"] == "404"
    if plan.config.endpoint.certificate_arn:
        assert (props["protocol"], props["port"]) == ("HTTPS", 443)
        assert props["sslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
        assert props["certificateArn"] == plan.config.endpoint.certificate_arn
    else:
        assert plan.config.endpoint.internal and (props["protocol"], props["port"]) == ("HTTP", 80)
    forwarded: set[tuple[str, str]] = set()
    limits = aws_fleet_facts().alb_rule_limits.value
    for rule in of_type(run, RULE):
        conditions = rule.engine_inputs["conditions"]
        values = [v for c in conditions for cond in c.values() for v in cond["values"]]
        assert len(values) <= limits.values_per_rule
        assert all(len(cond["values"]) <= limits.values_per_condition for c in conditions for cond in c.values())
        (method,) = next(c["httpRequestMethod"]["values"] for c in conditions if "httpRequestMethod" in c)
        paths = next(c["pathPattern"]["values"] for c in conditions if "pathPattern" in c)
        forwarded |= {(method, p) for p in paths}
        (action,) = rule.engine_inputs["actions"]
        assert action["type"] == "forward"
    assert forwarded == {("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
    for hidden in ("/metrics", "/tokenize", "/detokenize", "/health", "/scale_elastic_ep", "/v1/responses", "/docs"):
        assert all(path != hidden and "*" not in path for _, path in forwarded)
    lb = of_type(run, "aws:lb/loadBalancer:LoadBalancer")[0].engine_inputs
    assert lb["dropInvalidHeaderFields"] is True
    assert lb["internal"] is plan.config.endpoint.internal
    assert lb["idleTimeout"] == plan.config.endpoint.idle_timeout_s


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_target_groups_drain_and_check_health(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    groups = of_type(run, TG)
    port = plan.config.serving.port
    assert [g.engine_inputs["port"] for g in groups] == [port + i for i in range(plan.plan.layout.replicas_per_node)]
    for group in groups:
        props = group.engine_inputs
        assert props["deregistrationDelay"] >= plan.config.serving.shutdown_timeout_s
        # Scale-in must not cut a stream: before the fix the delay was the shutdown timeout
        # (120 s), shorter than a maxModelLen-token stream at the slowest planned decode rate.
        longest = math.ceil(plan.config.serving.max_model_len / SLOWEST_STREAM_TOKENS_PER_S)
        assert props["deregistrationDelay"] == min(3600, max(longest, plan.config.serving.shutdown_timeout_s))
        # The node's drain watcher waits for the same delay.
        for lt in of_type(run, LT):
            text = decode_user_data(lt.engine_inputs["userData"])
            assert f"readonly delay_s={props['deregistrationDelay']}" in text
        assert props["healthCheck"]["path"] == "/health" and props["healthCheck"]["matcher"] == "200"
        assert props["loadBalancingAlgorithmType"] == "least_outstanding_requests"
        assert props["stickiness"]["enabled"] is False
        assert (props["protocol"], props["targetType"]) == ("HTTP", "instance")


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_autoscaling_groups(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    config, layout = plan.config, plan.plan.layout
    run = stack_run(stack, preview)
    groups = of_type(run, ASG)
    startup = plan.plan.startup_timeout_s
    shutdown = config.serving.shutdown_timeout_s
    drains = {h.name: h.engine_inputs for h in of_type(run, HOOK)}
    assert len(drains) == len(groups)
    for group in groups:
        props = group.engine_inputs
        drain = drains[f"{group.name}-drain"]
        assert drain["name"] == "drain"
        assert drain["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
        assert drain["defaultResult"] == "CONTINUE"
        deregistration = of_type(run, TG)[0].engine_inputs["deregistrationDelay"]
        assert drain["heartbeatTimeout"] >= deregistration + shutdown  # load balancer drain, then vLLM's
        # Deleting the group waits for every node's drain hook, then for EC2 to terminate it.
        delete_s = int(group.options["customTimeouts"]["delete"].removesuffix("s"))
        assert delete_s >= drain["heartbeatTimeout"] + 300 and delete_s > 600  # the provider default: 10 min
        if not preview:
            assert drain["autoscalingGroupName"].startswith(props["namePrefix"])
        # Initial hooks are ForceNew: only the gangs' launch hook, with a constant timeout.
        initial = props.get("initialLifecycleHooks", [])
        assert all(h["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING" for h in initial)
        assert all(h["heartbeatTimeout"] == GANG_READY_HEARTBEAT_S for h in initial)
        assert props["healthCheckGracePeriod"] == startup and props["defaultInstanceWarmup"] == startup
        tags = {t["key"]: t for t in props["tags"]}
        assert all(tags[k]["propagateAtLaunch"] is True for k in REQUIRED_TAG_KEYS)
        assert props["namePrefix"].startswith(f"vllm-fleet.{config.stack}.")
    if layout.nodes_per_replica == 1:
        (group,) = groups
        props = group.engine_inputs
        assert props["healthCheckType"] == "ELB"
        # `pulumi up` returns only when the first nodes serve through the load balancer.
        assert props["minElbCapacity"] == props["minSize"] >= 1
        assert props["minSize"] == instances_for(config.capacity.min_replicas, layout)
        assert props["maxSize"] == instances_for(config.capacity.max_replicas, layout)
        assert props["maxSize"] >= props["minSize"] + 1  # room to surge during a refresh
        prefs = props["instanceRefresh"]["preferences"]
        assert props["instanceRefresh"]["strategy"] == "Rolling"
        assert prefs["minHealthyPercentage"] == 100 and prefs["maxHealthyPercentage"] >= 110
        assert props["instanceMaintenancePolicy"] == {"minHealthyPercentage": 100, "maxHealthyPercentage": 110}
        assert len(props["targetGroupArns"]) == layout.replicas_per_node
        if not preview:
            assert all(arn.startswith("arn:aws:lb:") for arn in props["targetGroupArns"])
        ignored = group.options.get("ignoreChanges", [])
        assert ("desiredCapacity" in ignored) == (props["maxSize"] > props["minSize"])
        # The night schedule sets min_size twice a day: Pulumi must not call that drift (before
        # the fix the nightly drift job failed on dev-8b every night).
        assert ("minSize" in ignored) == (config.scaling.night_floor is not None)
        assert set(ignored) <= {"desiredCapacity", "minSize"}
        types = ladder_types(plan)
        if len(types) > 1 or config.capacity.market == "spot":
            mixed = props["mixedInstancesPolicy"]
            overrides = mixed["launchTemplate"]["overrides"]
            assert [o["instanceType"] for o in overrides] == types
            assert all("launchTemplateSpecification" in o for o in overrides)
            if not preview:
                assert len({o["launchTemplateSpecification"]["launchTemplateId"] for o in overrides}) == len(types)
            assert "launchTemplate" not in props
        else:
            assert "mixedInstancesPolicy" not in props
            if not preview:
                assert props["launchTemplate"]["version"] == "1"
        assert not of_type(run, PLACEMENT)
    else:
        assert len(groups) == config.capacity.max_replicas
        placements = of_type(run, PLACEMENT)
        assert len(placements) == len(groups) and all(p.inputs["strategy"] == "cluster" for p in placements)
        for i, group in enumerate(groups):
            props = group.engine_inputs
            assert props["maxSize"] == layout.nodes_per_replica
            assert props["minSize"] == props["desiredCapacity"] == (layout.nodes_per_replica if i < config.capacity.min_replicas else 0)
            assert props["healthCheckType"] == "EC2" and "targetGroupArns" not in props
            assert len(props["vpcZoneIdentifiers"]) == 1
            assert "instanceRefresh" not in props
            hooks = {h["name"]: h for h in props["initialLifecycleHooks"]}
            assert hooks["gang-ready"]["lifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"
            assert hooks["gang-ready"]["defaultResult"] == "ABANDON"
            assert group.options["replaceOnChanges"] == ["launchTemplate"]
            tags = {t["key"]: t["value"] for t in props["tags"]}
            assert tags["vllm-fleet:gang"] == str(i)
            if not preview:
                assert tags[TARGET_GROUP_TAG].startswith("arn:aws:lb:")


def waits_for(record: ResourceRecord, other: ResourceRecord) -> bool:
    return other.urn in record.dependencies


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_first_create_has_no_races(stack: str, preview: bool) -> None:
    """What AWS needs created first, though no input says so (before the fix each pair was
    created in parallel): NAT gateways and their EIPs after the internet gateway, the config
    bucket's policy after its public access block (else OperationAborted), and every group
    after its nodes' inline policy."""
    run = stack_run(deployable(stack), preview)
    (igw,) = of_type(run, "aws:ec2/internetGateway:InternetGateway")
    nat_side = of_type(run, "aws:ec2/natGateway:NatGateway") + of_type(run, "aws:ec2/eip:Eip")
    assert nat_side and all(waits_for(r, igw) for r in nat_side)
    for bucket_policy in of_type(run, "aws:s3/bucketPolicy:BucketPolicy"):
        bucket = bucket_policy.name.removesuffix("-tls-only")
        (block,) = [b for b in of_type(run, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
                    if b.name == f"{bucket}-private"]  # fmt: skip
        assert waits_for(bucket_policy, block)
    (node_policy,) = of_type(run, ROLE_POLICY, "vllm-fleet:fleet:Fleet")
    assert all(waits_for(group, node_policy) for group in of_type(run, ASG))


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_node_policy_is_least_privilege(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    (policy,) = of_type(run, ROLE_POLICY, "vllm-fleet:fleet:Fleet")
    attachment = of_type(run, "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "vllm-fleet:fleet:Fleet")
    assert [a.inputs["policyArn"] for a in attachment] == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]
    if preview:
        assert policy.inputs["policy"] == offline.UNKNOWN_MASK  # built from ARNs not known yet
        return
    doc = json.loads(policy.engine_inputs["policy"])
    statements = {s["Sid"]: s for s in doc["Statement"]}
    assert statements["ReadApiKey"]["Action"] == ["secretsmanager:GetSecretValue"]
    assert statements["ReadApiKey"]["Resource"] == [run.outputs["apiKeySecretArn"]]
    assert statements["WriteOwnLogs"]["Action"] == [
        "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams",
    ]
    assert all(f"log-group:/vllm-fleet/{plan.config.stack}" in r for r in statements["WriteOwnLogs"]["Resource"])
    (groups_arn,) = statements["LifecycleHooks"]["Resource"]
    assert groups_arn.endswith(f":autoScalingGroupName/vllm-fleet.{plan.config.stack}.*")
    assert "autoscaling:CompleteLifecycleAction" in statements["LifecycleHooks"]["Action"]
    assert "autoscaling:SetInstanceProtection" in statements["LifecycleHooks"]["Action"]
    wildcard = [s for s in doc["Statement"] if "*" in s["Resource"]]
    gangs = plan.plan.layout.nodes_per_replica > 1
    # Describe* actions and PutMetricData support no resource-level permissions; nothing else is
    # on "*", and PutMetricData only with the fleet's namespace as its condition.
    assert [s["Sid"] for s in wildcard] == (
        ["ReadOwnGroup", "PublishScalingGauges", "DiscoverGang"] if gangs else ["ReadOwnGroup", "PublishScalingGauges"]
    )
    assert statements["PublishScalingGauges"]["Condition"] == {"StringEquals": {"cloudwatch:namespace": "vllm-fleet"}}
    assert statements["ReadOwnGroup"]["Action"] == ["autoscaling:DescribeAutoScalingGroups"]
    if plan.config.serving.weights_source == "s3":
        (read,) = statements["ReadWeights"]["Resource"]
        assert read.startswith("arn:aws:s3:::") and read.endswith("/*")
        assert statements["ListWeights"]["Condition"]["StringLike"]["s3:prefix"][0].endswith("/*")
    else:
        assert "ReadWeights" not in statements
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    assert not any(a.endswith(":*") or a == "*" for a in actions)


@pytest.mark.parametrize(("stack", "preview"), RUNS)
def test_every_taggable_resource_is_tagged(stack: str, preview: bool) -> None:
    plan = stack_plan(deployable(stack))
    run = stack_run(stack, preview)
    expected = stack_tags(plan)
    for record in run.records:
        if record.type.startswith("aws:") and "tags" in record.engine_inputs:
            tags = record.engine_inputs["tags"]
            if record.type == ASG:
                tags = {t["key"]: t["value"] for t in tags}
            for key in REQUIRED_TAG_KEYS:
                assert tags[key] == expected[key], (record.type, record.name, key)
    assert expected["vllm-fleet:stack"] == plan.config.stack
    assert len(expected["vllm-fleet:plan-id"]) == 12


@pytest.mark.parametrize("stack", DEPLOYABLE)
def test_stack_outputs(stack: str) -> None:
    plan = stack_plan(stack)
    run = stack_run(stack, False)
    outputs = run.outputs
    assert outputs["endpointUrl"].startswith("https://" if plan.config.endpoint.certificate_arn else "http://")
    assert outputs["servedModelName"] == (plan.config.model.served_name or plan.config.model.repo)
    assert outputs["planSummary"]["instance_type"] == plan.plan.layout.instance_type
    price = default_catalog().instances[plan.plan.layout.instance_type].on_demand_usd_per_hour
    layout, cap = plan.plan.layout, plan.config.capacity
    assert outputs["estimatedHourlyUsd"]["minReplicas"] == round(instances_for(cap.min_replicas, layout) * price, 2)
    assert outputs["estimatedHourlyUsd"]["maxReplicas"] == round(instances_for(cap.max_replicas, layout) * price, 2)
    preview_outputs = stack_run(stack, True).outputs
    assert preview_outputs["endpointUrl"] == offline.UNKNOWN_MASK
    assert preview_outputs["planId"] == outputs["planId"]


# --- snapshots -------------------------------------------------------------------------------
def _normalised(run: OfflineRun) -> Any:
    docs = json.loads(offline.resources_json(run.records))
    for doc in docs:
        if doc["type"] == LT:
            text = decode_user_data(
                next(r for r in run.records if r.type == LT and r.name == doc["name"]).engine_inputs["userData"]
            )
            # The node templates own the body; the snapshot pins only that it is this type's.
            doc["inputs"]["userData"] = f"[user-data: {text.splitlines()[0]} … for {doc['inputs']['instanceType']}]"
    return docs


@pytest.mark.parametrize("stack", DEPLOYABLE)
def test_resource_graph_snapshot(stack: str, snapshot: SnapshotAssertion) -> None:
    """tests/__snapshots__/test_program/: review the diff, then --snapshot-update."""
    current = json.dumps(_normalised(stack_run(stack, True)), indent=2, sort_keys=True) + "\n"
    assert current == snapshot.use_extension(text_extension("json"))


# --- offline engine --------------------------------------------------------------------------
def test_offline_outputs_are_readable_and_isolated() -> None:
    stack = DEPLOYABLE[0]
    monitor_before, stack_before = settings.SETTINGS.monitor, settings.SETTINGS.stack
    first = offline.preview_resources(stack_plan(stack), preview=True)
    second = offline.preview_resources(stack_plan(stack), preview=True)
    assert [(r.type, r.name, r.inputs) for r in first] == [(r.type, r.name, r.inputs) for r in second]
    assert (settings.SETTINGS.monitor, settings.SETTINGS.stack) == (monitor_before, stack_before)
    tree = offline.resource_tree_text(first)
    lines = tree.splitlines()
    assert "vllm-fleet:fleet:Fleet (component) fleet" in lines
    assert any(line.startswith("  aws:ec2/launchTemplate:LaunchTemplate fleet-lt-") and "instanceType=" in line for line in lines)
    assert "secretString=[secret]" in tree
    docs = json.loads(offline.resources_json(first))
    assert len(docs) == len(first)
    assert all(d["parent"] is None or {"type", "name"} <= set(d["parent"]) for d in docs)


def test_cloud_init_reads_the_gzipped_user_data() -> None:
    """The real cloud-init (Debian package) turns the launch template's bytes back into the
    rendered cloud-config, the way an instance does at boot."""
    plan = stack_plan(DEPLOYABLE[0])
    instance_type = ladder_types(plan)[0]
    packed = base64.b64decode(encoded_user_data(plan, instance_type))
    script = (
        "import sys\n"
        "from cloudinit.user_data import convert_string\n"
        "msg = convert_string(sys.stdin.buffer.read())\n"
        "sys.stdout.buffer.write(msg.get_payload(decode=True))\n"
    )
    result = subprocess.run(["/usr/bin/python3", "-c", script], input=packed, capture_output=True, check=True)
    assert result.stdout.decode() == render_user_data(plan.node_specs[instance_type])
    assert result.stdout.startswith(b"#cloud-config")


# --- pure checks and variants ----------------------------------------------------------------
def test_instances_count_whole_nodes_and_gangs() -> None:
    plan = stack_plan(DEPLOYABLE[0])
    layout = plan.plan.layout
    from dataclasses import replace

    assert instances_for(5, replace(layout, replicas_per_node=2, nodes_per_replica=1)) == 3
    assert instances_for(3, replace(layout, replicas_per_node=1, nodes_per_replica=2)) == 6
    assert instances_for(0, layout) == 0


def test_refresh_needs_room_for_one_more_node() -> None:
    config = stack_plan("dev-8b").config
    fixed = with_capacity(config, min_replicas=1, max_replicas=1)
    with pytest.raises(FleetError, match="set maxReplicas to 2 or more"):
        capacity_layout(fixed, stack_plan("dev-8b").plan.layout)
    with pytest.raises(FleetError, match="room for one more node"):
        offline.run_stack(plan_for(fixed), preview=True)
    scale_from_zero = with_capacity(config, min_replicas=0, max_replicas=1)
    (group,) = capacity_layout(scale_from_zero, stack_plan("dev-8b").plan.layout).groups
    assert (group.min_size, group.max_size, group.scaled) == (0, 1, True)


def test_spot_fleet_mixes_on_demand_base_and_rebalances() -> None:
    config = with_capacity(stack_plan("dev-8b").config, market="spot", on_demand_base=1, min_replicas=1, max_replicas=3)
    run = offline.run_stack(plan_for(config), preview=False)
    (group,) = of_type(run, ASG)
    props = group.engine_inputs
    dist = props["mixedInstancesPolicy"]["instancesDistribution"]
    assert dist["onDemandBaseCapacity"] == 1 and dist["onDemandPercentageAboveBaseCapacity"] == 0
    assert dist["spotAllocationStrategy"] == "capacity-optimized-prioritized"
    assert props["capacityRebalance"] is True
    on_demand = offline.run_stack(plan_for(with_capacity(config, market="on-demand")), preview=True)
    assert "capacityRebalance" not in of_type(on_demand, ASG)[0].engine_inputs


def test_spot_gangs_are_refused() -> None:
    config = with_capacity(stack_plan("prod-405b").config, market="spot")
    with pytest.raises(FleetError, match="one reclaimed node stops the whole replica"):
        capacity_layout(config, stack_plan("prod-405b").plan.layout)


def test_capacity_block_pins_one_type_and_the_reservation() -> None:
    config = with_capacity(
        stack_plan("prod-70b").config, market="capacity-block", capacity_reservation_id="cr-0123456789abcdef0"
    )
    run = offline.run_stack(plan_for(config), preview=True)
    (template,) = of_type(run, LT)
    props = template.engine_inputs
    assert props["instanceMarketOptions"] == {"marketType": "capacity-block"}
    assert props["capacityReservationSpecification"]["capacityReservationTarget"] == {
        "capacityReservationId": "cr-0123456789abcdef0"
    }
    assert "mixedInstancesPolicy" not in of_type(run, ASG)[0].engine_inputs
    # One zone: the block's (the mocks put it in the region's second zone). Before the fix the
    # group spanned every private subnet, so most launches missed the block.
    updated = offline.run_stack(plan_for(config), preview=False)
    (group,) = of_type(updated, ASG)
    (subnet_id,) = group.engine_inputs["vpcZoneIdentifiers"]
    (subnet,) = [s for s in of_type(updated, "aws:ec2/subnet:Subnet") if s.id == subnet_id]
    assert subnet.name == "network-private-0" and subnet.engine_inputs["availabilityZone"] == "us-east-1b"
    found = policies.check_resources(
        [(r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", [])) for r in updated.records if r.custom],
        policies.policy_config(ladder_types(plan_for(config))),
    )
    assert found == [], found
    # An existing VPC: the private subnet in the block's zone (the mocks derive it from the id).
    existing = with_section(
        config, "network", mode="existing", vpc_id="vpc-0123456789abcdef0",
        private_subnet_ids=["subnet-0aaa0000", "subnet-0bbb0001"], public_subnet_ids=["subnet-0ccc0002", "subnet-0ddd0003"],
    )  # fmt: skip
    (group,) = of_type(offline.run_stack(plan_for(existing), preview=True), ASG)
    assert group.engine_inputs["vpcZoneIdentifiers"] == ["subnet-0bbb0001"]
    elsewhere = with_section(existing, "network", private_subnet_ids=["subnet-0aaa0000", "subnet-0bbb0002"])
    with pytest.raises(FleetError, match="none is in us-east-1b"):
        offline.run_stack(plan_for(elsewhere), preview=True)


def test_capacity_block_of_another_type_is_refused() -> None:
    config = with_capacity(
        stack_plan("prod-70b").config, market="capacity-block", capacity_reservation_id="cr-0123456789abcdef0"
    )
    plan = plan_for(config)
    mocks = offline.OfflineMocks(region="us-east-1", preview=True, capacity_block_instance_type="g6e.48xlarge")
    with pytest.raises(FleetError, match="the block reserves g6e.48xlarge, the plan chose"):
        offline.run_offline(lambda: deploy(plan), project="vllm-fleet", stack=config.stack, mocks=mocks, preview=True)


def test_endpoint_exposure_is_refused_where_unsafe() -> None:
    config = stack_plan("dev-8b").config
    public_http = with_section(config, "endpoint", internal=False, certificate_arn=None)
    with pytest.raises(FleetError, match="certificateArn: required"):
        offline.run_stack(plan_for(public_http), preview=True)
    public_nlb = with_section(
        config, "endpoint", type="nlb", internal=False,
        certificate_arn="arn:aws:acm:us-east-1:123456789012:certificate/abc",
    )  # fmt: skip
    with pytest.raises(FleetError, match="NLB cannot filter paths"):
        offline.run_stack(plan_for(public_nlb), preview=True)


def test_internal_nlb_forwards_at_l4() -> None:
    config = with_section(stack_plan("dev-8b").config, "endpoint", type="nlb")
    run = offline.run_stack(plan_for(config), preview=True)
    (listener,) = of_type(run, LISTENER)
    assert listener.engine_inputs["protocol"] == "TCP"
    assert listener.engine_inputs["defaultActions"][0]["type"] == "forward"
    assert not of_type(run, RULE)
    assert of_type(run, TG)[0].engine_inputs["protocol"] == "TCP"


def test_endpoints_only_network_has_no_nat_and_every_endpoint() -> None:
    config = with_section(stack_plan("prod-405b").config, "network", egress="endpoints-only")
    config = with_section(config, "endpoint", internal=True)
    # The self-hosted monitoring host installs its software from the internet: refused.
    hosted = with_section(config, "monitoring", mode="self-hosted")
    with pytest.raises(FleetError, match="monitoring.mode = \"self-hosted\".*endpoints-only"):
        offline.run_stack(plan_for(hosted), preview=True)
    config = with_section(config, "monitoring", mode="none")
    run = offline.run_stack(plan_for(config), preview=True)
    assert not of_type(run, "aws:ec2/natGateway:NatGateway")
    assert not of_type(run, "aws:ec2/internetGateway:InternetGateway")
    endpoints = {r.inputs["serviceName"]: r.inputs["vpcEndpointType"] for r in of_type(run, "aws:ec2/vpcEndpoint:VpcEndpoint")}
    facts = aws_fleet_facts()
    assert endpoints == {
        **{f"com.amazonaws.us-east-1.{s}": "Interface" for s in facts.vpc_interface_endpoints.value},
        **{f"com.amazonaws.us-east-1.{s}": "Gateway" for s in facts.vpc_gateway_endpoints.value},
    }
    hub = with_section(stack_plan("dev-8b").config, "network", egress="endpoints-only")
    assert hub.serving.weights_source == "huggingface"
    with pytest.raises(FleetError, match="unreachable with network.egress endpoints-only"):
        offline.run_stack(plan_for(hub), preview=True)


def test_existing_vpc_creates_no_vpc_resources() -> None:
    config = with_section(
        stack_plan("dev-8b").config, "network",
        mode="existing", vpc_id="vpc-0123456789abcdef0", private_subnet_ids=["subnet-0aaa1111", "subnet-0bbb2222"],
    )  # fmt: skip
    run = offline.run_stack(plan_for(config), preview=False)
    created = {r.type for r in run.records}
    assert not created & {
        "aws:ec2/vpc:Vpc", "aws:ec2/subnet:Subnet", "aws:ec2/natGateway:NatGateway", "aws:ec2/routeTable:RouteTable"
    }  # fmt: skip
    (group,) = of_type(run, ASG)
    assert group.engine_inputs["vpcZoneIdentifiers"] == ["subnet-0aaa1111", "subnet-0bbb2222"]
    assert run.outputs["vpcId"] == "vpc-0123456789abcdef0"


def test_image_source_must_be_one_of_id_or_parameter() -> None:
    config = stack_plan("dev-8b").config
    neither = with_section(config, "image", ami_id=None, ssm_parameter=None)
    with pytest.raises(FleetError, match="vllm-fleet:image: required"):
        offline.run_stack(plan_for(neither), preview=True)
    run = offline.run_stack(plan_for(config), preview=False)
    ssm_calls = [args for token, args in run.mocks.invokes if token == "aws:ssm/getParameter:getParameter"]
    # The fleet's image parameter (the monitoring host also looks up its AL2023 parameter).
    assert {"name": config.image.ssm_parameter} in ssm_calls
    assert [c for c in ssm_calls if c["name"].startswith("/vllm-fleet/")] == [{"name": config.image.ssm_parameter}]
    (template,) = of_type(run, LT)
    assert template.engine_inputs["imageId"].startswith("ami-")  # resolved at deploy time, pinned


def test_missing_or_oversized_user_data_is_refused() -> None:
    from dataclasses import replace

    plan = stack_plan("dev-8b")
    with pytest.raises(FleetError, match="no node spec"):
        encoded_user_data(replace(plan, node_specs={}), ladder_types(plan)[0])
    noise = base64.b64encode(os.urandom(20000)).decode()  # incompressible
    with pytest.raises(FleetError, match="EC2 takes at most 16384"):
        encode_user_data("#cloud-config\n# " + noise, what=f"user-data for {ladder_types(plan)[0]}")


def test_route_rules_respect_alb_limits() -> None:
    from infra.facts.aws import ApiRoute

    routes = [ApiRoute(method="POST", path=f"/v1/r{i}") for i in range(7)] + [ApiRoute(method="GET", path="/v1/models")]
    rules = route_rules(routes, RuleLimits(values_per_condition=3, values_per_rule=5))
    assert [(m, len(p)) for m, p in rules] == [("POST", 3), ("POST", 3), ("POST", 1), ("GET", 1)]
    assert all(len(p) + 1 <= 5 for _, p in rules)


def test_policy_document_without_gangs_grants_no_discovery() -> None:
    doc = node_policy_document(
        PolicyInputs(
            partition="aws", region="us-east-1", account_id="123456789012", stack="s",
            secret_arn="arn:aws:secretsmanager:us-east-1:123456789012:secret:x", log_group_arn="arn:aws:logs:l",
            gangs=False,
        )
    )  # fmt: skip
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    assert not actions & {"ec2:DescribeInstances", "elasticloadbalancing:RegisterTargets", "autoscaling:SetInstanceHealth"}


# --- a component on its own, through the shared fixture --------------------------------------
def test_api_key_component_outputs(pulumi_mocks: Callable[..., PulumiHarness]) -> None:  # noqa: F811
    harness = pulumi_mocks(preview=False)
    key = harness.run(lambda: ApiKey("key", ApiKeyArgs(secret_name="vllm-fleet/t/api-key", tags={"a": "b"})))
    assert harness.is_secret(key.api_key)
    assert not harness.is_secret(key.secret_arn)
    assert harness.resolve(key.secret_arn).startswith("arn:aws:secretsmanager:us-east-1:")
    assert harness.resolve(key.api_key).startswith("offline-")
    (password,) = harness.records(PASSWORD)
    assert password.inputs["length"] == 48 and password.inputs["special"] is False
    version = harness.record(SECRET_VERSION, "key-version")
    assert version.secret_paths == ("secretString",)


@pytest.mark.parametrize("stack", DEPLOYABLE)
def test_dashboard_group_panels_find_the_groups(stack: str) -> None:
    """Before the fix the groups published no group metrics, and the panels asked CloudWatch
    for a group named exactly the prefix (AWS suffixes every name): the panels stayed empty."""
    from infra.render.monitoring import render_monitoring
    from infra.render.stack import monitoring_spec

    plan = stack_plan(stack)
    run = stack_run(stack, False)
    files = render_monitoring(monitoring_spec(plan))
    dashboard = json.loads(next(text for path, text in files.items() if path.endswith("dashboards/fleet.json")))
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "asg"]
    pattern = re.compile(variable["regex"].strip("/"))
    names = run.outputs["autoscalingGroupNames"]
    assert names and all(pattern.match(name) for name in names)
    assert not pattern.match(f"vllm-fleet.{stack}-2.fleet-abcdef12")  # another stack's group
    targets = [t for p in dashboard["panels"] for t in p.get("targets", []) if t.get("namespace") == "AWS/AutoScaling"]
    assert targets
    for group in of_type(run, ASG):
        enabled = set(group.engine_inputs["enabledMetrics"])
        assert group.engine_inputs["metricsGranularity"] == "1Minute"
        assert {t["metricName"] for t in targets} <= enabled
    assert all(t["dimensions"] == {"AutoScalingGroupName": "$asg"} for t in targets)


@pytest.mark.parametrize("preview", [True, False])
def test_root_volume_is_never_smaller_than_the_images_snapshot(preview: bool) -> None:
    """Before the fix the root volume was the planned size alone: an image whose root snapshot
    is larger (a baked venv, caches, staged weights) could not launch at all."""
    plan = stack_plan("dev-8b")
    weights_gib = math.ceil(plan.plan.weights_bytes / 1024**3)

    def big_ami(args: dict[str, Any]) -> dict[str, Any]:
        answer = offline.OfflineMocks(region="us-east-1", preview=preview)._ami(args)
        answer["blockDeviceMappings"][0]["ebs"]["volume_size"] = "300"
        return answer

    mocks = offline.OfflineMocks(region="us-east-1", preview=preview, invoke_handlers={"aws:ec2/getAmi:getAmi": big_ami})
    run = offline.run_offline(lambda: deploy(plan), project="vllm-fleet", stack="dev-8b", mocks=mocks, preview=preview)
    (template,) = [r for r in run.records if r.type == LT]
    (root,) = template.engine_inputs["blockDeviceMappings"]
    assert root["ebs"]["volumeSize"] == 300 + weights_gib  # huggingface: downloaded onto the root volume
    normal = stack_run("dev-8b", preview)
    (template,) = of_type(normal, LT)
    assert template.engine_inputs["blockDeviceMappings"][0]["ebs"]["volumeSize"] == 100 + weights_gib  # the planned size


# --- aliases: refactorings move resources, never replace them ---------------------------------
# The URNs of the resource graph (its syrupy snapshots) before PrivateBucket and
# GeneratedSecret held the buckets and secrets their parents used to declare themselves.
URNS_BEFORE = Path(__file__).parent / "data" / "urns" / "before-private-bucket-and-generated-secret.json"
NEW_COMPONENTS = {"vllm-fleet:storage:PrivateBucket", "vllm-fleet:secrets:GeneratedSecret"}


def _qualified(urn: str) -> str:
    """A URN without its stack and project: "<parent types>$<type>::<name>"."""
    return urn.split("::", 2)[2]


@pytest.mark.parametrize("stack", DEPLOYABLE)
def test_aliases_keep_every_urn_of_the_graph_before(stack: str) -> None:
    """Every URN of the earlier graph is a URN of the same resource now, or an alias of it: a
    `pulumi up` then moves the resource into its new parent instead of deleting and creating
    it (a protected API-key secret would stop the update; a new bucket would lose its objects)."""
    before = json.loads(URNS_BEFORE.read_text(encoding="utf-8"))[stack]
    run = stack_run(stack, True)
    now = {_qualified(r.engine_urn): r for r in run.records}
    aliased: dict[str, list[ResourceRecord]] = {}
    for record in run.records:
        for alias in record.aliases:
            assert alias.split("::", 2)[:2] == record.engine_urn.split("::", 2)[:2], f"{alias}: another stack or project"
            aliased.setdefault(_qualified(alias), []).append(record)
    moved = 0
    for old in before:
        if old in now:
            continue
        holders = aliased.get(old, [])
        assert len(holders) == 1, f"{stack}: {old} is gone, and {len(holders)} resource(s) alias it"
        chain, name = old.rsplit("::", 1)
        assert (holders[0].type, holders[0].name) == (chain.rsplit("$", 1)[-1], name), old
        moved += 1
    assert moved >= 3  # at least the API key's secret, password and version
    # Only the new components themselves are new: nothing else appeared under another URN.
    for qualified, record in now.items():
        if qualified not in before and not any(_qualified(a) in before for a in record.aliases):
            assert record.type in NEW_COMPONENTS, f"{stack}: {qualified} is new"
