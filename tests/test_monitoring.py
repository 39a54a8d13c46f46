"""Monitoring content, checked with the real tools: promtool (config, rules, rule unit tests),
amtool (Alertmanager config), plus snapshots and a metric-name audit of every expression."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from syrupy.assertion import SnapshotAssertion

from infra.errors import FleetError
from infra.facts.vllm_metrics import default_metric_catalog
from infra.render.monitoring import (
    CLOUDWATCH_DATASOURCE_UID,
    DASHBOARDS,
    PROMETHEUS_DATASOURCE_UID,
    RULES_FILE,
    MonitoringSpec,
    dashboard_queries,
    render_monitoring,
)
from tests.support.promql import alert_rules, metric_names_in, recording_rule_names, rule_groups
from tests.support.snapshots import text_file

# A representative fleet: 70B on p5.48xlarge, both receivers, defaults elsewhere.
SPEC = MonitoringSpec(
    stack_name="prod-llama",
    region="us-east-1",
    stack_tag_key="vllm-fleet:stack",
    stack_tag_value="prod-llama",
    time_to_ready_s=612.4,
    instance_type="p5.48xlarge",
    instance_hourly_usd=55.04,
    model_name="llama-3.1-70b",
    autoscaling_group_name="vllm-fleet-prod-llama",
    sns_topic_arn="arn:aws:sns:us-east-1:123456789012:vllm-fleet-alerts",
    webhook_url="https://hooks.example.com/vllm-fleet",
)
FILES = render_monitoring(SPEC)
RULES = FILES[RULES_FILE]
ALERTS = alert_rules(RULES)


def write_files(files: dict[str, str], directory: Path) -> Path:
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return directory


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], check=False, capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_files(FILES, tmp_path_factory.mktemp("monitoring"))


# --------------------------------------------------------------------------------------------
# Real tools on the rendered files


def test_promtool_accepts_rendered_config_and_the_rules_it_names(rendered: Path) -> None:
    result = run("promtool", "check", "config", rendered / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # check config also checks each rule file the config names, so the path must resolve.
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"Checking {rendered / RULES_FILE}" in result.stdout


def test_promtool_accepts_rules(rendered: Path) -> None:
    result = run("promtool", "check", "rules", rendered / RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    rule_count = sum(len(group["rules"]) for group in rule_groups(RULES))
    assert f"SUCCESS: {rule_count} rules found" in result.stdout


@pytest.mark.parametrize(
    "receivers",
    [
        {"webhook_url": None},
        {"sns_topic_arn": None},
        {},
    ],
    ids=["sns-only", "webhook-only", "both"],
)
def test_amtool_accepts_alertmanager_config(tmp_path: Path, receivers: dict[str, Any]) -> None:
    spec = dataclasses.replace(SPEC, **receivers)
    path = tmp_path / "alertmanager.yml"
    path.write_text(render_monitoring(spec)["alertmanager.yml"], encoding="utf-8")
    result = run("amtool", "check-config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    (receiver,) = config["receivers"]
    assert ("sns_configs" in receiver) == (spec.sns_topic_arn is not None)
    assert ("webhook_configs" in receiver) == (spec.webhook_url is not None)


def test_multi_node_variant_scrapes_vllm_on_serving_nodes_only(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, serving_tag=("vllm-fleet:role", "head"))
    directory = write_files(render_monitoring(spec), tmp_path)
    result = run("promtool", "check", "config", directory / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load((directory / "prometheus.yml").read_text())["scrape_configs"]
    }
    role_filter = {"name": "tag:vllm-fleet:role", "values": ["head"]}
    assert role_filter in jobs["vllm"]["ec2_sd_configs"][0]["filters"]
    assert role_filter not in jobs["node"]["ec2_sd_configs"][0]["filters"]
    assert role_filter not in jobs["dcgm"]["ec2_sd_configs"][0]["filters"]


def test_scrape_jobs_discover_the_stack_by_tag_and_scrape_private_ips() -> None:
    config = yaml.safe_load(FILES["prometheus.yml"])
    assert config["rule_files"] == [RULES_FILE]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        SPEC.alertmanager_address
    ]
    assert config["global"]["external_labels"] == {"stack": SPEC.stack_name, "region": SPEC.region}
    ports = {"vllm": SPEC.vllm_port, "node": SPEC.node_exporter_port, "dcgm": SPEC.dcgm_port}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(ports)
    for job in config["scrape_configs"]:
        port = ports[job["job_name"]]
        (sd,) = job["ec2_sd_configs"]
        assert sd["region"] == SPEC.region
        assert {"name": f"tag:{SPEC.stack_tag_key}", "values": [SPEC.stack_tag_value]} in sd["filters"]
        assert {"name": "instance-state-name", "values": ["running"]} in sd["filters"]
        address_rule = job["relabel_configs"][0]
        assert address_rule["source_labels"] == ["__meta_ec2_private_ip"]
        assert address_rule["target_label"] == "__address__"
        assert address_rule["replacement"] == f"${{1}}:{port}"
        assert {
            "source_labels": ["__meta_ec2_instance_id"],
            "regex": "(.+)",
            "target_label": "instance_id",
        } in job["relabel_configs"]
    assert "public_ip" not in FILES["prometheus.yml"]


# --------------------------------------------------------------------------------------------
# Rule unit tests: every alert fires on one synthetic input and stays quiet on another


def series(name: str, **labels: str) -> str:
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def target(job: str, instance_id: str = "i-0a1") -> dict[str, str]:
    """The labels Prometheus gives a target of `job` after our relabelling."""
    port = {"vllm": SPEC.vllm_port, "node": SPEC.node_exporter_port, "dcgm": SPEC.dcgm_port}[job]
    return {"job": job, "instance": f"10.0.1.7:{port}", "instance_id": instance_id}


VLLM = {**target("vllm"), "model_name": SPEC.model_name, "engine": "0"}
GPU3 = {**target("dcgm"), "gpu": "3", "UUID": "GPU-3", "modelName": "NVIDIA H100 80GB HBM3"}
STUCK_AFTER_MIN = math.ceil(SPEC.stuck_starting_after_s / 60)


@dataclass
class AlertCase:
    alert: str
    fires: bool
    why: str
    input_series: dict[str, str]
    eval_time: str
    # Each firing alert: its labels (without alertname and severity) and its rendered summary.
    expected: list[tuple[dict[str, str], str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.alert}-{'fires' if self.fires else 'quiet'}-{self.why.replace(' ', '_')}"


def ttft_buckets(per_minute: dict[str, int]) -> dict[str, str]:
    """Synthetic TTFT histogram: each bucket's counter grows by per_minute[le] a minute."""
    return {
        series("vllm:time_to_first_token_seconds_bucket", **VLLM, le=le): f"0+{step}x30"
        for le, step in per_minute.items()
    }


