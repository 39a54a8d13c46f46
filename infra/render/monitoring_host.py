"""The self-hosted monitoring host and the managed-mode node agent, as files: pure rendering,
no Pulumi (infra/components/monitoring.py declares the resources around them).

Self-hosted: one small Amazon Linux 2023 instance runs Prometheus, Alertmanager and Grafana.
Its cloud-init user-data (``render_host_user_data``) carries only what never changes with the
fleet's monitoring content: systemd units, the install script, the config-sync script and the
Grafana repository. The content itself (``render_monitoring``'s files) goes to S3 as one object
per file plus a ``manifest.sha256`` (``config_objects``). A timer on the host polls the manifest;
when it changes, the host downloads the listed files, checks every checksum, runs promtool and
amtool on them, installs them and reloads the services. So an alert threshold or a dashboard
changes in place: user-data runs once per instance, and delivering content through it would
mean replacing the instance (and losing the Prometheus TSDB on it) for every edit.

Managed: ``render_node_agent`` gives the files for a Prometheus agent on each GPU node that
scrapes the node's own exporters and remote-writes to AMP with SigV4.

Facts (versions, checksums, the AMI parameter, the Grafana key) live in
``templates/monitoring-host/facts.yaml`` with their sources.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import yaml
from pydantic import Field

from infra.errors import FleetError
from infra.facts.fact import Fact, Strict
from infra.render.monitoring import RULES_FILE, MonitoringSpec
from infra.render.templating import TEMPLATES_DIR, template_environment

TEMPLATE_DIR = TEMPLATES_DIR / "monitoring-host"
FACTS_FILE = TEMPLATE_DIR / "facts.yaml"

# Where things live on the host.
LIBEXEC = "usr/local/libexec/vllm-fleet-monitoring"
UNIT_DIR = "etc/systemd/system"
RUN_DIR = "/run/vllm-fleet-monitoring"
STATE_DIR = "/var/lib/vllm-fleet-monitoring"
GRAFANA_PASSWORD_FILE = f"{RUN_DIR}/grafana-admin-password"
GRAFANA_KEY_FILE = "/etc/pki/rpm-gpg/RPM-GPG-KEY-grafana-pinned"
# The instance tag that tells the host where its configuration is (s3://bucket/prefix/); read
# through instance metadata, so the user-data itself names no bucket and stays the same.
CONFIG_URI_TAG = "vllm-fleet:monitoring-config"
MANIFEST_NAME = "manifest.sha256"
FILES_PREFIX = "files/"
# Each rendered monitoring file → where it goes on the host. A rendered path must match one
# entry exactly or sit directly inside a directory entry; anything else is refused.
FILE_DESTINATIONS = {
    "prometheus.yml": "/etc/prometheus/prometheus.yml",
    "alertmanager.yml": "/etc/alertmanager/alertmanager.yml",
    "grafana/datasource.yml": "/etc/grafana/provisioning/datasources/vllm-fleet.yml",
    "grafana/dashboards.yml": "/etc/grafana/provisioning/dashboards/vllm-fleet.yml",
}
RULES_DIR = RULES_FILE.rsplit("/", 1)[0]
DASHBOARDS_DIR = "grafana/dashboards"
# Grafana re-reads these only at start; dashboards JSON it re-reads by itself.
GRAFANA_RESTART_ON = ("grafana/datasource.yml", "grafana/dashboards.yml")
SYNC_INTERVAL_S = 120
# Managed mode: the node agent's files, relative to the node's root.
AGENT_CONFIG = "etc/vllm-fleet/prometheus-agent.yml"
AGENT_LABELS_SCRIPT = "usr/local/libexec/vllm-fleet/prometheus-agent-labels"
AGENT_UNIT = "etc/systemd/system/vllm-fleet-prometheus-agent.service"
# Grafana's admin password: letters and digits only, so no quoting question ever arises.
GRAFANA_PASSWORD_LENGTH = 32

# ---------------------------------------------------------------------------------------------
# Facts


class InstanceFacts(Strict):
    name: str
    architecture: str
    vcpus: int
    memory_gib: int


class RootVolume(Strict):
    size_gib: int = Field(ge=8)
    tsdb_retention_size_gb: int = Field(gt=0)
    tsdb_retention_days: int = Field(gt=0)


class Release(Strict):
    version: str
    url: str = Field(pattern=r"^https://github\.com/prometheus/[a-z]+/releases/download/")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    binaries: list[str]

    @property
    def archive_dir(self) -> str:
        """The directory the tarball unpacks to (``prometheus-2.53.4.linux-arm64``)."""
        return self.url.rsplit("/", 1)[1].removesuffix(".tar.gz")


class GrafanaRepo(Strict):
    baseurl: str = Field(pattern=r"^https://")
    key_url: str = Field(pattern=r"^https://")
    key_fingerprint: str = Field(pattern=r"^[0-9A-F]{40}$")
    package: str


class GrafanaPassword(Strict):
    env: str
    expansion: str


class Ports(Strict):
    grafana: int
    prometheus: int
    alertmanager: int


class HostFacts(Strict):
    instance_type: Fact[InstanceFacts]
    ami_ssm_parameter: Fact[str]
    root_volume: Fact[RootVolume]
    prometheus: Fact[Release]
    alertmanager: Fact[Release]
    grafana_repo: Fact[GrafanaRepo]
    grafana_admin_password: Fact[GrafanaPassword]
    ports: Fact[Ports]
    amp_alert_receivers: Fact[list[str]]
    amp_remote_write_path: Fact[str]


@cache
def host_facts() -> HostFacts:
    with FACTS_FILE.open(encoding="utf-8") as fh:
        return HostFacts.model_validate(yaml.safe_load(fh))


# ---------------------------------------------------------------------------------------------
# Rendering helpers


@cache
def _environment() -> jinja2.Environment:
    return template_environment(TEMPLATE_DIR)


def _render(template: str, **context: object) -> str:
    return _environment().get_template(template).render(**context)


def _check_file_text(path: str, content: str) -> None:
    # A YAML literal block infers its indentation from the first line and keeps the content
    # exact only when it ends with one newline.
    if not content.endswith("\n") or content.endswith("\n\n") or content[:1].isspace():
        raise FleetError(f"rendered {path}: must start with text and end with one newline")


# ---------------------------------------------------------------------------------------------
# The self-hosted monitoring host


@dataclass(frozen=True)
class HostSpec:
    """What the host's fixed files need: nothing here changes when the monitoring content does."""

    stack: str
    region: str
    grafana_admin_secret_id: str
    dashboards_dir: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9/_+=.@-]{1,512}", self.grafana_admin_secret_id):
            raise FleetError(
                f"monitoring: Grafana secret id {self.grafana_admin_secret_id!r} is not a Secrets Manager name"
            )
        if not re.fullmatch(r"/(?:[A-Za-z0-9._-]+/)*[A-Za-z0-9._-]+", self.dashboards_dir):
            raise FleetError(
                f"monitoring.grafana_dashboards_dir: {self.dashboards_dir!r} is not an absolute path"
            )


