"""The tiny test model is deterministic, loads with transformers, and renders chat."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from infra.facts.catalog import arch_from_hf_config
from tests.support.tiny_model import EOS, TINY_LLAMA_CONFIG, write_tiny_llama


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_bytes_every_time(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert digests(write_tiny_llama(tmp_path / "again")) == digests(tiny_llama_dir)


def test_architecture(tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    arch = arch_from_hf_config(config, source="tiny test model")
    assert arch.architecture == "LlamaForCausalLM"
    assert (arch.hidden_size, arch.intermediate_size, arch.num_layers) == (256, 512, 2)
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 64)
    assert arch.vocab_size == TINY_LLAMA_CONFIG["vocab_size"]
    assert arch.torch_dtype == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tiny_llama_dir / "model.safetensors"), framework="pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    assert parameters == arch.params  # arch_from_hf_config's count matches the real tensors


def test_tokenizer_and_chat_template(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert len(tokenizer) <= TINY_LLAMA_CONFIG["vocab_size"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str) and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Hello fleet!", add_special_tokens=False)) == "Hello fleet!"
    assert tokenizer.eos_token == EOS


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
)
def test_files_present(tiny_llama_dir: Path, name: str) -> None:
    assert (tiny_llama_dir / name).stat().st_size > 0
