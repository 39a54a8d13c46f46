"""Zero-downtime API key rotation.

The node side (infra/render/templates/node/): ``vllm-fleet-fetch-key.service`` copies the secret
``vllm-fleet/<stack>/api-key`` into a root-only tmpfs file; ``vllm.service`` hands every key
in it to vLLM (``--config`` → ``api-key: [...]``; vLLM 0.32.0's ``--api-key`` is a list and
its AuthenticationMiddleware accepts any key in it, vllm/entrypoints/serve/middleware/
authenticate.py). A key change lands on a node only when vLLM restarts.

So a rotation has two phases, each a rolling restart, one node at a time:
1. add: the secret becomes ``{"keys": [new, old]}``; every node restarts and accepts both.
   Clients switch to the new key (the secret's first key) after this phase.
2. retire: the secret becomes ``{"keys": [new]}``; every node restarts; the old key is dead.
Each node is drained out of the load balancer before its restart and must be healthy in it
again before the next node starts, so clients never reach a restarting server.

The orchestration (``rotate_api_key``) takes three injectable parts: a ``KeyStore`` (Secrets
Manager), a ``TargetPool`` (the ALB target group; haproxy in the local test) and a
``NodeRestarter`` (SSM Run Command on the instance; a local process restart in the test).
"""

from __future__ import annotations

import base64
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

import botocore.exceptions  # type: ignore[import-untyped]
import jinja2

from infra.errors import FleetError
from infra.ops.api_keys import check_key, format_secret_value, read_secret_keys
from infra.ops.aws import error_code, error_text
from infra.plan.tags import STACK_TAG
from infra.render.templating import template_environment

Phase = Literal["all", "add", "retire"]
Progress = Callable[[str], None]
TEMPLATE_DIR = Path(__file__).with_name("templates")
# The ALB's health check needs a few passes after registration before a target is healthy.
HEALTHY_MARGIN_S = 120


@dataclass(frozen=True)
class Node:
    """One instance behind the load balancer, with the vLLM ports it serves on."""

    node_id: str
    ports: tuple[int, ...]


class KeyStore(Protocol):
    def read(self) -> list[str]: ...
    def write(self, keys: list[str]) -> None: ...


class TargetPool(Protocol):
    def nodes(self) -> list[Node]: ...
    def healthy(self) -> set[str]: ...
    def drain(self, node: Node, timeout_s: float) -> None: ...
    def restore(self, node: Node) -> None: ...
    def wait_healthy(self, node: Node, timeout_s: float) -> None: ...


