"""What a stack costs per hour: GPU nodes by region and market, plus the fixed parts.

Pure: prices come from the data files (infra/facts/data/instances.yaml for GPU types,
infra/facts/data/fixed_prices.yaml for NAT gateways, the load balancer and the monitoring host),
each with its source and date. Every price says what it is: a catalog price for the stack's
region, a us-east-1 price standing in for another region, or a spot ceiling (AWS sets the
spot price at launch; the on-demand price is the most a spot instance costs). Nothing here
pretends to know a price it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ConfigDict

from infra.facts.catalog import DATA_DIR, Catalog
from infra.facts.fact import read_yaml

# The region whose on-demand prices infra/facts/data/instances.yaml records.
CATALOG_PRICE_REGION = "us-east-1"


class FixedPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float
    source: str
    read: str | object
    instance_type: str | None = None
    unverified: bool = False


class FixedPrices(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nat_gateway_usd_per_hour: FixedPrice
    public_ipv4_usd_per_hour: FixedPrice
    load_balancer_usd_per_hour: FixedPrice
    monitoring_host_usd_per_hour: FixedPrice
    hours_per_month: FixedPrice


@cache
def fixed_prices() -> FixedPrices:
    return FixedPrices.model_validate(read_yaml(DATA_DIR / "fixed_prices.yaml"))


class RegionalPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    on_demand: float
    spot_lowest: float | None
    azs: int


class RegionalPrices(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    read: str | object
    instances: dict[str, dict[str, RegionalPrice]]


@cache
def regional_prices() -> RegionalPrices:
    return RegionalPrices.model_validate(read_yaml(DATA_DIR / "regional_prices.yaml"))


@dataclass(frozen=True)
class Price:
    """An hourly price and what it is (shown next to it wherever it is printed)."""

    usd_per_hour: float | None
    basis: str
    offered: bool = True  # False: the regional catalog lists the type, but not in this region


def instance_price(catalog: Catalog, instance_type: str, region: str, market: str) -> Price:
    """One node's hourly price in ``region`` on ``market``, and its basis."""
    od = catalog.instances[instance_type].on_demand_usd_per_hour
    if od is None:
        return Price(None, "not sold on demand")
    table = regional_prices()
    by_region = table.instances.get(instance_type)
    if by_region is not None:
        dated = f"regional catalog read {table.read}"
        here = by_region.get(region)
        if here is None:
            return Price(None, f"{instance_type} is not offered in {region} ({dated}; offered in "
                               f"{', '.join(sorted(by_region))})", offered=False)
        if market == "spot":
            # Plans and costs use the ceiling: a dated spot observation must not move the choice.
            seen = (f"lowest AZ spot price seen {here.spot_lowest:g}" if here.spot_lowest is not None
                    else "no spot price seen")
            return Price(here.on_demand, f"spot ceiling = on-demand list price, {region}; {seen} in the {dated}; "
                                         "AWS sets the spot price at launch")
        if market == "capacity-block":
            return Price(here.on_demand, f"on-demand list price, {region}, as a stand-in ({dated}); "
                                         "a capacity block is priced when bought")
        return Price(here.on_demand, f"on-demand list price, {region} ({dated})")
    where = "" if region == CATALOG_PRICE_REGION else (
        f"; {region} is not in the price catalog, so this is the {CATALOG_PRICE_REGION} price"
    )
    if market == "spot":
        return Price(od, f"spot ceiling = on-demand list price ({CATALOG_PRICE_REGION}); "
                         f"AWS sets the spot price at launch, usually lower{where}")
    if market == "capacity-block":
        return Price(od, f"on-demand list price ({CATALOG_PRICE_REGION}) as a stand-in; "
                         f"a capacity block is priced when bought{where}")
    return Price(od, f"on-demand list price, {CATALOG_PRICE_REGION}{where}")


@dataclass(frozen=True)
class CostLine:
    what: str
    count_min: int
    count_max: int
    usd_per_hour_each: float
    note: str

    @property
    def min_usd_per_hour(self) -> float:
        return self.count_min * self.usd_per_hour_each

    @property
    def max_usd_per_hour(self) -> float:
        return self.count_max * self.usd_per_hour_each


@dataclass(frozen=True)
class FleetCost:
    lines: tuple[CostLine, ...]
    hours_per_month: float
    excluded: str

    @property
    def min_usd_per_hour(self) -> float:
        return sum(line.min_usd_per_hour for line in self.lines)

    @property
    def max_usd_per_hour(self) -> float:
        return sum(line.max_usd_per_hour for line in self.lines)

    def as_json(self) -> dict[str, object]:
        return {
            "min_usd_per_hour": round(self.min_usd_per_hour, 4),
            "max_usd_per_hour": round(self.max_usd_per_hour, 4),
            "min_usd_per_month": round(self.min_usd_per_hour * self.hours_per_month, 2),
            "max_usd_per_month": round(self.max_usd_per_hour * self.hours_per_month, 2),
            "lines": [
                {"what": line.what, "count_min": line.count_min, "count_max": line.count_max,
                 "usd_per_hour_each": line.usd_per_hour_each, "note": line.note}
                for line in self.lines
            ],
            "excluded": self.excluded,
        }


def fleet_cost(
    *,
    region: str,
    node_price: Price,
    node_type: str,
    nodes_min: int,
    nodes_max: int,
    nat_gateways: int,
    load_balancer: bool,
    public_load_balancer_ips: int,
    monitoring_host: bool,
) -> FleetCost:
    """The fleet's hourly cost at its floor and its ceiling, fixed parts included."""
    fixed = fixed_prices()
    elsewhere = "" if region == CATALOG_PRICE_REGION else f" ({CATALOG_PRICE_REGION} rate)"
    lines = [CostLine(f"GPU node {node_type}", nodes_min, nodes_max, node_price.usd_per_hour or 0.0, node_price.basis)]
    if nat_gateways:
        lines.append(CostLine("NAT gateway", nat_gateways, nat_gateways, fixed.nat_gateway_usd_per_hour.value,
                              f"one per AZ, hourly charge{elsewhere}; data processing per GB extra"))
    ips = nat_gateways + public_load_balancer_ips
    if ips:
        lines.append(CostLine("public IPv4 address", ips, ips, fixed.public_ipv4_usd_per_hour.value,
                              f"NAT gateways' Elastic IPs and a public load balancer's addresses{elsewhere}"))
    if load_balancer:
        lines.append(CostLine("load balancer", 1, 1, fixed.load_balancer_usd_per_hour.value,
                              f"hourly base{elsewhere}; LCUs per traffic extra"))
    if monitoring_host:
        host = fixed.monitoring_host_usd_per_hour
        lines.append(CostLine(f"monitoring host {host.instance_type}", 1, 1, host.value,
                              f"on-demand{elsewhere}" + (" (unverified price)" if host.unverified else "")))
    return FleetCost(
        tuple(lines),
        fixed.hours_per_month.value,
        "excluded: EBS volumes, data transfer, NAT data processing, LCUs, CloudWatch, Secrets Manager",
    )
