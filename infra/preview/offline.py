"""The offline plan's engine: run the real Pulumi program (``infra.program.stack.deploy``)
in-process under ``pulumi.runtime`` mocks and record every resource it declares.

No cloud, no CLI, no state. The mocks stand in for the AWS provider: a resource's outputs
are its inputs plus deterministic placeholders for what AWS would compute (ids, ARNs,
names). In ``preview=True`` mode they return no computed outputs at all, like a real
``pulumi preview`` of a new stack, so values derived from them show as ``[unknown]``.

Each call runs in a copied ``contextvars`` context with its own event loop, so Pulumi's
global settings (monitor, stack, root resource, config) never leak into the caller or
into the next call.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.output import Unknown
from pulumi.runtime import MockCallArgs, MockResourceArgs, Mocks, rpc, set_mocks
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.stack import run_pulumi_func

from infra.config import PROJECT, ImagesStackConfig
from infra.plan.stack import StackPlan

SECRET_MASK = "[secret]"
UNKNOWN_MASK = "[unknown]"
# The root resource of every program; the engine leaves its type out of its children's URNs.
STACK_TYPE = "pulumi:pulumi:Stack"
# The placeholder account of every mocked ARN: AWS's documentation example account.
MOCK_ACCOUNT_ID = "123456789012"
MOCK_AMI_ROOT_DEVICE = "/dev/sda1"
# A placeholder for the size of an AMI's root snapshot (VllmImage sizes its recipe's root volume
# from it); AWS reports the real one at deploy time.
MOCK_AMI_ROOT_GIB = 75

InvokeHandler = Callable[[Mapping[str, Any]], dict[str, Any]]


def _digest(*parts: str, length: int = 17) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def _type_parts(type_token: str) -> tuple[str, str, str]:
    """``aws:ec2/launchTemplate:LaunchTemplate`` → (``aws``, ``ec2``, ``LaunchTemplate``)."""
    package, module, kind = (type_token.split(":") + ["", ""])[:3]
    return package, module.split("/")[0], kind


class OfflineMocks(Mocks):
    """Deterministic stand-ins for the AWS and random providers and their data sources."""

    def __init__(
        self,
        *,
        region: str,
        preview: bool,
        account_id: str = MOCK_ACCOUNT_ID,
        availability_zones: Sequence[str] | None = None,
        ssm_parameters: Mapping[str, str] | None = None,
        existing_vpc_cidr: str = "10.0.0.0/16",
        invoke_handlers: Mapping[str, InvokeHandler] | None = None,
        capacity_block_instance_type: str | None = None,
    ) -> None:
        self.region = region
        self.preview = preview
        self.account_id = account_id
        self.availability_zones = list(availability_zones or [f"{region}{s}" for s in "abcdef"])
        self.ssm_parameters = dict(ssm_parameters or {})
        self.existing_vpc_cidr = existing_vpc_cidr
        self.invokes: list[tuple[str, dict[str, Any]]] = []
        self.handlers: dict[str, InvokeHandler] = {
            "aws:index/getCallerIdentity:getCallerIdentity": lambda a: {
                "accountId": self.account_id,
                "arn": f"arn:aws:iam::{self.account_id}:user/offline-plan",
                "userId": "AIDAOFFLINEPLAN",
                "id": self.account_id,
            },
            "aws:index/getPartition:getPartition": lambda a: {
                "partition": "aws",
                "dnsSuffix": "amazonaws.com",
                "reverseDnsPrefix": "com.amazonaws",
                "id": "aws",
            },
            "aws:index/getRegion:getRegion": lambda a: {"region": self.region, "name": self.region, "id": self.region},
            "aws:index/getAvailabilityZones:getAvailabilityZones": lambda a: {
                "names": self.availability_zones,
                "zoneIds": [f"use1-az{i + 1}" for i in range(len(self.availability_zones))],
                "id": self.region,
            },
            "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings": self._offerings,
            "aws:ssm/getParameter:getParameter": self._ssm_parameter,
            "aws:ec2/getAmi:getAmi": self._ami,
            "aws:ec2/getVpc:getVpc": lambda a: {"id": a.get("id"), "cidrBlock": self.existing_vpc_cidr},
            # A capacity block of the plan's type in the region's second zone (not the first, so
            # the zone choice is exercised); an existing subnet's zone follows its id's last digit.
            "aws:ec2/getCapacityBlockReservation:getCapacityBlockReservation": lambda a: {
                "id": a.get("id"),
                "availabilityZone": self.availability_zones[1],
                "instanceType": capacity_block_instance_type,
                "state": "active",
            },
            "aws:ec2/getSubnet:getSubnet": lambda a: {
                "id": a.get("id"),
                "availabilityZone": self.availability_zones[int(str(a.get("id"))[-1], 16) % len(self.availability_zones)],
            },
        }
        self.handlers.update(invoke_handlers or {})

    # --- invokes ---------------------------------------------------------------------------
    def call(self, args: MockCallArgs) -> Any:
        # A plain dict on success; (result, failures) makes the invoke raise.
        self.invokes.append((args.token, dict(args.args)))
        handler = self.handlers.get(args.token)
        if handler is None:
            return {}, [("token", f"the offline plan has no stand-in for data source {args.token}")]
        return handler(args.args)

    def _offerings(self, args: Mapping[str, Any]) -> dict[str, Any]:
        types = [v for f in args.get("filters") or [] if f.get("name") == "instance-type" for v in f.get("values", [])]
        return {
            "instanceTypes": [t for t in types for _ in self.availability_zones],
            "locations": [z for _ in types for z in self.availability_zones],
            "locationTypes": ["availability-zone"] * (len(types) * len(self.availability_zones)),
            "id": self.region,
        }

    def _ssm_parameter(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name = str(args.get("name"))
        value = self.ssm_parameters.get(name, f"ami-{_digest('ssm', name)}")
        return {"name": name, "value": value, "insecureValue": value, "type": "String", "id": name}

    def _ami(self, args: Mapping[str, Any]) -> dict[str, Any]:
        ids = [v for f in args.get("filters") or [] if f.get("name") == "image-id" for v in f.get("values", [])]
        image = ids[0] if ids else f"ami-{_digest('ami', json.dumps(args, sort_keys=True, default=str))}"
        snapshot = f"snap-{_digest('snapshot', image)}"
        return {
            "id": image,
            "imageId": image,
            "rootDeviceName": MOCK_AMI_ROOT_DEVICE,
            "rootSnapshotId": snapshot,
            "architecture": "x86_64",
            # GetAmiResult.block_device_mappings: camelCase fields, but `ebs` is a plain string map
            # whose keys the provider writes in snake_case (terraform-provider-aws
            # internal/service/ec2/ec2_ami.go, flattenAMIBlockDeviceMappings).
            "blockDeviceMappings": [
                {
                    "deviceName": MOCK_AMI_ROOT_DEVICE,
                    "ebs": {
                        "delete_on_termination": "true",
                        "encrypted": "true",
                        "snapshot_id": snapshot,
                        "volume_size": str(MOCK_AMI_ROOT_GIB),
                        "volume_type": "gp3",
                    },
                    "noDevice": "",
                    "virtualName": "",
                }
            ],
        }

    # --- resources -------------------------------------------------------------------------
    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        outputs = dict(args.inputs)
        if self.preview:
            # A preview of a new stack knows only the inputs.
            return None, outputs
        package, module, kind = _type_parts(args.typ)
        suffix = _digest(args.typ, args.name)
        name = outputs.get("name") or (
            f"{outputs['namePrefix']}{suffix[:8]}" if outputs.get("namePrefix") else f"{args.name}-{suffix[:7]}"
        )
        arn = f"arn:aws:{module}:{self.region}:{self.account_id}:{kind[:1].lower()}{kind[1:]}/{name}"
        resource_id = f"{kind[:3].lower()}-{suffix}"
        outputs.setdefault("arn", arn)
        if package == "aws":
            outputs.setdefault("name", name)
            outputs.setdefault("tagsAll", outputs.get("tags") or {})
        computed: dict[str, dict[str, Any]] = {
            "aws:ec2/launchTemplate:LaunchTemplate": {"latestVersion": 1, "defaultVersion": 1},
            "aws:lb/loadBalancer:LoadBalancer": {
                "dnsName": f"{name}.{self.region}.elb.amazonaws.com",
                "arnSuffix": f"app/{name}/{suffix[:16]}",
                "zoneId": "Z35SXDOTRQ7X7K",
            },
            "aws:lb/targetGroup:TargetGroup": {"arnSuffix": f"targetgroup/{name}/{suffix[:16]}"},
            "aws:secretsmanager/secret:Secret": {
                "arn": f"arn:aws:secretsmanager:{self.region}:{self.account_id}:secret:{name}-{suffix[:6]}"
            },
            "aws:autoscaling/group:Group": {"id": name},
            "aws:cloudwatch/logGroup:LogGroup": {
                "arn": f"arn:aws:logs:{self.region}:{self.account_id}:log-group:{name}"
            },
            "aws:iam/role:Role": {"arn": f"arn:aws:iam::{self.account_id}:role/{name}", "id": name},
            "aws:iam/instanceProfile:InstanceProfile": {
                "arn": f"arn:aws:iam::{self.account_id}:instance-profile/{name}"
            },
            # Computed outputs the monitoring component reads (URLs, the config bucket).
            "aws:ec2/instance:Instance": {"privateIp": f"10.42.{int(suffix[:2], 16) % 16}.{int(suffix[2:4], 16) % 250 + 4}"},
            "aws:s3/bucket:Bucket": {"bucket": outputs.get("bucket") or name},
            "aws:amp/workspace:Workspace": {
                "prometheusEndpoint": f"https://aps-workspaces.{self.region}.amazonaws.com/workspaces/ws-{suffix[:12]}/"
            },
            "aws:grafana/workspace:Workspace": {"endpoint": f"g-{suffix[:10]}.grafana-workspace.{self.region}.amazonaws.com"},
            "random:index/randomPassword:RandomPassword": {
                "result": "offline-" + _digest("password", args.name, length=40),
                "bcryptHash": "$2a$10$offline",
            },
        }
        for key, value in computed.get(args.typ, {}).items():
            outputs[key] = value
        if args.typ == "aws:ec2/placementGroup:PlacementGroup":
            outputs["name"] = name
        resource_id = str(outputs.get("id") or resource_id)
        return resource_id, outputs


@dataclass(frozen=True)
class ResourceRecord:
    """One declared resource as the engine saw it: type, name, parent, inputs, options."""

    type: str
    name: str
    urn: str
    parent_urn: str | None
    custom: bool
    inputs: dict[str, Any]  # display-safe: secrets → "[secret]", unknowns → "[unknown]"
    options: dict[str, Any] = field(default_factory=dict)
    # What a policy pack sees in a real run: secrets unwrapped, unknowns kept as None.
    engine_inputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    secret_paths: tuple[str, ...] = ()
    # URNs this resource waits for (depends_on and every resource whose outputs it takes).
    dependencies: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # What the mocks answered: the id and the outputs (e.g. an ARN), to follow references.
    id: str | None = field(default=None, repr=False, compare=False)
    outputs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The URN the Pulumi engine gives it, and the URNs its aliases name (the resource's URNs
    # before a refactoring moved it). The mocks' own URNs name only the direct parent's type;
    # the engine's name every enclosing component's.
    engine_urn: str = field(default="", repr=False, compare=False)
    aliases: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def parent_type(self) -> str | None:
        if self.parent_urn is None:
            return None
        return self.parent_urn.split("::")[2].split("$")[-1]


def _walk(value: Any, path: str, secrets: list[str], *, unwrap: bool) -> Any:
    """Copy an input value, masking (or unwrapping) secrets and unknowns, noting secret paths."""
    if rpc.is_rpc_secret(value):
        secrets.append(path)
        inner = _walk(rpc.unwrap_rpc_secret(value), path, [], unwrap=unwrap)
        return inner if unwrap else SECRET_MASK
    if isinstance(value, Unknown) or (isinstance(value, str) and value == rpc.UNKNOWN):
        return None if unwrap else UNKNOWN_MASK
    if isinstance(value, float) and value.is_integer():
        # The wire format has only doubles; ports and sizes read better as integers.
        return int(value)
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}.{k}" if path else k, secrets, unwrap=unwrap) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, f"{path}[{i}]", secrets, unwrap=unwrap) for i, v in enumerate(value)]
    if isinstance(value, pulumi.Resource):
        return "[resource]"
    return value


class RecordingMonitor(MockMonitor):
    """The SDK's mock monitor, also keeping each registration request (inputs as sent, with
    secret markers, and the resource options) in declaration order."""

    def __init__(self, mocks: Mocks) -> None:
        super().__init__(mocks)
        self.records: list[ResourceRecord] = []
        # Mock URN → the qualified type the engine would give it: "<parent types>$<type>".
        self._qualified: dict[str, str] = {}

    def _engine_urn(self, urn: str, parent_urn: str, kind: str, name: str) -> str:
        parent = self._qualified.get(parent_urn, "") if parent_urn else ""
        qualified = kind if parent in ("", STACK_TYPE) else f"{parent}${kind}"
        return "::".join([*urn.split("::")[:2], qualified, name])

    def _alias_urns(self, request: Any, urn: str) -> tuple[str, ...]:
        """The engine's URNs for the registration's aliases: a spec replaces the name, type
        or parent of the resource's own URN."""
        found = []
        for alias in request.aliases:
            if alias.urn:
                found.append(alias.urn)
                continue
            spec = alias.spec
            parent = "" if spec.noParent else (spec.parentUrn or request.parent)
            found.append(self._engine_urn(urn, parent, spec.type or request.type, spec.name or request.name))
        return tuple(found)

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        engine_urn = self._engine_urn(response.urn, request.parent, request.type, request.name)
        self._qualified[response.urn] = engine_urn.split("::")[2]
        if request.type != STACK_TYPE:
            raw = rpc.deserialize_properties(request.object, keep_unknowns=True)
            secrets: list[str] = []
            masked = _walk(raw, "", secrets, unwrap=False)
            engine = _walk(raw, "", [], unwrap=True)
            options = {
                "ignoreChanges": list(request.ignoreChanges),
                "replaceOnChanges": list(request.replaceOnChanges),
                "additionalSecretOutputs": list(request.additionalSecretOutputs),
                "deleteBeforeReplace": bool(request.deleteBeforeReplace),
                "protect": bool(request.protect),
                "retainOnDelete": bool(getattr(request, "retainOnDelete", False)),
                "customTimeouts": {
                    key: value
                    for key in ("create", "update", "delete")
                    if (value := getattr(request.customTimeouts, key, ""))
                },
            }
            self.records.append(
                ResourceRecord(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent_urn=request.parent or None,
                    custom=bool(request.custom),
                    inputs=masked,
                    options={k: v for k, v in options.items() if v},
                    engine_inputs=engine,
                    secret_paths=tuple(secrets),
                    dependencies=tuple(sorted(request.dependencies)),
                    engine_urn=engine_urn,
                    aliases=self._alias_urns(request, response.urn),
                    id=response.id or None,
                    outputs=_walk(rpc.deserialize_properties(response.object, keep_unknowns=True), "", [], unwrap=True)
                    if response.object is not None
                    else {},
                )
            )
        return response