class NodeRestarter(Protocol):
    def restart(self, node: Node, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class Timeouts:
    drain_s: float = 600.0  # in-flight requests finish (the target group's deregistration delay)
    restart_s: float = 1800.0  # key fetch + vLLM start to local /health 200
    healthy_s: float = 1800.0 + HEALTHY_MARGIN_S  # healthy in the load balancer again


@dataclass
class RotationReport:
    phases: list[str] = field(default_factory=list)
    restarted: dict[str, list[str]] = field(default_factory=dict)  # phase → node ids
    retired_keys: int = 0


def roll_nodes(
    pool: TargetPool,
    restarter: NodeRestarter,
    *,
    phase: str,
    timeouts: Timeouts,
    progress: Progress,
    allow_downtime: bool = False,
) -> list[str]:
    """Restart every node, one at a time: drain, restart, restore, wait until healthy."""
    nodes = pool.nodes()
    if not nodes:
        raise FleetError("no targets registered with the load balancer: nothing serves the key")
    done = []
    for index, node in enumerate(nodes, 1):
        others = pool.healthy() - {node.node_id}
        if not others and not allow_downtime:
            raise FleetError(
                f"{phase}: no other healthy target while {node.node_id} restarts, so clients would see "
                "errors; scale out to 2+ replicas first, or pass --allow-downtime"
            )
        where = f"[{phase}] node {index}/{len(nodes)} {node.node_id}"
        progress(f"{where}: draining from the load balancer")
        pool.drain(node, timeouts.drain_s)
        progress(f"{where}: re-fetching the key and restarting vLLM")
        try:
            restarter.restart(node, timeouts.restart_s)
        finally:
            # Back in the pool even when the restart failed: then its health check fails
            # where the Auto Scaling group can see it and replace the instance.
            pool.restore(node)
        progress(f"{where}: waiting until healthy in the load balancer")
        pool.wait_healthy(node, timeouts.healthy_s)
        progress(f"{where}: healthy")
        done.append(node.node_id)
    return done


def rotate_api_key(
    store: KeyStore,
    pool: TargetPool,
    restarter: NodeRestarter,
    *,
    new_key: str,
    phase: Phase = "all",
    timeouts: Timeouts = Timeouts(),
    progress: Progress = lambda line: None,
    on_keys_added: Callable[[], None] = lambda: None,
    allow_downtime: bool = False,
) -> RotationReport:
    """Add ``new_key`` beside the current key(s), roll the fleet, then retire the old ones.

    ``on_keys_added`` runs between the phases, once every node accepts the new key: the
    point where clients switch to it.
    """
    report = RotationReport()
    if phase in ("all", "add"):
        check_key(new_key, what="new key")
        current = store.read()
        if new_key in current:
            raise FleetError("the new key is already in the secret; give a different one")
        store.write([new_key, *current])
        progress(f"[add] secret now holds {len(current) + 1} keys (new first); rolling the fleet")
        report.restarted["add"] = roll_nodes(
            pool, restarter, phase="add", timeouts=timeouts, progress=progress, allow_downtime=allow_downtime
        )
        report.phases.append("add")
        progress("[add] every node accepts the new key; clients can switch to it now")
        on_keys_added()
    if phase in ("all", "retire"):
        current = store.read()
        if len(current) < 2:
            raise FleetError("retire: the secret holds one key only; nothing to retire (run the add phase first)")
        if phase == "all" and current[0] != new_key:
            raise FleetError("retire: the secret's first key is no longer the new key (changed meanwhile); stopping")
        store.write(current[:1])
        report.retired_keys = len(current) - 1
        progress(f"[retire] secret now holds the new key only ({report.retired_keys} retired); rolling the fleet")
        report.restarted["retire"] = roll_nodes(
            pool, restarter, phase="retire", timeouts=timeouts, progress=progress, allow_downtime=allow_downtime
        )
        report.phases.append("retire")
        progress("[retire] done: the old key is rejected everywhere")
    return report


# ---- AWS implementations ----


class SecretsManagerKeyStore:
    def __init__(self, secretsmanager: Any, secret_id: str) -> None:
        self.client = secretsmanager
        self.secret_id = secret_id

    def read(self) -> list[str]:
        try:
            return read_secret_keys(self.client, self.secret_id)
        except botocore.exceptions.ClientError as err:
            raise FleetError(f"secret {self.secret_id}: {error_text(err)}") from None

    def write(self, keys: list[str]) -> None:
        # A new version becomes AWSCURRENT, which is what the node's fetch script reads.
        self.client.put_secret_value(SecretId=self.secret_id, SecretString=format_secret_value(keys))


class Elbv2TargetPool:
    """The fleet's ALB target groups: deregister (draining), register, describe_target_health.

    The endpoint has one target group per vLLM server slot on a node (consecutive ports,
    infra/components/endpoint.py), so a node is an instance id with its port in each group.
    """

    def __init__(
        self,
        elbv2: Any,
        target_group_arns: list[str],
        *,
        poll_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not target_group_arns:
            raise FleetError("no target group to rotate behind")
        self.client = elbv2
        self.arns = list(target_group_arns)
        # Ports as registered when nodes() last looked: a drained node's targets are gone from
        # describe_target_health, yet restore() must register the same ports again.
        self._node_ports: dict[tuple[str, str], int] = {}
        self.poll_s = poll_s
        self.sleep = sleep
        self.clock = clock

    def _health(self, node: Node | None = None) -> list[tuple[str, dict[str, Any]]]:
        """(target group ARN, TargetHealthDescription) over every group, or one node's targets."""
        found = []
        for arn in self.arns:
            kwargs: dict[str, Any] = {"TargetGroupArn": arn}
            if node is not None:
                targets = self._targets(node, arn)
                if not targets:
                    continue
                kwargs["Targets"] = targets
            found += [(arn, d) for d in self.client.describe_target_health(**kwargs)["TargetHealthDescriptions"]]
        return found

    def _ports(self) -> dict[tuple[str, str], int]:
        """(instance id, target group ARN) → port, for every registered target."""
        ports = {}
        for arn, desc in self._health():
            if desc["TargetHealth"]["State"] not in ("draining", "unused"):
                ports[(desc["Target"]["Id"], arn)] = int(desc["Target"]["Port"])
        return ports

    def nodes(self) -> list[Node]:
        self._node_ports = self._ports()
        by_node: dict[str, list[int]] = {}
        for (node_id, _), port in self._node_ports.items():
            by_node.setdefault(node_id, []).append(port)
        return [Node(node_id, tuple(sorted(p))) for node_id, p in sorted(by_node.items())]

    def healthy(self) -> set[str]:
        states: dict[str, set[str]] = {}
        for _, desc in self._health():
            states.setdefault(desc["Target"]["Id"], set()).add(desc["TargetHealth"]["State"])
        return {node_id for node_id, s in states.items() if s == {"healthy"}}

    def _targets(self, node: Node, arn: str) -> list[dict[str, Any]]:
        port = (self._node_ports or self._ports()).get((node.node_id, arn))
        return [] if port is None else [{"Id": node.node_id, "Port": port}]

    def _wait(self, node: Node, done: Callable[[set[str]], bool], timeout_s: float, what: str) -> None:
        deadline = self.clock() + timeout_s
        while True:
            descs = [d for _, d in self._health(node)]
            states = {d["TargetHealth"]["State"] for d in descs}
            if done(states):
                return
            if self.clock() > deadline:
                reasons = ", ".join(sorted({d["TargetHealth"].get("Reason", d["TargetHealth"]["State"]) for d in descs}))
                raise FleetError(f"{node.node_id}: not {what} after {timeout_s:.0f} s ({reasons})")
            self.sleep(self.poll_s)

    def drain(self, node: Node, timeout_s: float) -> None:
        for arn in self.arns:
            if targets := self._targets(node, arn):
                self.client.deregister_targets(TargetGroupArn=arn, Targets=targets)
        # "draining" until in-flight requests end (or the deregistration delay), then "unused".
        self._wait(node, lambda s: s <= {"unused"}, timeout_s, "drained")

    def restore(self, node: Node) -> None:
        for arn in self.arns:
            if targets := self._targets(node, arn):
                self.client.register_targets(TargetGroupArn=arn, Targets=targets)

    def wait_healthy(self, node: Node, timeout_s: float) -> None:
        self._wait(node, lambda s: s == {"healthy"}, timeout_s, "healthy")

    def deregistration_delay_s(self) -> int:
        """The longest deregistration delay of the groups (the ELB default is 300 s)."""
        delays = [300]
        for arn in self.arns:
            for attr in self.client.describe_target_group_attributes(TargetGroupArn=arn)["Attributes"]:
                if attr["Key"] == "deregistration_delay.timeout_seconds":
                    delays.append(int(attr["Value"]))
        return max(delays[1:] or delays)


@cache
def _templates() -> jinja2.Environment:
    return template_environment(TEMPLATE_DIR)


def render_restart_script(ports: tuple[int, ...], *, health_timeout_s: int) -> str:
    """The shell script SSM runs on a node: re-fetch the key(s), restart vLLM, wait for /health."""
    if not ports or any(not 1 <= p <= 65535 for p in ports):
        raise FleetError(f"ports {list(ports)}: need at least one port in 1..65535")
    return _templates().get_template("restart-vllm.sh.j2").render(
        ports=" ".join(str(p) for p in ports), health_timeout_s=int(health_timeout_s)
    )


def ssm_commands(script: str) -> list[str]:
    """AWS-RunShellScript ``commands``: the script travels base64-encoded and runs under bash,
    whatever shell the agent uses and whatever quoting the script contains."""
    encoded = base64.b64encode(script.encode()).decode()
    return [f"echo {shlex.quote(encoded)} | base64 -d | bash"]


# Terminal statuses of GetCommandInvocation.
_SSM_DONE = {"Success", "Cancelled", "TimedOut", "Failed", "Cancelling"}


class SsmNodeRestarter:
    """Runs the restart script on the instance with SSM Run Command (AWS-RunShellScript)."""

    def __init__(
        self,
        ssm: Any,
        *,
        poll_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = ssm
        self.poll_s = poll_s
        self.sleep = sleep
        self.clock = clock

    def restart(self, node: Node, timeout_s: float) -> None:
        script = render_restart_script(node.ports, health_timeout_s=int(timeout_s))
        command = self.client.send_command(
            InstanceIds=[node.node_id],
            DocumentName="AWS-RunShellScript",
            Comment="vllm-fleet rotate-key: re-fetch API keys, restart vLLM",
            TimeoutSeconds=60,  # to start delivering; the run itself has executionTimeout
            Parameters={"commands": ssm_commands(script), "executionTimeout": [str(int(timeout_s) + 60)]},
        )["Command"]
        command_id = command["CommandId"]
        deadline = self.clock() + timeout_s + 120
        while True:
            try:
                invocation = self.client.get_command_invocation(CommandId=command_id, InstanceId=node.node_id)
            except botocore.exceptions.ClientError as err:
                # The invocation appears a moment after send_command returns.
                if error_code(err) != "InvocationDoesNotExist":
                    raise
                invocation = {"Status": "Pending"}
            status = invocation["Status"]
            if status == "Success":
                return
            if status in _SSM_DONE:
                stderr = (invocation.get("StandardErrorContent") or "").strip().splitlines()[-3:]
                raise FleetError(f"{node.node_id}: restart command {command_id} {status}: {' / '.join(stderr)}")
            if self.clock() > deadline:
                raise FleetError(f"{node.node_id}: restart command {command_id} still {status} after {timeout_s:.0f} s")
            self.sleep(self.poll_s)


def find_target_groups(tagging: Any, stack: str) -> list[str]:
    """The stack's target groups (one per server slot), found by their ``vllm-fleet:stack`` tag."""
    arns: list[str] = []
    paginator = tagging.get_paginator("get_resources")
    for page in paginator.paginate(
        TagFilters=[{"Key": STACK_TAG, "Values": [stack]}],
        ResourceTypeFilters=["elasticloadbalancing:targetgroup"],
    ):
        arns += [r["ResourceARN"] for r in page["ResourceTagMappingList"]]
    if not arns:
        raise FleetError(
            f"stack {stack}: no target group tagged {STACK_TAG}={stack} in this region; pass --target-group-arn"
        )
    return sorted(arns)
