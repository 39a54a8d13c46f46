"""The stack's config as the Pulumi engine hands it to a real ``pulumi up``: the same keys, and
the same parser (infra/config.py), as ``vllm-fleet plan`` reads from the stack file."""

from __future__ import annotations

import json
from typing import Any

import pulumi
from pulumi.runtime import config as runtime_config

from infra.config import ImagesStackConfig, StackConfig, parse_any_stack_config


def load_from_pulumi() -> StackConfig | ImagesStackConfig:
    """Read the same keys through ``pulumi.Config`` during a real ``pulumi up``."""
    values: dict[str, Any] = {}
    for key, raw in runtime_config.get_config_env().items():
        try:
            values[key] = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            values[key] = raw
    aws_region = pulumi.Config("aws").get("region")
    if aws_region:
        values["aws:region"] = aws_region
    return parse_any_stack_config(pulumi.get_stack(), values)
