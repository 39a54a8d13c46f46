"""prod-70b's node booted for real from its own weights path: S3 (moto) → fetch-weights →
vLLM serving from local disk, and the scaling gauges leaving the node for CloudWatch (moto).

The stack's production NodeSpec is rendered to user-data with only what this machine cannot
run changed (the diff of the user-data is printed): the AWS endpoint (moto), the CPU build's
flags and environment, one replica instead of two (one vLLM at a time here, and no GPUs to
split), and no lifecycle watcher (no Auto Scaling lifecycle hooks in moto's group). Everything
else is the stack's: the weights directory in the argv, the URI read from the instance tag the
Fleet sets (vllm-fleet:weights-uri, served by an instance-metadata stand-in together with the
instance id and its group), the image's fetch-weights and scaling-signal from the bake scripts.

Swapped and so untested here: the real S3 and CloudWatch (moto), the instance role (drop-ins
give moto's dummy credentials), the metadata service (tests/support/imds.py), the GPU build.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import openai
import pytest

from infra.config import load_stack_file
from infra.plan.build import build_stack_plan
from infra.plan.iam import default_weights_s3_uri, parse_s3_uri
from infra.plan.node.spec import NodeSpec
from infra.plan.scaling import scaling_policy_spec
from tests.support.imds import FakeImds
from tests.support.moto import MotoServer
from tests.support.ports import free_port
from tests.support.rootfs import (
    TINY_MODEL_MAX_LEN,
    NodeContainer,
    aws_unit_dropins,
    boot_stack_node,
    cpu_variant,
    moto_group,
    node_health,
    production_node_spec,
    replace_serve_flags,
    stop_node,
)
from tests.support.vllm_server import CPU_WARMUP_FLAGS

STACK = "prod-70b"
ACCOUNT = "123456789012"
WEIGHTS_UNIT = "vllm-fleet-fetch-weights.service"
SIGNAL_UNIT = "vllm-fleet-scaling-signal.service"
HEALTH_TIMEOUT_S = 480
TIMINGS: dict[str, float] = {}


def weights_uri() -> str:
    """The URI the Fleet tags the nodes with when weightsS3Uri is not set (prod-70b)."""
    config = load_stack_file(STACK)
    repo = config.model.repo or build_stack_plan(config, validate=False).plan.request.arch.hf_repo
    return config.serving.weights_s3_uri or default_weights_s3_uri(config, ACCOUNT, repo)


def cpu_spec(production: NodeSpec, *, port: int, endpoint: str) -> NodeSpec:
    """The production spec with what a CPU needs, nothing else; the model stays the fetched dir."""
    replica = production.replicas[0]
    argv = replace_serve_flags(
        replica.serve_argv,
        replica.serve_argv[2],
        {
            "--host": "127.0.0.1",
            "--port": str(port),
            "--tensor-parallel-size": "1",
            "--max-model-len": str(TINY_MODEL_MAX_LEN),
            # The CPU build computes in bfloat16 (the tiny model's dtype).
            "--dtype": "bfloat16",
        },
        added=CPU_WARMUP_FLAGS,
    )
    return cpu_variant(production, argv, port=port, endpoint=endpoint)


def upload_tiny_model(moto: MotoServer, uri: str, model_dir: Path, region: str) -> int:
    bucket, prefix = parse_s3_uri(uri)
    client = boto3.client("s3", endpoint_url=moto.endpoint, region_name=region,
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    client.create_bucket(Bucket=bucket)
    total = 0
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + str(path.relative_to(model_dir)))
            total += path.stat().st_size
    return total


@dataclass
class S3Node:
    node: NodeContainer
    spec: NodeSpec
    port: int
    api_key: str
    group: str
    moto: MotoServer
    booted_at: float


def boot_s3_node(rootfs: Path, workdir: Path, name: str, moto: MotoServer, imds: FakeImds, *, holds_vllm_slot: bool) -> S3Node:
    production = production_node_spec(STACK)
    assert production.weights_source == "s3" and production.weights_s3_uri is None  # the tag carries it
    port = free_port()
    spec = cpu_spec(production, port=port, endpoint=moto.endpoint)
    dropins = aws_unit_dropins(["vllm-fleet-fetch-key.service", WEIGHTS_UNIT, SIGNAL_UNIT], imds.url)
    node, started = boot_stack_node(rootfs, workdir, name, production, spec, dropins, holds_vllm_slot=holds_vllm_slot)
    group = imds.paths["/latest/meta-data/tags/instance/aws:autoscaling:groupName"]
    return S3Node(node, spec, port, "", group, moto, started)


@pytest.fixture(scope="module")
def s3_node(
    node_rootfs: Path, tiny_llama_dir: Path, moto: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Node]:
    production = production_node_spec(STACK)
    uri = weights_uri()
    size = upload_tiny_model(moto, uri, tiny_llama_dir, production.region)
    api_key = "s3-boot-" + secrets.token_hex(16)
    moto.put_secret(production.api_key_secret_id, api_key, production.region)
    group = f"vllm-fleet.{STACK}.fleet-0a1b2c"
    instance_id = moto_group(moto, group, production.region)
    imds = FakeImds(instance_id, group, {"vllm-fleet:weights-uri": uri})
    print(f"\n{size} bytes of the tiny model at {uri} in moto S3; node {instance_id} in group {group}")
    booted = boot_s3_node(node_rootfs, tmp_path_factory.mktemp("s3-node"), "s3-node", moto, imds, holds_vllm_slot=True)
    booted.api_key = api_key
    try:
        booted.node.wait_for(lambda: node_health(booted.port) == 200, HEALTH_TIMEOUT_S, "vllm /health 200")
        TIMINGS["boot to healthy (weights from S3)"] = time.monotonic() - booted.booted_at
        yield booted
    except Exception:
        print(booted.node.exec("systemctl", "status", "--no-pager", "-n", "30", WEIGHTS_UNIT, SIGNAL_UNIT,
                               "vllm.service", check=False).stdout if booted.node.alive else booted.node.console_tail())  # fmt: skip
        raise
    finally:
        stop_node(booted.node)
        imds.close()


def test_the_node_serves_from_the_weights_fetched_from_s3(s3_node: S3Node) -> None:
    node = s3_node.node
    weights_dir = s3_node.spec.weights_dir
    assert weights_dir is not None
    assert node.show(WEIGHTS_UNIT, "ActiveState", "Result") == {"ActiveState": "active", "Result": "success"}
    journal = node.journal("-u", WEIGHTS_UNIT, "-o", "cat")
    fetched = next(line for line in journal.splitlines() if line.startswith("fetch-weights: fetched"))
    assert weights_uri() in fetched
    print(f"\n{fetched}")
    # vLLM's main process serves the directory the argv names, which the fetch filled.
    main_pid = node.show("vllm.service", "MainPID")["MainPID"]
    cmdline = node.exec("ps", "-o", "args=", "-p", main_pid).stdout
    assert f"vllm serve {weights_dir} " in cmdline
    assert node.path(f"{weights_dir}/config.json").is_file()
    owner = node.exec("stat", "-c", "%U", f"{weights_dir}/config.json").stdout.strip()
    assert owner == "vllm"
    served = s3_node.spec.replicas[0].serve_argv
    model = served[served.index("--served-model-name") + 1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s3_node.port}/v1", api_key=s3_node.api_key, timeout=120)
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_the_scaling_gauges_reach_cloudwatch_as_the_policies_query_them(s3_node: S3Node) -> None:
    """The names, namespace and dimensions of FleetScaling's policies and alarms, from the node."""
    spec = scaling_policy_spec(build_stack_plan(load_stack_file(STACK), validate=False))
    cloudwatch = boto3.client("cloudwatch", endpoint_url=s3_node.moto.endpoint, region_name=s3_node.spec.region,
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    wanted = {(s.cloudwatch_name, (("AutoScalingGroupName", s3_node.group),)) for s in spec.signals.values()}
    wanted |= {(s.cloudwatch_name, (("Stack", STACK),)) for s in spec.signals.values()}

    def published() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        metrics = cloudwatch.list_metrics(Namespace=spec.namespace)["Metrics"]
        return {(m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"])) for m in metrics}

    try:
        s3_node.node.wait_for(lambda: published() == wanted, 120, "the scaling gauges in moto CloudWatch", interval_s=1)
        TIMINGS["boot to first scaling metric in CloudWatch"] = time.monotonic() - s3_node.booted_at
        # And the protection check ran against the group: idle, so not protected.
        s3_node.node.wait_for(
            lambda: "unprotected" in s3_node.node.journal("-u", SIGNAL_UNIT, "-o", "cat"), 60, "the protection call"
        )
    except Exception:
        print(s3_node.node.journal("-u", SIGNAL_UNIT, "-o", "short-monotonic")[-6000:])
        print(s3_node.node.exec("systemctl", "status", "--no-pager", "-n", "20", "vllm.service", check=False).stdout)
        raise


def test_a_broken_weights_uri_fails_once_with_one_line_and_vllm_never_starts(
    node_rootfs: Path, moto: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    broken = "s3://vllm-fleet-weights-nonexistent/meta-llama/Llama-3.1-70B-Instruct/main/"
    imds = FakeImds("i-0123456789abcdef1", f"vllm-fleet.{STACK}.fleet-broken", {"vllm-fleet:weights-uri": broken})
    booted = boot_s3_node(node_rootfs, tmp_path_factory.mktemp("s3-broken"), "s3-broken", moto, imds, holds_vllm_slot=False)
    node = booted.node
    try:
        node.wait_for(lambda: node.show(WEIGHTS_UNIT, "ActiveState")["ActiveState"] == "failed", 180, "fetch-weights to fail")
        failed_after = time.monotonic() - booted.booted_at
        lines = [line for line in node.journal("-u", WEIGHTS_UNIT, "-o", "cat").splitlines() if "FAILED" in line]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"fetch-weights: FAILED to fetch weights from {broken}: ") and "NoSuchBucket" in lines[0]
        time.sleep(20)  # longer than vllm.service's RestartSec: nothing retries
        vllm = node.show("vllm.service", "ActiveState", "NRestarts", "MainPID")
        assert vllm["ActiveState"] in ("inactive", "failed") and vllm["NRestarts"] == "0" and vllm["MainPID"] == "0", vllm
        assert "vllm.service" not in node.exec("systemctl", "list-jobs", "--no-legend").stdout
        assert "Dependency failed" in node.journal("-u", "vllm.service", "-o", "cat")
        assert node_health(booted.port) is None
        print(f"\nbroken URI: {lines[0]!r} {failed_after:.1f} s after boot; vllm.service never started")
    finally:
        stop_node(node)
        imds.close()


def test_print_timings() -> None:
    print("\ns3 node timings:")
    for name, seconds in TIMINGS.items():
        print(f"  {name}: {seconds:.1f} s")
    assert "boot to healthy (weights from S3)" in TIMINGS
