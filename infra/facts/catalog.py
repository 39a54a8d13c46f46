"""Typed access to the fact catalogs in ``infra/facts/data/*.yaml``.

Code holds no tables of facts: every number the planner uses is read from a data
file here, and every entry in those files names its source and the date it was read.
The schemas are strict (unknown keys are errors) so a typo in a catalog fails loudly.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.facts.fact import Cited, read_yaml


class ModelArch(Cited):
    """Architecture facts of one model, as its Hugging Face config.json states them."""

    hf_repo: str
    architecture: str
    params: int = Field(gt=0, description="total parameters, including embeddings")
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    head_dim_in_config: bool = Field(
        default=False,
        description="config.json states head_dim; otherwise head_dim = hidden_size / num_attention_heads",
    )
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    max_context: int | None = Field(
        default=None, gt=0,
        description="longest context vLLM accepts (max_position_embeddings scaled by rope_scaling); "
        "default: max_position_embeddings",
    )
    context_source: str | None = Field(default=None, description="how max_context follows from config.json")
    checkpoint_quantization: str | None = Field(
        default=None, description="the quantization config.json's quantization_config declares"
    )
    tie_word_embeddings: bool = False
    num_experts: int | None = Field(default=None, gt=0)
    num_experts_per_tok: int | None = Field(default=None, gt=0)
    torch_dtype: str = "bfloat16"
    params_source: str | None = None

    @model_validator(mode="after")
    def _heads_consistent(self) -> ModelArch:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        return self

    @property
    def context_limit(self) -> int:
        return self.max_context or self.max_position_embeddings

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head (unless tied): these stay 16-bit when quantized."""
        per_matrix = self.vocab_size * self.hidden_size
        return per_matrix if self.tie_word_embeddings else 2 * per_matrix


class Quantization(Cited):
    weight_bytes: float = Field(gt=0, le=4, description="bytes per quantized weight, scales included")
    sixteen_bit_layers: list[str]
    min_compute_capability: float = Field(ge=6.0)
    vllm_quantization: str | None = Field(description="value of vLLM's --quantization, or null for none")
    vllm_dtype: Literal["auto", "float16", "bfloat16"]
    kv_cache_dtype_bytes: int = Field(default=2, ge=1, le=2)
    notes: str | None = None


class Gpu(Cited):
    name: str
    memory_gib: float = Field(gt=0, description="total device memory as CUDA reports it")
    compute_capability: float = Field(ge=6.0)
    memory_source: str | None = None


class InstanceType(Cited):
    family: str
    gpu: str = Field(description="key into gpus")
    gpu_count: int = Field(gt=0)
    vcpus: int = Field(gt=0)
    memory_gib: float = Field(gt=0)
    local_nvme_gb: int = Field(ge=0, description="total instance-store NVMe, 0 when EBS only")
    efa_interfaces: int = Field(ge=0, description="maximum EFA interfaces, 0 when EFA unsupported")
    network_gbps: float = Field(gt=0)
    on_demand_usd_per_hour: float | None = Field(
        default=None, gt=0, description="Linux on-demand in us-east-1; null when not sold on demand"
    )
    quota_code: str = Field(pattern=r"^L-[0-9A-F]{8}$", description="Service Quotas on-demand vCPU code")
    spot_quota_code: str = Field(pattern=r"^L-[0-9A-F]{8}$")
    price_source: str | None = None
    unverified_fields: list[str] = Field(
        default_factory=list,
        description="fields whose value no source read for this entry confirmed; re-check before relying on them",
    )

    @model_validator(mode="after")
    def _unverified_names_fields(self) -> InstanceType:
        unknown = sorted(set(self.unverified_fields) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"unverified_fields names unknown fields {unknown}")
        return self


class WeightSource(Cited):
    """Where a node reads model weights from at boot, and how fast."""

    description: str
    throughput_mb_s: float = Field(gt=0, description="sustained read throughput, MB/s (10^6 bytes)")


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelArch]
    quantizations: dict[str, Quantization]
    gpus: dict[str, Gpu]
    instances: dict[str, InstanceType]
    weight_sources: dict[str, WeightSource]

    @model_validator(mode="after")
    def _instances_name_known_gpus(self) -> Catalog:
        for name, it in self.instances.items():
            if it.gpu not in self.gpus:
                raise ValueError(f"instance {name} names unknown gpu {it.gpu!r}")
        return self

    def gpu_of(self, instance_type: str) -> Gpu:
        return self.gpus[self.instances[instance_type].gpu]


