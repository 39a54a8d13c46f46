"""The sizing planner: from model, quantization, context and concurrency to hardware and
vLLM parallelism, by memory math over the fact catalogs. Pure functions, no Pulumi.

For every allowed instance type it enumerates the layouts vLLM can run:
  * one node: tensor parallel TP × pipeline parallel PP GPUs, TP × PP dividing the node's
    GPU count, and as many replicas per node as fit (two TP=4 replicas on an 8-GPU node);
  * several nodes: TP = the node's GPUs (TP stays inside a node, where NVLink is) and
    PP = the number of nodes (PP crosses the network), on EFA-capable types only.
Each layout is checked against vLLM's rules (attention heads divisible by TP, KV heads
divisible by TP or TP by KV heads, quantization supported by the GPU's compute capability)
and against the memory budget: per GPU,
    weights + activation + non-torch + CUDA graphs + NCCL + KV(concurrency × max_model_len)
        ≤ gpu_memory_utilization × GPU memory.
For each layout that fits, the performance model (infra/plan/perf.py) picks vLLM's batch flags
for the stack's workload: --max-num-seqs, the largest batch whose predicted TTFT and
inter-token latency meet the SLO within the KV cache; --max-num-batched-tokens, vLLM's own
hardware-tuned default. The layout with the lowest $ per 1M output tokens at the SLO wins;
layouts the model has no data for rank after those it predicts, by $/h. Ties go to fewer
GPUs, then fewer nodes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from infra.errors import FleetError
from infra.facts.aws import aws_fleet_facts
from infra.facts.catalog import DATA_DIR, Catalog, ModelArch, Quantization, default_catalog
from infra.facts.fact import read_yaml
from infra.facts.perf import default_workload, vllm_server_defaults
from infra.facts.workload import Workload
from infra.plan.perf import Capacity, ServingPoint, capacity_at_peak, serving_point
from infra.plan.pricing import instance_price
from infra.plan.sizing import kv_cache_bytes_per_token, kv_heads_per_gpu, weights_bytes

GiB = 1024**3
GB = 1000**3
# Fallback instance types after the chosen one: each is a launch template and a vLLM argv.
MAX_FALLBACKS = 3


class Overheads(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    activation_bytes_per_token_per_hidden: int
    cuda_graph_bytes_per_hidden: int
    non_torch_bytes: int
    nccl_bytes_per_gpu: int


class Defaults(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    gpu_memory_utilization: float
    kv_block_tokens: int
    concurrency: int
    root_volume_base_gib: int


class Startup(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    instance_boot_s: float
    import_vllm_s: float
    engine_init_cold_s: float
    engine_init_warm_s: float
    timeout_safety_factor: float


@dataclass(frozen=True)
class ServingFacts:
    overheads: Overheads
    defaults: Defaults
    startup: Startup


@cache
def serving_facts() -> ServingFacts:
    doc = read_yaml(DATA_DIR / "serving_overheads.yaml")
    return ServingFacts(
        overheads=Overheads.model_validate(doc["overheads"]),
        defaults=Defaults.model_validate(doc["defaults"]),
        startup=Startup.model_validate(doc["startup"]),
    )


@dataclass(frozen=True)
class SizingRequest:
    model_name: str
    arch: ModelArch
    quantization: str
    max_model_len: int
    concurrency: int
    instance_types: tuple[str, ...] = ()  # allowed types or families; empty: the whole catalog
    max_nodes_per_replica: int = 4
    weights_source: str = "huggingface"
    prewarmed_image: bool = False
    workload: Workload | None = None  # None: perf_model.yaml's workload_defaults
    # False: size by memory alone, as when aiconfigurator-core is not installed.
    performance_model: bool = True
    tensor_parallel_size: int | None = None  # consider only this TP (e.g. 1: one GPU per replica)
    # The endpoint's limit on vLLM servers per node (an ALB forwards to a few target groups,
    # an NLB to one port); None: no limit.
    max_replicas_per_node: int | None = None

    @property
    def effective_workload(self) -> Workload:
        return self.workload or default_workload()
    region: str = "us-east-1"  # prices and their basis (infra/plan/pricing.py)
    market: str = "on-demand"


@dataclass(frozen=True)
class MemoryBudget:
    """One GPU's memory, term by term (bytes)."""

    gpu_total: int
    usable: int
    weights: int
    activation: int
    non_torch: int
    cuda_graphs: int
    nccl: int
    kv_cache: int

    @property
    def fixed(self) -> int:
        return self.weights + self.activation + self.non_torch + self.cuda_graphs + self.nccl


