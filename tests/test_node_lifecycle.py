"""The node side of the Fleet's lifecycle hooks: drain on scale-in, gang readiness and health.

The rendered ``lifecycle-watch`` runs for real, as bash with the real AWS CLI and curl, against:

* a real moto server (Auto Scaling groups with their lifecycle hooks, ELBv2 target groups and
  target health, EC2 instances, SetInstanceHealth), reached through ``AwsStandIn``, a local
  HTTP proxy that forwards every call to moto and records it. moto 5.2.5 lacks
  CompleteLifecycleAction and RecordLifecycleActionHeartbeat (it answers 500, "has not been
  implemented"; ``test_moto_lacks_lifecycle_actions`` shows it, so this file notices when moto
  adds them) and keeps no Pending:Wait/Terminating:Wait state. The proxy answers those two calls
  itself: it holds the pending lifecycle actions the test starts, refuses a completion that
  names no pending action (AWS's ValidationError), and carries a completed termination (or an
  abandoned launch) into moto with TerminateInstanceInAutoScalingGroup, so the instance's state
  in moto changes;
* ``FakeImds``, a local IMDSv2 (token PUT, metadata GETs, instance tags, and
  autoscaling/target-lifecycle-state, which the test switches to Terminated);
* ``FakeVllm``, a local stand-in for vLLM's /health and /metrics on each replica port, whose
  in-flight gauges the test drops to 0 at a known time;
* ``systemctl`` replaced through PATH by a recorder: the real stop of the units is the boot
  tests' business (tests/test_node_boot.py boots the rendered units under systemd).

Every event carries a wall-clock time, so the tests assert the order of operations.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import itertools
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from infra.errors import FleetError
from infra.plan.node.spec import GangDiscovery, LifecycleHooks, NodeSpec, ReplicaSpec
from infra.plan.tags import TARGET_GROUP_TAG
from infra.render.node import (
    ASG_NAME_TAG,
    LIBEXEC,
    UNIT_DIR,
    node_units,
    render_node,
    render_user_data,
    serving_units,
)
from tests.support.ports import free_port
from tests.test_node_render import (
    MAX_EXPOSURE,
    REGION,
    VENV_BIN,
    exposure,
    multi_spec,
    serve_argv,
    single_spec,
    verify,
    write_node_root,
)

UNIT = "vllm-fleet-lifecycle.service"
SCRIPT = f"{LIBEXEC}/lifecycle-watch"
# Slack for timing assertions: each AWS CLI call starts a Python interpreter (~1 s on this
# shared 2-core machine).
SLACK_S = 3.0


# --- rendering -----------------------------------------------------------------------------


def test_every_node_gets_the_watcher_and_the_target_wants_it() -> None:
    for spec in (single_spec(), multi_spec()):
        files = render_node(spec)
        assert f"{UNIT_DIR}/{UNIT}" in files and SCRIPT in files
        assert UNIT in node_units(spec)
        assert UNIT in files[f"{UNIT_DIR}/vllm-fleet.target"]
        user_data = render_user_data(spec)
        assert f"path: /{SCRIPT}" in user_data and f"path: /{UNIT_DIR}/{UNIT}" in user_data


def test_lifecycle_hooks_can_be_left_out_for_nodes_without_a_group() -> None:
    spec = single_spec(lifecycle_hooks=LifecycleHooks(enabled=False))
    files = render_node(spec)
    assert f"{UNIT_DIR}/{UNIT}" not in files and SCRIPT not in files
    assert UNIT not in files[f"{UNIT_DIR}/vllm-fleet.target"]


def test_tags_and_stop_list_agree_with_the_fleet() -> None:
    assert ASG_NAME_TAG == "aws:autoscaling:groupName"
    gang = render_node(multi_spec())[SCRIPT]
    assert "readonly stop_units=(vllm-fleet.target vllm.service ray-head.service ray-worker.service)" in gang
    assert serving_units(single_spec()) == ["vllm-fleet.target", "vllm.service"]
    # The drain waits for the deregistration delay, which defaults to the shutdown timeout.
    assert single_spec().deregistration_delay_s == single_spec().shutdown_timeout_s
    spec = single_spec(lifecycle_hooks=LifecycleHooks(deregistration_delay_s=120))
    assert "readonly delay_s=120" in render_node(spec)[SCRIPT]


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        (lambda: LifecycleHooks(poll_interval_s=6), "poll_interval_s=6"),
        (lambda: LifecycleHooks(heartbeat_interval_s=30), "heartbeat_interval_s=30"),
        (lambda: LifecycleHooks(deregistration_delay_s=3601), "deregistration_delay_s=3601"),
        (lambda: LifecycleHooks(drain_hook="drain; rm -rf /"), "drain_hook"),
        (lambda: LifecycleHooks(unhealthy_after=0), "unhealthy_after=0"),
    ],
)
def test_bad_lifecycle_settings_fail_with_one_line(hooks: Callable[[], LifecycleHooks], message: str) -> None:
    with pytest.raises(FleetError, match=re.escape(message)) as caught:
        hooks()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("make", [single_spec, multi_spec], ids=["single", "gang"])
def test_script_passes_shellcheck(make: Callable[[], NodeSpec], tmp_path: Path) -> None:
    script = tmp_path / "lifecycle-watch"
    script.write_text(render_node(make())[SCRIPT])
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("make", [single_spec, multi_spec], ids=["single", "gang"])
def test_unit_passes_verify_and_scores_like_the_other_helpers(
    make: Callable[[], NodeSpec], tmp_path: Path
) -> None:
    write_node_root(tmp_path, make())
    result = verify(tmp_path, [UNIT])
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
        result.stderr + result.stdout
    )
    score = exposure(tmp_path / UNIT_DIR / UNIT)
    print(f"\n{UNIT}: systemd-analyze security --offline=yes exposure {score}")
    assert score <= MAX_EXPOSURE


# --- stand-ins -----------------------------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, code: int, body: str | bytes, content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(server: http.server.ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


class FakeImds(http.server.ThreadingHTTPServer):
    """IMDSv2 of one instance: the token, its id and tags, and its target lifecycle state."""

    def __init__(self, instance_id: str, tags: dict[str, str]) -> None:
        self.instance_id, self.tags = instance_id, tags
        self.token = secrets.token_hex(8)
        self.state = "InService"
        self.state_set_at: dict[str, float] = {"InService": time.time()}
        self.token_puts = 0
        # (time, value) of every read of autoscaling/target-lifecycle-state.
        self.state_reads: list[tuple[float, str]] = []
        super().__init__(("127.0.0.1", 0), _ImdsHandler)
        serve(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def set_state(self, state: str) -> float:
        self.state, now = state, time.time()
        self.state_set_at[state] = now
        return now

    def expire_token(self) -> None:
        self.token = secrets.token_hex(8)


class _ImdsHandler(_Quiet):
    server: FakeImds

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.server.token_puts += 1
            return self.reply(200, self.server.token)
        return self.reply(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self.reply(401, "")
        prefix = "/latest/meta-data/"
        item = self.path.removeprefix(prefix) if self.path.startswith(prefix) else None
        if item == "instance-id":
            return self.reply(200, self.server.instance_id)
        if item == "autoscaling/target-lifecycle-state":
            state = self.server.state
            self.server.state_reads.append((time.time(), state))
            return self.reply(200, state)
        if item and item.startswith("tags/instance/"):
            key = urllib.parse.unquote(item.removeprefix("tags/instance/"))
            if key in self.server.tags:
                return self.reply(200, self.server.tags[key])
        return self.reply(404, "")


class FakeVllm(http.server.ThreadingHTTPServer):
    """vLLM's /health and the two in-flight gauges of /metrics, on one replica port."""

    def __init__(self, port: int, *, running: int = 0, waiting: int = 0, health: int = 200) -> None:
        self.running, self.waiting, self.health = running, waiting, health
        self.first_200_at: float | None = None
        self.zero_at: float | None = None
        # (time, running + waiting) of every /metrics scrape.
        self.metrics_reads: list[tuple[float, int]] = []
        super().__init__(("127.0.0.1", port), _VllmHandler)
        serve(self)

    def set_in_flight(self, running: int, waiting: int = 0) -> float:
        self.running, self.waiting, now = running, waiting, time.time()
        if running + waiting == 0:
            self.zero_at = now
        return now

    def set_in_flight_later(self, delay_s: float, running: int, waiting: int = 0) -> None:
        threading.Timer(delay_s, self.set_in_flight, (running, waiting)).start()


