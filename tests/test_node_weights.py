"""The node's weights path outside a boot: the image's fetch-weights and fetch-hf-token scripts
against a real moto server (S3, Secrets Manager) through the AWS CLI, and what the plan renders
for each weights source (argv, units, IAM, keep-alive, user-data size).

The booted versions of the same scripts run in tests/test_node_boot.py.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from infra.config import load_stack_file, stack_names
from infra.plan.build import build_stack_plan
from infra.plan.iam import PolicyInputs, node_policy_document
from infra.plan.node.from_plan import KEEP_ALIVE_MARGIN_S
from infra.plan.stack import StackPlan
from infra.render.node import S3_TRANSFER, UNIT_DIR, render_node, vllm_unit_names
from infra.render.stack import stack_user_data
from tests.support.imds import FakeImds

SCRIPTS = Path(__file__).resolve().parents[1] / "images" / "scripts"
FETCH_WEIGHTS = SCRIPTS / "node-fetch-weights.sh"
FETCH_TOKEN = SCRIPTS / "node-fetch-hf-token.sh"
BUCKET = "vllm-fleet-weights-123456789012-us-east-1"
PREFIX = "meta-llama/Llama-3.1-70B-Instruct/main/"
URI = f"s3://{BUCKET}/{PREFIX}"
# EC2's user-data limit (RequestLaunchTemplateData.UserData; infra/facts/data/aws_fleet.yaml).
USER_DATA_LIMIT = 16 * 1024

_PLANS: dict[str, StackPlan] = {}


def stack_plan(name: str) -> StackPlan:
    if name not in _PLANS:
        _PLANS[name] = build_stack_plan(load_stack_file(name), validate=False)
    return _PLANS[name]


def chosen_spec(name: str):  # NodeSpec
    plan = stack_plan(name)
    return plan.node_specs[plan.plan.layout.instance_type]


def s3(env: dict[str, str]):  # boto3 clients are untyped
    return boto3.client("s3", region_name=env["AWS_DEFAULT_REGION"], endpoint_url=env["AWS_ENDPOINT_URL"])


def run(script: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        **env,
        "VLLM_FLEET_AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **extra,
    }
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=300, check=False)


def upload_model(env: dict[str, str], size_mb: int = 48) -> int:
    client = s3(env)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key=PREFIX + "config.json", Body=b'{"architectures": ["LlamaForCausalLM"]}')
    client.put_object(Bucket=BUCKET, Key=PREFIX + "tokenizer.json", Body=b"{}")
    body = os.urandom(size_mb * 1_000_000)
    client.put_object(Bucket=BUCKET, Key=PREFIX + "model-00001-of-00001.safetensors", Body=body)
    return len(body)


def one_failure_line(result: subprocess.CompletedProcess[str], uri: str) -> str:
    lines = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fetch-weights: FAILED to fetch weights from {uri}: "), lines[0]
    return lines[0]


# --- fetch-weights against moto S3 -----------------------------------------------------------


def test_fetch_weights_copies_the_prefix_and_reports_its_rate(moto_env: dict[str, str], tmp_path: Path) -> None:
    size = upload_model(moto_env)
    target = tmp_path / "models" / "llama-3.1-70b"
    started = time.monotonic()
    result = run(FETCH_WEIGHTS, moto_env, WEIGHTS_DIR=str(target), WEIGHTS_S3_URI=URI)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert (target / "model-00001-of-00001.safetensors").stat().st_size == size
    assert (target / "config.json").is_file()
    assert re.search(rf"fetched \d+ bytes from {re.escape(URI)} in \d+ s \(\d+ MB/s\)", result.stderr), result.stderr
    print(f"\nfetch-weights: {size / 1e6:.0f} MB from moto S3 on loopback in {elapsed:.1f} s "
          f"({size / 1e6 / elapsed:.0f} MB/s, {S3_TRANSFER.max_concurrent_requests} concurrent "
          f"{S3_TRANSFER.multipart_chunksize} parts; 2 shared cores, so this bounds the CLI, not S3)")  # fmt: skip
    # A restart of the unit does not download again.
    again = run(FETCH_WEIGHTS, moto_env, WEIGHTS_DIR=str(target), WEIGHTS_S3_URI=URI)
    assert again.returncode == 0 and "already in" in again.stderr


def test_fetch_weights_reads_the_uri_from_the_instance_tag(moto_env: dict[str, str], tmp_path: Path) -> None:
    upload_model(moto_env, size_mb=1)
    imds = FakeImds("i-0123456789abcdef0", "vllm-fleet.prod-70b.fleet-1", {"vllm-fleet:weights-uri": URI})
    try:
        result = run(FETCH_WEIGHTS, moto_env, WEIGHTS_DIR=str(tmp_path / "m"), WEIGHTS_S3_URI="", VLLM_FLEET_IMDS=imds.url)
    finally:
        imds.close()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("no-bucket", "NoSuchBucket"),
        ("empty-prefix", "no objects under this prefix"),
        ("not-a-model", "no config.json under the prefix"),
    ],
)
def test_a_broken_source_fails_with_one_line_naming_uri_and_cause(
    moto_env: dict[str, str], tmp_path: Path, case: str, cause: str
) -> None:
    uri = URI
    if case != "no-bucket":
        s3(moto_env).create_bucket(Bucket=BUCKET)
    if case == "not-a-model":
        s3(moto_env).put_object(Bucket=BUCKET, Key=PREFIX + "README.md", Body=b"hi")
    result = run(FETCH_WEIGHTS, moto_env, WEIGHTS_DIR=str(tmp_path / "m"), WEIGHTS_S3_URI=uri)
    assert cause in one_failure_line(result, uri)


def test_a_missing_weights_tag_fails_loudly(moto_env: dict[str, str], tmp_path: Path) -> None:
    imds = FakeImds("i-0123456789abcdef0", "g")
    try:
        result = run(FETCH_WEIGHTS, moto_env, WEIGHTS_DIR=str(tmp_path / "m"), WEIGHTS_S3_URI="", VLLM_FLEET_IMDS=imds.url)
    finally:
        imds.close()
    assert "instance tag vllm-fleet:weights-uri not in instance metadata" in one_failure_line(result, "<no URI>")


# --- fetch-hf-token against moto Secrets Manager ----------------------------------------------


def test_fetch_hf_token_writes_a_private_file_and_never_prints_the_token(moto_env: dict[str, str], tmp_path: Path) -> None:
    token = "hf_" + "Ab1" * 11
    secrets = boto3.client("secretsmanager", region_name=moto_env["AWS_DEFAULT_REGION"], endpoint_url=moto_env["AWS_ENDPOINT_URL"])
    secrets.create_secret(Name="vllm-fleet/dev-8b/hf-token", SecretString=token)
    result = run(FETCH_TOKEN, moto_env, HF_TOKEN_SECRET_ID="vllm-fleet/dev-8b/hf-token", VLLM_FLEET_RUN_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "hf-token"
    assert written.read_text().strip() == token
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert token not in result.stderr + result.stdout


def test_without_the_token_secret_the_node_says_so_and_downloads_anonymously(moto_env: dict[str, str], tmp_path: Path) -> None:
    result = run(FETCH_TOKEN, moto_env, HF_TOKEN_SECRET_ID="vllm-fleet/dev-8b/hf-token", VLLM_FLEET_RUN_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "NO HF TOKEN" in result.stderr and (tmp_path / "hf-token").read_text() == ""


# --- what each stack renders ---------------------------------------------------------------------


def test_an_s3_stack_serves_from_the_fetched_directory() -> None:
    spec = chosen_spec("prod-70b")
    argv = stack_plan("prod-70b").serve_argv
    assert argv[2] == spec.weights_dir and "--revision" not in argv
    files = render_node(spec)
    unit = files[f"{UNIT_DIR}/{vllm_unit_names(spec)[0]}"]
    assert "Requires=vllm-fleet-fetch-weights.service" in unit and "After=vllm-fleet-fetch-weights.service" in unit
    fetch = files[f"{UNIT_DIR}/vllm-fleet-fetch-weights.service"]
    assert f"Environment=WEIGHTS_DIR={spec.weights_dir}" in fetch
    assert "Environment=WEIGHTS_S3_URI=\n" in fetch  # the default URI names the account: the tag carries it
    assert "Restart=" not in fetch  # a broken source fails once, it does not loop
    assert spec.vllm_env["HF_HUB_OFFLINE"] == "1"


def test_a_hub_stack_gets_the_token_as_a_credential_never_in_argv_or_environment() -> None:
    spec = chosen_spec("dev-8b")
    unit = render_node(spec)[f"{UNIT_DIR}/vllm.service"]
    assert "LoadCredential=hf-token:/run/vllm-fleet/hf-token" in unit
    assert "Environment=HF_TOKEN_PATH=%d/hf-token" in unit
    assert "HF_TOKEN=" not in unit
    assert spec.hf_token_secret_id == "vllm-fleet/dev-8b/hf-token"
    policy = node_policy_document(
        PolicyInputs("aws", "us-east-1", "123456789012", "dev-8b", "arn:secret", "arn:logs", gangs=False,
                     hf_token_secret_name=spec.hf_token_secret_id)
    )  # fmt: skip
    (statement,) = [s for s in policy["Statement"] if s["Sid"] == "ReadHfToken"]
    assert statement["Resource"] == ["arn:aws:secretsmanager:us-east-1:123456789012:secret:vllm-fleet/dev-8b/hf-token-??????"]


@pytest.mark.parametrize("name", stack_names("fleet"))
def test_keep_alive_outlasts_the_load_balancer_idle_timeout(name: str) -> None:
    """Read back from the rendered unit: vLLM keeps idle connections open longer than the ALB."""
    plan = stack_plan(name)
    spec = chosen_spec(name)
    unit = render_node(spec)[f"{UNIT_DIR}/{vllm_unit_names(spec)[0]}"]
    (line,) = [line for line in unit.splitlines() if "VLLM_HTTP_TIMEOUT_KEEP_ALIVE=" in line]
    keep_alive = int(line.split("=", 2)[2].rstrip('"'))
    assert keep_alive == plan.config.endpoint.idle_timeout_s + KEEP_ALIVE_MARGIN_S > plan.config.endpoint.idle_timeout_s


def test_user_data_fits_ec2_for_every_stack_and_ladder_type() -> None:
    lines = []
    for name in stack_names("fleet"):
        for instance_type, text in stack_user_data(stack_plan(name)).items():
            size = len(gzip.compress(text.encode(), compresslevel=9, mtime=0))
            lines.append(f"{name:14} {instance_type:16} {size:6} B gzipped, margin {USER_DATA_LIMIT - size:6} B")
            assert size < USER_DATA_LIMIT, lines[-1]
    print("\nuser-data (gzipped) against EC2's 16,384 B:\n" + "\n".join(lines))


@pytest.mark.parametrize("source", ["ebs-initialized", "ebs-lazy", "local-nvme"])
def test_a_staged_source_asserts_its_weights_before_vllm_starts(source: str) -> None:
    config = load_stack_file("dev-8b")
    config = config.model_copy(update={"serving": config.serving.model_copy(update={"weights_source": source})})
    plan = build_stack_plan(config, validate=False)
    spec = plan.node_specs[plan.plan.layout.instance_type]
    unit = render_node(spec)[f"{UNIT_DIR}/vllm.service"]
    assert f"AssertPathExists={plan.serve_argv[2]}/config.json" in unit
    assert plan.serve_argv[2].startswith("/opt/models/") and spec.vllm_env["HF_HUB_OFFLINE"] == "1"
    assert spec.weights_dir is None and spec.hf_token_secret_id is None
