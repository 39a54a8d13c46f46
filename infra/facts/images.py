"""Facts of the vLLM AMI bake (``images/facts.yaml``: torch/CUDA of the pinned wheel, driver
floors, DLAMI contents, exporter packages, the AWSTOE schema) and the fleet's vLLM pin as
``infra/facts/data/vllm.yaml`` states it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict

from infra.facts.catalog import Cited
from infra.facts.vllm_pin import VllmFacts, vllm_facts

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO_ROOT / "images"
FACTS_FILE = IMAGES_DIR / "facts.yaml"
DEFAULT_BASE_IMAGE = "ubuntu-24.04"
DEFAULT_BUILD_INSTANCE_TYPE = "g6e.xlarge"


class StrFact(Cited):
    value: str


class IntFact(Cited):
    value: int


class BoolFact(Cited):
    value: bool


class StrListFact(Cited):
    value: list[str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VllmWheelFacts(_Strict):
    torch: StrFact
    requires_python: StrFact
    cuda_major: IntFact
    cpu_torch_local_version: StrFact
    ray: StrFact


class BaseImageFacts(_Strict):
    description: str
    ssm_parameter: StrFact
    python: StrFact
    nvidia_driver_major: IntFact
    ships_efa_and_ofi_nccl: BoolFact
    ships_dcgm: BoolFact
    supported_instance_families: StrListFact


class ExporterFacts(Cited):
    package: str
    service: str
    port: int


class ExportersFacts(_Strict):
    node_exporter: ExporterFacts
    dcgm_exporter: ExporterFacts


class EfaFacts(Cited):
    fi_info: str
    libfabric_lib_dir: str
    ofi_nccl_search_root: str


class ActionInputs(_Strict):
    shape: Literal["mapping", "list"]
    required: list[str]
    optional: list[str]


class AwstoeFacts(Cited):
    schema_versions: list[str]
    phases: list[str]
    on_failure: list[str]
    parameter_types: list[str]
    variable_name_pattern: str
    actions: list[str]
    max_document_chars: int
    action_inputs: dict[str, ActionInputs]


class ImageBuilderFacts(Cited):
    semantic_version_node_max: int
    component_name_pattern: str
    ssm_parameter_name_pattern: str
    ssm_parameter_data_type: str
    parent_image_ssm_prefix: str


class SizingFacts(_Strict):
    vllm_venv_gib: IntFact
    compile_cache_gib: IntFact


class ImageFacts(_Strict):
    vllm_wheels: dict[str, VllmWheelFacts]
    nvidia_min_driver_major: dict[str, IntFact]
    base_images: dict[str, BaseImageFacts]
    exporters: ExportersFacts
    efa: EfaFacts
    awstoe: AwstoeFacts
    image_builder: ImageBuilderFacts
    sizing: SizingFacts


@dataclass(frozen=True)
class PinnedVllm:
    """The fleet's vLLM pin as infra/facts/data/vllm.yaml states it (read there, never restated)."""

    version: str
    gpu_package: str
    cpu_package: str
    api_server_module: str

    @classmethod
    def from_facts(cls, facts: VllmFacts) -> PinnedVllm:
        return cls(
            version=facts.pin.version.value,
            gpu_package=facts.pin.gpu_package.value,
            cpu_package=facts.pin.cpu_package.value,
            api_server_module=facts.parser.api_server_module.value,
        )


def load_image_facts(path: Path = FACTS_FILE) -> ImageFacts:
    with path.open(encoding="utf-8") as fh:
        return ImageFacts.model_validate(yaml.safe_load(fh))


@cache
def default_facts() -> ImageFacts:
    return load_image_facts()


def default_pin() -> PinnedVllm:
    return PinnedVllm.from_facts(vllm_facts())
