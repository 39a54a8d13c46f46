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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.components.instance_role import ssm_instance_role
from infra.components.security_group import SecurityGroupRules, security_group
from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.plan.capacity import (
    GANG_READY_HEARTBEAT_S,
    CapacityLayout,
    GroupSpec,
    RootVolume,
    group_delete_timeout_s,
)
from infra.plan.iam import PolicyInputs, node_policy_document
from infra.plan.scaling import log_group_name
from infra.plan.stack import group_name_prefix
from infra.plan.tags import (
    GANG_TAG,
    INSTANCE_TYPE_TAG,
    LOG_GROUP_TAG,
    ROLE_TAG,
    TAG_VALUE_MAX,
    TARGET_GROUP_TAG,
    WEIGHTS_URI_TAG,
)

# Instance refresh and health replacements: never below the desired healthy capacity, and
# at most 10 % (at least one node) above it while a replacement warms up.
MIN_HEALTHY_PERCENT = 100
MAX_HEALTHY_PERCENT = 110
# On top of the planned start-up: time for EC2 to find GPU capacity before Pulumi gives up.
CAPACITY_SEARCH_S = 600
# No containers on the nodes: the metadata token need not cross a network hop.
IMDS_HOP_LIMIT = 1
LOG_RETENTION_DAYS = 30


def group_metrics() -> list[aws.autoscaling.Metric]:
    """The group metrics every group publishes (aws_fleet.yaml asg_group_metrics)."""
    return [aws.autoscaling.Metric(name) for name in aws_fleet_facts().asg_group_metrics.value]


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
    stack: str
    region: str
    capacity: CapacityLayout
    # The fallback ladder, the chosen type first; each type's user-data as the launch template
    # takes it (infra/render/userdata.py: gzipped, then base64).
    instance_types: Sequence[str]
    user_data: Mapping[str, str]
    serving_port: int
    startup_timeout_s: int
    drain_heartbeat_s: int  # the termination hook's timeout (infra/plan/capacity.py)
    market: str
    on_demand_base: int
    root_volume: RootVolume
    # Group keys whose min_size the night schedule owns: Pulumi leaves it alone.
    scheduled_min_groups: frozenset[str]
    # What the nodes' policy grants beyond the defaults (infra/plan/iam.py PolicyInputs).
    hf_token_secret_name: str | None
    metrics_namespace: str | None
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
    weights_s3_uri: str | None = None
    api_key_kms_key_arn: str | None = None
    # The image's root snapshot size (from the AMI); None: the planned size alone.
    root_snapshot_gib: pulumi.Input[int] | None = None
    capacity_reservation_id: str | None = None


