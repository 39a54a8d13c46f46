"""Typed stack configuration.

A stack file ``stacks/Pulumi.<stack>.yaml`` holds ``config:`` keys in the project's
namespace (``vllm-fleet:model``, ``vllm-fleet:serving`` …) plus provider keys such as
``aws:region``. The same pydantic model reads them from the file directly (offline
``plan``/``size``) or through ``pulumi.Config`` (a real ``pulumi up``, infra/program/config.py), so both paths
validate identically. Unknown keys are errors: a typo must never be silently ignored.
Every error becomes one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from infra.errors import FleetError
from infra.facts.catalog import REGION_PATTERN, ModelArch, arch_from_hf_config, default_catalog, known_regions
from infra.facts.images import DEFAULT_BASE_IMAGE, DEFAULT_BUILD_INSTANCE_TYPE
from infra.facts.perf import perf_facts
from infra.facts.workload import Workload

PROJECT = "vllm-fleet"
STACKS_DIR = Path(__file__).resolve().parent.parent / "stacks"

QuantizationName = Literal["fp16", "bf16", "fp8", "int8", "awq", "gptq"]
Market = Literal["on-demand", "spot", "capacity-block"]
WeightSourceName = Literal["huggingface", "s3", "ebs-initialized", "ebs-lazy", "local-nvme"]


class Section(BaseModel):
    """Stack-file sections: camelCase keys in YAML, snake_case in code, nothing unknown."""

    # strict: YAML `concurrency: true` or `maxModelLen: "8192"` is refused, never coerced.
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True, strict=True
    )


class ModelSection(Section):
    """Which model: a catalog name, or a Hugging Face repo plus its architecture."""

    catalog: str | None = Field(default=None, description="a name from infra/facts/data/models.yaml")
    repo: str | None = Field(default=None, description="Hugging Face repo id, e.g. org/name")
    revision: str = Field(
        default="main", description="commit sha to pin; 'main' is allowed only for dev stacks"
    )
    config_json: str | None = Field(
        default=None,
        description="path to the model's config.json (or its directory); a relative path is read from "
        "the directory that holds stacks/ (the repository root)",
    )
    architecture: dict[str, Any] | None = Field(default=None, description="config.json inline")
    served_name: str | None = Field(default=None, description="--served-model-name; default: repo id")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSection:
        given = [k for k in ("catalog", "config_json", "architecture") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of catalog, configJson or architecture "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.catalog is None and self.repo is None:
            raise ValueError("repo is required with configJson or architecture")
        return self


# Flags of `vllm serve` that the planner writes (infra/plan/node/serve_args.py) or the node owns, and
# the stack key that sets each instead. extraArgs may only add flags: argparse keeps the last
# of two values, so a repeated --tensor-parallel-size would silently undo the plan.
# tests/test_config.py checks that every flag build_serve_argv writes is listed here.
PLANNER_OWNED_FLAGS: dict[str, str] = {
    "--tensor-parallel-size": "the planner picks it from the instance type: change capacity.instanceTypes",
    "-tp": "the planner picks it from the instance type: change capacity.instanceTypes",
    "--pipeline-parallel-size": "the planner picks it: change capacity.instanceTypes or capacity.maxNodesPerReplica",
    "-pp": "the planner picks it: change capacity.instanceTypes or capacity.maxNodesPerReplica",
    "--distributed-executor-backend": "the planner sets ray for multi-node replicas: change capacity.maxNodesPerReplica",
    "--max-model-len": "set serving.maxModelLen",
    "--max-num-seqs": "set serving.concurrency",
    "--max-num-batched-tokens": "the planner sizes memory with it (infra/facts/data/serving_overheads.yaml)",
    "--gpu-memory-utilization": "the planner sizes memory with it (infra/facts/data/serving_overheads.yaml)",
    "--quantization": "set serving.quantization",
    "-q": "set serving.quantization",
    "--dtype": "set serving.quantization (it implies the dtype)",
    "--port": "set serving.port",
    "--host": "the node listens on all interfaces behind its security group",
    "--served-model-name": "set model.servedName",
    "--revision": "set model.revision",
    "--download-dir": "set serving.weightsSource",
    "--shutdown-timeout": "set serving.shutdownTimeoutS",
    "--enable-prefix-caching": "the fleet always enables prefix caching",
    "--no-enable-prefix-caching": "the fleet always enables prefix caching",
    "--api-key": "the API key lives in Secrets Manager (vllm-fleet rotate-key), never on the command line",
    "--config": "the node passes --config itself (it carries the API key)",
    "--model": "set model.repo (the model is the positional argument)",
}


def _check_extra_args(values: list[str]) -> list[str]:
    for i, token in enumerate(values):
        if not isinstance(token, str) or any(ord(c) < 32 or ord(c) == 127 for c in token):
            raise ValueError(f"[{i}] = {json.dumps(token)}: must be plain text without control characters")
        if not token.startswith("-"):
            continue
        # vLLM rewrites --max_model_len to --max-model-len and reads --flag=value as --flag.
        name = token.split("=", 1)[0]
        name = name if not name.startswith("--") else "--" + name[2:].replace("_", "-")
        if name in PLANNER_OWNED_FLAGS:
            raise ValueError(
                f"[{i}] = {json.dumps(token)}: the fleet sets {name} itself; {PLANNER_OWNED_FLAGS[name]} "
                "(extraArgs may only add flags)"
            )
    return values


class ServingSection(Section):
    quantization: QuantizationName = Field(description="weight format; must match a quantized checkpoint's config.json")
    max_model_len: int = Field(ge=256, le=1_048_576, description="context length in tokens (--max-model-len)")
    concurrency: int = Field(
        ge=1, le=4096, description="sequences each replica holds at full context (--max-num-seqs)"
    )
    port: int = Field(default=8000, ge=1024, le=65535, description="first replica's port; replica i uses port + i")
    weights_source: WeightSourceName = Field(default="huggingface", description="where nodes read weights at boot")
    weights_s3_uri: str | None = Field(
        default=None,
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/=+-]*)?$",
        description="s3://bucket/prefix/ with the weights (weightsSource s3); "
        "default: s3://vllm-fleet-weights-<account>-<region>/<repo>/<revision>/",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="more vllm serve flags, only ones the planner does not set; checked by vLLM's parser",
    )
    shutdown_timeout_s: int = Field(default=120, ge=5, le=3600, description="drain time for in-flight requests")

    @field_validator("extra_args")
    @classmethod
    def _only_adds(cls, values: list[str]) -> list[str]:
        return _check_extra_args(values)


class CapacitySection(Section):
    min_replicas: int = Field(default=1, ge=0, le=64, description="replicas always running (and billed)")
    max_replicas: int = Field(default=1, ge=1, le=64, description="most replicas autoscaling may run")
    instance_types: list[str] = Field(
        default_factory=list,
        description="allowed instance types or families (e.g. p5, g6e.12xlarge); empty: all",
    )
    market: Market = Field(default="on-demand", description="how GPU nodes are bought")
    on_demand_base: int = Field(default=1, ge=0, description="replicas always on demand (spot market)")
    capacity_reservation_id: str | None = Field(
        default=None, pattern=r"^cr-[0-9a-f]{8,17}$", description="market capacity-block: the reservation"
    )
    max_nodes_per_replica: int = Field(default=4, ge=1, le=16, description="most nodes one replica may span")

    @model_validator(mode="after")
    def _min_le_max(self) -> CapacitySection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas {self.min_replicas} exceeds maxReplicas {self.max_replicas}"
            )
        if self.market == "capacity-block" and not self.capacity_reservation_id:
            raise ValueError("market capacity-block needs capacityReservationId")
        if self.market == "spot" and self.on_demand_base > self.max_replicas:
            raise ValueError(
                f"onDemandBase {self.on_demand_base} exceeds maxReplicas {self.max_replicas}: every replica "
                f"would run on demand, none on spot (allowed: 0..{self.max_replicas}, or market: on-demand)"
            )
        return self


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR block like 10.0.0.0/16") from None
    return value


# EC2 resource ids: a prefix and 8 or 17 hex digits (the vpc- pattern above uses the same rule).
SUBNET_ID_PATTERN = r"^subnet-[0-9a-f]{8,17}$"


class NetworkSection(Section):
    mode: Literal["new", "existing"] = Field(default="new", description="create a VPC, or use vpcId")
    vpc_cidr: str = Field(default="10.42.0.0/16", description="mode new: the VPC's CIDR block")
    availability_zones: int = Field(default=2, ge=2, le=6, description="mode new: AZs spanned")
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$", description="mode existing: the VPC")
    private_subnet_ids: list[Annotated[str, Field(pattern=SUBNET_ID_PATTERN)]] = Field(default_factory=list)
    public_subnet_ids: list[Annotated[str, Field(pattern=SUBNET_ID_PATTERN)]] = Field(default_factory=list)
    egress: Literal["nat", "endpoints-only"] = Field(
        default="nat", description="nat: NAT gateway per AZ; endpoints-only: VPC endpoints, no internet"
    )

    _cidr = field_validator("vpc_cidr")(_check_cidr)

    @model_validator(mode="after")
    def _existing_needs_ids(self) -> NetworkSection:
        if self.mode == "existing" and (not self.vpc_id or len(self.private_subnet_ids) < 2):
            raise ValueError("mode existing needs vpcId and at least 2 privateSubnetIds")
        return self


class EndpointSection(Section):
    type: Literal["alb", "nlb"] = Field(default="alb", description="load balancer kind; nlb only internal")
    internal: bool = Field(default=True, description="reachable only inside the VPC (and allowedCidrs)")
    plain_http: bool = Field(
        default=False,
        description="serve plain HTTP on port 80 without certificateArn; internal endpoints only "
        "(the API key then crosses the network in clear text)",
    )
    allowed_cidrs: list[str] = Field(
        default_factory=lambda: ["10.0.0.0/8"], description="client networks allowed to call the API"
    )
    certificate_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[a-z-]*:acm:", description="ACM certificate in the stack's region (TLS on 443)"
    )
    idle_timeout_s: int = Field(default=600, ge=60, le=4000, description="load balancer idle timeout")

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        return [_check_cidr(v) for v in values]


class MonitoringSection(Section):
    mode: Literal["self-hosted", "managed", "shared", "none"] = Field(
        default="self-hosted", description="self-hosted host, AMP/AMG (managed), another stack's, or none"
    )
    allowed_cidrs: list[str] = Field(default_factory=list, description="networks allowed to reach Grafana")
    ttft_p95_slo_s: float = Field(
        default_factory=lambda: perf_facts().workload_defaults.ttft_p95_ms / 1000, gt=0,
        description="alert when p95 time to first token exceeds it; also the plan's TTFT target unless "
        "workload.ttftP95Ms says",
    )
    sns_topic_arn: str | None = Field(
        default=None, pattern=r"^arn:aws[a-z-]*:sns:", description="alerts go here (same region)"
    )
    webhook_url: str | None = Field(default=None, pattern=r"^https://", description="alerts go here too")
    shared_stack: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$",
        description="mode shared: the stack whose monitoring this fleet uses (org/project/stack)",
    )

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        return [_check_cidr(v) for v in values]

    @model_validator(mode="after")
    def _alerts_go_somewhere(self) -> MonitoringSection:
        if self.mode != "none" and not (self.sns_topic_arn or self.webhook_url):
            raise ValueError("alerts need a receiver: give snsTopicArn, webhookUrl or both (or mode: none)")
        if (self.mode == "shared") != (self.shared_stack is not None):
            raise ValueError("sharedStack is required with mode shared, and allowed only there")
        return self


class ImageSection(Section):
    ami_id: str | None = Field(default=None, pattern=r"^ami-[0-9a-f]{8,17}$", description="the node image")
    ssm_parameter: str | None = Field(
        default=None, pattern=r"^/", description="an SSM parameter holding the node image's id (the images stack writes it)"
    )


class WorkloadSection(Section):
    """What requests look like and what users must get; the planner sizes batches and
    replicas for it. Unset keys take infra/facts/data/perf_model.yaml's workload_defaults."""

    input_tokens: int | None = Field(default=None, ge=1, description="typical prompt tokens")
    output_tokens: int | None = Field(default=None, ge=1, description="typical output tokens")
    peak_requests_per_s: float | None = Field(default=None, gt=0, description="peak arrival rate")
    concurrent_users: int | None = Field(
        default=None, ge=1, description="requests in flight at peak (instead of peakRequestsPerS)"
    )
    ttft_p95_ms: float | None = Field(default=None, gt=0, description="default: monitoring.ttftP95SloS")
    itl_p95_ms: float | None = Field(default=None, gt=0, description="inter-token latency p95 target")

    @model_validator(mode="after")
    def _one_peak(self) -> WorkloadSection:
        if self.peak_requests_per_s is not None and self.concurrent_users is not None:
            raise ValueError("give peakRequestsPerS or concurrentUsers, not both")
        return self


