"""Preflight: can this stack deploy in its account and region right now?

Two halves, kept apart so the decisions are unit-testable without AWS:
- ``fetch_facts`` asks AWS (boto3) and records what it saw, errors included, as plain data;
- ``evaluate`` turns a ``FleetNeed`` (from the plan and config) plus those facts into
  ``CheckResult`` rows: pass, warn or fail, with a detail and a fix.

A "fail" is a blocker (the command exits 1); a "warn" is something to read before deploying.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import botocore.exceptions  # type: ignore[import-untyped]

from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.ops.aws import CALL_ERRORS, ClientFactory, credentials_error, error_code, error_text
from infra.plan.stack import StackPlan

Status = Literal["pass", "warn", "fail"]
# Where Service Quotas files EC2's vCPU quotas.
EC2_SERVICE_CODE = "ec2"
# How far back to look for the quota's usage metric (CloudWatch publishes AWS/Usage every minute).
USAGE_LOOKBACK = dt.timedelta(minutes=15)
# The service principal Amazon Managed Service for Prometheus publishes alerts to SNS as.
APS_PRINCIPAL = aws_fleet_facts().amp_sns_topic_policy.value.principal
# A capacity reservation that ends sooner than this gets a warning.
RESERVATION_ENDING_SOON = dt.timedelta(hours=24)


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    detail: str
    fix: str = ""


# ---- what the stack needs (from the plan and config; no AWS) ----


@dataclass(frozen=True)
class Rung:
    """One instance type of the Auto Scaling group's fallback ladder."""

    instance_type: str
    vcpus: int
    quota_code: str
    spot_quota_code: str
    chosen: bool


@dataclass(frozen=True)
class FleetNeed:
    stack: str
    region: str
    ladder: tuple[Rung, ...]
    max_instances: int  # instances at max replicas
    surge_instances: int  # launched on top during an instance refresh
    on_demand_instances: int  # of max_instances, those on the on-demand quota
    market: str
    availability_zones: int  # how many AZs the stack spreads over
    image_ami_id: str | None
    image_ssm_parameter: str | None
    certificate_arn: str | None
    endpoint_internal: bool
    capacity_reservation_id: str | None
    monitoring_mode: str = "none"
    sns_topic_arn: str | None = None
    egress: str = "nat"
    existing_vpc_id: str | None = None  # network mode existing: the VPC the stack builds in

    @property
    def chosen(self) -> Rung:
        return self.ladder[0]


def instances_for(replicas: int, replicas_per_node: int, nodes_per_replica: int) -> int:
    return math.ceil(replicas / replicas_per_node) * nodes_per_replica


def fleet_need(stack_plan: StackPlan) -> FleetNeed:
    config, plan = stack_plan.config, stack_plan.plan
    catalog = default_catalog()
    lay = plan.layout
    ladder = tuple(
        Rung(
            instance_type=c.layout.instance_type,
            vcpus=catalog.instances[c.layout.instance_type].vcpus,
            quota_code=catalog.instances[c.layout.instance_type].quota_code,
            spot_quota_code=catalog.instances[c.layout.instance_type].spot_quota_code,
            chosen=i == 0,
        )
        for i, c in enumerate(plan.fallbacks or [plan.chosen])
    )
    cap = config.capacity
    max_instances = instances_for(cap.max_replicas, lay.replicas_per_node, lay.nodes_per_replica)
    if cap.market == "spot":
        on_demand = min(max_instances, instances_for(cap.on_demand_base, lay.replicas_per_node, lay.nodes_per_replica))
    else:
        on_demand = max_instances
    return FleetNeed(
        stack=config.stack,
        region=config.region,
        ladder=ladder,
        max_instances=max_instances,
        # An instance refresh replaces one replica at a time, launching its replacement
        # first: one replica's worth of instances on top of the maximum.
        surge_instances=lay.nodes_per_replica,
        on_demand_instances=on_demand,
        market=cap.market,
        availability_zones=config.network.availability_zones,
        image_ami_id=config.image.ami_id,
        image_ssm_parameter=config.image.ssm_parameter,
        certificate_arn=config.endpoint.certificate_arn,
        endpoint_internal=config.endpoint.internal,
        capacity_reservation_id=cap.capacity_reservation_id,
        monitoring_mode=config.monitoring.mode,
        sns_topic_arn=config.monitoring.sns_topic_arn,
        egress=config.network.egress,
        existing_vpc_id=config.network.vpc_id if config.network.mode == "existing" else None,
    )


