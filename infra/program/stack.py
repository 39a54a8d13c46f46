"""The Pulumi program: a stack plan in, the fleet's resources and outputs out.

``deploy`` runs every check that can fail (capacity, endpoint exposure, user-data, image
source, network egress) before it declares the first resource, so a bad stack fails the
preview with one FleetError line and nothing half-created. The same function runs for a
real ``pulumi up`` (infra/program/__main__.py) and under mocks for the offline plan
(infra/preview/offline.py).
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws

from infra.components.api_key import ApiKey, ApiKeyArgs
from infra.components.endpoint import Endpoint, EndpointArgs
from infra.components.fleet import Fleet, FleetArgs
from infra.components.monitoring import Monitoring, MonitoringArgs
from infra.components.network import Network, NetworkArgs
from infra.components.scaling import FleetScaling, FleetScalingArgs
from infra.config import ImageSection, StackConfig
from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.plan.capacity import (
    CapacityLayout,
    capacity_layout,
    drain_heartbeat_s,
    root_snapshot_gib,
    root_volume,
    scheduled_min_groups,
)
from infra.plan.drain import deregistration_delay_s
from infra.plan.endpoint import check_endpoint
from infra.plan.iam import default_weights_s3_uri
from infra.plan.network import subnet_cidrs
from infra.plan.node.serve_args import served_model_name
from infra.plan.pricing import instance_price
from infra.plan.scaling import ladder_types, scaling_policy_spec
from infra.plan.stack import StackPlan
from infra.plan.tags import plan_id, stack_tags
from infra.render.stack import monitoring_spec
from infra.render.userdata import encoded_user_data

# Weight sources a node can reach without internet egress (endpoints-only networks).
SOURCES_WITHOUT_INTERNET = ("s3", "ebs-initialized", "ebs-lazy", "local-nvme")


def checked_capacity_layout(stack_plan: StackPlan) -> CapacityLayout:
    """The capacity layout, after every check that can refuse the stack without asking AWS; run
    before any resource is declared (the ``preflight`` command is the one that asks AWS)."""
    config = stack_plan.config
    layout = stack_plan.plan.layout
    capacity = capacity_layout(config, layout)
    for instance_type in ladder_types(stack_plan):
        encoded_user_data(stack_plan, instance_type)
    deregistration_delay = deregistration_delay_s(config)
    drain_heartbeat_s(deregistration_delay, config.serving.shutdown_timeout_s)
    check_endpoint(
        config.endpoint, replica_slots=layout.replicas_per_node, deregistration_delay_s=deregistration_delay
    )
    if config.network.egress == "endpoints-only" and config.serving.weights_source not in SOURCES_WITHOUT_INTERNET:
        raise FleetError(
            f"vllm-fleet:serving.weightsSource = {config.serving.weights_source!r}: unreachable with "
            f"network.egress endpoints-only (no internet); use one of {', '.join(SOURCES_WITHOUT_INTERNET)}"
        )
    if config.network.egress == "endpoints-only" and config.monitoring.mode == "self-hosted":
        raise FleetError(
            "vllm-fleet:monitoring.mode = \"self-hosted\": the monitoring host installs Prometheus, "
            "Alertmanager and Grafana from the internet, which network.egress endpoints-only does not reach; "
            "use managed, shared or none"
        )
    if config.network.mode == "new":
        subnet_cidrs(config.network.vpc_cidr, config.network.availability_zones)
    image_source(config.image)
    return capacity


def image_source(image: ImageSection) -> str:
    """Which AMI the fleet runs. A pinned ``amiId`` is preferred (prod): the launch template
    records the exact image and a new one is a reviewed change. ``ssmParameter`` is read at
    deploy time (not ``resolve:ssm:`` at launch), so the templates still pin the id it held
    then: a new image shows up in the next preview as a diff and rolls out by instance
    refresh, instead of drifting silently into whichever node launches next."""
    if image.ami_id and image.ssm_parameter:
        raise FleetError("vllm-fleet:image: give amiId or ssmParameter, not both")
    if image.ami_id:
        return image.ami_id
    if image.ssm_parameter:
        return f"ssm:{image.ssm_parameter}"
    raise FleetError("vllm-fleet:image: required; give amiId (a pinned image, preferred) or ssmParameter")


def resolve_image(image: ImageSection) -> tuple[pulumi.Output[str], pulumi.Output[str], pulumi.Output[int]]:
    """(image id, its root device name, its root snapshot's GiB): the root volume must be
    declared on that device, at least that large."""
    if image.ami_id:
        image_id = pulumi.Output.from_input(image.ami_id)
    else:
        assert image.ssm_parameter is not None
        image_id = aws.ssm.get_parameter_output(name=image.ssm_parameter).value
    # Looked up by id (no owner filter needed): only its root device name is wanted.
    ami = aws.ec2.get_ami_output(
        filters=image_id.apply(lambda ami_id: [aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami_id])])
    )
    snapshot_gib = pulumi.Output.all(ami.root_device_name, ami.block_device_mappings).apply(
        lambda values: root_snapshot_gib(values[0], values[1])
    )
    return image_id, ami.root_device_name, snapshot_gib


def capacity_block_zone(stack_plan: StackPlan) -> str | None:
    """The one zone a capacity block's instances can launch in (None for other markets). A
    block reserves one instance type in one AZ (aws_fleet.yaml capacity_block_scope), so the
    fleet's groups launch in that zone only, and the plan must have chosen the block's type."""
    config = stack_plan.config
    if config.capacity.market != "capacity-block":
        return None
    reservation_id = config.capacity.capacity_reservation_id
    block = aws.ec2.get_capacity_block_reservation(id=reservation_id)
    chosen = stack_plan.plan.layout.instance_type
    if block.instance_type != chosen:
        raise FleetError(
            f"vllm-fleet:capacity.capacityReservationId = {reservation_id!r}: the block reserves "
            f"{block.instance_type}, the plan chose {chosen}; restrict vllm-fleet:capacity.instanceTypes to "
            f"{block.instance_type} or use a block of {chosen}"
        )
    return str(block.availability_zone)


def choose_availability_zones(stack_plan: StackPlan, count: int, first: str | None = None) -> list[str]:
    """The first ``count`` default AZs that offer the plan's instance type; ``first`` (a
    capacity block's zone) leads when given."""
    chosen = stack_plan.plan.layout.instance_type
    zones = aws.get_availability_zones(
        state="available", filters=[aws.GetAvailabilityZonesFilterArgs(name="opt-in-status", values=["opt-in-not-required"])]
    )
    offered = aws.ec2.get_instance_type_offerings(
        location_type="availability-zone",
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[chosen])],
    )
    usable = [zone for zone in zones.names if zone in set(offered.locations)]
    if first is not None:
        if first not in usable:
            raise FleetError(
                f"vllm-fleet:capacity.capacityReservationId: the block is in {first}, which is not one of "
                f"{stack_plan.config.region}'s default zones offering {chosen} ({', '.join(usable) or 'none'})"
            )
        usable = [first] + [zone for zone in usable if zone != first]
    if len(usable) < count:
        raise FleetError(
            f"vllm-fleet:network.availabilityZones = {count}: only {len(usable)} zone(s) of "
            f"{stack_plan.config.region} offer {chosen} ({', '.join(usable) or 'none'})"
        )
    return usable[:count]