class _VllmHandler(_Quiet):
    server: FakeVllm

    def do_GET(self) -> None:
        s = self.server
        if self.path == "/health":
            if s.health == 200 and s.first_200_at is None:
                s.first_200_at = time.time()
            return self.reply(s.health, "")
        if self.path == "/metrics":
            s.metrics_reads.append((time.time(), s.running + s.waiting))
            labels = 'engine="0",model_name="llama-3.1-8b"'
            body = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{{{labels}}} {float(s.running)}\n"
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{{{labels}}} {float(s.waiting)}\n"
                # Not a third in-flight count: the same waiting requests, by reason.
                f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} {float(s.waiting)}\n'
                f"vllm:kv_cache_usage_perc{{{labels}}} 0.25\n"
            )
            return self.reply(200, body, "text/plain; version=0.0.4")
        return self.reply(404, "")


@dataclass
class AwsCall:
    at: float
    service: str
    action: str
    params: dict[str, str]
    status: int


@dataclass
class PendingAction:
    group: str
    hook: str
    transition: str
    heartbeats: int = 0


_LIFECYCLE_ACTIONS = ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat")
_ASG_XMLNS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"


class AwsStandIn(http.server.ThreadingHTTPServer):
    """Forwards every AWS call to moto and records it; answers the two lifecycle-action
    calls moto lacks from the pending actions the test starts with ``begin``."""

    def __init__(self, moto_url: str) -> None:
        self.moto = urllib.parse.urlsplit(moto_url)
        self.autoscaling = boto3.client(
            "autoscaling", endpoint_url=moto_url, region_name=REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        self.calls: list[AwsCall] = []
        self.pending: dict[str, PendingAction] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _AwsHandler)
        serve(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def begin(self, instance_id: str, transition: str) -> None:
        """What the group does at scale-out/scale-in: put the instance into the hook's wait state."""
        (instance,) = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])[
            "AutoScalingInstances"
        ]
        group = instance["AutoScalingGroupName"]
        hooks = self.autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group)["LifecycleHooks"]
        (hook,) = [h for h in hooks if h["LifecycleTransition"] == f"autoscaling:EC2_INSTANCE_{transition}"]
        with self.lock:
            self.pending[instance_id] = PendingAction(group, hook["LifecycleHookName"], transition)

    def lifecycle_call(self, action: str, params: dict[str, str]) -> tuple[int, str]:
        instance_id = params.get("InstanceId", "")
        with self.lock:
            pending = self.pending.get(instance_id)
            if (
                pending is None
                or pending.hook != params.get("LifecycleHookName")
                or pending.group != params.get("AutoScalingGroupName")
            ):
                return 400, _error_xml(
                    "ValidationError", f"No active Lifecycle Action found with instance ID {instance_id}"
                )
            if action == "RecordLifecycleActionHeartbeat":
                pending.heartbeats += 1
                return 200, _ok_xml(action)
            result = params.get("LifecycleActionResult")
            if result not in ("CONTINUE", "ABANDON"):
                return 400, _error_xml(
                    "ValidationError", f"LifecycleActionResult {result!r}: CONTINUE or ABANDON"
                )
            del self.pending[instance_id]
        # A completed termination, or an abandoned launch, ends the instance.
        if pending.transition == "TERMINATING":
            self.autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=True
            )
        elif result == "ABANDON":
            self.autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=False
            )
        return 200, _ok_xml(action)

    def record(self, call: AwsCall) -> None:
        with self.lock:
            self.calls.append(call)

    def find(self, action: str, **params: str) -> list[AwsCall]:
        with self.lock:
            return [c for c in self.calls if c.action == action and params.items() <= c.params.items()]


