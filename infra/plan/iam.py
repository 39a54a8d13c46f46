"""IAM policy documents, as plain dicts the components serialise: the GPU nodes' and the
monitoring host's inline policies, the managed-mode documents, and trust policies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from infra.config import StackConfig
from infra.errors import FleetError
from infra.plan.stack import group_name_prefix

# The current IAM policy language version, the one every document here is written in.
POLICY_VERSION = "2012-10-17"


def policy_document(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": POLICY_VERSION, "Statement": list(statements)}


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
    return policy_document(*statements)


# --- the monitoring host and the managed-mode workspaces ------------------------------------


@dataclass(frozen=True)
class HostPolicyInputs:
    partition: str
    grafana_secret_arn: str
    config_bucket: str
    config_prefix: str
    sns_topic_arn: str | None = None


def host_policy_document(p: HostPolicyInputs) -> dict[str, Any]:
    """The monitoring host's inline policy: exactly the calls its services make."""
    statements: list[dict[str, Any]] = [
        {
            # Prometheus's EC2 service discovery. DescribeInstances has no resource-level
            # permissions, so "*" is the narrowest it can be.
            "Sid": "DiscoverFleetNodes",
            "Effect": "Allow",
            "Action": ["ec2:DescribeInstances"],
            "Resource": ["*"],
        },
        {
            # Grafana's CloudWatch datasource (Auto Scaling group metrics); also no resource ARNs.
            "Sid": "ReadCloudWatchMetrics",
            "Effect": "Allow",
            "Action": ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"],
            "Resource": ["*"],
        },
        {
            "Sid": "ReadGrafanaAdminPassword",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": [p.grafana_secret_arn],
        },
        {
            "Sid": "ReadMonitoringConfig",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:{p.partition}:s3:::{p.config_bucket}/{p.config_prefix}*"],
        },
    ]
    if p.sns_topic_arn:
        statements.append(
            {
                "Sid": "PublishAlerts",
                "Effect": "Allow",
                "Action": ["sns:Publish"],
                "Resource": [p.sns_topic_arn],
            }
        )
    return policy_document(*statements)


def remote_write_policy_document(workspace_arn: str) -> dict[str, Any]:
    """For the GPU nodes' role in managed mode: remote write to this one workspace."""
    return policy_document(
        {"Sid": "RemoteWriteMetrics", "Effect": "Allow", "Action": ["aps:RemoteWrite"], "Resource": [workspace_arn]}
    )


def grafana_workspace_policy_document(workspace_arn: str) -> dict[str, Any]:
    """For the Amazon Managed Grafana workspace's role: query this AMP workspace, read CloudWatch."""
    return policy_document(
        {
            "Sid": "QueryFleetMetrics",
            "Effect": "Allow",
            "Action": [
                "aps:QueryMetrics",
                "aps:GetSeries",
                "aps:GetLabels",
                "aps:GetMetricMetadata",
                "aps:DescribeWorkspace",
            ],
            "Resource": [workspace_arn],
        },
        {
            # Grafana's AMP datasource picker lists workspaces; List* has no resource ARN.
            "Sid": "ListWorkspaces",
            "Effect": "Allow",
            "Action": ["aps:ListWorkspaces"],
            "Resource": ["*"],
        },
        {
            "Sid": "ReadCloudWatchMetrics",
            "Effect": "Allow",
            "Action": ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics", "cloudwatch:DescribeAlarms"],
            "Resource": ["*"],
        },
    )


def tls_only_bucket_policy(bucket_arn: str) -> dict[str, Any]:
    """For a bucket: refuse every request that does not come over TLS."""
    return policy_document(
        {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [bucket_arn, f"{bucket_arn}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }
    )


def assume_role_policy(service: str, *, source_account: str | None = None) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"Service": service},
        "Action": "sts:AssumeRole",
    }
    if source_account:
        # Confused-deputy guard for service principals that act for many accounts.
        statement["Condition"] = {"StringEquals": {"aws:SourceAccount": source_account}}
    return policy_document(statement)
