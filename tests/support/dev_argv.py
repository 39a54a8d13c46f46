"""The dev-8b stack's production ``vllm serve`` argv, adapted for a CPU and the tiny model.

The session's real vLLM server runs exactly what a dev-8b node's vllm.service would
run, except for the changes listed in CPU_CHANGES, each with its reason. The test suite
prints the diff and asserts that nothing else differs.
"""

from __future__ import annotations

from pathlib import Path

from infra.config import load_stack_file
from infra.plan.build import build_stack_plan
from tests.support.vllm_server import CPU_WARMUP_FLAGS, replace_flags

# flag → why it changes on this machine (None in the replacement drops the flag).
CPU_CHANGES = {
    "model": "the tiny generated Llama instead of the 16 GB checkpoint",
    "--revision": "a local model directory has no hub revision",
    "--tensor-parallel-size": "one CPU worker",
    "--pipeline-parallel-size": "one CPU worker",
    "--max-model-len": "the tiny model's max_position_embeddings is 2048",
    "--max-num-batched-tokens": "fits the 1 GiB CPU KV cache (VLLM_CPU_KVCACHE_SPACE)",
    "--gpu-memory-utilization": "no GPU; the CPU build sizes its cache from VLLM_CPU_KVCACHE_SPACE",
    "--download-dir": "the node's cache dir does not exist here; a temp dir stands in",
    "--shutdown-timeout": "the drain window, shortened so the session's teardown takes 5 s not 120 s",
    "--compilation-config.mode": "added: Dynamo + eager backend keeps the CPU warm-up pass without "
    "TorchInductor's C++ compile (CPU_WARMUP_FLAGS says why --enforce-eager is not enough)",
    "--compilation-config.backend": "added: see --compilation-config.mode",
}


def production_dev_8b_argv() -> list[str]:
    return build_stack_plan(load_stack_file("dev-8b")).serve_argv


def cpu_dev_8b_argv(tiny_model_dir: Path, download_dir: Path) -> list[str]:
    prod = production_dev_8b_argv()
    argv = ["vllm", "serve", str(tiny_model_dir), *prod[3:]]
    argv = replace_flags(argv, {
        "--revision": None,
        "--tensor-parallel-size": "1",
        "--pipeline-parallel-size": "1",
        "--max-model-len": "2048",
        "--max-num-batched-tokens": "2048",
        "--gpu-memory-utilization": None,
        "--download-dir": str(download_dir),
        "--shutdown-timeout": "5",
    })
    return [*argv, *CPU_WARMUP_FLAGS]


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    """``{"model": [path], "--flag": [values...]}`` for comparing two argvs."""
    out: dict[str, list[str]] = {"model": [argv[2]]}
    current = ""
    for token in argv[3:]:
        if token.startswith("--"):
            current = token
            out[current] = []
        else:
            out[current].append(token)
    return out


def argv_diff(prod: list[str], test: list[str]) -> dict[str, tuple[list[str] | None, list[str] | None]]:
    a, b = flag_values(prod), flag_values(test)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