def fleet_subnet_ids(
    config: StackConfig, private_subnet_ids: list[pulumi.Output[str]], block_zone: str | None
) -> list[pulumi.Input[str]]:
    """The subnets the fleet's groups launch in: every private subnet, or for a capacity block
    only the one in the block's zone (the first, for a new network; looked up, for an existing one)."""
    if block_zone is None:
        return list(private_subnet_ids)
    if config.network.mode == "new":
        return [private_subnet_ids[0]]
    for subnet_id in config.network.private_subnet_ids:
        if aws.ec2.get_subnet(id=subnet_id).availability_zone == block_zone:
            return [subnet_id]
    raise FleetError(
        f"vllm-fleet:network.privateSubnetIds: none is in {block_zone}, where the capacity block "
        f"{config.capacity.capacity_reservation_id} is; add a private subnet there"
    )


def hourly_estimate(stack_plan: StackPlan, capacity: CapacityLayout) -> dict[str, Any]:
    """GPU nodes at min and max, priced as `vllm-fleet plan` prices them (infra/plan/pricing.py)."""
    config = stack_plan.config
    chosen = stack_plan.plan.layout.instance_type
    price = instance_price(default_catalog(), chosen, config.region, config.capacity.market)
    if price.usd_per_hour is None:
        return {"basis": f"{chosen}: {price.basis}", "minReplicas": None, "maxReplicas": None}
    return {
        "basis": f"{chosen} ${price.usd_per_hour}/h: {price.basis}",
        "minReplicas": round(capacity.min_instances * price.usd_per_hour, 2),
        "maxReplicas": round(capacity.max_instances * price.usd_per_hour, 2),
    }


