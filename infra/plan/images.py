"""The vLLM AMI bake, described purely: component documents, their parameters and versions.

No Pulumi here. ``infra/components/image.py`` turns an :class:`ImagePlan` into EC2 Image Builder
resources; the tests validate the same plan without AWS.

- The AWSTOE component documents live in ``images/components/*.yaml`` and use AWSTOE's native
  ``parameters:`` (https://docs.aws.amazon.com/imagebuilder/latest/userguide/toe-user-defined-variables.html),
  so nothing is rendered: the image recipe passes values, which :func:`plan_image` computes.
- The scripts they run live in ``images/scripts/``; the component uploads them to S3 under a
  content-addressed prefix, and each document downloads what it runs (``S3Download``).
- Facts (torch/CUDA of the pinned wheel, driver floors, DLAMI contents, exporter packages, the
  AWSTOE schema) come from ``images/facts.yaml``; the vLLM pin from ``infra/facts/data/vllm.yaml``.
- A component's version is derived from the sha256 of its document and of every script it runs,
  because Image Builder components are immutable: changed content needs a new version.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from infra.config import PROJECT, ImagesStackConfig
from infra.errors import FleetError
from infra.facts.fact import Strict
from infra.facts.images import (
    DEFAULT_BASE_IMAGE,
    DEFAULT_BUILD_INSTANCE_TYPE,
    IMAGES_DIR,
    AwstoeFacts,
    ImageFacts,
    PinnedVllm,
    default_facts,
    default_pin,
)

COMPONENTS_DIR = IMAGES_DIR / "components"
SCRIPTS_DIR = IMAGES_DIR / "scripts"

SCRIPTS_PREFIX_PARAMETER = "ScriptsS3Prefix"
# Where the fleet's launch templates find the newest baked AMI (Image Builder's distribution
# writes it there, data type aws:ec2:image).
AMI_SSM_PARAMETER_TEMPLATE = "/vllm-fleet/images/{name}/ami-id"
# Components in recipe order: the runtime first, weights before the pre-warm that serves them.
COMPONENT_ORDER = ("vllm-runtime", "exporters", "efa", "weights", "prewarm")

_VARIABLE_REFERENCE = re.compile(r"\{\{\s*([^}\s]+)\s*\}\}")
_SCRIPT_SOURCE = re.compile(r"^\{\{\s*" + SCRIPTS_PREFIX_PARAMETER + r"\s*\}\}/([A-Za-z0-9._-]+\.sh)$")
_SCRIPT_RUN = re.compile(r"bash '([^']+\.sh)'")
_SOURCES_COMMON = re.compile(r'^source "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/common\.sh"$', re.MULTILINE)
# Values go into single-quoted shell words in the documents: no quotes, no backslashes, no newlines.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9 ._:/@=+,\[\]-]*$")
_SERVE_FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*(=[A-Za-z0-9._:/,+-]+)?$")
_SERVE_VALUE = re.compile(r"^[A-Za-z0-9._:/,+-]+$")


# --------------------------------------------------------------------------------------------
# AWSTOE document schema, validated strictly against images/facts.yaml `awstoe:`


def _awstoe(info: ValidationInfo) -> AwstoeFacts:
    context = info.context
    if not isinstance(context, Mapping) or not isinstance(context.get("awstoe"), AwstoeFacts):
        raise TypeError("validate AWSTOE documents with context={'awstoe': AwstoeFacts}")
    facts: AwstoeFacts = context["awstoe"]
    return facts


def _known_parameter_type(kind: str, value: str, info: ValidationInfo) -> str:
    allowed = _awstoe(info).parameter_types
    if value not in allowed:
        raise ValueError(f"{kind} type {value!r} is not one of {allowed}")
    return value


class AwstoeVariable(Strict):
    type: str
    default: str | None = None
    description: str | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str, info: ValidationInfo) -> str:
        return _known_parameter_type("parameter", value, info)


class AwstoeConstant(Strict):
    type: str
    value: str

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str, info: ValidationInfo) -> str:
        return _known_parameter_type("constant", value, info)


class AwstoeStep(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1)
    action: str
    inputs: dict[str, Any] | list[dict[str, Any]]
    timeoutSeconds: int | None = None
    onFailure: str | None = None
    maxAttempts: int | None = Field(default=None, ge=1)
    if_: dict[str, Any] | None = Field(default=None, alias="if")
    loop: dict[str, Any] | None = None

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str, info: ValidationInfo) -> str:
        if value not in _awstoe(info).actions:
            raise ValueError(f"unknown AWSTOE action {value!r}")
        return value

    @field_validator("onFailure")
    @classmethod
    def _known_on_failure(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = _awstoe(info).on_failure
        if value is not None and value not in allowed:
            raise ValueError(f"onFailure {value!r} is not one of {allowed}")
        return value

    @field_validator("timeoutSeconds")
    @classmethod
    def _timeout(cls, value: int | None) -> int | None:
        # "Also supports -1 value, which indicates infinite timeout. 0 and other negative values are not allowed."
        if value is not None and value != -1 and value <= 0:
            raise ValueError(f"timeoutSeconds {value} must be positive or -1")
        return value

    @model_validator(mode="after")
    def _inputs_match_action(self, info: ValidationInfo) -> AwstoeStep:
        spec = _awstoe(info).action_inputs.get(self.action)
        if spec is None:
            return self
        if spec.shape == "mapping":
            if not isinstance(self.inputs, dict):
                raise ValueError(f"step {self.name}: {self.action} inputs must be a mapping")
            entries = [self.inputs]
        else:
            if not isinstance(self.inputs, list) or not self.inputs:
                raise ValueError(f"step {self.name}: {self.action} inputs must be a non-empty list")
            entries = self.inputs
        for entry in entries:
            missing = [key for key in spec.required if key not in entry]
            unknown = [key for key in entry if key not in spec.required + spec.optional]
            if missing or unknown:
                raise ValueError(
                    f"step {self.name}: {self.action} inputs missing {missing} or unknown {unknown}"
                )
        if self.action == "ExecuteBash":
            commands = self.inputs["commands"] if isinstance(self.inputs, dict) else None
            if (
                not isinstance(commands, list)
                or not commands
                or not all(isinstance(c, str) for c in commands)
            ):
                raise ValueError(f"step {self.name}: ExecuteBash commands must be a list of strings")
        return self


class AwstoePhase(Strict):
    name: str
    steps: list[AwstoeStep] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _known_phase(cls, value: str, info: ValidationInfo) -> str:
        allowed = _awstoe(info).phases
        if value not in allowed:
            raise ValueError(f"phase {value!r} is not one of {allowed}")
        return value

    @model_validator(mode="after")
    def _unique_step_names(self) -> AwstoePhase:
        names = [step.name for step in self.steps]
        if len(names) != len(set(names)):
            raise ValueError(f"phase {self.name}: step names repeat: {names}")
        return self


class AwstoeDocument(Strict):
    name: str | None = None
    description: str | None = None
    schemaVersion: str
    parameters: list[dict[str, AwstoeVariable]] | None = None
    constants: list[dict[str, AwstoeConstant]] | None = None
    phases: list[AwstoePhase] = Field(min_length=1)

    @field_validator("schemaVersion", mode="before")
    @classmethod
    def _schema_version(cls, value: object, info: ValidationInfo) -> str:
        # AWS's own examples write `schemaVersion: 1.0` unquoted, which YAML reads as a float.
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        allowed = _awstoe(info).schema_versions
        if text not in allowed:
            raise ValueError(f"schemaVersion {text!r} is not one of {allowed}")
        return text

    @model_validator(mode="after")
    def _names_and_references(self, info: ValidationInfo) -> AwstoeDocument:
        facts = _awstoe(info)
        pattern = re.compile(facts.variable_name_pattern)
        declared: list[str] = []
        for group in (self.parameters or []) + (self.constants or []):
            if len(group) != 1:
                raise ValueError(f"each parameters/constants item names one variable, got {sorted(group)}")
            declared.extend(group)
        for name in declared:
            if not pattern.match(name):
                raise ValueError(f"variable name {name!r} does not match {facts.variable_name_pattern}")
        if len(declared) != len(set(declared)):
            raise ValueError(f"variable names repeat: {declared}")
        phase_names = [phase.name for phase in self.phases]
        if len(phase_names) != len(set(phase_names)):
            raise ValueError(f"phase names repeat: {phase_names}")
        for phase in self.phases:
            for step in phase.steps:
                for reference in _references(step.inputs):
                    # a.b.c references are input/output chaining, not variables
                    if "." not in reference and reference not in declared:
                        raise ValueError(
                            f"step {phase.name}.{step.name} uses undeclared {{{{ {reference} }}}}"
                        )
        return self

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.parameters or [] for name in group)

    def constant_values(self) -> dict[str, str]:
        return {name: const.value for group in self.constants or [] for name, const in group.items()}


def _references(value: object) -> list[str]:
    if isinstance(value, str):
        return _VARIABLE_REFERENCE.findall(value)
    if isinstance(value, Mapping):
        return [ref for item in value.values() for ref in _references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _references(item)]
    return []


def validate_document(text: str, facts: AwstoeFacts, *, source: str = "document") -> AwstoeDocument:
    """Parse and strictly validate one AWSTOE component document; FleetError names what is wrong."""
    if len(text) > facts.max_document_chars:
        raise FleetError(
            f"{source}: {len(text)} characters, Image Builder accepts at most {facts.max_document_chars}"
        )
    try:
        data = yaml.safe_load(text)
        return AwstoeDocument.model_validate(data, context={"awstoe": facts})
    except yaml.YAMLError as exc:
        raise FleetError(f"{source}: not YAML ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise FleetError(f"{source}: {where}: {first['msg']}") from None


# --------------------------------------------------------------------------------------------
# Component documents and the scripts they run


@dataclass(frozen=True)
class ComponentSource:
    """One AWSTOE document from images/components, with the scripts it downloads and runs."""

    key: str
    path: Path
    text: str
    document: AwstoeDocument
    scripts: tuple[str, ...]
    content_sha256: str

    def semantic_version(self, node_max: int) -> str:
        return semantic_version(self.content_sha256, node_max)


def semantic_version(sha256_hex: str, node_max: int) -> str:
    """``1.<minor>.<patch>`` from a content hash: new content, new version (each node <= node_max)."""
    minor = int(sha256_hex[0:15], 16) % (node_max + 1)
    patch = int(sha256_hex[15:30], 16) % (node_max + 1)
    return f"1.{minor}.{patch}"


def script_references(
    document: AwstoeDocument, *, source: str = "document", scripts_dir: Path | None = None
) -> tuple[str, ...]:
    """Scripts the document downloads, after checking each phase runs only what it downloaded.

    Downloads must come from ``{{ ScriptsS3Prefix }}/<name>.sh``; ``bash '<dir>/<name>.sh'`` in an
    ExecuteBash step must name a file an earlier S3Download placed in ``<dir>``: in the same phase,
    or for ``validate`` in ``build`` (both run on the build instance, build first). ``test`` runs on
    a fresh instance launched from the new AMI, so it downloads its own.
    """
    constants = document.constant_values()

    def expand(text: str) -> str:
        return _VARIABLE_REFERENCE.sub(lambda m: constants.get(m.group(1), m.group(0)), text)

    scripts: list[str] = []
    downloaded_by_phase: dict[str, dict[str, str]] = {}
    for phase in document.phases:
        downloaded: dict[str, str] = (
            dict(downloaded_by_phase.get("build", {})) if phase.name == "validate" else {}
        )
        downloaded_by_phase[phase.name] = downloaded
        for step in phase.steps:
            if step.action == "S3Download":
                assert isinstance(step.inputs, list)
                for entry in step.inputs:
                    match = _SCRIPT_SOURCE.match(str(entry["source"]))
                    if not match:
                        raise FleetError(
                            f"{source}: {phase.name}.{step.name} downloads {entry['source']!r}, "
                            f"not {{{{ {SCRIPTS_PREFIX_PARAMETER} }}}}/<script>.sh"
                        )
                    destination = expand(str(entry["destination"]))
                    if Path(destination).name != match.group(1):
                        raise FleetError(
                            f"{source}: {phase.name}.{step.name} renames {match.group(1)} to {destination}"
                        )
                    downloaded[destination] = match.group(1)
                    scripts.append(match.group(1))
            elif step.action == "ExecuteBash":
                assert isinstance(step.inputs, dict)
                for command in step.inputs["commands"]:
                    for path in _SCRIPT_RUN.findall(expand(command)):
                        if path not in downloaded:
                            raise FleetError(
                                f"{source}: {phase.name}.{step.name} runs {path}, which no earlier step downloads"
                            )
                        if (
                            _sources_common((scripts_dir or SCRIPTS_DIR) / downloaded[path])
                            and str(Path(path).parent / "common.sh") not in downloaded
                        ):
                            raise FleetError(
                                f"{source}: {phase.name}.{step.name} runs {path} without downloading common.sh"
                            )
    return tuple(dict.fromkeys(scripts))


def _sources_common(script: Path) -> bool:
    return script.is_file() and bool(_SOURCES_COMMON.search(script.read_text(encoding="utf-8")))


def load_component(
    key: str, facts: ImageFacts, *, components_dir: Path | None = None, scripts_dir: Path | None = None
) -> ComponentSource:
    components_dir = components_dir or COMPONENTS_DIR
    scripts_dir = scripts_dir or SCRIPTS_DIR
    path = components_dir / f"{key}.yaml"
    text = path.read_text(encoding="utf-8")
    document = validate_document(text, facts.awstoe, source=str(path))
    if SCRIPTS_PREFIX_PARAMETER not in document.parameter_names():
        raise FleetError(f"{path}: declares no {SCRIPTS_PREFIX_PARAMETER} parameter")
    scripts = script_references(document, source=str(path), scripts_dir=scripts_dir)
    digest = hashlib.sha256(text.encode())
    for script in sorted(scripts):
        script_path = scripts_dir / script
        if not script_path.is_file():
            raise FleetError(f"{path}: downloads {script}, which is not in {scripts_dir}")
        digest.update(b"\0" + script.encode() + b"\0" + script_path.read_bytes())
    return ComponentSource(key, path, text, document, scripts, digest.hexdigest())


def script_files(scripts_dir: Path | None = None) -> dict[str, bytes]:
    """Every bake script, by file name, as uploaded to S3."""
    return {path.name: path.read_bytes() for path in sorted((scripts_dir or SCRIPTS_DIR).glob("*.sh"))}


def scripts_bundle_sha256(scripts: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(scripts):
        digest.update(name.encode() + b"\0" + scripts[name] + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# What to bake: the image spec, validated into a plan


class WeightsSpec(Strict):
    """Weights staged into the image at /opt/models/<model_name>."""

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str = Field(description="s3://bucket/prefix/ or hf://org/repo")
    revision: str = Field(default="", description="hf:// sources: the 40-hex commit sha")
    hf_token_secret_id: str = ""
    expected_manifest_sha256: str = ""
    size_gib: float = Field(gt=0, description="on-disk size of the weights, for the root volume")


class PrewarmSpec(Strict):
    """Start vLLM once at bake time with the fleet's flags, so its compile caches ship in the AMI."""

    serve_args: list[str] = Field(default_factory=list)
    model_path: str | None = Field(default=None, description="default: the staged weights' directory")
    timeout_s: int = Field(default=3600, gt=0)


class ImageSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    base_image: str = DEFAULT_BASE_IMAGE
    multi_node: bool = Field(default=False, description="adds Ray and the EFA/aws-ofi-nccl check")
    build_instance_type: str = DEFAULT_BUILD_INSTANCE_TYPE
    weights: WeightsSpec | None = None
    prewarm: PrewarmSpec | None = None


@dataclass(frozen=True)
class PlannedComponent:
    key: str
    source: ComponentSource
    version: str
    # Recipe parameter values, all but ScriptsS3Prefix (the component knows the bucket).
    parameters: dict[str, str]


@dataclass(frozen=True)
class ImagePlan:
    spec: ImageSpec
    pin: PinnedVllm
    components: tuple[PlannedComponent, ...]
    parent_image: str
    base_image_ssm_parameter: str
    ami_ssm_parameter_name: str
    ami_ssm_parameter_data_type: str
    # Disk the bake adds to the base AMI's root snapshot (venv, weights, caches), rounded up.
    extra_root_gib: int
    scripts: dict[str, bytes] = field(repr=False)
    scripts_sha256: str = ""

    def recipe_version(self, root_volume_gib: int, node_max: int, *, salt: str = "") -> str:
        """Version of the image recipe: changes with any component, parameter, parent or disk size.

        ``salt`` carries inputs known only at deploy time (the scripts bucket's name)."""
        digest = hashlib.sha256()
        digest.update(f"{self.parent_image}\0{root_volume_gib}\0{self.scripts_sha256}\0{salt}".encode())
        for component in self.components:
            digest.update(f"\0{component.key}={component.version}".encode())
            for name in sorted(component.parameters):
                digest.update(f"\0{name}={component.parameters[name]}".encode())
        return semantic_version(digest.hexdigest(), node_max)


