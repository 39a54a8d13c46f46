"""GeneratedSecret: a random password that Pulumi generates and Secrets Manager keeps, for a
role to read at boot (never in user-data, argv or tags).

Its three resources were first declared directly in the component that now holds the
GeneratedSecret; they carry an alias to that parent, so their URNs (and the secret) stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.components.private_bucket import moved_from


@dataclass(frozen=True)
class GeneratedSecretArgs:
    secret_name: str
    description: str
    # [A-Za-z0-9] only, at least 4 of each kind: safe in a header or a YAML file without quoting.
    length: int
    tags: Mapping[str, str]
    recovery_window_days: int
    kms_key_id: str | None = None  # None: the account's aws/secretsmanager key
    # Keep the secret from being deleted (a destroy, or a replacement) while clients hold it.
    protect: bool = False
    # Pulumi writes the first value only; later versions belong to a rotation outside Pulumi.
    write_once: bool = False
    # The resources' names: "<name>-value", "<name>-secret", "<name>-version" unless given
    # (resources declared before this component existed keep theirs).
    password_resource_name: str | None = None
    version_resource_name: str | None = None


class GeneratedSecret(pulumi.ComponentResource):
    password: random.RandomPassword
    secret: aws.secretsmanager.Secret
    version: aws.secretsmanager.SecretVersion

    def __init__(self, name: str, args: GeneratedSecretArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("vllm-fleet:secrets:GeneratedSecret", name, None, opts)
        aliases = moved_from(opts)
        self.password = random.RandomPassword(
            args.password_resource_name or f"{name}-value",
            length=args.length,
            special=False,
            min_lower=4,
            min_upper=4,
            min_numeric=4,
            opts=pulumi.ResourceOptions(parent=self, aliases=aliases),
        )
        self.secret = aws.secretsmanager.Secret(
            f"{name}-secret",
            name=args.secret_name,
            description=args.description,
            recovery_window_in_days=args.recovery_window_days,
            kms_key_id=args.kms_key_id,
            tags={**args.tags, "Name": args.secret_name},
            opts=pulumi.ResourceOptions(parent=self, aliases=aliases, protect=args.protect or None),
        )
        self.version = aws.secretsmanager.SecretVersion(
            args.version_resource_name or f"{name}-version",
            secret_id=self.secret.id,
            secret_string=self.password.result,
            opts=pulumi.ResourceOptions(
                parent=self,
                aliases=aliases,
                additional_secret_outputs=["secretString"],
                # secret_string is ForceNew (provider_replacements.yaml), and a new version
                # becomes AWSCURRENT: a new value here would make a value that rotation retired
                # (or never issued) current again. So, when rotation owns it, it is never diffed.
                ignore_changes=["secretString"] if args.write_once else None,
            ),
        )
        self.register_outputs({"secretArn": self.secret.arn, "secretName": self.secret.name})
