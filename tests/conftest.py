"""Shared pytest fixtures. Each owner keeps their fixtures in their own marked block."""

from __future__ import annotations

# ---- BEGIN vLLM server fixtures (owner: vLLM CLI / test-server work; tests/support/vllm_server.py) ----
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dev_argv import cpu_dev_8b_argv
from tests.support.tiny_model import write_tiny_llama
from tests.support.vllm_server import VllmServer, run_vllm_server

VLLM_TEST_API_KEY = "fleet-test-key-5f2c9a"


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
    Its argv is the dev-8b stack's production argv with only the changes that
    tests/support/dev_argv.py lists (model path, parallel sizes, memory flags, …);
    tests/test_vllm_server.py prints and checks that diff.
    """
    # The dev-8b stack's rendered ExecStart argv, with only CPU_CHANGES applied.
    argv = cpu_dev_8b_argv(tiny_llama_dir, tmp_path_factory.mktemp("vllm-downloads"))
    log_path = tmp_path_factory.mktemp("vllm-server") / "vllm.log"
    with run_vllm_server(argv, api_key=VLLM_TEST_API_KEY, log_path=log_path) as server:
        print(
            f"\nvllm_server: launch to /health 200 in {server.launch_to_healthy_s:.1f} s "
            f"(after {server.waited_for_slot_s:.0f} s waiting for the one-server slot; log {log_path})"
        )
        yield server


# ---- END vLLM server fixtures ----


# ---- BEGIN moto server fixtures (owner: operations; infra/ops/, tests/test_preflight.py, test_smoke.py, test_rotate_key.py) ----
import os
import socket
import subprocess
import sys
import time
import urllib.request

MOTO_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto server (``moto_server``) on 127.0.0.1, spoken to over HTTP, for the session."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    binary = Path(sys.executable).with_name("moto_server")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not answering on {url} after 60 s") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def moto_env(moto_server_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh moto state, and the environment that points boto3 (and the aws CLI) at it.

    botocore reads AWS_ENDPOINT_URL itself, so code under test runs unchanged.
    """
    request = urllib.request.Request(f"{moto_server_url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    env = {
        "AWS_ENDPOINT_URL": moto_server_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": MOTO_REGION,
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # No shared config/credentials files may leak in from the machine.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    return env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the key-rotation test first.

    It runs two vLLM servers of its own while holding the one-vLLM-at-a-time lock
    (tests/support/vllm_server.py); the session-scoped ``vllm_server`` fixture holds that
    same lock until the session ends, so the rotation test must run before anything starts it.
    """
    items.sort(key=lambda item: 0 if item.path.name == "test_rotate_key.py" else 1)


# ---- END moto server fixtures ----


# ---- BEGIN node boot fixtures (owner: node boot tests; tests/support/rootfs.py) ----
from tests.support.rootfs import MotoServer, ensure_rootfs, free_port
from tests.support.tiers import FastTier

# Modules that boot nodes running vLLM. Each node takes the machine-wide one-vLLM lock, which
# the session-wide `vllm_server` fixture holds until the session ends once it has started; so
# they run before any test asks for that fixture.
NODE_BOOT_MODULES = ("test_node_boot.py", "test_node_s3_boot.py", "test_node_hub_boot.py", "test_node_gang_boot.py")
# Also first: test_images.py's pre-warm starts a vLLM of its own in this process, which it
# refuses once the session's `vllm_server` runs (test_bench.py, alphabetically earlier, uses it).
OWN_VLLM_MODULES = (*NODE_BOOT_MODULES, "test_images.py")


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server for one boot-test module (the nodes reach it over the shared network)."""
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def node_rootfs() -> Path:
    """The cached Debian rootfs with the image's vLLM install (built on first use; read-only:
    boot an overlay of it, tests/support/rootfs.py prepare_node)."""
    built = ensure_rootfs()
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in built.timings_s.items())
    print(f"\nnode_rootfs: {built.path} ({'built now: ' + phases if built.built_now else 'cached'})")
    return built.path


class _NodeBootModulesFirst:
    """A plugin, not a conftest hook: this file already has a pytest_collection_modifyitems.
    trylast, and a stable sort, so the order other hooks chose is kept within each group."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        items.sort(key=lambda item: 0 if item.path.name in OWN_VLLM_MODULES else 1)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_NodeBootModulesFirst(), "vllm-fleet-node-boot-modules-first")
    config.pluginmanager.register(FastTier(), "vllm-fleet-fast-tier")


# ---- END node boot fixtures ----
