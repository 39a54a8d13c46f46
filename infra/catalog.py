"""Typed access to the fact catalogs in ``infra/data/*.yaml``.

Code holds no tables of facts: every number the planner uses is read from a data
file here, and every entry in those files names its source and the date it was read.
The schemas are strict (unknown keys are errors) so a typo in a catalog fails loudly.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Cited(BaseModel):
    """Every fact carries where it came from and when it was read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=8)
    read: dt.date


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


DATA_DIR = Path(str(resources.files("infra") / "data"))
CATALOG_FILES = {
    "models": "models.yaml",
    "quantizations": "quantizations.yaml",
    "gpus": "gpus.yaml",
    "instances": "instances.yaml",
    "weight_sources": "weight_sources.yaml",
}


def read_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_catalog(data_dir: Path = DATA_DIR) -> Catalog:
    parts: dict[str, Any] = {}
    for key, filename in CATALOG_FILES.items():
        doc = read_yaml(data_dir / filename)
        parts[key] = doc[key]
    return Catalog.model_validate(parts)


@cache
def default_catalog() -> Catalog:
    return load_catalog()


def arch_from_hf_config(config: dict[str, Any], *, source: str, hf_repo: str | None = None) -> ModelArch:
    """Build a ModelArch from a Hugging Face ``config.json`` mapping.

    An explicit ``head_dim`` wins over hidden_size / num_attention_heads: models such as
    Mistral-Nemo and Qwen3 set it to something else, and vLLM sizes the KV cache from it.
    ``params`` is not in config.json; it is computed from the architecture (dense and MoE
    decoder layouts), which the catalog tests check against published counts.
    """
    text_config = config.get("text_config", config)
    try:
        hidden = int(text_config["hidden_size"])
        heads = int(text_config["num_attention_heads"])
        layers = int(text_config["num_hidden_layers"])
        vocab = int(text_config["vocab_size"])
        intermediate = int(text_config["intermediate_size"])
    except KeyError as missing:
        raise ValueError(f"config.json has no {missing.args[0]!r}") from None
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or hidden // heads)
    experts = text_config.get("num_local_experts") or text_config.get("num_experts")
    tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if text_config.get("attention_bias") or text_config.get("model_type") == "qwen2":
        attention += heads * head_dim + 2 * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    per_layer = attention + mlp * (int(experts) if experts else 1) + 2 * hidden
    if experts:
        per_layer += hidden * int(experts)  # router
    embeddings = vocab * hidden * (1 if tied else 2)
    params = layers * per_layer + embeddings + hidden
    archs = config.get("architectures") or ["unknown"]
    return ModelArch(
        hf_repo=hf_repo or str(config.get("_name_or_path") or "local"),
        architecture=str(archs[0]),
        params=params,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_in_config=bool(text_config.get("head_dim")),
        vocab_size=vocab,
        max_position_embeddings=int(text_config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=tied,
        num_experts=int(experts) if experts else None,
        num_experts_per_tok=text_config.get("num_experts_per_tok") if experts else None,
        torch_dtype=str(text_config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
        params_source="computed from config.json by infra.catalog.arch_from_hf_config",
        source=source,
        read=dt.date.today(),
    )
