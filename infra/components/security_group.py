"""Security groups, the two ways the fleet declares them. Helpers, not components, so every
group and rule keeps the parent (and the URN) of the component that declares it.

* ``security_group``: the group itself, tagged with its Name, and any fixed TCP rules inline
  (the scrapers, VPC endpoint and image-build groups, whose rules never change apart from them).
* ``SecurityGroupRules``: rules as resources of their own (``aws.vpc.SecurityGroupIngressRule``
  and ``…EgressRule``), named ``{prefix}-in-{key}`` and ``{prefix}-out[-{key}]`` and tagged like
  their group: the load balancer's, the nodes' and the monitoring host's, whose rules follow
  the config (allowed CIDRs, ports) and change without touching the group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pulumi
import pulumi_aws as aws

# The inline rule types take the same arguments, and so do the two rule resources.
_Inline = TypeVar("_Inline", aws.ec2.SecurityGroupIngressArgs, aws.ec2.SecurityGroupEgressArgs)
_Rule = TypeVar("_Rule", aws.vpc.SecurityGroupIngressRule, aws.vpc.SecurityGroupEgressRule)


@dataclass(frozen=True)
class TcpRule:
    """An inline rule: TCP ports ``low``–``high`` to or from ``cidr``."""

    low: int
    high: int
    cidr: pulumi.Input[str]
    description: str


def security_group(
    resource_name: str,
    *,
    vpc_id: pulumi.Input[str],
    description: str,
    name_tag: str,
    tags: Mapping[str, str],
    opts: pulumi.ResourceOptions,
    ingress: Sequence[TcpRule] = (),
    egress: Sequence[TcpRule] = (),
) -> aws.ec2.SecurityGroup:
    return aws.ec2.SecurityGroup(
        resource_name,
        vpc_id=vpc_id,
        description=description,
        ingress=_inline(aws.ec2.SecurityGroupIngressArgs, ingress),
        egress=_inline(aws.ec2.SecurityGroupEgressArgs, egress),
        tags={**tags, "Name": name_tag},
        opts=opts,
    )


def _inline(kind: type[_Inline], rules: Sequence[TcpRule]) -> list[_Inline] | None:
    return [
        kind(protocol="tcp", from_port=r.low, to_port=r.high, cidr_blocks=[r.cidr], description=r.description)
        for r in rules
    ] or None


@dataclass(frozen=True)
class SecurityGroupRules:
    """The rules of one group. ``ports``: one port, a (first, last) range, or None for every
    protocol and port. The other side is a ``cidr`` (IPv4 unless ``ipv6``) or a ``peer`` group."""

    prefix: str
    group_id: pulumi.Input[str]
    tags: Mapping[str, str]
    opts: pulumi.ResourceOptions

    def ingress(
        self, key: str, description: str, *, ports: int | tuple[int, int] | None,
        cidr: pulumi.Input[str] | None = None, ipv6: bool = False, peer: pulumi.Input[str] | None = None,
    ) -> None:
        name = f"{self.prefix}-in-{key}"
        self._rule(aws.vpc.SecurityGroupIngressRule, name, description, ports, cidr, ipv6, peer)

    def egress(
        self, key: str | None, description: str, *, ports: int | tuple[int, int] | None,
        cidr: pulumi.Input[str] | None = None, ipv6: bool = False, peer: pulumi.Input[str] | None = None,
    ) -> None:
        name = f"{self.prefix}-out" if key is None else f"{self.prefix}-out-{key}"
        self._rule(aws.vpc.SecurityGroupEgressRule, name, description, ports, cidr, ipv6, peer)

    def _rule(
        self, kind: type[_Rule], resource_name: str, description: str, ports: int | tuple[int, int] | None,
        cidr: pulumi.Input[str] | None, ipv6: bool, peer: pulumi.Input[str] | None,
    ) -> _Rule:
        low, high = (ports, ports) if isinstance(ports, int) else ports or (None, None)
        return kind(
            resource_name,
            security_group_id=self.group_id,
            ip_protocol="-1" if ports is None else "tcp",
            from_port=low,
            to_port=high,
            cidr_ipv4=None if ipv6 else cidr,
            cidr_ipv6=cidr if ipv6 else None,
            referenced_security_group_id=peer,
            description=description,
            tags=self.tags,
            opts=self.opts,
        )