DATA_DIR = Path(str(resources.files("infra.facts") / "data"))
CATALOG_FILES = {
    "models": "models.yaml",
    "quantizations": "quantizations.yaml",
    "gpus": "gpus.yaml",
    "instances": "instances.yaml",
    "weight_sources": "weight_sources.yaml",
}


def load_catalog(data_dir: Path = DATA_DIR) -> Catalog:
    parts: dict[str, Any] = {}
    for key, filename in CATALOG_FILES.items():
        doc = read_yaml(data_dir / filename)
        parts[key] = doc[key]
    return Catalog.model_validate(parts)


@cache
def default_catalog() -> Catalog:
    return load_catalog()

# The shape of a Region code in the partitions the fleet deploys to (aws, aws-cn, aws-us-gov):
# botocore/data/endpoints.json partitions[].regionRegex of the pinned botocore,
# "^(us|eu|ap|sa|ca|me|af|il|mx)\-\w+\-\d+$", "^cn\-\w+\-\d+$", "^us\-gov\-\w+\-\d+$".
# A shape check only: known_regions() is the list a stack may name.
REGION_CODE = r"[a-z]{2}(-gov)?-[a-z]+-\d"
REGION_PATTERN = rf"^{REGION_CODE}$"


@cache
def known_regions() -> dict[str, str]:
    """Region code → partition, from infra/facts/data/regions.yaml (the pinned botocore's list)."""
    doc = read_yaml(DATA_DIR / "regions.yaml")
    return {name: entry["partition"] for name, entry in doc["regions"].items()}


class ConfigJsonError(ValueError):
    """A config.json field that cannot describe a model: names the field, its value and what is allowed."""


def _field(name: str, value: Any, allowed: str) -> ConfigJsonError:
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ConfigJsonError(f"config.json field {name} = {shown}: {allowed}")


# Far above any real model's field (vocabularies and contexts are millions at most), low enough
# that the sizing arithmetic stays exact.
MAX_CONFIG_INT = 2**31 - 1


