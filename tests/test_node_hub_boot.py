"""dev-8b's node booted for real from its own weights path: the Hugging Face Hub, for a gated
repository, through the token in Secrets Manager (moto) → fetch-hf-token → systemd credential →
HF_TOKEN_PATH → huggingface_hub inside vllm.service.

The Hub is a local stand-in (tests/support/hub.py) serving the tiny model as
meta-llama/Llama-3.1-8B-Instruct at revision main, answering 401 to any request without the
token, as the real Hub does for a gated repo; vllm.service reaches it through a test drop-in's
HF_ENDPOINT (huggingface_hub's own switch). The argv keeps the stack's repo and --revision. Other
changes (printed): the AWS endpoint (moto), the CPU build's flags and environment (without
HF_HUB_OFFLINE, which would forbid the download under test), no lifecycle watcher.

Swapped and so untested here: the real Hub (its Xet and LFS transfer paths: the stand-in serves
plain HTTP downloads), the real Secrets Manager, CloudWatch, the metadata service, the GPU build.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.plan.node.spec import NodeSpec
from tests.support.hub import HubStandIn
from tests.support.imds import FakeImds
from tests.support.moto import MotoServer
from tests.support.ports import free_port
from tests.support.rootfs import (
    CPU_NODE_ENV,
    TINY_MODEL_MAX_LEN,
    NodeContainer,
    aws_unit_dropins,
    boot_stack_node,
    cpu_variant,
    moto_group,
    node_health,
    production_node_spec,
    replace_serve_flags,
    stop_node,
)
from tests.support.vllm_server import CPU_WARMUP_FLAGS

STACK = "dev-8b"
TOKEN_UNIT = "vllm-fleet-fetch-hf-token.service"
SIGNAL_UNIT = "vllm-fleet-scaling-signal.service"
HEALTH_TIMEOUT_S = 480
TIMINGS: dict[str, float] = {}


def cpu_spec(production: NodeSpec, *, port: int, endpoint: str) -> NodeSpec:
    (replica,) = production.replicas
    argv = replace_serve_flags(
        replica.serve_argv,
        replica.serve_argv[2],  # the repo, downloaded from the (stand-in) Hub
        {"--host": "127.0.0.1", "--port": str(port), "--max-model-len": str(TINY_MODEL_MAX_LEN)},
        added=CPU_WARMUP_FLAGS,
    )
    # Not HF_HUB_OFFLINE: the download from the Hub is what this test boots.
    cpu_env = {name: value for name, value in CPU_NODE_ENV.items() if name != "HF_HUB_OFFLINE"}
    return cpu_variant(production, argv, port=port, endpoint=endpoint, vllm_env=cpu_env)


@dataclass
class HubNode:
    node: NodeContainer
    spec: NodeSpec
    port: int
    hub: HubStandIn
    token: str
    booted_at: float


@pytest.fixture(scope="module")
def hub_node(
    node_rootfs: Path, tiny_llama_dir: Path, moto: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubNode]:
    production = production_node_spec(STACK)
    assert production.weights_source == "huggingface" and production.hf_token_secret_id
    repo = production.replicas[0].serve_argv[2]
    token = "hf_" + secrets.token_hex(17)
    hub = HubStandIn(repo, tiny_llama_dir, token)
    moto.put_secret(production.api_key_secret_id, "hub-boot-" + secrets.token_hex(16), production.region)
    moto.put_secret(production.hf_token_secret_id, token, production.region)
    group = f"vllm-fleet.{STACK}.fleet-0a1b2c"
    imds = FakeImds(moto_group(moto, group, production.region), group)
    port = free_port()
    spec = cpu_spec(production, port=port, endpoint=moto.endpoint)
    dropins = aws_unit_dropins(["vllm-fleet-fetch-key.service", TOKEN_UNIT, SIGNAL_UNIT], imds.url)
    # The Hub's address: huggingface_hub reads HF_ENDPOINT (constants.py); production uses its default.
    dropins["etc/systemd/system/vllm.service.d/10-test-hub.conf"] = f"[Service]\nEnvironment=HF_ENDPOINT={hub.url}\n"
    node, started = boot_stack_node(node_rootfs, tmp_path_factory.mktemp("hub-node"), "hub-node", production, spec,
                                    dropins, holds_vllm_slot=True)  # fmt: skip
    booted = HubNode(node, spec, port, hub, token, started)
    try:
        node.wait_for(lambda: node_health(port) == 200, HEALTH_TIMEOUT_S, "vllm /health 200")
        TIMINGS["boot to healthy (weights from the Hub stand-in)"] = time.monotonic() - started
        yield booted
    except Exception:
        print(node.exec("systemctl", "status", "--no-pager", "-n", "40", TOKEN_UNIT, "vllm.service", check=False).stdout
              if node.alive else node.console_tail())  # fmt: skip
        raise
    finally:
        stop_node(node)
        hub.close()
        imds.close()


def test_vllm_downloaded_the_gated_repo_with_the_token(hub_node: HubNode) -> None:
    hub = hub_node.hub
    weights = [path for path in hub.requests if path.endswith("/model.safetensors")]
    assert weights and all(f"/{hub.repo}/resolve/" in path for path in weights), dict(hub.requests)
    # Every request for the repo carried the token (the stand-in answers 401 otherwise).
    assert not [path for path in hub.requests if hub.repo in path and path in hub.unauthorized_paths], dict(hub.requests)
    node = hub_node.node
    snapshot = node.path(f"/var/cache/vllm/models/models--{hub.repo.replace('/', '--')}/snapshots/{hub.sha}")
    assert (snapshot / "model.safetensors").is_file()
    cmdline = node.exec("ps", "-o", "args=", "-p", node.show("vllm.service", "MainPID")["MainPID"]).stdout
    assert f"vllm serve {hub.repo} --revision main " in cmdline


def test_the_token_is_a_credential_and_nowhere_else(hub_node: HubNode) -> None:
    node, token = hub_node.node, hub_node.token
    assert node.show(TOKEN_UNIT, "ActiveState", "Result") == {"ActiveState": "active", "Result": "success"}
    assert node.path("/run/credentials/vllm.service/hf-token").read_text().strip() == token
    st = node.path("/run/vllm-fleet/hf-token").stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
    for pid in node.pids():
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{name}").read_bytes()
            except OSError:
                continue
            assert token.encode() not in data, f"token in /proc/{pid}/{name}"
    journal = node.journal("-o", "cat")
    assert "wrote /run/vllm-fleet/hf-token" in journal and token not in journal
    assert token not in node.path("/var/lib/cloud/instances/i-hub-node/user-data.txt").read_text()


def test_print_timings() -> None:
    print("\nhub node timings:")
    for name, seconds in TIMINGS.items():
        print(f"  {name}: {seconds:.1f} s")
    assert TIMINGS
