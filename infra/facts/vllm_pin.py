"""The fleet's vLLM pin and where the pinned version keeps its ``vllm serve`` parser.

Read from ``infra/facts/data/vllm.yaml`` (keys ``pin`` and ``parser``; the planner owns the file's
other keys). No vLLM import here: this module is cheap and safe anywhere.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from infra.facts.catalog import DATA_DIR, read_yaml

VLLM_DATA_FILE = "vllm.yaml"


class CitedValue(BaseModel):
    """One fact with where it was read and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1)
    source: str = Field(min_length=8)
    read: dt.date


class VllmPin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: CitedValue
    gpu_package: CitedValue
    cpu_package: CitedValue

    def requirement(self, *, cpu: bool = False) -> str:
        """The pip requirement string, e.g. ``vllm==0.32.0``."""
        package = self.cpu_package if cpu else self.gpu_package
        return f"{package.value}=={self.version.value}"


class VllmParserLocation(BaseModel):
    """Import paths (``module:attribute``) of the pinned version's ``vllm serve`` machinery."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    make_arg_parser: CitedValue
    parser_class: CitedValue
    validate_parsed_args: CitedValue
    api_server_module: CitedValue


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