# ---- what AWS said (plain data; every fetch records its error instead of raising) ----


@dataclass(frozen=True)
class QuotaFact:
    code: str
    value: float | None = None
    name: str | None = None
    from_default: bool = False  # no applied value: the AWS default quota was read
    usage: float | None = None  # vCPUs in use now, from the quota's CloudWatch usage metric
    usage_note: str = ""  # why usage is unknown
    error: str | None = None


@dataclass(frozen=True)
class ImageFact:
    ami_id: str | None = None  # the AMI looked up (given, or read from the SSM parameter)
    ssm_parameter: str | None = None
    ssm_found: bool | None = None  # None: no parameter configured
    state: str | None = None  # None: describe_images found no such image
    name: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class CertificateFact:
    arn: str
    status: str | None = None  # None: not found
    domain: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ReservationFact:
    reservation_id: str
    state: str | None = None  # None: not found
    instance_type: str | None = None
    availability_zone: str | None = None
    total: int = 0
    available: int = 0
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class ManagedMonitoringFact:
    identity_center_instances: int | None = None  # None: could not list them (see error)
    identity_center_error: str | None = None
    topic_found: bool | None = None  # None: no topic configured
    topic_policy: str | None = None  # the topic's access policy (JSON)
    topic_error: str | None = None


@dataclass(frozen=True)
class VpcEndpointsFact:
    vpc_id: str
    services: tuple[str, ...] = ()  # service names, com.amazonaws.<region>.<service>
    error: str | None = None


@dataclass(frozen=True)
class PreflightFacts:
    region_azs: tuple[str, ...] = ()
    offerings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # type → AZs offering it
    offerings_error: str | None = None
    quotas: dict[str, QuotaFact] = field(default_factory=dict)
    image: ImageFact | None = None
    certificate: CertificateFact | None = None
    reservation: ReservationFact | None = None
    managed_monitoring: ManagedMonitoringFact | None = None
    vpc_endpoints: VpcEndpointsFact | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


# ---- decisions (pure) ----


def check_offerings(need: FleetNeed, facts: PreflightFacts) -> list[CheckResult]:
    if facts.offerings_error:
        return [
            CheckResult(
                "instance offerings",
                "fail",
                f"could not list instance type offerings in {need.region}: {facts.offerings_error}",
                "grant ec2:DescribeInstanceTypeOfferings, then re-run",
            )
        ]
    results = []
    azs_total = len(facts.region_azs)
    for rung in need.ladder:
        azs = sorted(facts.offerings.get(rung.instance_type, ()))
        where = f"{len(azs)} of {azs_total} AZs" + (f" ({', '.join(azs)})" if azs else "")
        name = f"offered: {rung.instance_type}" + (" (chosen)" if rung.chosen else " (fallback)")
        if rung.chosen and len(azs) < 2:
            results.append(
                CheckResult(
                    name,
                    "fail",
                    f"offered in {where} of {need.region}; the fleet needs it in at least 2 AZs "
                    "to survive an AZ outage and to find capacity",
                    "deploy in a region that offers it in 2+ AZs, or allow another type "
                    "(vllm-fleet:capacity.instanceTypes) and re-plan",
                )
            )
        elif not azs:
            results.append(
                CheckResult(
                    name,
                    "warn",
                    f"not offered in {need.region}: this rung of the fallback ladder can never launch",
                    f"drop {rung.instance_type} from vllm-fleet:capacity.instanceTypes",
                )
            )
        elif rung.chosen and len(azs) < need.availability_zones:
            results.append(
                CheckResult(
                    name,
                    "warn",
                    f"offered in {where}, fewer than the stack's {need.availability_zones} AZs: "
                    "subnets in the other AZs get none",
                    "pick subnets/AZs that offer it (vllm-fleet:network)",
                )
            )
        else:
            results.append(CheckResult(name, "pass", f"offered in {where}"))
    return results