def _ok_xml(action: str) -> str:
    return (
        f'<{action}Response xmlns="{_ASG_XMLNS}"><{action}Result/>'
        f"<ResponseMetadata><RequestId>{secrets.token_hex(8)}</RequestId></ResponseMetadata></{action}Response>"
    )


def _error_xml(code: str, message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{_ASG_XMLNS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{message}</Message></Error><RequestId>{secrets.token_hex(8)}</RequestId></ErrorResponse>"
    )


class _AwsHandler(_Quiet):
    server: AwsStandIn

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(errors="replace")).items()}
        scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", self.headers.get("Authorization", ""))
        service, action = (scope.group(1) if scope else "?"), params.get("Action", "?")
        if service == "autoscaling" and action in _LIFECYCLE_ACTIONS:
            status, text = self.server.lifecycle_call(action, params)
            self.server.record(AwsCall(time.time(), service, action, params, status))
            return self.reply(status, text, "text/xml")
        connection = http.client.HTTPConnection(self.server.moto.hostname, self.server.moto.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        self.server.record(AwsCall(time.time(), service, action, params, response.status))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET = _handle


# --- moto ----------------------------------------------------------------------------------


def client(service: str, moto_url: str):  # boto3 clients are untyped
    return boto3.client(
        service, endpoint_url=moto_url, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


@dataclass
class Group:
    name: str
    instance_ids: list[str]
    private_ips: dict[str, str]
    target_group_arn: str


def make_group(moto_url: str, name: str, size: int, *, gang: bool, port: int) -> Group:
    """An Auto Scaling group in moto with the Fleet's hooks, and a target group."""
    ec2, autoscaling, elbv2 = (
        client("ec2", moto_url),
        client("autoscaling", moto_url),
        client("elbv2", moto_url),
    )
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24", AvailabilityZone=f"{REGION}a")["Subnet"][
        "SubnetId"
    ]
    target_group = elbv2.create_target_group(
        Name=f"{name}-tg",
        Protocol="HTTP",
        Port=port,
        VpcId=vpc,
        TargetType="instance",
        HealthCheckPath="/health",
    )["TargetGroups"][0]["TargetGroupArn"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName=f"{name}-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "p5.48xlarge"}
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": f"{name}-lt"},
        MinSize=0, MaxSize=size, DesiredCapacity=size, VPCZoneIdentifier=subnet,
    )  # fmt: skip
    # The Fleet's hooks (infra/components/fleet.py): "drain" on every group, "gang-ready" on gangs.
    autoscaling.put_lifecycle_hook(
        LifecycleHookName="drain", AutoScalingGroupName=name, HeartbeatTimeout=120,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING", DefaultResult="CONTINUE",
    )  # fmt: skip
    if gang:
        autoscaling.put_lifecycle_hook(
            LifecycleHookName="gang-ready", AutoScalingGroupName=name, HeartbeatTimeout=600,
            LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING", DefaultResult="ABANDON",
        )  # fmt: skip
    ids = sorted(
        i["InstanceId"]
        for i in autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][
            0
        ]["Instances"]
    )
    reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    ips = {i["InstanceId"]: i["PrivateIpAddress"] for r in reservations for i in r["Instances"]}
    return Group(name, ids, ips, target_group)


def asg_instance(moto_url: str, instance_id: str) -> dict | None:
    found = client("autoscaling", moto_url).describe_auto_scaling_instances(InstanceIds=[instance_id])
    return found["AutoScalingInstances"][0] if found["AutoScalingInstances"] else None


