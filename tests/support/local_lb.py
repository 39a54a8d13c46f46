"""A local haproxy that mirrors the fleet's ALB: path allowlist, /health checks, draining.

Tests and CI smoke runs put it in front of real vLLM servers on 127.0.0.1, so `smoke` sees
what it sees through the ALB (``/metrics`` answered 404 by the load balancer, not by vLLM)
and `rotate-key` can drain and restore servers the way it does with a target group.
``HaproxyTargetPool`` is the haproxy side of ``infra.ops.rotate.TargetPool``, driven
through haproxy's runtime API (its admin socket).
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from infra.errors import FleetError
from infra.ops.rotate import Node
from infra.plan.public_api import DENIED_STATUS, NOT_FOUND_BODY, routes_by_method
from infra.render.templating import template_environment

TEMPLATE_DIR = Path(__file__).with_name("templates")
BACKEND = "vllm"
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_ADDRESS = re.compile(r"^[0-9.]+:[0-9]{1,5}$")


@dataclass(frozen=True)
class Backend:
    name: str
    address: str  # host:port

    def __post_init__(self) -> None:
        if not _SERVER_NAME.match(self.name) or not _ADDRESS.match(self.address):
            raise FleetError(f"backend {self.name!r} at {self.address!r}: name [A-Za-z0-9_-], address IP:port")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@cache
def _environment() -> jinja2.Environment:
    return template_environment(TEMPLATE_DIR)


def render_haproxy_config(
    backends: Sequence[Backend],
    *,
    port: int,
    admin_socket: Path,
    bind_address: str = "127.0.0.1",
    timeout_s: int = 600,
    check_interval_ms: int = 1000,
    check_timeout_s: int = 5,
    rise: int = 2,
    fall: int = 2,
) -> str:
    routes = routes_by_method()
    return _environment().get_template("haproxy.cfg.j2").render(
        servers=list(backends),
        port=port,
        admin_socket=str(admin_socket),
        bind_address=bind_address,
        timeout_s=timeout_s,
        check_interval_ms=check_interval_ms,
        check_timeout_s=check_timeout_s,
        rise=rise,
        fall=fall,
        routes=routes,
        denied_status=DENIED_STATUS,
        denied_body=NOT_FOUND_BODY,
    )


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if not found:
        raise FleetError("haproxy: not installed (scripts/install-system-deps.sh installs it)")
    return found


@dataclass
class LocalLoadBalancer:
    port: int
    admin_socket: Path
    config_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        """One runtime API command over the admin socket; returns haproxy's answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` rows of the vLLM backend's servers, by server name."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND")
        }


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FleetError(f"haproxy exited with code {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise FleetError(f"haproxy not listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


@contextmanager
def run_local_lb(
    backends: Sequence[Backend], workdir: Path, *, port: int, check_interval_ms: int = 1000
) -> Iterator[LocalLoadBalancer]:
    """Validate the rendered config with ``haproxy -c``, run haproxy in the foreground, stop it after."""
    workdir.mkdir(parents=True, exist_ok=True)
    admin_socket = workdir / "haproxy.sock"
    config_path = workdir / "haproxy.cfg"
    config_path.write_text(
        render_haproxy_config(backends, port=port, admin_socket=admin_socket, check_interval_ms=check_interval_ms),
        encoding="utf-8",
    )
    binary = haproxy_binary()
    check = subprocess.run([binary, "-c", "-f", str(config_path)], check=False, capture_output=True, text=True)
    if check.returncode != 0:
        raise FleetError(f"haproxy -c rejected {config_path}: {(check.stdout + check.stderr).strip()}")
    log_path = workdir / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, "-db", "-f", str(config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_listening(port, process, timeout_s=10)
        yield LocalLoadBalancer(port, admin_socket, config_path, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class HaproxyTargetPool:
    """``TargetPool`` over the local haproxy: drain → maint (= deregistered) → ready → UP."""

    def __init__(
        self,
        lb: LocalLoadBalancer,
        *,
        poll_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lb = lb
        self.poll_s = poll_s
        self.sleep = sleep
        self.clock = clock

    def nodes(self) -> list[Node]:
        stats = self.lb.server_stats()
        # haproxy reports each server's port in "addr" (host:port).
        return [Node(name, (int(row["addr"].rsplit(":", 1)[1]),)) for name, row in sorted(stats.items())]

    def healthy(self) -> set[str]:
        return {name for name, row in self.lb.server_stats().items() if row["status"] == "UP"}

    def _wait(self, node: Node, done: Callable[[dict[str, str]], bool], timeout_s: float, what: str) -> None:
        deadline = self.clock() + timeout_s
        while True:
            row = self.lb.server_stats()[node.node_id]
            if done(row):
                return
            if self.clock() > deadline:
                raise FleetError(f"{node.node_id}: not {what} after {timeout_s:.0f} s (status {row['status']})")
            self.sleep(self.poll_s)

    def drain(self, node: Node, timeout_s: float) -> None:
        self.lb.command(f"set server {BACKEND}/{node.node_id} state drain")
        # Drained = no request in flight (scur) and none queued for it (qcur).
        self._wait(node, lambda r: r["scur"] == "0" and r["qcur"] in ("0", ""), timeout_s, "drained")
        self.lb.command(f"set server {BACKEND}/{node.node_id} state maint")

    def restore(self, node: Node) -> None:
        self.lb.command(f"set server {BACKEND}/{node.node_id} state ready")

    def wait_healthy(self, node: Node, timeout_s: float) -> None:
        self._wait(node, lambda r: r["status"] == "UP", timeout_s, "healthy")