def ami_ssm_parameter_name(image_name: str) -> str:
    """SSM parameter the image's distribution writes each new AMI id to (data type aws:ec2:image)."""
    return AMI_SSM_PARAMETER_TEMPLATE.format(name=image_name)


def base_image_ssm_parameter(base_image: str = DEFAULT_BASE_IMAGE, facts: ImageFacts | None = None) -> str:
    """Public SSM parameter holding the newest DLAMI of ``base_image`` (e.g. ``ubuntu-24.04``)."""
    facts = facts or default_facts()
    if base_image not in facts.base_images:
        raise FleetError(
            f"image.base_image: {base_image!r} is not one of {', '.join(sorted(facts.base_images))}"
        )
    return facts.base_images[base_image].ssm_parameter.value


def root_volume_gib(base_snapshot_gib: int, extra_root_gib: int) -> int:
    """Root volume for the build: the base AMI's snapshot plus what the bake adds."""
    return int(base_snapshot_gib) + int(extra_root_gib)


def _check_value(key: str, value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise FleetError(f"{key}: {value!r} may only contain letters, digits, spaces and ._:/@=+,[]-")
    return value


def plan_image(spec: ImageSpec, facts: ImageFacts | None = None, pin: PinnedVllm | None = None) -> ImagePlan:
    """Validate an image spec against the facts and compute every component's parameters."""
    facts = facts or default_facts()
    pin = pin or default_pin()

    wheel = facts.vllm_wheels.get(pin.version)
    if wheel is None:
        raise FleetError(
            f"infra/facts/data/vllm.yaml pin.version: {pin.version} has no entry in images/facts.yaml vllm_wheels "
            f"(known: {', '.join(sorted(facts.vllm_wheels))}); read that wheel's metadata and add it"
        )
    base = facts.base_images.get(spec.base_image)
    if base is None:
        raise FleetError(
            f"image.base_image: {spec.base_image!r} is not one of {', '.join(sorted(facts.base_images))}"
        )
    if not _version_at_least(base.python.value, wheel.requires_python.value):
        usable = [
            k
            for k, b in sorted(facts.base_images.items())
            if _version_at_least(b.python.value, wheel.requires_python.value)
        ]
        raise FleetError(
            f"image.base_image: {spec.base_image!r} ships Python {base.python.value}; vllm {pin.version} requires "
            f">= {wheel.requires_python.value} (use {' or '.join(usable) or 'a newer base image'})"
        )
    driver_floor = facts.nvidia_min_driver_major.get(str(wheel.cuda_major.value))
    if driver_floor is None:
        raise FleetError(
            f"images/facts.yaml nvidia_min_driver_major: no entry for CUDA {wheel.cuda_major.value}"
        )
    if base.nvidia_driver_major.value < driver_floor.value:
        raise FleetError(
            f"image.base_image: {spec.base_image!r} ships NVIDIA driver {base.nvidia_driver_major.value}; "
            f"CUDA {wheel.cuda_major.value} (torch {wheel.torch.value}) needs >= {driver_floor.value}"
        )
    family = spec.build_instance_type.split(".", 1)[0]
    families = base.supported_instance_families.value
    if "." not in spec.build_instance_type or family not in families:
        raise FleetError(
            f"image.build_instance_type: {spec.build_instance_type!r} is not a GPU type the base image supports "
            f"(families: {', '.join(families)})"
        )
    if spec.multi_node and not base.ships_efa_and_ofi_nccl.value:
        raise FleetError(
            f"image.multi_node: base image {spec.base_image!r} does not ship EFA and aws-ofi-nccl"
        )

    image_builder = facts.image_builder
    node_max = image_builder.semantic_version_node_max
    ray_requirement = f"ray[cgraph]=={wheel.ray.value}" if spec.multi_node else ""
    exporters = facts.exporters
    parameters: dict[str, dict[str, str]] = {
        "vllm-runtime": {
            "VllmPackage": pin.gpu_package,
            "VllmVersion": pin.version,
            "TorchVersion": wheel.torch.value,
            "RequiresPython": wheel.requires_python.value,
            "CudaMajor": str(wheel.cuda_major.value),
            "MinDriverMajor": str(driver_floor.value),
            "InstallRay": "true" if spec.multi_node else "false",
            "RayRequirement": ray_requirement,
            "RayVersion": wheel.ray.value if spec.multi_node else "",
            "ApiServerModule": pin.api_server_module,
        },
        "exporters": {
            "NodeExporterPackage": exporters.node_exporter.package,
            "NodeExporterService": exporters.node_exporter.service,
            "NodeExporterPort": str(exporters.node_exporter.port),
            "DcgmExporterPackage": exporters.dcgm_exporter.package,
            "DcgmExporterService": exporters.dcgm_exporter.service,
            "DcgmExporterPort": str(exporters.dcgm_exporter.port),
        },
    }
    if spec.multi_node:
        parameters["efa"] = {
            "FiInfo": facts.efa.fi_info,
            "LibfabricLibDir": facts.efa.libfabric_lib_dir,
            "OfiNcclSearchRoot": facts.efa.ofi_nccl_search_root,
        }
    weights_gib = 0.0
    if spec.weights is not None:
        parameters["weights"] = _weights_parameters(spec.weights)
        weights_gib = spec.weights.size_gib
    if spec.prewarm is not None:
        parameters["prewarm"] = _prewarm_parameters(spec, pin)

    components = []
    for key in COMPONENT_ORDER:
        if key not in parameters:
            continue
        source = load_component(key, facts)
        values = {
            name: _check_value(f"image component {key} parameter {name}", value)
            for name, value in parameters[key].items()
        }
        declared = set(source.document.parameter_names()) - {SCRIPTS_PREFIX_PARAMETER}
        if declared != set(values):
            raise FleetError(
                f"{source.path}: declares parameters {sorted(declared)}, infra/plan/images.py passes {sorted(values)}"
            )
        components.append(PlannedComponent(key, source, source.semantic_version(node_max), values))

    name = ami_ssm_parameter_name(spec.name)
    if not re.match(image_builder.ssm_parameter_name_pattern, name):
        raise FleetError(
            f"image.name: {spec.name!r} makes SSM parameter {name!r}, outside {image_builder.ssm_parameter_name_pattern}"
        )
    scripts = script_files()
    extra = facts.sizing.vllm_venv_gib.value + facts.sizing.compile_cache_gib.value + weights_gib
    return ImagePlan(
        spec=spec,
        pin=pin,
        components=tuple(components),
        parent_image=image_builder.parent_image_ssm_prefix + base.ssm_parameter.value,
        base_image_ssm_parameter=base.ssm_parameter.value,
        ami_ssm_parameter_name=name,
        ami_ssm_parameter_data_type=image_builder.ssm_parameter_data_type,
        extra_root_gib=math.ceil(extra),
        scripts=scripts,
        scripts_sha256=scripts_bundle_sha256(scripts),
    )


def _weights_parameters(weights: WeightsSpec) -> dict[str, str]:
    source = weights.source
    if source.startswith("hf://"):
        if not re.match(r"^hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$", source):
            raise FleetError(f"image.weights.source: {source!r} is not hf://org/repo")
        if not re.match(r"^[0-9a-f]{40}$", weights.revision):
            raise FleetError(
                f"image.weights.revision: {weights.revision!r} is not a 40-hex commit sha; branches and tags move, "
                "so the bake refuses them"
            )
    elif source.startswith("s3://"):
        if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/=-]*)?$", source):
            raise FleetError(f"image.weights.source: {source!r} is not s3://bucket/prefix/")
    else:
        raise FleetError(f"image.weights.source: {source!r} must start with s3:// or hf://")
    if weights.expected_manifest_sha256 and not re.match(r"^[0-9a-f]{64}$", weights.expected_manifest_sha256):
        raise FleetError(
            f"image.weights.expected_manifest_sha256: {weights.expected_manifest_sha256!r} is not a sha256"
        )
    return {
        "ModelName": weights.model_name,
        "WeightsSource": source,
        "Revision": weights.revision,
        "HfTokenSecretId": weights.hf_token_secret_id,
        "ExpectedManifestSha256": weights.expected_manifest_sha256,
    }


