"""The GPU fleet: instance role, security group, one launch template per instance type of the
plan's fallback ladder, and the Auto Scaling group(s) that run the vLLM replicas.

Two shapes, from the plan's layout:

* Single-node replicas (``nodes_per_replica == 1``): ONE group of
  ``ceil(replicas / replicas_per_node)`` nodes, attached to the endpoint's target groups,
  ELB health checks, a mixed-instances policy over the ladder when it has several types
  (or when the market is spot), and a rolling instance refresh that launches a new node,
  waits for it to be healthy, then drains an old one (min healthy 100 %, max 110 %).

* Multi-node replicas ("gangs", ``nodes_per_replica > 1``): ONE group PER REPLICA, each of
  exactly ``nodes_per_replica`` nodes in its own cluster placement group and one subnet,
  with EFA interfaces. Gangs are never rolled node by node (that would break the running
  replica); a launch-template change replaces the whole group, new gang first (Pulumi
  creates the replacement before deleting the old one). A gang's groups are not attached
  to the target group: only the head node serves the API, so it registers itself once
  vLLM is healthy. A launch lifecycle hook holds each node in Pending:Wait until its gang
  serves, so "InService" means "serving" and Pulumi's capacity wait really waits.
  Gangs beyond ``minReplicas`` are created empty (desired 0), for the scaler to fill whole.

Both shapes have a termination lifecycle hook ("drain") long enough for the load
balancer's deregistration delay plus vLLM's shutdown drain; the node side of it is
described in docs of the node units (see the program's report / node templates). It is an
``aws.autoscaling.LifecycleHook`` of its own: a group's ``initial_lifecycle_hooks`` are
ForceNew, so nothing a day-2 change moves may live there (docs/day2.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.config import StackConfig
from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.plan.planner import GiB, Layout, serving_facts
from infra.plan.scaling import instances_for, ladder_types, log_group_name, scaling_policy_spec
from infra.plan.stack import StackPlan, group_name_prefix
from infra.plan.tags import (
    GANG_TAG,
    INSTANCE_TYPE_TAG,
    LOG_GROUP_TAG,
    ROLE_TAG,
    TAG_VALUE_MAX,
    TARGET_GROUP_TAG,
    WEIGHTS_URI_TAG,
)
from infra.render.userdata import encode_user_data

# Instance refresh and health replacements: never below the desired healthy capacity, and
# at most 10 % (at least one node) above it while a replacement warms up.
MIN_HEALTHY_PERCENT = 100
MAX_HEALTHY_PERCENT = 110
# Added to the drain hook's heartbeat: the node's own bookkeeping around the two waits.
DRAIN_MARGIN_S = 60
# On top of the planned start-up: time for EC2 to find GPU capacity before Pulumi gives up.
CAPACITY_SEARCH_S = 600
# A gang's launch hook ("gang-ready") must exist before the group's first instance, so it is
# one of the group's initial_lifecycle_hooks, which the provider marks ForceNew
# (aws_fleet.yaml initial_lifecycle_hook_force_new). Its timeout is therefore a constant, never
# derived from the plan: the node records a heartbeat every 25 s while its gang starts
# (infra/plan/node/spec.py heartbeat_interval_s), so this only bounds how long a silent node (dead
# before its watcher ran) holds capacity before ABANDON gives it back.
GANG_READY_HEARTBEAT_S = 900
# After the drain hook: EC2's own shutdown and termination of a GPU node (EFA interfaces, EBS).
TERMINATION_MARGIN_S = 600
# No containers on the nodes: the metadata token need not cross a network hop.
IMDS_HOP_LIMIT = 1
LOG_RETENTION_DAYS = 30
# Weights are downloaded to the root volume unless they arrive on instance-store NVMe.
ROOT_VOLUME_WITHOUT_WEIGHTS = ("local-nvme",)
# Weights baked into the image's root snapshot and read as EBS fetches each block (ebs-lazy):
# the planner times that source at a rate EBS only guarantees when the volume is created with a
# provisioned volume initialization rate. ebs-initialized (fast snapshot restore, or a volume
# written at boot) must not set one: a rate on an FSR-enabled snapshot replaces FSR with it.
PROVISIONED_INITIALIZATION_SOURCES = ("ebs-lazy",)
# Weights already in the image's root snapshot.
IMAGE_WEIGHT_SOURCES = ("ebs-lazy", "ebs-initialized")
MiB = 1024**2


@dataclass(frozen=True)
class GroupSpec:
    """One Auto Scaling group: the single fleet group, or one gang."""

    key: str  # "fleet" or "gang-<i>"
    min_size: int
    max_size: int
    desired: int
    gang_index: int | None = None
    scaled: bool = False  # desired capacity belongs to the scaler, not to Pulumi


@dataclass(frozen=True)
class CapacityLayout:
    nodes_per_replica: int
    replicas_per_node: int
    min_instances: int
    max_instances: int
    groups: tuple[GroupSpec, ...]

    @property
    def gangs(self) -> bool:
        return self.nodes_per_replica > 1


def capacity_layout(config: StackConfig, layout: Layout) -> CapacityLayout:
    """The groups to create, after the checks that must fail before any resource exists."""
    cap = config.capacity
    npr, rpn = layout.nodes_per_replica, layout.replicas_per_node
    min_instances, max_instances = instances_for(cap.min_replicas, layout), instances_for(cap.max_replicas, layout)
    if npr > 1:
        if cap.market == "spot":
            raise FleetError(
                f"vllm-fleet:capacity.market = \"spot\": the plan spans {npr} nodes per replica, and one "
                "reclaimed node stops the whole replica; use on-demand or capacity-block"
            )
        groups = tuple(
            GroupSpec(
                key=f"gang-{i}",
                min_size=npr if i < cap.min_replicas else 0,
                max_size=npr,
                desired=npr if i < cap.min_replicas else 0,
                gang_index=i,
                scaled=i >= cap.min_replicas,
            )
            for i in range(cap.max_replicas)
        )
        return CapacityLayout(npr, rpn, min_instances, max_instances, groups)
    # A rolling refresh (and a health replacement) launches the new node before the old
    # one stops. At the group's floor that needs one node of headroom below max_size.
    if max_instances < min_instances + 1:
        # One more node than the floor: the first replica that needs it.
        wanted = min_instances * rpn + 1
        raise FleetError(
            f"vllm-fleet:capacity: {cap.min_replicas}..{cap.max_replicas} replicas at {rpn} per "
            f"{layout.instance_type} node is {min_instances}..{max_instances} node(s); replacing a node "
            f"without losing capacity needs room for one more node: set maxReplicas to {wanted} or more"
        )
    group = GroupSpec(
        key="fleet",
        min_size=min_instances,
        max_size=max_instances,
        desired=min_instances,
        scaled=max_instances > min_instances,
    )
    return CapacityLayout(npr, rpn, min_instances, max_instances, (group,))


def root_volume_gib(stack_plan: StackPlan) -> int:
    base = serving_facts().defaults.root_volume_base_gib
    if stack_plan.config.serving.weights_source in ROOT_VOLUME_WITHOUT_WEIGHTS:
        return base
    return base + math.ceil(stack_plan.plan.weights_bytes / GiB)


def root_volume_for_image(stack_plan: StackPlan, snapshot_gib: int) -> int:
    """The planned root volume, but never smaller than the image's root snapshot plus the
    weights a node downloads onto it: EC2 refuses a volume smaller than its snapshot, and a
    baked image (venv, caches, staged weights) can outgrow the planned base."""
    downloads = stack_plan.config.serving.weights_source not in (*ROOT_VOLUME_WITHOUT_WEIGHTS, *IMAGE_WEIGHT_SOURCES)
    downloaded_gib = math.ceil(stack_plan.plan.weights_bytes / GiB) if downloads else 0
    return max(root_volume_gib(stack_plan), snapshot_gib + downloaded_gib)


def volume_initialization_rate_mib_s(weights_source: str) -> int | None:
    """The root volume's provisioned initialization rate: the planner's figure for the source
    (infra/facts/data/weight_sources.yaml), or None where EBS must initialize by its own means."""
    if weights_source not in PROVISIONED_INITIALIZATION_SOURCES:
        return None
    return round(default_catalog().weight_sources[weights_source].throughput_mb_s * 1_000_000 / MiB)


def encoded_user_data(stack_plan: StackPlan, instance_type: str) -> str:
    """The type's cloud-init user-data as a launch template takes it: gzipped (cloud-init
    inflates it before parsing; a gang's text is over EC2's limit), then base64."""
    text = stack_plan.user_data.get(instance_type, "")
    if not text.strip():
        raise FleetError(
            f"user-data for {instance_type}: not rendered (StackPlan.user_data has "
            f"{sorted(stack_plan.user_data) or 'no types'}); build the stack plan with the node renderer"
        )
    return encode_user_data(text, what=f"user-data for {instance_type}")


def drain_heartbeat_s(deregistration_delay_s: int, shutdown_timeout_s: int) -> int:
    """The termination hook's timeout: first the load balancer drains the node (its
    deregistration delay), then vLLM drains its own in-flight requests (--shutdown-timeout)."""
    heartbeat = deregistration_delay_s + shutdown_timeout_s + DRAIN_MARGIN_S
    bounds = aws_fleet_facts().lifecycle_hook_heartbeat_s.value
    if heartbeat > bounds.max:
        raise FleetError(
            f"vllm-fleet:serving.shutdownTimeoutS = {shutdown_timeout_s}: draining takes {deregistration_delay_s} s "
            f"(load balancer) + {shutdown_timeout_s} s (vLLM) + {DRAIN_MARGIN_S} s = {heartbeat} s; "
            f"a lifecycle hook waits at most {bounds.max} s"
        )
    return max(heartbeat, bounds.min)


def scheduled_min_groups(stack_plan: StackPlan) -> set[str]:
    """The groups whose min_size the night schedule owns (infra/plan/scaling.py NightFloor): Pulumi
    must not diff it, or every nightly drift check reports the schedule's value as drift."""
    night = scaling_policy_spec(stack_plan).night
    if night is None:
        return set()
    if stack_plan.plan.layout.nodes_per_replica > 1:
        return {f"gang-{k}" for k in night.gang_indices}
    return {"fleet"}


