"""The vLLM AMI: an EC2 Image Builder pipeline that bakes the pinned vLLM onto the DLAMI base.

What it declares, all parented to one ``vllm-fleet:images:VllmImage`` component:

* a private, encrypted S3 bucket holding ``images/scripts/*.sh`` under a content-addressed
  prefix (the component documents ``S3Download`` them);
* one Image Builder Component per AWSTOE document the image needs (``infra.plan.images.plan_image``
  decides which), ``skip_destroy`` so older versions stay usable, version derived from the
  document's and its scripts' content, because a component version is immutable;
* the ImageRecipe: parent image ``ssm:<DLAMI public parameter>`` (resolved by Image Builder at
  each build, so pipeline runs pick up new DLAMI releases; CreateImageRecipe's parentImage takes
  "an SSM parameter, prefixed by ssm:, followed by the parameter name or ARN", see
  images/facts.yaml ``image_builder.source``), the components with their
  parameters, and an encrypted gp3 root volume sized as the base AMI's root snapshot (read
  from the AMI at deploy time) plus what the bake adds (venv, caches, staged weights);
* an InfrastructureConfiguration: build instance profile with EC2InstanceProfileForImageBuilder
  and AmazonSSMManagedInstanceCore plus read access to exactly the scripts (and weights/secret)
  it needs, IMDSv2 required, a GPU build instance type, terminate on failure;
* a DistributionConfiguration that writes the new AMI id into SSM
  (``/vllm-fleet/images/<name>/ami-id``, data type ``aws:ec2:image``), where launch templates
  read it;
* the ImagePipeline, and optionally an ``aws.imagebuilder.Image`` so ``pulumi up`` builds once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.components.private_bucket import PrivateBucket, PrivateBucketArgs
from infra.facts.images import ImageFacts, default_facts
from infra.plan.capacity import root_snapshot_gib
from infra.plan.iam import policy_document
from infra.plan.images import SCRIPTS_PREFIX_PARAMETER, ImagePlan, ImageSpec, plan_image, root_volume_gib
from infra.plan.names import fit_prefix
from infra.plan.tags import IMAGE_TAG

COMPONENT_TYPE = "vllm-fleet:images:VllmImage"
# The build instance runs no containers: the metadata token need not cross a network hop.
IMDS_HOP_LIMIT = 1
# Image Builder's own default is 720 minutes; the test stage launches the new AMI and runs the
# test phases (vLLM import, serve --help, exporters serving), well under two hours.
IMAGE_TESTS_TIMEOUT_MINUTES = 120
# A GPU build with CUDA wheels (and optionally weights and a pre-warm) takes hours, not minutes.
# Bounded by the images workflow: its job (6 h, GitHub's maximum for hosted runners) and role
# session must outlast `pulumi up`'s wait, or the update is killed midway
# (tests/test_workflows.py checks the three together).
IMAGE_BUILD_TIMEOUT = "5h"
SCRIPTS_KEY_PREFIX = "bake-scripts"


@dataclass(frozen=True)
class VllmImageArgs:
    """Inputs of :class:`VllmImage`."""

    spec: ImageSpec
    # Where the build instance runs; None: Image Builder's default VPC and security group.
    subnet_id: pulumi.Input[str] | None = None
    security_group_ids: Sequence[pulumi.Input[str]] | None = None
    # Customer-managed KMS key for the root volume, the AMI and the scripts bucket; None: AWS-managed keys.
    kms_key_arn: pulumi.Input[str] | None = None
    # Build one image during `pulumi up` (hours on a GPU instance); otherwise run the pipeline.
    build_on_deploy: bool = False
    # Pipeline schedule, e.g. "cron(0 6 ? * mon *)"; None: builds only when started.
    schedule_expression: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


def _policy(statements: list[dict[str, Any]]) -> str:
    return json.dumps(policy_document(*statements), sort_keys=True)


class VllmImage(pulumi.ComponentResource):
    """Image Builder pipeline for one vLLM node image."""

    ami_ssm_parameter_name: str
    pipeline_arn: pulumi.Output[str]
    recipe_arn: pulumi.Output[str]
    image_ami_id: pulumi.Output[str | None] | None
    component_versions: dict[str, str]

    def __init__(
        self,
        name: str,
        args: VllmImageArgs,
        opts: pulumi.ResourceOptions | None = None,
        *,
        facts: ImageFacts | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        facts = facts or default_facts()
        plan = plan_image(args.spec, facts)
        spec = plan.spec
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOutputOptions(parent=self)
        tags = {**args.tags, IMAGE_TAG: spec.name}
        resource_base = f"vllm-fleet-{spec.name}"

        region = aws.get_region_output(opts=invoke).region
        account_id = aws.get_caller_identity_output(opts=invoke).account_id
        # ARNs name the partition the stack runs in (aws, aws-cn, aws-us-gov), never a literal.
        partition = aws.get_partition_output(opts=invoke).partition

        # -- the bake scripts, content-addressed so each component version keeps its scripts --
        # Older component versions (skip_destroy) keep pointing at their scripts, so the scripts
        # outlive the stack (retain_on_delete), and so must their bucket and its guards: a
        # force_destroy bucket would delete the retained objects with it.
        bake_scripts = f"{name}-bake-scripts"
        bucket = PrivateBucket(
            bake_scripts,
            PrivateBucketArgs(
                bucket_prefix=fit_prefix(f"{resource_base}-bake-", "aws:s3/bucket:Bucket", "bucketPrefix"),
                tags=tags,
                force_destroy=False,
                retain_on_delete=True,
                kms_key_arn=args.kms_key_arn,
                bucket_key_enabled=args.kms_key_arn is not None,
                public_access_block_name=bake_scripts,
                encryption_name=bake_scripts,
            ),
            opts=pulumi.ResourceOptions(parent=self),
        ).bucket
        scripts_key = f"{SCRIPTS_KEY_PREFIX}/{plan.scripts_sha256[:16]}"
        for script_name, content in plan.scripts.items():
            aws.s3.BucketObjectv2(
                f"{name}-script-{script_name.removesuffix('.sh')}",
                bucket=bucket.id,
                key=f"{scripts_key}/{script_name}",
                content=content.decode("utf-8"),
                content_type="text/x-shellscript",
                tags=tags,
                # Older component versions (skip_destroy) still point at their scripts.
                opts=pulumi.ResourceOptions(parent=self, retain_on_delete=True),
            )
        scripts_prefix = pulumi.Output.concat("s3://", bucket.id, f"/{scripts_key}")

        # -- the build instance's identity --
        role = aws.iam.Role(
            f"{name}-build",
            name_prefix=fit_prefix(f"{resource_base}-build-", "aws:iam/role:Role", "namePrefix"),
            description=f"Image Builder build/test instances for the {spec.name} vLLM image",
            assume_role_policy=_policy(
                [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "ec2.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ]
            ),
            tags=tags,
            opts=child,
        )
        # By name in the stack's partition (the ManagedPolicy enum's values are aws-partition ARNs).
        for short, managed_policy in (
            ("imagebuilder", "EC2InstanceProfileForImageBuilder"),
            ("ssm", "AmazonSSMManagedInstanceCore"),
        ):
            aws.iam.RolePolicyAttachment(
                f"{name}-build-{short}",
                role=role.name,
                policy_arn=pulumi.Output.concat("arn:", partition, f":iam::aws:policy/{managed_policy}"),
                opts=child,
            )
        aws.iam.RolePolicy(
            f"{name}-build-reads",
            role=role.id,
            policy=pulumi.Output.all(bucket.arn, partition, region, account_id).apply(
                lambda values: _policy(self._read_statements(plan, values[0], values[1], values[2], values[3]))
            ),
            opts=child,
        )
        if args.kms_key_arn is not None:
            aws.iam.RolePolicy(
                f"{name}-build-kms",
                role=role.id,
                policy=pulumi.Output.from_input(args.kms_key_arn).apply(
                    lambda key: _policy(
                        [
                            {
                                "Effect": "Allow",
                                "Action": ["kms:Decrypt", "kms:GenerateDataKey*", "kms:DescribeKey"],
                                "Resource": key,
                            }
                        ]
                    )
                ),
                opts=child,
            )
        profile = aws.iam.InstanceProfile(
            f"{name}-build",
            name_prefix=fit_prefix(f"{resource_base}-build-", "aws:iam/instanceProfile:InstanceProfile", "namePrefix"),
            role=role.name,
            tags=tags,
            opts=child,
        )

        # -- components --
        node_max = facts.image_builder.semantic_version_node_max
        components: list[tuple[str, aws.imagebuilder.Component]] = []
        for planned in plan.components:
            component = aws.imagebuilder.Component(
                f"{name}-{planned.key}",
                name=f"{resource_base}-{planned.key}",
                platform="Linux",
                version=planned.version,
                data=planned.source.text,
                description=planned.source.document.description,
                change_description=f"content sha256 {planned.source.content_sha256[:16]}",
                kms_key_id=args.kms_key_arn,
                skip_destroy=True,
                tags=tags,
                opts=child,
            )
            components.append((planned.key, component))
        self.component_versions = {planned.key: planned.version for planned in plan.components}

        # -- the recipe: DLAMI parent via SSM, encrypted gp3 root sized for the bake --
        base_ami_id = aws.ssm.get_parameter_output(name=plan.base_image_ssm_parameter, opts=invoke).value
        base_ami = aws.ec2.get_ami_output(
            owners=["amazon"],
            most_recent=True,
            filters=base_ami_id.apply(lambda ami: [aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami])]),
            opts=invoke,
        )
        root_device = base_ami.root_device_name
        volume_gib = pulumi.Output.all(base_ami.root_device_name, base_ami.block_device_mappings).apply(
            lambda values: root_volume_gib(root_snapshot_gib(values[0], values[1]), plan.extra_root_gib)
        )
        recipe_version = pulumi.Output.all(volume_gib, bucket.id).apply(
            lambda values: plan.recipe_version(int(values[0]), node_max, salt=str(values[1]))
        )
        recipe = aws.imagebuilder.ImageRecipe(
            f"{name}-recipe",
            name=resource_base,
            version=recipe_version,
            parent_image=plan.parent_image,
            description=f"vLLM {plan.pin.version} ({plan.pin.gpu_package}) on {spec.base_image} DLAMI base",
            components=[
                aws.imagebuilder.ImageRecipeComponentArgs(
                    component_arn=component.arn,
                    parameters=[
                        aws.imagebuilder.ImageRecipeComponentParameterArgs(
                            name=SCRIPTS_PREFIX_PARAMETER, value=scripts_prefix
                        ),
                        *(
                            aws.imagebuilder.ImageRecipeComponentParameterArgs(name=param, value=value)
                            for param, value in sorted(_parameters(plan, key).items())
                        ),
                    ],
                )
                for key, component in components
            ],
            block_device_mappings=[
                aws.imagebuilder.ImageRecipeBlockDeviceMappingArgs(
                    device_name=root_device,
                    ebs=aws.imagebuilder.ImageRecipeBlockDeviceMappingEbsArgs(
                        delete_on_termination="true",
                        encrypted="true",
                        kms_key_id=args.kms_key_arn,
                        volume_size=volume_gib,
                        volume_type="gp3",
                    ),
                )
            ],
            systems_manager_agent=aws.imagebuilder.ImageRecipeSystemsManagerAgentArgs(
                uninstall_after_build=False
            ),
            tags=tags,
            opts=child,
        )

        infrastructure = aws.imagebuilder.InfrastructureConfiguration(
            f"{name}-infrastructure",
            name=resource_base,
            description=f"GPU build instances for the {spec.name} vLLM image",
            instance_profile_name=profile.name,
            instance_types=[spec.build_instance_type],
            subnet_id=args.subnet_id,
            security_group_ids=args.security_group_ids,
            terminate_instance_on_failure=True,
            instance_metadata_options=aws.imagebuilder.InfrastructureConfigurationInstanceMetadataOptionsArgs(
                http_tokens="required", http_put_response_hop_limit=IMDS_HOP_LIMIT
            ),
            resource_tags=tags,
            tags=tags,
            opts=child,
        )

        self.ami_ssm_parameter_name = plan.ami_ssm_parameter_name
        distribution = aws.imagebuilder.DistributionConfiguration(
            f"{name}-distribution",
            name=resource_base,
            description=f"Publishes the {spec.name} vLLM AMI id to SSM {plan.ami_ssm_parameter_name}",
            distributions=[
                aws.imagebuilder.DistributionConfigurationDistributionArgs(
                    region=region,
                    ami_distribution_configuration=aws.imagebuilder.DistributionConfigurationDistributionAmiDistributionConfigurationArgs(
                        name=f"{resource_base}-{{{{ imagebuilder:buildDate }}}}",
                        description=f"vLLM {plan.pin.version} node image ({spec.name})",
                        kms_key_id=args.kms_key_arn,
                        ami_tags={**tags, "vllm-fleet:vllm-version": plan.pin.version},
                    ),
                    ssm_parameter_configurations=[
                        aws.imagebuilder.DistributionConfigurationDistributionSsmParameterConfigurationArgs(
                            parameter_name=plan.ami_ssm_parameter_name,
                            data_type=plan.ami_ssm_parameter_data_type,
                        )
                    ],
                )
            ],
            tags=tags,
            opts=child,
        )

        tests = aws.imagebuilder.ImagePipelineImageTestsConfigurationArgs(
            image_tests_enabled=True, timeout_minutes=IMAGE_TESTS_TIMEOUT_MINUTES
        )
        pipeline = aws.imagebuilder.ImagePipeline(
            f"{name}-pipeline",
            name=resource_base,
            description=f"Bakes vLLM {plan.pin.version} onto the {spec.base_image} DLAMI base",
            image_recipe_arn=recipe.arn,
            infrastructure_configuration_arn=infrastructure.arn,
            distribution_configuration_arn=distribution.arn,
            image_tests_configuration=tests,
            enhanced_image_metadata_enabled=True,
            schedule=(
                aws.imagebuilder.ImagePipelineScheduleArgs(schedule_expression=args.schedule_expression)
                if args.schedule_expression
                else None
            ),
            status="ENABLED",
            tags=tags,
            opts=child,
        )
        self.pipeline_arn = pipeline.arn
        self.recipe_arn = recipe.arn

        self.image_ami_id = None
        if args.build_on_deploy:
            image = aws.imagebuilder.Image(
                f"{name}-image",
                image_recipe_arn=recipe.arn,
                infrastructure_configuration_arn=infrastructure.arn,
                distribution_configuration_arn=distribution.arn,
                image_tests_configuration=aws.imagebuilder.ImageImageTestsConfigurationArgs(
                    image_tests_enabled=True, timeout_minutes=IMAGE_TESTS_TIMEOUT_MINUTES
                ),
                enhanced_image_metadata_enabled=True,
                tags=tags,
                opts=pulumi.ResourceOptions(
                    parent=self, custom_timeouts=pulumi.CustomTimeouts(create=IMAGE_BUILD_TIMEOUT)
                ),
            )
            self.image_ami_id = image.output_resources.apply(
                lambda resources: resources[0].amis[0].image if resources and resources[0].amis else None
            )

        self.register_outputs(
            {
                "amiSsmParameterName": self.ami_ssm_parameter_name,
                "pipelineArn": self.pipeline_arn,
                "recipeArn": self.recipe_arn,
                "componentVersions": self.component_versions,
                **({"imageAmiId": self.image_ami_id} if self.image_ami_id is not None else {}),
            }
        )

    @staticmethod
    def _read_statements(
        plan: ImagePlan, scripts_bucket_arn: str, partition: str, region: str, account_id: str
    ) -> list[dict[str, Any]]:
        """What the build instance may read: its scripts, and the weights source / HF token if any."""
        statements: list[dict[str, Any]] = [
            {
                "Sid": "BakeScripts",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": f"{scripts_bucket_arn}/{SCRIPTS_KEY_PREFIX}/*",
            }
        ]
        weights = plan.spec.weights
        if weights is not None and weights.source.startswith("s3://"):
            bucket, _, prefix = weights.source.removeprefix("s3://").partition("/")
            statements += [
                {
                    "Sid": "WeightsList",
                    "Effect": "Allow",
                    "Action": ["s3:ListBucket"],
                    "Resource": f"arn:{partition}:s3:::{bucket}",
                    "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
                },
                {
                    "Sid": "WeightsRead",
                    "Effect": "Allow",
                    "Action": ["s3:GetObject"],
                    "Resource": f"arn:{partition}:s3:::{bucket}/{prefix}*",
                },
            ]
        if weights is not None and weights.hf_token_secret_id:
            secret = weights.hf_token_secret_id
            # A name matches its ARN plus the 6-character suffix Secrets Manager appends.
            resource = (
                secret
                if secret.startswith("arn:")
                else f"arn:{partition}:secretsmanager:{region}:{account_id}:secret:{secret}-??????"
            )
            statements.append(
                {
                    "Sid": "HfToken",
                    "Effect": "Allow",
                    "Action": ["secretsmanager:GetSecretValue"],
                    "Resource": resource,
                }
            )
        return statements


def _parameters(plan: ImagePlan, key: str) -> dict[str, str]:
    return next(c.parameters for c in plan.components if c.key == key)
