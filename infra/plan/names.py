"""Names that fit AWS's length limits (aws_fleet.yaml ``name_limits``): pure, shared by the
components that build names and the policy pack that checks them."""

from __future__ import annotations

import hashlib

from infra.facts.aws import aws_fleet_facts

DIGEST_CHARS = 8


def name_limit(resource_type: str, prop: str) -> int | None:
    return aws_fleet_facts().name_limits.value.get(resource_type, {}).get(prop)


def fit_prefix(prefix: str, resource_type: str, prop: str) -> str:
    """``prefix`` as it is when it fits; otherwise cut, with a digest of the whole so two long
    names that share their start stay distinct, ending in "-" like the prefix did."""
    limit = name_limit(resource_type, prop)
    assert limit is not None, f"no name limit for {resource_type} {prop} in aws_fleet.yaml"
    if len(prefix) <= limit:
        return prefix
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:DIGEST_CHARS]
    return f"{prefix[: limit - DIGEST_CHARS - 2].rstrip('-.')}-{digest}-"