class ScalingSection(Section):
    metric: Literal["waiting-requests", "kv-cache-usage"] = Field(
        default="waiting-requests", description="what autoscaling tracks (docs/scaling.md)"
    )
    target: float | None = Field(default=None, gt=0, description="default derived from the plan")
    night_floor: int | None = Field(default=None, ge=0, description="replicas kept 22:00-07:00 UTC")


_STACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


def _check_stack_name(value: str) -> str:
    if not _STACK_NAME.fullmatch(value):
        raise ValueError(f"{value!r} must start with a letter and hold only letters, digits and dashes")
    return value


class StackConfig(Section):
    """All of a stack's ``vllm-fleet:*`` keys, plus the provider region."""

    stack: str
    region: str = Field(pattern=REGION_PATTERN)
    model: ModelSection
    serving: ServingSection
    capacity: CapacitySection = CapacitySection()
    network: NetworkSection = NetworkSection()
    endpoint: EndpointSection = EndpointSection()
    monitoring: MonitoringSection = MonitoringSection(mode="none")
    image: ImageSection = ImageSection()
    scaling: ScalingSection = ScalingSection()
    workload: WorkloadSection = WorkloadSection()
    tags: dict[str, str] = Field(default_factory=dict, description="added to every resource")

    _stack_name = field_validator("stack")(_check_stack_name)

    def resolved_workload(self) -> Workload:
        """The workload the plan is made for: stated keys, else the data's defaults."""
        work, defaults = self.workload, perf_facts().workload_defaults
        return Workload(
            input_tokens=work.input_tokens or defaults.input_tokens,
            output_tokens=work.output_tokens or defaults.output_tokens,
            ttft_p95_ms=work.ttft_p95_ms or self.monitoring.ttft_p95_slo_s * 1000,
            itl_p95_ms=work.itl_p95_ms or defaults.itl_p95_ms,
            peak_requests_per_s=work.peak_requests_per_s,
            concurrent_users=work.concurrent_users,
        )