def deploy(stack_plan: StackPlan) -> dict[str, pulumi.Output[Any]]:
    """Declare the fleet for ``stack_plan``; export and return the stack outputs."""
    config = stack_plan.config
    capacity = checked_capacity_layout(stack_plan)
    facts = aws_fleet_facts()
    tags = stack_tags(stack_plan)
    layout = stack_plan.plan.layout

    identity = aws.get_caller_identity()
    partition = aws.get_partition().partition
    block_zone = capacity_block_zone(stack_plan)
    zones = (
        choose_availability_zones(stack_plan, config.network.availability_zones, first=block_zone)
        if config.network.mode == "new"
        else []
    )
    network = Network(
        "network",
        NetworkArgs(
            stack=config.stack,
            region=config.region,
            mode=config.network.mode,
            availability_zones=zones,
            tags=tags,
            vpc_cidr=config.network.vpc_cidr,
            egress=config.network.egress,
            public_subnets=not config.endpoint.internal,
            existing_vpc_id=config.network.vpc_id,
            existing_private_subnet_ids=config.network.private_subnet_ids,
            existing_public_subnet_ids=config.network.public_subnet_ids,
            interface_endpoint_services=facts.vpc_interface_endpoints.value,
            gateway_endpoint_services=facts.vpc_gateway_endpoints.value,
        ),
    )
    api_key = ApiKey("api-key", ApiKeyArgs(secret_name=stack_plan.api_key_secret_name, tags=tags))
    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(
            mode=config.monitoring.mode,
            stack=config.stack,
            region=config.region,
            partition=partition,
            account_id=identity.account_id,
            tags=tags,
            spec=monitoring_spec(stack_plan) if config.monitoring.mode in ("self-hosted", "managed") else None,
            vpc_id=network.vpc_id,
            subnet_id=network.private_subnet_ids[0],
            allowed_cidrs=config.monitoring.allowed_cidrs,
            # The host wears the scrapers group, which the nodes admit on their metrics ports.
            scraper_security_group_id=network.scraper_security_group_id,
            shared_stack=config.monitoring.shared_stack,
            nodes_per_replica=layout.nodes_per_replica,
        ),
    )
    deregistration_delay = deregistration_delay_s(config)
    endpoint = Endpoint(
        "endpoint",
        EndpointArgs(
            stack=config.stack,
            vpc_id=network.vpc_id,
            vpc_cidr=network.vpc_cidr,
            subnet_ids=network.private_subnet_ids if config.endpoint.internal else network.public_subnet_ids,
            tags=tags,
            app_port=config.serving.port,
            replica_slots=layout.replicas_per_node,
            deregistration_delay_s=deregistration_delay,
            lb_type=config.endpoint.type,
            internal=config.endpoint.internal,
            allowed_cidrs=config.endpoint.allowed_cidrs,
            certificate_arn=config.endpoint.certificate_arn,
            idle_timeout_s=config.endpoint.idle_timeout_s,
        ),
    )
    image_id, root_device, snapshot_gib = resolve_image(config.image)
    weights_uri = None
    if config.serving.weights_source == "s3":
        repo = config.model.repo or stack_plan.plan.request.arch.hf_repo
        weights_uri = config.serving.weights_s3_uri or default_weights_s3_uri(config, identity.account_id, repo)
    types = ladder_types(stack_plan)
    first_node = stack_plan.node_specs[types[0]]
    fleet = Fleet(
        "fleet",
        FleetArgs(
            stack=config.stack,
            region=config.region,
            capacity=capacity,
            instance_types=types,
            user_data={t: encoded_user_data(stack_plan, t) for t in types},
            serving_port=config.serving.port,
            startup_timeout_s=stack_plan.plan.startup_timeout_s,
            drain_heartbeat_s=drain_heartbeat_s(deregistration_delay, config.serving.shutdown_timeout_s),
            market=config.capacity.market,
            capacity_reservation_id=config.capacity.capacity_reservation_id,
            on_demand_base=config.capacity.on_demand_base,
            root_volume=root_volume(config.serving.weights_source, stack_plan.plan.weights_bytes),
            scheduled_min_groups=scheduled_min_groups(stack_plan),
            hf_token_secret_name=first_node.hf_token_secret_id,
            metrics_namespace=first_node.scaling_environment["SCALING_NAMESPACE"],
            vpc_id=network.vpc_id,
            subnet_ids=fleet_subnet_ids(config, network.private_subnet_ids, block_zone),
            load_balancer_security_group_id=endpoint.security_group_id,
            scraper_security_group_id=network.scraper_security_group_id,
            target_group_arns=endpoint.target_group_arns,
            api_key_secret_arn=api_key.secret_arn,
            image_id=image_id,
            root_device_name=root_device,
            root_snapshot_gib=snapshot_gib,
            tags=tags,
            partition=partition,
            account_id=identity.account_id,
            weights_s3_uri=weights_uri,
        ),
    )
    scaling = FleetScaling("scaling", FleetScalingArgs(scaling_policy_spec(stack_plan), fleet.group_names, tags))
    outputs: dict[str, pulumi.Output[Any]] = {
        "endpointUrl": endpoint.url,
        "servedModelName": pulumi.Output.from_input(served_model_name(config, stack_plan.plan.request.model_name)),
        "apiKeySecretArn": api_key.secret_arn,
        "apiKeySecretName": api_key.secret_name,
        "planId": pulumi.Output.from_input(plan_id(stack_plan)),
        "planSummary": pulumi.Output.from_input(stack_plan.plan.summary().as_json()),
        "estimatedHourlyUsd": pulumi.Output.from_input(hourly_estimate(stack_plan, capacity)),
        "autoscalingGroupNames": pulumi.Output.all(*fleet.group_names),
        "loadBalancerArnSuffix": endpoint.load_balancer_arn_suffix,
        "targetGroupArnSuffixes": pulumi.Output.all(*endpoint.target_group_arn_suffixes),
        "logGroupName": fleet.log_group_name,
        "nodeSecurityGroupId": fleet.security_group_id,
        "scraperSecurityGroupId": network.scraper_security_group_id,
        "vpcId": network.vpc_id,
        "scalingPolicyArns": pulumi.Output.from_input(scaling.policy_arns),
    }
    outputs.update(monitoring.stack_outputs())
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs
