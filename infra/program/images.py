"""The image-build stack's Pulumi program: where the build instance runs, and the VllmImage.

``deploy_images`` runs every check that can fail (the bake against images/facts.yaml and the
vLLM pin, the network settings) before it declares the first resource, like ``deploy`` for
fleet stacks; the same function runs for a real ``pulumi up`` (infra/program/__main__.py) and
under mocks for ``vllm-fleet plan`` (infra/preview/offline.py).

Network: the build instance must reach PyPI (the vLLM wheel), the Ubuntu archive (exporters),
S3, SSM and, for Hugging Face weights, the Hub. So the stack takes the same
``vllm-fleet:network`` section as a fleet: ``mode: new`` reuses the fleet's Network component in
its smallest shape (one zone that offers the build type, a private subnet behind one NAT
gateway, no load-balancer subnets); ``mode: existing`` builds in the first of
``privateSubnetIds`` (e.g. a fleet's VPC), which must already route to the internet through NAT.
An endpoints-only network has no internet, so the bake could not install vLLM: refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.components.image import VllmImage, VllmImageArgs
from infra.components.network import Network, NetworkArgs
from infra.components.security_group import TcpRule, security_group
from infra.config import PROJECT, ImagesStackConfig, NetworkSection
from infra.errors import FleetError
from infra.plan.images import ImagePlan, image_spec, plan_bake
from infra.plan.network import subnet_cidrs
from infra.plan.tags import IMAGE_TAG, ROLE_TAG, STACK_TAG

# NetworkSection keys that shape a fleet's network and mean nothing for one build instance.
FLEET_ONLY_NETWORK_KEYS = {"availability_zones": "availabilityZones", "public_subnet_ids": "publicSubnetIds"}
# What the build instance talks to: HTTPS (PyPI, the Hub, S3, SSM, Image Builder) and HTTP (the
# Ubuntu archive serves apt over port 80; packages are checked against the archive's signed index).
BUILD_EGRESS_PORTS = {443: "HTTPS: PyPI, Hugging Face, S3, SSM, Image Builder", 80: "HTTP: Ubuntu apt archive"}


def checked_image_plan(config: ImagesStackConfig) -> ImagePlan:
    """The bake's plan, after every check that can refuse the images stack without asking AWS;
    run before any resource is declared (the ``preflight`` command is the one that asks AWS)."""
    image_plan = plan_bake(config)
    network = config.network
    for field_name, key in FLEET_ONLY_NETWORK_KEYS.items():
        if field_name in network.model_fields_set:
            raise FleetError(
                f"{PROJECT}:network.{key}: an image build runs one instance in one subnet; leave it out "
                "of an images stack"
            )
    if network.egress == "endpoints-only":
        raise FleetError(
            f"{PROJECT}:network.egress = \"endpoints-only\": the bake installs vLLM from PyPI and needs "
            "internet egress; use nat (mode new) or existing private subnets behind a NAT gateway"
        )
    if network.mode == "new":
        subnet_cidrs(network.vpc_cidr, 1)
    return image_plan


def build_zone(config: ImagesStackConfig) -> str:
    """The first default zone of the region that offers the build instance type."""
    build_type = config.bake.build_instance_type
    zones = aws.get_availability_zones(
        state="available",
        filters=[aws.GetAvailabilityZonesFilterArgs(name="opt-in-status", values=["opt-in-not-required"])],
    )
    offered = aws.ec2.get_instance_type_offerings(
        location_type="availability-zone",
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[build_type])],
    )
    usable = [zone for zone in zones.names if zone in set(offered.locations)]
    if not usable:
        raise FleetError(
            f"{PROJECT}:bake.buildInstanceType = \"{build_type}\": no zone of {config.region} offers it"
        )
    return usable[0]


@dataclass(frozen=True)
class BuildNetworkArgs:
    stack: str
    region: str
    network: NetworkSection
    # mode new: the zone to build in (one private subnet there); ignored for mode existing.
    zone: str | None
    tags: dict[str, str]


class BuildNetwork(pulumi.ComponentResource):
    """Where Image Builder launches the build and test instances: one private subnet with
    internet egress through NAT, and a security group that admits nothing and lets out only
    HTTPS and HTTP."""

    vpc_id: pulumi.Output[str]
    subnet_id: pulumi.Output[str]
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: BuildNetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:images:BuildNetwork", name, None, opts)
        section = args.network
        network = Network(
            f"{name}-net",
            NetworkArgs(
                stack=args.stack,
                region=args.region,
                mode=section.mode,
                availability_zones=[args.zone] if section.mode == "new" and args.zone else [],
                tags=args.tags,
                vpc_cidr=section.vpc_cidr,
                egress="nat",
                public_subnets=False,
                existing_vpc_id=section.vpc_id,
                existing_private_subnet_ids=section.private_subnet_ids,
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        build_group = security_group(
            f"{name}-sg", vpc_id=network.vpc_id, name_tag=f"{args.stack}-build",
            tags={**args.tags, ROLE_TAG: "image-build"}, opts=pulumi.ResourceOptions(parent=self),
            description="Image Builder build/test instances: no inbound; outbound HTTPS and HTTP only",
            egress=[TcpRule(port, port, "0.0.0.0/0", what) for port, what in sorted(BUILD_EGRESS_PORTS.items())],
        )
        self.vpc_id = network.vpc_id
        self.subnet_id = network.private_subnet_ids[0]
        self.security_group_id = build_group.id
        self.register_outputs(
            {"vpcId": self.vpc_id, "subnetId": self.subnet_id, "securityGroupId": self.security_group_id}
        )


def images_tags(config: ImagesStackConfig) -> dict[str, str]:
    """The stack's own tags plus the stack and image tags (the policy pack's required tags
    for an image-build stack, infra.preview.policies.images_policy_config)."""
    return {**config.tags, STACK_TAG: config.stack, IMAGE_TAG: config.bake.name}


def deploy_images(config: ImagesStackConfig) -> dict[str, pulumi.Output[Any]]:
    """Declare the image pipeline for ``config``; export and return the stack outputs."""
    image_plan = checked_image_plan(config)
    tags = images_tags(config)
    zone = build_zone(config) if config.network.mode == "new" else None
    network = BuildNetwork(
        "build-network",
        BuildNetworkArgs(stack=config.stack, region=config.region, network=config.network, zone=zone, tags=tags),
    )
    image = VllmImage(
        "image",
        VllmImageArgs(
            spec=image_spec(config),
            subnet_id=network.subnet_id,
            security_group_ids=[network.security_group_id],
            build_on_deploy=config.bake.build_on_deploy,
            schedule_expression=config.bake.schedule,
            tags=tags,
        ),
    )
    outputs: dict[str, pulumi.Output[Any]] = {
        "amiSsmParameterName": pulumi.Output.from_input(image.ami_ssm_parameter_name),
        "baseImageSsmParameter": pulumi.Output.from_input(image_plan.base_image_ssm_parameter),
        "vllmVersion": pulumi.Output.from_input(image_plan.pin.version),
        "componentVersions": pulumi.Output.from_input(image.component_versions),
        "pipelineArn": image.pipeline_arn,
        "recipeArn": image.recipe_arn,
        "buildSubnetId": network.subnet_id,
    }
    if image.image_ami_id is not None:
        outputs["amiId"] = image.image_ami_id
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs
