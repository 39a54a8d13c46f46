"""Autoscaling: the policy derived from each stack's plan, the FleetScaling component under Pulumi
mocks (up and preview), and the node side checked with the real tools — systemd-analyze verify
of the rendered units, and the image's scaling-signal script against moto (PutMetricData,
SetInstanceProtection) and a fake instance metadata service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pulumi
import pulumi_aws as aws
import pytest
from syrupy.assertion import SnapshotAssertion

from infra.components.scaling import FleetScaling, FleetScalingArgs, warm_pool_args
from infra.config import ScalingSection, StackConfig, load_stack_file, stack_names
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.facts.scaling import scaling_facts
from infra.plan.build import build_stack_plan
from infra.plan.perf import predict
from infra.plan.scaling import (
    describe_scaling,
    instances_for,
    scaling_policy_spec,
    warm_pool_mode,
    warm_pool_settings,
)
from infra.plan.stack import StackPlan
from infra.render.node import UNIT_DIR, render_node
from tests.support.imds import FakeImds
from tests.support.pulumi_mocks import PulumiHarness, pulumi_mocks  # noqa: F401  (fixture)
from tests.support.snapshots import text_file

CATALOG = default_catalog()
STACKS = stack_names("fleet")  # image-build stacks have no model to plan
POLICY = "aws:autoscaling/policy:Policy"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
SCHEDULE = "aws:autoscaling/schedule:Schedule"


_PLANS: dict[tuple[str, int | None], StackPlan] = {}


def stack_plan(name: str, night_floor: int | None = None) -> StackPlan:
    """The stack's plan (vLLM's parser is tested elsewhere), optionally with a night floor."""
    key = (name, night_floor)
    if key not in _PLANS:
        config = load_stack_file(name)
        if night_floor is not None:
            config = config.model_copy(
                update={"scaling": config.scaling.model_copy(update={"night_floor": night_floor})}
            )
        _PLANS[key] = build_stack_plan(config, validate=False)
    return _PLANS[key]


def with_scaling(name: str, **scaling: object) -> StackConfig:
    config = load_stack_file(name)
    return config.model_copy(update={"scaling": ScalingSection(**scaling)})  # type: ignore[arg-type]


def group_names(sp: StackPlan) -> list[str]:
    spec = scaling_policy_spec(sp)
    if spec.shape == "gang-ladder":
        return [f"vllm-fleet.{spec.stack}.gang-{k}-0123" for k in range(spec.max_replicas)]
    return [f"vllm-fleet.{spec.stack}.fleet-0123"]


# --- the policy, pure ----------------------------------------------------------------------


def test_every_stack_has_a_policy_and_says_it_in_words() -> None:
    for name in STACKS:
        sp = stack_plan(name)
        spec = scaling_policy_spec(sp)
        layout = sp.plan.layout
        cap = sp.config.capacity
        assert spec.min_instances == instances_for(cap.min_replicas, layout)
        assert spec.max_instances == instances_for(cap.max_replicas, layout)
        assert spec.instance_warmup_s == sp.plan.startup_timeout_s >= spec.time_to_ready_s
        lines = describe_scaling(sp)
        print(f"\n[{name}]\n  " + "\n  ".join(lines))
        assert lines[0].startswith("fleet: ") and lines[-1].startswith("warm pool: ")
        if spec.shape != "fixed":
            assert any(line.startswith("down: ") for line in lines)


def test_default_target_keeps_a_quarter_of_the_batch_free() -> None:
    sp = stack_plan("prod-70b")
    spec = scaling_policy_spec(sp)
    # The batch each replica serves within the SLO (--max-num-seqs), times the replicas per node.
    batch = sp.plan.max_num_seqs * sp.plan.layout.replicas_per_node
    assert spec.target_is_default and spec.target == batch / 4
    assert spec.setpoint == batch - batch / 4
    assert [(s.lower, s.upper, s.percent) for s in spec.burst_steps] == [(batch / 4, batch, 50), (batch, None, 100)]
    assert spec.group_dimension == "AutoScalingGroupName"


def test_small_batches_still_wait_for_at_least_one_request() -> None:
    config = load_stack_file("dev-8b")
    # An inter-token SLO that only two requests at a time meet gives a batch of 2.
    plan = build_stack_plan(config, validate=False).plan
    lay = plan.layout
    two = predict(plan.request.arch, "bf16", CATALOG.instances[lay.instance_type].gpu, 1, 1,
                  plan.workload, plan.max_num_batched_tokens, 2)
    tight = config.model_copy(update={"workload": config.workload.model_copy(update={"itl_p95_ms": two.itl_ms})})
    sp = build_stack_plan(tight, validate=False)
    assert sp.plan.max_num_seqs == 2
    spec = scaling_policy_spec(sp)
    assert spec.target == 1.0 and spec.setpoint == 1.0
    batch = stack_plan("dev-8b").plan.max_num_seqs
    with pytest.raises(FleetError, match=rf"vllm-fleet:scaling.target = {batch}.0: .* below the batch of {batch}"):
        scaling_policy_spec(build_stack_plan(with_scaling("dev-8b", target=batch), validate=False))


def test_kv_cache_target_is_a_fraction() -> None:
    spec = scaling_policy_spec(build_stack_plan(with_scaling("dev-8b", metric="kv-cache-usage"), validate=False))
    assert spec.metric == "kv-cache-usage" and spec.setpoint == scaling_facts().policy.kv_cache_default_target
    assert spec.burst_steps == ()  # the burst policy watches the queue, which this metric does not use
    with pytest.raises(FleetError, match=r"vllm-fleet:scaling.target = 70.0: kv-cache-usage is a 0-1 fraction"):
        scaling_policy_spec(build_stack_plan(with_scaling("dev-8b", metric="kv-cache-usage", target=70), validate=False))


def test_night_floor_errors_name_the_key() -> None:
    with pytest.raises(FleetError, match=r"vllm-fleet:scaling.nightFloor = 1: must be below vllm-fleet:capacity.minReplicas \(1\)"):
        scaling_policy_spec(build_stack_plan(with_scaling("dev-8b", night_floor=1), validate=False))
    # dev-8b on 4-GPU g6e.12xlarge nodes: one GPU per replica, so 1 and 2 replicas share a node.
    config = with_scaling("dev-8b", night_floor=1)
    capacity = config.capacity.model_copy(update={"instance_types": ["g6e.12xlarge"], "min_replicas": 2, "max_replicas": 8})
    packed = build_stack_plan(config.model_copy(update={"capacity": capacity}), validate=False)
    assert packed.plan.layout.replicas_per_node == 4
    with pytest.raises(FleetError, match=r"nightFloor = 1: 1 and 2 replicas both take 1 node"):
        scaling_policy_spec(packed)


def test_gangs_scale_by_a_ladder_of_whole_gangs() -> None:
    sp = stack_plan("prod-405b")
    spec = scaling_policy_spec(sp)
    assert sp.plan.layout.nodes_per_replica == 2 and spec.shape == "gang-ladder"
    assert spec.group_dimension == "Stack" and spec.burst_steps == ()
    per_replica = sp.plan.max_num_seqs - max(1, sp.plan.max_num_seqs / 4)
    assert [(r.gang_index, r.on_above, r.off_below) for r in spec.ladder] == [
        (k, k * per_replica, 0.9 * k * per_replica) for k in range(1, sp.config.capacity.max_replicas)
    ]
    night = scaling_policy_spec(stack_plan("prod-405b", night_floor=0))
    assert night.night is not None and night.night.gang_indices == (0,)
    assert night.ladder[0].gang_index == 1  # gang 0 has no rung: nothing measures load with no replica up


def test_warm_pool_only_for_single_type_on_demand_groups() -> None:
    modes = {name: warm_pool_mode(stack_plan(name)) for name in STACKS}
    for name, (mode, why) in modes.items():
        print(f"{name}: {mode} — {why}")
    assert modes["dev-8b"][0] == "stopped"
    assert modes["prod-405b"] == ("off", modes["prod-405b"][1]) and "nodes" in modes["prod-405b"][1]
    assert "Spot" in modes["prod-70b-awq"][1]
    assert "mixed instances policy" in modes["prod-70b"][1]
    local = load_stack_file("dev-8b")
    local = local.model_copy(update={"serving": local.serving.model_copy(update={"weights_source": "local-nvme"})})
    assert warm_pool_mode(build_stack_plan(local, validate=False))[0] == "off"


def test_warm_pool_args_for_the_fleet_group() -> None:
    args = warm_pool_args(warm_pool_settings(stack_plan("dev-8b")))
    assert isinstance(args, aws.autoscaling.GroupWarmPoolArgs)
    assert warm_pool_args(warm_pool_settings(stack_plan("prod-70b"))) is None


# --- FleetScaling under Pulumi mocks --------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["up", "preview"])
def harness(request: pytest.FixtureRequest, pulumi_mocks: Callable[..., PulumiHarness]) -> PulumiHarness:  # noqa: F811
    return pulumi_mocks(preview=bool(request.param))


def build(harness: PulumiHarness, sp: StackPlan, names: list[str] | None = None) -> FleetScaling:
    groups = names if names is not None else group_names(sp)
    return harness.run(lambda: FleetScaling("scaling", FleetScalingArgs(scaling_policy_spec(sp), groups, {"team": "t"})))


def metric_stats(metrics: list[dict]) -> dict[str, dict]:
    return {m["id"]: m for m in metrics}


@pytest.mark.parametrize("name", STACKS)
def test_component_declares_the_policy_of_every_stack(name: str, harness: PulumiHarness) -> None:
    sp = stack_plan(name)
    spec = scaling_policy_spec(sp)
    component = build(harness, sp)
    policies, alarms = harness.records(POLICY), harness.records(ALARM)
    for record in policies + alarms:
        assert record.parent_type == "vllm-fleet:scaling:FleetScaling"
    preview = harness.mocks.preview
    if spec.shape == "fixed":
        assert policies == [] and alarms == [] and harness.records(SCHEDULE) == []
        return
    if spec.shape == "target-tracking":
        group = group_names(sp)[0]
        target = harness.record(POLICY, "scaling-target").inputs
        assert target["policyType"] == "TargetTrackingScaling"
        assert target["autoscalingGroupName"] == group
        assert target["estimatedInstanceWarmup"] == sp.plan.startup_timeout_s
        config = target["targetTrackingConfiguration"]
        assert config["targetValue"] == spec.setpoint and config["disableScaleIn"] is False
        queries = metric_stats(config["customizedMetricSpecification"]["metrics"])
        assert queries["load"]["expression"] == f"(running + waiting) * {sp.plan.layout.replicas_per_node}"
        assert queries["load"]["returnData"] is True
        for role in ("running", "waiting"):
            stat = queries[role]["metricStat"]
            assert stat["stat"] == "Average" and stat["period"] == 60
            assert stat["metric"]["metricName"] == spec.signals[role].cloudwatch_name  # type: ignore[index]
            assert stat["metric"]["namespace"] == "vllm-fleet"
            assert stat["metric"]["dimensions"] == [{"name": "AutoScalingGroupName", "value": group}]
        burst = harness.record(POLICY, "scaling-burst").inputs
        assert burst["policyType"] == "StepScaling" and burst["adjustmentType"] == "PercentChangeInCapacity"
        first, second = spec.burst_steps
        assert [(s["metricIntervalLowerBound"], s.get("metricIntervalUpperBound"), s["scalingAdjustment"]) for s in burst["stepAdjustments"]] == [
            ("0.0", str(second.lower - first.lower), 50),
            (str(second.lower - first.lower), None, 100),
        ]
        alarm = harness.record(ALARM, "scaling-burst").inputs
        assert alarm["threshold"] == spec.target and alarm["evaluationPeriods"] == 1
        assert alarm["comparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert metric_stats(alarm["metricQueries"])["waiting"]["metric"]["dimensions"] == {"AutoScalingGroupName": group}
        assert len(policies) == 2 and len(alarms) == 1
    else:
        groups = group_names(sp)
        assert len(policies) == 2 * len(spec.ladder) and len(alarms) == 2 * len(spec.ladder)
        for rung in spec.ladder:
            k = rung.gang_index
            on = harness.record(POLICY, f"scaling-gang-{k}-on").inputs
            off = harness.record(POLICY, f"scaling-gang-{k}-off").inputs
            assert on["autoscalingGroupName"] == off["autoscalingGroupName"] == groups[k]
            assert on["adjustmentType"] == off["adjustmentType"] == "ExactCapacity"
            assert on["stepAdjustments"][0]["scalingAdjustment"] == sp.plan.layout.nodes_per_replica
            assert off["stepAdjustments"][0]["scalingAdjustment"] == 0
            on_alarm = harness.record(ALARM, f"scaling-gang-{k}-on").inputs
            off_alarm = harness.record(ALARM, f"scaling-gang-{k}-off").inputs
            assert (on_alarm["threshold"], on_alarm["evaluationPeriods"]) == (rung.on_above, 3)
            assert (off_alarm["threshold"], off_alarm["evaluationPeriods"]) == (rung.off_below, 15)
            load = metric_stats(on_alarm["metricQueries"])
            assert load["load"]["expression"] == "(running + waiting) / 4"
            assert load["running"]["metric"]["stat"] == "Sum"
            assert load["running"]["metric"]["dimensions"] == {"Stack": spec.stack}
    if not preview:
        # Each alarm fires its own policy.
        arns = {harness.resolve(v) for v in component.policy_arns.values()}
        for alarm_record in alarms:
            assert len(alarm_record.inputs["alarmActions"]) == 1 and alarm_record.inputs["alarmActions"][0] in arns


@pytest.mark.parametrize("name", ["dev-8b", "prod-405b"])
def test_night_schedules_move_only_the_minimum(name: str, harness: PulumiHarness) -> None:
    sp = stack_plan(name, night_floor=0)
    spec = scaling_policy_spec(sp)
    build(harness, sp)
    schedules = {r.name: r.inputs for r in harness.records(SCHEDULE)}
    unchanged = scaling_facts().scheduled_actions.unchanged_value.value
    key = "gang-0" if spec.shape == "gang-ladder" else "fleet"
    night, day = schedules[f"scaling-{key}-night"], schedules[f"scaling-{key}-day"]
    assert len(schedules) == 2
    assert night["recurrence"] == "0 22 * * *" and day["recurrence"] == "0 7 * * *"
    assert night["timeZone"] == day["timeZone"] == "UTC"
    assert night["minSize"] == 0
    assert day["minSize"] == (sp.plan.layout.nodes_per_replica if key == "gang-0" else spec.min_instances)
    for s in (night, day):
        assert s["maxSize"] == s["desiredCapacity"] == unchanged


def test_group_names_can_be_outputs_of_a_real_group(pulumi_mocks: Callable[..., PulumiHarness]) -> None:  # noqa: F811
    harness = pulumi_mocks(preview=False)
    sp = stack_plan("dev-8b")

    def program() -> FleetScaling:
        group = aws.autoscaling.Group("fleet", min_size=1, max_size=2, availability_zones=["us-east-1a"])
        return FleetScaling("scaling", FleetScalingArgs(scaling_policy_spec(sp), [group.name], {}))

    harness.run(program)
    group = harness.record("aws:autoscaling/group:Group", "fleet")
    target = harness.record(POLICY, "scaling-target").inputs
    assert target["autoscalingGroupName"] not in (None, "[unknown]")
    assert group.type and target["autoscalingGroupName"].startswith("fleet")


def test_wrong_group_count_fails_before_any_resource(pulumi_mocks: Callable[..., PulumiHarness]) -> None:  # noqa: F811
    harness = pulumi_mocks(preview=False)
    with pytest.raises(FleetError, match="1 group name\\(s\\) given; the gang-ladder shape of stack prod-405b has 2"):
        build(harness, stack_plan("prod-405b"), ["only-one"])
    assert harness.records(POLICY) == []


# --- node artifacts: the scaling-signal units and script --------------------------------------

SIGNAL_SCRIPT = Path(__file__).resolve().parents[1] / "images" / "scripts" / "node-scaling-signal.sh"


def rendered(name: str) -> dict[str, str]:
    """The chosen type's scaling units, as the stack's user-data carries them."""
    plan = stack_plan(name)
    files = render_node(plan.node_specs[plan.plan.layout.instance_type])
    return {k: v for k, v in files.items() if "scaling-signal" in k}


def vllm_exposition(running: float, waiting: float, kv: float) -> str:
    """vLLM 0.32.0's /metrics lines for the three gauges (names from the catalog), plus a histogram
    and a counter that the scrape config must drop."""
    spec = scaling_policy_spec(stack_plan("dev-8b"))
    values = {"running": running, "waiting": waiting, "kv_cache": kv}
    lines = []
    for role, signal in spec.signals.items():
        lines += [f"# TYPE {signal.prometheus_name} gauge", f'{signal.prometheus_name}{{engine="0",model_name="m"}} {values[role]}']
    lines += [
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2.0',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5',
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 42.0',
    ]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A fake vLLM /metrics (and nothing else) on 127.0.0.1, whose gauges a test can change."""

    def __init__(self) -> None:
        self.body = vllm_exposition(0, 0, 0)
        self.up = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics" or not server.up:
                    self.send_error(503)
                    return
                data = server.body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metrics_servers() -> Iterator[list[MetricsServer]]:
    servers = [MetricsServer(), MetricsServer()]
    yield servers
    for s in servers:
        s.close()


