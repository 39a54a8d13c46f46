"""Contract: the rendered Prometheus config and rules, run by a real Prometheus (Debian's
2.42 binary) against the real vLLM test server and a real node_exporter.

The one substitution: EC2 service discovery cannot run here (no EC2), so each job's
``ec2_sd_configs`` becomes a ``static_configs`` entry carrying the same ``__meta_ec2_*`` labels
EC2 SD would attach to a node at 127.0.0.1. Everything else is as rendered, including the
relabel rules, which must turn those meta labels into the scrape address and instance_id,
and the rule file. The spec is rendered with the test's ports and a 1 s scrape/evaluation
interval so the test needs seconds, not minutes.

There is no GPU here, so no dcgm-exporter: DCGM expressions are checked to parse and evaluate,
and the dcgm target is left pointing at a closed port (its `up` is 0).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from infra.facts.vllm_metrics import default_metric_catalog
from infra.render.monitoring import (
    DASHBOARDS,
    RULES_FILE,
    MonitoringSpec,
    dashboard_queries,
    render_monitoring,
)
from tests.support.ports import free_port
from tests.support.promql import metric_names_in, rule_groups
from tests.support.vllm_server import VllmServer

INSTANCE_ID = "i-0contract"
# Stands in for Grafana's $__rate_interval: the queries run at a fixed moment just after the
# traffic, and two minutes' window covers all of it.
RATE_INTERVAL = "2m"
READY_TIMEOUT_S = 60.0


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_for(url: str, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_get(url, timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("node-exporter") / "node_exporter.log"
    process = start(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{port}"], log)
    try:
        wait_for(f"http://127.0.0.1:{port}/metrics", "node_exporter", process, log)
        yield port
    finally:
        stop(process)


def contract_spec(vllm_server: VllmServer, node_port: int, dcgm_port: int) -> MonitoringSpec:
    return MonitoringSpec(
        stack_name="contract",
        region="us-east-1",
        stack_tag_key="vllm-fleet:stack",
        stack_tag_value="contract",
        time_to_ready_s=600,
        instance_type="g6e.xlarge",
        instance_hourly_usd=1.861,
        model_name=vllm_server.served_model_name,
        autoscaling_group_name="vllm-fleet-contract",
        webhook_url="http://127.0.0.1:9/unused",
        vllm_port=vllm_server.port,
        node_exporter_port=node_port,
        dcgm_port=dcgm_port,
        scrape_interval_s=1,
    )


def with_static_targets(prometheus_yml: str, spec: MonitoringSpec) -> str:
    """ec2_sd_configs → static_configs carrying the meta labels EC2 SD would give a node."""
    config = yaml.safe_load(prometheus_yml)
    ports = {"vllm": spec.vllm_port, "node": spec.node_exporter_port, "dcgm": spec.dcgm_port}
    for job in config["scrape_configs"]:
        (sd,) = job.pop("ec2_sd_configs")
        job["static_configs"] = [
            {
                # The relabel rules must rebuild this from __meta_ec2_private_ip and the port.
                "targets": ["ec2-sd-address-placeholder:1"],
                "labels": {
                    "__meta_ec2_private_ip": "127.0.0.1",
                    "__meta_ec2_instance_id": INSTANCE_ID,
                    "__meta_ec2_instance_type": spec.instance_type,
                    "__meta_ec2_availability_zone": f"{spec.region}a",
                },
            }
        ]
        assert sd["port"] == ports[job["job_name"]]
    return yaml.safe_dump(config, sort_keys=False)


class PrometheusApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", (path, params, payload)
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def monitoring(
    vllm_server: VllmServer, node_exporter: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MonitoringSpec, dict[str, str], PrometheusApi]]:
    directory = tmp_path_factory.mktemp("prometheus")
    spec = contract_spec(vllm_server, node_exporter, dcgm_port=free_port())
    files = render_monitoring(spec)
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (directory / "prometheus.yml").write_text(with_static_targets(files["prometheus.yml"], spec))
    checked = subprocess.run(
        ["promtool", "check", "config", str(directory / "prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    log = directory / "prometheus.log"
    process = start(
        [
            "prometheus",
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/-/ready", "prometheus", process, log)
        yield spec, files, PrometheusApi(port)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def traffic(
    vllm_server: VllmServer, monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi]
) -> float:
    """Send real requests, wait until Prometheus has scraped and recorded them; return the
    moment the queries are evaluated at (just after the traffic, so rate windows hold it)."""
    _, _, prometheus = monitoring
    # Counters must have a sample from before the traffic, or rate() sees no increase: Prometheus
    # starts scraping a few seconds after it is ready, and the tiny model answers in well under that.
    deadline = time.monotonic() + 60
    while not prometheus.query('count_over_time(vllm:generation_tokens_total{job="vllm"}[1m]) >= 2'):
        assert time.monotonic() < deadline, "Prometheus scraped vLLM fewer than twice in 60 s"
        time.sleep(0.5)
    client = openai.OpenAI(base_url=vllm_server.openai_base_url, api_key=vllm_server.api_key, max_retries=0)
    model = vllm_server.served_model_name
    shared_prefix = "You are the fleet's test assistant. Answer briefly and plainly. " * 8
    sent = 0
    for i in range(6):
        client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": shared_prefix},
                {"role": "user", "content": f"Question {i}?"},
            ],
            max_tokens=16,
        )
        sent += 1
        time.sleep(0.5)  # spread over several scrapes, as real traffic is
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Stream please."}], max_tokens=16, stream=True
    )
    assert sum(1 for _ in stream) > 0
    sent += 1
    client.completions.create(model=model, prompt=shared_prefix, max_tokens=8)
    sent += 1
    # A client error: an unknown model is a 404 and must not count as a server error.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = prometheus.query('sum(vllm:request_success_total{job="vllm"})')
        recorded = prometheus.query("vllm_fleet:cost_usd_per_million_output_tokens")
        if finished and float(finished[0]["value"][1]) >= sent and recorded:
            time.sleep(2)  # one more scrape and evaluation after the last request
            return time.time()
        time.sleep(1)
    targets = [
        (t["labels"]["job"], t["health"], t["lastError"])
        for t in prometheus.get("/api/v1/targets")["activeTargets"]
    ]
    raise AssertionError(
        f"Prometheus did not see {sent} finished requests and the cost recording within 60 s: "
        f"finished={finished}, recorded={recorded}, targets={targets}, "
        f"tokens/s={prometheus.query('vllm_fleet:generation_tokens_per_s:rate5m')}"
    )


def exposed_sample_names(vllm_server: VllmServer) -> set[str]:
    status, body = http_get(f"{vllm_server.base_url}/metrics")
    assert status == 200
    names = set()
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def expressions(files: dict[str, str]) -> list[tuple[str, str, str]]:
    """(kind, where, PromQL) for every rule and every Prometheus dashboard target."""
    found = []
    for group in rule_groups(files[RULES_FILE]):
        for rule in group["rules"]:
            kind = "record" if "record" in rule else "alert"
            found.append((kind, rule.get("record") or rule["alert"], rule["expr"]))
    for name in DASHBOARDS:
        dashboard = json.loads(files[f"grafana/dashboards/{name}.json"])
        for title, query in dashboard_queries(dashboard):
            if "expr" in query:
                expr = query["expr"].replace("$__rate_interval", RATE_INTERVAL)
                found.append(("panel", f"{name}: {title}", expr))
    return found


def is_finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


def test_targets_are_relabelled_from_ec2_meta_labels(
    monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi], traffic: float
) -> None:
    spec, _, prometheus = monitoring
    targets = {t["labels"]["job"]: t for t in prometheus.get("/api/v1/targets")["activeTargets"]}
    assert set(targets) == {"vllm", "node", "dcgm"}
    ports = {"vllm": spec.vllm_port, "node": spec.node_exporter_port, "dcgm": spec.dcgm_port}
    for job, active in targets.items():
        assert active["labels"]["instance"] == f"127.0.0.1:{ports[job]}"
        assert active["labels"]["instance_id"] == INSTANCE_ID
        assert active["labels"]["instance_type"] == spec.instance_type
        assert active["labels"]["availability_zone"] == f"{spec.region}a"
    assert targets["vllm"]["health"] == "up", targets["vllm"]
    assert targets["node"]["health"] == "up", targets["node"]
    assert targets["dcgm"]["health"] == "down"  # no GPU, no dcgm-exporter here


def test_catalog_metrics_are_what_vllm_exposes(vllm_server: VllmServer, traffic: float) -> None:
    exposed = exposed_sample_names(vllm_server)
    catalog = default_metric_catalog()
    for exporter in ("vllm", "http"):
        for metric in catalog.exporters[exporter].metrics:
            missing = metric.series_names - exposed
            assert not missing, f"{exporter} metric {metric.name}: {sorted(missing)} not on /metrics"
    # The seed document's names really are absent.
    assert "vllm:gpu_cache_usage_perc" not in exposed
    assert not {name for name in exposed if "avg_generation_throughput" in name}


def test_every_expression_evaluates_and_names_exposed_metrics(
    vllm_server: VllmServer, monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi], traffic: float
) -> None:
    _, files, prometheus = monitoring
    exposed = exposed_sample_names(vllm_server)
    without_data: list[str] = []
    checked = with_data = 0
    for kind, where, expr in expressions(files):
        # Parses and evaluates (Prometheus answers 400 bad_data otherwise).
        result = prometheus.query(expr, at=traffic)
        checked += 1
        names = metric_names_in(expr)
        served_names = {n for n in names if n.startswith(("vllm:", "http_"))}
        assert served_names <= exposed, f"{where}: {sorted(served_names - exposed)} not exposed by vLLM"
        # Alert expressions are threshold filters, quiet on a healthy server (their evaluation
        # is checked by the rule health test). DCGM needs a GPU. Everything else, built from
        # vLLM, HTTP, node_exporter and `up` series or our recordings of them, returns data.
        if kind == "alert" or any(n.startswith("DCGM_") for n in names):
            continue
        with_data += 1
        if not any(is_finite(sample) for sample in result):
            without_data.append(f"{where}: {expr} -> {result}")
    assert checked == len(expressions(files))
    print(f"\n{checked} expressions evaluated, {with_data} of them required to return data")
    assert without_data == []


def test_every_rule_evaluates_cleanly(
    monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi], traffic: float
) -> None:
    _, files, prometheus = monitoring
    groups = prometheus.get("/api/v1/rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {
        rule.get("record") or rule["alert"]
        for group in rule_groups(files[RULES_FILE])
        for rule in group["rules"]
    }
    assert set(loaded) == expected
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert unhealthy == {}


def test_healthy_server_raises_no_vllm_alert(
    monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi], traffic: float
) -> None:
    _, _, prometheus = monitoring
    alerts = prometheus.get("/api/v1/alerts")["alerts"]
    # The only alert is the missing dcgm-exporter (no GPU here), pending for its 10 minutes:
    # node up, exporter down, joined on the relabelled instance_id. No vLLM alert fires on a
    # healthy server under traffic, the 404 included.
    assert [(a["labels"]["alertname"], a["state"], a["labels"]["instance_id"]) for a in alerts] == [
        ("GpuExporterDown", "pending", INSTANCE_ID)
    ]


def test_cost_recordings_from_real_traffic(
    monitoring: tuple[MonitoringSpec, dict[str, str], PrometheusApi], traffic: float
) -> None:
    spec, _, prometheus = monitoring
    # One node target, so the fleet costs one instance's price.
    (per_hour,) = prometheus.query("vllm_fleet:cost_usd_per_hour")
    assert per_hour["metric"]["instance_type"] == spec.instance_type
    assert per_hour["metric"]["model_name"] == spec.model_name
    assert float(per_hour["value"][1]) == pytest.approx(spec.instance_hourly_usd)
    # $ per 1M output tokens, recomputed from the same evaluation's recorded token rate.
    (combined,) = prometheus.query(
        "vllm_fleet:cost_usd_per_million_output_tokens"
        " / on() group_left() (vllm_fleet:cost_usd_per_hour / on() group_left()"
        " (3600 * vllm_fleet:generation_tokens_per_s:rate5m) * 1e6)"
    )
    assert float(combined["value"][1]) == pytest.approx(1.0)
    (tokens_per_s,) = prometheus.query("vllm_fleet:generation_tokens_per_s:rate5m")
    assert float(tokens_per_s["value"][1]) > 0