def group_metrics() -> list[aws.autoscaling.Metric]:
    """The group metrics every group publishes (aws_fleet.yaml asg_group_metrics)."""
    return [aws.autoscaling.Metric(name) for name in aws_fleet_facts().asg_group_metrics.value]


def group_delete_timeout_s(drain_s: int) -> int:
    """How long Pulumi waits for a group to delete: every node first runs its drain hook
    (up to ``drain_s``), then EC2 terminates it. The provider's default (10 min, group.go
    Timeouts.Delete) is shorter than a gang's drain plus termination."""
    return drain_s + TERMINATION_MARGIN_S


def parse_s3_uri(uri: str) -> tuple[str, str]:
    match = re.match(r"^s3://([^/]+)/?(.*)$", uri)
    if not match:
        raise FleetError(f"vllm-fleet:serving.weightsS3Uri = {uri!r}: expected s3://bucket/prefix/")
    bucket, prefix = match.group(1), match.group(2)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def default_weights_s3_uri(config: StackConfig, account_id: str, model_repo: str) -> str:
    """The convention when weightsS3Uri is not set: one bucket per account and region,
    one prefix per repo and revision (what the weight-staging job writes)."""
    return f"s3://vllm-fleet-weights-{account_id}-{config.region}/{model_repo}/{config.model.revision}/"


