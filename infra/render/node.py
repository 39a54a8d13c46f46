"""Render a node's systemd units, helper scripts and cloud-init user-data from a NodeSpec.

Pure functions over jinja2 templates in ``infra/render/templates/node/``; same spec, same bytes.
``render_node`` gives the files to place on the node (relative path → content),
``render_user_data`` the ``#cloud-config`` that writes them and starts ``vllm-fleet.target``.
Design and hardening notes: docs/node.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import jinja2

from infra.errors import FleetError
from infra.plan.node.serve_args import LOCAL_WEIGHT_SOURCES
from infra.plan.node.spec import NodeSpec, ReplicaSpec
from infra.plan.tags import TARGET_GROUP_TAG
from infra.render.templating import TEMPLATES_DIR, template_environment

TEMPLATE_DIR = TEMPLATES_DIR / "node"

RUN_DIR = "/run/vllm-fleet"
LIBEXEC = "usr/local/libexec/vllm-fleet"
UNIT_DIR = "etc/systemd/system"
# TimeoutStopSec = vLLM's --shutdown-timeout + this, so the drain is never cut short by SIGKILL.
STOP_MARGIN_S = 30
# Shortest API key the node accepts from the secret.
MIN_KEY_LENGTH = 16
# Instance tag the lifecycle watcher reads through instance metadata beside TARGET_GROUP_TAG
# (the target group a gang's head registers in): the group's own tag, set by Auto Scaling.
ASG_NAME_TAG = "aws:autoscaling:groupName"


@dataclass(frozen=True)
class FetchRetry:
    """fetch-api-key's retry schedule: delays double from first_delay_s up to max_delay_s."""

    # 70 attempts are about 33 minutes: a node rides out a Secrets Manager or NAT outage at
    # boot (vLLM's start job waits behind this unit) and is replaced only after that.
    attempts: int = 70
    first_delay_s: int = 2
    max_delay_s: int = 30
    # After this many failures the script says loudly what to check, and keeps trying.
    warn_after: int = 10

    @property
    def total_backoff_s(self) -> int:
        delays, delay = [], self.first_delay_s
        for _ in range(self.attempts - 1):
            delays.append(delay)
            delay = min(delay * 2, self.max_delay_s)
        return sum(delays)


FETCH_RETRY = FetchRetry()

# Characters that need no quoting in a systemd command line word (systemd.syntax(7)).
_SYSTEMD_BARE = re.compile(r"^[A-Za-z0-9_./:=,+@-]+$")


def systemd_word(arg: str) -> str:
    """One literal argv word for ExecStart=: quoted, with C escapes, %% and $$ doubled.

    systemd expands %-specifiers and $VARIABLES inside quotes too (systemd.service(5)
    "COMMAND LINES"), so a literal % or $ must be doubled.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise FleetError(f"argument {arg!r}: control characters cannot go into a systemd command line")
    if arg and _SYSTEMD_BARE.match(arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_argv(argv: list[str] | tuple[str, ...]) -> str:
    return " ".join(systemd_word(a) for a in argv)


def systemd_env(assignment: str) -> str:
    """A quoted ``Environment=`` assignment; specifiers expand there, variables do not."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in assignment):
        raise FleetError(f"environment {assignment!r}: control characters cannot go into a unit")
    escaped = assignment.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


@cache
def _environment() -> jinja2.Environment:
    return template_environment(TEMPLATE_DIR, {"sd_argv": systemd_argv, "sd_env": systemd_env})


def _render(template: str, **context: object) -> str:
    return _environment().get_template(template).render(**context)


def vllm_unit_names(spec: NodeSpec) -> list[str]:
    """``vllm.service`` for one replica per node, else ``vllm-0.service``, ``vllm-1.service``..."""
    if len(spec.replicas) == 1:
        return ["vllm.service"]
    return [f"vllm-{i}.service" for i in range(len(spec.replicas))]


@dataclass(frozen=True)
class S3Transfer:
    """The AWS CLI's S3 transfer settings for fetch-weights. The CLI's defaults are 10
    concurrent requests of 8 MB parts (docs.aws.amazon.com/cli/latest/topic/s3-config.html);
    the planner's S3 rate (infra/facts/data/weight_sources.yaml) is the one measured with 64
    parallel ranged GETs, and AWS's S3 performance guide advises 8-16 MB ranges."""

    max_concurrent_requests: int = 64
    multipart_chunksize: str = "16MB"


