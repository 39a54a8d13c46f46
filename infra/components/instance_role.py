"""The IAM role of an EC2 instance that Session Manager can reach: the fleet's nodes and the
monitoring host. A helper, not a component, so the role and its attachment keep the parent (and
the URNs) of the component that declares them."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pulumi
import pulumi_aws as aws

from infra.plan.iam import assume_role_policy


def ssm_instance_role(
    name: str, *, description: str, name_tag: str, partition: str, tags: Mapping[str, str],
    opts: pulumi.ResourceOptions,
) -> aws.iam.Role:
    """`name`-role… is the caller's: resources are `{name}-role` and `{name}-ssm`. Session
    Manager instead of SSH: no key pairs, no port 22."""
    role = aws.iam.Role(
        f"{name}-role",
        description=description,
        assume_role_policy=json.dumps(assume_role_policy("ec2.amazonaws.com")),
        tags={**tags, "Name": name_tag},
        opts=opts,
    )
    aws.iam.RolePolicyAttachment(
        f"{name}-ssm",
        role=role.name,
        policy_arn=f"arn:{partition}:iam::aws:policy/AmazonSSMManagedInstanceCore",
        opts=opts,
    )
    return role
