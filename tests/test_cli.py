"""The ``vllm-fleet`` CLI as users run it: a subprocess, its stdout, stderr and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_size_70b_fp16_json() -> None:
    run = cli("size", "--model", "llama-3.1-70b", "--quantization", "fp16", "--max-model-len", "8192", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    for key in ("instance_type", "gpus_per_replica", "tensor_parallel_size", "pipeline_parallel_size",
                "nodes_per_replica", "weights_bytes", "kv_cache_bytes_per_token", "kv_cache_tokens", "hourly_usd"):
        assert key in doc
    assert doc["tensor_parallel_size"] == 4
    assert doc["kv_cache_bytes_per_token"] == 327680
    assert doc["alternatives"], "runner-ups are explained"


def test_size_405b_fp16_never_8x80gb() -> None:
    run = cli("size", "--model", "llama-3.1-405b", "--quantization", "fp16", "--max-model-len", "8192", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert not (doc["gpus_per_replica"] == 8 and doc["gpu"] in ("H100", "A100 80GB")), doc


def test_size_accepts_a_config_json(tmp_path: Path) -> None:
    cfg = tmp_path / "my-model" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "intermediate_size": 14336, "max_position_embeddings": 131072,
    }))
    run = cli("size", "--model", str(cfg), "--quantization", "bf16", "--max-model-len", "4096", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["kv_cache_bytes_per_token"] == 2 * 32 * 8 * 128 * 2


def test_size_human_output_is_tables() -> None:
    run = cli("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192")
    assert run.returncode == 0, run.stderr
    assert "Decision" in run.stdout and "Runner-ups" in run.stdout and "memory budget" in run.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("size", "--model", "llama-3.1-70b", "--quantization", "int3", "--max-model-len", "8192"), "--quantization"),
        (("size", "--model", "gpt-5", "--quantization", "fp16", "--max-model-len", "8192"), "--model"),
        (("size", "--model", "llama-3.1-70b", "--quantization", "fp16", "--max-model-len", "lots"), "max-model-len"),
        (("size", "--model", "llama-3.1-70b", "--quantization", "fp16", "--max-model-len", "8192",
          "--instance-types", "p9"), "--instance-types"),
        (("size", "--model", "llama-3.1-405b", "--quantization", "fp16", "--max-model-len", "8192",
          "--instance-types", "g6.xlarge", "--max-nodes", "1"), "GB of weights"),
        (("size", "--model", "llama-2-13b", "--quantization", "fp16", "--max-model-len", "65536"),
         "max_position_embeddings"),
        (("plan", "nonexistent"), "no file"),
        (("size", "--nope"), "--nope"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: tuple[str, ...], needle: str) -> None:
    run = cli(*args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert needle in lines[0]
    assert "Traceback" not in run.stderr


def test_bad_stack_file_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    (stacks / "Pulumi.bad.yaml").write_text(
        "config:\n  aws:region: us-east-1\n  vllm-fleet:model: {catalog: llama-3.1-8b}\n"
        "  vllm-fleet:serving: {quantization: fp16, maxModelLen: 8192, concurency: 4}\n"
    )
    run = cli("plan", "bad", "--stacks-dir", str(stacks), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "vllm-fleet:serving.concurency" in run.stderr
    assert not (tmp_path / "out").exists()