@dataclass(frozen=True)
class PolicyInputs:
    partition: str
    region: str
    account_id: str
    stack: str
    secret_arn: str
    log_group_arn: str
    gangs: bool
    target_group_arns: Sequence[str] = ()
    weights_s3_uri: str | None = None
    secret_kms_key_arn: str | None = None
    # The optional Hugging Face token (infra/plan/node/from_plan.py hf_token_secret_name).
    hf_token_secret_name: str | None = None
    # The namespace the nodes' scaling-signal publishes to (infra/plan/scaling.py node_scaling_environment).
    metrics_namespace: str | None = None


def node_policy_document(p: PolicyInputs) -> dict[str, Any]:
    """The nodes' inline policy: exactly what the node units call, on exactly their resources."""
    own_groups = (
        f"arn:{p.partition}:autoscaling:{p.region}:{p.account_id}:autoScalingGroup:*:"
        f"autoScalingGroupName/{group_name_prefix(p.stack)}*"
    )
    lifecycle = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadApiKey", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": [p.secret_arn]},
        {
            "Sid": "WriteOwnLogs",
            "Effect": "Allow",
            # DescribeLogStreams: the CloudWatch agent checks its stream before writing EMF.
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            "Resource": [p.log_group_arn, f"{p.log_group_arn}:log-stream:*"],
        },
        {
            "Sid": "LifecycleHooks",
            "Effect": "Allow",
            # SetInstanceProtection: a busy node shields itself from scale-in (infra/plan/scaling.py).
            "Action": lifecycle
            + ["autoscaling:SetInstanceProtection"]
            + (["autoscaling:SetInstanceHealth"] if p.gangs else []),
            "Resource": [own_groups],
        },
        {
            # The protection script reads its group's desired vs in-service count; the
            # action supports no resource-level permissions.
            "Sid": "ReadOwnGroup",
            "Effect": "Allow",
            "Action": ["autoscaling:DescribeAutoScalingGroups"],
            "Resource": ["*"],
        },
    ]
    if p.metrics_namespace:
        statements.append(
            {
                # scaling-signal publishes the scaling gauges (images/scripts/node-scaling-signal.sh).
                # PutMetricData has no resource-level permissions; the cloudwatch:namespace condition
                # key limits it to the fleet's namespace (docs.aws.amazon.com/AmazonCloudWatch/latest/
                # monitoring/iam-cw-condition-keys-namespace.html, "Allowing publishing in one namespace only").
                "Sid": "PublishScalingGauges",
                "Effect": "Allow",
                "Action": ["cloudwatch:PutMetricData"],
                "Resource": ["*"],
                "Condition": {"StringEquals": {"cloudwatch:namespace": p.metrics_namespace}},
            },
        )
    if p.hf_token_secret_name:
        statements.append(
            {
                "Sid": "ReadHfToken",
                "Effect": "Allow",
                "Action": ["secretsmanager:GetSecretValue"],
                # Secrets Manager appends "-" and six characters to a secret's name in its ARN.
                "Resource": [f"arn:{p.partition}:secretsmanager:{p.region}:{p.account_id}:secret:{p.hf_token_secret_name}-??????"],
            }
        )
    if p.secret_kms_key_arn:
        statements.append(
            {
                "Sid": "DecryptApiKey",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": [p.secret_kms_key_arn],
                "Condition": {"StringEquals": {"kms:ViaService": f"secretsmanager.{p.region}.amazonaws.com"}},
            }
        )
    if p.weights_s3_uri:
        bucket, prefix = parse_s3_uri(p.weights_s3_uri)
        statements += [
            {
                "Sid": "ReadWeights",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:{p.partition}:s3:::{bucket}/{prefix}*"],
            },
            {
                "Sid": "ListWeights",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:{p.partition}:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
            },
        ]
    if p.gangs:
        statements += [
            {
                # Neither action supports resource-level permissions.
                "Sid": "DiscoverGang",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeInstances",
                    "autoscaling:DescribeAutoScalingGroups",
                    "elasticloadbalancing:DescribeTargetHealth",
                ],
                "Resource": ["*"],
            },
            {
                # Only a gang's head serves, so it registers (and drains) itself.
                "Sid": "HeadRegistersItself",
                "Effect": "Allow",
                "Action": ["elasticloadbalancing:RegisterTargets", "elasticloadbalancing:DeregisterTargets"],
                "Resource": list(p.target_group_arns),
            },
        ]
    return {"Version": "2012-10-17", "Statement": statements}


