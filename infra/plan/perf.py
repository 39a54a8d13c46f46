"""The serving performance model: from a layout and a workload to vLLM's batch flags and the
latency and throughput one replica delivers at the stack's SLO.

Predictions come from NVIDIA AIConfigurator's core estimator (``aiconfigurator-core``,
pinned and cited in infra/facts/data/perf_model.yaml), in its continuous-batching ("agg") mode:
the steady state of a vLLM replica running ``batch`` requests, with prefill chunks of
``--max-num-batched-tokens`` mixed into decode steps. Pure apart from that library's own
file reads (its database, and the config.json it reads the architecture from).

Where it has no data (no database for the GPU, an architecture or quantization it does
not model, or the package is not installed: it is an optional extra) the plan falls back
to memory alone, and ``reason`` says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from infra.facts.catalog import Gpu, ModelArch
from infra.facts.perf import perf_facts, vllm_server_defaults
from infra.facts.workload import Workload


@dataclass(frozen=True)
class Performance:
    """One replica at a batch of ``batch`` requests, in steady state (AIConfigurator agg mode)."""

    batch: int
    ttft_ms: float
    itl_ms: float
    output_tokens_per_s: float
    requests_per_s: float

    @property
    def e2e_s(self) -> float:
        return self.batch / self.requests_per_s if self.requests_per_s else math.inf

    def meets(self, workload: Workload) -> bool:
        return self.ttft_ms <= workload.ttft_p95_ms and self.itl_ms <= workload.itl_p95_ms


@dataclass(frozen=True)
class ServingPoint:
    """The batch flags for one candidate layout, and what they deliver."""

    max_num_seqs: int
    max_num_batched_tokens: int
    performance: Performance | None  # None: no prediction (reason says why)
    meets_slo: bool | None  # None when not predicted
    reason: str  # how max_num_seqs was chosen, or why there is no prediction
    best_unconstrained: Performance | None = None  # batch 1's figures when even that misses

    def usd_per_million_output_tokens(self, hourly_usd: float | None) -> float | None:
        if hourly_usd is None or self.performance is None or not self.meets_slo:
            return None
        return hourly_usd / (self.performance.output_tokens_per_s * 3600) * 1e6


def aiconfigurator_missing() -> str | None:
    """Why the estimator cannot run here, or None when it can."""
    try:
        import aiconfigurator_core  # noqa: F401
    except ImportError:
        pin = perf_facts().package
        return f"{pin.name} is not installed (pip install '{pin.name}=={pin.version}', or the 'perf' extra)"
    return None


def _hf_config(arch: ModelArch) -> dict[str, Any]:
    """A config.json for AIConfigurator, written from the catalog's architecture facts."""
    model_type = {
        "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral",
        "MistralForCausalLM": "mistral", "Qwen3ForCausalLM": "qwen3",
    }.get(arch.architecture, arch.architecture.lower())
    doc: dict[str, Any] = {
        "architectures": [arch.architecture],
        "model_type": model_type,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": arch.torch_dtype,
    }
    if arch.num_experts:
        doc["num_local_experts"] = arch.num_experts
        doc["num_experts_per_tok"] = arch.num_experts_per_tok
    return doc


