"""The fleet's vLLM pin and where the pinned version keeps its ``vllm serve`` parser.

Read from ``infra/facts/data/vllm.yaml`` (keys ``pin`` and ``parser``; the planner owns the file's
other keys). No vLLM import here: this module is cheap and safe anywhere.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from infra.facts.catalog import DATA_DIR
from infra.facts.fact import Fact, NonEmptyStr, Strict, read_yaml

VLLM_DATA_FILE = "vllm.yaml"


class VllmPin(Strict):
    version: Fact[NonEmptyStr]
    gpu_package: Fact[NonEmptyStr]
    cpu_package: Fact[NonEmptyStr]

    def requirement(self, *, cpu: bool = False) -> str:
        """The pip requirement string, e.g. ``vllm==0.32.0``."""
        package = self.cpu_package if cpu else self.gpu_package
        return f"{package.value}=={self.version.value}"


class VllmParserLocation(Strict):
    """Import paths (``module:attribute``) of the pinned version's ``vllm serve`` machinery."""

    make_arg_parser: Fact[NonEmptyStr]
    parser_class: Fact[NonEmptyStr]
    validate_parsed_args: Fact[NonEmptyStr]
    api_server_module: Fact[NonEmptyStr]


class VllmFacts(BaseModel):
    model_config = ConfigDict(frozen=True)  # other top-level keys belong to the planner

    pin: VllmPin
    parser: VllmParserLocation


def load_vllm_facts(data_dir: Path = DATA_DIR) -> VllmFacts:
    doc = read_yaml(data_dir / VLLM_DATA_FILE)
    return VllmFacts.model_validate({"pin": doc["pin"], "parser": doc["parser"]})


@cache
def vllm_facts() -> VllmFacts:
    return load_vllm_facts()
