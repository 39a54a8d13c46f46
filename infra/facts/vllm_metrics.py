"""The metric catalog: every series the fleet's exporters publish, as
``infra/facts/data/vllm_metrics.yaml`` states it (cited per exporter).

Monitoring rules and dashboards, the scaling signals and the config's TTFT SLO check all name
metrics from here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from infra.facts.catalog import DATA_DIR
from infra.facts.fact import Cited, Strict, read_yaml

METRICS_FILE = DATA_DIR / "vllm_metrics.yaml"


class ExportedMetric(Strict):
    name: str = Field(pattern=r"^[A-Za-z_:][A-Za-z0-9_:]*$")
    type: Literal["counter", "gauge", "histogram", "summary"]
    labels: list[str]
    source: str | None = None
    buckets: str | None = Field(default=None, description="histogram bucket family")
    default_enabled: bool = True

    @property
    def series_names(self) -> set[str]:
        """Every name PromQL may use for this metric's samples."""
        if self.type == "histogram":
            return {f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        if self.type == "summary":
            return {f"{self.name}_{suffix}" for suffix in ("sum", "count")}
        return {self.name}


class Exporter(Cited):
    description: str
    version: str
    namespace: str | None = Field(default=None, description="set for CloudWatch namespaces, not PromQL")
    metrics: list[ExportedMetric]


class BucketFamily(Strict):
    constant: str
    bounds: list[float] | None


class HistogramBuckets(Cited):
    families: dict[str, BucketFamily]


class MetricCatalog(Strict):
    exporters: dict[str, Exporter]
    histogram_buckets: HistogramBuckets

    @model_validator(mode="after")
    def _histograms_name_known_families(self) -> MetricCatalog:
        for exporter in self.exporters.values():
            for metric in exporter.metrics:
                if metric.buckets is not None and metric.buckets not in self.histogram_buckets.families:
                    raise ValueError(f"{metric.name} names unknown bucket family {metric.buckets!r}")
        return self

    def promql_series_names(self) -> set[str]:
        """Names a PromQL expression may select: every Prometheus exporter's series."""
        return {
            series
            for exporter in self.exporters.values()
            if exporter.namespace is None
            for metric in exporter.metrics
            for series in metric.series_names
        }

    def cloudwatch_metrics(self, namespace: str) -> set[str]:
        return {
            metric.name
            for exporter in self.exporters.values()
            if exporter.namespace == namespace
            for metric in exporter.metrics
        }

    def bucket_bounds(self, metric_name: str) -> list[float]:
        for exporter in self.exporters.values():
            for metric in exporter.metrics:
                if metric.name == metric_name and metric.buckets is not None:
                    bounds = self.histogram_buckets.families[metric.buckets].bounds
                    if bounds is None:
                        raise ValueError(f"{metric_name} has bounds that depend on the server's config")
                    return bounds
        raise KeyError(metric_name)


def load_metric_catalog(path: Path = METRICS_FILE) -> MetricCatalog:
    return MetricCatalog.model_validate(read_yaml(path))


@cache
def default_metric_catalog() -> MetricCatalog:
    return load_metric_catalog()