def _prewarm_parameters(spec: ImageSpec, pin: PinnedVllm) -> dict[str, str]:
    prewarm = spec.prewarm
    assert prewarm is not None
    model_path = prewarm.model_path
    if model_path is None:
        if spec.weights is None:
            raise FleetError("image.prewarm.model_path: required when the image stages no weights")
        model_path = f"/opt/models/{spec.weights.model_name}"
    for index, token in enumerate(prewarm.serve_args):
        flag_ok = bool(_SERVE_FLAG.match(token))
        value_ok = (
            bool(_SERVE_VALUE.match(token)) and index > 0 and prewarm.serve_args[index - 1].startswith("--")
        )
        if not (flag_ok or value_ok):
            raise FleetError(
                f"image.prewarm.serve_args[{index}]: {token!r} is neither a --flag nor the plain value of the flag before it"
            )
        if token.split("=", 1)[0] in ("--host", "--port", "--model", "--api-key"):
            raise FleetError(
                f"image.prewarm.serve_args[{index}]: {token!r} is set by the bake itself, leave it out"
            )
    return {
        "ModelPath": model_path,
        "ServeArgs": " ".join(prewarm.serve_args),
        "ApiServerModule": pin.api_server_module,
        "TimeoutSeconds": str(prewarm.timeout_s),
    }


