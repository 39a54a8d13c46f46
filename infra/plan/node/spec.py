"""Everything one node needs to run its share of the fleet, as one frozen value.

The planner builds a ``NodeSpec``; ``infra/render/node.py`` turns it into systemd units,
helper scripts and cloud-init user-data. Construction validates every field, so a spec
that exists can be rendered: bad input fails here with a one-line ``FleetError``.

The API key is never part of a spec. It lives in Secrets Manager under
``api_key_secret_id`` and reaches vLLM only on the node, through a root-only tmpfs file
and systemd's ``LoadCredential=`` (see docs/node.md). A spec whose argv or environment
could carry a key is refused.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import get_args

from infra.config import WeightSourceName
from infra.errors import FleetError
from infra.facts.catalog import REGION_PATTERN

# Paths go into unit files unquoted (ReadWritePaths=, tmpfiles.d), so keep them plain.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*[A-Za-z0-9._+-]$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STACK = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REGION = re.compile(REGION_PATTERN)
_SECRET_ID = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+/?$")
# Environment names that look like they hold a secret: a secret never goes in a unit file.
_SECRETISH_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# Directories a service must never be allowed to write.
_SYSTEM_DIRS = ("/usr", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev", "/run")

# Variables the renderer sets itself (cache dirs, per-replica GPUs, multi-node networking).
RENDERER_ENV = frozenset(
    {
        "HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "XDG_CACHE_HOME",
        "PYTHONUNBUFFERED",
        "CUDA_VISIBLE_DEVICES",
        "VLLM_HOST_IP",
        "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME",
        "RAY_ADDRESS",
        "VLLM_API_KEY",
        "HF_TOKEN_PATH",
    }
)
WEIGHT_SOURCES = get_args(WeightSourceName)
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/=+-]*)?$")


def _option_name(token: str) -> str:
    """``--api_key=x`` → ``--api-key`` (vLLM accepts underscores and ``=`` values)."""
    return token.split("=", 1)[0].replace("_", "-")


def _check_path(key: str, value: str) -> str:
    if not _SAFE_PATH.match(value) or posixpath.normpath(value) != value or "//" in value:
        raise FleetError(f"{key}={value!r}: must be a normalised absolute path of letters, digits and ._+-/")
    if any(value == d or value.startswith(d + "/") for d in _SYSTEM_DIRS):
        raise FleetError(f"{key}={value!r}: a service may not write under {', '.join(_SYSTEM_DIRS)}")
    return value


def _check_control_chars(key: str, value: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise FleetError(f"{key}: contains a control character (newline, tab, ...); not allowed in a unit")


@dataclass(frozen=True)
class ReplicaSpec:
    """One ``vllm serve`` process on the node.

    ``gpu_indices`` are the node-local GPUs it may use (becomes CUDA_VISIBLE_DEVICES);
    empty means every GPU of the node (the usual one-replica-per-node case).
    """

    serve_argv: tuple[str, ...]
    port: int = 8000
    gpu_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "serve_argv", tuple(self.serve_argv))
        object.__setattr__(self, "gpu_indices", tuple(self.gpu_indices))
        argv = self.serve_argv
        if len(argv) < 3 or argv[0] != "vllm" or argv[1] != "serve" or argv[2].startswith("-"):
            raise FleetError(f"serve_argv={list(argv[:3])!r}: must start with 'vllm', 'serve', MODEL")
        for i, token in enumerate(argv):
            _check_control_chars(f"serve_argv[{i}]", token)
            name = _option_name(token)
            # argparse takes unique prefixes: --api-k, --api-ke and --api-key all mean --api-key.
            if name.startswith("--api-k"):
                raise FleetError(
                    f"serve_argv[{i}]={name!r}: the API key never goes on the command line "
                    "(argv is world-readable via /proc); the node loads it from Secrets Manager"
                )
            if name == "--config":
                raise FleetError(
                    f"serve_argv[{i}]='--config': reserved; the node passes --config itself "
                    "to hand vLLM the API keys from its systemd credential"
                )
            if name == "--port":
                value = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
                if value != str(self.port):
                    raise FleetError(
                        f"serve_argv --port {value!r}: differs from the replica's port {self.port}"
                    )
        if not 1 <= self.port <= 65535:
            raise FleetError(f"port={self.port}: must be 1..65535")
        if len(set(self.gpu_indices)) != len(self.gpu_indices) or any(g < 0 for g in self.gpu_indices):
            raise FleetError(
                f"gpu_indices={list(self.gpu_indices)}: must be distinct non-negative GPU indices"
            )


@dataclass(frozen=True)
class GangDiscovery:
    """How the nodes of one multi-node replica ("gang") find each other at boot.

    A gang is one Auto Scaling group of ``NodeSpec.nodes`` instances. Each node waits up
    to ``members_timeout_s`` (polling every ``poll_interval_s``) for the group to list all
    members; the member with the lowest instance id is the Ray head. On the head, vLLM
    starts once Ray reports every GPU of the gang, waiting at most ``ray_wait_timeout_s``.
    ``override_env_file`` (ROLE=head|worker, HEAD_IP=...) bypasses AWS, for tests.
    """

    members_timeout_s: int = 900
    poll_interval_s: int = 10
    ray_wait_timeout_s: int = 900
    override_env_file: str = "/etc/vllm-fleet/gang.env"

    def __post_init__(self) -> None:
        for key in ("members_timeout_s", "poll_interval_s", "ray_wait_timeout_s"):
            if getattr(self, key) < 1:
                raise FleetError(f"gang_discovery.{key}={getattr(self, key)}: must be at least 1")
        if not _SAFE_PATH.match(self.override_env_file):
            raise FleetError(
                f"gang_discovery.override_env_file={self.override_env_file!r}: not a plain absolute path"
            )


_HOOK_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,255}$")


@dataclass(frozen=True)
class LifecycleHooks:
    """How the node honours its Auto Scaling group's lifecycle hooks (infra/components/fleet.py).

    Every node drains on the termination hook ``drain_hook``; a gang's members also wait in
    the launch hook ``gang_ready_hook`` until the head serves. ``enabled=False`` renders no
    watcher (tests that boot a node without an Auto Scaling group); on an instance without
    the ``aws:autoscaling:groupName`` tag the watcher does nothing either. docs/node.md has
    the sequence.
    """

    enabled: bool = True
    drain_hook: str = "drain"
    gang_ready_hook: str = "gang-ready"
    # The target group's deregistration delay; None means shutdown_timeout_s, which is what
    # the Fleet sets it to (serving.shutdownTimeoutS).
    deregistration_delay_s: int | None = None
    # How often the node reads its target lifecycle state from instance metadata.
    poll_interval_s: int = 5
    # A lifecycle hook times out after its heartbeat timeout (at least 30 s, the Fleet's are
    # longer); the node records a heartbeat this often while it waits in one.
    heartbeat_interval_s: int = 25
    # Gangs: how often a member checks its gang, and how many failed /health checks in a
    # row mean the head's engine is dead.
    health_interval_s: int = 15
    unhealthy_after: int = 3
    # Gangs: after vLLM is healthy, how long the head's target may take to pass the load
    # balancer's health check.
    target_healthy_timeout_s: int = 600

    def __post_init__(self) -> None:
        for key in ("drain_hook", "gang_ready_hook"):
            if not _HOOK_NAME.match(getattr(self, key)):
                raise FleetError(
                    f"lifecycle_hooks.{key}={getattr(self, key)!r}: letters, digits and ._/- only"
                )
        if self.deregistration_delay_s is not None and not 0 <= self.deregistration_delay_s <= 3600:
            raise FleetError(
                f"lifecycle_hooks.deregistration_delay_s={self.deregistration_delay_s}: must be 0..3600 "
                "(a target group's range)"
            )
        if not 1 <= self.poll_interval_s <= 5:
            raise FleetError(f"lifecycle_hooks.poll_interval_s={self.poll_interval_s}: must be 1..5")
        if not 1 <= self.heartbeat_interval_s < 30:
            raise FleetError(
                f"lifecycle_hooks.heartbeat_interval_s={self.heartbeat_interval_s}: must be 1..29 "
                "(below the shortest lifecycle hook timeout, 30 s)"
            )
        for key in ("health_interval_s", "unhealthy_after", "target_healthy_timeout_s"):
            if getattr(self, key) < 1:
                raise FleetError(f"lifecycle_hooks.{key}={getattr(self, key)}: must be at least 1")


@dataclass(frozen=True)
class NodeSpec:
    """A node of the fleet: what it serves, where its caches live, how it joins a gang."""

    stack: str
    region: str
    replicas: tuple[ReplicaSpec, ...]
    api_key_secret_id: str
    start_timeout_s: int
    shutdown_timeout_s: int
    gpus_per_node: int
    vllm_env: Mapping[str, str] = field(default_factory=dict)
    nodes: int = 1
    venv: str = "/opt/vllm/venv"
    service_user: str = "vllm"
    # The service user's home; the image (images/scripts/create-vllm-user.sh) makes it the
    # VLLM_CACHE_ROOT too, so caches it pre-warms are the ones the unit uses.
    home_dir: str = "/var/cache/vllm"
    hf_home: str = "/var/cache/vllm/huggingface"
    vllm_cache_root: str = "/var/cache/vllm"
    # Both default to /tmp, which PrivateTmp= empties on every restart: keep them cached.
    torchinductor_cache_dir: str = "/var/cache/vllm/torchinductor"
    triton_cache_dir: str = "/var/cache/vllm/triton"
    download_dir: str = "/var/cache/vllm/models"
    # Ray's sockets and session logs; shared by the Ray units and vllm.service on a gang.
    ray_temp_dir: str = "/var/cache/vllm/ray"
    ray_port: int = 6379
    gang_discovery: GangDiscovery = field(default_factory=GangDiscovery)
    lifecycle_hooks: LifecycleHooks = field(default_factory=LifecycleHooks)
    # Only tests set this (a local moto server); production talks to the real endpoints.
    aws_endpoint_url: str | None = None
    # Where the weights come from. "s3": vllm-fleet-fetch-weights copies them from
    # weights_s3_uri (or, when None, from the instance tag the Fleet sets) into weights_dir,
    # which the argv names as the model. "huggingface": vLLM downloads them itself, with the
    # token from hf_token_secret_id (Secrets Manager) if there is one.
    weights_source: str = "huggingface"
    weights_dir: str | None = None
    weights_s3_uri: str | None = None
    hf_token_secret_id: str | None = None
    # scaling-signal's environment (infra/plan/scaling.py node_scaling_environment) and how often it
    # runs; empty renders no scaling units.
    scaling_environment: Mapping[str, str] = field(default_factory=dict)
    scaling_interval_s: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "vllm_env", MappingProxyType(dict(sorted(self.vllm_env.items()))))
        object.__setattr__(self, "scaling_environment", MappingProxyType(dict(self.scaling_environment)))
        if not _STACK.match(self.stack):
            raise FleetError(f"stack={self.stack!r}: lowercase letters, digits and '-', at most 63")
        if not _REGION.match(self.region):
            raise FleetError(f"region={self.region!r}: not an AWS region name like us-east-1")
        if not _SECRET_ID.match(self.api_key_secret_id):
            raise FleetError(f"api_key_secret_id={self.api_key_secret_id!r}: not a Secrets Manager name")
        if not _USER.match(self.service_user) or self.service_user == "root":
            raise FleetError(f"service_user={self.service_user!r}: must be a plain non-root user name")
        if not _SAFE_PATH.match(self.venv):
            raise FleetError(f"venv={self.venv!r}: must be a plain absolute path")
        for key in self.writable_dirs_fields:
            _check_path(key, getattr(self, key))
        if self.start_timeout_s < 1 or self.shutdown_timeout_s < 0:
            raise FleetError(
                f"start_timeout_s={self.start_timeout_s}, shutdown_timeout_s={self.shutdown_timeout_s}: "
                "must be >= 1 and >= 0"
            )
        if self.gpus_per_node < 0:
            raise FleetError(f"gpus_per_node={self.gpus_per_node}: must be >= 0")
        if self.nodes < 1:
            raise FleetError(f"nodes={self.nodes}: must be at least 1")
        if not self.replicas:
            raise FleetError("replicas: a node runs at least one vLLM replica")
        if self.nodes > 1 and len(self.replicas) != 1:
            raise FleetError(
                f"replicas: a multi-node gang runs exactly one replica, got {len(self.replicas)}"
            )
        if self.nodes > 1 and self.gang_discovery.ray_wait_timeout_s >= self.start_timeout_s:
            raise FleetError(
                f"gang_discovery.ray_wait_timeout_s={self.gang_discovery.ray_wait_timeout_s}: must be below "
                f"start_timeout_s={self.start_timeout_s} (TimeoutStartSec covers the wait for Ray)"
            )
        if not 1 <= self.ray_port <= 65535:
            raise FleetError(f"ray_port={self.ray_port}: must be 1..65535")
        ports = [r.port for r in self.replicas]
        if len(set(ports)) != len(ports):
            raise FleetError(f"replicas: ports {ports} must be distinct")
        seen: set[int] = set()
        for r in self.replicas:
            if any(g >= self.gpus_per_node for g in r.gpu_indices):
                raise FleetError(
                    f"gpu_indices={list(r.gpu_indices)}: the node has {self.gpus_per_node} GPUs (0..{self.gpus_per_node - 1})"
                )
            if seen & set(r.gpu_indices):
                raise FleetError(
                    f"gpu_indices={list(r.gpu_indices)}: replicas on one node must not share GPUs"
                )
            seen |= set(r.gpu_indices)
            if len(self.replicas) > 1 and not r.gpu_indices:
                raise FleetError("gpu_indices: with several replicas per node each must name its GPUs")
            self._check_download_dir(r.serve_argv)
        for name, value in self.vllm_env.items():
            if not _ENV_NAME.match(name):
                raise FleetError(f"vllm_env {name!r}: not a valid environment variable name")
            if name in RENDERER_ENV:
                raise FleetError(f"vllm_env {name}: set by the node renderer, not by the plan")
            if _SECRETISH_ENV.search(name):
                raise FleetError(
                    f"vllm_env {name}: looks like a secret; secrets never go in unit files "
                    "(the API key comes from Secrets Manager)"
                )
            _check_control_chars(f"vllm_env {name}", value)
        if self.weights_source not in WEIGHT_SOURCES:
            raise FleetError(f"weights_source={self.weights_source!r}: allowed: {', '.join(WEIGHT_SOURCES)}")
        if self.weights_source == "s3":
            if self.weights_dir is None:
                raise FleetError("weights_dir: weights_source s3 needs the local directory the argv serves from")
            _check_path("weights_dir", self.weights_dir)
            if not any(self.weights_dir.startswith(d + "/") for d in self.writable_dirs):
                raise FleetError(f"weights_dir={self.weights_dir!r}: not inside a writable dir of the node")
            for r in self.replicas:
                if r.serve_argv[2] != self.weights_dir:
                    raise FleetError(
                        f"serve_argv model {r.serve_argv[2]!r}: weights_source s3 serves from weights_dir {self.weights_dir!r}"
                    )
        elif self.weights_dir is not None or self.weights_s3_uri is not None:
            raise FleetError(f"weights_dir, weights_s3_uri: only for weights_source s3, not {self.weights_source!r}")
        if self.weights_s3_uri is not None and not _S3_URI.match(self.weights_s3_uri):
            raise FleetError(f"weights_s3_uri={self.weights_s3_uri!r}: expected s3://bucket/prefix/")
        if self.hf_token_secret_id is not None:
            if self.weights_source != "huggingface":
                raise FleetError(f"hf_token_secret_id: only for weights_source huggingface, not {self.weights_source!r}")
            if not _SECRET_ID.match(self.hf_token_secret_id):
                raise FleetError(f"hf_token_secret_id={self.hf_token_secret_id!r}: not a Secrets Manager name")
        for name, value in self.scaling_environment.items():
            if not _ENV_NAME.match(name):
                raise FleetError(f"scaling_environment {name!r}: not a valid environment variable name")
            _check_control_chars(f"scaling_environment {name}", value)
        if self.scaling_interval_s < 1:
            raise FleetError(f"scaling_interval_s={self.scaling_interval_s}: must be at least 1")
        if self.aws_endpoint_url is not None and not _ENDPOINT.match(self.aws_endpoint_url):
            raise FleetError(f"aws_endpoint_url={self.aws_endpoint_url!r}: must look like http://host:port")

    writable_dirs_fields = (
        "home_dir",
        "hf_home",
        "vllm_cache_root",
        "torchinductor_cache_dir",
        "triton_cache_dir",
        "download_dir",
        "ray_temp_dir",
    )

    @property
    def writable_dirs(self) -> tuple[str, ...]:
        """Every directory the service user may write, deduplicated, in a stable order."""
        return tuple(dict.fromkeys(getattr(self, key) for key in self.writable_dirs_fields))

    @property
    def read_write_paths(self) -> tuple[str, ...]:
        """The writable dirs minus those already inside another one (for ReadWritePaths=)."""
        dirs = self.writable_dirs
        return tuple(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deregistration_delay_s(self) -> int:
        """How long the load balancer drains this node (the Fleet sets it to shutdown_timeout_s)."""
        delay = self.lifecycle_hooks.deregistration_delay_s
        return self.shutdown_timeout_s if delay is None else delay

    def _check_download_dir(self, argv: tuple[str, ...]) -> None:
        """vLLM's --download-dir must be writable by the unit (ProtectSystem=strict)."""
        for i, token in enumerate(argv):
            if _option_name(token) != "--download-dir":
                continue
            value = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            if not any(value == d or value.startswith(d + "/") for d in self.writable_dirs):
                raise FleetError(
                    f"serve_argv --download-dir {value!r}: not under a writable dir of the node "
                    f"({', '.join(self.writable_dirs)}); set NodeSpec.download_dir to it"
                )