@dataclass(frozen=True)
class Layout:
    """A way to run one replica of the model on one instance type."""

    instance_type: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    nodes_per_replica: int
    replicas_per_node: int

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    feasible: bool
    reason: str  # why it is infeasible, or a one-line summary when feasible
    memory: MemoryBudget | None = None
    kv_cache_tokens: int = 0
    hourly_usd_per_replica: float | None = None
    serving: ServingPoint | None = None  # batch flags and predicted performance (feasible only)
    capacity: Capacity | None = None  # replicas for the workload's peak
    price_basis: str = ""

    @property
    def max_num_seqs(self) -> int:
        assert self.serving is not None, "only a feasible candidate has serving flags"
        return self.serving.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        assert self.serving is not None, "only a feasible candidate has serving flags"
        return self.serving.max_num_batched_tokens

    @property
    def usd_per_million_tokens(self) -> float | None:
        """$ per 1M output tokens at the SLO; None when not predicted."""
        return self.serving.usd_per_million_output_tokens(self.hourly_usd_per_replica) if self.serving else None

    @property
    def sort_key(self) -> tuple[int, float, float, int, int, int, str]:
        """Predicted layouts first, cheapest per output token at the SLO; then the ones without
        a prediction, cheapest per hour. Ties go to fewer GPUs, fewer nodes, then fewer
        pipeline stages (TP within a node has lower latency than PP, which only helps divisibility)."""
        cost = self.hourly_usd_per_replica if self.hourly_usd_per_replica is not None else math.inf
        per_token = self.usd_per_million_tokens
        lay = self.layout
        return (
            0 if per_token is not None else 1, round(per_token, 6) if per_token is not None else math.inf,
            round(cost, 6), lay.gpus_per_replica, lay.nodes_per_replica,
            lay.pipeline_parallel_size, lay.instance_type,
        )


@dataclass(frozen=True)
class TimeToReady:
    instance_boot_s: float
    weights_download_s: float
    import_vllm_s: float
    engine_init_s: float
    weights_source: str

    @property
    def total_s(self) -> float:
        return self.instance_boot_s + self.weights_download_s + self.import_vllm_s + self.engine_init_s


