"""The node artifacts, checked with the real tools that will read them.

systemd-analyze (verify, security, and its unit dump for quoting), cloud-init schema,
shellcheck and ruff check what infra/render/node.py writes; the helper scripts run for
real: fetch-api-key against a local moto server through the AWS CLI (traced with strace so
the key provably never reaches argv or the environment of any process), its YAML through
the pinned vLLM's own parser, gang-discover against moto's Auto Scaling and EC2 APIs, and
the Ray units' commands plus wait-ray-gpus against a real local Ray cluster.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import boto3
import pytest
import yaml
from syrupy.assertion import SnapshotAssertion

from infra.errors import FleetError
from infra.plan.node.spec import GangDiscovery, NodeSpec, ReplicaSpec
from infra.plan.scaling import node_scaling_environment
from infra.render.node import (
    LIBEXEC,
    UNIT_DIR,
    file_mode,
    render_node,
    render_user_data,
)
from infra.render.userdata import decode_user_data, encode_user_data
from tests.support.ports import free_port
from tests.support.snapshots import text_file

VENV_BIN = Path(sys.executable).parent
REGION = "us-east-1"
# vllm.service's exposure must stay at or below this (`systemd-analyze security`, 0-10).
MAX_EXPOSURE = 3.0
# The root helpers: nvidia-modprobe needs CAP_SYS_MODULE and CAP_MKNOD, so it scores worse.
MAX_EXPOSURE_GPU_DEVICES = 3.5

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def serve_argv(port: int = 8000, *extra: str) -> tuple[str, ...]:
    """A production-shaped argv, as infra/plan/node/serve_args.py builds it."""
    return (
        "vllm", "serve", MODEL, "--revision", "0e9e39f249a16976918f6564b8830bc894c89659",
        "--served-model-name", "llama-3.1-8b",
        "--host", "0.0.0.0", "--port", str(port),
        "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        *extra,
        "--max-model-len", "8192", "--max-num-seqs", "64",
        "--enable-prefix-caching", "--dtype", "bfloat16",
        "--download-dir", "/var/cache/vllm/models", "--shutdown-timeout", "60",
    )  # fmt: skip


def single_spec(**overrides: object) -> NodeSpec:
    base: dict[str, object] = {
        "stack": "demo",
        "region": REGION,
        "replicas": (ReplicaSpec(serve_argv(), port=8000),),
        "api_key_secret_id": "vllm-fleet/demo/api-key",
        "start_timeout_s": 1800,
        "shutdown_timeout_s": 60,
        "gpus_per_node": 1,
        "vllm_env": {"VLLM_ENGINE_READY_TIMEOUT_S": "1500", "HF_HUB_OFFLINE": "1"},
    }
    return NodeSpec(**{**base, **overrides})  # type: ignore[arg-type]


def multi_spec(**overrides: object) -> NodeSpec:
    argv = serve_argv(8000, "--distributed-executor-backend", "ray")
    argv = tuple(
        "8" if a == "1" and argv[i - 1] == "--tensor-parallel-size" else a for i, a in enumerate(argv)
    )
    argv = tuple(
        "2" if a == "1" and argv[i - 1] == "--pipeline-parallel-size" else a for i, a in enumerate(argv)
    )
    base: dict[str, object] = {
        "stack": "demo",
        "region": REGION,
        "replicas": (ReplicaSpec(argv, port=8000),),
        "api_key_secret_id": "vllm-fleet/demo/api-key",
        "start_timeout_s": 2400,
        "shutdown_timeout_s": 60,
        "gpus_per_node": 8,
        "nodes": 2,
        "vllm_env": {"VLLM_ENGINE_READY_TIMEOUT_S": "2000", "HF_HUB_OFFLINE": "1"},
    }
    return NodeSpec(**{**base, **overrides})  # type: ignore[arg-type]


def two_replica_spec() -> NodeSpec:
    return single_spec(
        replicas=(
            ReplicaSpec(serve_argv(8000), port=8000, gpu_indices=(0, 1, 2, 3)),
            ReplicaSpec(serve_argv(8001), port=8001, gpu_indices=(4, 5, 6, 7)),
        ),
        gpus_per_node=8,
    )


def s3_spec() -> NodeSpec:
    """weightsSource s3 with the scaling signal: fetch-weights before vLLM, from the instance tag."""
    weights_dir = "/var/cache/vllm/models/llama-3.1-8b"
    argv = serve_argv()
    argv = argv[:2] + (weights_dir,) + argv[5:]  # the fetched directory, no --revision
    return single_spec(
        replicas=(ReplicaSpec(argv, port=8000),),
        weights_source="s3",
        weights_dir=weights_dir,
        scaling_environment=node_scaling_environment("demo", REGION, [8000], gang=False),
    )


def hub_spec() -> NodeSpec:
    """weightsSource huggingface with a token secret, and the scaling signal."""
    return single_spec(
        hf_token_secret_id="vllm-fleet/demo/hf-token",
        scaling_environment=node_scaling_environment("demo", REGION, [8000], gang=False),
    )


SPECS = {"single": single_spec, "multi": multi_spec, "two-replicas": two_replica_spec, "s3": s3_spec, "hub": hub_spec}


# --- a node root on disk --------------------------------------------------------------------

# Binaries the AMI provides (images/ installs them); `systemd-analyze verify` only checks that
# ExecStart= commands are executable files, so inside the temporary root they are stubs.
IMAGE_BINARIES = (
    "opt/vllm/venv/bin/vllm",
    "opt/vllm/venv/bin/ray",
    "opt/vllm/venv/bin/python3",
    "usr/bin/nvidia-modprobe",
    # images/scripts/install-node-tools.sh
    "usr/local/libexec/vllm-fleet/fetch-weights",
    "usr/local/libexec/vllm-fleet/fetch-hf-token",
    "usr/local/libexec/vllm-fleet/scaling-signal",
)


def write_node_root(root: Path, spec: NodeSpec) -> list[str]:
    """Rendered files under ``root`` (with their modes) plus what verify needs around them.

    Returns the unit names. ``--root`` makes systemd-analyze resolve both the units and
    their ExecStart= paths inside ``root``; the distribution's own units (sysinit.target,
    network-online.target, ...) are copied from the host so dependencies resolve.
    """
    for rel, content in render_node(spec).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(int(file_mode(rel), 8))
    for rel in IMAGE_BINARIES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return sorted(p.name for p in (root / UNIT_DIR).iterdir() if p.is_file())


def analyze(*args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug" if debug else "info"}
    return subprocess.run(
        ["systemd-analyze", *args], check=False, capture_output=True, text=True, env=env, timeout=60
    )


def verify(root: Path, units: list[str], *, debug: bool = False) -> subprocess.CompletedProcess[str]:
    return analyze("verify", f"--root={root}", "--man=no", "--generators=no", *units, debug=debug)


@pytest.fixture(scope="module")
def rendered_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    roots = {}
    for name, make in SPECS.items():
        root = tmp_path_factory.mktemp(f"root-{name}")
        roots[name] = (root, write_node_root(root, make()))
    return roots


# --- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_unit_passes_systemd_analyze_verify(name: str, rendered_roots: dict) -> None:
    root, units = rendered_roots[name]
    result = verify(root, units)
    assert result.returncode == 0, result.stderr
    # verify only warns (exit 0) about unknown keys and bad values, so any output is a failure.
    assert result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_verify_would_catch_a_misspelled_directive(rendered_roots: dict) -> None:
    """The check above can fail: the same unit with one typo produces a warning."""
    root, _ = rendered_roots["single"]
    unit = (root / UNIT_DIR / "vllm.service").read_text()
    assert "\nPrivateTmp=yes\n" in unit
    (root / UNIT_DIR / "typo.service").write_text(unit.replace("\nPrivateTmp=yes\n", "\nPrivateTmpp=yes\n"))
    try:
        result = verify(root, ["typo.service"])
    finally:
        (root / UNIT_DIR / "typo.service").unlink()
    assert "Unknown key 'PrivateTmpp'" in result.stderr


def exposure(unit_path: Path) -> float:
    result = analyze("security", "--offline=yes", str(unit_path))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_exposure_scores(name: str, rendered_roots: dict) -> None:
    root, units = rendered_roots[name]
    scores = {u: exposure(root / UNIT_DIR / u) for u in units if u.endswith(".service")}
    print(f"\n[{name}] systemd-analyze security --offline=yes:")
    for unit, score in scores.items():
        print(f"  {unit:36s} {score:.1f}")
    for unit, score in scores.items():
        limit = MAX_EXPOSURE_GPU_DEVICES if unit == "vllm-fleet-gpu-devices.service" else MAX_EXPOSURE
        assert score <= limit, f"{unit}: exposure {score} > {limit}"


def test_a_plain_unit_scores_badly_so_the_score_is_measured() -> None:
    """vllm.md: a unit without hardening scores 9.2; the parser above reads real numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.service"
        plain.write_text("[Service]\nExecStart=/bin/true\n")
        assert exposure(plain) > 9.0


def dump_lines(root: Path, unit: str) -> list[str]:
    """The unit as systemd parsed it (verify's debug dump on stdout)."""
    result = verify(root, [unit], debug=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def split_dump_command(line: str) -> list[str]:
    """Words of a dumped command line.

    systemd prints each word bare, or in double quotes with a backslash before any of
    ``"\\`$`` (shell_maybe_quote() in systemd's src/basic/escape.c); shlex would keep the
    backslash before ``$``, so this undoes exactly that quoting.
    """
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word: list[str] = []
        while i < len(line) and line[i] != " ":
            if line[i] == '"':
                i += 1
                while line[i] != '"':
                    if line[i] == "\\":
                        i += 1
                    word.append(line[i])
                    i += 1
                i += 1
            elif line[i] == "\\":
                word.append(line[i + 1])
                i += 2
            else:
                word.append(line[i])
                i += 1
        words.append("".join(word))
    return words


def parsed_commands(lines: list[str], directive: str) -> list[list[str]]:
    """argv of each ``directive`` command, after the exec-time "$$" → "$" step.

    The dump is systemd's parse; systemd turns "$$" into "$" when it runs the command
    (systemd.service(5) "COMMAND LINES"), which is the one step still to apply here.
    """
    commands = []
    for i, line in enumerate(lines):
        if line.strip() == f"-> {directive}:":
            command = lines[i + 1].strip()
            assert command.startswith("Command Line: "), command
            words = split_dump_command(command.removeprefix("Command Line: "))
            commands.append([w.replace("$$", "$") for w in words])
    return commands


def parsed_environment(lines: list[str]) -> dict[str, str]:
    env = {}
    for line in lines:
        if line.strip().startswith("Environment: "):
            name, _, value = line.strip().removeprefix("Environment: ").partition("=")
            env[name] = value
    return env


ODD_NAME = 'we"ird $HOME %n \\ name;'
ODD_VALUE = 'a "quoted" $VAR %i back\\slash ; # not a comment'


def test_exec_start_and_environment_survive_systemd_quoting(tmp_path: Path) -> None:
    argv = serve_argv()
    assert argv[5] == "--served-model-name"
    odd_argv = (*argv[:6], ODD_NAME, *argv[7:], "--override-generation-config", '{"temperature": 0.5}', ";")
    spec = single_spec(replicas=(ReplicaSpec(odd_argv, port=8000),), vllm_env={"VLLM_ODD": ODD_VALUE})
    write_node_root(tmp_path, spec)
    lines = dump_lines(tmp_path, "vllm.service")
    (exec_start,) = parsed_commands(lines, "ExecStart")
    expected = [
        "/opt/vllm/venv/bin/vllm",
        *odd_argv[1:],
        "--config",
        "/run/credentials/vllm.service/vllm-api-keys.yaml",
    ]
    assert exec_start == expected
    assert parsed_environment(lines)["VLLM_ODD"] == ODD_VALUE


def test_multi_node_units_parse_as_intended(rendered_roots: dict) -> None:
    root, _ = rendered_roots["multi"]
    spec = multi_spec()
    vllm = dump_lines(root, "vllm.service")
    (pre,) = parsed_commands(vllm, "ExecStartPre")
    assert pre == [
        "/opt/vllm/venv/bin/python3", f"/{LIBEXEC}/wait-ray-gpus",
        f"--gpus={spec.total_gpus}", f"--nodes={spec.nodes}",
        f"--timeout={spec.gang_discovery.ray_wait_timeout_s}",
    ]  # fmt: skip
    (head,) = parsed_commands(dump_lines(root, "ray-head.service"), "ExecStart")
    assert head[:4] == ["/opt/vllm/venv/bin/ray", "start", "--block", "--head"]
    assert "--num-gpus=8" in head and head[-1] == "--node-ip-address=${NODE_IP}"
    (worker,) = parsed_commands(dump_lines(root, "ray-worker.service"), "ExecStart")
    assert "--address=${HEAD_IP}:6379" in worker and "--head" not in worker


def test_two_replicas_get_their_own_units_ports_and_gpus(rendered_roots: dict) -> None:
    root, units = rendered_roots["two-replicas"]
    assert {"vllm-0.service", "vllm-1.service"} <= set(units) and "vllm.service" not in units
    for index, gpus in ((0, "0,1,2,3"), (1, "4,5,6,7")):
        lines = dump_lines(root, f"vllm-{index}.service")
        assert parsed_environment(lines)["CUDA_VISIBLE_DEVICES"] == gpus
        (argv,) = parsed_commands(lines, "ExecStart")
        assert argv[argv.index("--port") + 1] == str(8000 + index)
        assert argv[-1] == f"/run/credentials/vllm-{index}.service/vllm-api-keys.yaml"
    target = (root / UNIT_DIR / "vllm-fleet.target").read_text()
    assert "vllm-0.service vllm-1.service" in target


def test_sysusers_and_tmpfiles_apply_to_a_root(rendered_roots: dict, tmp_path: Path) -> None:
    """systemd-sysusers creates the user, systemd-tmpfiles the writable dirs it owns."""
    rendered, _ = rendered_roots["single"]
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for rel in ("etc/sysusers.d/vllm-fleet.conf", "etc/tmpfiles.d/vllm-fleet.conf"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rendered / rel, root / rel)
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True, timeout=30)
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("vllm:")).split(":")
    assert entry[5] == "/var/cache/vllm" and entry[6] == "/usr/sbin/nologin"
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create"], check=True, capture_output=True, timeout=30
    )
    for rel in (
        "var/cache/vllm",
        "var/cache/vllm/huggingface",
        "var/cache/vllm/models",
        "var/cache/vllm/ray",
    ):
        st = (root / rel).stat()
        assert st.st_uid == int(entry[2]) and stat.S_IMODE(st.st_mode) == 0o750, rel


