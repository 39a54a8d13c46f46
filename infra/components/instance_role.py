"""The IAM role and instance profile of an EC2 instance that Session Manager can reach: the
fleet's nodes and the monitoring host. A helper, not a component, so the role, its attachment
and the profile keep the parent (and the URNs) of the component that declares them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NamedTuple

import pulumi
import pulumi_aws as aws

from infra.plan.iam import assume_role_policy


class InstanceRole(NamedTuple):
    role: aws.iam.Role
    profile: aws.iam.InstanceProfile


def ssm_instance_role(
    name: str, *, description: str, name_tag: str, partition: str, tags: Mapping[str, str],
    opts: pulumi.ResourceOptions,
) -> InstanceRole:
    """`name`-role… is the caller's: resources are `{name}-role`, `{name}-ssm` and
    `{name}-profile`. Session Manager instead of SSH: no key pairs, no port 22. The caller adds
    the role's own policy."""
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
    profile = aws.iam.InstanceProfile(f"{name}-profile", role=role.name, tags={**tags, "Name": name_tag}, opts=opts)
    return InstanceRole(role, profile)
