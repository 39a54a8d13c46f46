# ruff: noqa: F811 - tests take the imported pulumi_mocks fixture as a parameter
"""The Monitoring component under Pulumi mocks (preview and update), and the monitoring host's
files checked with the real tools: cloud-init schema, shellcheck, systemd-analyze, promtool and
amtool, the AWS CLI against a moto server (config sync, Grafana password), gpg (key pinning).

Every stack in stacks/ with monitoring enabled is run in each mode that applies to it.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import boto3
import pulumi_aws as aws
import pytest
import yaml
from syrupy.assertion import SnapshotAssertion

from infra.components.monitoring import (
    OUTPUT_GRAFANA_SECRET_ARN,
    OUTPUT_GRAFANA_URL,
    OUTPUT_PROMETHEUS_URL,
    OUTPUT_SECURITY_GROUP_ID,
    Monitoring,
    MonitoringArgs,
)
from infra.config import STACKS_DIR, load_stack_file
from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.plan.build import build_stack_plan
from infra.plan.network import check_allowed_cidrs, egress_ports
from infra.plan.stack import StackPlan
from infra.plan.tags import stack_tags
from infra.preview.offline import MOCK_ACCOUNT_ID
from infra.preview.policies import check_resources
from infra.render.monitoring import RULES_FILE, MonitoringSpec, render_monitoring
from infra.render.monitoring_host import (
    AGENT_CONFIG,
    AGENT_LABELS_SCRIPT,
    AGENT_UNIT,
    CONFIG_URI_TAG,
    LIBEXEC,
    MANIFEST_NAME,
    UNIT_DIR,
    amp_alertmanager_definition,
    config_objects,
    files_on_disk,
    grafana_admin_secret_name,
    host_destination,
    host_facts,
    host_spec,
    render_host,
    render_host_user_data,
    render_node_agent,
)
from infra.render.stack import monitoring_spec
from tests.support.ports import free_port
from tests.support.pulumi_mocks import PulumiHarness, pulumi_mocks  # noqa: F401 - the fixture
from tests.support.snapshots import text_file

VENV_BIN = Path(sys.executable).parent

INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
SECRET_VERSION = "aws:secretsmanager/secretVersion:SecretVersion"
BUCKET_OBJECT = "aws:s3/bucketObjectv2:BucketObjectv2"

VPC_ID = "vpc-0123456789abcdef0"
SUBNET_ID = "subnet-0123456789abcdef0"
SCRAPERS_SG = "sg-0scrapers00000000"
PRIVATE_IP = "10.42.3.7"
BUCKET_SUFFIX = "20261128000000000000000001"
AMP_ENDPOINT = (
    "https://aps-workspaces.us-east-1.amazonaws.com/workspaces/ws-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/"
)
GRAFANA_HOST = "g-0123456789.grafana-workspace.us-east-1.amazonaws.com"


# --- stacks ---------------------------------------------------------------------------------


def monitored_stacks() -> list[str]:
    """Fleet stacks (they declare a model; image-build stacks do not) with monitoring on."""
    names = []
    for path in sorted(STACKS_DIR.glob("Pulumi.*.yaml")):
        if "vllm-fleet:model" not in (yaml.safe_load(path.read_text()).get("config") or {}):
            continue
        name = path.name[len("Pulumi.") : -len(".yaml")]
        if load_stack_file(name).monitoring.mode != "none":
            names.append(name)
    return names


STACKS = monitored_stacks()


@cache
def stack_plan(name: str) -> StackPlan:
    # The serve argv is validated by vLLM elsewhere; monitoring needs only the plan.
    return build_stack_plan(load_stack_file(name), validate=False)


def spec_of(name: str) -> MonitoringSpec:
    return monitoring_spec(stack_plan(name))


def args_for(name: str, mode: str = "self-hosted", **changes: Any) -> MonitoringArgs:
    plan = stack_plan(name)
    config = plan.config
    args = MonitoringArgs(
        mode=mode,  # type: ignore[arg-type]
        stack=config.stack,
        region=config.region,
        partition="aws",
        account_id=MOCK_ACCOUNT_ID,
        tags=stack_tags(plan),
        spec=spec_of(name),
        vpc_id=VPC_ID,
        subnet_id=SUBNET_ID,
        allowed_cidrs=tuple(config.monitoring.allowed_cidrs),
        scraper_security_group_id=SCRAPERS_SG,
        shared_stack=config.monitoring.shared_stack,
        nodes_per_replica=plan.plan.layout.nodes_per_replica,
    )
    return dataclasses.replace(args, **changes)


def test_every_stack_with_monitoring_is_covered() -> None:
    """The parametrisations below are over real stacks: there must be some."""
    assert STACKS, "no stack in stacks/ enables monitoring"
    assert all(load_stack_file(n).monitoring.mode == "self-hosted" for n in STACKS)


# --- running the component ------------------------------------------------------------------


def computed_outputs(preview: bool, shared: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What AWS computes that OfflineMocks does not invent; unknown in a preview, like a new stack."""
    hooks: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {}
    if not preview:
        hooks[INSTANCE] = lambda name, inputs: {"privateIp": PRIVATE_IP}
        hooks["aws:s3/bucket:Bucket"] = lambda name, inputs: {
            "bucket": inputs["bucketPrefix"] + BUCKET_SUFFIX
        }
        hooks["aws:amp/workspace:Workspace"] = lambda name, inputs: {"prometheusEndpoint": AMP_ENDPOINT}
        hooks["aws:grafana/workspace:Workspace"] = lambda name, inputs: {"endpoint": GRAFANA_HOST}
    if shared is not None:
        # A stack reference is read even in a preview.
        hooks["pulumi:pulumi:StackReference"] = lambda name, inputs: {
            "name": inputs["name"],
            "outputs": shared[inputs["name"]],
            "secretOutputNames": [],
        }
    return hooks


def run(
    pulumi_mocks: Callable[..., PulumiHarness], args: MonitoringArgs, *, preview: bool, **kwargs: Any
) -> tuple[PulumiHarness, Monitoring]:
    harness = pulumi_mocks(
        preview=preview, region=args.region, resource_outputs=computed_outputs(preview, **kwargs)
    )
    component = harness.run(lambda: Monitoring("monitoring", args))
    return harness, component