ALERT_CASES = [
    AlertCase(
        "VllmKvCacheSaturated", True, "above threshold for 15m",
        {series("vllm:kv_cache_usage_perc", **VLLM): "0.97x20"}, "15m",
        [(VLLM, "KV cache 97% full on i-0a1")],
    ),
    AlertCase(
        "VllmKvCacheSaturated", False, "below threshold",
        {series("vllm:kv_cache_usage_perc", **VLLM): "0.93x20"}, "15m",
    ),
    AlertCase(
        "VllmKvCacheSaturated", False, "above threshold for only 5m",
        {series("vllm:kv_cache_usage_perc", **VLLM): "0.5x10 0.97x10"}, "15m",
    ),
    AlertCase(
        "VllmQueueGrowing", True, "long and growing",
        {series("vllm:num_requests_waiting", **VLLM): "10+1x30"}, "15m",
        [(VLLM, "25 requests waiting and rising on i-0a1")],
    ),
    AlertCase(
        "VllmQueueGrowing", False, "long but steady",
        {series("vllm:num_requests_waiting", **VLLM): "40x30"}, "15m",
    ),
    AlertCase(
        "VllmQueueGrowing", False, "growing but short",
        {series("vllm:num_requests_waiting", **VLLM): "0+1x30"}, "15m",
    ),
    AlertCase(
        "VllmTtftP95OverSlo", True, "80 percent within slo",
        ttft_buckets({"2.5": 8, "5.0": 10, "+Inf": 10}), "20m",
        [({"model_name": SPEC.model_name}, "TTFT p95 4.375s over the SLO for llama-3.1-70b")],
    ),
    AlertCase(
        "VllmTtftP95OverSlo", False, "exactly 95 percent within slo",
        ttft_buckets({"2.5": 19, "5.0": 20, "+Inf": 20}), "20m",
    ),
    AlertCase(
        "VllmRequestErrorRatioHigh", True, "2 percent engine errors",
        {
            series("vllm:request_success_total", **VLLM, finished_reason="error"): "0+2x30",
            series("vllm:request_success_total", **VLLM, finished_reason="stop"): "0+98x30",
        },
        "15m",
        [({"model_name": SPEC.model_name}, "2% of llama-3.1-70b requests end in an engine error")],
    ),
    AlertCase(
        "VllmRequestErrorRatioHigh", False, "client aborts are not errors",
        {
            series("vllm:request_success_total", **VLLM, finished_reason="error"): "0+1x30",
            series("vllm:request_success_total", **VLLM, finished_reason="abort"): "0+50x30",
            series("vllm:request_success_total", **VLLM, finished_reason="stop"): "0+149x30",
        },
        "15m",
    ),
    AlertCase(
        "VllmHttp5xxRatioHigh", True, "5 percent 5xx",
        {
            series("http_requests_total", **target("vllm"), handler="/v1/chat/completions", method="POST", status="2xx"): "0+95x30",
            series("http_requests_total", **target("vllm"), handler="/v1/chat/completions", method="POST", status="5xx"): "0+5x30",
        },
        "15m",
        [({}, "5% of OpenAI API responses are 5xx")],
    ),
    AlertCase(
        "VllmHttp5xxRatioHigh", False, "no 5xx series at all",
        {
            series("http_requests_total", **target("vllm"), handler="/v1/chat/completions", method="POST", status="2xx"): "0+95x30",
        },
        "15m",
    ),
    AlertCase(
        "NodeDown", True, "down for 10m",
        {series("up", **target("node")): "0x20"}, "10m",
        [(target("node"), "node_exporter on i-0a1 unreachable")],
    ),
    AlertCase(
        "NodeDown", False, "down for 3m then back",
        {series("up", **target("node")): "1x5 0x3 1x20"}, "10m",
    ),
    AlertCase(
        "GpuXidError", True, "xid 79 reported",
        {series("DCGM_FI_DEV_XID_ERRORS", **GPU3, err_code="79", err_msg="GPU has fallen off the bus"): "0x5 79x10"},
        "10m",
        [({**GPU3, "err_code": "79", "err_msg": "GPU has fallen off the bus"}, "GPU 3 on i-0a1 reported XID 79")],
    ),
    AlertCase(
        "GpuXidError", False, "no xid",
        {series("DCGM_FI_DEV_XID_ERRORS", **GPU3, err_code="0", err_msg="No Error"): "0x15"}, "10m",
    ),
    AlertCase(
        "GpuUncorrectableMemoryError", True, "new uncorrectable remapped row",
        {series("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", **GPU3): "0x10 1x10"}, "12m",
        [(GPU3, "uncorrectable memory error on GPU 3 of i-0a1")],
    ),
    AlertCase(
        "GpuUncorrectableMemoryError", True, "new double-bit ecc error",
        {series("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", **GPU3): "0x10 2x10"}, "12m",
        [(GPU3, "uncorrectable memory error on GPU 3 of i-0a1")],
    ),
    AlertCase(
        "GpuUncorrectableMemoryError", True, "row remap failed",
        {series("DCGM_FI_DEV_ROW_REMAP_FAILURE", **GPU3): "0x5 1x10"}, "10m",
        [(GPU3, "uncorrectable memory error on GPU 3 of i-0a1")],
    ),
    AlertCase(
        "GpuUncorrectableMemoryError", False, "old remapped rows no new ones",
        {
            series("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", **GPU3): "2x30",
            series("DCGM_FI_DEV_ROW_REMAP_FAILURE", **GPU3): "0x30",
        },
        "20m",
    ),
    AlertCase(
        "GpuExporterDown", True, "exporter down node up",
        {series("up", **target("dcgm")): "0x20", series("up", **target("node")): "1x20"}, "12m",
        [(target("dcgm"), "dcgm-exporter down on i-0a1")],
    ),
    AlertCase(
        "GpuExporterDown", False, "whole node down",
        {series("up", **target("dcgm")): "0x20", series("up", **target("node")): "0x20"}, "12m",
    ),
    AlertCase(
        "VllmStuckStarting", True, "down past time to ready",
        {series("up", **target("vllm")): "0x30", series("up", **target("node")): "1x30"}, f"{STUCK_AFTER_MIN}m",
        [(target("vllm"), f"vLLM on i-0a1 not serving {SPEC.stuck_starting_after_s}s after its node came up")],
    ),
    AlertCase(
        "VllmStuckStarting", False, "still within time to ready",
        {series("up", **target("vllm")): "0x30", series("up", **target("node")): "1x30"}, f"{STUCK_AFTER_MIN - 1}m",
    ),
    AlertCase(
        "VllmStuckStarting", False, "node down too",
        {series("up", **target("vllm")): "0x30", series("up", **target("node")): "0x30"}, "20m",
    ),
    AlertCase(
        "VllmStuckStarting", False, "another instance's node is up",
        {series("up", **target("vllm", "i-0a1")): "0x30", series("up", **target("node", "i-0b2")): "1x30"}, "20m",
    ),
    AlertCase(
        "VllmPreemptionsSustained", True, "0.1 per second",
        {series("vllm:num_preemptions_total", **VLLM): "0+6x30"}, "20m",
        [(VLLM, "0.10 preemptions/s on i-0a1")],
    ),
    AlertCase(
        "VllmPreemptionsSustained", False, "none",
        {series("vllm:num_preemptions_total", **VLLM): "5x30"}, "20m",
    ),
    AlertCase(
        "VllmNoServingInstance", True, "every vllm target down",
        {series("up", **target("vllm", "i-0a1")): "0x30", series("up", **target("vllm", "i-0b2")): "0x30"}, "20m",
        [({}, "no vLLM node of the fleet is serving")],
    ),
    AlertCase(
        "VllmNoServingInstance", True, "no vllm target discovered",
        {series("up", **target("node")): "1x30"}, "20m",
        [({}, "no vLLM node of the fleet is serving")],
    ),
    AlertCase(
        "VllmNoServingInstance", False, "one of two serving",
        {series("up", **target("vllm", "i-0a1")): "0x30", series("up", **target("vllm", "i-0b2")): "1x30"}, "20m",
    ),
]  # fmt: skip


