"""What a stack's plan tells its reviewer besides the sizing: the whole fleet's cost at its
floor and ceiling, and the defaults in effect that cost money or expose something.

Pure (no Pulumi): the numbers come from the plan, the scaling layout rule and the price files.
"""

from __future__ import annotations

import json

from infra.config import PROJECT, StackConfig
from infra.facts.catalog import default_catalog
from infra.plan.pricing import FleetCost, fleet_cost, instance_price
from infra.plan.scaling import instances_for
from infra.plan.stack import StackPlan

# Keys whose default costs money or exposes something, and what the default means. A default
# the stack file does not set is printed by `plan`, so nobody runs one without seeing it.
CONSEQUENTIAL_DEFAULTS: dict[tuple[str, str], str] = {
    ("capacity", "min_replicas"): "GPU replicas that run (and bill) around the clock",
    ("capacity", "market"): "how GPU nodes are bought",
    ("network", "mode"): "new: a VPC is created for the stack",
    ("network", "egress"): "nat: one NAT gateway per AZ, billed hourly and per GB",
    ("network", "availability_zones"): "AZs spanned (one NAT gateway each with egress nat)",
    ("endpoint", "internal"): "true: the endpoint is reachable only from inside the VPC",
    ("endpoint", "allowed_cidrs"): "client networks allowed to reach the endpoint",
    ("serving", "weights_source"): "where nodes read weights at boot (huggingface: through the NAT gateways)",
}


def defaults_in_effect(config: StackConfig) -> list[str]:
    """``section.key = value (default): meaning`` for each consequential key the file leaves out."""
    found = []
    for (section_name, field), meaning in CONSEQUENTIAL_DEFAULTS.items():
        section = getattr(config, section_name)
        if field in section.model_fields_set:
            continue
        alias = type(section).model_fields[field].alias or field
        value = getattr(section, field)
        found.append(f"{PROJECT}:{section_name}.{alias} = {json.dumps(value)} (default): {meaning}")
    return found


def stack_fleet_cost(stack_plan: StackPlan) -> FleetCost:
    """The fleet at minReplicas and at maxReplicas, with the NAT gateways, the load balancer
    and the monitoring host it always runs."""
    config, plan = stack_plan.config, stack_plan.plan
    layout = plan.layout
    network = config.network
    nat = network.availability_zones if network.mode == "new" and network.egress == "nat" else 0
    public_lb = 0 if config.endpoint.internal else network.availability_zones
    return fleet_cost(
        region=config.region,
        node_price=instance_price(default_catalog(), layout.instance_type, config.region, config.capacity.market),
        node_type=layout.instance_type,
        nodes_min=instances_for(config.capacity.min_replicas, layout),
        nodes_max=instances_for(config.capacity.max_replicas, layout),
        nat_gateways=nat,
        load_balancer=True,
        public_load_balancer_ips=public_lb,
        monitoring_host=config.monitoring.mode == "self-hosted",
    )