# --- image-build stacks: `vllm-fleet:bake` instead of model/serving ---------------------------
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/=-]*)?$"
# Image Builder schedules are six-field cron expressions
# (https://docs.aws.amazon.com/imagebuilder/latest/userguide/cron-expressions.html).
CRON_PATTERN = r"^cron\(\S+( \S+){5}\)$"


class WeightsStagingSection(Section):
    """Weights the bake stages into the image at /opt/models/<modelName>."""

    source: Literal["s3", "huggingface"]
    uri: str | None = Field(default=None, pattern=S3_URI_PATTERN, description="source s3: s3://bucket/prefix/")
    repo: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$", description="source huggingface: org/name"
    )
    revision: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{40}$", description="source huggingface: the 40-hex commit sha"
    )
    model_name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="directory under /opt/models; a fleet serves /opt/models/<its model.catalog name>",
    )
    size_gib: float = Field(gt=0, description="on-disk size of the weights, for the root volume")
    hf_token_secret_id: str | None = Field(
        default=None, description="source huggingface: Secrets Manager secret with a Hugging Face token (gated repos)"
    )
    expected_manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _source_fields(self) -> WeightsStagingSection:
        if self.source == "s3" and (not self.uri or self.repo or self.revision):
            raise ValueError("source s3 takes uri (s3://bucket/prefix/), not repo or revision")
        if self.source == "huggingface":
            if not self.repo or self.uri:
                raise ValueError("source huggingface takes repo (org/name), not uri")
            if not self.revision:
                raise ValueError("source huggingface needs revision, the repo's 40-hex commit sha")
        return self


