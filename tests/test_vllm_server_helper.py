"""tests/support/vllm_server.py's own logic, without starting vLLM (fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.facts.vllm_pin import vllm_facts
from tests.support.ports import free_port
from tests.support.vllm_server import (
    VllmServerError,
    api_server_command,
    replace_flags,
    wait_until_healthy,
)

ARGV = [
    "vllm", "serve", "/opt/models/m",
    "--served-model-name", "m", "m-alias",
    "--host", "0.0.0.0",
    "--port=8000",
    "--tensor-parallel-size", "8",
    "--enable-prefix-caching",
    "--download-dir", "/opt/models",
]  # fmt: skip


def test_api_server_command_keeps_flags_and_owns_host_and_port() -> None:
    command = api_server_command(ARGV, host="127.0.0.1", port=40123)
    assert command[:5] == [
        sys.executable,
        "-m",
        vllm_facts().parser.api_server_module.value,
        "--model",
        "/opt/models/m",
    ]
    assert command[5:] == [
        "--served-model-name", "m", "m-alias",
        "--tensor-parallel-size", "8",
        "--enable-prefix-caching",
        "--download-dir", "/opt/models",
        "--host", "127.0.0.1", "--port", "40123",
    ]  # fmt: skip


@pytest.mark.parametrize("argv", [["vllm"], ["vllm", "serve", "--port", "1"], ["python", "serve", "m"]])
def test_api_server_command_wants_vllm_serve_model(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="vllm"):
        api_server_command(argv, host="127.0.0.1", port=1)


def test_replace_flags() -> None:
    replaced = replace_flags(
        ARGV,
        {
            "--tensor-parallel-size": "1",
            "--download-dir": None,
            "--served-model-name": "tiny",
            "--port": None,
        },
    )
    assert replaced == [
        "vllm", "serve", "/opt/models/m",
        "--served-model-name", "tiny",
        "--host", "0.0.0.0",
        "--tensor-parallel-size", "1",
        "--enable-prefix-caching",
    ]  # fmt: skip


def test_wait_reports_a_dead_process_with_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "print('engine failed: out of memory', flush=True); raise SystemExit(3)"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        with pytest.raises(VllmServerError, match=r"(?s)code 3.*engine failed: out of memory"):
            wait_until_healthy(process, f"http://127.0.0.1:{free_port()}/health", log_path, 30)


def test_wait_times_out_when_nothing_listens(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    log_path.write_text("still loading\n")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(VllmServerError, match=r"(?s)not healthy after 2 s.*still loading"):
            wait_until_healthy(process, f"http://127.0.0.1:{free_port()}/health", log_path, 2)
    finally:
        process.kill()
        process.wait()


def test_wait_returns_once_health_is_200(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("ok")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waited = wait_until_healthy(process, f"http://127.0.0.1:{port}/health", tmp_path / "health", 30)
        assert 0 <= waited < 30
    finally:
        process.terminate()
        process.wait()
