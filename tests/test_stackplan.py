"""Every stack in stacks/ plans, validates with vLLM's own parser, and renders its artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.config import load_stack_file, stack_names
from infra.plan.build import build_stack_plan
from infra.plan.node import vllm_cli
from infra.plan.stack import VALIDATED, validate_argv
from infra.render.stack import render_artifacts, stack_user_data, write_artifacts

STACKS = stack_names("fleet")  # image-build stacks have no model to plan


@pytest.fixture(scope="module", params=STACKS)
def stack_plan(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return build_stack_plan(load_stack_file(request.param))


def test_vllm_is_importable_in_the_test_environment() -> None:
    # The suite must always validate: a skipped validation here would hide a bad flag.
    assert vllm_cli.vllm_importable()
    assert validate_argv(["vllm", "serve", "m", "--max-model-len", "128"], required=True) == VALIDATED


def test_stack_argv_is_validated_by_vllm(stack_plan) -> None:  # type: ignore[no-untyped-def]
    assert stack_plan.argv_validation == VALIDATED
    argv = stack_plan.serve_argv
    assert argv[:2] == ["vllm", "serve"]
    assert "--api-key" not in argv
    layout = stack_plan.plan.layout
    assert argv[argv.index("--tensor-parallel-size") + 1] == str(layout.tensor_parallel_size)
    assert argv[argv.index("--pipeline-parallel-size") + 1] == str(layout.pipeline_parallel_size)
    assert ("--distributed-executor-backend" in argv) == (layout.nodes_per_replica > 1)


def test_every_rung_of_the_ladder_has_its_own_user_data(stack_plan) -> None:  # type: ignore[no-untyped-def]
    ladder = [c.layout.instance_type for c in stack_plan.plan.fallbacks]
    assert list(stack_plan.node_specs) == ladder
    assert list(stack_user_data(stack_plan)) == ladder
    for instance_type, text in stack_user_data(stack_plan).items():
        assert text.startswith("#cloud-config")
        tp = next(c for c in stack_plan.plan.fallbacks if c.layout.instance_type == instance_type)
        assert f"--tensor-parallel-size {tp.layout.tensor_parallel_size}" in text


def test_packed_replicas_get_disjoint_gpus_and_ports(stack_plan) -> None:  # type: ignore[no-untyped-def]
    spec = stack_plan.node_specs[stack_plan.plan.layout.instance_type]
    assert len(spec.replicas) == stack_plan.plan.layout.replicas_per_node
    ports = [r.port for r in spec.replicas]
    assert len(set(ports)) == len(ports)
    gpus = [g for r in spec.replicas for g in r.gpu_indices]
    assert len(set(gpus)) == len(gpus)


def test_artifacts_written(stack_plan, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    written = {p.relative_to(tmp_path).as_posix() for p in write_artifacts(render_artifacts(stack_plan), tmp_path)}
    assert {"plan.json", "vllm-serve.argv", "monitoring/prometheus.yml"} <= written
    assert any(p.startswith("node/etc/systemd/system/vllm") for p in written)
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["instance_type"] == stack_plan.plan.layout.instance_type
    assert doc["argv_validation"] == VALIDATED
