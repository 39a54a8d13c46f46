"""Preflight: the decisions on hand-made facts, and every boto3 path against a real moto server.

moto (5.2.5) over HTTP serves: describe_availability_zones, describe_instance_type_offerings
(its own snapshot of AWS's offerings per AZ), describe_images/register_image, SSM parameters,
ACM (import → ISSUED, request → PENDING_VALIDATION) and CloudWatch metric data.
moto lacks, so those paths run against botocore's Stubber (which validates every request and
response against the service's API model) — each test below says which:
- Service Quotas for EC2: moto knows only service code "vpc"; get_service_quota for ec2 answers
  NoSuchResourceException and get_aws_default_service_quota a 500
  (test_moto_lacks_ec2_service_quotas proves it, so this file notices when moto adds them);
- ec2 describe_capacity_reservations: moto answers 500 (test_moto_lacks_capacity_reservations).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
import pytest
import yaml
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra.config import STACKS_DIR, load_stack_file
from infra.errors import FleetError
from infra.ops.aws import ClientFactory, client_factory
from infra.ops.preflight import (
    CertificateFact,
    FleetNeed,
    ImageFact,
    PreflightFacts,
    QuotaFact,
    ReservationFact,
    Rung,
    check_certificate,
    check_image,
    check_offerings,
    check_quotas,
    check_reservation,
    evaluate,
    fetch_facts,
    fleet_need,
    has_blocker,
    quota_needs,
)
from infra.plan.build import build_stack_plan

REGION = "us-east-1"
P_QUOTA = "L-417A185B"  # Running On-Demand P instances (catalog quota_code of p4de/p5)
G_QUOTA = "L-DB2E81BA"
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def need_for(stack: str, stacks_dir: Path = STACKS_DIR) -> FleetNeed:
    return fleet_need(build_stack_plan(load_stack_file(stack, stacks_dir), validate=False))


def write_stack(tmp_path: Path, base: str, name: str, **overrides: Any) -> Path:
    """A copy of stacks/Pulumi.<base>.yaml as <name>, with ``key: value`` config overrides."""
    doc = yaml.safe_load((STACKS_DIR / f"Pulumi.{base}.yaml").read_text())
    for key, value in overrides.items():
        if value is None:
            doc["config"].pop(key, None)
        else:
            doc["config"][key] = value
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    (stacks / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(doc))
    return stacks


def by_check(results: list[Any], name: str) -> Any:
    [found] = [r for r in results if r.check == name]
    return found


# ---- what the plan needs ----


def test_need_counts_max_replicas_instances_plus_one_replica_of_surge() -> None:
    need = need_for("prod-70b")
    plan = build_stack_plan(load_stack_file("prod-70b"), validate=False).plan
    lay = plan.layout
    # 6 replicas at 2 per 8-GPU node → 3 instances; +1 for the instance refresh.
    assert (need.max_instances, need.surge_instances) == (-(-6 // lay.replicas_per_node) * lay.nodes_per_replica, 1)
    assert [r.instance_type for r in need.ladder] == [c.layout.instance_type for c in plan.fallbacks]
    rows = quota_needs(need)
    chosen = need.ladder[0]
    assert rows[0] == (
        chosen.quota_code,
        (
            f"{need.max_instances + 1} × {chosen.instance_type} on demand "
            f"({need.max_instances} at max replicas + 1 refresh surge)"
        ),
        (need.max_instances + 1) * chosen.vcpus,
        True,
    )
    assert all(not blocking for _, _, _, blocking in rows[1:])


def test_need_splits_spot_and_on_demand_quota() -> None:
    need = FleetNeed(
        stack="s", region=REGION, ladder=(Rung("g6e.12xlarge", 48, G_QUOTA, "L-3819A6DF", True),),
        max_instances=4, surge_instances=1, on_demand_instances=1, market="spot", availability_zones=2,
        image_ami_id=None, image_ssm_parameter=None, certificate_arn=None, endpoint_internal=True,
        capacity_reservation_id=None,
    )  # fmt: skip
    assert [(code, vcpus) for code, _, vcpus, _ in quota_needs(need)] == [(G_QUOTA, 2 * 48), ("L-3819A6DF", 3 * 48)]


# ---- decisions on hand-made facts ----


def test_offerings_decisions() -> None:
    need = need_for("prod-70b")
    ladder = [rung.instance_type for rung in need.ladder]
    chosen, fallback = ladder[0], ladder[1]
    azs = ("us-east-1a", "us-east-1b", "us-east-1c")
    rest = {t: azs for t in ladder[1:]}
    good = PreflightFacts(region_azs=azs, offerings={**rest, chosen: azs[:2]})
    assert [r.status for r in check_offerings(need, good)] == ["pass"] * len(ladder)
    one_az = PreflightFacts(region_azs=azs, offerings={**rest, chosen: azs[:1]})
    result = check_offerings(need, one_az)[0]
    assert result.status == "fail" and "at least 2 AZs" in result.detail
    dead_fallback = PreflightFacts(region_azs=azs, offerings={**rest, chosen: azs, fallback: ()})
    result = check_offerings(need, dead_fallback)[1]
    assert result.status == "warn" and f"drop {fallback}" in result.fix
    error = PreflightFacts(offerings_error="UnauthorizedOperation: nope")
    assert [r.status for r in check_offerings(need, error)] == ["fail"]


def test_quota_decisions() -> None:
    need = need_for("prod-70b")
    needs = quota_needs(need)
    code, _, vcpus, _ = needs[0]
    assert {n[0] for n in needs} == {code}  # every rung is a P instance: one vCPU quota
    most = max(n[2] for n in needs)
    enough = PreflightFacts(quotas={code: QuotaFact(code, value=most, usage=None, usage_note="no data")})
    assert [r.status for r in check_quotas(need, enough)] == ["pass"] * len(needs)
    assert "current usage not checked (no data)" in check_quotas(need, enough)[0].detail

    short = PreflightFacts(quotas={code: QuotaFact(code, value=vcpus - 1)})
    chosen_row, *fallback_rows = check_quotas(need, short)
    assert chosen_row.status == "fail"
    assert f"--quota-code {code} --desired-value {vcpus}" in chosen_row.fix
    # A fallback's shortfall never blocks: it warns.
    assert [r.status for r in fallback_rows] == ["warn" if n[2] > vcpus - 1 else "pass" for n in needs[1:]]

    # Enough quota for the chosen type; a fallback that needs more only warns.
    chosen_only = PreflightFacts(quotas={code: QuotaFact(code, value=vcpus)})
    assert [r.status for r in check_quotas(need, chosen_only)] == ["pass"] + [
        "warn" if n[2] > vcpus else "pass" for n in needs[1:]
    ]

    busy = PreflightFacts(quotas={code: QuotaFact(code, value=most, usage=most - vcpus + 1)})
    row = check_quotas(need, busy)[0]
    assert row.status == "warn" and f"{vcpus - 1:g} free" in row.detail

    unreadable = PreflightFacts(quotas={code: QuotaFact(code, error="AccessDeniedException: no")})
    assert check_quotas(need, unreadable)[0].status == "fail"


def test_image_certificate_reservation_decisions(tmp_path: Path) -> None:
    ssm_stack = need_for("dev-8b")
    assert check_image(ssm_stack, PreflightFacts(image=ImageFact(ssm_parameter="/p", ssm_found=False))).status == "fail"
    found = ImageFact(ami_id="ami-0123456789abcdef0", ssm_parameter="/p", ssm_found=True, state="available")
    assert check_image(ssm_stack, PreflightFacts(image=found)).status == "pass"
    pending = ImageFact(ami_id="ami-0123456789abcdef0", ssm_parameter="/p", ssm_found=True, state="pending")
    assert check_image(ssm_stack, PreflightFacts(image=pending)).status == "fail"
    gone = ImageFact(ami_id="ami-0123456789abcdef0", ssm_parameter="/p", ssm_found=True, state=None)
    assert "not found" in check_image(ssm_stack, PreflightFacts(image=gone)).detail

    public = need_for("prod-70b")  # public ALB with a certificate
    arn = public.certificate_arn
    assert arn is not None
    ok = PreflightFacts(certificate=CertificateFact(arn, status="ISSUED", domain="llm.example.com"))
    assert check_certificate(public, ok).status == "pass"
    validating = PreflightFacts(certificate=CertificateFact(arn, status="PENDING_VALIDATION"))
    assert "DNS validation" in check_certificate(public, validating).fix
    other_region = write_stack(
        tmp_path, "prod-70b", "cert-west",
        **{"vllm-fleet:endpoint": {"type": "alb", "internal": False, "allowedCidrs": ["203.0.113.0/24"],
                                   "certificateArn": arn.replace(":us-east-1:", ":us-west-2:")}},
    )  # fmt: skip
    # The stack file itself refuses a certificate from another region (offline, before preflight).
    with pytest.raises(FleetError, match="certificateArn.*us-west-2.*us-east-1"):
        need_for("cert-west", other_region)
    internal = need_for("dev-8b")
    assert check_certificate(internal, PreflightFacts()).status == "pass"

    assert check_reservation(public, PreflightFacts()) is None  # no reservation configured
    reserved = write_stack(
        tmp_path, "prod-70b", "reserved",
        **{"vllm-fleet:capacity": {"minReplicas": 2, "maxReplicas": 6, "instanceTypes": ["p4de"],
                                   "capacityReservationId": "cr-0123456789abcdef0"}},
    )  # fmt: skip
    need = need_for("reserved", reserved)
    most = need.max_instances  # the nodes max replicas take on the chosen layout
    fact = ReservationFact("cr-0123456789abcdef0", "active", need.chosen.instance_type, "us-east-1b", most, most)
    assert check_reservation(need, PreflightFacts(reservation=fact)).status == "pass"
    small = ReservationFact("cr-0123456789abcdef0", "active", need.chosen.instance_type, "us-east-1b", most - 1, most - 1)
    assert check_reservation(need, PreflightFacts(reservation=small)).status == "fail"
    ending = ReservationFact(
        "cr-0123456789abcdef0", "active", need.chosen.instance_type, "us-east-1b", most, most,
        end_date=NOW + dt.timedelta(hours=3),
    )  # fmt: skip
    assert check_reservation(need, PreflightFacts(reservation=ending, now=NOW)).status == "warn"


# ---- boto3 paths against moto over HTTP ----


def _self_signed_pem(domain: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _register_ami(ec2: Any, name: str) -> str:
    return str(
        ec2.register_image(
            Name=name,
            Architecture="x86_64",
            RootDeviceName="/dev/sda1",
            VirtualizationType="hvm",
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 200}}],
        )["ImageId"]
    )


def _stubbed_quotas(need: FleetNeed, value: float, *, default_only: bool = False) -> Any:
    """A Service Quotas client answering for every quota code the need asks about (moto has none for ec2)."""
    client = boto3.client("service-quotas", region_name=REGION)
    stubber = Stubber(client)
    for code in dict.fromkeys(code for code, _, _, _ in quota_needs(need)):
        quota = {
            "ServiceCode": "ec2",
            "QuotaCode": code,
            "QuotaName": "Running On-Demand P instances",
            "Value": value,
            "UsageMetric": {
                "MetricNamespace": "AWS/Usage",
                "MetricName": "ResourceCount",
                "MetricDimensions": {"Class": "P/OnDemand", "Resource": "vCPU", "Service": "EC2", "Type": "Resource"},
                "MetricStatisticRecommendation": "Maximum",
            },
        }
        params = {"ServiceCode": "ec2", "QuotaCode": code}
        if default_only:
            stubber.add_client_error("get_service_quota", "NoSuchResourceException", expected_params=params)
            stubber.add_response("get_aws_default_service_quota", {"Quota": quota}, params)
        else:
            stubber.add_response("get_service_quota", {"Quota": quota}, params)
    stubber.activate()
    return client


def _factory(quotas_client: Any, ec2_client: Any | None = None) -> ClientFactory:
    real = client_factory(REGION)

    def make(service: str) -> Any:
        if service == "service-quotas":
            return quotas_client
        if service == "ec2" and ec2_client is not None:
            return ec2_client
        return real(service)

    return make


def test_moto_lacks_ec2_service_quotas(moto_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # moto's 500s are not worth retrying
    quotas = boto3.client("service-quotas", region_name=REGION)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode=P_QUOTA)
    assert err.value.response["Error"]["Code"] == "NoSuchResourceException"
    # Without the stub the real fetch path degrades to a readable "could not read" row.
    need = need_for("prod-70b")
    facts = fetch_facts(need, client_factory(REGION), now=dt.datetime.now(dt.UTC))
    assert facts.quotas[P_QUOTA].value is None and facts.quotas[P_QUOTA].error
    assert by_check(check_quotas(need, facts), f"vCPU quota {P_QUOTA}").status == "fail"


def test_moto_lacks_capacity_reservations(tmp_path: Path, moto_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    ec2 = boto3.client("ec2", region_name=REGION, config=botocore.config.Config(retries={"max_attempts": 1}))
    # moto answers an HTML 500 page that botocore cannot parse as EC2 XML.
    with pytest.raises(botocore.parsers.ResponseParserError, match="500 Internal Server Error"):
        ec2.describe_capacity_reservations(CapacityReservationIds=["cr-0123456789abcdef0"])
    # The fetch path turns that into a readable failed check, not a traceback.
    stacks = write_stack(
        tmp_path, "prod-70b", "reserved",
        **{"vllm-fleet:capacity": {"minReplicas": 2, "maxReplicas": 6, "instanceTypes": ["p4de"],
                                   "capacityReservationId": "cr-0123456789abcdef0"}},
    )  # fmt: skip
    need = need_for("reserved", stacks)
    facts = fetch_facts(need, _factory(_stubbed_quotas(need, 10_000)))
    row = check_reservation(need, facts)
    assert row is not None and row.status == "fail" and row.detail.startswith("could not describe it")


def test_fetch_everything_from_moto_passes(moto_env: dict[str, str]) -> None:
    """prod-70b against moto: offerings, AMI, certificate and quota usage all real HTTP."""
    need = need_for("prod-70b")
    ec2, acm, cloudwatch = (boto3.client(s, region_name=REGION) for s in ("ec2", "acm", "cloudwatch"))
    ami = _register_ami(ec2, "vllm-fleet-prod")
    cert_pem, key_pem = _self_signed_pem("llm.example.com")
    arn = acm.import_certificate(Certificate=cert_pem, PrivateKey=key_pem)["CertificateArn"]
    need = dataclasses.replace(need, image_ami_id=ami, certificate_arn=arn)
    now = dt.datetime.now(dt.UTC)
    # The usage metric Service Quotas names for the P bucket, as CloudWatch publishes it.
    cloudwatch.put_metric_data(
        Namespace="AWS/Usage",
        MetricData=[
            {
                "MetricName": "ResourceCount",
                "Dimensions": [
                    {"Name": "Class", "Value": "P/OnDemand"},
                    {"Name": "Resource", "Value": "vCPU"},
                    {"Name": "Service", "Value": "EC2"},
                    {"Name": "Type", "Value": "Resource"},
                ],
                "Value": 96.0,
                "Timestamp": now - dt.timedelta(minutes=2),
            }
        ],
    )
    biggest = max(vcpus for _, _, vcpus, _ in quota_needs(need))
    facts = fetch_facts(need, _factory(_stubbed_quotas(need, biggest + 96)), now=now)
    # moto's offerings snapshot: p4de.24xlarge in us-east-1b/c, p5.48xlarge in all six AZs.
    assert len(facts.region_azs) == 6
    assert len(facts.offerings[need.ladder[0].instance_type]) >= 2
    assert facts.quotas[P_QUOTA].usage == 96.0  # read back from CloudWatch over HTTP
    assert facts.image == ImageFact(ami_id=ami, state="available", name="vllm-fleet-prod")
    assert facts.certificate is not None and facts.certificate.status == "ISSUED"
    results = evaluate(need, facts)
    assert not has_blocker(results), [r for r in results if r.status != "pass"]
    assert {r.status for r in results} == {"pass"}


def test_fetch_from_moto_finds_blockers(moto_env: dict[str, str]) -> None:
    """A region without the chosen type, a missing AMI, a certificate still validating."""
    need = need_for("prod-70b")
    acm = boto3.client("acm", region_name="ap-northeast-2")
    arn = acm.request_certificate(DomainName="llm.example.com", ValidationMethod="DNS")["CertificateArn"]
    need = dataclasses.replace(need, region="ap-northeast-2", certificate_arn=arn)
    quotas = boto3.client("service-quotas", region_name="ap-northeast-2")
    stubber = Stubber(quotas)
    for code in dict.fromkeys(c for c, _, _, _ in quota_needs(need)):
        stubber.add_response(
            "get_service_quota", {"Quota": {"QuotaCode": code, "Value": 0.0}}, {"ServiceCode": "ec2", "QuotaCode": code}
        )
    stubber.activate()
    real = client_factory("ap-northeast-2")
    facts = fetch_facts(need, lambda s: quotas if s == "service-quotas" else real(s))
    results = evaluate(need, facts)
    # moto's snapshot has no p4de.24xlarge in ap-northeast-2, and p5.48xlarge in one AZ.
    assert by_check(results, f"offered: {need.ladder[0].instance_type} (chosen)").status == "fail"
    assert by_check(results, "image").status == "fail" and "not found" in by_check(results, "image").detail
    assert by_check(results, "TLS certificate").detail.endswith("is PENDING_VALIDATION")
    assert [r.check for r in results if r.status == "fail"] == [
        f"offered: {need.ladder[0].instance_type} (chosen)",
        f"vCPU quota {P_QUOTA}",
        "image",
        "TLS certificate",
    ]


def test_ssm_parameter_paths_on_moto(moto_env: dict[str, str]) -> None:
    need = need_for("dev-8b")  # image.ssmParameter
    assert need.image_ssm_parameter is not None
    ec2, ssm = boto3.client("ec2", region_name=REGION), boto3.client("ssm", region_name=REGION)
    quotas = _stubbed_quotas(need, 1000, default_only=True)  # no applied value: the AWS default path
    missing = fetch_facts(need, _factory(quotas))
    assert missing.image == ImageFact(ssm_parameter=need.image_ssm_parameter, ssm_found=False)
    assert missing.quotas[G_QUOTA].from_default and missing.quotas[G_QUOTA].value == 1000
    ssm.put_parameter(Name=need.image_ssm_parameter, Value="ami-0123456789abcdef0", Type="String")
    dangling = fetch_facts(need, _factory(_stubbed_quotas(need, 1000)))
    assert check_image(need, dangling).status == "fail" and "ami-0123456789abcdef0" in check_image(need, dangling).detail
    ami = _register_ami(ec2, "vllm-fleet-dev")
    ssm.put_parameter(Name=need.image_ssm_parameter, Value=ami, Type="String", Overwrite=True)
    good = fetch_facts(need, _factory(_stubbed_quotas(need, 1000)))
    assert check_image(need, good).status == "pass"
    assert f"{ami} (from {need.image_ssm_parameter})" in check_image(need, good).detail


def test_capacity_reservation_fetch_with_stubber(tmp_path: Path, moto_env: dict[str, str]) -> None:
    """moto lacks DescribeCapacityReservations: the EC2 client for this call is a Stubber."""
    stacks = write_stack(
        tmp_path, "prod-70b", "reserved",
        **{"vllm-fleet:capacity": {"minReplicas": 2, "maxReplicas": 6, "instanceTypes": ["p4de"],
                                   "capacityReservationId": "cr-0123456789abcdef0"}},
    )  # fmt: skip
    need = need_for("reserved", stacks)
    ec2 = boto3.client("ec2", region_name=REGION)
    stubber = Stubber(ec2)
    zones = {"AvailabilityZones": [{"ZoneName": f"us-east-1{z}", "State": "available"} for z in "abc"]}
    stubber.add_response("describe_availability_zones", zones)
    offerings = [
        {"InstanceType": r.instance_type, "LocationType": "availability-zone", "Location": f"us-east-1{z}"}
        for r in need.ladder
        for z in "bc"
    ]
    stubber.add_response("describe_instance_type_offerings", {"InstanceTypeOfferings": offerings})
    stubber.add_response(
        "describe_images",
        {"Images": [{"ImageId": need.image_ami_id, "State": "available"}]},
        {"ImageIds": [need.image_ami_id]},
    )
    reservation = {
        "CapacityReservationId": "cr-0123456789abcdef0",
        "InstanceType": "p4de.24xlarge",
        "AvailabilityZone": "us-east-1b",
        "TotalInstanceCount": 3,
        "AvailableInstanceCount": 1,
        "State": "scheduled",
        "StartDate": NOW + dt.timedelta(days=2),
    }
    stubber.add_response(
        "describe_capacity_reservations",
        {"CapacityReservations": [reservation]},
        {"CapacityReservationIds": ["cr-0123456789abcdef0"]},
    )
    stubber.activate()
    facts = fetch_facts(need, _factory(_stubbed_quotas(need, 10_000), ec2))
    row = check_reservation(need, facts)
    assert row is not None and row.status == "fail"
    assert "state scheduled (starts 2026-11-30" in row.detail
    stubber.assert_no_pending_responses()


def test_preflight_cli_exit_codes_and_table(
    tmp_path: Path, moto_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real command against moto (Service Quotas stubbed): exit 0, then exit 1 on a blocker."""
    from infra import cli
    from infra.ops import commands

    ec2, ssm = boto3.client("ec2", region_name=REGION), boto3.client("ssm", region_name=REGION)
    stacks = write_stack(tmp_path, "dev-8b", "dev-8b")
    need = need_for("dev-8b", stacks)
    assert need.image_ssm_parameter is not None
    ssm.put_parameter(Name=need.image_ssm_parameter, Value=_register_ami(ec2, "dev"), Type="String")
    monkeypatch.setattr(commands, "client_factory", lambda region: _factory(_stubbed_quotas(need, 64)))

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["vllm-fleet", *args])
        try:
            cli.main()
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    assert run("preflight", "dev-8b", "--stacks-dir", str(stacks), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    assert [c["check"] for c in doc["checks"]][:1] == [f"offered: {need.ladder[0].instance_type} (chosen)"]

    ssm.delete_parameter(Name=need.image_ssm_parameter)
    assert run("preflight", "dev-8b", "--stacks-dir", str(stacks), "--json") == 1
    failed = [c for c in json.loads(capsys.readouterr().out)["checks"] if c["status"] == "fail"]
    assert [(c["check"], "does not exist" in c["detail"]) for c in failed] == [("image", True)]
    assert run("preflight", "dev-8b", "--stacks-dir", str(stacks)) == 1
    table = capsys.readouterr().out
    assert "Preflight: dev-8b in us-east-1" in table and table.rstrip().endswith("pass, 0 warn, 1 fail")

    monkeypatch.setattr(commands, "client_factory", client_factory)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert run("preflight", "dev-8b", "--stacks-dir", str(stacks)) == 2
    assert capsys.readouterr().err.startswith("vllm-fleet: error: AWS: cannot reach")


# ---- managed monitoring's prerequisites, and endpoints in an existing VPC (moto over HTTP) ----


def _managed(need: FleetNeed, topic_arn: str | None) -> FleetNeed:
    return dataclasses.replace(need, monitoring_mode="managed", sns_topic_arn=topic_arn)


def _aps_policy(topic_arn: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "AmpPublishes", "Effect": "Allow", "Principal": {"Service": "aps.amazonaws.com"},
        "Action": ["sns:Publish", "sns:GetTopicAttributes"], "Resource": topic_arn,
    }]})  # fmt: skip