def quota_needs(need: FleetNeed) -> list[tuple[str, str, int, bool]]:
    """(quota code, what, vCPUs needed, blocking) per ladder rung and market.

    The chosen type's need blocks; a fallback's only warns, since the group uses it only
    when the chosen type has no capacity.
    """
    rows = []
    spot_instances = need.max_instances - need.on_demand_instances
    on_demand_instances = need.on_demand_instances + need.surge_instances
    for rung in need.ladder:
        rows.append(
            (
                rung.quota_code,
                (
                    f"{on_demand_instances} × {rung.instance_type} on demand "
                    f"({need.on_demand_instances} at max replicas + {need.surge_instances} refresh surge)"
                ),
                on_demand_instances * rung.vcpus,
                rung.chosen,
            )
        )
        if spot_instances > 0:
            rows.append(
                (
                    rung.spot_quota_code,
                    f"{spot_instances} × {rung.instance_type} spot",
                    spot_instances * rung.vcpus,
                    rung.chosen,
                )
            )
    return rows


def check_quotas(need: FleetNeed, facts: PreflightFacts) -> list[CheckResult]:
    results = []
    for code, what, vcpus, blocking in quota_needs(need):
        quota = facts.quotas.get(code)
        name = f"vCPU quota {code}" + ("" if blocking else " (fallback)")
        if quota is None or quota.value is None:
            error = quota.error if quota else "not read"
            results.append(
                CheckResult(
                    name,
                    "fail" if blocking else "warn",
                    f"could not read the quota ({error}); need {vcpus} vCPUs for {what}",
                    "grant servicequotas:GetServiceQuota, or check the quota in the Service Quotas console",
                )
            )
            continue
        quota_name = f" ({quota.name})" if quota.name else ""
        default_note = ", AWS default: no increase applied" if quota.from_default else ""
        have = f"quota {quota.value:g}{quota_name}{default_note}"
        if need.market == "capacity-block":
            results.append(
                CheckResult(
                    name,
                    "warn",
                    f"need {vcpus} vCPUs for {what}; {have}. Whether Capacity Blocks count against "
                    "this quota was not verified",
                    "check the reservation's terms; the quota matters if the group launches outside it",
                )
            )
            continue
        if quota.value < vcpus:
            results.append(
                CheckResult(
                    name,
                    "fail" if blocking else "warn",
                    f"need {vcpus} vCPUs for {what}; {have}",
                    f"request an increase to at least {vcpus}: aws service-quotas "
                    f"request-service-quota-increase --service-code ec2 --quota-code {code} "
                    f"--desired-value {vcpus}",
                )
            )
            continue
        if quota.usage is None:
            results.append(
                CheckResult(
                    name,
                    "pass",
                    f"need {vcpus} vCPUs for {what}; {have}; current usage not checked ({quota.usage_note})",
                )
            )
        elif quota.value - quota.usage < vcpus:
            results.append(
                CheckResult(
                    name,
                    "warn",
                    f"need {vcpus} vCPUs for {what}; {have}, {quota.usage:g} in use, "
                    f"{quota.value - quota.usage:g} free (fine if the usage is this stack's own instances)",
                    f"free vCPUs in this bucket or request an increase to {math.ceil(quota.usage + vcpus)}",
                )
            )
        else:
            results.append(
                CheckResult(
                    name,
                    "pass",
                    f"need {vcpus} vCPUs for {what}; {have}, {quota.usage:g} in use",
                )
            )
    return results