def ec2_state(moto_url: str, instance_id: str) -> str:
    reservations = client("ec2", moto_url).describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservations[0]["Instances"][0]["State"]["Name"])


def target_state(moto_url: str, group: Group, instance_id: str, port: int) -> str:
    health = client("elbv2", moto_url).describe_target_health(
        TargetGroupArn=group.target_group_arn, Targets=[{"Id": instance_id, "Port": port}]
    )
    return str(health["TargetHealthDescriptions"][0]["TargetHealth"]["State"])


def test_moto_lacks_lifecycle_actions(moto_env: dict[str, str]) -> None:
    """Why AwsStandIn answers these two calls itself: moto 5.2.5 answers them with a 500."""
    group = make_group(moto_env["AWS_ENDPOINT_URL"], "lacks", 1, gang=False, port=8000)
    autoscaling = client("autoscaling", moto_env["AWS_ENDPOINT_URL"])
    args = {
        "LifecycleHookName": "drain",
        "AutoScalingGroupName": group.name,
        "InstanceId": group.instance_ids[0],
    }
    for call, extra in (("complete_lifecycle_action", {"LifecycleActionResult": "CONTINUE"}),
                        ("record_lifecycle_action_heartbeat", {})):  # fmt: skip
        with pytest.raises(Exception, match="500 Internal Server Error|invalid XML"):
            getattr(autoscaling, call)(**args, **extra)


# --- running the watcher -------------------------------------------------------------------

SYSTEMCTL_RECORDER = """#!/bin/bash
# Stands in for systemctl: records its arguments with the time.
printf '%s %s\\n' "$(date +%s.%N)" "$*" >>"$SYSTEMCTL_LOG"
"""