def efa_network_interfaces(efa_count: int, security_group_id: pulumi.Input[str]) -> list[aws.ec2.LaunchTemplateNetworkInterfaceArgs]:
    """AWS's layout for multi-card EFA instances (aws_fleet.yaml ``efa_interface_layout``)."""
    layout = aws_fleet_facts().efa_interface_layout.value

    def nic(card: int, device: int, kind: str) -> aws.ec2.LaunchTemplateNetworkInterfaceArgs:
        return aws.ec2.LaunchTemplateNetworkInterfaceArgs(
            network_card_index=card,
            device_index=device,
            interface_type=kind,
            security_groups=[security_group_id],
            delete_on_termination="true",
            associate_public_ip_address="false" if kind != "efa-only" else None,
        )

    nics = [nic(0, 0, layout.primary), nic(0, 1, layout.card0_extra)]
    nics += [nic(card, 0, layout.other_cards) for card in range(1, efa_count)]
    return nics


def _type_key(instance_type: str) -> str:
    return instance_type.replace(".", "-")


@dataclass(frozen=True)
class FleetArgs:
    stack_plan: StackPlan
    vpc_id: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    load_balancer_security_group_id: pulumi.Input[str]
    scraper_security_group_id: pulumi.Input[str]
    target_group_arns: Sequence[pulumi.Input[str]]
    api_key_secret_arn: pulumi.Input[str]
    image_id: pulumi.Input[str]
    root_device_name: pulumi.Input[str]
    tags: Mapping[str, str]
    partition: str
    account_id: str
    deregistration_delay_s: int
    weights_s3_uri: str | None = None
    api_key_kms_key_arn: str | None = None
    # The image's root snapshot size (from the AMI); None: the planned size alone.
    root_snapshot_gib: pulumi.Input[int] | None = None