# --- node artifacts: the protection script and the units ---------------------------------------

IMAGE_BINARIES = ("usr/local/libexec/vllm-fleet/scaling-signal",)


def write_root(root: Path, files: dict[str, str]) -> list[str]:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o755 if rel.startswith("usr/local/libexec/") else 0o644)
    for rel in IMAGE_BINARIES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return sorted(p.name for p in (root / UNIT_DIR).iterdir())


@pytest.mark.parametrize("name", ["dev-8b", "prod-405b"])
def test_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    units = write_root(tmp_path, rendered(name))
    assert {"vllm-fleet-scaling-signal.service", "vllm-fleet-scaling-signal.timer"} <= set(units)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no", "--generators=no", *units],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def moto_group(moto_env: dict[str, str], name: str, size: int) -> tuple[object, list[str]]:
    session = boto3.Session(region_name=moto_env["AWS_DEFAULT_REGION"])
    ec2 = session.client("ec2", endpoint_url=moto_env["AWS_ENDPOINT_URL"])
    asg = session.client("autoscaling", endpoint_url=moto_env["AWS_ENDPOINT_URL"])
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=f"{name}-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=size, MaxSize=size, DesiredCapacity=size,
        LaunchTemplate={"LaunchTemplateName": f"{name}-lt"}, AvailabilityZones=["us-east-1a"],
    )
    ids = [i["InstanceId"] for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"]]
    return asg, ids


def protected(asg: object, ids: list[str]) -> dict[str, bool]:
    found = asg.describe_auto_scaling_instances(InstanceIds=ids)["AutoScalingInstances"]  # type: ignore[attr-defined]
    return {i["InstanceId"]: i["ProtectedFromScaleIn"] for i in found}


def run_script(script: dict[str, str], run_dir: Path, imds: FakeImds, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's scaling-signal with the environment its rendered unit sets."""
    full = {**os.environ, **env, **script, "VLLM_FLEET_RUN_DIR": str(run_dir), "VLLM_FLEET_IMDS": imds.url,
            "VLLM_FLEET_AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SIGNAL_SCRIPT)], check=False, capture_output=True, text=True, env=full, timeout=120)


def script_for(name: str, ports: tuple[int, ...], tmp_path: Path) -> dict[str, str]:
    """The unit's environment for the stack, with the fake replicas' ports."""
    plan = stack_plan(name)
    env = dict(plan.node_specs[plan.plan.layout.instance_type].scaling_environment)
    return {**env, "SCALING_PORTS": " ".join(str(p) for p in ports)}


def test_a_busy_node_protects_itself_and_an_idle_one_lets_go(
    tmp_path: Path, moto_env: dict[str, str], metrics_servers: list[MetricsServer]
) -> None:
    asg, ids = moto_group(moto_env, "vllm-fleet.dev-8b.fleet-0123", 2)
    imds = FakeImds(ids[0], "vllm-fleet.dev-8b.fleet-0123")
    run_dir = tmp_path / "run"
    script = script_for("dev-8b", tuple(s.port for s in metrics_servers), tmp_path)
    try:
        metrics_servers[1].body = vllm_exposition(running=1, waiting=0, kv=0.1)
        result = run_script(script, run_dir, imds, moto_env)
        assert result.returncode == 0, result.stderr
        assert protected(asg, ids) == {ids[0]: True, ids[1]: False}, result.stderr
        # Metrics down: protection stays as it was.
        metrics_servers[0].up = False
        metrics_servers[1].body = vllm_exposition(0, 0, 0)
        result = run_script(script, run_dir, imds, moto_env)
        assert result.returncode == 0 and "does not answer" in result.stderr
        assert protected(asg, ids)[ids[0]] is True
        # Idle: protection cleared.
        metrics_servers[0].up = True
        result = run_script(script, run_dir, imds, moto_env)
        assert result.returncode == 0, result.stderr
        assert protected(asg, ids)[ids[0]] is False and "unprotected" in result.stderr
        # Unchanged state: no second call (nothing logged; the gauges were published < 15 s ago).
        result = run_script(script, run_dir, imds, moto_env)
        assert result.returncode == 0 and result.stderr == ""
    finally:
        imds.close()


def test_a_gang_head_protects_its_whole_gang_and_workers_do_nothing(
    tmp_path: Path, moto_env: dict[str, str], metrics_servers: list[MetricsServer]
) -> None:
    group = "vllm-fleet.prod-405b.gang-1-0123"
    asg, ids = moto_group(moto_env, group, 2)
    script = script_for("prod-405b", (metrics_servers[0].port,), tmp_path)
    head_dir, worker_dir = tmp_path / "head", tmp_path / "worker"
    head_dir.mkdir()
    (head_dir / "role.head").touch()
    worker_dir.mkdir()
    (worker_dir / "role.worker").touch()
    head, worker = FakeImds(ids[0], group), FakeImds(ids[1], group)
    try:
        metrics_servers[0].body = vllm_exposition(running=4, waiting=2, kv=0.5)
        result = run_script(script, worker_dir, worker, moto_env)
        assert result.returncode == 0, result.stderr
        assert not (worker_dir / "scaling-published-at").exists()  # workers publish nothing
        assert protected(asg, ids) == {ids[0]: False, ids[1]: False}
        result = run_script(script, head_dir, head, moto_env)
        assert result.returncode == 0, result.stderr
        assert protected(asg, ids) == {ids[0]: True, ids[1]: True}
    finally:
        head.close()
        worker.close()


def test_the_gauges_reach_cloudwatch_as_the_policies_and_alarms_query_them(
    tmp_path: Path, moto_env: dict[str, str], metrics_servers: list[MetricsServer]
) -> None:
    """PutMetricData through moto: every metric the stack's policies and alarms name arrives with
    their namespace and dimensions, one sample per replica."""
    group = "vllm-fleet.dev-8b.fleet-0123"
    _, ids = moto_group(moto_env, group, 1)
    imds = FakeImds(ids[0], group)
    metrics_servers[0].body = vllm_exposition(running=3, waiting=5, kv=0.25)
    metrics_servers[1].body = vllm_exposition(running=1, waiting=0, kv=0.75)
    try:
        result = run_script(script_for("dev-8b", tuple(s.port for s in metrics_servers), tmp_path), tmp_path / "run", imds, moto_env)
    finally:
        imds.close()
    assert result.returncode == 0, result.stderr
    spec = scaling_policy_spec(stack_plan("dev-8b"))
    cloudwatch = boto3.client("cloudwatch", region_name=moto_env["AWS_DEFAULT_REGION"], endpoint_url=moto_env["AWS_ENDPOINT_URL"])
    published = cloudwatch.list_metrics(Namespace=spec.namespace)["Metrics"]
    found = {(m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"])) for m in published}
    expected = set()
    for signal in spec.signals.values():
        expected.add((signal.cloudwatch_name, (("AutoScalingGroupName", group),)))
        expected.add((signal.cloudwatch_name, (("Stack", "dev-8b"),)))
    assert found == expected
    stats = cloudwatch.get_metric_statistics(
        Namespace=spec.namespace, MetricName=spec.signals["waiting"].cloudwatch_name,
        Dimensions=[{"Name": "AutoScalingGroupName", "Value": group}],
        StartTime=time.time() - 600, EndTime=time.time() + 60, Period=60, Statistics=["Sum", "SampleCount", "Maximum"],
    )["Datapoints"]
    assert [(d["Sum"], d["SampleCount"], d["Maximum"]) for d in stats] == [(5.0, 2.0, 5.0)]


def test_the_policies_query_the_dimensions_the_node_publishes() -> None:
    """The other half of the contract: the node's dimension sets are those the policies name."""
    for name in STACKS:
        plan = stack_plan(name)
        env = plan.node_specs[plan.plan.layout.instance_type].scaling_environment
        spec = scaling_policy_spec(plan)
        assert env["SCALING_NAMESPACE"] == spec.namespace
        assert env["SCALING_METRICS"].split() == [
            f"{s.prometheus_name}={s.cloudwatch_name}={s.unit}" for s in spec.signals.values()
        ]
        assert spec.group_dimension in env["SCALING_DIMENSIONS"].split()


# --- snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dev-8b", "prod-405b"])
def test_rendered_files_match_snapshots(name: str, snapshot: SnapshotAssertion) -> None:
    """tests/__snapshots__/test_scaling/, one file each; regenerate deliberately with --snapshot-update."""
    files = rendered(name)
    files["describe.txt"] = "\n".join(describe_scaling(stack_plan(name))) + "\n"
    for rel, content in files.items():
        assert content == text_file(snapshot, rel)


def test_pulumi_is_not_imported_by_the_pure_module() -> None:
    code = "import sys, infra.plan.scaling; print('pulumi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


assert pulumi  # imported for type context of the harness