def promtool_test_file(rules_path: Path, tests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump(
        {"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": tests}, sort_keys=False
    )


def alert_test(case: AlertCase) -> dict[str, Any]:
    rule = ALERTS[case.alert]
    expected = []
    for labels, summary in case.expected:
        expected.append(
            {
                "exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                "exp_annotations": {
                    "summary": summary,
                    "description": rule["annotations"]["description"],
                    "runbook": rule["annotations"]["runbook"],
                },
            }
        )
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in case.input_series.items()],
        "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": expected}],
    }


@pytest.mark.parametrize("case", ALERT_CASES, ids=lambda case: case.id)
def test_alert_rule_under_promtool(case: AlertCase, rendered: Path, tmp_path: Path) -> None:
    assert case.fires == bool(case.expected)
    test_file = tmp_path / "test.yml"
    test_file.write_text(promtool_test_file(rendered / RULES_FILE, [alert_test(case)]), encoding="utf-8")
    result = run("promtool", "test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """A new alert without both kinds of promtool case fails here."""
    firing = {case.alert for case in ALERT_CASES if case.fires}
    quiet = {case.alert for case in ALERT_CASES if not case.fires}
    assert set(ALERTS) == firing == quiet


def test_promtool_notices_a_wrong_expectation(rendered: Path, tmp_path: Path) -> None:
    """The harness can fail: the same input with a wrong expected summary is rejected."""
    case = ALERT_CASES[0]
    wrong = dataclasses.replace(case, expected=[(VLLM, "KV cache 98% full on i-0a1")])
    test_file = tmp_path / "test.yml"
    test_file.write_text(promtool_test_file(rendered / RULES_FILE, [alert_test(wrong)]), encoding="utf-8")
    result = run("promtool", "test", "rules", test_file)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def close_to(expr: str, value: float, tolerance: float = 1e-9) -> str:
    # promtool compares sample values exactly; rate() extrapolation leaves float noise, so the
    # expression itself checks closeness and the test expects 1 with the series' labels.
    return f"abs({expr} - {value!r}) < bool {tolerance!r}"


def test_cost_and_ratio_recordings_under_promtool(rendered: Path, tmp_path: Path) -> None:
    instances = 2
    tokens_per_min_per_node = 1800
    tokens_per_s = instances * tokens_per_min_per_node / 60
    cost_per_hour = SPEC.instance_hourly_usd * instances
    cost_per_million = cost_per_hour / (3600 * tokens_per_s) * 1e6
    price_labels = {"instance_type": SPEC.instance_type, "model_name": SPEC.model_name}
    input_series = {}
    for instance_id in ("i-0a1", "i-0b2"):
        input_series[series("up", **target("node", instance_id))] = "1x30"
        input_series[series("vllm:generation_tokens_total", **target("vllm", instance_id))] = (
            f"0+{tokens_per_min_per_node}x30"
        )
        input_series[
            series(
                "http_requests_total",
                **target("vllm", instance_id),
                handler="/v1/completions",
                method="POST",
                status="2xx",
            )
        ] = "0+10x30"
    # Only the third node stopped serving and its dcgm/vllm exporters are silent: it still costs.
    input_series[series("up", **target("node", "i-0c3"))] = "0x30"
    cost_per_hour_with_silent_node = SPEC.instance_hourly_usd * 3

    def sample(expr: str, value: float, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "expr": close_to(expr, value),
            "eval_time": "20m",
            "exp_samples": [{"labels": series("", **(labels or {})) if labels else "{}", "value": 1}],
        }

    test = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in input_series.items()],
        "promql_expr_test": [
            sample("vllm_fleet:instance_hourly_usd", SPEC.instance_hourly_usd, price_labels),
            sample("vllm_fleet:instances_running:count", 3),
            sample("vllm_fleet:cost_usd_per_hour", cost_per_hour_with_silent_node, price_labels),
            sample("vllm_fleet:generation_tokens_per_s:rate5m", tokens_per_s),
            sample(
                "vllm_fleet:cost_usd_per_million_output_tokens",
                cost_per_million * 3 / instances,
                price_labels,
            ),
            # No 5xx series yet: the ratio is 0, not missing.
            sample("vllm_fleet:http_5xx_ratio:rate5m", 0.0),
        ],
    }
    test_file = tmp_path / "test.yml"
    test_file.write_text(promtool_test_file(rendered / RULES_FILE, [test]), encoding="utf-8")
    result = run("promtool", "test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cost_per_million_is_absent_while_nothing_is_generated(rendered: Path, tmp_path: Path) -> None:
    test = {
        "interval": "1m",
        "input_series": [
            {"series": series("up", **target("node")), "values": "1x30"},
            {"series": series("vllm:generation_tokens_total", **target("vllm")), "values": "500x30"},
        ],
        "promql_expr_test": [
            {"expr": "vllm_fleet:cost_usd_per_million_output_tokens", "eval_time": "20m", "exp_samples": []},
            {"expr": close_to("vllm_fleet:cost_usd_per_hour", SPEC.instance_hourly_usd), "eval_time": "20m",
             "exp_samples": [{"labels": series("", instance_type=SPEC.instance_type, model_name=SPEC.model_name), "value": 1}]},
        ],
    }  # fmt: skip
    test_file = tmp_path / "test.yml"
    test_file.write_text(promtool_test_file(rendered / RULES_FILE, [test]), encoding="utf-8")
    result = run("promtool", "test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_carry_summary_runbook_and_severity() -> None:
    for name, rule in ALERTS.items():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, name
        assert all(annotations.values()), name
        # description and runbook are plain text (the promtool cases rely on it).
        assert "{{" not in annotations["description"] + annotations["runbook"], name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name


def test_stuck_starting_waits_for_the_plans_time_to_ready() -> None:
    assert ALERTS["VllmStuckStarting"]["for"] == f"{math.ceil(SPEC.time_to_ready_s)}s"
    assert 'up{job="node"} == 1' in ALERTS["VllmStuckStarting"]["expr"]
    slower = render_monitoring(dataclasses.replace(SPEC, time_to_ready_s=1800))
    assert alert_rules(slower[RULES_FILE])["VllmStuckStarting"]["for"] == "1800s"


# --------------------------------------------------------------------------------------------
# Metric names


def rule_expressions(rules_yaml: str) -> list[tuple[str, str]]:
    return [
        (rule.get("record") or rule["alert"], rule["expr"])
        for group in rule_groups(rules_yaml)
        for rule in group["rules"]
    ]


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads(FILES[f"grafana/dashboards/{name}.json"]) for name in DASHBOARDS}


def all_promql_expressions() -> list[tuple[str, str]]:
    expressions = rule_expressions(RULES)
    for name, dashboard in dashboards().items():
        for title, query in dashboard_queries(dashboard):
            if "expr" in query:
                expressions.append((f"{name}: {title}", query["expr"]))
    return expressions


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket{job="vllm",le=~"1(\\\\.0)?"}[5m]))'
        " / on() group_left() (3600 * vllm_fleet:x:rate5m offset 1h > 1e6) or vector(0)"
        ' and ignoring(instance) up{job="node"} == bool 1 unless absent(foo_total[$__rate_interval])'
    )
    assert metric_names_in(expr) == {
        "vllm:time_to_first_token_seconds_bucket",
        "vllm_fleet:x:rate5m",
        "up",
        "foo_total",
    }
    assert metric_names_in("vector(55.04)") == set()


def test_every_expression_names_only_known_metrics() -> None:
    known = default_metric_catalog().promql_series_names() | recording_rule_names(RULES)
    # The seed document's names are not in the catalog, so they could not slip through.
    assert not {"vllm:gpu_cache_usage_perc", "vllm:avg_generation_throughput_toks_per_s"} & known
    unknown = {}
    for where, expr in all_promql_expressions():
        names = metric_names_in(expr)
        assert names or expr.startswith("vector("), f"{where}: no metric found in {expr!r}"
        if names - known:
            unknown[where] = sorted(names - known)
    assert unknown == {}


def test_cloudwatch_panels_name_known_metrics() -> None:
    known = default_metric_catalog().cloudwatch_metrics("AWS/AutoScaling")
    found = set()
    for dashboard in dashboards().values():
        for _, query in dashboard_queries(dashboard):
            if query["datasource"]["type"] == "cloudwatch":
                assert query["namespace"] == "AWS/AutoScaling"
                # AWS suffixes each group's name: the dashboard's variable lists the stack's groups.
                assert query["dimensions"] == {"AutoScalingGroupName": "$asg"}
                (variable,) = dashboard["templating"]["list"]
                assert variable["regex"] == f"/^{re.escape(SPEC.autoscaling_group_name)}/"
                found.add(query["metricName"])
    assert {"GroupDesiredCapacity", "GroupInServiceInstances"} <= found <= known


def test_bucket_bounds_match_the_installed_vllm() -> None:
    """The catalog's bounds are vLLM 0.32.0's own constants (buckets.py loaded by path, so no
    `import vllm` and its torch import)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    buckets_py = Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "buckets.py"
    module_spec = importlib.util.spec_from_file_location("vllm_buckets_under_test", buckets_py)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    families = default_metric_catalog().histogram_buckets.families
    assert families["time_to_first_token"].bounds == list(module.TIME_TO_FIRST_TOKEN_BUCKETS)
    assert families["inter_token_latency"].bounds == list(module.INTER_TOKEN_LATENCY_BUCKETS)
    assert families["request_latency"].bounds == list(module.REQUEST_LATENCY_BUCKETS)
    assert families["iteration_tokens"].bounds == list(module.ITERATION_TOKENS_BUCKETS)


# --------------------------------------------------------------------------------------------
# Dashboards

REQUIRED_PANELS = {
    "vllm-serving": {
        "Finished requests/s by finished_reason": ["vllm:request_success_total"],
        "HTTP responses/s by status (OpenAI API paths)": ["http_requests_total"],
        "Running requests by node": ["vllm:num_requests_running"],
        "Waiting requests by node": ["vllm:num_requests_waiting"],
        "Time to first token p50 / p95 / p99": ["vllm:time_to_first_token_seconds_bucket"],
        "Inter-token latency p50 / p95 / p99": ["vllm:inter_token_latency_seconds_bucket"],
        "End-to-end request latency p50 / p95 / p99": ["vllm:e2e_request_latency_seconds_bucket"],
        "Prompt and generation tokens/s": ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"],
        "KV-cache usage by node": ["vllm:kv_cache_usage_perc"],
        "Prefix-cache hit rate": ["vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"],
        "Preemptions/s by node": ["vllm:num_preemptions_total"],
    },
    "gpu": {
        "GPU utilization": ["DCGM_FI_DEV_GPU_UTIL"],
        "GPU memory used": ["DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"],
        "GPU temperature": ["DCGM_FI_DEV_GPU_TEMP"],
        "GPU power draw": ["DCGM_FI_DEV_POWER_USAGE"],
        "Last XID by GPU": ["DCGM_FI_DEV_XID_ERRORS"],
    },
    "fleet": {
        "Serving vLLM nodes": ["up"],
        "ASG desired vs in service (CloudWatch)": [],
    },
    "cost": {
        "Fleet cost per hour": ["vllm_fleet:cost_usd_per_hour"],
        "Cost per 1M output tokens": ["vllm_fleet:cost_usd_per_million_output_tokens"],
    },
}


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_json_has_the_required_panels(name: str) -> None:
    dashboard = json.loads(FILES[f"grafana/dashboards/{name}.json"])
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    by_title = {panel["title"]: panel for panel in panels}
    for title, metrics in REQUIRED_PANELS[name].items():
        assert title in by_title, f"{name} lacks panel {title!r}"
        named = set().union(*(metric_names_in(t["expr"]) for t in by_title[title]["targets"] if "expr" in t))
        assert set(metrics) <= named, f"{name}/{title}: {named}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"].startswith("vllm-fleet-") and len(dashboard["uid"]) <= 40
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0
        assert panel["targets"], panel["title"]
        for query in panel["targets"]:
            assert query["datasource"] == panel["datasource"]