@dataclass(frozen=True)
class Plan:
    request: SizingRequest
    chosen: Candidate
    gpu_name: str
    quantization: Quantization
    weights_bytes: int
    kv_cache_bytes_per_token: int
    gpu_memory_utilization: float
    time_to_ready: TimeToReady
    time_to_ready_by_source: dict[str, float]
    alternatives: list[Candidate] = field(default_factory=list)  # best per other type, + rejects
    fallbacks: list[Candidate] = field(default_factory=list)  # ladder for the ASG, chosen first

    @property
    def layout(self) -> Layout:
        return self.chosen.layout

    @property
    def max_num_seqs(self) -> int:
        return self.chosen.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.chosen.max_num_batched_tokens

    @property
    def workload(self) -> Workload:
        return self.request.effective_workload

    @property
    def concurrent_full_context_seqs(self) -> int:
        return self.chosen.kv_cache_tokens // self.request.max_model_len

    @property
    def startup_timeout_s(self) -> int:
        """What systemd and the ASG wait for, derived from the modeled time-to-ready."""
        factor = serving_facts().startup.timeout_safety_factor
        return int(math.ceil(self.time_to_ready.total_s * factor / 60.0) * 60)

    def summary(self) -> PlanSummary:
        lay = self.layout
        hourly = self.chosen.hourly_usd_per_replica
        return PlanSummary(
            model=self.request.model_name,
            quantization=self.request.quantization,
            max_model_len=self.request.max_model_len,
            concurrency=self.request.concurrency,
            max_num_seqs=self.max_num_seqs,
            instance_type=lay.instance_type,
            gpu=self.gpu_name,
            gpus_per_replica=lay.gpus_per_replica,
            tensor_parallel_size=lay.tensor_parallel_size,
            pipeline_parallel_size=lay.pipeline_parallel_size,
            nodes_per_replica=lay.nodes_per_replica,
            replicas_per_node=lay.replicas_per_node,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_batched_tokens=self.max_num_batched_tokens,
            weights_bytes=self.weights_bytes,
            kv_cache_bytes_per_token=self.kv_cache_bytes_per_token,
            kv_cache_tokens=self.chosen.kv_cache_tokens,
            concurrent_full_context_seqs=self.concurrent_full_context_seqs,
            hourly_usd=round(hourly, 4) if hourly is not None else None,
            time_to_ready_s=round(self.time_to_ready.total_s),
            startup_timeout_s=self.startup_timeout_s,
            weights_source=self.time_to_ready.weights_source,
            time_to_ready_by_source_s={k: round(v) for k, v in self.time_to_ready_by_source.items()},
            fallback_instance_types=[c.layout.instance_type for c in self.fallbacks],
            workload=workload_json(self.workload),
            performance=performance_json(self.chosen),
        )


@dataclass(frozen=True)
class PlanSummary:
    """The sizing decision as `vllm-fleet plan --json`, build/<stack>/plan.json and the
    planSummary stack output show it. Its JSON's hash is the deployed plan id
    (infra/plan/tags.py plan_id), so a field's name, order or value type is part of the
    contract: ``as_json`` gives exactly the dict the plan always printed."""

    model: str
    quantization: str
    max_model_len: int
    concurrency: int
    max_num_seqs: int
    instance_type: str
    gpu: str
    gpus_per_replica: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    nodes_per_replica: int
    replicas_per_node: int
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    weights_bytes: int
    kv_cache_bytes_per_token: int
    kv_cache_tokens: int
    concurrent_full_context_seqs: int
    hourly_usd: float | None
    time_to_ready_s: int
    startup_timeout_s: int
    weights_source: str
    time_to_ready_by_source_s: dict[str, int]
    fallback_instance_types: list[str]
    workload: dict[str, Any]  # workload_json
    performance: dict[str, Any]  # performance_json

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def workload_json(workload: Workload) -> dict[str, Any]:
    return {
        "input_tokens": workload.input_tokens,
        "output_tokens": workload.output_tokens,
        "ttft_p95_ms": workload.ttft_p95_ms,
        "itl_p95_ms": workload.itl_p95_ms,
        "peak_requests_per_s": workload.peak_requests_per_s,
        "concurrent_users": workload.concurrent_users,
    }


def performance_json(cand: Candidate) -> dict[str, Any]:
    """The serving point of one candidate; the keys infra/ops/bench.py reads as a prediction."""
    serving, capacity = cand.serving, cand.capacity
    assert serving is not None
    perf = serving.performance
    per_token = cand.usd_per_million_tokens
    return {
        "predicted": perf is not None,
        "meets_slo": serving.meets_slo,
        "max_num_seqs": serving.max_num_seqs,
        "max_num_batched_tokens": serving.max_num_batched_tokens,
        "ttft_ms": round(perf.ttft_ms, 1) if perf else None,
        "itl_ms": round(perf.itl_ms, 2) if perf else None,
        "output_tokens_per_s": round(perf.output_tokens_per_s, 1) if perf else None,
        "requests_per_s": round(perf.requests_per_s, 3) if perf else None,
        "usd_per_million_output_tokens": round(per_token, 4) if per_token is not None else None,
        "peak_requests_per_s": round(capacity.peak_requests_per_s, 3)
        if capacity and capacity.peak_requests_per_s is not None else None,
        "replicas_at_peak": capacity.replicas_needed if capacity else None,
        "headroom_at_peak": round(capacity.headroom, 4) if capacity and capacity.headroom is not None else None,
        "why": serving.reason,
    }