class Fleet(pulumi.ComponentResource):
    group_names: list[pulumi.Output[str]]
    group_arns: list[pulumi.Output[str]]
    role_arn: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    log_group_name: pulumi.Output[str]
    launch_template_ids: dict[str, pulumi.Output[str]]
    _node_policy: aws.iam.RolePolicy  # the groups wait for it
    _scheduled_min: frozenset[str]  # group keys whose min_size the night schedule owns

    def __init__(self, name: str, args: FleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:fleet:Fleet", name, None, opts)
        # Every check that can fail runs before the first resource is declared.
        capacity = args.capacity
        types = list(args.instance_types)
        drain_s = args.drain_heartbeat_s
        if missing := [t for t in types if t not in args.user_data]:
            raise FleetError(f"FleetArgs.user_data: none for {', '.join(missing)}")
        if capacity.gangs and len(args.target_group_arns) != 1:
            raise FleetError(f"a gang serves through one target group; got {len(args.target_group_arns)}")
        if args.weights_s3_uri and len(args.weights_s3_uri) > TAG_VALUE_MAX:
            raise FleetError(f"vllm-fleet:serving.weightsS3Uri: longer than {TAG_VALUE_MAX} characters")
        catalog = default_catalog()
        stack = args.stack
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)
        node_tags = {**tags, ROLE_TAG: "node"}
        facts = aws_fleet_facts()
        port, last_port = args.serving_port, args.serving_port + capacity.replicas_per_node - 1

        # --- logs, identity --------------------------------------------------------------
        log_group = aws.cloudwatch.LogGroup(
            f"{name}-logs",
            name=log_group_name(stack),
            retention_in_days=LOG_RETENTION_DAYS,
            tags={**tags, "Name": f"/vllm-fleet/{stack}"},
            # The nodes' logs are the record of what happened: never deleted by an update.
            opts=pulumi.ResourceOptions(parent=self, protect=True),
        )
        role, profile = ssm_instance_role(
            name, description=f"vLLM nodes of {stack}", name_tag=f"{stack}-node", partition=args.partition,
            tags=tags, opts=child,
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
                        region=args.region,
                        account_id=args.account_id,
                        stack=stack,
                        secret_arn=values[0],
                        log_group_arn=values[1],
                        gangs=capacity.gangs,
                        target_group_arns=values[2:],
                        weights_s3_uri=args.weights_s3_uri,
                        secret_kms_key_arn=args.api_key_kms_key_arn,
                        hf_token_secret_name=args.hf_token_secret_name,
                        metrics_namespace=args.metrics_namespace,
                    )
                ),
                indent=2,
            )
        )
        node_policy = aws.iam.RolePolicy(f"{name}-node-policy", role=role.id, policy=policy, opts=child)
        self._node_policy = node_policy

        # --- network access: the API from the load balancer, metrics from the scrapers ----
        sg = security_group(
            f"{name}-sg", vpc_id=args.vpc_id, name_tag=f"{stack}-nodes", tags=node_tags, opts=child,
            description=f"vLLM nodes of {stack}: API from the load balancer, metrics from scrapers, no SSH",
        )
        rules = SecurityGroupRules(name, sg.id, node_tags, child)
        lb, scrapers = args.load_balancer_security_group_id, args.scraper_security_group_id
        rules.ingress("api", "vLLM API and health checks from the load balancer", ports=(port, last_port), peer=lb)
        rules.ingress("vllm-metrics", "vLLM /metrics from the scrapers", ports=(port, last_port), peer=scrapers)
        exporters = facts.exporter_ports.value
        rules.ingress("node-metrics", "node_exporter", ports=exporters.node_exporter, peer=scrapers)
        rules.ingress("gpu-metrics", "dcgm-exporter", ports=exporters.dcgm_exporter, peer=scrapers)
        if capacity.gangs:
            # EFA and Ray/NCCL between the members of a gang: all traffic within the group, both
            # ways. EFA's OS-bypass traffic matches only rules that name the group itself, never
            # a CIDR rule (aws_fleet.yaml efa_security_group), so the egress below is not enough.
            rules.ingress("gang", "gang members (EFA, NCCL, Ray)", ports=None, peer=sg.id)
            rules.egress("gang", "gang members (EFA, NCCL, Ray)", ports=None, peer=sg.id)
        rules.egress(None, "AWS APIs, weights, model hub", ports=None, cidr="0.0.0.0/0")

        # --- one launch template per ladder type -------------------------------------------
        gp3 = facts.gp3_volume.value
        volume_gib: pulumi.Input[int] = (
            args.root_volume.planned_gib
            if args.root_snapshot_gib is None
            else pulumi.Output.from_input(args.root_snapshot_gib).apply(
                lambda snapshot: args.root_volume.for_image(int(snapshot))
            )
        )
        initialization_rate = args.root_volume.initialization_rate_mib_s
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
        market = args.market
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
                user_data=args.user_data[instance_type],
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
                            capacity_reservation_id=args.capacity_reservation_id
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
        startup = args.startup_timeout_s
        group_tags: dict[str, pulumi.Input[str]] = {**node_tags, "Name": f"{stack}-vllm", LOG_GROUP_TAG: log_group.name}
        if args.weights_s3_uri:
            group_tags[WEIGHTS_URI_TAG] = args.weights_s3_uri
        chosen = types[0]
        self._scheduled_min = args.scheduled_min_groups
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
        market = args.market
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
                        min(spec.max_size, math.ceil(args.on_demand_base / replicas_per_node)) if spot else 0
                    ),
                    on_demand_percentage_above_base_capacity=0 if spot else 100,
                    spot_allocation_strategy="capacity-optimized-prioritized" if spot else None,
                ),
            )
        else:
            launch_template = aws.autoscaling.GroupLaunchTemplateArgs(id=first.id, version=first.latest_version.apply(str))
        return self._group(
            name, args, spec, subnets=args.subnet_ids, tags=group_tags, startup=startup, drain_s=drain_s,
            # Behind the target groups: a node is healthy while the load balancer finds it so.
            health_check_type="ELB",
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
            # On create, `pulumi up` returns only once this many nodes pass the target groups'
            # health checks (the deploy's smoke test runs right after). min_elb_capacity, not
            # wait_for_elb_capacity: the latter also waits on every update, which would hang a
            # deploy while the night schedule holds the group at zero.
            min_elb_capacity=spec.min_size or None,
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
        tags = dict(args.tags)
        placement = aws.ec2.PlacementGroup(
            f"{name}-{spec.key}-pg",
            strategy="cluster",
            tags={**tags, "Name": f"{args.stack}-{spec.key}"},
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
        return self._group(
            name, args, spec, subnets=[subnet], tags=gang_tags, startup=startup, drain_s=drain_s,
            # Not attached to the target group (only the head serves): the nodes report
            # their gang's health themselves (SetInstanceHealth).
            health_check_type="EC2",
            # A new template version means a new gang, created before the old one goes.
            replace_on_changes=["launchTemplate"],
            delete_before_replace=False,
            placement_group=placement.name,
            launch_template=aws.autoscaling.GroupLaunchTemplateArgs(
                id=template.id, version=template.latest_version.apply(str)
            ),
            initial_lifecycle_hooks=[ready_hook],
        )

    def _group(
        self,
        name: str,
        args: FleetArgs,
        spec: GroupSpec,
        *,
        subnets: Sequence[pulumi.Input[str]],
        tags: Mapping[str, pulumi.Input[str]],
        startup: int,
        drain_s: int,
        replace_on_changes: list[str] | None = None,
        delete_before_replace: bool | None = None,
        **own: Any,
    ) -> aws.autoscaling.Group:
        """What the fleet group and a gang's group share: name, size, start-up timing, metrics,
        tags and options; ``own`` holds the rest of one kind's inputs (aws.autoscaling.Group's),
        its health check type among them."""
        return aws.autoscaling.Group(
            f"{name}-{spec.key}",
            name_prefix=f"{group_name_prefix(args.stack)}{spec.key}-",
            vpc_zone_identifiers=list(subnets),
            min_size=spec.min_size,
            max_size=spec.max_size,
            desired_capacity=spec.desired,
            # A loading node is unhealthy for minutes; it is judged only after the planned start-up.
            health_check_grace_period=startup,
            default_instance_warmup=startup,
            wait_for_capacity_timeout=f"{startup + CAPACITY_SEARCH_S}s",
            # The Fleet dashboard's group panels read these; a group publishes none by default.
            enabled_metrics=group_metrics(),
            metrics_granularity="1Minute",
            tags=[aws.autoscaling.GroupTagArgs(key=k, value=v, propagate_at_launch=True) for k, v in tags.items()],
            opts=pulumi.ResourceOptions(
                parent=self,
                # A node that boots before its role's inline policy exists fails its first
                # calls (the API key, the lifecycle hook): the policy comes first.
                depends_on=[self._node_policy],
                replace_on_changes=replace_on_changes,
                delete_before_replace=delete_before_replace,
                ignore_changes=self._ignored_group_changes(spec),
                custom_timeouts=pulumi.CustomTimeouts(delete=f"{group_delete_timeout_s(drain_s)}s"),
            ),
            **own,
        )
