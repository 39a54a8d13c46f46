"""The fleet's network plan, pure: how a VPC's CIDR is carved into subnets, and which
networks and ports the monitoring host may be reached from or reach (components/network.py
and components/monitoring.py declare them)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from infra.errors import FleetError

# Subnets are carved as 16 equal blocks of the VPC: the first 8 for private subnets, the
# last 8 for public ones, so up to 6 AZs fit and a later AZ never renumbers the others.
SUBNET_SPLIT_BITS = 4
PUBLIC_BLOCK_OFFSET = 8
# The smallest subnet worth having: a /26 is 59 usable addresses after AWS's 5.
SMALLEST_SUBNET_PREFIX = 26
HTTPS_PORT = 443


def subnet_cidrs(vpc_cidr: str, azs: int) -> tuple[list[str], list[str]]:
    """(private, public) CIDRs, one per AZ, carved from the VPC CIDR."""
    vpc = ipaddress.ip_network(vpc_cidr)
    new_prefix = vpc.prefixlen + SUBNET_SPLIT_BITS
    if new_prefix > SMALLEST_SUBNET_PREFIX:
        raise FleetError(
            f"vllm-fleet:network.vpcCidr = {vpc_cidr!r}: too small; needs /{SMALLEST_SUBNET_PREFIX - SUBNET_SPLIT_BITS} "
            f"or larger (16 subnets of at least /{SMALLEST_SUBNET_PREFIX})"
        )
    blocks = [str(b) for b in vpc.subnets(new_prefix=new_prefix)]
    return blocks[:azs], blocks[PUBLIC_BLOCK_OFFSET : PUBLIC_BLOCK_OFFSET + azs]


def check_allowed_cidrs(cidrs: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The CIDRs that may reach Grafana and Prometheus: never the whole internet."""
    networks = []
    for i, cidr in enumerate(cidrs):
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            raise FleetError(
                f"vllm-fleet:monitoring.allowedCidrs[{i}] = {cidr!r}: not a CIDR block like 10.0.0.0/8"
            ) from None
        if network.prefixlen == 0:
            raise FleetError(
                f"vllm-fleet:monitoring.allowedCidrs[{i}] = {cidr!r}: Grafana and Prometheus must not be open to "
                "the internet; name your networks, or leave the list empty and use an SSM port forward"
            )
        networks.append(network)
    return networks


def egress_ports(webhook_url: str | None) -> list[int]:
    """TCP ports the host opens connections to outside the VPC: HTTPS (AWS APIs, SNS, the
    release downloads, Grafana's repository) and the webhook's port if it names another."""
    ports = {HTTPS_PORT}
    if webhook_url:
        parts = urlsplit(webhook_url)
        ports.add(parts.port or (HTTPS_PORT if parts.scheme == "https" else 80))
    return sorted(ports)