def allowed_instance_types(catalog: Catalog, allowed: tuple[str, ...]) -> list[str]:
    """Expand families (``p5``) and exact types into catalog instance types, catalog order."""
    if not allowed:
        return list(catalog.instances)
    wanted = set(allowed)
    return [name for name, it in catalog.instances.items() if name in wanted or it.family in wanted]


def _powers_of_two_dividing(n: int) -> list[int]:
    return [p for p in (1, 2, 4, 8, 16) if p <= n and n % p == 0]


def tp_rule_violation(arch: ModelArch, tp: int) -> str | None:
    """vLLM's divisibility rules for tensor parallelism (vllm/config/model.py)."""
    if arch.num_attention_heads % tp:
        return f"{arch.num_attention_heads} attention heads are not divisible by TP {tp}"
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        return f"{arch.num_kv_heads} KV heads and TP {tp}: neither divides the other"
    return None


def enumerate_layouts(catalog: Catalog, instance_type: str, max_nodes: int) -> list[Layout]:
    gpus = catalog.instances[instance_type].gpu_count
    layouts: list[Layout] = []
    for group in _powers_of_two_dividing(gpus):
        for tp in _powers_of_two_dividing(group):
            layouts.append(Layout(instance_type, tp, group // tp, 1, gpus // group))
    for nodes in range(2, max_nodes + 1):
        layouts.append(Layout(instance_type, gpus, nodes, nodes, 1))
    return layouts


def memory_budget(
    req: SizingRequest, quant: Quantization, layout: Layout, gpu_memory_gib: float, utilization: float,
    batched: int,
) -> tuple[MemoryBudget, int]:
    """Per-GPU budget and the replica's KV-cache capacity in tokens (whole blocks), with
    ``batched`` = --max-num-batched-tokens (vLLM profiles activations at that many tokens)."""
    facts = serving_facts()
    over, defaults = facts.overheads, facts.defaults
    arch = req.arch
    total = int(gpu_memory_gib * GiB)
    usable = int(total * utilization)
    weights = math.ceil(weights_bytes(arch, quant) / layout.gpus_per_replica)
    activation = batched * arch.hidden_size * over.activation_bytes_per_token_per_hidden
    cuda_graphs = arch.hidden_size * over.cuda_graph_bytes_per_hidden
    nccl = over.nccl_bytes_per_gpu if layout.gpus_per_replica > 1 else 0
    fixed = weights + activation + over.non_torch_bytes + cuda_graphs + nccl
    kv_bytes = max(0, usable - fixed)
    per_token = kv_cache_bytes_per_token(
        arch, layout.tensor_parallel_size, layout.pipeline_parallel_size, quant.kv_cache_dtype_bytes
    )
    block = defaults.kv_block_tokens
    tokens = (kv_bytes // per_token) // block * block
    budget = MemoryBudget(total, usable, weights, activation, over.non_torch_bytes, cuda_graphs, nccl, kv_bytes)
    return budget, tokens


def evaluate(req: SizingRequest, layout: Layout, catalog: Catalog) -> Candidate:
    instance = catalog.instances[layout.instance_type]
    gpu = catalog.gpus[instance.gpu]
    quant = catalog.quantizations[req.quantization]
    facts = serving_facts()
    if gpu.compute_capability < quant.min_compute_capability:
        return Candidate(
            layout, False,
            f"{req.quantization} needs compute capability {quant.min_compute_capability}; "
            f"{gpu.name} has {gpu.compute_capability}",
        )
    violation = tp_rule_violation(req.arch, layout.tensor_parallel_size)
    if violation:
        return Candidate(layout, False, violation)
    if layout.pipeline_parallel_size > req.arch.num_layers:
        return Candidate(layout, False, f"PP {layout.pipeline_parallel_size} exceeds {req.arch.num_layers} layers")
    if layout.nodes_per_replica > 1 and instance.efa_interfaces == 0:
        return Candidate(layout, False, f"{layout.instance_type} has no EFA for multi-node replicas")
    if instance.on_demand_usd_per_hour is None:
        return Candidate(layout, False, f"{layout.instance_type} is not sold on demand (capacity blocks only)")
    most_servers = (
        req.max_replicas_per_node
        if req.max_replicas_per_node is not None
        else aws_fleet_facts().alb_forward_max_target_groups.value
    )
    if layout.replicas_per_node > most_servers:
        # The deploy layer's rule (infra/components/endpoint.py): one target group per server
        # port; a stack's endpoint type sets the limit (stackplan.max_servers_per_node), `size`
        # assumes an ALB.
        return Candidate(
            layout, False,
            f"{layout.replicas_per_node} vLLM servers per node need {layout.replicas_per_node} target groups; "
            f"the endpoint routes to at most {most_servers} per node",
        )
    price = instance_price(catalog, layout.instance_type, req.region, req.market)
    if not price.offered:
        return Candidate(layout, False, price.basis)
    utilization = facts.defaults.gpu_memory_utilization
    _, batched = vllm_server_defaults(gpu)
    budget, tokens = memory_budget(req, quant, layout, gpu.memory_gib, utilization, batched)
    hourly = (price.usd_per_hour or 0.0) * layout.nodes_per_replica / layout.replicas_per_node
    needed = req.concurrency * req.max_model_len
    if budget.fixed >= budget.usable:
        return Candidate(
            layout, False,
            f"weights and overheads need {budget.fixed / GiB:.1f} GiB per GPU; "
            f"{utilization:.0%} of {gpu.name} is {budget.usable / GiB:.1f} GiB",
            budget, 0, hourly, price_basis=price.basis,
        )
    if tokens < needed:
        return Candidate(
            layout, False,
            f"KV cache holds {tokens:,} tokens; {req.concurrency} × {req.max_model_len:,} needs {needed:,}",
            budget, tokens, hourly, price_basis=price.basis,
        )
    return Candidate(
        layout, True, f"fits with {tokens // req.max_model_len} full-context sequences", budget, tokens, hourly,
        price_basis=price.basis,
    )


def dominated_by(cand: Candidate, fitting: list[Candidate]) -> str | None:
    """Why a layout that fits is not worth predicting, or None.

    * PP inside one node: TP over the same GPUs serves the same batch with lower latency
      (pipeline stages only add bubbles), and so do several smaller PP-free replicas on those
      GPUs; PP stays where TP's divisibility rules forbid it and nothing smaller fits.
    * Several nodes per replica: when one node of the type holds a replica, N single-node
      replicas cost the same per hour and serve at least as much, with no stage on the network.
    """
    lay = cand.layout
    same_type = [c for c in fitting if c.layout.instance_type == lay.instance_type and c.layout.nodes_per_replica == 1]
    if lay.nodes_per_replica > 1 and same_type:
        return f"one {lay.instance_type} holds a replica: {lay.nodes_per_replica} single-node replicas serve more for the same $/h"
    if lay.nodes_per_replica == 1 and lay.pipeline_parallel_size > 1:
        tp_only = [c for c in same_type if c.layout.gpus_per_replica == lay.gpus_per_replica
                   and c.layout.pipeline_parallel_size == 1]
        if tp_only:
            return f"TP {lay.gpus_per_replica} on the same GPUs fits, with lower latency than pipeline stages"
        # Without the TP form (e.g. `size --tensor-parallel-size 1`), a smaller PP-free replica
        # that fits still beats the stages: that many of them run on the same GPUs, bubble-free.
        smaller = [c for c in same_type if c.layout.pipeline_parallel_size == 1
                   and lay.gpus_per_replica % c.layout.gpus_per_replica == 0]
        if smaller:
            best = min(smaller, key=lambda c: c.layout.gpus_per_replica)
            n = lay.gpus_per_replica // best.layout.gpus_per_replica
            return (f"{n} replicas of TP {best.layout.tensor_parallel_size} fit on the same GPUs, "
                    "without pipeline bubbles")
    return None


def with_serving(req: SizingRequest, cand: Candidate, catalog: Catalog) -> Candidate:
    """Attach vLLM's batch flags and the predicted performance at the SLO to a layout that fits."""
    lay = cand.layout
    gpu_key = catalog.instances[lay.instance_type].gpu
    workload = req.effective_workload
    serving = serving_point(
        req.arch, req.quantization, gpu_key, catalog.gpus[gpu_key], lay.tensor_parallel_size,
        lay.pipeline_parallel_size, cand.kv_cache_tokens, workload, predict_performance=req.performance_model,
    )
    if serving.meets_slo is False:
        return replace(cand, feasible=False, reason=serving.reason, serving=serving)
    return replace(cand, serving=serving, capacity=capacity_at_peak(workload, serving.performance))


def time_to_ready(req: SizingRequest, weights: int, source: str, catalog: Catalog) -> TimeToReady:
    start = serving_facts().startup
    throughput = catalog.weight_sources[source].throughput_mb_s * 1e6
    # A staged image carries the weights on its root volume: reading them is the load.
    download = weights / throughput
    init = start.engine_init_warm_s if req.prewarmed_image else start.engine_init_cold_s
    return TimeToReady(start.instance_boot_s, download, start.import_vllm_s, init, source)


def plan_candidates(req: SizingRequest, catalog: Catalog, *, serving: bool = True) -> list[Candidate]:
    """Every layout of every allowed type, judged by memory; with ``serving``, the ones that
    fit and are not dominated also get their batch flags and predicted performance."""
    candidates: list[Candidate] = []
    for name in allowed_instance_types(catalog, req.instance_types):
        for layout in enumerate_layouts(catalog, name, req.max_nodes_per_replica):
            if req.tensor_parallel_size in (None, layout.tensor_parallel_size):
                candidates.append(evaluate(req, layout, catalog))
    if not serving:
        return candidates
    fitting = [c for c in candidates if c.feasible]
    judged: list[Candidate] = []
    for cand in candidates:
        if cand.feasible:
            why = dominated_by(cand, fitting)
            cand = (
                replace(cand, feasible=False, reason=why)
                if why else with_serving(req, cand, catalog)
            )
        judged.append(cand)
    return judged


def _validate_request(req: SizingRequest, catalog: Catalog) -> None:
    if req.quantization not in catalog.quantizations:
        raise FleetError(
            f"quantization = {req.quantization!r}: not known (allowed: {', '.join(catalog.quantizations)})"
        )
    if req.max_model_len > req.arch.context_limit:
        raise FleetError(
            f"max_model_len = {req.max_model_len}: exceeds {req.model_name}'s "
            f"max_position_embeddings {req.arch.context_limit}"
            + (" (scaled by rope_scaling)" if req.arch.context_limit != req.arch.max_position_embeddings else "")
        )
    if req.weights_source not in catalog.weight_sources:
        raise FleetError(
            f"weights_source = {req.weights_source!r}: not known (allowed: {', '.join(catalog.weight_sources)})"
        )
    if not allowed_instance_types(catalog, req.instance_types):
        raise FleetError(f"instance_types = {list(req.instance_types)}: none is in the instance catalog")


def make_plan(req: SizingRequest, catalog: Catalog | None = None) -> Plan:
    """Choose the cheapest feasible layout, or raise FleetError saying why and what would fit."""
    catalog = catalog or default_catalog()
    _validate_request(req, catalog)
    candidates = plan_candidates(req, catalog)
    feasible = sorted((c for c in candidates if c.feasible), key=lambda c: c.sort_key)
    if not feasible:
        raise FleetError(explain_infeasible(req, candidates, catalog))
    chosen = feasible[0]
    quant = catalog.quantizations[req.quantization]
    weights = weights_bytes(req.arch, quant)
    best_per_type: dict[str, Candidate] = {}
    for cand in feasible:
        best_per_type.setdefault(cand.layout.instance_type, cand)
    alternatives = [c for name, c in best_per_type.items() if name != chosen.layout.instance_type]
    alternatives += [c for c in candidates if c.layout.instance_type not in best_per_type and not c.feasible]
    # The ladder: other types that run a replica the same way (single node, same packing),
    # each with its own vLLM settings, so the ASG can fall back when capacity is short.
    fallbacks = [chosen] + [
        c for c in best_per_type.values()
        if c is not chosen
        and c.layout.nodes_per_replica == chosen.layout.nodes_per_replica == 1
        and c.layout.replicas_per_node == chosen.layout.replicas_per_node
    ][:MAX_FALLBACKS]
    ttr_by_source = {
        source: time_to_ready(req, weights, source, catalog).total_s for source in catalog.weight_sources
    }
    return Plan(
        request=req,
        chosen=chosen,
        gpu_name=catalog.gpu_of(chosen.layout.instance_type).name,
        quantization=quant,
        weights_bytes=weights,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(req.arch, dtype_bytes=quant.kv_cache_dtype_bytes),
        gpu_memory_utilization=serving_facts().defaults.gpu_memory_utilization,
        time_to_ready=time_to_ready(req, weights, req.weights_source, catalog),
        time_to_ready_by_source=ttr_by_source,
        alternatives=alternatives,
        fallbacks=fallbacks,
    )


def ladder_explanation(plan: Plan) -> list[str]:
    """Why the fallback ladder holds what it holds, in its order, with each rung's cost."""
    chosen = plan.chosen
    base = chosen.hourly_usd_per_replica or 0.0
    lines = [
        (
            "order: cheapest per replica first; the Auto Scaling group launches a later type only when "
            "EC2 has no capacity for the earlier ones"
        ),
    ]
    for i, rung in enumerate(plan.fallbacks):
        cost = rung.hourly_usd_per_replica or 0.0
        ratio = f", {cost / base:.1f}× the first" if i and base else ""
        lines.append(f"{i + 1}. {rung.layout.instance_type}: ${cost:,.2f}/h per replica{ratio}")
    kept = {c.layout.instance_type for c in plan.fallbacks}
    for cand in plan.alternatives:
        name = cand.layout.instance_type
        if not cand.feasible or name in kept:
            continue
        if cand.layout.nodes_per_replica > 1 or chosen.layout.nodes_per_replica > 1:
            why = "multi-node replicas run as gangs of one type"
        elif cand.layout.replicas_per_node != chosen.layout.replicas_per_node:
            why = (f"it packs {cand.layout.replicas_per_node} replica(s) per node, the ladder "
                   f"{chosen.layout.replicas_per_node} (one group serves one packing)")
        else:
            why = f"the ladder keeps {MAX_FALLBACKS} fallbacks, cheapest first"
        lines.append(f"left out: {name} (${cand.hourly_usd_per_replica or 0:,.2f}/h per replica): {why}")
    return lines


def _node_gpu_bytes(catalog: Catalog, name: str) -> float:
    it = catalog.instances[name]
    return it.gpu_count * catalog.gpus[it.gpu].memory_gib * GiB


def explain_infeasible(req: SizingRequest, candidates: list[Candidate], catalog: Catalog) -> str:
    """One line: what the model needs, the most the allowed hardware offers, and what would fit."""
    slo_misses = [c for c in candidates if c.serving is not None and c.serving.meets_slo is False]
    if slo_misses:
        return explain_slo_miss(req, slo_misses)
    quant = catalog.quantizations[req.quantization]
    weights = weights_bytes(req.arch, quant)
    allowed = allowed_instance_types(catalog, req.instance_types)
    biggest = max(allowed, key=lambda n: _node_gpu_bytes(catalog, n))
    head = (
        f"{req.model_name} {req.quantization} at {req.max_model_len:,} tokens × {req.concurrency} sequences "
        f"needs {weights / GB:,.0f} GB of weights plus "
        f"{kv_cache_bytes_per_token(req.arch, dtype_bytes=quant.kv_cache_dtype_bytes) * req.concurrency * req.max_model_len / GB:,.0f} GB of KV cache; "
        f"largest node allowed ({biggest}) has {_node_gpu_bytes(catalog, biggest) / GB:,.0f} GB of GPU memory"
    )
    if not any(c.memory is not None for c in candidates):
        reasons = sorted({c.reason for c in candidates})
        head = f"{req.model_name} {req.quantization}: no allowed instance can run it ({'; '.join(reasons[:2])})"
    suggestions: list[str] = []
    others = [n for n in catalog.instances if n not in allowed]
    if others:
        widened = _cheapest_feasible(req, catalog, tuple(others))
        if widened:
            suggestions.append(f"allow {widened.layout.instance_type}" + _nodes_note(widened))
    if req.max_nodes_per_replica < 8:
        more_nodes = _cheapest_feasible(
            SizingRequest(**{**req.__dict__, "max_nodes_per_replica": 8}), catalog, req.instance_types
        )
        if more_nodes and more_nodes.layout.nodes_per_replica > req.max_nodes_per_replica:
            suggestions.append(f"use {more_nodes.layout.nodes_per_replica} nodes per replica")
    for q in ("fp8", "int8", "awq"):
        if q == req.quantization or catalog.quantizations[q].weight_bytes >= quant.weight_bytes:
            continue
        lighter = _cheapest_feasible(SizingRequest(**{**req.__dict__, "quantization": q}), catalog, req.instance_types)
        if lighter:
            suggestions.append(f"quantize to {q} ({lighter.layout.instance_type}{_nodes_note(lighter)})")
            break
    shorter = req.concurrency > 1 and _cheapest_feasible(
        SizingRequest(**{**req.__dict__, "concurrency": 1}), catalog, req.instance_types
    )
    if shorter and not suggestions:
        suggestions.append("lower concurrency or max_model_len (one sequence fits)")
    tail = ": " + ", ".join(suggestions) if suggestions else ""
    return head + tail


def explain_slo_miss(req: SizingRequest, misses: list[Candidate]) -> str:
    """Layouts fit in memory but none meets the latency targets even one request at a time."""
    def batch_one(c: Candidate) -> tuple[float, float]:
        perf = c.serving.best_unconstrained if c.serving else None
        return (perf.itl_ms, perf.ttft_ms) if perf else (math.inf, math.inf)

    best = min(misses, key=batch_one)
    itl, ttft = batch_one(best)
    wl = req.effective_workload
    lay = best.layout
    return (
        f"workload: no allowed layout meets TTFT p95 ≤ {wl.ttft_p95_ms:g} ms and ITL p95 ≤ {wl.itl_p95_ms:g} ms "
        f"for {req.model_name} {req.quantization} at {wl.input_tokens} → {wl.output_tokens} tokens; the fastest, "
        f"{lay.instance_type} TP {lay.tensor_parallel_size} × PP {lay.pipeline_parallel_size}, predicts "
        f"TTFT {ttft:,.0f} ms and ITL {itl:.1f} ms for a single request: raise vllm-fleet:workload.itlP95Ms / "
        "ttftP95Ms, allow faster GPUs or more GPUs per replica"
    )


def _nodes_note(c: Candidate) -> str:
    return f" × {c.layout.nodes_per_replica} nodes" if c.layout.nodes_per_replica > 1 else ""


def _cheapest_feasible(req: SizingRequest, catalog: Catalog, types: tuple[str, ...]) -> Candidate | None:
    probe = SizingRequest(**{**req.__dict__, "instance_types": types})
    feasible = [c for c in plan_candidates(probe, catalog, serving=False) if c.feasible]
    return min(feasible, key=lambda c: c.sort_key) if feasible else None


def describe_kv_heads(arch: ModelArch, tp: int) -> str:
    per_gpu = kv_heads_per_gpu(arch, tp)
    replicated = " (replicated)" if tp > arch.num_kv_heads else ""
    return f"{per_gpu} KV head{'s' if per_gpu > 1 else ''} per GPU{replicated}"