@dataclass
class OfflineRun:
    records: list[ResourceRecord]
    outputs: dict[str, Any]  # stack outputs, display-safe
    mocks: OfflineMocks


def run_offline(
    program: Callable[[], Any],
    *,
    project: str,
    stack: str,
    mocks: OfflineMocks,
    preview: bool,
) -> OfflineRun:
    """Run ``program`` under ``mocks`` on a fresh event loop in an isolated context.

    ``program`` may return a mapping of stack outputs; they come back resolved, with
    secrets masked and unknowns (a preview's computed values) marked."""
    monitor = RecordingMonitor(mocks)
    returned: dict[str, Any] = {}
    outputs: dict[str, Any] = {}

    def body() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            set_mocks(mocks, project=project, stack=stack, preview=preview, monitor=monitor)

            def run() -> Any:
                result = program()
                if isinstance(result, Mapping):
                    returned.update(result)
                return result

            loop.run_until_complete(run_pulumi_func(run))

            async def resolve(value: Any) -> Any:
                if not isinstance(value, pulumi.Output):
                    return _walk(value, "", [], unwrap=False)
                if await value.is_secret():
                    return SECRET_MASK
                if not await value.is_known():
                    return UNKNOWN_MASK
                return _walk(await value.future(), "", [], unwrap=False)

            for key, value in returned.items():
                outputs[key] = loop.run_until_complete(resolve(value))
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    contextvars.copy_context().run(body)
    return OfflineRun(records=monitor.records, outputs=outputs, mocks=mocks)


