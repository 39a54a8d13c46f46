"""A real vLLM server (CPU build, tiny model): endpoints, auth, metrics, and KV-cache math."""

from __future__ import annotations

import json
import math
import re
import time
from fractions import Fraction
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.facts.catalog import arch_from_hf_config
from infra.plan.sizing import kv_cache_bytes_per_token
from tests.support.vllm_server import VllmServer, VllmServerError, run_vllm_server

GIB = 1 << 30  # vLLM's GiB_bytes
MAX_TOKENS = 8
# vLLM names the device in front: "CPU KV cache size: 1,048,576 tokens, ..." (GPU build: "GPU").
KV_CACHE_LINE = re.compile(r"\b(?P<device>CPU|GPU) KV cache size: (?P<tokens>[\d,]+) tokens")


def client(server: VllmServer, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=api_key or server.api_key, max_retries=0)


def metric_samples(server: VllmServer, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def generation_tokens(server: VllmServer) -> float:
    samples = metric_samples(server, "vllm:generation_tokens_total")
    return sum(value for labels, value in samples if labels.get("model_name") == server.served_model_name)


def test_health_is_200(vllm_server: VllmServer) -> None:
    print(f"\nvLLM launch to /health 200: {vllm_server.launch_to_healthy_s:.1f} s")
    assert httpx.get(f"{vllm_server.base_url}/health", timeout=10).status_code == 200


def test_api_key_comes_from_the_environment_not_argv(vllm_server: VllmServer) -> None:
    assert "--api-key" not in vllm_server.command
    assert vllm_server.api_key not in " ".join(vllm_server.command)
    assert vllm_server.env["VLLM_API_KEY"] == vllm_server.api_key


def test_a_second_server_is_refused_while_one_runs(vllm_server: VllmServer, tmp_path: Path) -> None:
    started = time.monotonic()
    with (
        pytest.raises(VllmServerError, match="already running"),
        run_vllm_server(vllm_server.argv, api_key="other", log_path=tmp_path / "second.log"),
    ):
        pass
    assert time.monotonic() - started < 5  # refused at once, no wait on our own lock
    assert not (tmp_path / "second.log").exists()


def test_models_needs_the_key(vllm_server: VllmServer) -> None:
    url = f"{vllm_server.openai_base_url}/models"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(vllm_server, api_key="wrong").models.list()
    models = client(vllm_server).models.list()
    assert [model.id for model in models.data] == [vllm_server.served_model_name]


def test_chat_completion(vllm_server: VllmServer) -> None:
    response = client(vllm_server).chat.completions.create(
        model=vllm_server.served_model_name,
        messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},  # random weights: don't let an early EOS shorten the reply
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.prompt_tokens > 0  # the chat template rendered into tokens


def test_streamed_completion(vllm_server: VllmServer) -> None:
    stream = client(vllm_server).completions.create(
        model=vllm_server.served_model_name,
        prompt="The fleet serves",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(texts) > 1, "a streamed completion arrives in several chunks"
    assert "".join(texts)
    assert finish == ["length"]
    assert [u.completion_tokens for u in usage] == [MAX_TOKENS]


def test_metrics_count_generated_tokens(vllm_server: VllmServer) -> None:
    # /metrics is open without the key; it carries vllm:* series labelled with the served name.
    response = httpx.get(f"{vllm_server.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert "vllm:" in response.text
    before = generation_tokens(vllm_server)
    client(vllm_server).completions.create(
        model=vllm_server.served_model_name,
        prompt="Count these tokens",
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    deadline = time.monotonic() + 10  # counters are updated by the output loop, just after the reply
    while generation_tokens(vllm_server) < before + MAX_TOKENS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert generation_tokens(vllm_server) == before + MAX_TOKENS


def test_kv_cache_size_matches_the_planners_bytes_per_token(vllm_server: VllmServer) -> None:
    """vLLM's own KV token count, from its log, equals our formula for the tiny model.

    vLLM (v1/core/kv_cache_utils.py, 0.32.0): num_blocks = kv_memory // bytes_per_block with
    bytes_per_block = block_size × (bytes per token over all layers); the logged capacity is
    int(num_blocks / cdiv(max_model_len, block_size) × max_model_len). The CPU build takes
    kv_memory from VLLM_CPU_KVCACHE_SPACE GiB (platforms/cpu.py).
    """
    model_dir = vllm_server.argv[2]
    with open(f"{model_dir}/config.json", encoding="utf-8") as fh:
        arch = arch_from_hf_config(json.load(fh), source=f"{model_dir}/config.json (tiny test model)")
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[arch.torch_dtype]
    bytes_per_token = kv_cache_bytes_per_token(arch, dtype_bytes=dtype_bytes)
    assert bytes_per_token == 2 * 2 * 2 * 64 * 2  # K and V × 2 layers × 2 KV heads × head_dim 64 × bf16

    found = KV_CACHE_LINE.findall(vllm_server.log_text())
    assert len(found) == 1, f"expected one KV cache size line, got {found}"
    device, tokens_text = found[0]
    assert device == "CPU"
    logged_tokens = int(tokens_text.replace(",", ""))

    kv_memory = int(vllm_server.env["VLLM_CPU_KVCACHE_SPACE"]) * GIB
    assert Fraction(kv_memory, logged_tokens) == bytes_per_token  # exact, no rounding slack

    # The exact relation vLLM uses, with block size and block count from its cache_config_info.
    [(cache_config, _)] = metric_samples(vllm_server, "vllm:cache_config_info")
    block_size = int(cache_config["block_size"])
    max_model_len = int(vllm_server.argv[vllm_server.argv.index("--max-model-len") + 1])
    num_blocks = kv_memory // (block_size * bytes_per_token)
    assert int(cache_config["kv_cache_memory_bytes"]) == kv_memory
    assert int(cache_config["num_gpu_blocks"]) == num_blocks
    assert int(cache_config["kv_cache_size_tokens"]) == logged_tokens
    assert logged_tokens == int(num_blocks / math.ceil(max_model_len / block_size) * max_model_len)


def test_server_runs_the_dev_8b_rendered_argv_with_only_cpu_changes(vllm_server: VllmServer) -> None:
    from infra.config import load_stack_file
    from infra.plan.build import build_stack_plan
    from tests.support.dev_argv import CPU_CHANGES, argv_diff

    stack_plan = build_stack_plan(load_stack_file("dev-8b"))
    prod = stack_plan.serve_argv
    # What the node's vllm.service runs is this same argv (one replica on dev-8b).
    spec = stack_plan.node_specs[stack_plan.plan.layout.instance_type]
    assert list(spec.replicas[0].serve_argv) == prod
    diff = argv_diff(prod, list(vllm_server.argv))
    print("\ndev-8b production argv → CPU test argv:")
    for flag, (before, after) in diff.items():
        print(f"  {flag}: {before} → {after}   ({CPU_CHANGES.get(flag, 'UNEXPECTED')})")
    assert set(diff) <= set(CPU_CHANGES), f"unexpected changes: {set(diff) - set(CPU_CHANGES)}"
    assert diff["model"][1] != diff["model"][0]