# --- cloud-init, shell, python --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_user_data_is_valid_cloud_config_carrying_every_file(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]()
    user_data = render_user_data(spec)
    path = tmp_path / "user-data"
    path.write_text(user_data)
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout
    doc = yaml.safe_load(user_data)
    files = {f["path"].lstrip("/"): f for f in doc["write_files"]}
    rendered = render_node(spec)
    assert set(files) == set(rendered)
    for rel, content in rendered.items():
        assert files[rel]["content"] == content, rel
        assert files[rel]["permissions"] == file_mode(rel)
    assert ["systemctl", "start", "--no-block", "vllm-fleet.target"] in doc["runcmd"]


def test_cloud_init_schema_rejects_a_broken_user_data(tmp_path: Path) -> None:
    """The schema check can fail: a string where a list belongs is an error."""
    path = tmp_path / "user-data"
    path.write_text(render_user_data(single_spec()).replace("runcmd:\n", "runcmd: nonsense\nx:\n"))
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


@pytest.mark.parametrize("name", sorted(SPECS))
def test_launch_template_user_data_is_gzip_under_the_ec2_limit(name: str) -> None:
    spec = SPECS[name]()
    encoded = encode_user_data(render_user_data(spec), what=name)
    packed = base64.b64decode(encoded)
    print(f"\n[{name}] user-data {len(render_user_data(spec))} bytes, {len(packed)} gzipped")
    assert len(packed) <= 16 * 1024
    assert gzip.decompress(packed).decode() == render_user_data(spec)
    assert decode_user_data(encoded) == render_user_data(spec)
    assert encode_user_data(render_user_data(spec), what=name) == encoded  # byte-stable: no spurious Pulumi diff


