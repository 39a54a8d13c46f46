"""The image-build stack (stacks/Pulumi.images.yaml): its config kind, its Pulumi program under
mocks in both preview modes (infra/preview/offline.py: a fresh event loop and isolated Pulumi settings per
run), `vllm-fleet plan images` as a subprocess, how fleets consume what it publishes, and the
EBS volume initialization rate of fleets whose weights come lazily from the image's snapshot.
"""

from __future__ import annotations

import copy
import json
import re
import runpy
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import (
    PROJECT,
    STACKS_DIR,
    ImagesStackConfig,
    StackConfig,
    load_any_stack_file,
    load_stack_file,
    parse_any_stack_config,
    stack_names,
)
from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.facts.images import default_pin
from infra.plan.build import build_stack_plan
from infra.plan.capacity import volume_initialization_rate_mib_s
from infra.plan.images import COMPONENTS_DIR, ami_ssm_parameter_name, base_image_ssm_parameter, plan_bake
from infra.preview import offline
from infra.preview.offline import MOCK_AMI_ROOT_GIB, OfflineMocks, OfflineRun, ResourceRecord, run_offline
from infra.program.images import BUILD_EGRESS_PORTS, checked_image_plan
from infra.program.stack import deploy

ROOT = Path(__file__).resolve().parent.parent
STACK = "images"
STACK_FILE = STACKS_DIR / f"Pulumi.{STACK}.yaml"
MAIN = ROOT / "infra" / "program" / "__main__.py"

IB = "aws:imagebuilder"
COMPONENT = f"{IB}/component:Component"
RECIPE = f"{IB}/imageRecipe:ImageRecipe"
INFRASTRUCTURE = f"{IB}/infrastructureConfiguration:InfrastructureConfiguration"
DISTRIBUTION = f"{IB}/distributionConfiguration:DistributionConfiguration"
PIPELINE = f"{IB}/imagePipeline:ImagePipeline"
IMAGE = f"{IB}/image:Image"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SUBNET = "aws:ec2/subnet:Subnet"
NAT = "aws:ec2/natGateway:NatGateway"
VPC = "aws:ec2/vpc:Vpc"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
GET_AMI = "aws:ec2/getAmi:getAmi"


def file_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(STACK_FILE.read_text())["config"]
    return copy.deepcopy(values)


def images_config(values: dict[str, Any] | None = None) -> ImagesStackConfig:
    config = parse_any_stack_config(STACK, file_values() if values is None else values)
    assert isinstance(config, ImagesStackConfig)
    return config


def with_bake(**changes: Any) -> ImagesStackConfig:
    config = images_config()
    return config.model_copy(update={"bake": config.bake.model_copy(update=changes)})


@cache
def images_run(preview: bool) -> OfflineRun:
    return offline.run_stack(images_config(), preview=preview)


def of_type(run: OfflineRun, type_token: str) -> list[ResourceRecord]:
    return sorted((r for r in run.records if r.type == type_token), key=lambda r: r.name)


def the(run: OfflineRun, type_token: str) -> ResourceRecord:
    found = of_type(run, type_token)
    assert len(found) == 1, f"{len(found)} × {type_token}"
    return found[0]


# --- the stack file and its config kind ---------------------------------------------------------
def test_the_images_stack_file_parses_as_an_image_build_stack() -> None:
    config = load_any_stack_file(STACK)
    assert isinstance(config, ImagesStackConfig)
    assert config.stack == STACK and config.region == "us-east-1"
    bake = config.bake
    assert (bake.name, bake.base_image, bake.build_instance_type) == ("vllm-0-32-0", "ubuntu-24.04", "g6e.xlarge")
    assert bake.weights is None and not bake.prewarm.enabled and not bake.multi_node
    assert bake.build_on_deploy is True and bake.schedule is None
    assert config.network.mode == "new" and config.tags == {"team": "ml-platform"}
    # Stack kinds are told apart by their keys; fleet commands refuse an images stack in one line.
    assert stack_names("images") == [STACK]
    assert STACK not in stack_names("fleet") and "dev-8b" in stack_names("fleet")
    assert all(isinstance(load_any_stack_file(s), StackConfig) for s in stack_names("fleet"))
    with pytest.raises(FleetError) as err:
        load_stack_file(STACK)
    assert str(err.value).startswith(f"{PROJECT}:bake: stack 'images' is an image-build stack")
    assert "\n" not in str(err.value)