def _version_at_least(have: str, want: str) -> bool:
    def parts(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split("."))

    return parts(have) >= parts(want)


def component_resource_name(image_name: str, key: str) -> str:
    return f"vllm-fleet-{image_name}-{key}"


# --------------------------------------------------------------------------------------------
# An image-build stack's bake: ``vllm-fleet:bake`` → ImageSpec → ImagePlan. The Pulumi program
# (infra/program/images.py) and the CLI both start from plan_bake, so they can never disagree.
# Errors from plan_image name its own fields (``image.base_image``); plan_bake renames them to the
# stack-file key (``vllm-fleet:bake.baseImage``) so the user sees what to edit.

_PLAN_KEY = re.compile(r"^image\.([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")


def image_spec(config: ImagesStackConfig) -> ImageSpec:
    """The stack file's bake section as the image planner's spec."""
    bake = config.bake
    weights = None
    if bake.weights is not None:
        staged = bake.weights
        source = staged.uri if staged.source == "s3" else f"hf://{staged.repo}"
        weights = WeightsSpec(
            model_name=staged.model_name,
            source=str(source),
            revision=staged.revision or "",
            hf_token_secret_id=staged.hf_token_secret_id or "",
            expected_manifest_sha256=staged.expected_manifest_sha256 or "",
            size_gib=staged.size_gib,
        )
    prewarm = None
    if bake.prewarm.enabled:
        prewarm = PrewarmSpec(
            serve_args=list(bake.prewarm.serve_args),
            model_path=bake.prewarm.model_path,
            timeout_s=bake.prewarm.timeout_s,
        )
    return ImageSpec(
        name=bake.name,
        base_image=bake.base_image,
        multi_node=bake.multi_node,
        build_instance_type=bake.build_instance_type,
        weights=weights,
        prewarm=prewarm,
    )