def grafana_admin_secret_name(stack: str) -> str:
    """Deterministic, so the host's user-data can name the secret without a Pulumi Output."""
    return f"vllm-fleet/{stack}/grafana-admin-password"


def host_spec(spec: MonitoringSpec) -> HostSpec:
    return HostSpec(
        stack=spec.stack_name,
        region=spec.region,
        grafana_admin_secret_id=grafana_admin_secret_name(spec.stack_name),
        dashboards_dir=spec.grafana_dashboards_dir,
    )


def check_host_layout(spec: MonitoringSpec) -> None:
    """The rendered content must talk to the host's services where they listen."""
    ports = host_facts().ports.value
    expected = {
        "alertmanager_address": f"127.0.0.1:{ports.alertmanager}",
        "prometheus_url": f"http://127.0.0.1:{ports.prometheus}",
    }
    for key, value in expected.items():
        if getattr(spec, key) != value:
            raise FleetError(
                f"monitoring.{key}: {getattr(spec, key)!r} is not where the monitoring host runs it ({value!r})"
            )


def host_destination(rel: str, dashboards_dir: str) -> str:
    """Where a rendered monitoring file goes on the host; FleetError for a path with no place."""
    if rel in FILE_DESTINATIONS:
        return FILE_DESTINATIONS[rel]
    directories = {RULES_DIR: "/etc/prometheus/rules", DASHBOARDS_DIR: dashboards_dir}
    parent, _, name = rel.rpartition("/")
    if parent in directories and re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return f"{directories[parent]}/{name}"
    raise FleetError(f"monitoring file {rel!r}: the monitoring host has no place for it")