@pytest.mark.parametrize("name", ["single", "multi"])
def test_shell_scripts_pass_shellcheck(name: str, rendered_roots: dict) -> None:
    root, _ = rendered_roots[name]
    scripts = [p for p in (root / LIBEXEC).iterdir() if p.read_text().startswith("#!/bin/bash")]
    assert len(scripts) == (3 if name == "multi" else 2)
    result = subprocess.run(
        ["shellcheck", "--shell=bash", *map(str, scripts)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", ["single", "multi"])
def test_python_helpers_pass_ruff(name: str, rendered_roots: dict) -> None:
    root, _ = rendered_roots[name]
    scripts = [p for p in (root / LIBEXEC).iterdir() if "python3" in p.read_text().splitlines()[0]]
    assert len(scripts) == (2 if name == "multi" else 1)
    result = subprocess.run(
        [
            str(VENV_BIN / "ruff"),
            "check",
            "--no-cache",
            "--select",
            "E,F,W,B",
            "--line-length",
            "110",
            *map(str, scripts),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


# --- snapshots ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_snapshots(name: str, snapshot: SnapshotAssertion) -> None:
    """Rendered bytes are reviewed in git (tests/__snapshots__/test_node_render/), one file each;
    regenerate deliberately with --snapshot-update."""
    spec = SPECS[name]()
    for rel, content in {**render_node(spec), "user-data": render_user_data(spec)}.items():
        assert content == text_file(snapshot, rel)
    assert render_node(spec) == render_node(SPECS[name]())  # deterministic


# --- the key never enters a spec or a rendered file -----------------------------------------

# Keys with characters that YAML, argparse and the shell would all like to interpret.
PLAIN_KEY = "sk-fleet-A1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv"
NEW_KEY = 'k3y:with#yaml&*chars"and\\back$lash%'
OLD_KEY = "old-Key_0123456789abcdef+/="


KEY_FLAGS = ["--api-key", "--api_key", "--api-key=sk-live-123", "--api-k", "--api-ke"]


@pytest.mark.parametrize("flag", KEY_FLAGS)
def test_a_serve_argv_carrying_the_key_is_refused(flag: str) -> None:
    argv = (*serve_argv(), flag, "sk-live-1234567890abcdef")
    with pytest.raises(FleetError, match="API key never goes on the command line"):
        ReplicaSpec(argv, port=8000)


@pytest.mark.parametrize("name", ["VLLM_API_KEY", "HF_TOKEN", "OPENAI_API_KEY", "MY_SECRET", "DB_PASSWORD"])
def test_an_environment_carrying_a_secret_is_refused(name: str) -> None:
    with pytest.raises(FleetError, match=name):
        single_spec(vllm_env={name: "sk-live-1234567890abcdef"})


def _argv_with(*tokens: str) -> tuple[str, ...]:
    return (*serve_argv(), *tokens)


BAD_SPECS = {
    "config flag": (
        lambda: single_spec(replicas=(ReplicaSpec(_argv_with("--config", "x.yaml"), 8000),)),
        "--config",
    ),
    "port mismatch": (lambda: single_spec(replicas=(ReplicaSpec(serve_argv(8001), 8000),)), "--port"),
    "read-only download dir": (
        lambda: single_spec(
            replicas=(ReplicaSpec(tuple(a.replace("/var/cache/vllm", "/opt") for a in serve_argv()), 8000),)
        ),
        "--download-dir",
    ),
    "system dir": (lambda: single_spec(hf_home="/etc/hf"), "may not write under"),
    "relative dir": (lambda: single_spec(hf_home="relative/path"), "absolute path"),
    "renderer env": (lambda: single_spec(vllm_env={"HF_HOME": "/x"}), "set by the node renderer"),
    "newline in env": (lambda: single_spec(vllm_env={"A": "line\nbreak"}), "control character"),
    "region": (lambda: single_spec(region="mars-1"), "region"),
    "two replicas in a gang": (
        lambda: single_spec(
            nodes=2, replicas=(ReplicaSpec(serve_argv(), 8000), ReplicaSpec(serve_argv(8001), 8001))
        ),
        "gang",
    ),
    "gpu out of range": (
        lambda: single_spec(gpus_per_node=1, replicas=(ReplicaSpec(serve_argv(), 8000, gpu_indices=(1,)),)),
        "GPUs",
    ),
    "root user": (lambda: single_spec(service_user="root"), "non-root"),
    "endpoint": (lambda: single_spec(aws_endpoint_url="file:///etc/passwd"), "aws_endpoint_url"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_fail_with_one_line(case: str) -> None:
    make, message = BAD_SPECS[case]
    with pytest.raises(FleetError, match=re.escape(message)) as caught:
        make()
    assert "\n" not in str(caught.value)


KNOWN_REVISION = "0e9e39f249a16976918f6564b8830bc894c89659"


def secret_shaped(text: str) -> set[str]:
    """Long runs of token characters that mix letters and digits: what API keys look like."""
    runs = re.findall(r"[A-Za-z0-9+/_-]{24,}", text)
    return {
        r
        for r in runs
        if sum(c.isdigit() for c in r) >= 3 and sum(c.isalpha() for c in r) >= 3 and r != KNOWN_REVISION
    }


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_files_hold_no_key(name: str) -> None:
    spec = SPECS[name]()
    rendered = {**render_node(spec), "user-data": render_user_data(spec)}
    for rel, content in rendered.items():
        assert "VLLM_API_KEY=" not in content, rel
        commands = [line for line in content.splitlines() if line.startswith("Exec")]
        assert not any(re.search(r"--api[-_]k", c) for c in commands), rel
        assert not secret_shaped(content), f"{rel}: {secret_shaped(content)}"
    # The scan finds a key when there is one.
    assert secret_shaped(rendered["user-data"] + f"\nVLLM_X={PLAIN_KEY}\n") == {PLAIN_KEY}


# --- fetch-api-key against moto -------------------------------------------------------------


AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def aws_client(service: str, endpoint: str):  # boto3 clients are untyped
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def install_scripts(spec: NodeSpec, directory: Path) -> Path:
    """The rendered helper scripts, executable, in ``directory`` (stands in for libexec)."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, content in render_node(spec).items():
        if rel.startswith(LIBEXEC + "/"):
            path = directory / Path(rel).name
            path.write_text(content)
            path.chmod(0o755)
    return directory


def run_fetch(
    spec: NodeSpec, tmp_path: Path, *, attempts: int = 3
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run fetch-api-key under strace; return the run and every execve (argv and env) it made."""
    libexec = install_scripts(spec, tmp_path / "libexec")
    run_dir = tmp_path / "run"
    trace = tmp_path / "execve.trace"
    env = {
        **AWS_TEST_ENV,
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "VLLM_FLEET_RUN_DIR": str(run_dir),
        "VLLM_FLEET_LIBEXEC": str(libexec),
        "VLLM_FLEET_FETCH_ATTEMPTS": str(attempts),
        "VLLM_FLEET_FETCH_FIRST_DELAY_S": "0",
    }
    result = subprocess.run(
        ["strace", "-f", "-qq", "-v", "-e", "trace=execve", "-s", "100000", "-o", str(trace),
         str(libexec / "fetch-api-key")],
        check=False, capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    return result, trace.read_text()


def put_secret(endpoint: str, secret_id: str, value: str) -> None:
    client = aws_client("secretsmanager", endpoint)
    try:
        client.create_secret(Name=secret_id, SecretString=value)
    except client.exceptions.ResourceExistsException:
        client.put_secret_value(SecretId=secret_id, SecretString=value)


def test_fetch_writes_a_root_only_file_and_the_key_never_shows(moto_endpoint: str, tmp_path: Path) -> None:
    spec = single_spec(aws_endpoint_url=moto_endpoint, api_key_secret_id="vllm-fleet/fetch-plain/api-key")
    put_secret(moto_endpoint, spec.api_key_secret_id, PLAIN_KEY)
    result, trace = run_fetch(spec, tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "run" / "api-keys.yaml"
    assert yaml.safe_load(written.read_text()) == {"api-key": [PLAIN_KEY]}
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["api-keys.yaml"]  # no temp left
    assert PLAIN_KEY not in result.stdout + result.stderr
    # strace -v: every execve with its full argv and environment; the AWS CLI ran, the key
    # is in none of them.
    assert "secretsmanager" in trace and "get-secret-value" in trace
    assert PLAIN_KEY not in trace


def test_fetch_takes_both_keys_during_a_rotation_and_vllm_parses_them(
    moto_endpoint: str, tmp_path: Path, rendered_roots: dict
) -> None:
    spec = single_spec(aws_endpoint_url=moto_endpoint, api_key_secret_id="vllm-fleet/fetch-rotation/api-key")
    put_secret(moto_endpoint, spec.api_key_secret_id, json.dumps({"keys": [NEW_KEY, OLD_KEY]}))
    result, trace = run_fetch(spec, tmp_path)
    assert result.returncode == 0, result.stderr
    credential = tmp_path / "run" / "api-keys.yaml"
    assert yaml.safe_load(credential.read_text()) == {"api-key": [NEW_KEY, OLD_KEY]}
    for key in (NEW_KEY, OLD_KEY):
        assert key not in result.stdout + result.stderr and key not in trace

    # The rendered ExecStart, as systemd parsed it, with the credential where systemd puts it:
    # the pinned vLLM's parser reads --config and ends up with both keys.
    from infra.plan.node.vllm_cli import serve_parser

    root, _ = rendered_roots["single"]
    (argv,) = parsed_commands(dump_lines(root, "vllm.service"), "ExecStart")
    assert argv[-2:] == ["--config", "/run/credentials/vllm.service/vllm-api-keys.yaml"]
    # vLLM insists on a .yaml name; systemd keeps the credential's name.
    staged = tmp_path / "credentials" / "vllm-api-keys.yaml"
    staged.parent.mkdir()
    shutil.copy(credential, staged)
    namespace = serve_parser().top.parse_args([*argv[1:-1], str(staged)])
    assert namespace.api_key == [NEW_KEY, OLD_KEY]
    assert namespace.model_tag == MODEL and namespace.port == 8000


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        (json.dumps({"keys": []}), "at least one key"),
        (json.dumps({"key": "x" * 20}), "exactly"),
        ("short", "at least 16"),
        ("has a space in it, long enough", "visible ASCII"),
        ("-starts-with-a-dash-0123456789", "must not start with '-'"),
    ],
)
def test_fetch_refuses_a_malformed_secret_without_echoing_it(
    moto_endpoint: str, tmp_path: Path, secret: str, complaint: str
) -> None:
    secret_id = f"vllm-fleet/bad-{hashlib.sha256(secret.encode()).hexdigest()[:12]}/api-key"
    spec = single_spec(aws_endpoint_url=moto_endpoint, api_key_secret_id=secret_id)
    put_secret(moto_endpoint, secret_id, secret)
    result, _ = run_fetch(spec, tmp_path, attempts=1)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "api-keys.yaml").exists()
    assert list((tmp_path / "run").iterdir()) == []


def test_fetch_retries_then_gives_up_on_a_missing_secret(moto_endpoint: str, tmp_path: Path) -> None:
    spec = single_spec(aws_endpoint_url=moto_endpoint, api_key_secret_id="vllm-fleet/never-created/api-key")
    result, _ = run_fetch(spec, tmp_path, attempts=3)
    assert result.returncode == 1
    assert result.stderr.count("failed; retrying") == 2
    assert "giving up on secret vllm-fleet/never-created/api-key after 3 attempts" in result.stderr
    assert "ResourceNotFoundException" in result.stderr
    assert list((tmp_path / "run").iterdir()) == []


# --- gang-discover: Auto Scaling membership through moto, metadata from a local IMDS ---------


class FakeImds(http.server.ThreadingHTTPServer):
    """Instance metadata (IMDSv2) for one instance: token, instance-id, its ASG tag."""

    def __init__(self, instance_id: str, group: str) -> None:
        self.instance_id, self.group, self.token = instance_id, group, "imds-session-token"
        super().__init__(("127.0.0.1", 0), _ImdsHandler)


class _ImdsHandler(http.server.BaseHTTPRequestHandler):
    server: FakeImds

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(200, self.server.token)
        else:
            self._reply(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self._reply(401, "")
        answers = {
            "/latest/meta-data/instance-id": self.server.instance_id,
            "/latest/meta-data/tags/instance/aws:autoscaling:groupName": self.server.group,
        }
        return self._reply(200, answers[self.path]) if self.path in answers else self._reply(404, "")


def run_gang_discover(
    spec: NodeSpec, tmp_path: Path, *, imds: FakeImds | None = None, override: str | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    libexec = install_scripts(spec, tmp_path / "libexec")
    run_dir = tmp_path / "run"
    override_file = tmp_path / "gang.env"
    if override is not None:
        override_file.write_text(override)
    env = {
        **AWS_TEST_ENV,
        "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        "VLLM_FLEET_RUN_DIR": str(run_dir),
        "VLLM_FLEET_GANG_OVERRIDE": str(override_file),
        "VLLM_FLEET_IMDS": f"http://127.0.0.1:{imds.server_address[1]}" if imds else "http://127.0.0.1:9",
    }
    thread = None
    if imds:
        thread = threading.Thread(target=imds.serve_forever, daemon=True)
        thread.start()
    try:
        result = subprocess.run(
            [str(libexec / "gang-discover")],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        if imds:
            imds.shutdown()
            imds.server_close()
    files = {p.name: p.read_text() for p in run_dir.iterdir()} if run_dir.exists() else {}
    return result, files


def env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def make_gang(endpoint: str, name: str, size: int) -> dict[str, str]:
    """An Auto Scaling group of ``size`` instances in moto; instance id → private IP."""
    ec2, autoscaling = aws_client("ec2", endpoint), aws_client("autoscaling", endpoint)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName=f"{name}-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "p5.48xlarge"}
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": f"{name}-lt"},
        MinSize=size,
        MaxSize=size,
        DesiredCapacity=size,
        AvailabilityZones=[f"{REGION}a"],
    )
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    ids = [i["InstanceId"] for i in group["Instances"]]
    reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["PrivateIpAddress"] for r in reservations for i in r["Instances"]}


def test_gang_members_agree_on_the_lowest_instance_id_as_head(moto_endpoint: str, tmp_path: Path) -> None:
    members = make_gang(moto_endpoint, "demo-gang-a", 3)
    spec = multi_spec(nodes=3, aws_endpoint_url=moto_endpoint)
    head_id = min(members)
    for instance_id in sorted(members):
        result, files = run_gang_discover(
            spec, tmp_path / instance_id, imds=FakeImds(instance_id, "demo-gang-a")
        )
        assert result.returncode == 0, result.stderr
        gang = env_file(files["gang.env"])
        role = "head" if instance_id == head_id else "worker"
        assert gang["ROLE"] == role and f"role.{role}" in files and files[f"role.{role}"] == ""
        assert gang["HEAD_IP"] == members[head_id]
        assert env_file(files["ray-client.env"]) == {"RAY_ADDRESS": f"{members[head_id]}:6379"}
        # This host's default route gives the interface and address NCCL, Gloo and vLLM use.
        assert gang["NCCL_SOCKET_IFNAME"] == gang["GLOO_SOCKET_IFNAME"] != ""
        assert gang["VLLM_HOST_IP"] == gang["NODE_IP"]


def test_gang_discovery_times_out_while_members_are_missing(moto_endpoint: str, tmp_path: Path) -> None:
    members = make_gang(moto_endpoint, "demo-gang-short", 1)
    spec = multi_spec(
        aws_endpoint_url=moto_endpoint,
        gang_discovery=GangDiscovery(members_timeout_s=2, poll_interval_s=1),
    )
    (instance_id,) = members
    result, files = run_gang_discover(spec, tmp_path, imds=FakeImds(instance_id, "demo-gang-short"))
    assert result.returncode == 1
    assert "has 1 of 2 members" in result.stderr
    assert "gang.env" not in files


@pytest.mark.parametrize(
    ("override", "ok", "expect"),
    [
        ("ROLE=worker\nHEAD_IP=10.1.2.3\n", True, {"ROLE": "worker", "HEAD_IP": "10.1.2.3"}),
        (
            "ROLE=head\nNODE_IP=10.9.9.9\nIFACE=lo\n",
            True,
            {"ROLE": "head", "HEAD_IP": "10.9.9.9", "NCCL_SOCKET_IFNAME": "lo"},
        ),
        ("ROLE=worker\n", False, "no valid head address"),
        ("ROLE=leader\n", False, "ROLE must be head or worker"),
        ("ROLE=head\nPATH=/evil\n", False, "unknown key 'PATH'"),
    ],
)
def test_gang_override_file_for_tests_without_aws(
    tmp_path: Path, override: str, ok: bool, expect: object
) -> None:
    result, files = run_gang_discover(multi_spec(), tmp_path, override=override)
    if ok:
        assert result.returncode == 0, result.stderr
        gang = env_file(files["gang.env"])
        assert isinstance(expect, dict) and expect.items() <= gang.items()
    else:
        assert result.returncode == 1 and isinstance(expect, str) and expect in result.stderr


# --- the Ray units and wait-ray-gpus against a real local Ray --------------------------------


def unit_exec(root: Path, unit: str, env_files: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A unit's ExecStart argv and environment as systemd would run them.

    The parse is systemd's own (the verify dump); "${VAR}" comes from the unit's
    EnvironmentFile= (here: the files gang-discover wrote), as systemd expands it at exec time.
    """
    lines = dump_lines(root, unit)
    (argv,) = parsed_commands(lines, "ExecStart")
    env = {**parsed_environment(lines), **env_files}
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in argv], env


def start_detached(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_ray(process: subprocess.Popen[bytes], marker: str) -> None:
    """Kill a `ray start --block` we started, and every Ray process of its temp dir."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if marker in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def test_ray_units_form_a_gang_and_wait_ray_gpus_sees_every_gpu(tmp_path: Path) -> None:
    # Short paths: Ray's Unix sockets live under the temp dir (108-byte limit).
    short = Path(tempfile.mkdtemp(prefix="vf-", dir="/tmp"))
    port = free_port()
    gang = GangDiscovery(ray_wait_timeout_s=8)
    dirs = {key: str(short / "cache") for key in ("home_dir", "vllm_cache_root")}
    dirs.update(hf_home=str(short / "cache/hf"), torchinductor_cache_dir=str(short / "cache/ti"))
    dirs.update(triton_cache_dir=str(short / "cache/tr"), download_dir=str(short / "cache/models"))
    argv = tuple(
        a if a != "/var/cache/vllm/models" else dirs["download_dir"]
        for a in multi_spec().replicas[0].serve_argv
    )
    head_spec = multi_spec(
        venv=str(VENV_BIN.parent), gpus_per_node=2, ray_port=port, gang_discovery=gang, start_timeout_s=60,
        ray_temp_dir=str(short / "head"), replicas=(ReplicaSpec(argv, 8000),), **dirs,
    )  # fmt: skip
    # The second "node" runs on this same host, so it needs its own Ray temp dir.
    worker_spec = dataclasses.replace(head_spec, ray_temp_dir=str(short / "worker"))
    for path in head_spec.writable_dirs:  # systemd-tmpfiles makes them on a node
        Path(path).mkdir(parents=True, exist_ok=True)
    head_root, worker_root = tmp_path / "head-root", tmp_path / "worker-root"
    write_node_root(head_root, head_spec)
    write_node_root(worker_root, worker_spec)
    for root in (head_root, worker_root):  # verify resolves ExecStart= inside the root
        target = root / str(VENV_BIN.parent).lstrip("/") / "bin"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("ray", "python3", "vllm"):
            (target / name).write_text("#!/bin/sh\n")
            (target / name).chmod(0o755)

    result, head_files = run_gang_discover(head_spec, tmp_path / "gang-head", override="ROLE=head\n")
    assert result.returncode == 0, result.stderr
    head_env = env_file(head_files["gang.env"])
    result, worker_files = run_gang_discover(
        worker_spec, tmp_path / "gang-worker", override=f"ROLE=worker\nHEAD_IP={head_env['HEAD_IP']}\n"
    )
    assert result.returncode == 0, result.stderr

    base_env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    head_argv, head_unit_env = unit_exec(head_root, "ray-head.service", head_env)
    worker_argv, worker_unit_env = unit_exec(
        worker_root, "ray-worker.service", env_file(worker_files["gang.env"])
    )
    assert head_argv[0] == str(VENV_BIN / "ray") and f"--port={port}" in head_argv
    assert f"--address={head_env['HEAD_IP']}:{port}" in worker_argv

    libexec = install_scripts(head_spec, tmp_path / "libexec")
    (wait_argv,) = parsed_commands(dump_lines(head_root, "vllm.service"), "ExecStartPre")
    wait_argv = [wait_argv[0], str(libexec / "wait-ray-gpus"), *wait_argv[2:]]
    wait_env = {**base_env, **env_file(head_files["ray-client.env"])}
    assert wait_env["RAY_ADDRESS"] == f"{head_env['HEAD_IP']}:{port}"

    head = start_detached(head_argv, {**base_env, **head_unit_env}, tmp_path / "ray-head.log")
    worker = None
    try:
        # Head alone: 2 of the gang's 4 GPUs, so the wait gives up after its timeout.
        alone = subprocess.run(
            wait_argv, check=False, capture_output=True, text=True, env=wait_env, timeout=120
        )
        assert alone.returncode == 1, alone.stdout + alone.stderr + (tmp_path / "ray-head.log").read_text()
        assert "gave up after 8s with 2 of 4 GPUs" in alone.stderr
        worker = start_detached(worker_argv, {**base_env, **worker_unit_env}, tmp_path / "ray-worker.log")
        joined = subprocess.run(
            wait_argv, check=False, capture_output=True, text=True, env=wait_env, timeout=120
        )
        assert joined.returncode == 0, (
            joined.stdout + joined.stderr + (tmp_path / "ray-worker.log").read_text()
        )
        assert "4 of 4 GPUs in the Ray cluster" in joined.stdout
    finally:
        if worker is not None:
            stop_ray(worker, str(short / "worker"))
        stop_ray(head, str(short / "head"))
        shutil.rmtree(short, ignore_errors=True)