class PrewarmSection(Section):
    """Serve once at bake time with the fleet's flags, so vLLM's compile caches ship in the image."""

    enabled: bool = False
    serve_args: list[str] = Field(default_factory=list)
    model_path: str | None = Field(default=None, description="default: the staged weights' directory")
    timeout_s: int = Field(default=3600, gt=0)

    @model_validator(mode="after")
    def _settings_need_enabled(self) -> PrewarmSection:
        if not self.enabled and (self.serve_args or self.model_path):
            raise ValueError("serveArgs and modelPath apply only with enabled: true")
        return self


class BakeSection(Section):
    """What the image bakes; infra/plan/images.py checks it against images/facts.yaml and the vLLM pin."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="e.g. vllm-0-32-0")
    base_image: str = Field(default=DEFAULT_BASE_IMAGE, description="a key of images/facts.yaml base_images")
    build_instance_type: str = Field(default=DEFAULT_BUILD_INSTANCE_TYPE, description="the instance that bakes")
    multi_node: bool = Field(default=False, description="Ray and the EFA/aws-ofi-nccl check")
    weights: WeightsStagingSection | None = None
    prewarm: PrewarmSection = PrewarmSection()
    schedule: str | None = Field(default=None, pattern=CRON_PATTERN, description="e.g. cron(0 6 ? * mon *)")
    build_on_deploy: bool = Field(default=False, description="`pulumi up` builds one image (hours)")


class ImagesStackConfig(Section):
    """An image-build stack: ``vllm-fleet:bake`` (plus network and tags), the provider region."""

    stack: str
    region: str = Field(pattern=REGION_PATTERN)
    bake: BakeSection
    network: NetworkSection = NetworkSection()
    tags: dict[str, str] = Field(default_factory=dict)

    _stack_name = field_validator("stack")(_check_stack_name)


def int_range(section: type[BaseModel], name: str) -> tuple[int, int]:
    """A stack key's allowed integer range, from its Field(ge=…, le=…): CLI flags share it."""
    low, high = 1, 2**31 - 1
    for meta in section.model_fields[name].metadata:
        ge, le = getattr(meta, "ge", None), getattr(meta, "le", None)
        low = int(ge) if ge is not None else low
        high = int(le) if le is not None else high
    return low, high