@dataclass
class Node:
    """One instance's watcher: its rendered script, metadata, run dir and systemctl record."""

    name: str
    spec: NodeSpec
    imds: FakeImds
    aws: AwsStandIn
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def log_path(self) -> Path:
        return self.directory / "watch.log"

    def start(self) -> None:
        bin_dir = self.directory / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        (bin_dir / "systemctl").write_text(SYSTEMCTL_RECORDER)
        (bin_dir / "systemctl").chmod(0o755)
        script = self.directory / "lifecycle-watch"
        script.write_text(render_node(self.spec)[SCRIPT])
        script.chmod(0o755)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": f"{bin_dir}:{VENV_BIN}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "AWS_ENDPOINT_URL": self.aws.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "VLLM_FLEET_IMDS": self.imds.url,
            "VLLM_FLEET_RUN_DIR": str(self.run_dir),
            "SYSTEMCTL_LOG": str(self.directory / "systemctl.log"),
            **self.extra_env,
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def phase(self) -> str:
        path = self.run_dir / "lifecycle.state"
        return path.read_text().strip() if path.exists() else ""

    def systemctl(self) -> list[tuple[float, str]]:
        path = self.directory / "systemctl.log"
        if not path.exists():
            return []
        return [
            (float(t), rest) for t, _, rest in (line.partition(" ") for line in path.read_text().splitlines())
        ]

    def wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout_s}s:\n{self.log()}") from None

    def stop(self) -> None:
        """End the watcher we started (its own process group: the script and its aws/curl)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n.name}:\n{n.log()}" for n in nodes)
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")
        time.sleep(0.2)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()
        node.imds.shutdown()
        node.imds.server_close()


@pytest.fixture
def aws(moto_env: dict[str, str]) -> Iterator[AwsStandIn]:
    proxy = AwsStandIn(moto_env["AWS_ENDPOINT_URL"])
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture
def vllms() -> Iterator[list[FakeVllm]]:
    started: list[FakeVllm] = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def with_port(argv: tuple[str, ...], port: int) -> tuple[str, ...]:
    return tuple(str(port) if i and argv[i - 1] == "--port" else a for i, a in enumerate(argv))


FAST = {"poll_interval_s": 1, "heartbeat_interval_s": 5, "health_interval_s": 1, "unhealthy_after": 2}


def two_replica_node_spec(ports: tuple[int, int], delay_s: int) -> NodeSpec:
    return single_spec(
        replicas=(
            ReplicaSpec(serve_argv(ports[0]), port=ports[0], gpu_indices=(0,)),
            ReplicaSpec(serve_argv(ports[1]), port=ports[1], gpu_indices=(1,)),
        ),
        gpus_per_node=2,
        shutdown_timeout_s=5,
        lifecycle_hooks=LifecycleHooks(deregistration_delay_s=delay_s, **FAST),  # type: ignore[arg-type]
    )


def first_read(imds: FakeImds, state: str) -> float:
    return min(t for t, s in imds.state_reads if s == state)


# --- drain: a single-node group --------------------------------------------------------------


def test_drain_waits_for_terminated_then_for_zero_in_flight_then_stops_then_completes(
    moto_env: dict[str, str], aws: AwsStandIn, nodes: list[Node], vllms: list[FakeVllm], tmp_path: Path
) -> None:
    moto = moto_env["AWS_ENDPOINT_URL"]
    ports = (free_port(), free_port())
    delay_s = 40  # far longer than the drain below takes: the stop must come from in-flight 0
    group = make_group(moto, "drain-inflight", 1, gang=False, port=ports[0])
    (instance_id,) = group.instance_ids
    vllms += [FakeVllm(ports[0], running=2, waiting=1), FakeVllm(ports[1], running=1)]
    node = Node(
        "node",
        two_replica_node_spec(ports, delay_s),
        FakeImds(instance_id, {ASG_NAME_TAG: group.name}),
        aws,
        tmp_path,
    )
    nodes.append(node)
    node.start()

    # In service: the watcher polls its target lifecycle state and does nothing else.
    wait_for(lambda: len(node.imds.state_reads) >= 4, 30, "four InService polls", [node])
    assert aws.calls == [] and node.systemctl() == [] and node.phase() == "serving"

    aws.begin(instance_id, "TERMINATING")  # the group holds it in Terminating:Wait ...
    terminated_at = node.imds.set_state("Terminated")  # ... and metadata says so
    vllms[0].set_in_flight_later(2.0, 0)
    vllms[1].set_in_flight_later(4.0, 0)
    assert node.wait_exit(90) == 0, node.log()

    seen_at = first_read(node.imds, "Terminated")
    (stop_at, stop), = node.systemctl()  # fmt: skip
    (complete,) = aws.find("CompleteLifecycleAction")
    last_zero = max(v.zero_at or 0.0 for v in vllms)
    print(f"\nTerminated seen after {seen_at - terminated_at:.1f}s; last replica idle at +{last_zero - terminated_at:.1f}s; "
          f"stop at +{stop_at - terminated_at:.1f}s; completed at +{complete.at - terminated_at:.1f}s")  # fmt: skip
    # 1. polled every poll_interval_s while in service, so Terminated was seen within one poll
    reads = [t for t, _ in node.imds.state_reads if t <= seen_at]
    assert max(b - a for a, b in itertools.pairwise(reads)) <= 1 + SLACK_S
    assert seen_at - terminated_at <= 1 + SLACK_S
    # 2. waited for both replicas to have nothing in flight, read twice, not for the delay
    assert stop_at > last_zero and stop_at - terminated_at < delay_s
    for vllm in vllms:
        assert sum(1 for t, n in vllm.metrics_reads if n == 0 and t < stop_at) >= 2
        assert any(n > 0 for t, n in vllm.metrics_reads if t >= seen_at)  # it did see requests first
    # 3. stopped the target and every vLLM unit of the node
    assert stop == "stop vllm-fleet.target vllm-0.service vllm-1.service"
    # 4. completed the drain hook with CONTINUE after the stop, and a heartbeat came before
    assert (
        complete.params["LifecycleHookName"] == "drain"
        and complete.params["AutoScalingGroupName"] == group.name
    )
    assert (
        complete.params["InstanceId"] == instance_id
        and complete.params["LifecycleActionResult"] == "CONTINUE"
    )
    assert complete.status == 200 and complete.at > stop_at
    assert all(h.at < complete.at for h in aws.find("RecordLifecycleActionHeartbeat")) and aws.find(
        "RecordLifecycleActionHeartbeat"
    )
    # ... and moto carried out the termination
    assert asg_instance(moto, instance_id) is None
    assert ec2_state(moto, instance_id) == "terminated"
    assert node.phase() == "drained"


def test_drain_stops_after_the_deregistration_delay_when_requests_never_finish(
    moto_env: dict[str, str], aws: AwsStandIn, nodes: list[Node], vllms: list[FakeVllm], tmp_path: Path
) -> None:
    moto = moto_env["AWS_ENDPOINT_URL"]
    ports = (free_port(), free_port())
    delay_s = 6
    group = make_group(moto, "drain-delay", 1, gang=False, port=ports[0])
    (instance_id,) = group.instance_ids
    vllms += [FakeVllm(ports[0], running=0), FakeVllm(ports[1], running=3)]
    node = Node(
        "node",
        two_replica_node_spec(ports, delay_s),
        FakeImds(instance_id, {ASG_NAME_TAG: group.name}),
        aws,
        tmp_path,
    )
    nodes.append(node)
    node.start()
    wait_for(lambda: node.imds.state_reads, 30, "the first poll", [node])
    # A token that stops working (expired) is renewed, not fatal.
    node.imds.expire_token()
    wait_for(lambda: node.imds.token_puts >= 2, 30, "a new metadata token", [node])

    aws.begin(instance_id, "TERMINATING")
    node.imds.set_state("Terminated")
    assert node.wait_exit(90) == 0, node.log()
    seen_at = first_read(node.imds, "Terminated")
    (stop_at, _), = node.systemctl()  # fmt: skip
    print(f"\nstop {stop_at - seen_at:.1f}s after Terminated was seen (delay {delay_s}s)")
    # Replica 1 never drained: the stop came when the delay was over, not before.
    # Not before the delay; after it, at most a poll, a scrape and the heartbeat before the stop.
    assert delay_s <= stop_at - seen_at <= delay_s + 1 + 3 * SLACK_S
    assert f"deregistration delay of {delay_s}s is over" in node.log()
    (complete,) = aws.find("CompleteLifecycleAction")
    assert complete.at > stop_at and asg_instance(moto, instance_id) is None


def test_no_group_tag_means_nothing_to_do(aws: AwsStandIn, nodes: list[Node], tmp_path: Path) -> None:
    """A node outside an Auto Scaling group (a boot test, a hand-launched instance) exits at once."""
    node = Node(
        "loose",
        two_replica_node_spec((free_port(), free_port()), 5),
        FakeImds("i-0123456789abcdef0", {}),
        aws,
        tmp_path,
    )
    nodes.append(node)
    node.start()
    assert node.wait_exit(30) == 0, node.log()
    assert "no aws:autoscaling:groupName tag" in node.log()
    assert aws.calls == [] and node.systemctl() == [] and node.imds.state_reads == []


def test_completing_without_a_pending_action_is_refused(moto_env: dict[str, str], aws: AwsStandIn) -> None:
    """The stand-in is not a rubber stamp: no pending action, no completion (as in AWS)."""
    group = make_group(moto_env["AWS_ENDPOINT_URL"], "refuse", 1, gang=False, port=8000)
    autoscaling = client("autoscaling", aws.url)
    with pytest.raises(autoscaling.exceptions.ClientError, match="No active Lifecycle Action"):
        autoscaling.complete_lifecycle_action(
            LifecycleHookName="drain", AutoScalingGroupName=group.name,
            InstanceId=group.instance_ids[0], LifecycleActionResult="CONTINUE",
        )  # fmt: skip
    assert asg_instance(moto_env["AWS_ENDPOINT_URL"], group.instance_ids[0]) is not None


# --- gangs ---------------------------------------------------------------------------------


def gang_spec(port: int, **hooks: int) -> NodeSpec:
    spec = multi_spec()
    (replica,) = spec.replicas
    return dataclasses.replace(
        spec,
        replicas=(ReplicaSpec(with_port(replica.serve_argv, port), port=port),),
        shutdown_timeout_s=5,
        lifecycle_hooks=LifecycleHooks(deregistration_delay_s=20, **{**FAST, **hooks}),  # type: ignore[arg-type]
    )


@dataclass
class Gang:
    group: Group
    head: Node
    worker: Node
    vllm: FakeVllm
    port: int


def start_gang(
    moto: str, aws: AwsStandIn, nodes: list[Node], vllms: list[FakeVllm], tmp_path: Path, name: str,
    *, spec: NodeSpec | None = None, health: int = 503,
) -> Gang:  # fmt: skip
    """A gang of two in moto, both members in the gang-ready hook, both watchers running.
    The head is the lowest instance id (gang-discover's rule); gang.env is what it writes."""
    port = free_port()
    spec = spec or gang_spec(port)
    port = spec.replicas[0].port
    group = make_group(moto, name, 2, gang=True, port=port)
    head_id, worker_id = group.instance_ids
    vllm = FakeVllm(port, health=health, running=0)
    vllms.append(vllm)
    members = []
    for role, instance_id in (("head", head_id), ("worker", worker_id)):
        aws.begin(instance_id, "LAUNCHING")
        tags = {ASG_NAME_TAG: group.name, TARGET_GROUP_TAG: group.target_group_arn}
        node = Node(role, spec, FakeImds(instance_id, tags), aws, tmp_path / role)
        node.run_dir.mkdir(parents=True)
        (node.run_dir / "gang.env").write_text(f"ROLE={role}\nHEAD_IP={group.private_ips[head_id]}\n")
        nodes.append(node)
        members.append(node)
    # The worker first: it must wait for the head, however long the head takes.
    members[1].start()
    members[0].start()
    return Gang(group, members[0], members[1], vllm, port)


def bring_gang_to_service(gang: Gang, aws: AwsStandIn, moto: str) -> None:
    nodes = [gang.head, gang.worker]
    wait_for(
        lambda: gang.worker.phase() == "gang-ready" and gang.head.phase() == "gang-ready",
        60,
        "gang-ready",
        nodes,
    )
    time.sleep(2)  # both keep waiting while vLLM loads
    assert aws.find("RegisterTargets") == [] and aws.find("CompleteLifecycleAction") == []
    gang.vllm.health = 200
    wait_for(
        lambda: gang.head.phase() == "serving" and gang.worker.phase() == "serving", 90, "both serving", nodes
    )


def test_gang_members_wait_for_the_head_to_serve_then_drain_head_first(
    moto_env: dict[str, str], aws: AwsStandIn, nodes: list[Node], vllms: list[FakeVllm], tmp_path: Path
) -> None:
    moto = moto_env["AWS_ENDPOINT_URL"]
    gang = start_gang(moto, aws, nodes, vllms, tmp_path, "gang-flow")
    head_id, worker_id = gang.group.instance_ids
    bring_gang_to_service(gang, aws, moto)

    # Readiness: the head registered its own port only after /health said 200, completed once
    # the target was healthy; the worker completed only after that too.
    (register,) = aws.find("RegisterTargets")
    assert gang.vllm.first_200_at is not None and register.at > gang.vllm.first_200_at
    assert register.params["Targets.member.1.Id"] == head_id and register.params[
        "Targets.member.1.Port"
    ] == str(gang.port)
    ready = {
        c.params["InstanceId"]: c for c in aws.find("CompleteLifecycleAction", LifecycleHookName="gang-ready")
    }
    assert set(ready) == {head_id, worker_id}
    assert all(c.params["LifecycleActionResult"] == "CONTINUE" and c.status == 200 for c in ready.values())
    healthy_checks = [c for c in aws.find("DescribeTargetHealth") if c.at > register.at]
    assert healthy_checks and ready[head_id].at > healthy_checks[0].at and ready[worker_id].at > register.at
    assert target_state(moto, gang.group, head_id, gang.port) == "healthy"
    assert aws.pending == {}
    assert aws.find("SetInstanceHealth") == []  # a healthy gang stays healthy

    # Scale-in of the whole gang: both members get Terminated while one request is in flight.
    gang.vllm.set_in_flight(1)
    for node in (gang.head, gang.worker):
        aws.begin(node.imds.instance_id, "TERMINATING")
        node.imds.set_state("Terminated")
    gang.vllm.set_in_flight_later(6.0, 0)
    assert gang.head.wait_exit(90) == 0, gang.head.log()
    assert gang.worker.wait_exit(90) == 0, gang.worker.log()

    (deregister,) = aws.find("DeregisterTargets")
    assert deregister.params["Targets.member.1.Id"] == head_id
    (head_stop_at, head_stop), = gang.head.systemctl()  # fmt: skip
    (worker_stop_at, worker_stop), = gang.worker.systemctl()  # fmt: skip
    done = {c.params["InstanceId"]: c for c in aws.find("CompleteLifecycleAction", LifecycleHookName="drain")}
    assert gang.vllm.zero_at is not None
    # head: deregister → nothing in flight → stop → complete; worker: stop only once the head
    # completed (its Ray stayed up for the head's drain) → complete.
    assert (
        deregister.at
        < gang.vllm.zero_at
        < head_stop_at
        < done[head_id].at
        < worker_stop_at
        < done[worker_id].at
    )
    assert (
        head_stop == worker_stop == "stop vllm-fleet.target vllm.service ray-head.service ray-worker.service"
    )
    assert target_state(moto, gang.group, head_id, gang.port) == "unused"
    for instance_id in (head_id, worker_id):
        assert done[instance_id].params["LifecycleActionResult"] == "CONTINUE"
        assert asg_instance(moto, instance_id) is None and ec2_state(moto, instance_id) == "terminated"
    assert "keeping Ray up" in gang.worker.log()


@pytest.mark.parametrize("failure", ["worker-lost", "engine-dead"])
def test_a_broken_gang_marks_every_member_unhealthy(
    failure: str,
    moto_env: dict[str, str],
    aws: AwsStandIn,
    nodes: list[Node],
    vllms: list[FakeVllm],
    tmp_path: Path,
) -> None:
    moto = moto_env["AWS_ENDPOINT_URL"]
    gang = start_gang(moto, aws, nodes, vllms, tmp_path, f"gang-{failure}")
    head_id, worker_id = gang.group.instance_ids
    bring_gang_to_service(gang, aws, moto)
    autoscaling = client("autoscaling", moto)

    def unhealthy(instance_id: str) -> bool:
        found = asg_instance(moto, instance_id)
        return found is not None and found["HealthStatus"].lower() == "unhealthy"

    if failure == "worker-lost":
        # The worker's instance dies outright; the group starts a replacement at once (moto
        # even puts it in service), which is not the member the gang was formed with.
        gang.worker.stop()
        autoscaling.terminate_instance_in_auto_scaling_group(
            InstanceId=worker_id, ShouldDecrementDesiredCapacity=False
        )
        wait_for(lambda: unhealthy(head_id), 60, "the head marking itself Unhealthy", [gang.head])
        assert f"member {worker_id} left service" in gang.head.log()
        (mark,) = aws.find("SetInstanceHealth")
        assert mark.params == {
            **mark.params,
            "InstanceId": head_id,
            "HealthStatus": "Unhealthy",
            "ShouldRespectGracePeriod": "false",
        }
    else:
        gang.vllm.health = 503  # vLLM's /health when the engine died
        wait_for(
            lambda: unhealthy(head_id), 60, "the head marking itself Unhealthy", [gang.head, gang.worker]
        )
        assert "vLLM /health is 503 (2 checks in a row)" in gang.head.log()
        assert not unhealthy(worker_id)
        # The group replaces the unhealthy head: the worker sees its gang broken and follows.
        autoscaling.terminate_instance_in_auto_scaling_group(
            InstanceId=head_id, ShouldDecrementDesiredCapacity=False
        )
        wait_for(lambda: unhealthy(worker_id), 60, "the worker marking itself Unhealthy", [gang.worker])
        assert f"member {head_id} left service" in gang.worker.log()
        assert {c.params["InstanceId"] for c in aws.find("SetInstanceHealth")} == {head_id, worker_id}
    # Neither member stopped anything by itself: the group's termination (and the drain) does.
    assert gang.head.systemctl() == [] and gang.worker.systemctl() == []


def test_a_gang_that_never_serves_is_abandoned(
    moto_env: dict[str, str], aws: AwsStandIn, nodes: list[Node], vllms: list[FakeVllm], tmp_path: Path
) -> None:
    moto = moto_env["AWS_ENDPOINT_URL"]
    port = free_port()
    spec = dataclasses.replace(
        gang_spec(port, target_healthy_timeout_s=1),
        start_timeout_s=5,
        gang_discovery=GangDiscovery(ray_wait_timeout_s=1),
    )
    gang = start_gang(moto, aws, nodes, vllms, tmp_path, "gang-abandon", spec=spec, health=503)
    head_id, worker_id = gang.group.instance_ids
    wait_for(
        lambda: len(aws.find("CompleteLifecycleAction")) == 2,
        60,
        "both members to give up",
        [gang.head, gang.worker],
    )
    results = {
        c.params["InstanceId"]: c.params["LifecycleActionResult"] for c in aws.find("CompleteLifecycleAction")
    }
    assert results == {head_id: "ABANDON", worker_id: "ABANDON"}
    assert aws.find("RegisterTargets") == []  # never served, never registered
    for instance_id in (head_id, worker_id):
        assert ec2_state(moto, instance_id) == "terminated"
    assert "vLLM /health still 503 after 6s" in gang.head.log()
    # No health verdicts from members on their way out.
    time.sleep(2)
    assert aws.find("SetInstanceHealth") == []


# --- under real systemd: the sandboxed unit stops the serving units itself -------------------

# Stands in for the vLLM unit: systemd runs it, the watcher must stop it through systemctl.
SERVING_STAND_IN = """\
[Unit]
Description=stand-in for vllm.service (tests/test_node_lifecycle.py)
[Service]
ExecStart=/bin/sleep infinity
"""
FLEET_TARGET_STAND_IN = """\
[Unit]
Description=stand-in for vllm-fleet.target (tests/test_node_lifecycle.py)
Wants=vllm.service vllm-fleet-lifecycle.service
[Install]
WantedBy=multi-user.target
"""


def test_the_sandboxed_unit_drains_a_booted_node(
    node_rootfs: Path, moto_env: dict[str, str], aws: AwsStandIn, vllms: list[FakeVllm], tmp_path: Path
) -> None:
    """The rendered unit under systemd in systemd-nspawn (the container shares this host's
    network, so it reaches the stand-ins on 127.0.0.1): its sandbox lets the watcher read
    metadata, scrape vLLM, call AWS with the image's CLI, and stop a unit through systemctl."""
    from tests.support.rootfs import prepare_node, stop_node

    moto = moto_env["AWS_ENDPOINT_URL"]
    port = free_port()
    group = make_group(moto, "booted", 1, gang=False, port=port)
    (instance_id,) = group.instance_ids
    vllms.append(FakeVllm(port, running=1))
    imds = FakeImds(instance_id, {ASG_NAME_TAG: group.name})
    spec = single_spec(
        replicas=(ReplicaSpec(serve_argv(port), port=port),),
        shutdown_timeout_s=5,
        aws_endpoint_url=aws.url,
        lifecycle_hooks=LifecycleHooks(deregistration_delay_s=30, **FAST),  # type: ignore[arg-type]
    )
    files = render_node(spec)
    node = prepare_node(node_rootfs, tmp_path / "node", "lifecycle", holds_vllm_slot=False)
    try:
        node.write(f"{UNIT_DIR}/{UNIT}", files[f"{UNIT_DIR}/{UNIT}"])
        node.write(SCRIPT, files[SCRIPT], 0o755)
        node.write(f"{UNIT_DIR}/vllm.service", SERVING_STAND_IN)
        node.write(f"{UNIT_DIR}/vllm-fleet.target", FLEET_TARGET_STAND_IN)
        # Test-only: where metadata is, and credentials for moto (a node has its instance role).
        node.write(
            f"{UNIT_DIR}/{UNIT}.d/10-test.conf",
            f"[Service]\nEnvironment=VLLM_FLEET_IMDS={imds.url} AWS_ACCESS_KEY_ID=testing "
            "AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true\n",
        )
        wants = node.root / UNIT_DIR / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "vllm-fleet.target").symlink_to("../vllm-fleet.target")
        node.boot()

        def state() -> str:
            path = node.path("/run/vllm-fleet/lifecycle.state")
            return path.read_text().strip() if path.exists() else ""

        node.wait_for(lambda: state() == "serving", 60, "the watcher to serve")
        assert node.show("vllm.service", "ActiveState")["ActiveState"] == "active"
        aws.begin(instance_id, "TERMINATING")
        imds.set_state("Terminated")
        vllms[0].set_in_flight_later(2.0, 0)
        node.wait_for(lambda: state() == "drained", 120, "the drain")
        journal = node.journal("-u", UNIT)
        (complete,) = aws.find("CompleteLifecycleAction")
        assert complete.params["LifecycleActionResult"] == "CONTINUE", journal
        # systemctl from inside the sandbox stopped the serving unit before the completion.
        shown = node.show("vllm.service", "ActiveState", "InactiveEnterTimestampMonotonic")
        assert shown["ActiveState"] == "inactive", journal
        assert "stopping vllm-fleet.target vllm.service" in journal
        node.wait_for(
            lambda: node.show(UNIT, "ActiveState")["ActiveState"] == "inactive", 30, "the watcher to exit"
        )
        assert node.show(UNIT, "Result")["Result"] == "success", journal
        assert asg_instance(moto, instance_id) is None
    finally:
        stop_node(node)
        imds.shutdown()
        imds.server_close()