def _positive_int(doc: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    if name not in doc or doc[name] is None:
        if required:
            raise ConfigJsonError(f"config.json has no {name!r} (a positive integer)")
        return None
    value = doc[name]
    # bool is an int in Python, and a float such as 4096.5 is not a layer count.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONFIG_INT:
        raise _field(name, value, f"must be a positive integer up to {MAX_CONFIG_INT}")
    return value


# vLLM 0.32.0 vllm/config/model.py _get_and_verify_max_len: these RoPE types already carry
# the scaled length in max_position_embeddings, so their factor is not applied again; every
# other type (linear, dynamic …) multiplies max_position_embeddings by its factor.
ROPE_TYPES_ALREADY_SCALED = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")

# config.json quantization_config.quant_method → the catalog's quantization name
# (vLLM 0.32.0 vllm/model_executor/layers/quantization/__init__.py method names; the Marlin
# variants are the same checkpoints run by other kernels). compressed-tensors is resolved by
# its weight bits below.
CHECKPOINT_QUANT_METHODS = {"awq": "awq", "awq_marlin": "awq", "gptq": "gptq", "gptq_marlin": "gptq", "fp8": "fp8"}


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The catalog quantization a checkpoint's ``quantization_config`` declares, or None when
    it declares none. A method the fleet cannot plan is refused, naming the field."""
    text_config: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    qc = config.get("quantization_config", text_config.get("quantization_config"))
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _field("quantization_config", qc, "must be an object with quant_method")
    method = qc.get("quant_method")
    if method in CHECKPOINT_QUANT_METHODS:
        return CHECKPOINT_QUANT_METHODS[method]
    if method == "compressed-tensors":
        groups = qc.get("config_groups")
        weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
        found = {(w.get("num_bits"), w.get("type")) for w in weights if isinstance(w, dict)}
        if found == {(8, "int")}:
            return "int8"
        if found == {(8, "float")}:
            return "fp8"
        raise _field(
            "quantization_config.config_groups", sorted(map(str, found)) or None,
            "the fleet plans compressed-tensors checkpoints with 8-bit int (int8) or 8-bit float (fp8) weights",
        )
    allowed = ", ".join([*CHECKPOINT_QUANT_METHODS, "compressed-tensors"])
    raise _field("quantization_config.quant_method", method, f"not one the fleet plans (allowed: {allowed})")


def usable_context(config: dict[str, Any], max_position_embeddings: int) -> tuple[int, str]:
    """The longest --max-model-len the pinned vLLM accepts for this config.json, and why."""
    text_config: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    rope = text_config.get("rope_scaling") or text_config.get("rope_parameters")
    if rope is None:
        return max_position_embeddings, f"max_position_embeddings {max_position_embeddings}"
    if not isinstance(rope, dict):
        raise _field("rope_scaling", rope, "must be an object (rope_type/type, factor)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    if rope_type in ROPE_TYPES_ALREADY_SCALED or rope_type == "default" or factor is None:
        return max_position_embeddings, (
            f"max_position_embeddings {max_position_embeddings} (rope_scaling {rope_type}: vLLM 0.32.0 "
            "applies no factor for this type, it takes max_position_embeddings as already scaled; "
            "raise max_position_embeddings in config.json to serve longer)"
        )
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= 1024:
        raise _field("rope_scaling.factor", factor, "must be a number from 1 to 1024")
    scaled = int(max_position_embeddings * factor)
    return scaled, f"max_position_embeddings {max_position_embeddings} × rope_scaling {rope_type} factor {factor:g}"


def arch_from_hf_config(config: dict[str, Any], *, source: str, hf_repo: str | None = None) -> ModelArch:
    """Build a ModelArch from a Hugging Face ``config.json`` mapping.

    An explicit ``head_dim`` wins over hidden_size / num_attention_heads: models such as
    Mistral-Nemo and Qwen3 set it to something else, and vLLM sizes the KV cache from it.
    ``params`` is not in config.json; it is computed from the architecture (dense and MoE
    decoder layouts), which the catalog tests check against published counts.
    Every field is checked here; a bad one raises ConfigJsonError naming it.
    """
    text_config = config.get("text_config", config)
    if not isinstance(text_config, dict):
        raise _field("text_config", text_config, "must be an object")
    hidden = _req(text_config, "hidden_size")
    heads = _req(text_config, "num_attention_heads")
    layers = _req(text_config, "num_hidden_layers")
    vocab = _req(text_config, "vocab_size")
    intermediate = _req(text_config, "intermediate_size")
    kv_heads = _positive_int(text_config, "num_key_value_heads", required=False) or heads
    explicit_head_dim = _positive_int(text_config, "head_dim", required=False)
    if explicit_head_dim is None and hidden % heads:
        raise _field("hidden_size", hidden, f"must be divisible by num_attention_heads {heads} "
                     "(or give head_dim)")
    head_dim = explicit_head_dim or hidden // heads
    if heads % kv_heads:
        raise _field("num_key_value_heads", kv_heads,
                     f"must divide num_attention_heads {heads}")
    experts = _positive_int(text_config, "num_local_experts", required=False) or _positive_int(
        text_config, "num_experts", required=False)
    per_tok = _positive_int(text_config, "num_experts_per_tok", required=False) if experts else None
    tied_value = text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    if not isinstance(tied_value, bool):
        raise _field("tie_word_embeddings", tied_value, "must be true or false")
    tied = tied_value
    max_pos = _positive_int(text_config, "max_position_embeddings", required=False) or 4096
    context, context_source = usable_context(config, max_pos)
    quantization = checkpoint_quantization(config)
    archs = config.get("architectures") or ["unknown"]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _field("architectures", archs, "must be a list of class names")
    dtype = text_config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if not isinstance(dtype, str):
        raise _field("torch_dtype", dtype, "must be a dtype name such as bfloat16")
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if text_config.get("attention_bias") or text_config.get("model_type") == "qwen2":
        attention += heads * head_dim + 2 * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    per_layer = attention + mlp * (experts or 1) + 2 * hidden
    if experts:
        per_layer += hidden * experts  # router
    embeddings = vocab * hidden * (1 if tied else 2)
    params = layers * per_layer + embeddings + hidden
    name_or_path = config.get("_name_or_path")
    return ModelArch(
        hf_repo=hf_repo or (name_or_path if isinstance(name_or_path, str) and name_or_path else "local"),
        architecture=str(archs[0]),
        params=params,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_in_config=explicit_head_dim is not None,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        max_context=context,
        context_source=context_source,
        checkpoint_quantization=quantization,
        tie_word_embeddings=tied,
        num_experts=experts,
        num_experts_per_tok=per_tok,
        torch_dtype=dtype,
        params_source="computed from config.json by infra.facts.catalog.arch_from_hf_config",
        source=source,
        read=dt.date.today(),
    )


def _req(doc: dict[str, Any], name: str) -> int:
    value = _positive_int(doc, name)
    assert value is not None
    return value