def test_the_image_is_named_for_the_vllm_pin() -> None:
    # A pin bump therefore publishes under a new parameter, and fleets switch to it explicitly.
    pin = default_pin()
    assert images_config().bake.name == "vllm-" + pin.version.replace(".", "-")
    plan = plan_bake(images_config())
    assert (plan.pin.version, plan.pin.gpu_package) == (pin.version, pin.gpu_package)
    assert [c.key for c in plan.components] == ["vllm-runtime", "exporters"]
    assert plan.ami_ssm_parameter_name == "/vllm-fleet/images/vllm-0-32-0/ami-id"
    assert plan.base_image_ssm_parameter == base_image_ssm_parameter("ubuntu-24.04")


def test_the_commented_weights_variant_is_a_valid_bake() -> None:
    lines = STACK_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "# Variant" in line)
    variant: list[str] = []
    for line in lines[start + 1 :]:
        match = re.match(r"^    #   (.*)$", line)
        if match is None and variant:
            break
        if match is not None:
            variant.append(match.group(1))
    assert len(variant) > 5, variant
    values = file_values()
    values[f"{PROJECT}:bake"].update(yaml.safe_load("\n".join(variant)))
    config = images_config(values)
    assert config.bake.weights is not None and config.bake.weights.model_name == "llama-3.1-8b"
    plan = plan_bake(config)
    assert [c.key for c in plan.components] == ["vllm-runtime", "exporters", "weights", "prewarm"]
    assert plan.ami_ssm_parameter_name != plan_bake(images_config()).ami_ssm_parameter_name
    # The staged directory is the one a fleet with weightsSource ebs-* serves.
    dev = build_stack_plan(load_stack_file("dev-8b"), validate=False)
    assert config.bake.weights.model_name == dev.plan.request.model_name
    prewarm = next(c for c in plan.components if c.key == "prewarm")
    assert prewarm.parameters["ModelPath"] == "/opt/models/llama-3.1-8b"


# --- bad values: one line naming the key, the value and what is allowed -------------------------
def _bake(values: dict[str, Any]) -> dict[str, Any]:
    bake: dict[str, Any] = values[f"{PROJECT}:bake"]
    return bake