def test_latency_panels_show_p50_p95_p99() -> None:
    serving = {p["title"]: p for p in dashboards()["vllm-serving"]["panels"]}
    for title in (
        "Time to first token p50 / p95 / p99",
        "Inter-token latency p50 / p95 / p99",
        "End-to-end request latency p50 / p95 / p99",
    ):
        quantiles = [t["expr"].split(",")[0] for t in serving[title]["targets"]]
        assert quantiles == ["histogram_quantile(0.50", "histogram_quantile(0.95", "histogram_quantile(0.99"]


def test_dashboards_use_the_provisioned_datasources() -> None:
    datasources = yaml.safe_load(FILES["grafana/datasource.yml"])["datasources"]
    provisioned = {(ds["type"], ds["uid"]) for ds in datasources}
    assert provisioned == {
        ("prometheus", PROMETHEUS_DATASOURCE_UID),
        ("cloudwatch", CLOUDWATCH_DATASOURCE_UID),
    }
    cloudwatch = next(ds for ds in datasources if ds["type"] == "cloudwatch")
    assert cloudwatch["jsonData"] == {"authType": "default", "defaultRegion": SPEC.region}
    used = {
        (query["datasource"]["type"], query["datasource"]["uid"])
        for dashboard in dashboards().values()
        for _, query in dashboard_queries(dashboard)
    }
    assert used == provisioned
    provider = yaml.safe_load(FILES["grafana/dashboards.yml"])["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == SPEC.grafana_dashboards_dir


# --------------------------------------------------------------------------------------------
# Snapshots


def test_rendered_files_match_snapshots(snapshot: SnapshotAssertion) -> None:
    """tests/__snapshots__/test_monitoring/, one file each; regenerate deliberately with
    --snapshot-update (which also deletes the snapshot of a file no longer rendered)."""
    for relative, text in sorted(FILES.items()):
        assert text == text_file(snapshot, relative)


def test_rendering_is_deterministic() -> None:
    assert render_monitoring(SPEC) == FILES


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ttft_p95_slo_s": 0.3}, "monitoring.ttft_p95_slo_s: 0.3 is not allowed; use a bucket bound"),
        ({"ttft_p95_slo_s": 3.0}, "0.001, 0.005, 0.01"),
        ({"region": "us-east"}, "monitoring.region"),
        ({"sns_topic_arn": None, "webhook_url": None}, "monitoring.receivers"),
        ({"sns_topic_arn": "arn:aws:sqs:us-east-1:123456789012:q"}, "monitoring.sns_topic_arn"),
        ({"webhook_url": "ftp://example.com"}, "monitoring.webhook_url"),
        ({"kv_cache_saturation": 1.5}, "monitoring.kv_cache_saturation"),
        ({"error_ratio": 0.0}, "monitoring.error_ratio"),
        ({"dcgm_port": 8000}, "monitoring.ports"),
        ({"time_to_ready_s": 0.0}, "monitoring.time_to_ready_s"),
        ({"time_to_ready_s": math.nan}, "monitoring.time_to_ready_s"),
        ({"instance_hourly_usd": -1.0}, "monitoring.instance_hourly_usd"),
        ({"stack_tag_key": "aws:autoscaling:groupName"}, "monitoring.stack_tag_key"),
        ({"stack_name": "prod llama"}, "monitoring.stack_name"),
        ({"serving_tag": ("vllm-fleet:role", "")}, "monitoring.serving_tag"),
        ({"scrape_interval_s": 0}, "monitoring.scrape_interval_s"),
    ],
)
def test_bad_spec_values_are_one_line_fleet_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FleetError) as error:
        dataclasses.replace(SPEC, **change)
    text = str(error.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("slo", [0.5, 1.0, 2.5, 5.0, 10.0])
def test_slo_on_a_bucket_bound_is_accepted(slo: float) -> None:
    rules = alert_rules(render_monitoring(dataclasses.replace(SPEC, ttft_p95_slo_s=slo))[RULES_FILE])
    assert (
        rules["VllmTtftP95OverSlo"]["expr"] == f"vllm_fleet:time_to_first_token_seconds:p95_rate5m > {slo!r}"
    )