def _model_dir(arch: ModelArch) -> str:
    """AIConfigurator reads a model from a directory holding config.json; one per architecture."""
    text = json.dumps(_hf_config(arch), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / "vllm-fleet-aiconfigurator" / digest
    path = directory / "config.json"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"config.json.{digest}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(directory)


@cache
def _database(system: str, version: str) -> Any:
    from aiconfigurator_core.sdk.perf_database import get_database

    return get_database(system, perf_facts().backend, version)


@cache
def _engine(arch: ModelArch, quantization: str, tp: int, pp: int) -> Any:
    from aiconfigurator_core.sdk import common, config
    from aiconfigurator_core.sdk.models import get_model

    mode = perf_facts().gemm_quant_modes[quantization]
    model_config = config.ModelConfig(
        tp_size=tp,
        pp_size=pp,
        gemm_quant_mode=common.GEMMQuantMode[mode],
        kvcache_quant_mode=common.KVCacheQuantMode.bfloat16,
        fmha_quant_mode=common.FMHAQuantMode.bfloat16,
    )
    if arch.num_experts:
        model_config.moe_quant_mode = common.MoEQuantMode[mode] if mode in common.MoEQuantMode.__members__ else None
        model_config.moe_tp_size, model_config.moe_ep_size = tp, 1
    return get_model(_model_dir(arch), model_config, perf_facts().backend)


@cache
def _backend(arch: ModelArch, quantization: str, system: str, version: str, tp: int, pp: int) -> Any:
    """One backend per model and layout: it caches compiled engines (the slow part), but its
    result cache is keyed by request shapes only, not by model, so it must not be shared."""
    from aiconfigurator_core.sdk.backends.factory import get_backend

    return get_backend(perf_facts().backend)


@cache
def _predict(
    arch: ModelArch, quantization: str, system: str, version: str, tp: int, pp: int,
    input_tokens: int, output_tokens: int, batched_tokens: int, batch: int,
) -> Performance:
    from aiconfigurator_core.sdk import config

    runtime = config.RuntimeConfig(batch_size=batch, isl=input_tokens, osl=output_tokens)
    # A step carries at most --max-num-batched-tokens of prefill, and never more than the
    # batch's prompts hold (AIConfigurator would otherwise model a full 8k-token step at batch 1).
    ctx_tokens = min(batched_tokens, batch * input_tokens)
    summary = _backend(arch, quantization, system, version, tp, pp).run_agg(
        _engine(arch, quantization, tp, pp), _database(system, version), runtime, ctx_tokens=ctx_tokens
    )
    row = summary.get_summary_df().iloc[0]
    return Performance(
        batch=batch,
        ttft_ms=float(row["ttft"]),
        itl_ms=float(row["tpot"]),
        output_tokens_per_s=float(row["tokens/s"]),
        requests_per_s=float(row["seq/s"]),
    )


_NO_DATA: dict[tuple[Any, ...], str] = {}


def predict(
    arch: ModelArch, quantization: str, gpu_key: str, tp: int, pp: int, workload: Workload,
    batched_tokens: int, batch: int,
) -> Performance:
    """One prediction; raises LookupError when there is no model for it (the message says why)."""
    entry = perf_facts().systems.get(gpu_key)
    if entry is None or entry.system is None or entry.database_version is None:
        raise LookupError(f"no AIConfigurator data for {gpu_key}")
    missing = aiconfigurator_missing()
    if missing:
        raise LookupError(missing)
    # The estimator logs every fallback table it loads; the planner's output says what matters.
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    engine_key = (arch, quantization, entry.system, entry.database_version, tp, pp)
    if engine_key in _NO_DATA:
        raise LookupError(_NO_DATA[engine_key])
    try:
        return _predict(
            arch, quantization, entry.system, entry.database_version, tp, pp,
            workload.input_tokens, workload.output_tokens, batched_tokens, batch,
        )
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as err:  # aiconfigurator_core.sdk.errors
        detail = str(err).splitlines()[0].split(" at /")[0][:160] if str(err) else type(err).__name__
        # Missing tables fail every batch size alike: remember, so the search asks once.
        _NO_DATA[engine_key] = (
            f"AIConfigurator cannot model {arch.architecture} {quantization} on {entry.system} ({detail})"
        )
        raise LookupError(_NO_DATA[engine_key]) from None


def predict_served(
    arch: ModelArch, quantization: str, gpu_key: str, tp: int, pp: int, workload: Workload,
    batched_tokens: int, batch: int,
) -> Performance:
    """A served replica: AIConfigurator's steady state with the measured calibration for this GPU
    and GEMM mode applied (tokens/s and requests/s scaled, inter-token time mapped to the
    measured p95), or the raw prediction where nothing was measured. TTFT stays raw: the runs
    met it with room, and uncalibrated it errs high (perf_model.yaml)."""
    raw = predict(arch, quantization, gpu_key, tp, pp, workload, batched_tokens, batch)
    cal = perf_facts().served_calibration(gpu_key, quantization)
    if cal is None:
        return raw
    return dataclasses.replace(
        raw,
        itl_ms=raw.itl_ms * cal.itl,
        output_tokens_per_s=raw.output_tokens_per_s * cal.output_tokens_per_s,
        requests_per_s=raw.requests_per_s * cal.output_tokens_per_s,
    )


def serving_point(
    arch: ModelArch, quantization: str, gpu_key: str, gpu: Gpu, tp: int, pp: int,
    kv_cache_tokens: int, workload: Workload, *, predict_performance: bool = True,
) -> ServingPoint:
    """--max-num-seqs: the largest batch whose predicted TTFT and ITL meet the SLO, within the
    KV cache (each request holds input + output tokens) and vLLM's own default cap;
    --max-num-batched-tokens: vLLM's hardware-tuned default for the GPU."""
    default_seqs, batched = vllm_server_defaults(gpu)
    per_request = workload.input_tokens + workload.output_tokens
    kv_cap = max(1, kv_cache_tokens // per_request)
    cap = min(default_seqs, kv_cap)
    cap_reason = (
        f"vLLM's default {default_seqs} for {gpu.name}" if default_seqs <= kv_cap
        else f"the KV cache ({kv_cache_tokens:,} tokens ÷ {per_request:,} per request)"
    )
    sizes = [b for b in perf_facts().batch_sizes if b <= cap]
    if not sizes or sizes[-1] != cap:
        sizes.append(cap)
    try:
        if not predict_performance:
            raise LookupError("memory-only sizing requested")
        first = predict_served(arch, quantization, gpu_key, tp, pp, workload, batched, sizes[0])
    except LookupError as err:
        return ServingPoint(
            cap, batched, None, None,
            f"{err}: memory-only plan, --max-num-seqs {cap} from {cap_reason}; latency not predicted",
        )
    if not first.meets(workload):
        return ServingPoint(
            1, batched, first, False,
            f"misses the SLO even at batch 1: TTFT {first.ttft_ms:,.0f} ms, ITL {first.itl_ms:.1f} ms",
            first,
        )
    # TTFT and ITL grow with the batch: binary search for the last size that meets the SLO.
    lo, hi, best = 0, len(sizes) - 1, first
    while lo < hi:
        mid = (lo + hi + 1) // 2
        perf = predict_served(arch, quantization, gpu_key, tp, pp, workload, batched, sizes[mid])
        if perf.meets(workload):
            lo, best = mid, perf
        else:
            hi = mid - 1
    limit = "the SLO" if best.batch < cap else cap_reason
    proxy = perf_facts().proxies.get(quantization)
    return ServingPoint(
        best.batch, batched, best, True,
        f"largest batch within {limit}" + (f"; {quantization} {proxy}" if proxy else "") + _calibration_note(gpu_key, quantization),
    )


def _calibration_note(gpu_key: str, quantization: str) -> str:
    cal = perf_facts().served_calibration(gpu_key, quantization)
    if cal is None:
        return "; not calibrated by a served measurement on this GPU"
    runs = cal.fitted_from
    return (f"; calibrated by {len(runs)} served {runs[0]['model']} run{'s' if len(runs) > 1 else ''} on "
            f"{runs[0]['gpu']} (tok/s ×{cal.output_tokens_per_s:.2f}, ITL ×{cal.itl:.2f})")


@dataclass(frozen=True)
class Capacity:
    """Replicas for the stated peak, and the headroom they leave."""

    peak_requests_per_s: float | None
    replicas_needed: int | None
    headroom: float | None  # capacity of replicas_needed ÷ peak − 1

    @property
    def stated(self) -> bool:
        return self.peak_requests_per_s is not None


def capacity_at_peak(workload: Workload, performance: Performance | None) -> Capacity:
    """A peak given as concurrent users becomes a rate by Little's law, each user's request
    spending the replica's end-to-end latency in the system."""
    if performance is None or not performance.requests_per_s:
        return Capacity(workload.peak_requests_per_s, None, None)
    peak = workload.peak_requests_per_s
    if peak is None and workload.concurrent_users is not None:
        peak = workload.concurrent_users / performance.e2e_s
    if peak is None:
        return Capacity(None, None, None)
    replicas = max(1, math.ceil(peak / performance.requests_per_s - 1e-9))
    return Capacity(peak, replicas, replicas * performance.requests_per_s / peak - 1)
