"""The public listener's path allowlist (infra/ops/public_api.yaml), for the ALB and haproxy.

``alb_path_patterns()`` goes into the ALB listener rule's path-pattern condition (forward),
with a fixed-response ``denied_status`` as the listener's default action. The same list,
translated to anchored regular expressions by ``path_regex``, drives the local haproxy that
stands in for the ALB in tests and CI smoke runs, so the two cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

ALLOWLIST_FILE = Path(__file__).with_name("public_api.yaml")
# ALB: "The maximum size of each string is 128 characters."
ALB_PATTERN_MAX_CHARS = 128


class PublicApi(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=8)
    read: dt.date
    path_patterns: list[str] = Field(min_length=1)
    denied_status: int = Field(ge=400, le=499)

    @field_validator("path_patterns")
    @classmethod
    def _alb_patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("/") or len(value) > ALB_PATTERN_MAX_CHARS:
                raise ValueError(f"{value!r}: an ALB path pattern starts with / and has at most 128 characters")
        return values


@cache
def public_api() -> PublicApi:
    return PublicApi.model_validate(yaml.safe_load(ALLOWLIST_FILE.read_text(encoding="utf-8")))


def alb_path_patterns() -> list[str]:
    return list(public_api().path_patterns)


def path_regex(pattern: str) -> str:
    """An ALB path pattern as an anchored regex: '*' → '.*', '?' → '.', the rest literal."""
    return "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + "$"


def is_public_path(path: str) -> bool:
    """Would the public listener forward this path (query string ignored, as the ALB does)?"""
    only_path = path.split("?", 1)[0]
    return any(re.fullmatch(path_regex(p), only_path) for p in public_api().path_patterns)
