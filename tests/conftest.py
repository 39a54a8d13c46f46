"""Shared pytest fixtures. Each owner keeps their fixtures in their own marked block."""

from __future__ import annotations

# ---- BEGIN vLLM server fixtures (owner: vLLM CLI / test-server work; tests/support/vllm_server.py) ----
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_model import write_tiny_llama
from tests.support.vllm_server import VllmServer, run_vllm_server

VLLM_TEST_API_KEY = "fleet-test-key-5f2c9a"
TINY_SERVED_MODEL_NAME = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (safetensors + BPE tokenizer + chat template), written once per session."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vllm_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """ONE real vLLM server (CPU build) serving the tiny model for the whole session.

    Reuse it rather than starting another: only one vLLM server may run on this machine.
    Exposes .argv (production form), .base_url, .openai_base_url, .api_key,
    .served_model_name, .log_text() and .launch_to_healthy_s.
    --enforce-eager: on CPU there are no CUDA graphs to keep, and skipping torch.compile
    saves ~45 s of start-up that no test here depends on.
    """
    argv = [
        "vllm", "serve", str(tiny_llama_dir),
        "--served-model-name", TINY_SERVED_MODEL_NAME,
        "--max-model-len", "2048",
        "--max-num-seqs", "8",
        "--dtype", "bfloat16",
        "--enable-prefix-caching",
        "--enforce-eager",
        "--shutdown-timeout", "5",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("vllm-server") / "vllm.log"
    with run_vllm_server(argv, api_key=VLLM_TEST_API_KEY, log_path=log_path) as server:
        print(
            f"\nvllm_server: launch to /health 200 in {server.launch_to_healthy_s:.1f} s "
            f"(after {server.waited_for_slot_s:.0f} s waiting for the one-server slot; log {log_path})"
        )
        yield server


# ---- END vLLM server fixtures ----