def stack_key(message: str) -> str:
    """``image.prewarm.serve_args[0]: …`` → ``vllm-fleet:bake.prewarm.serveArgs[0]: …``."""
    match = _PLAN_KEY.match(message)
    if match is None:
        return message
    path = ".".join(to_camel(part) for part in match.group(1).split("."))
    return f"{PROJECT}:bake.{path}: {message[match.end():]}"


def plan_bake(config: ImagesStackConfig) -> ImagePlan:
    """Validate the bake against images/facts.yaml and the vLLM pin; FleetError names the stack key."""
    try:
        return plan_image(image_spec(config))
    except FleetError as err:
        raise FleetError(stack_key(str(err))) from None


def image_plan_summary(plan: ImagePlan) -> dict[str, Any]:
    """What the recipe installs and what the pipeline publishes, for humans and --json."""
    facts = default_facts()
    base = facts.base_images[plan.spec.base_image]
    weights = plan.spec.weights
    return {
        "image": plan.spec.name,
        "vllm": {"version": plan.pin.version, "package": plan.pin.gpu_package},
        "base_image": {
            "name": plan.spec.base_image,
            "description": base.description,
            "ssm_parameter": plan.base_image_ssm_parameter,
            "parent_image": plan.parent_image,
        },
        "build_instance_type": plan.spec.build_instance_type,
        "multi_node": plan.spec.multi_node,
        "components": [
            {
                "key": c.key,
                "version": c.version,
                "installs": c.source.document.description or "",
                "scripts": list(c.source.scripts),
                "parameters": c.parameters,
            }
            for c in plan.components
        ],
        "weights": (
            {"model_name": weights.model_name, "source": weights.source, "revision": weights.revision or None,
             "size_gib": weights.size_gib}
            if weights is not None
            else None
        ),
        "prewarm": plan.spec.prewarm is not None,
        "extra_root_gib": plan.extra_root_gib,
        "publishes_ssm_parameter": plan.ami_ssm_parameter_name,
    }


def component_documents(plan: ImagePlan) -> dict[str, str]:
    """The exact AWSTOE document each Image Builder component gets, by artifact path."""
    return {f"components/{c.key}.yaml": c.source.text for c in plan.components}
