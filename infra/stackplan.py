"""A stack's whole offline plan: config → sizing plan → validated argv → rendered artifacts.

Pure apart from the optional import of vLLM for validation; no Pulumi. The Pulumi program
and ``vllm-fleet plan`` both start from ``build_stack_plan`` so they can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from infra.config import StackConfig, resolve_model
from infra.node.serve_args import build_serve_argv
from infra.planner import Plan, SizingRequest, make_plan

VALIDATED = "validated"


@dataclass(frozen=True)
class StackPlan:
    config: StackConfig
    plan: Plan
    serve_argv: list[str]
    argv_validation: str  # VALIDATED, or the loud reason validation was skipped
    artifacts: dict[str, str] = field(default_factory=dict)  # relative path → content
    # cloud-init user-data per instance type of the fallback ladder (each type runs vLLM
    # with its own parallelism), filled from infra/node/render.py.
    user_data: dict[str, str] = field(default_factory=dict)

    @property
    def api_key_secret_name(self) -> str:
        """Deterministic, so user-data can name it without waiting for a Pulumi Output."""
        return f"vllm-fleet/{self.config.stack}/api-key"


def sizing_request(config: StackConfig) -> SizingRequest:
    name, arch = resolve_model(config)
    return SizingRequest(
        model_name=name,
        arch=arch,
        quantization=config.serving.quantization,
        max_model_len=config.serving.max_model_len,
        concurrency=config.serving.concurrency,
        instance_types=tuple(config.capacity.instance_types),
        max_nodes_per_replica=config.capacity.max_nodes_per_replica,
        weights_source=config.serving.weights_source,
    )


def validate_argv(argv: list[str], *, required: bool = False) -> str:
    """Check argv with the pinned vLLM's parser; say loudly when vLLM isn't importable."""
    from infra.node import vllm_cli

    if not vllm_cli.vllm_importable():
        if required:
            raise RuntimeError("vLLM must be importable to validate serve argv here")
        return "vLLM is not importable here, so the serve argv was NOT validated by vLLM's parser"
    vllm_cli.validate_serve_argv(argv)
    return VALIDATED


def build_stack_plan(config: StackConfig, *, validate: bool = True) -> StackPlan:
    plan = make_plan(sizing_request(config))
    argv = build_serve_argv(config, plan)
    validation = validate_argv(argv) if validate else "validation not requested"
    for fallback in plan.fallbacks[1:]:
        if validation == VALIDATED:
            validate_argv(build_serve_argv(config, plan, fallback))
    stack_plan = StackPlan(config, plan, argv, validation)
    stack_plan.artifacts.update(render_artifacts(stack_plan))
    return stack_plan


def render_artifacts(stack_plan: StackPlan) -> dict[str, str]:
    summary = {
        "stack": stack_plan.config.stack,
        **stack_plan.plan.summary(),
        "serve_argv": stack_plan.serve_argv,
        "argv_validation": stack_plan.argv_validation,
    }
    return {
        "plan.json": json.dumps(summary, indent=2) + "\n",
        "vllm-serve.argv": "\n".join(stack_plan.serve_argv) + "\n",
    }


def write_artifacts(stack_plan: StackPlan, target: Path) -> list[Path]:
    """Write every artifact under ``target`` (created), returning the paths, sorted."""
    written = []
    for rel, content in sorted(stack_plan.artifacts.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