def test_managed_monitoring_prerequisites_on_moto(moto_env: dict[str, str]) -> None:
    """Before the fix nothing checked them: AMG with AWS_SSO sign-in failed to create without
    IAM Identity Center, and AMP's alerts were dropped by a topic that does not admit it."""
    from infra.ops.preflight import check_managed_monitoring

    sns = boto3.client("sns", region_name=REGION)
    topic = sns.create_topic(Name="vllm-fleet-alerts")["TopicArn"]
    need = _managed(need_for("dev-8b"), topic)
    quotas = _stubbed_quotas(need, 1000)
    closed = check_managed_monitoring(need, fetch_facts(need, _factory(quotas)))
    # moto's account has an Identity Center instance; the new topic's default policy admits
    # only the account itself.
    assert [(r.check, r.status) for r in closed] == [
        ("IAM Identity Center (Managed Grafana sign-in)", "pass"),
        ("alert topic policy (AMP → SNS)", "fail"),
    ]
    assert "aps.amazonaws.com" in closed[1].fix
    sns.set_topic_attributes(TopicArn=topic, AttributeName="Policy", AttributeValue=_aps_policy(topic))
    opened = check_managed_monitoring(need, fetch_facts(need, _factory(_stubbed_quotas(need, 1000))))
    assert [r.status for r in opened] == ["pass", "pass"]
    gone = _managed(need, topic.replace("vllm-fleet-alerts", "no-such-topic"))
    missing = check_managed_monitoring(gone, fetch_facts(gone, _factory(_stubbed_quotas(gone, 1000))))
    assert missing[1].status == "fail" and missing[1].detail.endswith("not found")
    # An account without Identity Center (moto always has one: botocore's Stubber answers).
    sso = boto3.client("sso-admin", region_name=REGION)
    stubber = Stubber(sso)
    stubber.add_response("list_instances", {"Instances": []}, {})
    stubber.activate()
    real = _factory(_stubbed_quotas(need, 1000))
    facts = fetch_facts(need, lambda service: sso if service == "sso-admin" else real(service))
    (identity, _) = check_managed_monitoring(need, facts)
    assert identity.status == "fail" and "enable IAM Identity Center" in identity.fix
    assert check_managed_monitoring(need_for("dev-8b"), PreflightFacts()) == []  # self-hosted: nothing to check


