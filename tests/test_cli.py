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
    # Memory-only: the TP the memory math needs (tests/test_perf.py covers the SLO ranking).
    run = cli("size", "--model", "llama-3.1-70b", "--quantization", "fp16", "--max-model-len", "8192", "--json",
              "--memory-only")
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


def test_a_config_json_is_named_by_its_repo_id_not_its_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "nc" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({
        "_name_or_path": "Qwen/Qwen2.5-32B-Instruct-AWQ", "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64,
        "vocab_size": 152064, "intermediate_size": 27648, "max_position_embeddings": 32768,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
    }))
    run = cli("size", "--model", str(cfg), "--quantization", "awq", "--max-model-len", "32768", "--max-num-seqs",
              "16", "--instance-types", "g6e,g5,p4d", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"] == "Qwen/Qwen2.5-32B-Instruct-AWQ"


def test_size_sizes_for_the_workload_and_slo() -> None:
    run = cli("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
              "--instance-types", "p5en", "--tensor-parallel-size", "1", "--input-tokens", "1024",
              "--output-tokens", "256", "--ttft-p95-ms", "2000", "--itl-p95-ms", "40", "--peak-rps", "60", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    perf = doc["performance"]
    # 8 one-GPU servers would fit a p5en, but an ALB forwards to at most 5 target groups.
    assert doc["tensor_parallel_size"] == 1 and doc["replicas_per_node"] == 4
    assert perf["predicted"] and perf["meets_slo"]
    assert doc["max_num_seqs"] == perf["max_num_seqs"] and doc["max_num_batched_tokens"] == 8192
    assert perf["ttft_ms"] <= 2000 and perf["itl_ms"] <= 40
    assert perf["replicas_at_peak"] == -(-60 // perf["requests_per_s"])
    assert doc["workload"] == {"input_tokens": 1024, "output_tokens": 256, "ttft_p95_ms": 2000.0,
                               "itl_p95_ms": 40.0, "peak_requests_per_s": 60.0, "concurrent_users": None}


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
        (("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "1024",
          "--input-tokens", "1000", "--output-tokens", "100"), "exceeds --max-model-len 1024"),
        (("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
          "--itl-p95-ms", "-5"), "--itl-p95-ms"),
        (("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
          "--peak-rps", "5", "--concurrent-users", "10"), "not both"),
        (("size", "--model", "llama-3.1-8b", "--quantization", "bf16", "--max-model-len", "8192",
          "--instance-types", "p5en", "--itl-p95-ms", "1"), "no allowed layout meets"),
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


def test_plan_shows_the_workload_slo_and_dollars_per_token(tmp_path: Path) -> None:
    run = cli("plan", "dev-8b", "--out", str(tmp_path / "dev"))
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.replace("│", " ").split())  # rich wraps table cells
    assert "Workload and SLO" in text and "(defaults: the stack has no vllm-fleet:workload)" in text
    assert "TTFT p95 ≤ 1,000 ms, inter-token latency p95 ≤ 50 ms" in text
    assert "per 1M output tokens at the SLO" in text and "$/1M tok" in text
    plan = json.loads((tmp_path / "dev" / "plan.json").read_text())
    perf = plan["performance"]
    assert perf["predicted"] and perf["max_num_seqs"] == plan["max_num_seqs"]
    assert f"--max-num-seqs {plan['max_num_seqs']}" in text

    run = cli("plan", "prod-70b", "--out", str(tmp_path / "prod"), "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["workload"]["peak_requests_per_s"] == 40 and doc["workload"]["ttft_p95_ms"] == 1000
    perf = doc["performance"]
    assert perf["replicas_at_peak"] * perf["requests_per_s"] >= 40 > (perf["replicas_at_peak"] - 1) * perf["requests_per_s"]
    assert all(a["why_not_chosen"] for a in doc["alternatives"])
