"""Typed stack config: every stack parses; every bad value is one line naming key, value and rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import STACKS_DIR, load_stack_file, parse_stack_config, resolve_model, stack_names
from infra.errors import FleetError

STACKS = stack_names("fleet")  # image-build stacks have no model to plan


def base_values() -> dict[str, Any]:
    doc = yaml.safe_load((STACKS_DIR / "Pulumi.dev-8b.yaml").read_text())
    return copy.deepcopy(doc["config"])


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_file_parses(stack: str) -> None:
    config = load_stack_file(stack)
    assert config.stack == stack
    assert config.serving.max_model_len >= 256


def error_for(mutate: Any) -> str:
    values = base_values()
    mutate(values)
    with pytest.raises(FleetError) as err:
        parse_stack_config("dev-8b", values)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_unknown_section_key_names_it() -> None:
    msg = error_for(lambda v: v["vllm-fleet:serving"].update(maxModelLenn=4096))
    assert "vllm-fleet:serving.maxModelLenn" in msg and "unknown key" in msg


def test_unknown_top_level_key_names_it() -> None:
    msg = error_for(lambda v: v.update({"vllm-fleet:servign": {}}))
    assert "vllm-fleet:servign" in msg


def test_foreign_namespace_is_refused() -> None:
    msg = error_for(lambda v: v.update({"vllmfleet:model": {}}))
    assert "vllmfleet:model" in msg


def test_bad_quantization_lists_the_allowed_values() -> None:
    msg = error_for(lambda v: v["vllm-fleet:serving"].update(quantization="int4"))
    assert 'vllm-fleet:serving.quantization = "int4"' in msg
    assert "awq" in msg and "fp8" in msg


def test_bad_cidr_names_the_list_entry() -> None:
    msg = error_for(lambda v: v["vllm-fleet:endpoint"].update(allowedCidrs=["10.0.0.0/33"]))
    assert "vllm-fleet:endpoint.allowedCidrs" in msg and "CIDR" in msg


def test_min_above_max_replicas() -> None:
    msg = error_for(lambda v: v["vllm-fleet:capacity"].update(minReplicas=5, maxReplicas=2))
    assert "minReplicas 5 exceeds maxReplicas 2" in msg


def test_unknown_instance_type() -> None:
    msg = error_for(lambda v: v["vllm-fleet:capacity"].update(instanceTypes=["g6e.xlarge", "p9.huge"]))
    assert 'instanceTypes[1] = "p9.huge"' in msg


def test_unknown_catalog_model_lists_the_catalog() -> None:
    msg = error_for(lambda v: v["vllm-fleet:model"].update(catalog="llama-9"))
    assert '"llama-9"' in msg and "llama-3.1-8b" in msg


def test_missing_region() -> None:
    msg = error_for(lambda v: v.pop("aws:region"))
    assert "aws:region" in msg and "missing" in msg


def test_wrong_type_names_value() -> None:
    msg = error_for(lambda v: v["vllm-fleet:serving"].update(maxModelLen="lots"))
    assert 'vllm-fleet:serving.maxModelLen = "lots"' in msg


def test_model_from_inline_config_json_honours_head_dim() -> None:
    values = base_values()
    values["vllm-fleet:model"] = {
        "repo": "example/nemo-like",
        "architecture": {
            "architectures": ["MistralForCausalLM"], "hidden_size": 5120, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 40, "vocab_size": 131072,
            "intermediate_size": 14336, "max_position_embeddings": 131072,
        },
    }
    config = parse_stack_config("dev-8b", values)
    _, arch = resolve_model(config)
    assert arch.head_dim == 128  # not 5120 / 32 = 160


def test_model_from_config_json_path(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "intermediate_size": 14336, "max_position_embeddings": 131072,
    }))
    values = base_values()
    values["vllm-fleet:model"] = {"repo": "example/llama-like", "configJson": str(cfg)}
    _, arch = resolve_model(parse_stack_config("dev-8b", values))
    assert arch.params == pytest.approx(8.03e9, rel=0.01)


def test_model_needs_exactly_one_source() -> None:
    msg = error_for(lambda v: v["vllm-fleet:model"].update(configJson="x.json"))
    assert "exactly one of catalog, configJson or architecture" in msg


def test_missing_stack_file_lists_stacks(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="stacks here: .*prod-70b"):
        load_stack_file("prod-7b")
