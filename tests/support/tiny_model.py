"""A tiny random Llama that the real vLLM (CPU build) loads and serves in seconds.

The dimensions are the smallest vLLM's CPU attention accepts (head_dim 64; head_dim 16 is
rejected), with 2 KV heads so grouped-query attention and the KV-per-token formula are
exercised. Weights are random but seeded, and the tokenizer is a byte-level BPE trained
in-process on a fixed text, so the same files come out on every run and nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SEED = 1234
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
# ChatML-style: one turn per message, then the assistant header when asked for a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Fixed training text for the tokenizer: enough words for a few hundred merges.
_CORPUS = [
    "The fleet serves large language models with vLLM on GPU instances.",
    "Each node loads the model weights, then answers chat completions over HTTP.",
    "Tensor parallelism splits every layer across the GPUs of one node.",
    "Pipeline parallelism splits the layers into stages across nodes.",
    "The key value cache holds attention keys and values for every token.",
    "A health check returns two hundred once the server is ready to serve.",
    "Metrics are scraped by Prometheus and drawn on dashboards.",
    "Hello! How are you today? I am fine, thank you. What is the weather like?",
    "One two three four five six seven eight nine ten eleven twelve.",
    "system user assistant: answer briefly and helpfully.",
]


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tokenizer


def write_tiny_llama(directory: Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(TINY_LLAMA_CONFIG["vocab_size"])
    tokenizer.save(str(directory / "tokenizer.json"))

    config = LlamaConfig(
        **TINY_LLAMA_CONFIG,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).bfloat16()
    model.save_pretrained(directory, safe_serialization=True)

    # Written by hand rather than by transformers' save_pretrained, which (in 5.x) moves
    # the chat template to chat_template.jinja; vLLM reads either, the file stays simple.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": TINY_LLAMA_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2) + "\n"
    )
    return directory
