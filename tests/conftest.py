"""Shared pytest fixtures and hooks, by concept: the tiny model and the one vLLM server; AWS
(one moto server); the node rootfs; the order tests run in and the fast tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dev_argv import cpu_dev_8b_argv
from tests.support.moto import CREDENTIALS, REGION, MotoServer
from tests.support.ports import free_port
from tests.support.rootfs import ensure_rootfs
from tests.support.tiers import FastTier
from tests.support.tiny_model import write_tiny_llama
from tests.support.vllm_server import VllmServer, run_vllm_server

# --- the tiny model and the one vLLM server --------------------------------------------------

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


# --- AWS: one moto server for the session -----------------------------------------------------
# Tests take it through one of three fixtures, each of which empties it first:
#   moto_env       per test: the environment that points boto3 and the AWS CLI at it;
#   moto_endpoint  per test: its URL only, for code that is handed an endpoint;
#   moto           per module: for modules whose booted nodes keep AWS state across their tests
#                  (a module takes either `moto` or the per-test ones, never both).
# A test that needs a server of its own (one that goes down and comes back, one inside a
# network namespace) makes a MotoServer (tests/support/moto.py).


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto server (``moto_server``) on 127.0.0.1, spoken to over HTTP, for the session."""
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto_server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto(moto_server: MotoServer) -> MotoServer:
    """The moto server, empty at the module's start (the boot tests' nodes reach it over the
    shared host network)."""
    moto_server.reset()
    return moto_server


@pytest.fixture
def moto_endpoint(moto_server: MotoServer) -> str:
    """The moto server's URL, empty for this test."""
    moto_server.reset()
    return moto_server.endpoint


@pytest.fixture
def moto_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh moto state, and the environment that points boto3 (and the aws CLI) at it.

    botocore reads AWS_ENDPOINT_URL itself, so code under test runs unchanged.
    """
    env = {"AWS_ENDPOINT_URL": moto_endpoint, **CREDENTIALS, "AWS_DEFAULT_REGION": REGION}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # No shared config/credentials files may leak in from the machine.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    return env


# --- the node rootfs --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_rootfs() -> Path:
    """The cached Debian rootfs with the image's vLLM install (built on first use; read-only:
    boot an overlay of it, tests/support/rootfs.py prepare_node)."""
    built = ensure_rootfs()
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in built.timings_s.items())
    print(f"\nnode_rootfs: {built.path} ({'built now: ' + phases if built.built_now else 'cached'})")
    return built.path


# --- the order tests run in, and the fast tier --------------------------------------------------

# Modules that run vLLM themselves. The session-wide `vllm_server` fixture holds the
# machine-wide one-vLLM lock (tests/support/vllm_server.py) from its start to the session's
# end, so these run before any test asks for it: the node boot modules (each node takes the
# lock) and test_images.py (its pre-warm starts a vLLM in this process, which it refuses once
# the session's `vllm_server` runs; test_bench.py, alphabetically earlier, uses it).
OWN_VLLM_MODULES = (
    "test_node_boot.py",
    "test_node_s3_boot.py",
    "test_node_hub_boot.py",
    "test_node_gang_boot.py",
    "test_images.py",
)
# Next, the key rotation: it runs two vLLM servers while holding the same lock.
ROTATION_MODULE = "test_rotate_key.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """OWN_VLLM_MODULES, then ROTATION_MODULE, then the rest; a stable sort keeps the
    collection order within each group."""
    def group(item: pytest.Item) -> int:
        return 0 if item.path.name in OWN_VLLM_MODULES else 1 if item.path.name == ROTATION_MODULE else 2

    items.sort(key=group)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(FastTier(), "vllm-fleet-fast-tier")
