"""The fleet's network: a new VPC with private subnets for the GPU nodes and public subnets
for the load balancer and NAT, or an existing VPC taken as given (no VPC resources then).

Egress is either NAT gateways (one per AZ, so losing an AZ never cuts the others off) or,
for isolated accounts, VPC endpoints only: interface endpoints for SSM, Secrets Manager,
CloudWatch Logs and ECR, and an S3 gateway endpoint. Nodes then reach nothing else, so
weights must come from S3 or the image (checked by the program, not here).

Also here: an empty "scrapers" security group. The monitoring side attaches it to whatever
scrapes the nodes; the fleet admits metrics ports only from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulumi
import pulumi_aws as aws

from infra.components.security_group import TcpRule, security_group
from infra.errors import FleetError
from infra.plan.network import HTTPS_PORT, subnet_cidrs
from infra.plan.tags import ROLE_TAG


@dataclass(frozen=True)
class NetworkArgs:
    stack: str
    region: str
    mode: Literal["new", "existing"]
    availability_zones: list[str]  # names, in order; len = how many AZs to span
    tags: Mapping[str, str]
    vpc_cidr: str = "10.42.0.0/16"
    egress: Literal["nat", "endpoints-only"] = "nat"
    public_subnets: bool = True  # a public load balancer needs them
    existing_vpc_id: str | None = None
    existing_private_subnet_ids: list[str] = field(default_factory=list)
    existing_public_subnet_ids: list[str] = field(default_factory=list)
    interface_endpoint_services: Sequence[str] = ()
    gateway_endpoint_services: Sequence[str] = ()


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    vpc_cidr: pulumi.Output[str]
    private_subnet_ids: list[pulumi.Output[str]]
    public_subnet_ids: list[pulumi.Output[str]]
    scraper_security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:network:Network", name, None, opts)
        self._args = args
        if args.mode == "existing":
            self._adopt_existing(name, args)
        else:
            self._create_vpc(name, args)
        scrapers = security_group(
            f"{name}-scrapers", vpc_id=self.vpc_id, name_tag=f"{args.stack}-scrapers",
            tags={**args.tags, ROLE_TAG: "scrapers"}, opts=pulumi.ResourceOptions(parent=self),
            description="Attach to whatever scrapes the fleet's metrics; nodes admit metrics ports only from it",
            egress=[TcpRule(0, 65535, self.vpc_cidr, "scrape targets inside the VPC")],
        )
        self.scraper_security_group_id = scrapers.id
        self.register_outputs(
            {
                "vpcId": self.vpc_id,
                "vpcCidr": self.vpc_cidr,
                "privateSubnetIds": self.private_subnet_ids,
                "publicSubnetIds": self.public_subnet_ids,
                "scraperSecurityGroupId": self.scraper_security_group_id,
            }
        )

    def _adopt_existing(self, name: str, args: NetworkArgs) -> None:
        if not args.existing_vpc_id:
            raise FleetError("vllm-fleet:network.vpcId: required with mode existing")
        if args.public_subnets and not args.existing_public_subnet_ids:
            raise FleetError(
                "vllm-fleet:network.publicSubnetIds: a public endpoint in an existing VPC needs "
                "public subnets (or set vllm-fleet:endpoint.internal: true)"
            )
        vpc = aws.ec2.get_vpc_output(id=args.existing_vpc_id, opts=pulumi.InvokeOutputOptions(parent=self))
        self.vpc_id = pulumi.Output.from_input(args.existing_vpc_id)
        self.vpc_cidr = vpc.cidr_block
        self.private_subnet_ids = [pulumi.Output.from_input(s) for s in args.existing_private_subnet_ids]
        self.public_subnet_ids = [pulumi.Output.from_input(s) for s in args.existing_public_subnet_ids]

    def _create_vpc(self, name: str, args: NetworkArgs) -> None:
        azs = args.availability_zones
        private_cidrs, public_cidrs = subnet_cidrs(args.vpc_cidr, len(azs))
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)

        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.vpc_cidr,
            # Interface endpoints with private DNS need both.
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags={**tags, "Name": f"{args.stack}-vpc"},
            opts=child,
        )
        self.vpc_id = vpc.id
        self.vpc_cidr = pulumi.Output.from_input(args.vpc_cidr)
        # The default group allows all traffic between its members; strip it so nothing
        # that lands in it by accident can talk to the nodes.
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg",
            vpc_id=vpc.id,
            ingress=[],
            egress=[],
            tags={**tags, "Name": f"{args.stack}-default-locked"},
            opts=child,
        )

        def subnet_in(tier: str, i: int, az: str, cidr: str, route_table_id: pulumi.Input[str]) -> pulumi.Output[str]:
            """One subnet of a tier in one AZ, associated with that tier's route table."""
            subnet = aws.ec2.Subnet(
                f"{name}-{tier}-{i}",
                vpc_id=vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                map_public_ip_on_launch=False,
                tags={**tags, "Name": f"{args.stack}-{tier}-{az}", "vllm-fleet:tier": tier},
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-{tier}-{i}-rta", subnet_id=subnet.id, route_table_id=route_table_id, opts=child
            )
            return subnet.id

        need_public = args.public_subnets or args.egress == "nat"
        public_ids: list[pulumi.Output[str]] = []
        public_route_table: aws.ec2.RouteTable | None = None
        igw: aws.ec2.InternetGateway | None = None
        if need_public:
            igw = aws.ec2.InternetGateway(
                f"{name}-igw", vpc_id=vpc.id, tags={**tags, "Name": f"{args.stack}-igw"}, opts=child
            )
            public_route_table = aws.ec2.RouteTable(
                f"{name}-public-rt",
                vpc_id=vpc.id,
                routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)],
                tags={**tags, "Name": f"{args.stack}-public"},
                opts=child,
            )
            for i, (az, cidr) in enumerate(zip(azs, public_cidrs, strict=True)):
                public_ids.append(subnet_in("public", i, az, cidr, public_route_table.id))

        private_ids: list[pulumi.Output[str]] = []
        private_route_tables: list[pulumi.Output[str]] = []
        for i, (az, cidr) in enumerate(zip(azs, private_cidrs, strict=True)):
            routes: list[aws.ec2.RouteTableRouteArgs] = []
            if args.egress == "nat":
                assert igw is not None
                # Both need the VPC's internet gateway attached first: nothing in their inputs
                # says so, and created in parallel they fail (the provider's aws_nat_gateway and
                # aws_eip docs: "depends_on the Internet Gateway for the VPC").
                after_igw = pulumi.ResourceOptions(parent=self, depends_on=[igw])
                eip = aws.ec2.Eip(
                    f"{name}-nat-{i}-eip", domain="vpc", tags={**tags, "Name": f"{args.stack}-nat-{az}"}, opts=after_igw
                )
                nat = aws.ec2.NatGateway(
                    f"{name}-nat-{i}",
                    allocation_id=eip.id,
                    subnet_id=public_ids[i],
                    tags={**tags, "Name": f"{args.stack}-nat-{az}"},
                    opts=after_igw,
                )
                routes.append(aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id))
            route_table = aws.ec2.RouteTable(
                f"{name}-private-{i}-rt",
                vpc_id=vpc.id,
                routes=routes,
                tags={**tags, "Name": f"{args.stack}-private-{az}"},
                opts=child,
            )
            private_ids.append(subnet_in("private", i, az, cidr, route_table.id))
            private_route_tables.append(route_table.id)

        if args.egress == "endpoints-only":
            self._create_endpoints(name, args, vpc, private_ids, private_route_tables)
        self.private_subnet_ids = private_ids
        self.public_subnet_ids = public_ids

    def _create_endpoints(
        self,
        name: str,
        args: NetworkArgs,
        vpc: aws.ec2.Vpc,
        private_ids: list[pulumi.Output[str]],
        route_table_ids: list[pulumi.Output[str]],
    ) -> None:
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)
        endpoint_sg = security_group(
            f"{name}-endpoints", vpc_id=vpc.id, name_tag=f"{args.stack}-endpoints",
            tags={**tags, ROLE_TAG: "vpc-endpoints"}, opts=child,
            description="HTTPS from inside the VPC to the AWS service endpoints",
            ingress=[TcpRule(HTTPS_PORT, HTTPS_PORT, args.vpc_cidr, "AWS APIs from the VPC")],
        )
        endpoints = [(s, "Interface") for s in args.interface_endpoint_services]
        endpoints += [(s, "Gateway") for s in args.gateway_endpoint_services]
        for service, kind in endpoints:
            interface = kind == "Interface"
            aws.ec2.VpcEndpoint(
                f"{name}-{service.replace('.', '-')}",
                vpc_id=vpc.id,
                service_name=f"com.amazonaws.{args.region}.{service}",
                vpc_endpoint_type=kind,
                # Interface endpoints sit in the private subnets behind their group; gateway
                # endpoints are routes in the private route tables.
                private_dns_enabled=True if interface else None,
                subnet_ids=private_ids if interface else None,
                security_group_ids=[endpoint_sg.id] if interface else None,
                route_table_ids=None if interface else route_table_ids,
                tags={**tags, "Name": f"{args.stack}-{service}"},
                opts=child,
            )