def the(harness: PulumiHarness, type_token: str) -> Any:
    records = harness.records(type_token)
    assert len(records) == 1, [r.name for r in records]
    return records[0]


def host_user_data(harness: PulumiHarness) -> str:
    encoded = the(harness, INSTANCE).engine_inputs["userDataBase64"]
    return gzip.decompress(base64.b64decode(encoded, validate=True)).decode()


def uploaded_objects(harness: PulumiHarness) -> dict[str, str]:
    return {r.engine_inputs["key"]: r.engine_inputs["content"] for r in harness.records(BUCKET_OBJECT)}


# --- self-hosted: the host ------------------------------------------------------------------


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
@pytest.mark.parametrize("stack", STACKS)
def test_host_is_private_imdsv2_encrypted_and_keyless(pulumi_mocks: Any, stack: str, preview: bool) -> None:
    harness, component = run(pulumi_mocks, args_for(stack), preview=preview)
    host = the(harness, INSTANCE).engine_inputs
    facts = host_facts()
    assert host["instanceType"] == facts.instance_type.value.name
    assert host["subnetId"] == SUBNET_ID
    assert host["associatePublicIpAddress"] is False
    assert "keyName" not in host or host["keyName"] in (None, "")
    meta = host["metadataOptions"]
    assert meta["httpTokens"] == "required" and meta["httpPutResponseHopLimit"] == 1
    root = host["rootBlockDevice"]
    assert root["encrypted"] is True and root["volumeType"] == "gp3"
    assert root["volumeSize"] == facts.root_volume.value.size_gib
    # Its own group plus the network's scrapers group, which the nodes admit metrics from.
    assert SCRAPERS_SG in host["vpcSecurityGroupIds"] and len(host["vpcSecurityGroupIds"]) == 2
    # The AMI comes from AWS's public AL2023 parameter, read at deploy time.
    assert (
        "aws:ssm/getParameter:getParameter",
        {"name": facts.ami_ssm_parameter.value},
    ) in harness.mocks.invokes
    assert the(harness, INSTANCE).options.get("ignoreChanges") == ["ami"]
    # The user-data is the rendered cloud-config, gzipped, and known even in a preview.
    assert host_user_data(harness) == render_host_user_data(host_spec(spec_of(stack)))
    assert len(base64.b64decode(host["userDataBase64"])) <= aws_fleet_facts().user_data_max_bytes.value
    if preview:
        assert harness.resolve(component.grafana_url) is None  # the private IP is not known yet
    else:
        assert harness.resolve(component.grafana_url) == f"http://{PRIVATE_IP}:3000"
        assert harness.resolve(component.prometheus_url) == f"http://{PRIVATE_IP}:9090"
        assert host["tags"][CONFIG_URI_TAG] == f"s3://vllm-fleet-monitoring-{BUCKET_SUFFIX}/{stack}/"


@pytest.mark.parametrize("stack", STACKS)
def test_host_is_not_a_scrape_target_of_its_own_prometheus(pulumi_mocks: Any, stack: str) -> None:
    """Prometheus finds the fleet's nodes by tag; the host must not match those filters, or it
    would be scraped (and alerted on) as a vLLM node that never comes up."""
    harness, _ = run(pulumi_mocks, args_for(stack), preview=False)
    tags = the(harness, INSTANCE).engine_inputs["tags"]
    prometheus = yaml.safe_load(uploaded_objects(harness)[f"{stack}/files/prometheus.yml"])
    for job in prometheus["scrape_configs"]:
        for sd in job["ec2_sd_configs"]:
            tag_filters = {
                f["name"][len("tag:") :]: f["values"] for f in sd["filters"] if f["name"].startswith("tag:")
            }
            assert tag_filters, job["job_name"]
            matches = all(tags.get(key) in values for key, values in tag_filters.items())
            assert not matches, (
                f"the monitoring host matches the {job['job_name']} job's filters {tag_filters}"
            )
    # Every stack tag it carries too (the policy pack requires them): the role filter is
    # what keeps it out of discovery.
    for key, value in stack_tags(stack_plan(stack)).items():
        assert tags[key] == value


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
@pytest.mark.parametrize("stack", STACKS)
def test_ingress_only_from_the_allowed_cidrs(pulumi_mocks: Any, stack: str, preview: bool) -> None:
    args = args_for(stack)
    assert args.allowed_cidrs, "the stacks name allowed CIDRs; this test needs some"
    harness, _ = run(pulumi_mocks, args, preview=preview)
    rules = {
        (r.engine_inputs["fromPort"], r.engine_inputs["toPort"], r.engine_inputs.get("cidrIpv4"))
        for r in harness.records(INGRESS)
    }
    assert rules == {(port, port, cidr) for cidr in args.allowed_cidrs for port in (3000, 9090)}
    sg = the(harness, "aws:ec2/securityGroup:SecurityGroup").engine_inputs
    assert not sg.get("ingress")
    egress = {(r.engine_inputs["fromPort"], r.engine_inputs["cidrIpv4"]) for r in harness.records(EGRESS)}
    assert egress == {(port, "0.0.0.0/0") for port in egress_ports(spec_of(stack).webhook_url)}
    # The guardrails the policy pack enforces on ingress hold for every resource.
    network_policies = {"no-world-ingress", "no-ssh"}
    violations = [
        v
        for v in check_resources(
            (r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", []))
            for r in harness.records()
        )
        if v.policy in network_policies
    ]
    assert violations == []


def test_no_allowed_cidrs_means_no_ingress_at_all(pulumi_mocks: Any) -> None:
    harness, _ = run(pulumi_mocks, args_for(STACKS[0], allowed_cidrs=()), preview=False)
    assert harness.records(INGRESS) == []
    # Reachable through Session Manager instead: the host's role has the SSM core policy.
    attachments = [
        r.engine_inputs["policyArn"]
        for r in harness.records("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    ]
    assert attachments == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "10.0.0.1/8", "not-a-cidr"])
def test_world_or_malformed_cidrs_are_refused_before_any_resource(pulumi_mocks: Any, cidr: str) -> None:
    with pytest.raises(FleetError, match=r"allowedCidrs\[1\]"):
        check_allowed_cidrs(["10.0.0.0/8", cidr])
    harness = pulumi_mocks(preview=False)
    with pytest.raises(FleetError):
        harness.run(lambda: Monitoring("monitoring", args_for(STACKS[0], allowed_cidrs=("10.0.0.0/8", cidr))))
    assert [r.type for r in harness.records()] == ["vllm-fleet:monitoring:Monitoring"]


def test_ipv6_cidrs_become_ipv6_rules(pulumi_mocks: Any) -> None:
    harness, _ = run(pulumi_mocks, args_for(STACKS[0], allowed_cidrs=("fd00:42::/48",)), preview=False)
    rules = {
        (r.engine_inputs["fromPort"], r.engine_inputs.get("cidrIpv6"), r.engine_inputs.get("cidrIpv4"))
        for r in harness.records(INGRESS)
    }
    assert rules == {(3000, "fd00:42::/48", None), (9090, "fd00:42::/48", None)}


def test_a_webhook_on_another_port_opens_only_that_port() -> None:
    spec = dataclasses.replace(spec_of(STACKS[0]), webhook_url="https://hooks.example.com:8443/alerts")
    assert egress_ports(spec.webhook_url) == [443, 8443]


# --- self-hosted: the admin password --------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_admin_password_exists_only_as_a_secret(pulumi_mocks: Any, stack: str) -> None:
    harness, component = run(pulumi_mocks, args_for(stack), preview=False)
    version = the(harness, SECRET_VERSION)
    password = version.engine_inputs["secretString"]
    assert isinstance(password, str) and len(password) >= 32
    generated = the(harness, "random:index/randomPassword:RandomPassword").engine_inputs
    assert generated["length"] == 32 and generated["special"] is False
    assert "secretString" in version.secret_paths  # sent to the engine as a secret
    assert "secretString" in version.options["additionalSecretOutputs"]  # and kept secret in state
    secret = the(harness, "aws:secretsmanager/secret:Secret").engine_inputs
    assert secret["name"] == grafana_admin_secret_name(stack)
    # Not in the user-data, not in any other resource's inputs, not in the content in S3.
    assert password not in host_user_data(harness)
    for record in harness.records():
        if record.type not in (SECRET_VERSION, "random:index/randomPassword:RandomPassword"):
            assert password not in json.dumps(record.engine_inputs), record.name
    # Not in the component's outputs.
    outputs = {key: harness.resolve(value) for key, value in component.stack_outputs().items()}
    assert password not in json.dumps(outputs)
    assert set(outputs) == {
        OUTPUT_GRAFANA_URL,
        OUTPUT_PROMETHEUS_URL,
        OUTPUT_GRAFANA_SECRET_ARN,
        OUTPUT_SECURITY_GROUP_ID,
    }
    assert outputs[OUTPUT_GRAFANA_SECRET_ARN].startswith("arn:aws:secretsmanager:")


# --- self-hosted: least privilege -----------------------------------------------------------


def host_policy(harness: PulumiHarness) -> dict[str, dict[str, Any]]:
    policy = json.loads(the(harness, ROLE_POLICY).engine_inputs["policy"])
    return {s["Sid"]: s for s in policy["Statement"]}


@pytest.mark.parametrize("stack", STACKS)
def test_host_role_is_least_privilege(pulumi_mocks: Any, stack: str) -> None:
    harness, _ = run(pulumi_mocks, args_for(stack), preview=False)
    statements = host_policy(harness)
    bucket = f"vllm-fleet-monitoring-{BUCKET_SUFFIX}"
    spec = spec_of(stack)
    expected = {
        "DiscoverFleetNodes": (["ec2:DescribeInstances"], ["*"]),
        "ReadCloudWatchMetrics": (["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"], ["*"]),
        "ReadMonitoringConfig": (["s3:GetObject"], [f"arn:aws:s3:::{bucket}/{stack}/*"]),
    }
    if spec.sns_topic_arn:
        expected["PublishAlerts"] = (["sns:Publish"], [spec.sns_topic_arn])
    for sid, (actions, resources) in expected.items():
        assert statements[sid]["Effect"] == "Allow"
        assert statements[sid]["Action"] == actions, sid
        assert statements[sid]["Resource"] == resources, sid
    read = statements["ReadGrafanaAdminPassword"]
    assert read["Action"] == ["secretsmanager:GetSecretValue"]
    assert len(read["Resource"]) == 1 and read["Resource"][0].startswith(
        f"arn:aws:secretsmanager:{spec.region}:{MOCK_ACCOUNT_ID}:secret:{grafana_admin_secret_name(stack)}-"
    )
    assert set(statements) == set(expected) | {"ReadGrafanaAdminPassword"}
    # No wildcard actions anywhere; "*" resources only where AWS offers nothing narrower.
    for sid, statement in statements.items():
        assert all("*" not in action for action in statement["Action"]), sid
        if statement["Resource"] == ["*"]:
            assert sid in ("DiscoverFleetNodes", "ReadCloudWatchMetrics")
    trust = json.loads(the(harness, "aws:iam/role:Role").engine_inputs["assumeRolePolicy"])
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]


def test_policy_is_unknown_until_the_secret_exists_in_a_preview(pulumi_mocks: Any) -> None:
    """In a preview the ARNs are unknown, so the policy is too: nothing is guessed."""
    harness, _ = run(pulumi_mocks, args_for(STACKS[0]), preview=True)
    assert the(harness, ROLE_POLICY).inputs["policy"] == "[unknown]"