def check_image(need: FleetNeed, facts: PreflightFacts) -> CheckResult:
    image = facts.image
    if need.image_ami_id is None and need.image_ssm_parameter is None:
        return CheckResult(
            "image",
            "fail",
            "no vllm-fleet:image.amiId or image.ssmParameter: the launch template has no AMI",
            "build the image (images stack) and set image.ssmParameter to its SSM parameter",
        )
    assert image is not None
    if image.error:
        return CheckResult(
            "image", "fail", f"could not check the image: {image.error}", "grant ec2:DescribeImages and ssm:GetParameter"
        )
    if need.image_ssm_parameter and not image.ssm_found:
        return CheckResult(
            "image",
            "fail",
            f"SSM parameter {need.image_ssm_parameter} does not exist in {need.region}",
            "build the image (pulumi up on the images stack) so it writes the parameter, or fix the name",
        )
    source = f"{image.ami_id} (from {need.image_ssm_parameter})" if need.image_ssm_parameter else str(image.ami_id)
    if image.state is None:
        return CheckResult(
            "image",
            "fail",
            f"AMI {source} not found in {need.region} (deregistered, another region, or not shared)",
            "rebuild the image, or copy/share the AMI into this region and account",
        )
    if image.state != "available":
        return CheckResult(
            "image",
            "fail",
            f"AMI {source} is {image.state}, not available",
            "wait for the image build to finish, or rebuild it",
        )
    return CheckResult("image", "pass", f"AMI {source} is available" + (f": {image.name}" if image.name else ""))


def check_certificate(need: FleetNeed, facts: PreflightFacts) -> CheckResult:
    if need.certificate_arn is None:
        if need.endpoint_internal:
            return CheckResult("TLS certificate", "pass", "none configured: internal endpoint listens on HTTP")
        return CheckResult(
            "TLS certificate",
            "warn",
            "public endpoint without a certificate: API keys would cross the internet in clear text",
            "set vllm-fleet:endpoint.certificateArn to an ISSUED ACM certificate",
        )
    arn_region = need.certificate_arn.split(":")[3] if need.certificate_arn.count(":") >= 5 else ""
    if arn_region != need.region:
        return CheckResult(
            "TLS certificate",
            "fail",
            f"certificate is in {arn_region or 'an unknown region'}, the load balancer in {need.region}",
            f"request or import the certificate in {need.region} (ACM certificates are regional)",
        )
    cert = facts.certificate
    assert cert is not None
    if cert.error:
        return CheckResult("TLS certificate", "fail", f"could not describe it: {cert.error}", "grant acm:DescribeCertificate")
    if cert.status is None:
        return CheckResult(
            "TLS certificate",
            "fail",
            f"{need.certificate_arn} not found",
            "fix vllm-fleet:endpoint.certificateArn",
        )
    if cert.status != "ISSUED":
        fix = (
            "complete DNS validation (create the CNAME ACM shows)"
            if cert.status == "PENDING_VALIDATION"
            else "request a new certificate"
        )
        return CheckResult("TLS certificate", "fail", f"{cert.domain or need.certificate_arn} is {cert.status}", fix)
    return CheckResult("TLS certificate", "pass", f"{cert.domain or need.certificate_arn} is ISSUED")


