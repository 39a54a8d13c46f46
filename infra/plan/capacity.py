"""The fleet's capacity decisions: its Auto Scaling groups, root volume, drain and deletion
timeouts. Pure values the Fleet component (infra/components/fleet.py) declares as resources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.config import StackConfig
from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import default_catalog
from infra.plan.planner import GiB, Layout, serving_facts
from infra.plan.scaling import instances_for, scaling_policy_spec
from infra.plan.stack import StackPlan

# A gang's launch hook ("gang-ready") must exist before the group's first instance, so it is
# one of the group's initial_lifecycle_hooks, which the provider marks ForceNew
# (aws_fleet.yaml initial_lifecycle_hook_force_new). Its timeout is therefore a constant, never
# derived from the plan: the node records a heartbeat every 25 s while its gang starts
# (infra/plan/node/spec.py heartbeat_interval_s), so this only bounds how long a silent node (dead
# before its watcher ran) holds capacity before ABANDON gives it back.
GANG_READY_HEARTBEAT_S = 900
# Added to the drain hook's heartbeat: the node's own bookkeeping around the two waits.
DRAIN_MARGIN_S = 60
# After the drain hook: EC2's own shutdown and termination of a GPU node (EFA interfaces, EBS).
TERMINATION_MARGIN_S = 600
# Weights are downloaded to the root volume unless they arrive on instance-store NVMe.
ROOT_VOLUME_WITHOUT_WEIGHTS = ("local-nvme",)
# Weights baked into the image's root snapshot and read as EBS fetches each block (ebs-lazy):
# the planner times that source at a rate EBS only guarantees when the volume is created with a
# provisioned volume initialization rate. ebs-initialized (fast snapshot restore, or a volume
# written at boot) must not set one: a rate on an FSR-enabled snapshot replaces FSR with it.
PROVISIONED_INITIALIZATION_SOURCES = ("ebs-lazy",)
# Weights already in the image's root snapshot.
IMAGE_WEIGHT_SOURCES = ("ebs-lazy", "ebs-initialized")
MiB = 1024**2


@dataclass(frozen=True)
class GroupSpec:
    """One Auto Scaling group: the single fleet group, or one gang."""

    key: str  # "fleet" or "gang-<i>"
    min_size: int
    max_size: int
    desired: int
    gang_index: int | None = None
    scaled: bool = False  # desired capacity belongs to the scaler, not to Pulumi


@dataclass(frozen=True)
class CapacityLayout:
    nodes_per_replica: int
    replicas_per_node: int
    min_instances: int
    max_instances: int
    groups: tuple[GroupSpec, ...]

    @property
    def gangs(self) -> bool:
        return self.nodes_per_replica > 1


def capacity_layout(config: StackConfig, layout: Layout) -> CapacityLayout:
    """The groups to create, after the checks that must fail before any resource exists."""
    cap = config.capacity
    npr, rpn = layout.nodes_per_replica, layout.replicas_per_node
    min_instances, max_instances = instances_for(cap.min_replicas, layout), instances_for(cap.max_replicas, layout)
    if npr > 1:
        if cap.market == "spot":
            raise FleetError(
                f"vllm-fleet:capacity.market = \"spot\": the plan spans {npr} nodes per replica, and one "
                "reclaimed node stops the whole replica; use on-demand or capacity-block"
            )
        groups = tuple(
            GroupSpec(
                key=f"gang-{i}",
                min_size=npr if i < cap.min_replicas else 0,
                max_size=npr,
                desired=npr if i < cap.min_replicas else 0,
                gang_index=i,
                scaled=i >= cap.min_replicas,
            )
            for i in range(cap.max_replicas)
        )
        return CapacityLayout(npr, rpn, min_instances, max_instances, groups)
    # A rolling refresh (and a health replacement) launches the new node before the old
    # one stops. At the group's floor that needs one node of headroom below max_size.
    if max_instances < min_instances + 1:
        # One more node than the floor: the first replica that needs it.
        wanted = min_instances * rpn + 1
        raise FleetError(
            f"vllm-fleet:capacity: {cap.min_replicas}..{cap.max_replicas} replicas at {rpn} per "
            f"{layout.instance_type} node is {min_instances}..{max_instances} node(s); replacing a node "
            f"without losing capacity needs room for one more node: set maxReplicas to {wanted} or more"
        )
    group = GroupSpec(
        key="fleet",
        min_size=min_instances,
        max_size=max_instances,
        desired=min_instances,
        scaled=max_instances > min_instances,
    )
    return CapacityLayout(npr, rpn, min_instances, max_instances, (group,))


@dataclass(frozen=True)
class RootVolume:
    """A node's root volume: the planned size, the weights a node downloads onto it, and the
    provisioned initialization rate (None where EBS must initialize by its own means)."""

    planned_gib: int
    downloaded_gib: int
    initialization_rate_mib_s: int | None

    def for_image(self, snapshot_gib: int) -> int:
        """The planned root volume, but never smaller than the image's root snapshot plus the
        weights a node downloads onto it: EC2 refuses a volume smaller than its snapshot, and a
        baked image (venv, caches, staged weights) can outgrow the planned base."""
        return max(self.planned_gib, snapshot_gib + self.downloaded_gib)


def root_volume(weights_source: str, weights_bytes: int) -> RootVolume:
    weights_gib = math.ceil(weights_bytes / GiB)
    base = serving_facts().defaults.root_volume_base_gib
    planned = base if weights_source in ROOT_VOLUME_WITHOUT_WEIGHTS else base + weights_gib
    downloads = weights_source not in (*ROOT_VOLUME_WITHOUT_WEIGHTS, *IMAGE_WEIGHT_SOURCES)
    return RootVolume(planned, weights_gib if downloads else 0, volume_initialization_rate_mib_s(weights_source))


def volume_initialization_rate_mib_s(weights_source: str) -> int | None:
    """The root volume's provisioned initialization rate: the planner's figure for the source
    (infra/facts/data/weight_sources.yaml), or None where EBS must initialize by its own means."""
    if weights_source not in PROVISIONED_INITIALIZATION_SOURCES:
        return None
    return round(default_catalog().weight_sources[weights_source].throughput_mb_s * 1_000_000 / MiB)


def drain_heartbeat_s(deregistration_delay_s: int, shutdown_timeout_s: int) -> int:
    """The termination hook's timeout: first the load balancer drains the node (its
    deregistration delay), then vLLM drains its own in-flight requests (--shutdown-timeout)."""
    heartbeat = deregistration_delay_s + shutdown_timeout_s + DRAIN_MARGIN_S
    bounds = aws_fleet_facts().lifecycle_hook_heartbeat_s.value
    if heartbeat > bounds.max:
        raise FleetError(
            f"vllm-fleet:serving.shutdownTimeoutS = {shutdown_timeout_s}: draining takes {deregistration_delay_s} s "
            f"(load balancer) + {shutdown_timeout_s} s (vLLM) + {DRAIN_MARGIN_S} s = {heartbeat} s; "
            f"a lifecycle hook waits at most {bounds.max} s"
        )
    return max(heartbeat, bounds.min)


def scheduled_min_groups(stack_plan: StackPlan) -> frozenset[str]:
    """The groups whose min_size the night schedule owns (infra/plan/scaling.py NightFloor): Pulumi
    must not diff it, or every nightly drift check reports the schedule's value as drift."""
    night = scaling_policy_spec(stack_plan).night
    if night is None:
        return frozenset()
    if stack_plan.plan.layout.nodes_per_replica > 1:
        return frozenset(f"gang-{k}" for k in night.gang_indices)
    return frozenset({"fleet"})


def group_delete_timeout_s(drain_s: int) -> int:
    """How long Pulumi waits for a group to delete: every node first runs its drain hook
    (up to ``drain_s``), then EC2 terminates it. The provider's default (10 min, group.go
    Timeouts.Delete) is shorter than a gang's drain plus termination."""
    return drain_s + TERMINATION_MARGIN_S


def root_snapshot_gib(root_device_name: str, block_device_mappings: Sequence[Any]) -> int:
    """Size of the AMI's root EBS snapshot, from ``ec2.get_ami``'s block device mappings."""
    for mapping in block_device_mappings:
        device = mapping["device_name"] if isinstance(mapping, Mapping) else mapping.device_name
        ebs = mapping["ebs"] if isinstance(mapping, Mapping) else mapping.ebs
        if device == root_device_name and ebs and ebs.get("volume_size"):
            return int(ebs["volume_size"])
    raise FleetError(f"base AMI: no EBS volume size for its root device {root_device_name!r}")