def offline_mocks(stack_plan: StackPlan | ImagesStackConfig, *, preview: bool) -> OfflineMocks:
    if isinstance(stack_plan, ImagesStackConfig):
        return OfflineMocks(region=stack_plan.region, preview=preview)
    return OfflineMocks(
        region=stack_plan.config.region,
        preview=preview,
        capacity_block_instance_type=stack_plan.plan.layout.instance_type,
    )


def run_stack(stack_plan: StackPlan | ImagesStackConfig, *, preview: bool) -> OfflineRun:
    """The real program for a fleet's ``stack_plan`` (or an image-build stack's config, which
    has no sizing plan) under the offline mocks; dispatched like infra/program/__main__.py."""
    from infra.program.images import deploy_images
    from infra.program.stack import deploy

    mocks = offline_mocks(stack_plan, preview=preview)
    if isinstance(stack_plan, ImagesStackConfig):
        images = stack_plan
        return run_offline(
            lambda: deploy_images(images), project=PROJECT, stack=images.stack, mocks=mocks, preview=preview
        )
    fleet = stack_plan
    return run_offline(lambda: deploy(fleet), project=PROJECT, stack=fleet.config.stack, mocks=mocks, preview=preview)


def preview_resources(stack_plan: StackPlan | ImagesStackConfig, *, preview: bool) -> list[ResourceRecord]:
    """Every resource the program declares for ``stack_plan``, ordered by name (declaration
    order depends on when outputs resolve, so it is not stable)."""
    return sorted(run_stack(stack_plan, preview=preview).records, key=lambda r: (r.name, r.type))