def test_endpoints_only_existing_vpc_needs_every_endpoint_on_moto(moto_env: dict[str, str]) -> None:
    """The program creates endpoints only in a VPC of its own; in an existing one preflight
    must find them all, or the drain hook, gang discovery and head registration hang."""
    from infra.facts.aws import aws_fleet_facts
    from infra.ops.preflight import check_vpc_endpoints

    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    need = dataclasses.replace(need_for("dev-8b"), egress="endpoints-only", existing_vpc_id=vpc)
    facts = aws_fleet_facts()
    old = ["ssm", "ssmmessages", "ec2messages", "secretsmanager", "logs", "ecr.api", "ecr.dkr"]  # before the fix
    for service in old:
        ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.{service}", VpcEndpointType="Interface")
    ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway")
    result = check_vpc_endpoints(need, fetch_facts(need, _factory(_stubbed_quotas(need, 1000))))
    assert result is not None and result.status == "fail"
    assert "autoscaling, ec2, elasticloadbalancing" in result.detail
    for service in set(facts.vpc_interface_endpoints.value) - set(old):
        ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.{service}", VpcEndpointType="Interface")
    result = check_vpc_endpoints(need, fetch_facts(need, _factory(_stubbed_quotas(need, 1000))))
    assert result is not None and result.status == "pass"
    assert check_vpc_endpoints(need_for("dev-8b"), PreflightFacts()) is None  # NAT egress: nothing to check