S3_TRANSFER = S3Transfer()


def weight_units(spec: NodeSpec) -> list[str]:
    """The oneshot units that put the weights (or the token to download them) in place."""
    units = []
    if spec.weights_dir:
        units.append("vllm-fleet-fetch-weights.service")
    if spec.hf_token_secret_id:
        units.append("vllm-fleet-fetch-hf-token.service")
    return units


def node_units(spec: NodeSpec) -> list[str]:
    """Every unit vllm-fleet.target pulls in."""
    units = ["vllm-fleet-fetch-key.service", "vllm-fleet-gpu-devices.service", *weight_units(spec)]
    if spec.multi_node:
        units += ["vllm-fleet-gang.service", "ray-head.service", "ray-worker.service"]
    if spec.lifecycle_hooks.enabled:
        units.append("vllm-fleet-lifecycle.service")
    if spec.scaling_environment:
        units.append("vllm-fleet-scaling-signal.timer")
    return units + vllm_unit_names(spec)


def serving_units(spec: NodeSpec) -> list[str]:
    """What a drain stops. Stopping the target alone would not stop them: it only Wants=
    them, and only PartOf=/Requires= carry a stop over (systemd.unit(5))."""
    units = ["vllm-fleet.target", *vllm_unit_names(spec)]
    if spec.multi_node:
        units += ["ray-head.service", "ray-worker.service"]
    return units


def _exec_start(spec: NodeSpec, replica: ReplicaSpec) -> list[str]:
    argv = list(replica.serve_argv)
    # The image installs vLLM in its own venv; ExecStart needs the absolute path.
    return [f"{spec.venv}/bin/{argv[0]}", *argv[1:]]


def _ray_start(spec: NodeSpec, *, head: bool) -> list[str]:
    argv = [f"{spec.venv}/bin/ray", "start", "--block"]
    if head:
        argv += ["--head", f"--port={spec.ray_port}", "--include-dashboard=false"]
    return argv + [
        f"--num-gpus={spec.gpus_per_node}",
        f"--temp-dir={spec.ray_temp_dir}",
        "--disable-usage-stats",
    ]


def _vllm_unit(spec: NodeSpec, index: int, replica: ReplicaSpec, unit_name: str) -> str:
    wait_ray_gpus = [
        f"{spec.venv}/bin/python3",
        f"/{LIBEXEC}/wait-ray-gpus",
        f"--gpus={spec.total_gpus}",
        # Nodes too: a CPU gang (the boot test) has 0 GPUs, and GPUs alone would not wait.
        f"--nodes={spec.nodes}",
        f"--timeout={spec.gang_discovery.ray_wait_timeout_s}",
    ]
    return _render(
        "vllm.service.j2",
        spec=spec,
        replica=replica,
        index=index,
        unit_name=unit_name,
        exec_start=_exec_start(spec, replica),
        wait_ray_gpus_argv=wait_ray_gpus,
        stop_timeout_s=spec.shutdown_timeout_s + STOP_MARGIN_S,
        staged_sources=LOCAL_WEIGHT_SOURCES,
    )