# What the tree shows per type; resources_json keeps every input.
KEY_PROPERTIES: dict[str, tuple[str, ...]] = {
    "aws:ec2/vpc:Vpc": ("cidrBlock",),
    "aws:ec2/subnet:Subnet": ("availabilityZone", "cidrBlock"),
    "aws:ec2/vpcEndpoint:VpcEndpoint": ("serviceName", "vpcEndpointType"),
    "aws:ec2/securityGroup:SecurityGroup": ("description",),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": ("ipProtocol", "fromPort", "toPort", "cidrIpv4", "referencedSecurityGroupId"),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": ("ipProtocol", "fromPort", "toPort", "cidrIpv4"),
    "aws:secretsmanager/secret:Secret": ("name", "recoveryWindowInDays"),
    "aws:secretsmanager/secretVersion:SecretVersion": ("secretString",),
    "aws:lb/loadBalancer:LoadBalancer": ("loadBalancerType", "internal", "idleTimeout"),
    "aws:lb/targetGroup:TargetGroup": ("protocol", "port", "deregistrationDelay", "loadBalancingAlgorithmType"),
    "aws:lb/listener:Listener": ("protocol", "port", "sslPolicy"),
    "aws:lb/listenerRule:ListenerRule": ("priority", "conditions"),
    "aws:ec2/launchTemplate:LaunchTemplate": ("instanceType", "imageId"),
    "aws:autoscaling/group:Group": ("minSize", "maxSize", "desiredCapacity", "healthCheckType", "healthCheckGracePeriod"),
    "aws:ec2/placementGroup:PlacementGroup": ("strategy",),
    "aws:cloudwatch/logGroup:LogGroup": ("name", "retentionInDays"),
    "aws:iam/rolePolicyAttachment:RolePolicyAttachment": ("policyArn",),
    "aws:imagebuilder/component:Component": ("version",),
    "aws:imagebuilder/imageRecipe:ImageRecipe": ("parentImage",),
    "aws:imagebuilder/infrastructureConfiguration:InfrastructureConfiguration": ("instanceTypes",),
}