def render_host(spec: HostSpec) -> dict[str, str]:
    """Every file cloud-init writes on the monitoring host, by path relative to ``/``."""
    facts = host_facts()
    context: dict[str, Any] = {
        "spec": spec,
        "facts": facts,
        "prometheus": facts.prometheus.value,
        "alertmanager": facts.alertmanager.value,
        "grafana": facts.grafana_repo.value,
        "ports": facts.ports.value,
        "volume": facts.root_volume.value,
        "run_dir": RUN_DIR,
        "state_dir": STATE_DIR,
        "libexec": "/" + LIBEXEC,
        "password_file": GRAFANA_PASSWORD_FILE,
        "password_env": facts.grafana_admin_password.value.env,
        "password_expansion": facts.grafana_admin_password.value.expansion % "%d/admin-password",
        "password_min_length": GRAFANA_PASSWORD_LENGTH,
        "grafana_key_file": GRAFANA_KEY_FILE,
        "config_uri_tag": CONFIG_URI_TAG,
        "manifest_name": MANIFEST_NAME,
        "files_prefix": FILES_PREFIX,
        "file_destinations": FILE_DESTINATIONS,
        "directory_destinations": {RULES_DIR: "/etc/prometheus/rules", DASHBOARDS_DIR: spec.dashboards_dir},
        "grafana_restart_on": GRAFANA_RESTART_ON,
        "sync_interval_s": SYNC_INTERVAL_S,
    }
    files = {
        f"{LIBEXEC}/install": _render("install.sh.j2", **context),
        f"{LIBEXEC}/sync-config": _render("sync-config.sh.j2", **context),
        f"{LIBEXEC}/fetch-grafana-password": _render("fetch-grafana-password.sh.j2", **context),
        f"{LIBEXEC}/pin-gpg-key": _render("pin-gpg-key.sh.j2", **context),
        f"{UNIT_DIR}/prometheus.service": _render("prometheus.service.j2", **context),
        f"{UNIT_DIR}/alertmanager.service": _render("alertmanager.service.j2", **context),
        f"{UNIT_DIR}/vllm-fleet-grafana-password.service": _render("grafana-password.service.j2", **context),
        f"{UNIT_DIR}/grafana-server.service.d/vllm-fleet.conf": _render("grafana-server.conf.j2", **context),
        f"{UNIT_DIR}/vllm-fleet-monitoring-sync.service": _render("sync.service.j2", **context),
        f"{UNIT_DIR}/vllm-fleet-monitoring-sync.timer": _render("sync.timer.j2", **context),
        "etc/sysusers.d/vllm-fleet-monitoring.conf": _render("sysusers.conf.j2", **context),
        "etc/yum.repos.d/grafana.repo": _render("grafana.repo.j2", **context),
    }
    return dict(sorted(files.items()))


def host_file_mode(path: str) -> str:
    return "0755" if path.startswith(LIBEXEC + "/") else "0644"


def render_host_user_data(spec: HostSpec) -> str:
    """``#cloud-config`` that writes the host's files and runs the install script once."""
    files = [{"path": p, "mode": host_file_mode(p), "content": c} for p, c in render_host(spec).items()]
    for f in files:
        _check_file_text(str(f["path"]), str(f["content"]))
    return _render("user-data.yaml.j2", spec=spec, files=files, install="/" + LIBEXEC + "/install")


def config_objects(files: Mapping[str, str]) -> dict[str, str]:
    """S3 object key (relative to the stack's prefix) → content: each monitoring file under
    ``files/``, and ``manifest.sha256`` listing them in ``sha256sum`` format, sorted."""
    lines = []
    objects = {}
    for rel in sorted(files):
        content = files[rel]
        if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", rel) or ".." in rel.split("/"):
            raise FleetError(f"monitoring file {rel!r}: not a plain relative path")
        digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
        lines.append(f"{digest}  {rel}\n")
        objects[f"{FILES_PREFIX}{rel}"] = content
    objects[MANIFEST_NAME] = "".join(lines)
    return objects