# Config keys a stack file may carry besides ours: provider settings that Pulumi itself reads.
FOREIGN_NAMESPACES = ("aws:", "pulumi:", "random:")


def _key_path(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into the key as written in the stack file."""
    head, *rest = [str(p) for p in loc] or ["stack"]
    if head == "region":
        return "aws:region"
    if head == "stack":
        return "stack name"
    key = f"{PROJECT}:{head}"
    for part in rest:
        key += f"[{part}]" if part.isdigit() else f".{part}"
    return key


def _lookup(raw: dict[str, Any], loc: tuple[int | str, ...]) -> Any:
    node: Any = raw
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            node = node[part]
        else:
            return None
    return node


def _allowed_keys(loc: tuple[int | str, ...], root: type[BaseModel] = StackConfig) -> list[str]:
    """The camelCase keys allowed where an unknown key was found."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        # Optional sections (X | None) name their model among the union's members.
        annotation = field.annotation if field is not None else None
        members = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type)]
        sections = [a for a in members if issubclass(a, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return [f.alias or name for name, f in model.model_fields.items()]


def _one_line(err: ValidationError, raw: dict[str, Any], root: type[BaseModel] = StackConfig) -> str:
    errors = err.errors()
    # A typo'd key also makes the real key "missing": report the typo, it is the cause.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc, root)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{_key_path(loc)}: unknown key ({hint}allowed: {', '.join(allowed)})"
    if first["type"] == "missing":
        return f"{_key_path(loc)}: required key is missing"
    item = re.match(r"\[(\d+)\] = ", message)
    if item:  # a list validator named the item: point at it, not at the whole list
        loc = (*loc, int(item.group(1)))
        message = message.split(": ", 1)[1]
    value = _lookup(raw, loc)
    shown = f" = {json.dumps(value)}" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{_key_path(loc)}{shown}: {message}{_allowed_hint(first)}"


def _allowed_hint(error: Any) -> str:
    """pydantic's strict type errors say what came, not what is allowed: add it."""
    expected = {
        "int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
        "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
        "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
    }.get(error["type"])
    return f" (allowed: {expected})" if expected else ""


BAKE_KEY = f"{PROJECT}:bake"


def is_images_stack(values: dict[str, Any]) -> bool:
    """An image-build stack carries ``vllm-fleet:bake`` (and no model or serving)."""
    return BAKE_KEY in values


def parse_any_stack_config(stack: str, values: dict[str, Any]) -> StackConfig | ImagesStackConfig:
    """A fleet stack or an image-build stack, by its keys."""
    if is_images_stack(values):
        return _parse_images_stack_config(stack, values)
    return parse_stack_config(stack, values)


def parse_stack_config(stack: str, values: dict[str, Any]) -> StackConfig:
    """Validate a fleet stack's config mapping (keys as in the file: ``vllm-fleet:model``…)."""
    if is_images_stack(values):
        raise FleetError(
            f"{BAKE_KEY}: stack {stack!r} is an image-build stack; this needs a fleet stack "
            f"({PROJECT}:model, {PROJECT}:serving …)"
        )
    ours = _our_values(stack, values)
    try:
        config = StackConfig.model_validate(ours)
    except ValidationError as err:
        raise FleetError(_one_line(err, ours)) from None
    validate_cross_keys(config, set(ours))
    validate_against_catalog(config)
    validate_workload(config)
    return config


def _parse_images_stack_config(stack: str, values: dict[str, Any]) -> ImagesStackConfig:
    ours = _our_values(stack, values)
    try:
        return ImagesStackConfig.model_validate(ours)
    except ValidationError as err:
        raise FleetError(_one_line(err, ours, ImagesStackConfig)) from None


def _our_values(stack: str, values: dict[str, Any]) -> dict[str, Any]:
    ours: dict[str, Any] = {"stack": stack}
    for key, value in values.items():
        if key == "aws:region":
            ours["region"] = value
        elif key.startswith(f"{PROJECT}:"):
            ours[key.split(":", 1)[1]] = value
        elif not key.startswith(FOREIGN_NAMESPACES):
            raise FleetError(
                f"{key}: unknown config key (allowed: {PROJECT}:<section>, aws:*, pulumi:*)"
            )
    if "region" not in ours:
        raise FleetError("aws:region: required key is missing (e.g. us-east-1)")
    return ours


def validate_workload(config: StackConfig) -> None:
    """Cross-section checks of vllm-fleet:workload (one line each, naming the key)."""
    work = config.workload
    if (
        work.ttft_p95_ms is not None and "ttft_p95_slo_s" in config.monitoring.model_fields_set
        and abs(work.ttft_p95_ms - config.monitoring.ttft_p95_slo_s * 1000) > 1e-6
    ):
        raise FleetError(
            f"{PROJECT}:workload.ttftP95Ms = {work.ttft_p95_ms:g}: disagrees with "
            f"{PROJECT}:monitoring.ttftP95SloS = {config.monitoring.ttft_p95_slo_s:g}; state the TTFT SLO once"
        )
    if work.ttft_p95_ms is not None and config.monitoring.mode != "none":
        # The alert measures p95 from vLLM's TTFT histogram: the SLO must be one of its bounds.
        from infra.facts.vllm_metrics import default_metric_catalog

        bounds = default_metric_catalog().bucket_bounds("vllm:time_to_first_token_seconds")
        if work.ttft_p95_ms / 1000 not in bounds:
            raise FleetError(
                f"{PROJECT}:workload.ttftP95Ms = {work.ttft_p95_ms:g}: the TTFT alert needs a bucket bound of "
                f"vllm:time_to_first_token_seconds (ms: {', '.join(f'{b * 1000:g}' for b in bounds)})"
            )
    resolved = config.resolved_workload()
    total = resolved.input_tokens + resolved.output_tokens
    if total > config.serving.max_model_len:
        unset = work.input_tokens is None or work.output_tokens is None
        raise FleetError(
            f"{PROJECT}:workload.inputTokens + outputTokens = {resolved.input_tokens} + {resolved.output_tokens}"
            f"{' (defaults fill what is unset)' if unset else ''}: exceeds "
            f"{PROJECT}:serving.maxModelLen {config.serving.max_model_len}"
        )


def check_region(region: str, key: str) -> None:
    """A Region the pinned SDK knows (infra/facts/data/regions.yaml), or one line with the closest."""
    regions = known_regions()
    if region not in regions:
        close = difflib.get_close_matches(region, list(regions), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise FleetError(
            f"{key} = {json.dumps(region)}: not an AWS Region the pinned SDK knows "
            f"({hint}allowed: {', '.join(r for r, p in regions.items() if p == 'aws')}, and the China and GovCloud regions)"
        )


def validate_cross_keys(config: StackConfig, given: set[str]) -> None:
    """Checks across sections, each naming the key to change. ``given``: the sections the file sets."""
    check_region(config.region, "aws:region")
    for key, arn in (
        ("endpoint.certificateArn", config.endpoint.certificate_arn),
        ("monitoring.snsTopicArn", config.monitoring.sns_topic_arn),
    ):
        arn_region = arn.split(":")[3] if arn and arn.count(":") >= 5 else None
        if arn is not None and arn_region != config.region:
            raise FleetError(
                f"{PROJECT}:{key} = {json.dumps(arn)}: in region {arn_region or '(none)'}, but the stack is in "
                f"{config.region}; the load balancer and alarms can use only resources of their own region"
            )
    endpoint = config.endpoint
    if endpoint.certificate_arn is None and not endpoint.plain_http:
        raise FleetError(
            f"{PROJECT}:endpoint.certificateArn: required (the endpoint serves TLS on 443). Get one with "
            f"`aws acm request-certificate --domain-name llm.example.com --validation-method DNS --region {config.region}` "
            "and its DNS validation record (docs/first-deploy.md), or set endpoint.plainHttp: true for an "
            "internal test endpoint"
        )
    if endpoint.plain_http and endpoint.certificate_arn is not None:
        raise FleetError(f"{PROJECT}:endpoint.plainHttp = true: contradicts certificateArn; remove one of them")
    if endpoint.plain_http and not endpoint.internal:
        raise FleetError(
            f"{PROJECT}:endpoint.plainHttp = true: allowed only with internal: true (a public endpoint must use TLS)"
        )
    if "monitoring" not in given:
        raise FleetError(
            f"{PROJECT}:monitoring: required key is missing: every fleet gets Prometheus, Grafana and alerts "
            "(mode: self-hosted with snsTopicArn or webhookUrl), unless the stack says mode: none"
        )


def validate_against_catalog(config: StackConfig) -> None:
    """Cross-checks that need the fact catalogs: names must exist there."""
    catalog = default_catalog()
    if config.model.catalog is not None and config.model.catalog not in catalog.models:
        raise FleetError(
            f"{PROJECT}:model.catalog = {json.dumps(config.model.catalog)}: not in the model catalog "
            f"(allowed: {', '.join(sorted(catalog.models))}; or give repo + configJson)"
        )
    known = set(catalog.instances) | {it.family for it in catalog.instances.values()}
    for i, name in enumerate(config.capacity.instance_types):
        if name not in known:
            raise FleetError(
                f"{PROJECT}:capacity.instanceTypes[{i}] = {json.dumps(name)}: unknown instance type "
                f"or family (allowed: {', '.join(sorted(known))})"
            )


def stack_file(stack: str, stacks_dir: Path = STACKS_DIR) -> Path:
    return stacks_dir / f"Pulumi.{stack}.yaml"


def load_stack_file(stack: str, stacks_dir: Path = STACKS_DIR) -> StackConfig:
    """Read the fleet stack ``stacks/Pulumi.<stack>.yaml`` without the Pulumi engine."""
    return parse_stack_config(stack, _stack_file_values(stack, stacks_dir))


def load_any_stack_file(stack: str, stacks_dir: Path = STACKS_DIR) -> StackConfig | ImagesStackConfig:
    """Read a fleet or image-build stack file without the Pulumi engine."""
    return parse_any_stack_config(stack, _stack_file_values(stack, stacks_dir))


def stack_names(kind: Literal["fleet", "images"], stacks_dir: Path = STACKS_DIR) -> list[str]:
    """The stacks of one kind that ``stacks_dir`` holds, sorted."""
    names = sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in stacks_dir.glob("Pulumi.*.yaml"))
    return [n for n in names if is_images_stack(_stack_file_values(n, stacks_dir)) == (kind == "images")]


def _stack_file_values(stack: str, stacks_dir: Path) -> dict[str, Any]:
    path = stack_file(stack, stacks_dir)
    if not _STACK_NAME.fullmatch(stack):
        raise FleetError(f"stack {stack!r}: must start with a letter and hold only letters, digits and dashes")
    if path_kind(path, "--stacks-dir") != "file":
        available = (
            sorted(p.name[len("Pulumi.") : -len(".yaml")] for p in stacks_dir.glob("Pulumi.*.yaml"))
            if path_kind(stacks_dir, "--stacks-dir") == "dir" else []
        )
        raise FleetError(f"stack {stack!r}: no file {path} (stacks here: {', '.join(available)})")
    try:
        doc = load_yaml_strict(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise FleetError(f"{path}: not UTF-8 text (a stack file is YAML)") from None
    except OSError as err:
        raise FleetError(f"{path}: cannot read it ({err.strerror or err})") from None
    except DuplicateKeyError as err:
        raise FleetError(f"{path} {err}") from None
    except RecursionError:
        raise FleetError(f"{path}: nested too deeply to be a stack file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FleetError(f"{path}{where}: not valid YAML") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise FleetError(f"{path}: expected a mapping with a 'config:' section")
    unknown_top = set(doc) - {"config", "environment", "secretsprovider", "encryptedkey", "encryptionsalt"}
    if unknown_top:
        raise FleetError(f"{path}: unknown top-level key {min(unknown_top)!r} (allowed: config)")
    config: dict[str, Any] = doc["config"]
    return config


def resolve_model(config: StackConfig, stacks_dir: Path = STACKS_DIR) -> tuple[str, ModelArch]:
    """The model's display name and architecture, from the catalog or its config.json."""
    section = config.model
    catalog = default_catalog()
    if section.catalog is not None:
        return section.catalog, catalog.models[section.catalog]
    if section.architecture is not None:
        doc, source = section.architecture, f"inline in {stack_file(config.stack, stacks_dir)}"
    else:
        assert section.config_json is not None
        path = Path(section.config_json)
        if not path.is_absolute():
            path = stacks_dir.parent / path
        doc, source = load_config_json(path, key=f"{PROJECT}:model.configJson"), str(path)
    key = f"{PROJECT}:model." + ("architecture" if section.architecture is not None else "configJson")
    return str(section.repo), arch_from_config_doc(doc, source=source, repo=section.repo, key=key)


def load_config_json(path: Path, *, key: str) -> dict[str, Any]:
    """A model's config.json (or the directory holding it) as a mapping; every failure is one line."""
    shown = json.dumps(str(path))
    kind = path_kind(path, key)
    if kind == "dir":
        if path_kind(path / "config.json", key) != "file":
            raise FleetError(f"{key} = {shown}: a directory without a config.json (give the file or its directory)")
        path = path / "config.json"
    elif kind == "other":
        raise FleetError(f"{key} = {shown}: not a regular file (give a config.json or its directory)")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicate_json_keys)
    except FileNotFoundError:
        raise FleetError(f"{key} = {shown}: file not found") from None
    except UnicodeDecodeError:
        raise FleetError(f"{key} = {shown}: not UTF-8 text (a config.json is JSON)") from None
    except OSError as err:
        raise FleetError(f"{key} = {shown}: cannot read it ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise FleetError(f"{key} = {shown}: not JSON ({err.msg} at line {err.lineno})") from None
    except DuplicateKeyError as err:
        raise FleetError(f"{key} = {shown}: {err}") from None
    except RecursionError:
        raise FleetError(f"{key} = {shown}: nested too deeply to be a config.json") from None
    if not isinstance(doc, dict):
        raise FleetError(f"{key} = {shown}: expected a JSON object")
    return doc


def path_kind(path: Path, key: str) -> Literal["file", "dir", "missing", "other"]:
    """What a user-given path is, without following it into an error: a name too long, a NUL
    byte or a symlink loop is one line naming ``key``, never an OSError traceback."""
    shown = json.dumps(str(path))
    if "\0" in str(path):
        raise FleetError(f"{key} = {shown}: a path cannot contain a NUL character")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"
    except OSError as err:
        raise FleetError(f"{key} = {shown}: cannot use this path ({err.strerror or err})") from None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


class DuplicateKeyError(ValueError):
    """A mapping names the same key twice: JSON and YAML parsers keep the last one silently."""


def _no_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise DuplicateKeyError(f"field {key!r} is given twice (a parser would silently keep the last)")
        doc[key] = value
    return doc


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _construct_unique_mapping(loader: _StrictYamlLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key (a list as key): SafeLoader refuses it below
            continue
        if duplicate:
            raise DuplicateKeyError(
                f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (YAML would silently keep the last)"
            )
    return loader.construct_mapping(node, deep=deep)


_StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_strict(text: str) -> Any:
    """YAML as safe_load reads it, but a duplicate key is an error (DuplicateKeyError)."""
    return yaml.load(text, Loader=_StrictYamlLoader)


def arch_from_config_doc(doc: dict[str, Any], *, source: str, repo: str | None, key: str) -> ModelArch:
    """The architecture a config.json describes; a bad field is one line naming ``key`` and the field."""
    try:
        return arch_from_hf_config(doc, source=source, hf_repo=repo)
    except (ValueError, TypeError, ValidationError) as err:
        detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
        raise FleetError(f"{key} ({source}): {detail}") from None


# Quantizations vLLM reads from a quantized checkpoint (the others quantize 16-bit weights at load).
PRE_QUANTIZED = ("awq", "gptq", "int8")


def check_serving_fits_model(
    arch: ModelArch, quantization: str, max_model_len: int, *, quant_key: str, len_key: str, from_config_json: bool
) -> None:
    """What config.json says about the checkpoint binds the serving keys: a checkpoint quantized
    as AWQ is served and sized as AWQ, and the context is what its RoPE settings allow."""
    declared = arch.checkpoint_quantization
    if declared is not None and declared != quantization:
        raise FleetError(
            f"{quant_key} = {json.dumps(quantization)}: the checkpoint's config.json declares "
            f"quantization_config for {declared}; set {declared} (vLLM loads the weights as the checkpoint stores them)"
        )
    # A catalog entry describes the base model, whose quantized checkpoints the catalog does not
    # list; a config.json describes the very checkpoint vLLM will load.
    if declared is None and quantization in PRE_QUANTIZED and from_config_json:
        raise FleetError(
            f"{quant_key} = {json.dumps(quantization)}: the checkpoint's config.json has no quantization_config; "
            f"{quantization} needs a checkpoint quantized that way (allowed here: fp16, bf16, fp8)"
        )
    limit = arch.context_limit
    if max_model_len > limit:
        why = arch.context_source or f"max_position_embeddings {limit}"
        raise FleetError(f"{len_key} = {max_model_len}: above the model's limit {limit} (allowed: up to {limit}; from {why})")
