"""PrivateBucket: an S3 bucket no one outside the account reads: every public access blocked,
every object encrypted at rest (SSE-S3, or SSE-KMS with a key).

Its three resources were first declared directly in the component that now holds the
PrivateBucket; they carry an alias to that parent, so their URNs (and the buckets) stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws


@dataclass(frozen=True)
class PrivateBucketArgs:
    bucket_prefix: str
    tags: Mapping[str, str]
    # True only for buckets whose objects are all re-created on every deploy.
    force_destroy: bool = False
    # Keep the bucket and its guards when the stack lets go of them (objects that outlive it).
    retain_on_delete: bool = False
    kms_key_arn: pulumi.Input[str] | None = None  # None: SSE-S3 (AES256)
    bucket_key_enabled: bool | None = None
    # The resources' names: "<name>", "<name>-private", "<name>-encryption" unless given
    # (resources declared before this component existed keep theirs).
    public_access_block_name: str | None = None
    encryption_name: str | None = None


class PrivateBucket(pulumi.ComponentResource):
    bucket: aws.s3.Bucket
    public_access_block: aws.s3.BucketPublicAccessBlock

    def __init__(self, name: str, args: PrivateBucketArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:storage:PrivateBucket", name, None, opts)
        child = pulumi.ResourceOptions(
            parent=self,
            retain_on_delete=args.retain_on_delete or None,
            aliases=moved_from(opts),
        )
        self.bucket = aws.s3.Bucket(
            name,
            bucket_prefix=args.bucket_prefix,
            force_destroy=args.force_destroy,
            tags=dict(args.tags),
            opts=child,
        )
        self.public_access_block = aws.s3.BucketPublicAccessBlock(
            args.public_access_block_name or f"{name}-private",
            bucket=self.bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            args.encryption_name or f"{name}-encryption",
            bucket=self.bucket.id,
            rules=[
                aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="aws:kms" if args.kms_key_arn is not None else "AES256",
                        kms_master_key_id=args.kms_key_arn,
                    ),
                    bucket_key_enabled=args.bucket_key_enabled,
                )
            ],
            opts=child,
        )
        self.register_outputs({"bucket": self.bucket.bucket, "arn": self.bucket.arn})


def moved_from(opts: pulumi.ResourceOptions | None) -> list[pulumi.Alias]:
    """An alias to the URN a child had when it was declared directly in this component's
    parent (or at the stack's root): a new component in between is then no replacement."""
    parent = opts.parent if opts is not None else None
    return [pulumi.Alias(parent=parent if parent is not None else pulumi.ROOT_STACK_RESOURCE)]
