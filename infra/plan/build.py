"""Building a stack's plan: size it, build and validate the serve argv of every rung of the
fallback ladder, and derive each rung's node spec, into one immutable StackPlan.

Its own module because the node specs (infra/plan/node/from_plan.py) read the scaling policy,
which reads a StackPlan: infra/plan/stack.py holds the value, this module fills it once.
"""

from __future__ import annotations

from types import MappingProxyType

from infra.config import StackConfig
from infra.plan.node.from_plan import node_spec
from infra.plan.node.serve_args import build_serve_argv
from infra.plan.planner import make_plan
from infra.plan.stack import StackPlan, api_key_secret_name, sizing_request, validate_argv


def build_stack_plan(config: StackConfig, *, validate: bool = True) -> StackPlan:
    plan = make_plan(sizing_request(config))
    argv = build_serve_argv(config, plan)
    validation = validate_argv(argv) if validate else "validation not requested"
    for fallback in plan.fallbacks[1:]:
        if validate:
            validate_argv(build_serve_argv(config, plan, fallback))
    secret_id = api_key_secret_name(config.stack)
    specs = {
        rung.layout.instance_type: node_spec(config, plan, rung, api_key_secret_id=secret_id) for rung in plan.fallbacks
    }
    return StackPlan(config, plan, argv, validation, MappingProxyType(specs))