# --- self-hosted: the content in S3 ---------------------------------------------------------


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
@pytest.mark.parametrize("stack", STACKS)
def test_content_goes_to_s3_with_a_checksum_manifest(pulumi_mocks: Any, stack: str, preview: bool) -> None:
    harness, _ = run(pulumi_mocks, args_for(stack), preview=preview)
    objects = uploaded_objects(harness)
    rendered = render_monitoring(spec_of(stack))
    assert objects == {f"{stack}/{key}": content for key, content in config_objects(rendered).items()}
    manifest = objects[f"{stack}/{MANIFEST_NAME}"]
    listed = dict(reversed(line.split("  ")) for line in manifest.splitlines())
    assert set(listed) == set(rendered)
    for rel, digest in listed.items():
        assert hashlib.sha256(rendered[rel].encode()).hexdigest() == digest
    # Every file has a place on the host.
    for rel in rendered:
        assert host_destination(rel, spec_of(stack).grafana_dashboards_dir).startswith("/")
    # The bucket is private and TLS-only.
    block = the(harness, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").engine_inputs
    assert all(
        block[k] is True
        for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    )
    if not preview:
        policy = json.loads(the(harness, "aws:s3/bucketPolicy:BucketPolicy").engine_inputs["policy"])
        assert policy["Statement"][0]["Effect"] == "Deny"
        assert policy["Statement"][0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_a_rendered_file_without_a_place_on_the_host_is_refused() -> None:
    with pytest.raises(FleetError, match="no place"):
        host_destination("grafana/plugins/x.yml", "/var/lib/grafana/dashboards/vllm-fleet")
    with pytest.raises(FleetError, match="not a plain relative path"):
        config_objects({"../etc/passwd": "x\n"})


# --- the policy pack over the component -----------------------------------------------------


def accepts_tags(type_token: str) -> bool:
    package, module, kind = type_token.split(":")
    if package != "aws":
        return True
    module_name = module.split("/")[0]
    cls = getattr(getattr(aws, module_name), kind)
    return "tags" in inspect.signature(cls._internal_init).parameters


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
@pytest.mark.parametrize("stack", STACKS)
def test_policy_pack_passes_on_the_monitoring_resources(
    pulumi_mocks: Any, stack: str, preview: bool
) -> None:
    """The whole guardrail pack passes: tagless types are listed in TAGLESS_TYPES (checked
    against pulumi-aws's signatures), and the host carries every required tag."""
    harness, _ = run(pulumi_mocks, args_for(stack), preview=preview)
    violations = check_resources(
        (r.type, r.name, r.engine_inputs, r.options.get("additionalSecretOutputs", []))
        for r in harness.records()
    )
    assert violations == [], "\n".join(map(repr, violations))
    for v_type in {r.type for r in harness.records() if r.type.startswith("aws:")}:
        from infra.preview.policies import TAGLESS_TYPES

        assert (v_type in TAGLESS_TYPES) == (not accepts_tags(v_type)), v_type


# --- managed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
@pytest.mark.parametrize("stack", STACKS)
def test_managed_mode_creates_amp_and_grafana_with_the_rendered_rules(
    pulumi_mocks: Any, stack: str, preview: bool
) -> None:
    args = args_for(stack, mode="managed")
    spec = spec_of(stack)
    if args.nodes_per_replica > 1:
        harness = pulumi_mocks(preview=preview)
        with pytest.raises(FleetError, match="multi-node replicas"):
            harness.run(lambda: Monitoring("monitoring", args))
        assert [r.type for r in harness.records()] == ["vllm-fleet:monitoring:Monitoring"]
        return
    harness, component = run(pulumi_mocks, args, preview=preview)
    rendered = render_monitoring(spec)
    assert harness.records(INSTANCE) == []
    workspace = the(harness, "aws:amp/workspace:Workspace").engine_inputs
    assert workspace["alias"] == f"vllm-fleet-{stack}"
    rules = the(harness, "aws:amp/ruleGroupNamespace:RuleGroupNamespace").engine_inputs
    assert rules["data"] == rendered[RULES_FILE]
    definition = the(harness, "aws:amp/alertManagerDefinition:AlertManagerDefinition").engine_inputs[
        "definition"
    ]
    assert definition == amp_alertmanager_definition(rendered["alertmanager.yml"])
    grafana = the(harness, "aws:grafana/workspace:Workspace").engine_inputs
    assert grafana["accountAccessType"] == "CURRENT_ACCOUNT"
    assert grafana["authenticationProviders"] == ["AWS_SSO"]
    assert grafana["dataSources"] == ["PROMETHEUS", "CLOUDWATCH"]
    assert grafana["permissionType"] == "CUSTOMER_MANAGED"
    roles = {r.name: r for r in harness.records("aws:iam/role:Role")}
    trust = json.loads(roles["monitoring-grafana-role"].engine_inputs["assumeRolePolicy"])["Statement"][0]
    assert trust["Principal"] == {"Service": "grafana.amazonaws.com"}
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": MOCK_ACCOUNT_ID}}
    if preview:
        assert grafana["roleArn"] is None  # unknown until the role exists
        return
    assert grafana["roleArn"].startswith(f"arn:aws:iam::{MOCK_ACCOUNT_ID}:role/")
    workspace_arn = harness.resolve(component.amp_workspace_arn)
    query = json.loads(the(harness, ROLE_POLICY).engine_inputs["policy"])["Statement"]
    assert query[0]["Resource"] == [workspace_arn] and all(a.startswith("aps:") for a in query[0]["Action"])
    assert harness.resolve(component.grafana_url) == f"https://{GRAFANA_HOST}"
    assert harness.resolve(component.amp_endpoint) == AMP_ENDPOINT
    remote_write = json.loads(harness.resolve(component.node_remote_write_policy))
    assert remote_write["Statement"] == [
        {
            "Sid": "RemoteWriteMetrics",
            "Effect": "Allow",
            "Action": ["aps:RemoteWrite"],
            "Resource": [workspace_arn],
        }
    ]
    agent = harness.resolve(component.node_agent_files)
    assert agent == render_node_agent(spec, AMP_ENDPOINT + "api/v1/remote_write", nodes_per_replica=1)


def test_managed_mode_needs_an_sns_topic(pulumi_mocks: Any) -> None:
    spec = dataclasses.replace(
        spec_of(STACKS[0]), sns_topic_arn=None, webhook_url="https://hooks.example.com/alerts"
    )
    harness = pulumi_mocks(preview=False)
    with pytest.raises(FleetError, match="snsTopicArn: required with mode managed"):
        harness.run(lambda: Monitoring("monitoring", args_for(STACKS[0], mode="managed", spec=spec)))
    assert [r.type for r in harness.records()] == ["vllm-fleet:monitoring:Monitoring"]


@pytest.mark.parametrize("stack", STACKS)
def test_amp_alertmanager_definition_keeps_only_sns_and_amtool_accepts_it(stack: str, tmp_path: Path) -> None:
    spec = dataclasses.replace(spec_of(stack), webhook_url="https://hooks.example.com/alerts")
    rendered = render_monitoring(spec)["alertmanager.yml"]
    assert "webhook_configs" in rendered
    definition = yaml.safe_load(amp_alertmanager_definition(rendered))
    inner = yaml.safe_load(definition["alertmanager_config"])
    assert set(definition) == {"alertmanager_config"}
    for receiver in inner["receivers"]:
        assert set(receiver) == {"name", "sns_configs"}
        assert all(sns["sigv4"]["region"] for sns in receiver["sns_configs"])
    path = tmp_path / "alertmanager.yml"
    path.write_text(definition["alertmanager_config"])
    result = subprocess.run(
        ["amtool", "check-config", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


class RemoteWriteSink:
    """A local HTTP endpoint that records what a Prometheus remote-writes to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[dict[str, str]] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/workspaces/ws-test/api/v1/remote_write"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("stack", STACKS)
def test_node_agent_config_passes_promtool(stack: str, tmp_path: Path) -> None:
    spec, nodes = spec_of(stack), stack_plan(stack).plan.layout.nodes_per_replica
    if nodes > 1:
        with pytest.raises(FleetError, match="multi-node"):
            render_node_agent(spec, AMP_ENDPOINT + "api/v1/remote_write", nodes_per_replica=nodes)
        return
    files_on_disk(
        render_node_agent(spec, AMP_ENDPOINT + "api/v1/remote_write", nodes_per_replica=nodes), tmp_path
    )
    check = subprocess.run(
        ["promtool", "check", "config", "--agent", str(tmp_path / AGENT_CONFIG)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# The agent's config differs between stacks only in names and ports (promtool checks each above).
@pytest.mark.parametrize(
    "stack", [next(s for s in STACKS if stack_plan(s).plan.layout.nodes_per_replica == 1)]
)
def test_node_agent_config_runs_in_a_real_prometheus_agent(stack: str, tmp_path: Path) -> None:
    """promtool accepts the agent config; a real Prometheus in agent mode runs it with the
    node's labels expanded from its environment and remote-writes what it scrapes. The AMP URL
    is swapped for a local sink: no traffic leaves the machine."""
    remote_write = AMP_ENDPOINT + "api/v1/remote_write"
    files = render_node_agent(spec_of(stack), remote_write)
    assert set(files) == {AGENT_CONFIG, AGENT_LABELS_SCRIPT, AGENT_UNIT}
    files_on_disk(files, tmp_path)
    config = tmp_path / AGENT_CONFIG
    check = subprocess.run(
        ["promtool", "check", "config", "--agent", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    shell = subprocess.run(
        ["shellcheck", "--shell=bash", str(tmp_path / AGENT_LABELS_SCRIPT)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert shell.returncode == 0, shell.stdout

    sink = RemoteWriteSink()
    text = config.read_text()
    assert text.count(json.dumps(remote_write)) == 1
    local = tmp_path / "agent-local.yml"
    local.write_text(
        text.replace(json.dumps(remote_write), json.dumps(sink.url))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("scrape_timeout: 10s", "scrape_timeout: 1s")
    )
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "INSTANCE_ID": "i-0123456789abcdef0",
        "INSTANCE_TYPE": "g6e.xlarge",
        "AVAILABILITY_ZONE": "us-east-1a",
        # SigV4 signs with whatever credentials it finds; these reach only the local sink.
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLETESTONLY0",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    process = subprocess.Popen(
        [
            "prometheus",
            "--enable-feature=agent,expand-external-labels",
            f"--config.file={local}",
            f"--storage.agent.path={tmp_path / 'wal'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        loaded = None
        while loaded is None or not sink.requests:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, (
                f"no remote write within 90 s (config loaded: {loaded is not None})"
            )
            if loaded is None:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/v1/status/config", timeout=2
                    ) as response:
                        loaded = json.loads(response.read())["data"]["yaml"]
                except OSError:
                    pass
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        sink.close()
    labels = yaml.safe_load(loaded)["global"]["external_labels"]
    assert labels["instance_id"] == "i-0123456789abcdef0"
    assert labels["instance_type"] == "g6e.xlarge" and labels["availability_zone"] == "us-east-1a"
    request = sink.requests[0]
    assert request["path"] == "/workspaces/ws-test/api/v1/remote_write"
    assert request["content-encoding"] == "snappy" and request["content-type"] == "application/x-protobuf"
    # Not asserted: the SigV4 signature. Debian's Prometheus 2.42 (the one here) loads the sigv4
    # block and finds credentials, yet sends these requests unsigned; the nodes run 2.53.4.


def test_node_agent_refuses_gangs_and_foreign_urls() -> None:
    spec = spec_of(STACKS[0])
    with pytest.raises(FleetError, match="multi-node"):
        render_node_agent(
            dataclasses.replace(spec, serving_tag=("vllm-fleet:serving", "true")),
            AMP_ENDPOINT + "api/v1/remote_write",
        )
    with pytest.raises(FleetError, match="remote_write endpoint"):
        render_node_agent(spec, "https://metrics.example.com/api/v1/write")


# --- shared and none -------------------------------------------------------------------------


@pytest.mark.parametrize("preview", [False, True], ids=["update", "preview"])
def test_shared_mode_reads_the_other_stacks_outputs(pulumi_mocks: Any, preview: bool) -> None:
    other = "acme/vllm-fleet/monitoring-hub"
    shared = {
        other: {
            OUTPUT_GRAFANA_URL: "http://10.9.0.5:3000",
            OUTPUT_PROMETHEUS_URL: "http://10.9.0.5:9090",
            OUTPUT_GRAFANA_SECRET_ARN: "arn:aws:secretsmanager:us-east-1:123456789012:secret:x-AbCdEf",
            OUTPUT_SECURITY_GROUP_ID: "sg-0hub",
        }
    }
    args = args_for(STACKS[0], mode="shared", shared_stack=other)
    harness, component = run(pulumi_mocks, args, preview=preview, shared=shared)
    # A stack reference is read, not registered: nothing of this fleet's own is declared.
    assert [r.type for r in harness.records()] == ["vllm-fleet:monitoring:Monitoring"]
    outputs = {key: harness.resolve(value) for key, value in component.stack_outputs().items()}
    assert outputs == shared[other]


def test_shared_mode_needs_another_stack(pulumi_mocks: Any) -> None:
    harness = pulumi_mocks(preview=False)
    with pytest.raises(FleetError, match="sharedStack: required"):
        harness.run(lambda: Monitoring("monitoring", args_for(STACKS[0], mode="shared", shared_stack=None)))
    with pytest.raises(FleetError, match="cannot share its own"):
        harness.run(
            lambda: Monitoring(
                "again", args_for(STACKS[0], mode="shared", shared_stack=f"acme/vllm-fleet/{STACKS[0]}")
            )
        )


def test_shared_stack_config_key(tmp_path: Path) -> None:
    from infra.config import parse_stack_config

    base = yaml.safe_load((STACKS_DIR / f"Pulumi.{STACKS[0]}.yaml").read_text())["config"]
    monitoring = dict(base["vllm-fleet:monitoring"], mode="shared", sharedStack="acme/vllm-fleet/hub")
    config = parse_stack_config(STACKS[0], {**base, "vllm-fleet:monitoring": monitoring})
    assert config.monitoring.shared_stack == "acme/vllm-fleet/hub"
    with pytest.raises(FleetError, match="sharedStack is required with mode shared"):
        parse_stack_config(STACKS[0], {**base, "vllm-fleet:monitoring": dict(monitoring, sharedStack=None)})
    with pytest.raises(FleetError, match="sharedStack is required with mode shared, and allowed only there"):
        parse_stack_config(
            STACKS[0],
            {**base, "vllm-fleet:monitoring": dict(base["vllm-fleet:monitoring"], sharedStack="a/b/c")},
        )


def test_none_mode_declares_nothing(pulumi_mocks: Any) -> None:
    harness, component = run(pulumi_mocks, args_for(STACKS[0], mode="none"), preview=False)
    assert [r.type for r in harness.records()] == ["vllm-fleet:monitoring:Monitoring"]
    assert component.stack_outputs() == {}


# --- the host's files with the real tools ---------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_host_user_data_is_valid_cloud_config_carrying_every_file(stack: str, tmp_path: Path) -> None:
    spec = host_spec(spec_of(stack))
    user_data = render_host_user_data(spec)
    path = tmp_path / "user-data"
    path.write_text(user_data)
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr
    doc = yaml.safe_load(user_data)
    written = {f["path"].lstrip("/"): f["content"] for f in doc["write_files"]}
    assert written == render_host(spec)
    assert doc["runcmd"] == [[f"/{LIBEXEC}/install"]]
    packed = gzip.compress(user_data.encode(), 9, mtime=0)
    print(f"\n[{stack}] monitoring host user-data: {len(user_data)} bytes, {len(packed)} gzipped")
    assert len(packed) <= aws_fleet_facts().user_data_max_bytes.value


def test_cloud_init_schema_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_text(
        render_host_user_data(host_spec(spec_of(STACKS[0]))).replace("runcmd:\n", "runcmd: nonsense\n")
    )
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host's files on disk, with stand-ins for what the install brings (binaries, the
    Grafana RPM's unit) so systemd-analyze can resolve every reference."""
    root = tmp_path_factory.mktemp("monitoring-host")
    files_on_disk(render_host(host_spec(spec_of(STACKS[0]))), root)
    for rel in (
        "usr/local/bin/prometheus",
        "usr/local/bin/alertmanager",
        "usr/sbin/grafana-server",
        "usr/bin/kill",
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    # Stand-in for the unit the Grafana RPM installs; our drop-in extends it.
    (root / UNIT_DIR / "grafana-server.service").write_text(
        "[Unit]\nDescription=stand-in\n[Service]\nExecStart=/usr/sbin/grafana-server\n"
    )
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


HOST_UNITS = (
    "prometheus.service",
    "alertmanager.service",
    "vllm-fleet-grafana-password.service",
    "grafana-server.service",
    "vllm-fleet-monitoring-sync.service",
    "vllm-fleet-monitoring-sync.timer",
)
# Highest acceptable `systemd-analyze security` exposure per service (0 safe - 10 exposed).
MAX_EXPOSURE = {
    "prometheus.service": 2.0,
    "alertmanager.service": 2.0,
    "vllm-fleet-grafana-password.service": 3.0,
    # Root by necessity: it writes the services' config under /etc and asks systemd to reload.
    "vllm-fleet-monitoring-sync.service": 6.5,
}


def test_host_units_pass_systemd_analyze_verify(host_root: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={host_root}", "--man=no", "--generators=no", *HOST_UNITS],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", (
        result.stdout + result.stderr
    )
    dropin = (host_root / UNIT_DIR / "grafana-server.service.d" / "vllm-fleet.conf").read_text()
    assert 'Environment="GF_SECURITY_ADMIN_PASSWORD=$__file{%d/admin-password}"' in dropin
    assert "LoadCredential=admin-password:/run/vllm-fleet-monitoring/grafana-admin-password" in dropin


def test_host_unit_exposure(host_root: Path) -> None:
    scores = {}
    for unit, limit in MAX_EXPOSURE.items():
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(host_root / UNIT_DIR / unit)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert match, result.stdout + result.stderr
        scores[unit] = float(match.group(1))
        assert scores[unit] <= limit, (unit, scores[unit])
    print("\nmonitoring host exposure:", scores)


def test_host_scripts_pass_shellcheck(host_root: Path) -> None:
    scripts = sorted((host_root / LIBEXEC).iterdir())
    assert [p.name for p in scripts] == ["fetch-grafana-password", "install", "pin-gpg-key", "sync-config"]
    result = subprocess.run(
        ["shellcheck", "--shell=bash", *map(str, scripts)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_install_script_verifies_every_download_against_its_pinned_checksum(host_root: Path) -> None:
    install = (host_root / LIBEXEC / "install").read_text()
    facts = host_facts()
    for release in (facts.prometheus.value, facts.alertmanager.value):
        line = next(
            line
            for line in install.splitlines()
            if line.startswith("install_release ") and release.url in line
        )
        assert release.sha256 in line and release.archive_dir in line
        assert all(binary in line.split() for binary in release.binaries)
    repo = facts.grafana_repo.value
    assert f'"$libexec/pin-gpg-key" {repo.key_fingerprint}' in install
    repo_file = (host_root / "etc/yum.repos.d/grafana.repo").read_text()
    assert (
        "gpgcheck=1" in repo_file
        and "repo_gpgcheck=1" in repo_file
        and f"baseurl={repo.baseurl}" in repo_file
    )


def test_snapshot_of_the_rendered_host_user_data(snapshot: SnapshotAssertion) -> None:
    """tests/__snapshots__/test_monitoring_component/: regenerate deliberately with --snapshot-update."""
    stack = "dev-8b" if "dev-8b" in STACKS else STACKS[0]
    rendered = {
        f"{stack}.user-data.yaml": render_host_user_data(host_spec(spec_of(stack))),
        f"{stack}.prometheus-agent.yml": render_node_agent(
            spec_of(stack), AMP_ENDPOINT + "api/v1/remote_write"
        )[AGENT_CONFIG],
    }
    for name, content in rendered.items():
        assert content == text_file(snapshot, name)


# --- pin-gpg-key with real gpg --------------------------------------------------------------


def gpg(home: Path, *args: str, faked_time: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = [f"--faked-system-time={faked_time}"] if faked_time else []
    return subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            *extra,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def new_key(home: Path, uid: str, *, expire: str = "never", faked_time: str | None = None) -> str:
    gpg(home, "--quick-gen-key", uid, "ed25519", "sign", expire, faked_time=faked_time)
    listing = gpg(home, "--with-colons", "--list-keys", uid).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


@pytest.fixture(scope="module")
def key_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    keys = {
        "wanted": new_key(home, "Wanted Signer <wanted@example.com>"),
        "other": new_key(home, "Other Signer <other@example.com>"),
        "expired": new_key(home, "Old Signer <old@example.com>", expire="1d", faked_time="20200101T000000!"),
        "revoked": new_key(home, "Revoked Signer <revoked@example.com>"),
    }
    # gpg writes a revocation certificate per key, guarded by a leading ':'; importing it revokes.
    certificate = (home / "openpgp-revocs.d" / f"{keys['revoked']}.rev").read_text()
    (home / "revoke.asc").write_text(
        certificate.replace(":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----")
    )
    gpg(home, "--import", str(home / "revoke.asc"))
    bundle = home / "bundle.asc"
    bundle.write_text(gpg(home, "--armor", "--export").stdout)
    return {"keys": keys, "bundle": bundle}


def pin(host_root: Path, fingerprint: str, bundle: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GNUPGHOME"}
    return subprocess.run(
        [str(host_root / LIBEXEC / "pin-gpg-key"), fingerprint, str(bundle), str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_pin_gpg_key_keeps_only_the_pinned_key(
    host_root: Path, key_bundle: dict[str, Any], tmp_path: Path
) -> None:
    keys = key_bundle["keys"]
    out = tmp_path / "pinned.asc"
    result = pin(host_root, keys["wanted"], key_bundle["bundle"], out)
    assert result.returncode == 0, result.stderr
    check = tmp_path / "check"
    check.mkdir(mode=0o700)
    gpg(check, "--import", str(out))
    listed = [
        line.split(":")[9]
        for line in gpg(check, "--with-colons", "--list-keys").stdout.splitlines()
        if line.startswith("fpr:")
    ]
    assert listed == [keys["wanted"]]
    assert oct(stat.S_IMODE(out.stat().st_mode)) == "0o644"


@pytest.mark.parametrize(
    "which,message",
    [("absent", "holds no primary key"), ("expired", "is expired"), ("revoked", "is revoked")],
)
def test_pin_gpg_key_refuses_absent_expired_and_revoked_keys(
    host_root: Path, key_bundle: dict[str, Any], tmp_path: Path, which: str, message: str
) -> None:
    fingerprint = "0" * 40 if which == "absent" else key_bundle["keys"][which]
    out = tmp_path / "pinned.asc"
    result = pin(host_root, fingerprint, key_bundle["bundle"], out)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not out.exists()


# --- sync-config and fetch-grafana-password against a moto server ---------------------------


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    """A systemctl that records its arguments: the sync asks systemd to reload services, and
    there is no systemd here to ask."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "systemctl").chmod(0o755)
    return bin_dir, log


def put_objects(bucket: str, prefix: str, objects: dict[str, str]) -> None:
    s3 = boto3.client("s3")
    for key, content in objects.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}{key}", Body=content.encode())


def run_sync(host_root: Path, root: Path, uri: str, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{VENV_BIN}:/usr/bin:/bin",
        "VLLM_FLEET_MONITORING_ROOT": str(root),
        "VLLM_FLEET_MONITORING_CONFIG_URI": uri,
    }
    return subprocess.run(
        [str(host_root / LIBEXEC / "sync-config")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def systemctl_calls(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_sync_installs_validated_content_and_reloads_only_what_changed(
    moto_env: dict[str, str], host_root: Path, fake_systemctl: tuple[Path, Path], tmp_path: Path
) -> None:
    bin_dir, log = fake_systemctl
    stack = STACKS[0]
    spec = spec_of(stack)
    bucket, prefix = "vllm-fleet-monitoring-test", f"{stack}/"
    boto3.client("s3").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/{prefix}"
    root = tmp_path / "root"
    files = render_monitoring(spec)
    put_objects(bucket, prefix, config_objects(files))

    first = run_sync(host_root, root, uri, bin_dir)
    assert first.returncode == 0, first.stderr
    for rel, content in files.items():
        assert (
            root / host_destination(rel, spec.grafana_dashboards_dir).lstrip("/")
        ).read_text() == content, rel
    assert systemctl_calls(log) == [
        "try-reload-or-restart prometheus.service alertmanager.service",
        "try-restart grafana-server.service",
    ]

    # The same manifest again: nothing to do.
    again = run_sync(host_root, root, uri, bin_dir)
    assert again.returncode == 0 and systemctl_calls(log) == []

    # A dashboard changes: Prometheus/Alertmanager get their (harmless) reload, Grafana is left
    # to pick the JSON up itself, and a removed dashboard disappears.
    dashboards = sorted(rel for rel in files if rel.startswith("grafana/dashboards/"))
    changed = dict(files)
    changed[dashboards[0]] = files[dashboards[0]].replace('"refresh": "30s"', '"refresh": "1m"')
    del changed[dashboards[1]]
    s3 = boto3.client("s3")
    put_objects(bucket, prefix, config_objects(changed))
    s3.delete_object(Bucket=bucket, Key=f"{prefix}files/{dashboards[1]}")
    third = run_sync(host_root, root, uri, bin_dir)
    assert third.returncode == 0, third.stderr
    dash_dir = root / spec.grafana_dashboards_dir.lstrip("/")
    assert (dash_dir / Path(dashboards[0]).name).read_text() == changed[dashboards[0]]
    assert not (dash_dir / Path(dashboards[1]).name).exists()
    assert systemctl_calls(log) == ["try-reload-or-restart prometheus.service alertmanager.service"]


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("invalid-prometheus", "parsing YAML file"),
        ("invalid-alertmanager", ""),
        ("stale-file", "do not match the manifest"),
        ("unknown-path", "has no place on this host"),
        ("missing-file", ""),
    ],
)
def test_sync_leaves_the_running_config_alone_when_the_new_one_is_bad(
    moto_env: dict[str, str],
    host_root: Path,
    fake_systemctl: tuple[Path, Path],
    tmp_path: Path,
    breakage: str,
    message: str,
) -> None:
    bin_dir, log = fake_systemctl
    stack = STACKS[0]
    spec = spec_of(stack)
    bucket, prefix = "vllm-fleet-monitoring-bad", f"{stack}/"
    boto3.client("s3").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/{prefix}"
    root = tmp_path / "root"
    files = render_monitoring(spec)
    put_objects(bucket, prefix, config_objects(files))
    assert run_sync(host_root, root, uri, bin_dir).returncode == 0
    systemctl_calls(log)
    installed = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    bad = dict(files)
    objects: dict[str, str]
    if breakage == "invalid-prometheus":
        bad["prometheus.yml"] = files["prometheus.yml"].replace("scrape_configs:", "scrape_configs: [")
        objects = config_objects(bad)
    elif breakage == "invalid-alertmanager":
        bad["alertmanager.yml"] = files["alertmanager.yml"].replace("receiver: fleet", "receiver: nobody")
        objects = config_objects(bad)
    elif breakage == "stale-file":
        # The manifest of a newer deploy, whose files have not all arrived yet.
        bad["prometheus.yml"] = files["prometheus.yml"].replace(
            "scrape_interval: 15s", "scrape_interval: 30s"
        )
        objects = {MANIFEST_NAME: config_objects(bad)[MANIFEST_NAME]}
    elif breakage == "unknown-path":
        bad["grafana/plugins/evil.yml"] = "x: 1\n"
        objects = config_objects(bad)
    else:
        objects = {
            MANIFEST_NAME: config_objects({**files, "rules/extra.rules.yml": "groups: []\n"})[MANIFEST_NAME]
        }
    put_objects(bucket, prefix, objects)
    result = run_sync(host_root, root, uri, bin_dir)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == installed
    assert systemctl_calls(log) == []


def run_fetch(host_root: Path, run_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "VLLM_FLEET_MONITORING_RUN_DIR": str(run_dir),
        **env,
    }
    return subprocess.run(
        [str(host_root / LIBEXEC / "fetch-grafana-password")],
        check=False,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_fetch_grafana_password_writes_a_root_only_file(
    moto_env: dict[str, str], host_root: Path, tmp_path: Path
) -> None:
    stack = STACKS[0]
    password = "Xy7" + "a" * 29
    boto3.client("secretsmanager").create_secret(Name=grafana_admin_secret_name(stack), SecretString=password)
    result = run_fetch(host_root, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    target = tmp_path / "run" / "grafana-admin-password"
    assert target.read_text().rstrip("\n") == password
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert password not in result.stderr + result.stdout
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["grafana-admin-password"]


def test_fetch_grafana_password_refuses_a_weak_or_missing_secret(
    moto_env: dict[str, str], host_root: Path, tmp_path: Path
) -> None:
    stack = STACKS[0]
    boto3.client("secretsmanager").create_secret(Name=grafana_admin_secret_name(stack), SecretString="admin")
    weak = run_fetch(host_root, tmp_path / "run")
    assert weak.returncode == 1 and "fewer than 32 characters" in weak.stderr
    assert not (tmp_path / "run" / "grafana-admin-password").exists()
    boto3.client("secretsmanager").delete_secret(
        SecretId=grafana_admin_secret_name(stack), ForceDeleteWithoutRecovery=True
    )
    missing = run_fetch(host_root, tmp_path / "run", VLLM_FLEET_FETCH_ATTEMPTS="1")
    assert missing.returncode == 1 and "giving up" in missing.stderr
    assert list((tmp_path / "run").iterdir()) == []


@pytest.fixture(autouse=True, scope="module")
def _tools_present() -> Iterator[None]:
    """The tools these tests run are installed by scripts/install-system-deps.sh; a missing
    one is an error, never a skip."""
    for tool in ("cloud-init", "shellcheck", "systemd-analyze", "promtool", "amtool", "prometheus", "gpg"):
        assert shutil.which(tool), f"{tool} missing: run scripts/install-system-deps.sh"
    yield
