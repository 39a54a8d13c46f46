"""Facts of the vLLM AMI bake (``images/facts.yaml``: torch/CUDA of the pinned wheel, driver
floors, DLAMI contents, exporter packages, the AWSTOE schema) and the fleet's vLLM pin as
``infra/facts/data/vllm.yaml`` states it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from infra.facts.fact import Cited, Fact, Strict, read_yaml
from infra.facts.vllm_pin import VllmFacts, vllm_facts

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO_ROOT / "images"
FACTS_FILE = IMAGES_DIR / "facts.yaml"
DEFAULT_BASE_IMAGE = "ubuntu-24.04"
DEFAULT_BUILD_INSTANCE_TYPE = "g6e.xlarge"


class VllmWheelFacts(Strict):
    torch: Fact[str]
    requires_python: Fact[str]
    cuda_major: Fact[int]
    cpu_torch_local_version: Fact[str]
    ray: Fact[str]


class BaseImageFacts(Strict):
    description: str
    ssm_parameter: Fact[str]
    python: Fact[str]
    nvidia_driver_major: Fact[int]
    ships_efa_and_ofi_nccl: Fact[bool]
    ships_dcgm: Fact[bool]
    supported_instance_families: Fact[list[str]]


class ExporterFacts(Cited):
    package: str
    service: str
    port: int


class ExportersFacts(Strict):
    node_exporter: ExporterFacts
    dcgm_exporter: ExporterFacts


class EfaFacts(Cited):
    fi_info: str
    libfabric_lib_dir: str
    ofi_nccl_search_root: str


class ActionInputs(Strict):
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


class SizingFacts(Strict):
    vllm_venv_gib: Fact[int]
    compile_cache_gib: Fact[int]


class ImageFacts(Strict):
    vllm_wheels: dict[str, VllmWheelFacts]
    nvidia_min_driver_major: dict[str, Fact[int]]
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
    return ImageFacts.model_validate(read_yaml(path))


@cache
def default_facts() -> ImageFacts:
    return load_image_facts()


def default_pin() -> PinnedVllm:
    return PinnedVllm.from_facts(vllm_facts())
