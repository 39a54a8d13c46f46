"""Cloud-init user-data as EC2 takes it, and back: the one encoder and decoder.

EC2 takes at most 16 KB of user data before base64 (RequestLaunchTemplateData.UserData, "User
data is limited to 16 KB"; infra/facts/data, ``user_data_max_bytes``). A node's units and
scripts are larger than that as text, so launch templates and the monitoring host get them
gzipped: cloud-init inflates gzip user data before parsing it (help.ubuntu.com/community/CloudInit,
"Gzip Compressed Content").
"""

from __future__ import annotations

import base64
import binascii
import gzip

from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.plan.stack import StackPlan
from infra.render.node import render_user_data

GZIP_MAGIC = b"\x1f\x8b"


def encode_user_data(text: str, *, what: str) -> str:
    """``text`` gzipped at level 9, then base64: what ``user_data`` of a launch template and
    ``user_data_base64`` of an instance take. ``mtime=0`` keeps the bytes stable, so an
    unchanged render never shows a Pulumi diff. ``what`` names the user-data in the error
    raised when it is over EC2's limit."""
    packed = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    limit = aws_fleet_facts().user_data_max_bytes.value
    if len(packed) > limit:
        raise FleetError(
            f"{what}: {len(packed)} bytes gzipped ({len(text.encode())} as text); EC2 takes at most {limit}"
        )
    return base64.b64encode(packed).decode("ascii")


def encoded_user_data(stack_plan: StackPlan, instance_type: str) -> str:
    """The type's cloud-init user-data as its launch template takes it (a gang's text is over
    EC2's limit, so it is always gzipped)."""
    spec = stack_plan.node_specs.get(instance_type)
    if spec is None:
        raise FleetError(
            f"user-data for {instance_type}: no node spec (the plan's ladder is "
            f"{', '.join(stack_plan.node_specs) or 'empty'})"
        )
    return encode_user_data(render_user_data(spec), what=f"user-data for {instance_type}")


def decode_user_data(encoded: str) -> str | None:
    """The inverse, as an instance gets it: base64, then gunzip when gzipped (as cloud-init
    does). None when it is neither base64 nor valid gzip (EC2 or cloud-init would reject it)."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    return raw.decode("utf-8", errors="replace")