HF = {"source": "huggingface", "repo": "meta-llama/Llama-3.1-8B-Instruct", "modelName": "llama-3.1-8b", "sizeGib": 15}
BAD: dict[str, tuple[Any, list[str]]] = {
    "typo": (lambda v: _bake(v).update(nmae="x"), ["vllm-fleet:bake.nmae: unknown key (did you mean name?"]),
    "name": (lambda v: _bake(v).update(name="VLLM_0"), ['vllm-fleet:bake.name = "VLLM_0"', "pattern"]),
    "base image": (
        lambda v: _bake(v).update(baseImage="ubuntu-20.04"),
        ["vllm-fleet:bake.baseImage: 'ubuntu-20.04' is not one of ubuntu-22.04, ubuntu-24.04"],
    ),
    "build type": (
        lambda v: _bake(v).update(buildInstanceType="m5.large"),
        ["vllm-fleet:bake.buildInstanceType: 'm5.large'", "g6e"],
    ),
    "weights source": (
        lambda v: _bake(v).update(weights={**HF, "source": "gcs"}),
        ['vllm-fleet:bake.weights.source = "gcs"', "'s3' or 'huggingface'"],
    ),
    "hf without revision": (
        lambda v: _bake(v).update(weights=HF),
        ["vllm-fleet:bake.weights: source huggingface needs revision, the repo's 40-hex commit sha"],
    ),
    "hf branch": (
        lambda v: _bake(v).update(weights={**HF, "revision": "main"}),
        ['vllm-fleet:bake.weights.revision = "main"', "[0-9a-f]{40}"],
    ),
    "s3 with repo": (
        lambda v: _bake(v).update(weights={**HF, "source": "s3", "uri": "s3://bucket/w/"}),
        ["vllm-fleet:bake.weights: source s3 takes uri"],
    ),
    "s3 uri": (
        lambda v: _bake(v).update(weights={"source": "s3", "uri": "https://bucket/w", "modelName": "m", "sizeGib": 1}),
        ['vllm-fleet:bake.weights.uri = "https://bucket/w"'],
    ),
    "schedule": (lambda v: _bake(v).update(schedule="rate(7 days)"), ['vllm-fleet:bake.schedule = "rate(7 days)"']),
    "prewarm off with args": (
        lambda v: _bake(v).update(prewarm={"serveArgs": ["--max-model-len", "8192"]}),
        ["vllm-fleet:bake.prewarm: serveArgs and modelPath apply only with enabled: true"],
    ),
    "prewarm without weights": (
        lambda v: _bake(v).update(prewarm={"enabled": True}),
        ["vllm-fleet:bake.prewarm.modelPath: required when the image stages no weights"],
    ),
    "prewarm sets the port": (
        lambda v: _bake(v).update(prewarm={"enabled": True, "modelPath": "/opt/m", "serveArgs": ["--port=9000"]}),
        ["vllm-fleet:bake.prewarm.serveArgs[0]: '--port=9000' is set by the bake itself"],
    ),
    "model in an images stack": (
        lambda v: v.update({"vllm-fleet:model": {"catalog": "llama-3.1-8b"}}),
        ["vllm-fleet:model: unknown key (allowed: stack, region, bake, network, tags)"],
    ),
    "no internet": (
        lambda v: v[f"{PROJECT}:network"].update(egress="endpoints-only"),
        ['vllm-fleet:network.egress = "endpoints-only": the bake installs vLLM from PyPI'],
    ),
    "zones": (
        lambda v: v[f"{PROJECT}:network"].update(availabilityZones=3),
        ["vllm-fleet:network.availabilityZones: an image build runs one instance in one subnet"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bake_values_fail_with_one_line(case: str) -> None:
    mutate, expected = BAD[case]
    values = file_values()
    mutate(values)
    with pytest.raises(FleetError) as err:
        # What `plan` and `pulumi up` both run before declaring anything.
        checked_image_plan(images_config(values))
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in expected:
        assert fragment in message, message


def test_a_bad_bake_declares_nothing() -> None:
    config = images_config().model_copy(
        update={"network": images_config().network.model_copy(update={"egress": "endpoints-only"})}
    )
    mocks = OfflineMocks(region="us-east-1", preview=True)
    from infra.program.images import deploy_images

    with pytest.raises(FleetError):
        run_offline(lambda: deploy_images(config), project=PROJECT, stack=STACK, mocks=mocks, preview=True)
    assert mocks.invokes == []


# --- the program under mocks: what `pulumi up --stack images` creates ----------------------------
@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
def test_images_stack_declares_the_image_builder_pipeline(preview: bool) -> None:
    run = images_run(preview)
    config = images_config()
    plan = plan_bake(config)
    published = ami_ssm_parameter_name(config.bake.name)

    components = {r.urn: r for r in run.records if not r.custom}
    assert sorted(r.type for r in components.values()) == [
        "vllm-fleet:images:BuildNetwork",
        "vllm-fleet:images:VllmImage",
        "vllm-fleet:network:Network",
        "vllm-fleet:storage:PrivateBucket",
    ]
    for record in run.records:
        if record.custom:
            assert record.parent_urn in components, f"{record.type} {record.name} is outside every component"
        if "tags" in record.inputs:  # the stack file's tags and the stack tag, on everything taggable
            assert record.inputs["tags"]["vllm-fleet:stack"] == STACK, record.name
            assert record.inputs["tags"]["team"] == "ml-platform", record.name

    # One Image Builder component per planned document, exactly as planned.
    built = {r.name: r.inputs for r in of_type(run, COMPONENT)}
    assert {name: c["version"] for name, c in built.items()} == {
        f"image-{c.key}": c.version for c in plan.components
    }
    for c in plan.components:
        assert built[f"image-{c.key}"]["data"] == (COMPONENTS_DIR / f"{c.key}.yaml").read_text()

    recipe = the(run, RECIPE).inputs
    assert recipe["parentImage"] == plan.parent_image
    [root] = recipe["blockDeviceMappings"]
    # Sized from the (mocked) base AMI's root snapshot plus what the bake adds.
    assert root["ebs"]["volumeSize"] == MOCK_AMI_ROOT_GIB + plan.extra_root_gib
    assert root["ebs"]["encrypted"] == "true"

    network = the(run, "vllm-fleet:images:BuildNetwork")
    build_sg = next(r for r in of_type(run, SECURITY_GROUP) if r.parent_urn == network.urn)
    assert build_sg.inputs.get("ingress") in (None, [])
    assert sorted((e["fromPort"], e["toPort"], e["protocol"]) for e in build_sg.inputs["egress"]) == [
        (port, port, "tcp") for port in sorted(BUILD_EGRESS_PORTS)
    ]
    # Smallest network: one zone, one private subnet behind one NAT gateway.
    assert len(of_type(run, VPC)) == 1 and len(of_type(run, NAT)) == 1
    private = [s for s in of_type(run, SUBNET) if s.inputs["tags"]["vllm-fleet:tier"] == "private"]
    assert [s.inputs["availabilityZone"] for s in private] == ["us-east-1a"]

    infrastructure = the(run, INFRASTRUCTURE).inputs
    assert infrastructure["instanceTypes"] == ["g6e.xlarge"]
    assert infrastructure["instanceMetadataOptions"]["httpTokens"] == "required"
    if preview:  # ids of resources not yet created are unknown in a preview
        assert infrastructure["subnetId"] == "[unknown]"
    else:
        assert infrastructure["subnetId"] == mock_id(private[0])
        assert infrastructure["securityGroupIds"] == [mock_id(build_sg)]

    [distribution] = the(run, DISTRIBUTION).inputs["distributions"]
    assert distribution["ssmParameterConfigurations"] == [{"parameterName": published, "dataType": "aws:ec2:image"}]

    pipeline = the(run, PIPELINE).inputs
    assert pipeline["status"] == "ENABLED" and "schedule" not in pipeline
    image = the(run, IMAGE).inputs  # buildOnDeploy: true in the stack file
    for key in ("imageRecipeArn", "infrastructureConfigurationArn", "distributionConfigurationArn"):
        assert image[key] == pipeline[key]

    outputs = run.outputs
    assert outputs["amiSsmParameterName"] == published
    assert outputs["baseImageSsmParameter"] == plan.base_image_ssm_parameter
    assert outputs["vllmVersion"] == plan.pin.version
    assert outputs["componentVersions"] == {c.key: c.version for c in plan.components}
    if preview:
        assert outputs["pipelineArn"] == "[unknown]" and outputs["amiId"] == "[unknown]"
    else:
        assert outputs["pipelineArn"].startswith("arn:aws:imagebuilder:us-east-1:")
        assert "amiId" in outputs


def mock_id(record: ResourceRecord) -> str:
    """The id OfflineMocks gives a created resource: <kind's first 3 letters>-<digest of type, name>."""
    from infra.preview.offline import _digest

    kind = record.type.split(":")[2]
    return f"{kind[:3].lower()}-{_digest(record.type, record.name)}"


@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
def test_without_build_on_deploy_there_is_no_image_build(preview: bool) -> None:
    run = offline.run_stack(with_bake(build_on_deploy=False, schedule="cron(0 6 ? * mon *)"), preview=preview)
    assert of_type(run, IMAGE) == []
    assert "amiId" not in run.outputs
    assert the(run, PIPELINE).inputs["schedule"] == {"scheduleExpression": "cron(0 6 ? * mon *)"}


def test_an_existing_vpc_builds_in_its_first_private_subnet() -> None:
    values = file_values()
    values[f"{PROJECT}:network"] = {
        "mode": "existing",
        "vpcId": "vpc-0123456789abcdef0",
        "privateSubnetIds": ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"],
    }
    run = offline.run_stack(images_config(values), preview=False)
    assert of_type(run, VPC) == [] and of_type(run, NAT) == [] and of_type(run, SUBNET) == []
    assert the(run, INFRASTRUCTURE).inputs["subnetId"] == "subnet-0aaaaaaaaaaaaaaaa"
    build_sg = next(r for r in of_type(run, SECURITY_GROUP) if r.name == "build-network-sg")
    assert build_sg.inputs["vpcId"] == "vpc-0123456789abcdef0"
    assert run.outputs["buildSubnetId"] == "subnet-0aaaaaaaaaaaaaaaa"


def _pulumi_config_env(values: dict[str, Any]) -> str:
    # How the engine hands config to the program: a JSON bag, structured values as JSON strings.
    return json.dumps({k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})


@pytest.mark.parametrize(
    ("stack", "component"),
    [(STACK, "vllm-fleet:images:VllmImage"), ("dev-8b", "vllm-fleet:fleet:Fleet")],
)
def test_the_program_entry_point_dispatches_on_the_stack_kind(
    stack: str, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = yaml.safe_load((STACKS_DIR / f"Pulumi.{stack}.yaml").read_text())["config"]
    monkeypatch.setenv("PULUMI_CONFIG", _pulumi_config_env(values))
    run = run_offline(
        lambda: runpy.run_path(str(MAIN)) and None,
        project=PROJECT,
        stack=stack,
        mocks=OfflineMocks(region="us-east-1", preview=True),
        preview=True,
    )
    kinds = {r.type for r in run.records if not r.custom}
    assert component in kinds
    assert ("vllm-fleet:fleet:Fleet" in kinds) == (stack != STACK)


# --- `vllm-fleet plan images` as users run it -----------------------------------------------------
def test_cli_plan_images_prints_the_image_plan_and_writes_its_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "images"
    run = subprocess.run(
        [sys.executable, "-m", "infra", "plan", STACK, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr
    plan = plan_bake(images_config())
    text = run.stdout
    assert "Stack images: image vllm-0-32-0 in us-east-1" in text
    assert f"vllm=={plan.pin.version}" in text
    assert f"Publishes each new AMI id to SSM {plan.ami_ssm_parameter_name} (aws:ec2:image)" in text
    assert f"Base image parameter: {plan.base_image_ssm_parameter}" in text
    for component in plan.components:
        assert component.key in text and component.version[:10] in text
    assert re.search(r"^vllm-fleet:images:VllmImage \(component\) image$", text, re.MULTILINE)
    assert re.search(rf"^  {re.escape(PIPELINE)} image-pipeline$", text, re.MULTILINE)

    resources = json.loads((out / "resources.json").read_text())
    types = {r["type"] for r in resources}
    assert {COMPONENT, RECIPE, INFRASTRUCTURE, DISTRIBUTION, PIPELINE, IMAGE} <= types
    assert len(resources) == len(images_run(True).records)
    for component in plan.components:
        written = (out / "components" / f"{component.key}.yaml").read_text()
        assert written == (COMPONENTS_DIR / f"{component.key}.yaml").read_text()
    summary = json.loads((out / "image-plan.json").read_text())
    assert summary["publishes_ssm_parameter"] == plan.ami_ssm_parameter_name
    assert summary["base_image"]["ssm_parameter"] == plan.base_image_ssm_parameter

    as_json = subprocess.run(
        [sys.executable, "-m", "infra", "plan", STACK, "--out", str(tmp_path / "j"), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["stack"] == STACK and doc["resources"] == len(resources)
    assert doc["vllm"] == {"version": plan.pin.version, "package": plan.pin.gpu_package}


def test_cli_plan_images_refuses_a_bad_bake_in_one_line(tmp_path: Path) -> None:
    values = file_values()
    _bake(values).update(baseImage="ubuntu-20.04")
    (tmp_path / "Pulumi.images.yaml").write_text(yaml.safe_dump({"config": values}))
    run = subprocess.run(
        [sys.executable, "-m", "infra", "plan", STACK, "--stacks-dir", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "vllm-fleet: error: vllm-fleet:bake.baseImage: 'ubuntu-20.04' is not one of ubuntu-22.04, ubuntu-24.04"
    ]


# --- fleets consume what the images stack publishes -----------------------------------------------
def test_fleet_ssm_parameters_are_ones_an_images_stack_publishes() -> None:
    published = {
        ami_ssm_parameter_name(c.bake.name)
        for c in (load_any_stack_file(s) for s in stack_names("images"))
        if isinstance(c, ImagesStackConfig)
    }
    assert load_stack_file("dev-8b").image.ssm_parameter == "/vllm-fleet/images/vllm-0-32-0/ami-id"
    assert load_stack_file("dev-8b").image.ssm_parameter in published
    for stack in stack_names("fleet"):
        image = load_stack_file(stack).image
        assert image.ssm_parameter is None or image.ssm_parameter in published, stack
        assert image.ssm_parameter or image.ami_id, stack


def test_a_new_bake_reaches_dev_8b_on_its_next_up_as_a_launch_template_diff() -> None:
    published = ami_ssm_parameter_name(images_config().bake.name)
    stack_plan = build_stack_plan(load_stack_file("dev-8b"), validate=False)

    def image_ids(ami: str) -> set[str]:
        mocks = OfflineMocks(region="us-east-1", preview=True, ssm_parameters={published: ami})
        run = run_offline(lambda: deploy(stack_plan), project=PROJECT, stack="dev-8b", mocks=mocks, preview=True)
        # Read at deploy time, by name: not `resolve:ssm:` at launch, so a new AMI is a visible diff.
        # The fleet's image parameter (the monitoring host looks up its own AL2023 one too).
        assert [
            a["name"] for t, a in mocks.invokes
            if t == "aws:ssm/getParameter:getParameter" and a["name"].startswith("/vllm-fleet/")
        ] == [published]
        return {r.inputs["imageId"] for r in run.records if r.type == LT}

    assert image_ids("ami-0aaaaaaaaaaaaaaa1") == {"ami-0aaaaaaaaaaaaaaa1"}
    assert image_ids("ami-0bbbbbbbbbbbbbbb2") == {"ami-0bbbbbbbbbbbbbbb2"}


# --- weights read lazily from the image's snapshot: a provisioned initialization rate -------------
def _fleet_run(weights_source: str, preview: bool) -> OfflineRun:
    config = load_stack_file("dev-8b")
    config = config.model_copy(
        update={"serving": config.serving.model_copy(update={"weights_source": weights_source})}
    )
    return offline.run_stack(build_stack_plan(config, validate=False), preview=preview)


def test_the_initialization_rate_is_the_planners_ebs_lazy_figure_within_what_ebs_accepts() -> None:
    rate = volume_initialization_rate_mib_s("ebs-lazy")
    assert rate is not None
    # EBS Provisioned Rate for Volume Initialization: "Valid range: 100 - 300 MiB/s"
    # (https://docs.aws.amazon.com/sdk-for-kotlin/api/latest/ec2/aws.sdk.kotlin.services.ec2.model/-ebs-block-device/volume-initialization-rate.html,
    # read 2026-11-28; pulumi-aws 7.51.1 LaunchTemplateBlockDeviceMappingEbsArgs says the same).
    assert 100 <= rate <= 300
    # The time to ready the planner shows for ebs-lazy is exactly what the volume is provisioned for.
    assert rate * 1024**2 == pytest.approx(default_catalog().weight_sources["ebs-lazy"].throughput_mb_s * 1e6)
    for other in ("ebs-initialized", "s3", "huggingface", "local-nvme"):
        assert volume_initialization_rate_mib_s(other) is None


@pytest.mark.parametrize("preview", [False, True], ids=["up", "preview"])
def test_ebs_lazy_launch_templates_initialize_the_image_snapshot_at_the_planned_rate(preview: bool) -> None:
    run = _fleet_run("ebs-lazy", preview)
    templates = [r for r in run.records if r.type == LT]
    assert templates
    for template in templates:
        [root] = template.inputs["blockDeviceMappings"]
        ami_lookup = run.mocks.handlers[GET_AMI]({"filters": [{"name": "image-id", "values": [template.inputs["imageId"]]}]})
        assert root["deviceName"] == ami_lookup["rootDeviceName"]
        assert root["ebs"]["snapshotId"] == ami_lookup["rootSnapshotId"]
        assert root["ebs"]["volumeInitializationRate"] == volume_initialization_rate_mib_s("ebs-lazy")
    snapshot_lookups = [a for t, a in run.mocks.invokes if t == GET_AMI and not a.get("owners")]
    assert snapshot_lookups and all(f["name"] == "image-id" for a in snapshot_lookups for f in a["filters"])


@pytest.mark.parametrize("weights_source", ["ebs-initialized", "huggingface"])
def test_other_sources_leave_initialization_to_ebs(weights_source: str) -> None:
    # ebs-initialized means fast snapshot restore (or a volume written at boot): a provisioned
    # rate would replace FSR's full initialization with a slower one.
    for template in (r for r in _fleet_run(weights_source, preview=False).records if r.type == LT):
        [root] = template.inputs["blockDeviceMappings"]
        assert "volumeInitializationRate" not in root["ebs"] and "snapshotId" not in root["ebs"]