def check_reservation(need: FleetNeed, facts: PreflightFacts) -> CheckResult | None:
    if need.capacity_reservation_id is None:
        return None
    res = facts.reservation
    assert res is not None
    name = f"capacity reservation {need.capacity_reservation_id}"
    if res.error:
        return CheckResult(name, "fail", f"could not describe it: {res.error}", "grant ec2:DescribeCapacityReservations")
    if res.state is None:
        return CheckResult(name, "fail", f"not found in {need.region}", "fix vllm-fleet:capacity.capacityReservationId")
    if res.state != "active":
        starts = f" (starts {res.start_date.isoformat()})" if res.state == "scheduled" and res.start_date else ""
        return CheckResult(
            name,
            "fail",
            f"state {res.state}{starts}; instances can launch into it only while it is active",
            "wait for the reservation (or Capacity Block) to start, or use another one",
        )
    if res.instance_type != need.chosen.instance_type:
        return CheckResult(
            name,
            "fail",
            f"reserves {res.instance_type}, but the plan chose {need.chosen.instance_type}",
            f"restrict vllm-fleet:capacity.instanceTypes to {res.instance_type}, or use a matching reservation",
        )
    if res.total < need.max_instances:
        return CheckResult(
            name,
            "fail",
            f"{res.total} × {res.instance_type} reserved in {res.availability_zone}, "
            f"max replicas need {need.max_instances}",
            f"lower vllm-fleet:capacity.maxReplicas to fit, or extend the reservation to {need.max_instances}",
        )
    detail = (
        f"active: {res.total} × {res.instance_type} in {res.availability_zone} "
        f"({res.available} unused); max replicas need {need.max_instances}"
    )
    if res.end_date is not None and res.end_date - facts.now < RESERVATION_ENDING_SOON:
        return CheckResult(name, "warn", f"{detail}; ends {res.end_date.isoformat()}", "extend or replace it before it ends")
    return CheckResult(name, "pass", detail)


def topic_allows_aps(policy_json: str | None) -> bool:
    """Whether a topic policy lets Amazon Managed Service for Prometheus publish (its alert
    manager's SNS receiver needs sns:Publish and sns:GetTopicAttributes, aws_fleet.yaml
    amp_sns_topic_policy)."""
    try:
        doc = json.loads(policy_json or "{}")
    except ValueError:
        return False
    statements = doc.get("Statement") or []
    for statement in [statements] if isinstance(statements, dict) else statements:
        principal = statement.get("Principal") or {}
        services = principal.get("Service", []) if isinstance(principal, dict) else []
        services = [services] if isinstance(services, str) else services
        actions = statement.get("Action") or []
        actions = [actions] if isinstance(actions, str) else actions
        if statement.get("Effect") == "Allow" and APS_PRINCIPAL in services and (
            {"sns:Publish", "sns:*", "*"} & set(actions)
        ):
            return True
    return False


def check_managed_monitoring(need: FleetNeed, facts: PreflightFacts) -> list[CheckResult]:
    """Managed monitoring's prerequisites outside the stack: IAM Identity Center for Amazon
    Managed Grafana's AWS_SSO sign-in, and an alert topic that lets AMP publish."""
    if need.monitoring_mode != "managed":
        return []
    fact = facts.managed_monitoring
    assert fact is not None
    results = []
    name = "IAM Identity Center (Managed Grafana sign-in)"
    if fact.identity_center_error:
        results.append(CheckResult(name, "fail", f"could not list instances: {fact.identity_center_error}", "grant sso:ListInstances"))
    elif not fact.identity_center_instances:
        results.append(
            CheckResult(
                name,
                "fail",
                "no IAM Identity Center instance: the Grafana workspace (authentication AWS_SSO) cannot be created",
                "enable IAM Identity Center in this account or its organization, then re-run",
            )
        )
    else:
        results.append(CheckResult(name, "pass", f"{fact.identity_center_instances} instance(s)"))
    name = "alert topic policy (AMP → SNS)"
    if need.sns_topic_arn is None:
        results.append(CheckResult(name, "fail", "no vllm-fleet:monitoring.snsTopicArn", "set the SNS topic alerts go to"))
    elif fact.topic_error:
        results.append(CheckResult(name, "fail", f"could not read {need.sns_topic_arn}: {fact.topic_error}", "grant sns:GetTopicAttributes"))
    elif not fact.topic_found:
        results.append(CheckResult(name, "fail", f"{need.sns_topic_arn} not found", "create the topic or fix vllm-fleet:monitoring.snsTopicArn"))
    elif not topic_allows_aps(fact.topic_policy):
        results.append(
            CheckResult(
                name,
                "fail",
                f"{need.sns_topic_arn}'s policy does not let {APS_PRINCIPAL} publish: alerts would be dropped",
                f"add a statement: Allow, Principal Service {APS_PRINCIPAL}, Action sns:Publish and sns:GetTopicAttributes",
            )
        )
    else:
        results.append(CheckResult(name, "pass", f"{APS_PRINCIPAL} may publish to {need.sns_topic_arn}"))
    return results


