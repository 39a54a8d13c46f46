"""Entry point of ``pulumi up`` / ``pulumi preview`` (Pulumi.yaml ``main: infra/program/``)."""

import pulumi

from infra.config import ImagesStackConfig
from infra.errors import FleetError
from infra.plan.build import build_stack_plan
from infra.program.config import load_from_pulumi
from infra.program.images import deploy_images
from infra.program.stack import deploy

try:
    config = load_from_pulumi()
    # An image-build stack (vllm-fleet:bake) bakes the AMI; every other stack is a fleet.
    if isinstance(config, ImagesStackConfig):
        deploy_images(config)
    else:
        deploy(build_stack_plan(config))
except FleetError as err:
    # One line, no traceback: the same message `vllm-fleet plan` prints.
    raise pulumi.RunError(str(err)) from None
