"""Monitoring content every fleet gets: Prometheus scrape config and rules, Alertmanager
routing, Grafana provisioning and dashboards.

Pure rendering, no Pulumi: ``render_monitoring(spec)`` returns ``{relative path: file text}``
and the Pulumi layer ships the files to the monitoring host as they are. The layout is the one
Prometheus reads: ``prometheus.yml`` names ``rules/vllm-fleet.rules.yml`` relative to itself.

Metric names come from ``infra/facts/data/vllm_metrics.yaml`` (cited per exporter). The tests hold every
rule and dashboard expression to that list, run promtool and amtool on the output, and a contract
test runs the rendered config in a real Prometheus against a real vLLM server.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
import yaml

from infra.errors import FleetError
from infra.facts.catalog import REGION_CODE, REGION_PATTERN
from infra.facts.vllm_metrics import default_metric_catalog
from infra.render.templating import TEMPLATES_DIR, template_environment

TEMPLATE_DIR = TEMPLATES_DIR / "monitoring"
DASHBOARD_SPEC_DIR = TEMPLATE_DIR / "dashboards"

RULES_FILE = "rules/vllm-fleet.rules.yml"
PROMETHEUS_DATASOURCE_UID = "vllm-fleet-prometheus"
CLOUDWATCH_DATASOURCE_UID = "vllm-fleet-cloudwatch"
ASG_VARIABLE = "asg"
# Dashboards rendered for every fleet, by spec file stem under templates/monitoring/dashboards/.
DASHBOARDS = ("vllm-serving", "gpu", "fleet", "cost")

# Scrape jobs, their exporters in vllm_metrics.yaml, and the MonitoringSpec field with the port.
SCRAPE_JOBS = (("vllm", "vllm_port"), ("node", "node_exporter_port"), ("dcgm", "dcgm_port"))


# ---------------------------------------------------------------------------------------------
# The spec


_REGION = re.compile(REGION_PATTERN)
_SNS_ARN = re.compile(rf"^arn:aws[a-z-]*:sns:(?P<region>{REGION_CODE}):\d{{12}}:[A-Za-z0-9_-]{{1,256}}$")
_WEBHOOK = re.compile(r"^https?://[^\s/]+(/\S*)?$")
# Stack names go into label values, file names and the SNS subject (at most 100 characters).
_STACK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
_ASG_NAME = re.compile(r"^[\x20-\x7e]{1,255}$")


@dataclass(frozen=True)
class MonitoringSpec:
    """What the monitoring content needs to know about one fleet (one Pulumi stack).

    ``stack_tag_key``/``stack_tag_value`` select the fleet's GPU nodes in EC2 service discovery:
    put the tag on the nodes only (the ASG's tag with propagate_at_launch), not on the monitoring
    host, or Prometheus would scrape itself as a vLLM node. ``serving_tag`` narrows the vllm job
    to the nodes that run the API server when a replica spans several nodes (workers serve no
    /metrics); None means every node serves.
    """

    stack_name: str
    region: str
    stack_tag_key: str
    stack_tag_value: str
    time_to_ready_s: float
    instance_type: str
    instance_hourly_usd: float
    model_name: str
    autoscaling_group_name: str
    sns_topic_arn: str | None = None
    webhook_url: str | None = None
    ttft_p95_slo_s: float = 2.5
    kv_cache_saturation: float = 0.95
    queue_threshold: int = 16
    error_ratio: float = 0.01
    preemptions_per_s: float = 0.0
    vllm_port: int = 8000
    node_exporter_port: int = 9100
    dcgm_port: int = 9400
    serving_tag: tuple[str, str] | None = None
    # Discovery also requires this tag, so other instances of the stack that carry the stack
    # tag (the monitoring host itself) are never scraped as GPU nodes.
    node_role_tag: tuple[str, str] = ("vllm-fleet:role", "node")
    scrape_interval_s: int = 15
    alertmanager_address: str = "127.0.0.1:9093"
    prometheus_url: str = "http://127.0.0.1:9090"
    grafana_dashboards_dir: str = "/var/lib/grafana/dashboards/vllm-fleet"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def sns_region(self) -> str | None:
        if self.sns_topic_arn is None:
            return None
        match = _SNS_ARN.match(self.sns_topic_arn)
        assert match is not None  # validated in __post_init__
        return match.group("region")

    @property
    def stuck_starting_after_s(self) -> int:
        """Whole seconds a node may keep vLLM down at boot before VllmStuckStarting fires."""
        return math.ceil(self.time_to_ready_s)


def _fail(key: str, value: object, allowed: str) -> FleetError:
    return FleetError(f"monitoring.{key}: {value!r} is not allowed; {allowed}")


def _validate(spec: MonitoringSpec) -> None:
    if not _STACK.match(spec.stack_name):
        raise _fail("stack_name", spec.stack_name, "use 1-40 letters, digits, '.', '_' or '-'")
    if not _REGION.match(spec.region):
        raise _fail("region", spec.region, "use an AWS region name such as us-east-1")
    for key, value, limit in (
        ("stack_tag_key", spec.stack_tag_key, 128),
        ("stack_tag_value", spec.stack_tag_value, 256),
    ):
        if not value or len(value) > limit or value.startswith("aws:"):
            raise _fail(key, value, f"use 1-{limit} characters not starting with 'aws:' (EC2 tag rules)")
    if spec.serving_tag is not None and (not spec.serving_tag[0] or not spec.serving_tag[1]):
        raise _fail("serving_tag", spec.serving_tag, "use (tag key, tag value), both non-empty, or None")
    if not (math.isfinite(spec.time_to_ready_s) and spec.time_to_ready_s > 0):
        raise _fail(
            "time_to_ready_s", spec.time_to_ready_s, "use the plan's seconds from launch to ready, > 0"
        )
    if not (math.isfinite(spec.instance_hourly_usd) and spec.instance_hourly_usd > 0):
        raise _fail(
            "instance_hourly_usd", spec.instance_hourly_usd, "use the instance's USD price per hour, > 0"
        )
    if not spec.model_name or not spec.instance_type:
        raise _fail(
            "model_name/instance_type", (spec.model_name, spec.instance_type), "both must be non-empty"
        )
    if not _ASG_NAME.match(spec.autoscaling_group_name):
        raise _fail(
            "autoscaling_group_name", spec.autoscaling_group_name, "use the ASG's name, 1-255 characters"
        )
    ttft_bounds = default_metric_catalog().bucket_bounds("vllm:time_to_first_token_seconds")
    if spec.ttft_p95_slo_s not in ttft_bounds:
        raise _fail(
            "ttft_p95_slo_s",
            spec.ttft_p95_slo_s,
            "use a bucket bound of vllm:time_to_first_token_seconds (vLLM 0.32.0): "
            + ", ".join(f"{bound:g}" for bound in ttft_bounds),
        )
    if not 0 < spec.kv_cache_saturation <= 1:
        raise _fail("kv_cache_saturation", spec.kv_cache_saturation, "use a fraction in (0, 1]")
    if spec.queue_threshold < 0:
        raise _fail("queue_threshold", spec.queue_threshold, "use waiting requests per node, >= 0")
    if not 0 < spec.error_ratio < 1:
        raise _fail("error_ratio", spec.error_ratio, "use a fraction in (0, 1)")
    if not (math.isfinite(spec.preemptions_per_s) and spec.preemptions_per_s >= 0):
        raise _fail("preemptions_per_s", spec.preemptions_per_s, "use preemptions per second per node, >= 0")
    ports = {key: getattr(spec, key) for _, key in SCRAPE_JOBS}
    for key, port in ports.items():
        if not 1 <= port <= 65535:
            raise _fail(key, port, "use a TCP port 1-65535")
    if len(set(ports.values())) != len(ports):
        raise _fail("ports", ports, "vllm, node_exporter and dcgm ports must differ")
    if not 1 <= spec.scrape_interval_s <= 300:
        raise _fail("scrape_interval_s", spec.scrape_interval_s, "use 1-300 seconds")
    if spec.sns_topic_arn is None and spec.webhook_url is None:
        raise _fail("receivers", None, "give sns_topic_arn, webhook_url or both, or alerts go nowhere")
    if spec.sns_topic_arn is not None and not _SNS_ARN.match(spec.sns_topic_arn):
        raise _fail(
            "sns_topic_arn",
            spec.sns_topic_arn,
            "use a standard SNS topic ARN arn:aws:sns:REGION:ACCOUNT:NAME",
        )
    if spec.webhook_url is not None and not _WEBHOOK.match(spec.webhook_url):
        raise _fail("webhook_url", spec.webhook_url, "use an http:// or https:// URL")


# ---------------------------------------------------------------------------------------------
# Rendering


def _number(value: float) -> str:
    """PromQL/YAML number literal: ints stay ints, floats use Python's shortest repr."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a number here")
    return repr(value) if isinstance(value, float) else str(int(value))


@cache
def _environment() -> jinja2.Environment:
    return template_environment(TEMPLATE_DIR, {"number": _number})


def _template_context(spec: MonitoringSpec) -> dict[str, Any]:
    jobs = []
    for job_name, port_field in SCRAPE_JOBS:
        jobs.append(
            {
                "name": job_name,
                "port": getattr(spec, port_field),
                "serving_tag": spec.serving_tag if job_name == "vllm" else None,
            }
        )
    return {
        "spec": spec,
        "jobs": jobs,
        "rules_file": RULES_FILE,
        # Prometheus rejects a scrape timeout longer than the interval.
        "scrape_timeout_s": min(10, spec.scrape_interval_s),
        "prometheus_datasource_uid": PROMETHEUS_DATASOURCE_UID,
        "cloudwatch_datasource_uid": CLOUDWATCH_DATASOURCE_UID,
    }


def render_monitoring(spec: MonitoringSpec) -> dict[str, str]:
    """Every monitoring file for one fleet, keyed by path relative to the config directory."""
    env = _environment()
    context = _template_context(spec)
    files = {
        "prometheus.yml": env.get_template("prometheus.yml.j2").render(context),
        RULES_FILE: env.get_template("vllm-fleet.rules.yml.j2").render(context),
        "alertmanager.yml": env.get_template("alertmanager.yml.j2").render(context),
        "grafana/datasource.yml": env.get_template("grafana-datasource.yml.j2").render(context),
        "grafana/dashboards.yml": env.get_template("grafana-dashboards.yml.j2").render(context),
    }
    for name in DASHBOARDS:
        dashboard = render_dashboard(load_dashboard_spec(name), spec)
        files[f"grafana/dashboards/{name}.json"] = json.dumps(dashboard, indent=2, sort_keys=True) + "\n"
    return files


# ---------------------------------------------------------------------------------------------
# Dashboards
#
# Each dashboard is a short YAML spec (rows of panels, each with PromQL targets or CloudWatch
# Auto Scaling metrics) expanded here into Grafana's dashboard JSON. Grafana JSON is mostly layout
# boilerplate, and its legends use Grafana's own {{label}} syntax, so a jinja2 template of the JSON
# would be long and full of escapes; the spec keeps what a reviewer needs to read (titles, units,
# queries) and the expansion is a pure function, snapshot-tested like the templates.

PANEL_HEIGHT = 8
GRID_WIDTH = 24


def load_dashboard_spec(name: str) -> dict[str, Any]:
    with (DASHBOARD_SPEC_DIR / f"{name}.yaml").open(encoding="utf-8") as fh:
        loaded: dict[str, Any] = yaml.safe_load(fh)
    return loaded


def _prometheus_target(ref_id: str, target: dict[str, Any]) -> dict[str, Any]:
    return {
        "refId": ref_id,
        "datasource": {"type": "prometheus", "uid": PROMETHEUS_DATASOURCE_UID},
        "expr": target["expr"],
        "legendFormat": target.get("legend", "__auto"),
        "range": True,
    }


def _cloudwatch_asg_target(ref_id: str, target: dict[str, Any], spec: MonitoringSpec) -> dict[str, Any]:
    # Field names from Grafana's CloudWatchMetricsQuery (public/app/plugins/datasource/cloudwatch/
    # dataquery.gen.ts): metricQueryType 0 = Search/MetricStat, metricEditorMode 0 = Builder.
    return {
        "refId": ref_id,
        "datasource": {"type": "cloudwatch", "uid": CLOUDWATCH_DATASOURCE_UID},
        "queryMode": "Metrics",
        "metricQueryType": 0,
        "metricEditorMode": 0,
        "namespace": "AWS/AutoScaling",
        "metricName": target["metric"],
        # Every group of the stack: AWS suffixes each name, so the exact names come from the
        # dashboard variable (the group names CloudWatch knows, filtered by the stack's prefix).
        "dimensions": {"AutoScalingGroupName": f"${ASG_VARIABLE}"},
        "matchExact": True,
        "statistic": target["statistic"],
        "period": "60",
        "region": "default",
        "id": "",
        "expression": "",
        "label": target["label"],
    }


def _panel(
    panel_id: int, panel: dict[str, Any], grid: dict[str, int], spec: MonitoringSpec
) -> dict[str, Any]:
    ref_ids = (chr(ord("A") + i) for i in range(26))
    if "cloudwatch_asg" in panel:
        targets = [_cloudwatch_asg_target(next(ref_ids), t, spec) for t in panel["cloudwatch_asg"]]
        datasource = {"type": "cloudwatch", "uid": CLOUDWATCH_DATASOURCE_UID}
    else:
        targets = [_prometheus_target(next(ref_ids), t) for t in panel["targets"]]
        datasource = {"type": "prometheus", "uid": PROMETHEUS_DATASOURCE_UID}
    kind = panel.get("type", "timeseries")
    defaults: dict[str, Any] = {"unit": panel.get("unit", "short")}
    if "min" in panel:
        defaults["min"] = panel["min"]
    if "max" in panel:
        defaults["max"] = panel["max"]
    if "thresholds" in panel:
        steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
        steps += [{"color": color, "value": value} for value, color in panel["thresholds"]]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    options: dict[str, Any]
    if kind == "stat":
        options = {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        }
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": kind,
        "title": panel["title"],
        "description": panel.get("description", ""),
        "datasource": datasource,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def asg_variable(spec: MonitoringSpec) -> dict[str, Any]:
    """A multi-value dashboard variable: the AutoScalingGroupName values CloudWatch has for
    AWS/AutoScaling, kept when they start with the stack's group prefix (Grafana's CloudWatch
    VariableQuery, queryType dimensionValues; ``regex`` is a JavaScript regex literal)."""
    return {
        "name": ASG_VARIABLE,
        "label": "Auto Scaling groups",
        "type": "query",
        "datasource": {"type": "cloudwatch", "uid": CLOUDWATCH_DATASOURCE_UID},
        "query": {
            "refId": ASG_VARIABLE,
            "queryType": "dimensionValues",
            "region": "default",
            "namespace": "AWS/AutoScaling",
            "metricName": "GroupInServiceInstances",
            "dimensionKey": "AutoScalingGroupName",
            "dimensionFilters": {},
        },
        "regex": f"/^{re.escape(spec.autoscaling_group_name)}/",
        "multi": True,
        "includeAll": True,
        "refresh": 2,  # on time-range change: a replaced gang brings a new name
        "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def render_dashboard(dashboard: dict[str, Any], spec: MonitoringSpec) -> dict[str, Any]:
    """Grafana dashboard JSON (schemaVersion 39) from a dashboard spec: one row panel per row,
    the row's panels side by side in equal widths."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in dashboard["rows"]:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row["title"],
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        width = GRID_WIDTH // len(row["panels"])
        for column, panel in enumerate(row["panels"]):
            grid = {"h": PANEL_HEIGHT, "w": width, "x": column * width, "y": y}
            panels.append(_panel(next_id, panel, grid, spec))
            next_id += 1
        y += PANEL_HEIGHT
    return {
        "uid": dashboard["uid"],
        "title": f"{dashboard['title']} ({spec.stack_name})",
        "description": dashboard.get("description", ""),
        "tags": ["vllm-fleet", spec.stack_name],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "annotations": {"list": []},
        "templating": {
            "list": [asg_variable(spec)] if any("cloudwatch_asg" in p for r in dashboard["rows"] for p in r["panels"]) else []
        },
        "links": [],
        "panels": panels,
    }


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of a rendered dashboard."""
    return [
        (panel["title"], target)
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