def check_vpc_endpoints(need: FleetNeed, facts: PreflightFacts) -> CheckResult | None:
    """An existing VPC without internet egress must already have every endpoint the nodes use
    (the program creates them only in a VPC of its own)."""
    if need.egress != "endpoints-only" or need.existing_vpc_id is None:
        return None
    fact = facts.vpc_endpoints
    assert fact is not None
    name = f"VPC endpoints in {need.existing_vpc_id}"
    if fact.error:
        return CheckResult(name, "fail", f"could not describe them: {fact.error}", "grant ec2:DescribeVpcEndpoints")
    aws_facts = aws_fleet_facts()
    wanted = [*aws_facts.vpc_interface_endpoints.value, *aws_facts.vpc_gateway_endpoints.value]
    have = {service.split(".", 3)[-1] for service in fact.services}
    missing = [service for service in wanted if service not in have]
    if missing:
        return CheckResult(
            name,
            "fail",
            f"network.egress endpoints-only, but the VPC has no endpoint for {', '.join(missing)}: "
            "the nodes would hang calling them",
            f"create VPC endpoints com.amazonaws.{need.region}.<service> for {', '.join(missing)}",
        )
    return CheckResult(name, "pass", f"all {len(wanted)} endpoints present")


def evaluate(need: FleetNeed, facts: PreflightFacts) -> list[CheckResult]:
    results = check_offerings(need, facts) + check_quotas(need, facts)
    results.append(check_image(need, facts))
    results.append(check_certificate(need, facts))
    reservation = check_reservation(need, facts)
    if reservation is not None:
        results.append(reservation)
    results += check_managed_monitoring(need, facts)
    endpoints = check_vpc_endpoints(need, facts)
    if endpoints is not None:
        results.append(endpoints)
    return results


def has_blocker(results: list[CheckResult]) -> bool:
    return any(r.status == "fail" for r in results)