def _brief(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        parts = []
        for item in value:
            for cond in item.values():
                if isinstance(cond, dict) and "values" in cond:
                    parts.append(",".join(map(str, cond["values"])))
        if parts:
            return " ".join(parts)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def resource_tree_text(records: Sequence[ResourceRecord]) -> str:
    """An indented tree, components first-level under the stack: ``type name  key=value …``."""
    children: dict[str | None, list[ResourceRecord]] = {}
    known = {r.urn for r in records}
    for record in sorted(records, key=lambda r: (r.name, r.type)):
        parent = record.parent_urn if record.parent_urn in known else None
        children.setdefault(parent, []).append(record)
    lines: list[str] = []

    def emit(parent: str | None, depth: int) -> None:
        for record in children.get(parent, []):
            props = [
                f"{key}={_brief(record.inputs[key])}"
                for key in KEY_PROPERTIES.get(record.type, ())
                if record.inputs.get(key) not in (None, "", [], {})
            ]
            label = record.type if record.custom else f"{record.type} (component)"
            lines.append("  " * depth + f"{label} {record.name}" + (f"  {' '.join(props)}" if props else ""))
            emit(record.urn, depth + 1)

    emit(None, 0)
    return "\n".join(lines) + "\n"


def resources_json(records: Sequence[ResourceRecord]) -> str:
    """All records as JSON: type, name, parent (type and name), custom, inputs, options."""
    by_urn = {r.urn: r for r in records}
    docs = []
    for record in sorted(records, key=lambda r: (r.name, r.type)):
        parent = by_urn.get(record.parent_urn or "")
        docs.append(
            {
                "type": record.type,
                "name": record.name,
                "parent": {"type": parent.type, "name": parent.name} if parent else None,
                "custom": record.custom,
                "inputs": record.inputs,
                "options": record.options,
            }
        )
    return json.dumps(docs, indent=2, sort_keys=True) + "\n"
