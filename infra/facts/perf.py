"""Facts of the serving performance model (``infra/facts/data/perf_model.yaml``): the pinned
estimator and its systems, the workload defaults, the served calibrations, vLLM's server
defaults per GPU tier (``vllm.yaml``) and the recorded GPU measurements they were fitted from.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.facts.catalog import DATA_DIR, Gpu
from infra.facts.fact import Cited, read_yaml
from infra.facts.workload import Workload


class PackagePin(Cited):
    name: str
    version: str


class SystemEntry(Cited):
    system: str | None
    database_version: str | None


class WorkloadDefaults(Cited):
    input_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)
    ttft_p95_ms: float = Field(gt=0)
    itl_p95_ms: float = Field(gt=0)


class ServedCalibration(Cited):
    """Measured ÷ predicted for a served replica at saturation, the geometric mean over the
    recorded runs of gpu_measurements.yaml that `fitted_from` names (each by its flags and its
    `source`); applies to the GPUs listed, for one GEMM mode."""

    gpus: list[str]
    gemm_mode: str
    fitted_from: list[dict[str, Any]] = Field(min_length=1)
    output_tokens_per_s: float = Field(gt=0)
    itl: float = Field(gt=0)


class PerfModelFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    package: PackagePin
    backend: str
    systems: dict[str, SystemEntry]
    gemm_quant_modes: dict[str, str]
    gemm_quant_modes_source: str
    gemm_quant_modes_read: dt.date
    proxies: dict[str, str]
    batch_sizes: list[int]
    workload_defaults: WorkloadDefaults
    served_calibrations: list[ServedCalibration]

    def served_calibration(self, gpu_key: str, quantization: str) -> ServedCalibration | None:
        mode = self.gemm_quant_modes.get(quantization)
        return next((c for c in self.served_calibrations if gpu_key in c.gpus and c.gemm_mode == mode), None)


class ServerDefaultTier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_memory_gib: float
    excluded_name_substring: str | None
    max_num_seqs: int
    max_num_batched_tokens: int


class ServerDefaults(Cited):
    tiers: list[ServerDefaultTier]


class MeasuredPoint(BaseModel):
    """One rate of a sweep; None where the run's record did not keep the value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_rate: float | Literal["inf"]
    # The requests the rate offered (bench.py prompts_for_rate); at inf all of them at once, so
    # the saturated batch is this or the server's cap, whichever is smaller.
    num_prompts: int | None = Field(default=None, ge=1)
    output_tokens_per_s: float | None = Field(default=None, ge=0)
    requests_per_s: float | None = Field(default=None, ge=0)
    goodput_requests_per_s: float | None = Field(default=None, ge=0)
    ttft_p95_ms: float | None = Field(default=None, ge=0)
    tpot_p95_ms: float | None = Field(default=None, ge=0)
    itl_p95_ms: float | None = Field(default=None, ge=0)
    slo_met: bool | None = None


class GpuMeasurement(Cited):
    """One server configuration measured with infra/ops/bench.py (gpu_measurements.yaml)."""

    model: str
    quantization: str
    gpu: str
    tensor_parallel_size: int = Field(ge=1)
    vllm_version: str
    weights: Literal["dummy", "real"]
    server_flags: dict[str, int | None]
    flags_from: Literal["planner", "vllm-defaults", "seed-guide", "sweep"]
    # reused-across-rates: every rate's run opened with the earlier rates' prompts (one dataset
    # seed for the whole sweep, before infra/ops/bench.py rate_seed), so after the first rate the
    # server's prefix cache served part of the prefill and the point overstates the replica.
    prompts: Literal["fresh-per-rate", "reused-across-rates"]
    workload: dict[str, float]
    predicted: dict[str, float] | None = None
    points: list[MeasuredPoint]


class GpuMeasurements(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: list[GpuMeasurement]


def gpu_measurements() -> GpuMeasurements:
    return GpuMeasurements.model_validate(read_yaml(DATA_DIR / "gpu_measurements.yaml"))


def fitted_runs(cal: ServedCalibration, measurements: GpuMeasurements) -> list[GpuMeasurement]:
    """The recorded runs a calibration names (each by model, quantization, GPU, flags and a
    part of its `source`). A run whose rates reused each other's prompts cannot be one: its
    saturated point was served partly from the prefix cache (gpu_measurements.yaml)."""
    runs = []
    for fit in cal.fitted_from:
        named = [
            r for r in measurements.runs
            if (r.model, r.quantization, r.gpu) == (fit["model"], fit["quantization"], fit["gpu"])
            and r.server_flags == {"max_num_seqs": fit["max_num_seqs"], "max_num_batched_tokens": fit["max_num_batched_tokens"]}
            and fit["source"] in r.source
        ]
        if len(named) != 1:
            raise ValueError(f"served_calibrations fitted_from {fit}: names {len(named)} runs of gpu_measurements.yaml, not 1")
        if named[0].prompts != "fresh-per-rate":
            raise ValueError(
                f"served_calibrations fitted_from {fit}: that run's rates reused each other's prompts "
                "(prompts: reused-across-rates), so its saturated point was served partly from the prefix cache"
            )
        runs.append(named[0])
    return runs


@cache
def perf_facts() -> PerfModelFacts:
    facts = PerfModelFacts.model_validate(read_yaml(DATA_DIR / "perf_model.yaml"))
    measurements = gpu_measurements()
    for cal in facts.served_calibrations:
        fitted_runs(cal, measurements)
    return facts


@cache
def _server_defaults() -> ServerDefaults:
    return ServerDefaults.model_validate(read_yaml(DATA_DIR / "vllm.yaml")["server_defaults"])


def vllm_server_defaults(gpu: Gpu) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) that `vllm serve` picks by itself on this GPU."""
    for tier in _server_defaults().tiers:
        excluded = tier.excluded_name_substring
        if gpu.memory_gib >= tier.min_memory_gib and not (excluded and excluded in gpu.name.lower()):
            return tier.max_num_seqs, tier.max_num_batched_tokens
    raise ValueError(f"vllm.yaml server_defaults has no tier for {gpu.name}")  # the last tier has min 0


def default_workload() -> Workload:
    d = perf_facts().workload_defaults
    return Workload(d.input_tokens, d.output_tokens, d.ttft_p95_ms, d.itl_p95_ms)