def results_json(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


# ---- fetching facts (boto3) ----


def _fetch_offerings(ec2: Any, types: list[str]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    zones = ec2.describe_availability_zones(
        Filters=[{"Name": "zone-type", "Values": ["availability-zone"]}]
    )["AvailabilityZones"]
    region_azs = tuple(sorted(z["ZoneName"] for z in zones))
    offered: dict[str, set[str]] = {t: set() for t in types}
    paginator = ec2.get_paginator("describe_instance_type_offerings")
    for page in paginator.paginate(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": types}]
    ):
        for offering in page["InstanceTypeOfferings"]:
            offered.setdefault(offering["InstanceType"], set()).add(offering["Location"])
    return region_azs, {t: tuple(sorted(azs)) for t, azs in offered.items()}


def _quota_usage(cloudwatch: Any, quota: dict[str, Any], now: dt.datetime) -> tuple[float | None, str]:
    metric = quota.get("UsageMetric") or {}
    if not metric.get("MetricName"):
        return None, "the quota names no usage metric"
    statistic = metric.get("MetricStatisticRecommendation") or "Maximum"
    response = cloudwatch.get_metric_statistics(
        Namespace=metric["MetricNamespace"],
        MetricName=metric["MetricName"],
        Dimensions=[{"Name": k, "Value": v} for k, v in sorted(metric.get("MetricDimensions", {}).items())],
        StartTime=now - USAGE_LOOKBACK,
        EndTime=now,
        Period=60,
        Statistics=[statistic],
    )
    points = response.get("Datapoints", [])
    if not points:
        return None, f"no {metric['MetricNamespace']} {metric['MetricName']} data in the last 15 min"
    latest = max(points, key=lambda p: p["Timestamp"])
    return float(latest[statistic]), ""


def _fetch_quota(quotas: Any, cloudwatch: Any, code: str, now: dt.datetime) -> QuotaFact:
    from_default = False
    try:
        try:
            quota = quotas.get_service_quota(ServiceCode=EC2_SERVICE_CODE, QuotaCode=code)["Quota"]
        except botocore.exceptions.ClientError as err:
            # No applied value recorded for this account: the AWS default is what applies.
            if error_code(err) != "NoSuchResourceException":
                raise
            quota = quotas.get_aws_default_service_quota(ServiceCode=EC2_SERVICE_CODE, QuotaCode=code)["Quota"]
            from_default = True
    except CALL_ERRORS as err:
        return QuotaFact(code=code, error=error_text(err))
    try:
        usage, note = _quota_usage(cloudwatch, quota, now)
    except CALL_ERRORS as err:
        usage, note = None, f"CloudWatch: {error_text(err)}"
    return QuotaFact(
        code=code,
        value=float(quota["Value"]),
        name=quota.get("QuotaName"),
        from_default=from_default,
        usage=usage,
        usage_note=note,
    )


def _fetch_image(ec2: Any, ssm: Any, need: FleetNeed) -> ImageFact:
    ami_id = need.image_ami_id
    ssm_found: bool | None = None
    try:
        if need.image_ssm_parameter:
            try:
                ami_id = ssm.get_parameter(Name=need.image_ssm_parameter)["Parameter"]["Value"]
                ssm_found = True
            except botocore.exceptions.ClientError as err:
                if error_code(err) != "ParameterNotFound":
                    raise
                return ImageFact(ssm_parameter=need.image_ssm_parameter, ssm_found=False)
        try:
            images = ec2.describe_images(ImageIds=[ami_id])["Images"]
        except botocore.exceptions.ClientError as err:
            if error_code(err) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"):
                raise
            images = []
    except CALL_ERRORS as err:
        return ImageFact(ami_id=ami_id, ssm_parameter=need.image_ssm_parameter, error=error_text(err))
    image = images[0] if images else {}
    return ImageFact(
        ami_id=ami_id,
        ssm_parameter=need.image_ssm_parameter,
        ssm_found=ssm_found,
        state=image.get("State"),
        name=image.get("Name"),
    )


def _fetch_certificate(acm: Any, arn: str) -> CertificateFact:
    try:
        cert = acm.describe_certificate(CertificateArn=arn)["Certificate"]
    except CALL_ERRORS as err:
        if isinstance(err, botocore.exceptions.ClientError) and error_code(err) == "ResourceNotFoundException":
            return CertificateFact(arn=arn)
        return CertificateFact(arn=arn, error=error_text(err))
    return CertificateFact(arn=arn, status=cert.get("Status"), domain=cert.get("DomainName"))


def _fetch_reservation(ec2: Any, reservation_id: str) -> ReservationFact:
    try:
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[reservation_id])["CapacityReservations"]
    except CALL_ERRORS as err:
        not_found = ("InvalidCapacityReservationId.NotFound", "InvalidCapacityReservationId.Malformed")
        if isinstance(err, botocore.exceptions.ClientError) and error_code(err) in not_found:
            return ReservationFact(reservation_id=reservation_id)
        return ReservationFact(reservation_id=reservation_id, error=error_text(err))
    if not found:
        return ReservationFact(reservation_id=reservation_id)
    res = found[0]
    return ReservationFact(
        reservation_id=reservation_id,
        state=res.get("State"),
        instance_type=res.get("InstanceType"),
        availability_zone=res.get("AvailabilityZone"),
        total=int(res.get("TotalInstanceCount", 0)),
        available=int(res.get("AvailableInstanceCount", 0)),
        start_date=res.get("StartDate"),
        end_date=res.get("EndDate"),
    )


def _fetch_managed_monitoring(sso_admin: Any, sns: Any | None, topic_arn: str | None) -> ManagedMonitoringFact:
    instances: int | None = None
    instances_error = None
    try:
        instances = len(sso_admin.list_instances().get("Instances", []))
    except CALL_ERRORS as err:
        instances_error = error_text(err)
    if sns is None or topic_arn is None:
        return ManagedMonitoringFact(identity_center_instances=instances, identity_center_error=instances_error)
    try:
        attributes = sns.get_topic_attributes(TopicArn=topic_arn)["Attributes"]
    except CALL_ERRORS as err:
        if isinstance(err, botocore.exceptions.ClientError) and error_code(err) == "NotFound":
            return ManagedMonitoringFact(instances, instances_error, topic_found=False)
        return ManagedMonitoringFact(instances, instances_error, topic_error=error_text(err))
    return ManagedMonitoringFact(instances, instances_error, topic_found=True, topic_policy=attributes.get("Policy"))


def _fetch_vpc_endpoints(ec2: Any, vpc_id: str) -> VpcEndpointsFact:
    try:
        pages = ec2.get_paginator("describe_vpc_endpoints").paginate(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
        services = tuple(
            e["ServiceName"] for page in pages for e in page["VpcEndpoints"] if e.get("State", "available") == "available"
        )
    except CALL_ERRORS as err:
        return VpcEndpointsFact(vpc_id=vpc_id, error=error_text(err))
    return VpcEndpointsFact(vpc_id=vpc_id, services=services)


def fetch_facts(need: FleetNeed, clients: ClientFactory, now: dt.datetime | None = None) -> PreflightFacts:
    now = now or dt.datetime.now(dt.UTC)
    try:
        ec2 = clients("ec2")
        types = [r.instance_type for r in need.ladder]
        region_azs: tuple[str, ...] = ()
        offerings: dict[str, tuple[str, ...]] = {}
        offerings_error = None
        try:
            region_azs, offerings = _fetch_offerings(ec2, types)
        except CALL_ERRORS as err:
            offerings_error = error_text(err)
        quotas_client, cloudwatch = clients("service-quotas"), clients("cloudwatch")
        codes = dict.fromkeys(code for code, _, _, _ in quota_needs(need))
        quotas = {code: _fetch_quota(quotas_client, cloudwatch, code, now) for code in codes}
        image = None
        if need.image_ami_id or need.image_ssm_parameter:
            image = _fetch_image(ec2, clients("ssm") if need.image_ssm_parameter else None, need)
        certificate = _fetch_certificate(clients("acm"), need.certificate_arn) if need.certificate_arn else None
        reservation = (
            _fetch_reservation(ec2, need.capacity_reservation_id) if need.capacity_reservation_id else None
        )
        managed = (
            _fetch_managed_monitoring(
                clients("sso-admin"), clients("sns") if need.sns_topic_arn else None, need.sns_topic_arn
            )
            if need.monitoring_mode == "managed"
            else None
        )
        endpoints = (
            _fetch_vpc_endpoints(ec2, need.existing_vpc_id)
            if need.egress == "endpoints-only" and need.existing_vpc_id
            else None
        )
    except botocore.exceptions.BotoCoreError as err:
        fleet_error = credentials_error(err)
        if fleet_error is not None:
            raise fleet_error from None
        raise
    return PreflightFacts(
        region_azs=region_azs,
        offerings=offerings,
        offerings_error=offerings_error,
        quotas=quotas,
        image=image,
        certificate=certificate,
        reservation=reservation,
        managed_monitoring=managed,
        vpc_endpoints=endpoints,
        now=now,
    )