# ---------------------------------------------------------------------------------------------
# Managed mode: AMP definitions and the node agent


def amp_alertmanager_definition(alertmanager_yaml: str) -> str:
    """The rendered alertmanager.yml as AMP takes it: under ``alertmanager_config``, with only
    SNS receivers (AMP sends nowhere else). Webhooks are dropped; no SNS topic is an error."""
    config = yaml.safe_load(alertmanager_yaml)
    allowed = set(host_facts().amp_alert_receivers.value)
    for receiver in config.get("receivers", []):
        for key in [k for k in receiver if k.endswith("_configs") and k not in allowed]:
            del receiver[key]
        if not any(receiver.get(k) for k in allowed):
            raise FleetError(
                "vllm-fleet:monitoring.snsTopicArn: required with mode managed; Amazon Managed Prometheus "
                f"sends alerts only to SNS (receiver {receiver.get('name')!r} has none)"
            )
        for sns in receiver.get("sns_configs", []):
            if not (sns.get("sigv4") or {}).get("region"):
                raise FleetError(
                    f"receiver {receiver.get('name')!r}: AMP needs sigv4.region on every SNS config"
                )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=1000)
    return _render("amp-alertmanager.yaml.j2", body=body.rstrip("\n"))


def remote_write_url(prometheus_endpoint: str) -> str:
    """AMP's remote-write URL from the workspace's ``prometheus_endpoint`` (ends with '/')."""
    base = prometheus_endpoint if prometheus_endpoint.endswith("/") else prometheus_endpoint + "/"
    return base + host_facts().amp_remote_write_path.value


def check_node_agent(spec: MonitoringSpec, *, nodes_per_replica: int = 1) -> None:
    """What the node agent cannot do yet; run before any managed-mode resource exists."""
    if spec.serving_tag is not None or nodes_per_replica > 1:
        raise FleetError(
            "vllm-fleet:monitoring.mode managed: multi-node replicas are not supported yet (only a gang's "
            "head serves vLLM metrics, and the agent cannot tell head from worker when it is rendered)"
        )


def render_node_agent(
    spec: MonitoringSpec, remote_write: str, *, nodes_per_replica: int = 1
) -> dict[str, str]:
    """A GPU node's Prometheus agent for managed mode, by path relative to the node's ``/``:
    its config, the unit, and the boot script that puts the node's identity into its labels.

    The agent scrapes the node's own exporters on 127.0.0.1 and sends every sample to AMP
    with the labels EC2 service discovery would have set (instance_id, instance_type,
    availability_zone), so the rules and dashboards work unchanged on AMP.
    """
    check_node_agent(spec, nodes_per_replica=nodes_per_replica)
    if not re.fullmatch(
        r"https://aps-workspaces\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/workspaces/[A-Za-z0-9-]+/api/v1/remote_write",
        remote_write,
    ):
        raise FleetError(f"remote write URL {remote_write!r} is not an AMP workspace's remote_write endpoint")
    jobs = [
        {"name": "vllm", "port": spec.vllm_port},
        {"name": "node", "port": spec.node_exporter_port},
        {"name": "dcgm", "port": spec.dcgm_port},
    ]
    context = {
        "spec": spec,
        "jobs": jobs,
        "remote_write_url": remote_write,
        "scrape_timeout_s": min(10, spec.scrape_interval_s),
        "prometheus": host_facts().prometheus.value,
        "config_path": "/" + AGENT_CONFIG,
        "labels_script": "/" + AGENT_LABELS_SCRIPT,
    }
    files = {
        AGENT_CONFIG: _render("agent.yml.j2", **context),
        AGENT_LABELS_SCRIPT: _render("agent-labels.sh.j2", **context),
        AGENT_UNIT: _render("agent.service.j2", **context),
    }
    for path, content in files.items():
        _check_file_text(path, content)
    return files


def files_on_disk(files: Mapping[str, str], root: Path, *, executable: Sequence[str] = ()) -> list[Path]:
    """Write rendered files under ``root`` (tests and the plan's artifacts use it)."""
    written = []
    for rel, content in sorted(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        if rel in executable or rel.startswith(LIBEXEC + "/") or rel == AGENT_LABELS_SCRIPT:
            path.chmod(0o755)
        written.append(path)
    return written