class Fleet(pulumi.ComponentResource):
    group_names: list[pulumi.Output[str]]
    group_arns: list[pulumi.Output[str]]
    role_arn: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    log_group_name: pulumi.Output[str]
    launch_template_ids: dict[str, pulumi.Output[str]]
    _node_policy: aws.iam.RolePolicy  # the groups wait for it
    _scheduled_min: set[str]  # group keys whose min_size the night schedule owns

    def __init__(self, name: str, args: FleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:fleet:Fleet", name, None, opts)
        stack_plan, config = args.stack_plan, args.stack_plan.config
        layout = stack_plan.plan.layout
        # Every check that can fail runs before the first resource is declared.
        capacity = capacity_layout(config, layout)
        types = ladder_types(stack_plan)
        user_data = {t: encoded_user_data(stack_plan, t) for t in types}
        drain_s = drain_heartbeat_s(args.deregistration_delay_s, config.serving.shutdown_timeout_s)
        if capacity.gangs and len(args.target_group_arns) != 1:
            raise FleetError(f"a gang serves through one target group; got {len(args.target_group_arns)}")
        if args.weights_s3_uri and len(args.weights_s3_uri) > TAG_VALUE_MAX:
            raise FleetError(f"vllm-fleet:serving.weightsS3Uri: longer than {TAG_VALUE_MAX} characters")
        catalog = default_catalog()
        stack = config.stack
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)
        node_tags = {**tags, ROLE_TAG: "node"}
        facts = aws_fleet_facts()
        port, last_port = config.serving.port, config.serving.port + layout.replicas_per_node - 1

        # --- logs, identity --------------------------------------------------------------
        log_group = aws.cloudwatch.LogGroup(
            f"{name}-logs",
            name=log_group_name(stack),
            retention_in_days=LOG_RETENTION_DAYS,
            tags={**tags, "Name": f"/vllm-fleet/{stack}"},
            # The nodes' logs are the record of what happened: never deleted by an update.
            opts=pulumi.ResourceOptions(parent=self, protect=True),
        )
        role = aws.iam.Role(
            f"{name}-role",
            description=f"vLLM nodes of {stack}",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
                    ],
                }
            ),
            tags={**tags, "Name": f"{stack}-node"},
            opts=child,
        )
        aws.iam.RolePolicyAttachment(
            f"{name}-ssm",
            role=role.name,
            # Session Manager instead of SSH: no key pairs, no port 22.
            policy_arn=f"arn:{args.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore",
            opts=child,
        )
        policy = pulumi.Output.all(
            pulumi.Output.from_input(args.api_key_secret_arn),
            log_group.arn,
            *[pulumi.Output.from_input(arn) for arn in args.target_group_arns],
        ).apply(
            lambda values: json.dumps(
                node_policy_document(
                    PolicyInputs(
                        partition=args.partition,
                        region=config.region,
                        account_id=args.account_id,
                        stack=stack,
                        secret_arn=values[0],
                        log_group_arn=values[1],
                        gangs=capacity.gangs,
                        target_group_arns=values[2:],
                        weights_s3_uri=args.weights_s3_uri,
                        secret_kms_key_arn=args.api_key_kms_key_arn,
                        hf_token_secret_name=stack_plan.node_specs[types[0]].hf_token_secret_id,
                        metrics_namespace=stack_plan.node_specs[types[0]].scaling_environment["SCALING_NAMESPACE"],
                    )
                ),
                indent=2,
            )
        )
        node_policy = aws.iam.RolePolicy(f"{name}-node-policy", role=role.id, policy=policy, opts=child)
        self._node_policy = node_policy
        profile = aws.iam.InstanceProfile(
            f"{name}-profile", role=role.name, tags={**tags, "Name": f"{stack}-node"}, opts=child
        )

        # --- network access: the API from the load balancer, metrics from the scrapers ----
        sg = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description=f"vLLM nodes of {stack}: API from the load balancer, metrics from scrapers, no SSH",
            tags={**node_tags, "Name": f"{stack}-nodes"},
            opts=child,
        )

        def ingress(key: str, source: pulumi.Input[str], low: int, high: int, what: str, protocol: str = "tcp") -> None:
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-in-{key}",
                security_group_id=sg.id,
                referenced_security_group_id=source,
                ip_protocol=protocol,
                from_port=None if protocol == "-1" else low,
                to_port=None if protocol == "-1" else high,
                description=what,
                tags=node_tags,
                opts=child,
            )

        ingress("api", args.load_balancer_security_group_id, port, last_port, "vLLM API and health checks from the load balancer")
        ingress("vllm-metrics", args.scraper_security_group_id, port, last_port, "vLLM /metrics from the scrapers")
        exporters = facts.exporter_ports.value
        ingress("node-metrics", args.scraper_security_group_id, exporters.node_exporter, exporters.node_exporter, "node_exporter")
        ingress("gpu-metrics", args.scraper_security_group_id, exporters.dcgm_exporter, exporters.dcgm_exporter, "dcgm-exporter")
        if capacity.gangs:
            # EFA and Ray/NCCL between the members of a gang: all traffic within the group, both
            # ways. EFA's OS-bypass traffic matches only rules that name the group itself, never
            # a CIDR rule (aws_fleet.yaml efa_security_group), so the egress below is not enough.
            ingress("gang", sg.id, 0, 0, "gang members (EFA, NCCL, Ray)", protocol="-1")
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-out-gang",
                security_group_id=sg.id,
                referenced_security_group_id=sg.id,
                ip_protocol="-1",
                description="gang members (EFA, NCCL, Ray)",
                tags=node_tags,
                opts=child,
            )
        aws.vpc.SecurityGroupEgressRule(
            f"{name}-out",
            security_group_id=sg.id,
            ip_protocol="-1",
            cidr_ipv4="0.0.0.0/0",
            description="AWS APIs, weights, model hub",
            tags=node_tags,
            opts=child,
        )

        # --- one launch template per ladder type -------------------------------------------
        gp3 = facts.gp3_volume.value
        volume_gib: pulumi.Input[int] = (
            root_volume_gib(stack_plan)
            if args.root_snapshot_gib is None
            else pulumi.Output.from_input(args.root_snapshot_gib).apply(
                lambda snapshot: root_volume_for_image(stack_plan, int(snapshot))
            )
        )
        initialization_rate = volume_initialization_rate_mib_s(config.serving.weights_source)
        root_snapshot_id: pulumi.Output[str] | None = None
        if initialization_rate is not None:
            # The rate applies to a volume created from a snapshot, named in the mapping: the
            # image's root snapshot, read from the AMI itself so it can never name another image's.
            root_snapshot_id = aws.ec2.get_ami_output(
                filters=pulumi.Output.from_input(args.image_id).apply(
                    lambda ami_id: [aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami_id])]
                ),
                opts=pulumi.InvokeOutputOptions(parent=self),
            ).root_snapshot_id
        market = config.capacity.market
        templates: dict[str, aws.ec2.LaunchTemplate] = {}
        for instance_type in types:
            type_tags = {**node_tags, INSTANCE_TYPE_TAG: instance_type, "Name": f"{stack}-vllm"}
            efa = catalog.instances[instance_type].efa_interfaces if capacity.gangs else 0
            if capacity.gangs and efa == 0:
                raise FleetError(f"{instance_type}: multi-node replicas need EFA; the catalog lists none")
            nics = (
                efa_network_interfaces(efa, sg.id)
                if efa
                else [
                    aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                        device_index=0,
                        security_groups=[sg.id],
                        delete_on_termination="true",
                        associate_public_ip_address="false",
                    )
                ]
            )
            templates[instance_type] = aws.ec2.LaunchTemplate(
                f"{name}-lt-{_type_key(instance_type)}",
                description=f"{stack}: vLLM on {instance_type} (TP/PP for this type baked into user-data)",
                image_id=args.image_id,
                instance_type=instance_type,
                iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=profile.arn),
                user_data=user_data[instance_type],
                update_default_version=True,
                metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                    http_endpoint="enabled",
                    http_tokens="required",
                    http_put_response_hop_limit=IMDS_HOP_LIMIT,
                    # The node reads its group, gang and target group from its tags.
                    instance_metadata_tags="enabled",
                ),
                block_device_mappings=[
                    aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                        device_name=args.root_device_name,
                        ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                            volume_size=volume_gib,
                            volume_type="gp3",
                            iops=gp3.iops,
                            throughput=gp3.throughput_mib_s,
                            encrypted="true",
                            delete_on_termination="true",
                            snapshot_id=root_snapshot_id,
                            volume_initialization_rate=initialization_rate,
                        ),
                    )
                ],
                network_interfaces=nics,
                monitoring=aws.ec2.LaunchTemplateMonitoringArgs(enabled=True),
                instance_market_options=(
                    aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(market_type="capacity-block")
                    if market == "capacity-block"
                    else None
                ),
                capacity_reservation_specification=(
                    aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(
                        capacity_reservation_target=aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
                            capacity_reservation_id=config.capacity.capacity_reservation_id
                        )
                    )
                    if market == "capacity-block"
                    else None
                ),
                tag_specifications=[
                    aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type=kind, tags=type_tags)
                    for kind in ("instance", "volume", "network-interface")
                ],
                tags=type_tags,
                opts=child,
            )

        # --- the groups ------------------------------------------------------------------
        startup = stack_plan.plan.startup_timeout_s
        group_tags: dict[str, pulumi.Input[str]] = {**node_tags, "Name": f"{stack}-vllm", LOG_GROUP_TAG: log_group.name}
        if args.weights_s3_uri:
            group_tags[WEIGHTS_URI_TAG] = args.weights_s3_uri
        chosen = types[0]
        self._scheduled_min = scheduled_min_groups(stack_plan)
        self.group_names = []
        self.group_arns = []
        for spec in capacity.groups:
            if spec.gang_index is None:
                group = self._fleet_group(
                    name, args, spec, types, templates, group_tags, drain_s, startup, capacity.replicas_per_node
                )
            else:
                group = self._gang_group(name, args, spec, templates[chosen], group_tags, drain_s, startup)
            # The drain hook is its own resource, not one of the group's initial_lifecycle_hooks:
            # its timeout follows shutdownTimeoutS, and an initial hook is ForceNew, so a new
            # timeout would replace the group (and every node in it). A terminating hook need
            # not exist before the first launch; PutLifecycleHook updates it in place.
            aws.autoscaling.LifecycleHook(
                f"{name}-{spec.key}-drain",
                name="drain",
                autoscaling_group_name=group.name,
                lifecycle_transition="autoscaling:EC2_INSTANCE_TERMINATING",
                heartbeat_timeout=drain_s,
                default_result="CONTINUE",
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.group_names.append(group.name)
            self.group_arns.append(group.arn)

        self.role_arn = role.arn
        self.security_group_id = sg.id
        self.log_group_name = log_group.name
        self.launch_template_ids = {t: lt.id for t, lt in templates.items()}
        self.register_outputs(
            {
                "groupNames": self.group_names,
                "roleArn": self.role_arn,
                "securityGroupId": self.security_group_id,
                "logGroupName": self.log_group_name,
                "launchTemplateIds": self.launch_template_ids,
            }
        )

    def _ignored_group_changes(self, spec: GroupSpec) -> list[str] | None:
        """What Pulumi leaves to others: desired capacity to the scaler, min size to the
        night schedule (scheduled actions set it twice a day)."""
        ignored = (["desired_capacity"] if spec.scaled else []) + (
            ["min_size"] if spec.key in self._scheduled_min else []
        )
        return ignored or None

    def _fleet_group(
        self,
        name: str,
        args: FleetArgs,
        spec: GroupSpec,
        types: list[str],
        templates: dict[str, aws.ec2.LaunchTemplate],
        group_tags: Mapping[str, pulumi.Input[str]],
        drain_s: int,
        startup: int,
        replicas_per_node: int,
    ) -> aws.autoscaling.Group:
        config = args.stack_plan.config
        market = config.capacity.market
        first = templates[types[0]]
        launch_template: aws.autoscaling.GroupLaunchTemplateArgs | None = None
        mixed: aws.autoscaling.GroupMixedInstancesPolicyArgs | None = None
        if len(types) > 1 or market == "spot":
            spot = market == "spot"
            # Each override carries its own template: the types differ in user-data (TP/PP).
            mixed = aws.autoscaling.GroupMixedInstancesPolicyArgs(
                launch_template=aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateArgs(
                    launch_template_specification=aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateLaunchTemplateSpecificationArgs(
                        launch_template_id=first.id, version=first.latest_version.apply(str)
                    ),
                    overrides=[
                        aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateOverrideArgs(
                            instance_type=t,
                            launch_template_specification=aws.autoscaling.GroupMixedInstancesPolicyLaunchTemplateOverrideLaunchTemplateSpecificationArgs(
                                launch_template_id=templates[t].id, version=templates[t].latest_version.apply(str)
                            ),
                        )
                        for t in types
                    ],
                ),
                instances_distribution=aws.autoscaling.GroupMixedInstancesPolicyInstancesDistributionArgs(
                    # The ladder is ordered: cheapest plan first, fall back down the list.
                    on_demand_allocation_strategy="prioritized",
                    on_demand_base_capacity=(
                        min(spec.max_size, math.ceil(config.capacity.on_demand_base / replicas_per_node)) if spot else 0
                    ),
                    on_demand_percentage_above_base_capacity=0 if spot else 100,
                    spot_allocation_strategy="capacity-optimized-prioritized" if spot else None,
                ),
            )
        else:
            launch_template = aws.autoscaling.GroupLaunchTemplateArgs(id=first.id, version=first.latest_version.apply(str))
        startup_wait = f"{startup + CAPACITY_SEARCH_S}s"
        return aws.autoscaling.Group(
            f"{name}-{spec.key}",
            name_prefix=f"{group_name_prefix(config.stack)}{spec.key}-",
            vpc_zone_identifiers=list(args.subnet_ids),
            min_size=spec.min_size,
            max_size=spec.max_size,
            desired_capacity=spec.desired,
            health_check_type="ELB",
            # A loading node fails /health for minutes; it is judged only after the planned start-up.
            health_check_grace_period=startup,
            default_instance_warmup=startup,
            target_group_arns=list(args.target_group_arns),
            launch_template=launch_template,
            mixed_instances_policy=mixed,
            capacity_rebalance=True if market == "spot" else None,
            instance_refresh=aws.autoscaling.GroupInstanceRefreshArgs(
                strategy="Rolling",
                preferences=aws.autoscaling.GroupInstanceRefreshPreferencesArgs(
                    min_healthy_percentage=MIN_HEALTHY_PERCENT,
                    max_healthy_percentage=MAX_HEALTHY_PERCENT,
                    skip_matching=True,
                ),
            ),
            instance_maintenance_policy=aws.autoscaling.GroupInstanceMaintenancePolicyArgs(
                min_healthy_percentage=MIN_HEALTHY_PERCENT, max_healthy_percentage=MAX_HEALTHY_PERCENT
            ),
            wait_for_capacity_timeout=startup_wait,
            # On create, `pulumi up` returns only once this many nodes pass the target groups'
            # health checks (the deploy's smoke test runs right after). min_elb_capacity, not
            # wait_for_elb_capacity: the latter also waits on every update, which would hang a
            # deploy while the night schedule holds the group at zero.
            min_elb_capacity=spec.min_size or None,
            # The Fleet dashboard's group panels read these; a group publishes none by default.
            enabled_metrics=group_metrics(),
            metrics_granularity="1Minute",
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True) for k, v in group_tags.items()],
            opts=pulumi.ResourceOptions(
                parent=self,
                # A node that boots before its role's inline policy exists fails its first
                # calls (the API key, the lifecycle hook): the policy comes first.
                depends_on=[self._node_policy],
                ignore_changes=self._ignored_group_changes(spec),
                custom_timeouts=pulumi.CustomTimeouts(delete=f"{group_delete_timeout_s(drain_s)}s"),
            ),
        )

    def _gang_group(
        self,
        name: str,
        args: FleetArgs,
        spec: GroupSpec,
        template: aws.ec2.LaunchTemplate,
        group_tags: Mapping[str, pulumi.Input[str]],
        drain_s: int,
        startup: int,
    ) -> aws.autoscaling.Group:
        assert spec.gang_index is not None
        config = args.stack_plan.config
        tags = dict(args.tags)
        placement = aws.ec2.PlacementGroup(
            f"{name}-{spec.key}-pg",
            strategy="cluster",
            tags={**tags, "Name": f"{config.stack}-{spec.key}"},
            opts=pulumi.ResourceOptions(parent=self),
        )
        # One AZ per gang (a cluster placement group lives in one), gangs spread over AZs.
        subnet = args.subnet_ids[spec.gang_index % len(args.subnet_ids)]
        ready_hook = aws.autoscaling.GroupInitialLifecycleHookArgs(
            name="gang-ready",
            lifecycle_transition="autoscaling:EC2_INSTANCE_LAUNCHING",
            heartbeat_timeout=GANG_READY_HEARTBEAT_S,
            # A gang that never serves is not capacity: give its nodes back.
            default_result="ABANDON",
        )
        gang_tags = {**group_tags, GANG_TAG: str(spec.gang_index), TARGET_GROUP_TAG: args.target_group_arns[0]}
        return aws.autoscaling.Group(
            f"{name}-{spec.key}",
            name_prefix=f"{group_name_prefix(config.stack)}{spec.key}-",
            vpc_zone_identifiers=[subnet],
            placement_group=placement.name,
            min_size=spec.min_size,
            max_size=spec.max_size,
            desired_capacity=spec.desired,
            # Not attached to the target group (only the head serves): the nodes report
            # their gang's health themselves (SetInstanceHealth).
            health_check_type="EC2",
            health_check_grace_period=startup,
            default_instance_warmup=startup,
            launch_template=aws.autoscaling.GroupLaunchTemplateArgs(
                id=template.id, version=template.latest_version.apply(str)
            ),
            initial_lifecycle_hooks=[ready_hook],
            enabled_metrics=group_metrics(),
            metrics_granularity="1Minute",
            wait_for_capacity_timeout=f"{startup + CAPACITY_SEARCH_S}s",
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True) for k, v in gang_tags.items()],
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[self._node_policy],
                # A new template version means a new gang, created before the old one goes.
                replace_on_changes=["launchTemplate"],
                delete_before_replace=False,
                ignore_changes=self._ignored_group_changes(spec),
                custom_timeouts=pulumi.CustomTimeouts(delete=f"{group_delete_timeout_s(drain_s)}s"),
            ),
        )
