"""A fleet's monitoring, by ``vllm-fleet:monitoring.mode``:

* ``self-hosted``: one small Amazon Linux 2023 instance in a private subnet running Prometheus,
  Alertmanager and Grafana (infra/render/monitoring_host.py renders its files). The monitoring content
  (``render_monitoring``) goes to a private S3 bucket, one object per file plus a checksum
  manifest; the host installs a new version after promtool/amtool accept it, without being
  replaced. Grafana's admin password: RandomPassword → Secrets Manager, read by the host at
  boot (its role may read only that secret). No SSH: Session Manager, for shell and for port
  forwarding when no CIDR may reach the host.
* ``managed``: an Amazon Managed Prometheus workspace with the fleet's rules and an SNS-only
  alert manager, an Amazon Managed Grafana workspace, and, for the nodes, the Prometheus agent
  files and the remote-write policy (the program adds both to the Fleet).
* ``shared``: another stack's monitoring, through a StackReference to its outputs.
* ``none``: nothing.

The GPU nodes admit scrapes only from the network's "scrapers" security group; the host wears
that group next to its own, so the Fleet needs no rule for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pulumi
import pulumi_aws as aws

from infra.components.generated_secret import GeneratedSecret, GeneratedSecretArgs
from infra.components.instance_role import ssm_instance_role
from infra.components.private_bucket import PrivateBucket, PrivateBucketArgs
from infra.components.security_group import SecurityGroupRules, security_group
from infra.errors import FleetError
from infra.plan.iam import (
    HostPolicyInputs,
    assume_role_policy,
    grafana_workspace_policy_document,
    host_policy_document,
    remote_write_policy_document,
    tls_only_bucket_policy,
)
from infra.plan.network import HTTPS_PORT, check_allowed_cidrs, egress_ports
from infra.plan.tags import REQUIRED_TAG_KEYS, ROLE_TAG
from infra.render.monitoring import RULES_FILE, MonitoringSpec, render_monitoring
from infra.render.monitoring_host import (
    CONFIG_URI_TAG,
    GRAFANA_PASSWORD_LENGTH,
    MANIFEST_NAME,
    amp_alertmanager_definition,
    check_host_layout,
    check_node_agent,
    config_objects,
    host_destination,
    host_facts,
    host_spec,
    remote_write_url,
    render_host_user_data,
    render_node_agent,
)
from infra.render.userdata import encode_user_data

MonitoringMode = Literal["self-hosted", "managed", "shared", "none"]
# S3 allows at most 10 tags on an object; objects carry only the required ones.
S3_OBJECT_TAG_LIMIT = 10

# Stack outputs a monitoring stack exports (``Monitoring.stack_outputs``), and what ``shared``
# mode reads from the stack it names: the two must agree.
OUTPUT_GRAFANA_URL = "monitoringGrafanaUrl"
OUTPUT_PROMETHEUS_URL = "monitoringPrometheusUrl"
OUTPUT_GRAFANA_SECRET_ARN = "monitoringGrafanaAdminSecretArn"
OUTPUT_SECURITY_GROUP_ID = "monitoringSecurityGroupId"
OUTPUT_AMP_ENDPOINT = "monitoringAmpEndpoint"
SHARED_OUTPUTS = (
    OUTPUT_GRAFANA_URL,
    OUTPUT_PROMETHEUS_URL,
    OUTPUT_GRAFANA_SECRET_ARN,
    OUTPUT_SECURITY_GROUP_ID,
)


@dataclass(frozen=True)
class MonitoringArgs:
    mode: MonitoringMode
    stack: str
    region: str
    partition: str
    account_id: str
    tags: Mapping[str, str]
    # The fleet's monitoring content; required unless mode is none or shared.
    spec: MonitoringSpec | None = None
    # self-hosted: where the host runs, and who may reach Grafana (3000) and Prometheus (9090).
    vpc_id: pulumi.Input[str] | None = None
    subnet_id: pulumi.Input[str] | None = None
    allowed_cidrs: Sequence[str] = ()
    # The network's scrapers group (Network.scraper_security_group_id): the nodes admit their
    # metrics ports from it, so the host wears it.
    scraper_security_group_id: pulumi.Input[str] | None = None
    # None: the AMI AL2023's public SSM parameter names at deploy time (facts.yaml).
    ami_id: pulumi.Input[str] | None = None
    # shared: the stack (org/project/stack) whose monitoring this fleet uses.
    shared_stack: str | None = None
    # The plan's nodes per replica: managed mode's node agent handles single-node replicas only.
    nodes_per_replica: int = 1
    secret_recovery_window_days: int = 7
    extra_host_tags: Mapping[str, str] = field(default_factory=dict)


def host_tags(tags: Mapping[str, str], spec: MonitoringSpec) -> dict[str, str]:
    """The host's own tags: the stack's, with role monitoring. Prometheus discovers nodes by
    stack tag AND role node (MonitoringSpec.node_role_tag), so it never scrapes itself."""
    assert spec.node_role_tag[0] == ROLE_TAG and spec.node_role_tag[1] != "monitoring"
    return {**tags, ROLE_TAG: "monitoring"}


class Monitoring(pulumi.ComponentResource):
    mode: MonitoringMode
    grafana_url: pulumi.Output[str] | None
    prometheus_url: pulumi.Output[str] | None
    grafana_admin_secret_arn: pulumi.Output[str] | None
    security_group_id: pulumi.Output[str] | None
    amp_endpoint: pulumi.Output[str] | None
    amp_workspace_arn: pulumi.Output[str] | None
    node_remote_write_policy: pulumi.Output[str] | None
    node_agent_files: pulumi.Output[dict[str, str]] | None
    config_bucket: pulumi.Output[str] | None
    host_instance_id: pulumi.Output[str] | None

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:monitoring:Monitoring", name, None, opts)
        self.mode = args.mode
        self.grafana_url = self.prometheus_url = self.grafana_admin_secret_arn = None
        self.security_group_id = self.amp_endpoint = self.amp_workspace_arn = None
        self.node_remote_write_policy = self.node_agent_files = self.config_bucket = None
        self.host_instance_id = None
        if args.mode == "self-hosted":
            self._self_hosted(name, args)
        elif args.mode == "managed":
            self._managed(name, args)
        elif args.mode == "shared":
            self._shared(name, args)
        elif args.mode != "none":
            raise FleetError(
                f"vllm-fleet:monitoring.mode = {args.mode!r}: use self-hosted, managed, shared or none"
            )
        self.register_outputs({**self.stack_outputs(), "mode": args.mode})

    def stack_outputs(self) -> dict[str, pulumi.Output[Any]]:
        """What the program exports (and what a ``shared`` fleet reads back): only known parts."""
        values = {
            OUTPUT_GRAFANA_URL: self.grafana_url,
            OUTPUT_PROMETHEUS_URL: self.prometheus_url,
            OUTPUT_GRAFANA_SECRET_ARN: self.grafana_admin_secret_arn,
            OUTPUT_SECURITY_GROUP_ID: self.security_group_id,
            OUTPUT_AMP_ENDPOINT: self.amp_endpoint,
        }
        return {key: value for key, value in values.items() if value is not None}

    # --- self-hosted ----------------------------------------------------------------------
    def _self_hosted(self, name: str, args: MonitoringArgs) -> None:
        spec = _require_spec(args)
        if args.vpc_id is None or args.subnet_id is None:
            raise FleetError("monitoring mode self-hosted: the host needs vpc_id and a private subnet_id")
        # Every check that can fail runs before the first resource is declared.
        networks = check_allowed_cidrs(args.allowed_cidrs)
        check_host_layout(spec)
        files = render_monitoring(spec)
        for rel in files:
            host_destination(rel, spec.grafana_dashboards_dir)
        objects = config_objects(files)
        hspec = host_spec(spec)
        user_data = encode_user_data(render_host_user_data(hspec), what="monitoring host user-data")
        facts = host_facts()
        ports = facts.ports.value
        child = pulumi.ResourceOptions(parent=self)
        tags = {**args.tags, ROLE_TAG: "monitoring"}
        stack = args.stack

        # --- Grafana's admin password ---------------------------------------------------
        grafana_admin = GeneratedSecret(
            f"{name}-grafana",
            GeneratedSecretArgs(
                secret_name=hspec.grafana_admin_secret_id,
                description=f"Grafana admin password of the {stack} monitoring host (read by its instance role)",
                length=GRAFANA_PASSWORD_LENGTH,
                tags=tags,
                recovery_window_days=args.secret_recovery_window_days,
                password_resource_name=f"{name}-grafana-password",
                version_resource_name=f"{name}-grafana-secret-version",
            ),
            opts=child,
        )
        secret, secret_version = grafana_admin.secret, grafana_admin.version

        # --- the monitoring content in S3 -----------------------------------------------
        config_bucket = PrivateBucket(
            f"{name}-config",
            PrivateBucketArgs(
                bucket_prefix="vllm-fleet-monitoring-",
                # Only rendered files live here; they are re-rendered on every deploy.
                force_destroy=True,
                tags={**tags, "Name": f"{stack}-monitoring-config"},
            ),
            opts=child,
        )
        bucket, public_access_block = config_bucket.bucket, config_bucket.public_access_block
        aws.s3.BucketPolicy(
            f"{name}-config-tls-only",
            bucket=bucket.id,
            policy=bucket.arn.apply(lambda arn: json.dumps(tls_only_bucket_policy(arn))),
            # S3 answers OperationAborted to a bucket policy written while the bucket's public
            # access block is still being applied: one after the other.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[public_access_block]),
        )
        prefix = f"{stack}/"
        object_tags = {k: v for k, v in args.tags.items() if k in REQUIRED_TAG_KEYS}
        if len(object_tags) > S3_OBJECT_TAG_LIMIT:
            raise FleetError(
                f"monitoring config objects: {len(object_tags)} tags; S3 allows {S3_OBJECT_TAG_LIMIT}"
            )
        file_objects = []
        manifest_key = MANIFEST_NAME
        for key, content in objects.items():
            if key == manifest_key:
                continue
            file_objects.append(
                aws.s3.BucketObjectv2(
                    f"{name}-config-{key.replace('/', '-')}",
                    bucket=bucket.id,
                    key=f"{prefix}{key}",
                    content=content,
                    content_type=_content_type(key),
                    tags=object_tags,
                    opts=child,
                )
            )
        # Written after every file, so a host that sees the new manifest finds the new files.
        manifest = aws.s3.BucketObjectv2(
            f"{name}-config-manifest",
            bucket=bucket.id,
            key=f"{prefix}{manifest_key}",
            content=objects[manifest_key],
            content_type="text/plain",
            tags=object_tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=file_objects),
        )

        # --- identity: exactly what Prometheus, Alertmanager, Grafana and the sync call -----
        role, profile = ssm_instance_role(
            f"{name}-host", description=f"Monitoring host of {stack}", name_tag=f"{stack}-monitoring",
            partition=args.partition, tags=tags, opts=child,
        )
        policy = aws.iam.RolePolicy(
            f"{name}-host-policy",
            role=role.id,
            policy=pulumi.Output.all(secret.arn, bucket.bucket).apply(
                lambda values: json.dumps(
                    host_policy_document(
                        HostPolicyInputs(
                            partition=args.partition,
                            grafana_secret_arn=values[0],
                            config_bucket=values[1],
                            config_prefix=prefix,
                            sns_topic_arn=spec.sns_topic_arn,
                        )
                    ),
                    indent=2,
                )
            ),
            opts=child,
        )

        # --- network: Grafana and Prometheus from the allowed CIDRs only -----------------
        sg = security_group(
            f"{name}-host-sg", vpc_id=args.vpc_id, name_tag=f"{stack}-monitoring", tags=tags, opts=child,
            description=f"Monitoring host of {stack}: Grafana and Prometheus from allowed CIDRs, no SSH",
        )
        rules = SecurityGroupRules(name, sg.id, tags, child)
        for network in networks:
            for service, port in (("grafana", ports.grafana), ("prometheus", ports.prometheus)):
                key = f"{service}-{str(network).replace('/', '-').replace(':', '-').replace('.', '-')}"
                rules.ingress(
                    key, f"{service} from {network}", ports=port, cidr=str(network), ipv6=network.version == 6
                )
        for port in egress_ports(spec.webhook_url):
            what = (
                "AWS APIs, SNS, release downloads, Grafana repository" if port == HTTPS_PORT else "alert webhook"
            )
            rules.egress(str(port), what, ports=port, cidr="0.0.0.0/0")

        # --- the host --------------------------------------------------------------------
        instance_facts = facts.instance_type.value
        volume = facts.root_volume.value
        ami = (
            args.ami_id
            or aws.ssm.get_parameter_output(
                name=facts.ami_ssm_parameter.value, opts=pulumi.InvokeOutputOptions(parent=self)
            ).value
        )
        security_groups: list[pulumi.Input[str]] = [sg.id]
        if args.scraper_security_group_id is not None:
            security_groups.append(args.scraper_security_group_id)
        own_tags = {**host_tags(args.tags, spec), **args.extra_host_tags}
        instance = aws.ec2.Instance(
            f"{name}-host",
            ami=ami,
            instance_type=instance_facts.name,
            subnet_id=args.subnet_id,
            vpc_security_group_ids=security_groups,
            associate_public_ip_address=False,
            iam_instance_profile=profile.name,
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",
                http_put_response_hop_limit=1,
                # The sync reads the config location from the instance's tag.
                instance_metadata_tags="enabled",
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type="gp3",
                volume_size=volume.size_gib,
                encrypted=True,
                delete_on_termination=True,
                tags={**own_tags, "Name": f"{stack}-monitoring"},
            ),
            user_data_base64=user_data,
            # New host software means a new host; the content changes in place through S3.
            user_data_replace_on_change=True,
            tags={
                **own_tags,
                "Name": f"{stack}-monitoring",
                CONFIG_URI_TAG: bucket.bucket.apply(lambda b: f"s3://{b}/{prefix}"),
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[manifest, secret_version, policy],
                # A newer AL2023 image must not replace the host and its metrics history; take
                # it deliberately (pulumi up --replace) when wanted.
                ignore_changes=["ami"],
                # Prometheus's TSDB lives on the host's root volume, which a replacement (new
                # host software: user_data_replace_on_change) or a deletion wipes: Pulumi refuses
                # both until someone runs `pulumi state unprotect` (docs/day2.md).
                protect=True,
            ),
        )
        self.grafana_url = instance.private_ip.apply(lambda ip: f"http://{ip}:{ports.grafana}")
        self.prometheus_url = instance.private_ip.apply(lambda ip: f"http://{ip}:{ports.prometheus}")
        self.grafana_admin_secret_arn = secret.arn
        self.security_group_id = sg.id
        self.config_bucket = bucket.bucket
        self.host_instance_id = instance.id

    # --- managed --------------------------------------------------------------------------
    def _managed(self, name: str, args: MonitoringArgs) -> None:
        spec = _require_spec(args)
        files = render_monitoring(spec)
        definition = amp_alertmanager_definition(files["alertmanager.yml"])
        check_node_agent(spec, nodes_per_replica=args.nodes_per_replica)
        child = pulumi.ResourceOptions(parent=self)
        tags = {**args.tags, ROLE_TAG: "monitoring"}
        stack = args.stack
        workspace = aws.amp.Workspace(
            f"{name}-amp",
            alias=f"vllm-fleet-{stack}",
            tags={**tags, "Name": f"{stack}-metrics"},
            opts=child,
        )
        aws.amp.RuleGroupNamespace(
            f"{name}-amp-rules",
            name="vllm-fleet",
            workspace_id=workspace.id,
            data=files[RULES_FILE],
            tags=tags,
            opts=child,
        )
        aws.amp.AlertManagerDefinition(
            f"{name}-amp-alertmanager",
            workspace_id=workspace.id,
            definition=definition,
            opts=child,
        )
        grafana_role = aws.iam.Role(
            f"{name}-grafana-role",
            description=f"Amazon Managed Grafana workspace of {stack}",
            assume_role_policy=json.dumps(
                assume_role_policy("grafana.amazonaws.com", source_account=args.account_id)
            ),
            tags={**tags, "Name": f"{stack}-grafana"},
            opts=child,
        )
        aws.iam.RolePolicy(
            f"{name}-grafana-policy",
            role=grafana_role.id,
            policy=workspace.arn.apply(
                lambda arn: json.dumps(grafana_workspace_policy_document(arn), indent=2)
            ),
            opts=child,
        )
        grafana = aws.grafana.Workspace(
            f"{name}-grafana",
            name=f"vllm-fleet-{stack}",
            description=f"Dashboards of vLLM fleet {stack}",
            account_access_type="CURRENT_ACCOUNT",
            authentication_providers=["AWS_SSO"],
            # Our role with our least-privilege policy, not the service's generated ones.
            permission_type="CUSTOMER_MANAGED",
            data_sources=["PROMETHEUS", "CLOUDWATCH"],
            role_arn=grafana_role.arn,
            tags={**tags, "Name": f"{stack}-grafana"},
            opts=child,
        )
        self.grafana_url = grafana.endpoint.apply(lambda host: f"https://{host}")
        self.amp_endpoint = workspace.prometheus_endpoint
        self.amp_workspace_arn = workspace.arn
        self.node_remote_write_policy = workspace.arn.apply(
            lambda arn: json.dumps(remote_write_policy_document(arn), indent=2)
        )
        self.node_agent_files = workspace.prometheus_endpoint.apply(
            lambda endpoint: render_node_agent(
                spec, remote_write_url(endpoint), nodes_per_replica=args.nodes_per_replica
            )
        )

    # --- shared ---------------------------------------------------------------------------
    def _shared(self, name: str, args: MonitoringArgs) -> None:
        if not args.shared_stack:
            raise FleetError(
                "vllm-fleet:monitoring.sharedStack: required with mode shared (org/project/stack)"
            )
        if args.shared_stack.split("/")[-1] == args.stack:
            raise FleetError(
                f"vllm-fleet:monitoring.sharedStack = {args.shared_stack!r}: a stack cannot share its own monitoring"
            )
        ref = pulumi.StackReference(
            f"{name}-shared", stack_name=args.shared_stack, opts=pulumi.ResourceOptions(parent=self)
        )
        self.grafana_url = ref.require_output(OUTPUT_GRAFANA_URL)
        self.prometheus_url = ref.require_output(OUTPUT_PROMETHEUS_URL)
        self.grafana_admin_secret_arn = ref.require_output(OUTPUT_GRAFANA_SECRET_ARN)
        self.security_group_id = ref.require_output(OUTPUT_SECURITY_GROUP_ID)


def _require_spec(args: MonitoringArgs) -> MonitoringSpec:
    if args.spec is None:
        raise FleetError(
            f"monitoring mode {args.mode}: needs the fleet's MonitoringSpec (infra.render.stack.monitoring_spec)"
        )
    return args.spec


def _content_type(key: str) -> str:
    return (
        "application/json"
        if key.endswith(".json")
        else "application/yaml"
        if key.endswith((".yml", ".yaml"))
        else "text/plain"
    )