def render_node(spec: NodeSpec) -> dict[str, str]:
    """Files for the node's root file system, keyed by path relative to ``/``."""
    files: dict[str, str] = {}
    for index, (replica, unit_name) in enumerate(zip(spec.replicas, vllm_unit_names(spec), strict=True)):
        files[f"{UNIT_DIR}/{unit_name}"] = _vllm_unit(spec, index, replica, unit_name)
    files[f"{UNIT_DIR}/vllm-fleet-fetch-key.service"] = _render(
        "vllm-fleet-fetch-key.service.j2", spec=spec, fetch=FETCH_RETRY
    )
    if spec.weights_dir:
        files[f"{UNIT_DIR}/vllm-fleet-fetch-weights.service"] = _render(
            "vllm-fleet-fetch-weights.service.j2", spec=spec, s3_transfer=S3_TRANSFER
        )
    if spec.hf_token_secret_id:
        files[f"{UNIT_DIR}/vllm-fleet-fetch-hf-token.service"] = _render("vllm-fleet-fetch-hf-token.service.j2", spec=spec)
    files[f"{UNIT_DIR}/vllm-fleet-gpu-devices.service"] = _render(
        "vllm-fleet-gpu-devices.service.j2", spec=spec
    )
    files[f"{UNIT_DIR}/vllm-fleet.target"] = _render(
        "vllm-fleet.target.j2", spec=spec, units=node_units(spec)
    )
    files[f"{LIBEXEC}/fetch-api-key"] = _render(
        "fetch-api-key.sh.j2",
        spec=spec,
        fetch=FETCH_RETRY,
        run_dir_default=RUN_DIR,
        libexec_dir=f"/{LIBEXEC}",
    )
    files[f"{LIBEXEC}/api-keys-to-vllm-config"] = _render(
        "api-keys-to-vllm-config.py.j2", min_key_length=MIN_KEY_LENGTH
    )
    if spec.multi_node:
        files[f"{UNIT_DIR}/vllm-fleet-gang.service"] = _render("vllm-fleet-gang.service.j2", spec=spec)
        files[f"{UNIT_DIR}/ray-head.service"] = _render(
            "ray-head.service.j2", spec=spec, ray_head_argv=_ray_start(spec, head=True)
        )
        files[f"{UNIT_DIR}/ray-worker.service"] = _render(
            "ray-worker.service.j2", spec=spec, ray_worker_argv=_ray_start(spec, head=False)
        )
        files[f"{LIBEXEC}/gang-discover"] = _render("gang-discover.sh.j2", spec=spec)
        files[f"{LIBEXEC}/wait-ray-gpus"] = _render("wait-ray-gpus.py.j2", venv=spec.venv)
    if spec.lifecycle_hooks.enabled:
        files[f"{UNIT_DIR}/vllm-fleet-lifecycle.service"] = _render(
            "vllm-fleet-lifecycle.service.j2", spec=spec
        )
        files[f"{LIBEXEC}/lifecycle-watch"] = _render(
            "lifecycle-watch.sh.j2",
            spec=spec,
            hooks=spec.lifecycle_hooks,
            ports=[r.port for r in spec.replicas],
            stop_units=serving_units(spec),
            # The worker waits this long for its head to drain and stop.
            head_stop_timeout_s=spec.deregistration_delay_s + spec.shutdown_timeout_s + STOP_MARGIN_S,
            asg_name_tag=ASG_NAME_TAG,
            target_group_tag=TARGET_GROUP_TAG,
        )
    if spec.scaling_environment:
        files[f"{UNIT_DIR}/vllm-fleet-scaling-signal.service"] = _render(
            "vllm-fleet-scaling-signal.service.j2", spec=spec, env=spec.scaling_environment
        )
        files[f"{UNIT_DIR}/vllm-fleet-scaling-signal.timer"] = _render("vllm-fleet-scaling-signal.timer.j2", spec=spec)
    files["etc/sysusers.d/vllm-fleet.conf"] = _render("sysusers.conf.j2", spec=spec)
    files["etc/tmpfiles.d/vllm-fleet.conf"] = _render("tmpfiles.conf.j2", spec=spec)
    return dict(sorted(files.items()))


def file_mode(path: str) -> str:
    """Octal mode for a rendered file: the helpers are executable, the rest is 0644."""
    return "0755" if path.startswith(LIBEXEC + "/") else "0644"


def render_user_data(spec: NodeSpec) -> str:
    """``#cloud-config`` that writes the node's files and starts ``vllm-fleet.target``."""
    files = [
        {"path": path, "mode": file_mode(path), "content": content}
        for path, content in render_node(spec).items()
    ]
    for f in files:
        content = str(f["content"])
        # A YAML literal block infers its indentation from the first line, and keeps the
        # content exact only when it ends with one newline.
        if not content.endswith("\n") or content.endswith("\n\n") or content[:1].isspace():
            raise FleetError(f"rendered {f['path']}: must start with text and end with one newline")
    return _render("user-data.yaml.j2", spec=spec, files=files)
