"""Entry point of ``pulumi up`` / ``pulumi preview`` (Pulumi.yaml ``main: infra/program/``)."""

import pulumi

from infra.config import load_from_pulumi
from infra.errors import FleetError
from infra.program.stack import deploy
from infra.stackplan import build_stack_plan

try:
    deploy(build_stack_plan(load_from_pulumi()))
except FleetError as err:
    # One line, no traceback: the same message `vllm-fleet plan` prints.
    raise pulumi.RunError(str(err)) from None
