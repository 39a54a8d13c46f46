"""The sizing planner: the seed table as cases, vLLM's rules, and properties of every plan."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.errors import FleetError
from infra.facts.catalog import default_catalog
from infra.plan.planner import GiB, SizingRequest, make_plan, plan_candidates, serving_facts
from infra.plan.sizing import kv_cache_bytes_per_token, weights_bytes

CATALOG = default_catalog()
# The seed table is stated for 80 GB GPUs: A100 80GB and H100 nodes.
EIGHTY_GB_TYPES = ("p4de.24xlarge", "p5.48xlarge", "p5.4xlarge")


def request(model: str, quant: str, max_model_len: int = 4096, concurrency: int = 1,
            types: tuple[str, ...] = EIGHTY_GB_TYPES, max_nodes: int = 4) -> SizingRequest:
    """A memory-only request: these cases and properties are about the memory math and vLLM's
    layout rules; tests/test_perf.py covers the choices the performance model makes."""
    return SizingRequest(model, CATALOG.models[model], quant, max_model_len, concurrency, types, max_nodes,
                         performance_model=False)


# (model, quantization, GPUs the seed table says, inclusive range we accept)
SEED_TABLE = [
    ("mistral-7b", "fp16", 1, 1),
    ("mistral-7b", "int8", 1, 1),
    ("mistral-7b", "awq", 1, 1),
    ("llama-2-13b", "fp16", 1, 1),
    ("llama-2-13b", "int8", 1, 1),
    ("llama-2-13b", "gptq", 1, 1),
    # 4 in the seed table; on the A100 80GB, whose vLLM default is 2048 batched tokens (not
    # 8192: vllm.yaml server_defaults), two GPUs hold the weights and one 4k sequence.
    ("llama-3.1-70b", "fp16", 2, 4),
    ("llama-3.1-70b", "int8", 2, 2),
    ("llama-3.1-70b", "awq", 1, 2),
    ("llama-3.1-405b", "fp16", 9, 64),  # "8+": 8 × 80 GB cannot hold 810 GB of weights
    ("llama-3.1-405b", "int8", 4, 64),
    ("llama-3.1-405b", "awq", 4, 64),
]


@pytest.mark.parametrize(("model", "quant", "low", "high"), SEED_TABLE)
def test_seed_table_on_80gb_gpus(model: str, quant: str, low: int, high: int) -> None:
    # The seed table states what a replica needs; the chosen layout may use more GPUs when
    # that is cheaper to deploy (an ALB serves at most 5 replicas per node, so a 7B model
    # cannot run 8 one-GPU replicas on an 8-GPU node).
    make_plan(request(model, quant))
    fewest = min(c.layout.gpus_per_replica for c in plan_candidates(request(model, quant), CATALOG) if c.feasible)
    assert low <= fewest <= high


def test_70b_fp16_at_8k_uses_tp4() -> None:
    plan = make_plan(request("llama-3.1-70b", "fp16", 8192, 16, types=()))
    assert plan.layout.tensor_parallel_size == 4
    assert plan.layout.pipeline_parallel_size == 1


def test_405b_fp16_never_on_8_gpus_of_80gb() -> None:
    plan = make_plan(request("llama-3.1-405b", "fp16", 8192, 16, types=()))
    gpu = CATALOG.gpu_of(plan.layout.instance_type)
    assert not (plan.layout.gpus_per_replica == 8 and gpu.memory_gib < 100), plan.summary()


def test_405b_fp16_on_one_80gb_node_fails_with_one_line_and_a_way_out() -> None:
    with pytest.raises(FleetError) as err:
        make_plan(request("llama-3.1-405b", "fp16", 8192, 16, types=("p5.48xlarge",), max_nodes=1))
    message = str(err.value)
    assert "\n" not in message
    assert "GB of weights" in message
    assert "allow" in message or "nodes" in message or "quantize" in message


def test_two_replicas_share_an_8_gpu_node_when_cheaper() -> None:
    plan = make_plan(request("llama-3.1-70b", "fp16", 8192, 16, types=("p4de.24xlarge",)))
    assert plan.layout.tensor_parallel_size == 4
    assert plan.layout.replicas_per_node == 2
    price = CATALOG.instances["p4de.24xlarge"].on_demand_usd_per_hour
    assert price is not None
    assert plan.chosen.hourly_usd_per_replica == pytest.approx(price / 2)


def test_multi_node_replica_keeps_tp_inside_the_node() -> None:
    plan = make_plan(request("llama-3.1-405b", "fp16", 8192, 8, types=("p5.48xlarge",), max_nodes=4))
    lay = plan.layout
    assert lay.nodes_per_replica > 1
    assert lay.tensor_parallel_size == CATALOG.instances["p5.48xlarge"].gpu_count
    assert lay.pipeline_parallel_size == lay.nodes_per_replica


def test_tp_rule_rejects_heads_not_divisible() -> None:
    # Llama-2-13B has 40 heads: TP 16 never, TP 8 yes (40 = 8 × 5).
    from infra.plan.planner import tp_rule_violation

    arch = CATALOG.models["llama-2-13b"]
    assert tp_rule_violation(arch, 8) is None
    assert tp_rule_violation(arch, 16) is not None
    assert tp_rule_violation(arch, 3) is not None


def test_kv_heads_replicate_beyond_tp() -> None:
    arch = CATALOG.models["llama-3.1-70b"]  # 8 KV heads
    assert kv_cache_bytes_per_token(arch, 8) == kv_cache_bytes_per_token(arch, 16)
    assert kv_cache_bytes_per_token(arch) == 2 * 80 * 8 * 128 * 2  # 320 KiB, as vLLM logs on H200


def test_fp8_weights_match_the_h200_measurement() -> None:
    # vllm.md: Llama-3.1-70B fp8 weights were 67.73 GiB on the GPU.
    w = weights_bytes(CATALOG.models["llama-3.1-70b"], CATALOG.quantizations["fp8"])
    assert w / GiB == pytest.approx(67.73, rel=0.01)


def test_unknown_quantization_is_one_line() -> None:
    with pytest.raises(FleetError, match="quantization = 'int4'"):
        make_plan(request("llama-3.1-8b", "int4"))


def test_context_beyond_the_model_is_refused() -> None:
    with pytest.raises(FleetError, match="max_position_embeddings"):
        make_plan(request("llama-2-13b", "fp16", max_model_len=32768))


# ---- properties -------------------------------------------------------------------------

models = st.sampled_from(sorted(CATALOG.models))
quants = st.sampled_from(sorted(CATALOG.quantizations))
lengths = st.sampled_from([1024, 2048, 4096, 8192, 16384, 32768])
concurrency = st.integers(min_value=1, max_value=64)
instance_subsets = st.lists(st.sampled_from(sorted(CATALOG.instances)), min_size=1, max_size=6, unique=True)


def _plan_or_none(req: SizingRequest):  # type: ignore[no-untyped-def]
    try:
        return make_plan(req)
    except FleetError:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models, quants, lengths, concurrency, instance_subsets)
def test_every_plan_fits_and_obeys_vllm_rules(model, quant, length, seqs, types) -> None:  # type: ignore[no-untyped-def]
    arch = CATALOG.models[model]
    if length > arch.max_position_embeddings:
        return
    plan = _plan_or_none(request(model, quant, length, seqs, tuple(types)))
    if plan is None:
        return
    lay = plan.layout
    it = CATALOG.instances[lay.instance_type]
    gpu = CATALOG.gpus[it.gpu]
    q = CATALOG.quantizations[quant]
    # vLLM's rules
    assert arch.num_attention_heads % lay.tensor_parallel_size == 0
    assert arch.num_kv_heads % lay.tensor_parallel_size == 0 or lay.tensor_parallel_size % arch.num_kv_heads == 0
    assert gpu.compute_capability >= q.min_compute_capability
    if lay.nodes_per_replica == 1:
        assert lay.gpus_per_replica * lay.replicas_per_node <= it.gpu_count
    else:
        assert lay.tensor_parallel_size == it.gpu_count and it.efa_interfaces > 0
    # The memory budget, recomputed here from the formula in the issue.
    over = serving_facts().overheads
    batched = plan.max_num_batched_tokens  # vLLM's default for this GPU (vllm.yaml server_defaults)
    per_gpu = (
        weights_bytes(arch, q) / lay.gpus_per_replica
        + batched * arch.hidden_size * over.activation_bytes_per_token_per_hidden
        + arch.hidden_size * over.cuda_graph_bytes_per_hidden
        + over.non_torch_bytes
        + (over.nccl_bytes_per_gpu if lay.gpus_per_replica > 1 else 0)
        + seqs * length * kv_cache_bytes_per_token(arch, lay.tensor_parallel_size, lay.pipeline_parallel_size,
                                                   q.kv_cache_dtype_bytes)
    )
    assert per_gpu <= plan.gpu_memory_utilization * gpu.memory_gib * GiB
    assert plan.concurrent_full_context_seqs >= seqs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models, quants, lengths, concurrency, st.sampled_from(sorted(CATALOG.instances)), st.integers(1, 8))
def test_more_demand_never_yields_fewer_gpus_on_a_given_type(model, quant, length, seqs, itype, more) -> None:  # type: ignore[no-untyped-def]
    """On one instance type, more sequences never need fewer GPUs per replica.

    (Across types it can: a cheaper 8-GPU node of small GPUs may lose to a 1-GPU node of a
    big GPU once the KV cache grows, which is the planner doing its job.)
    """
    arch = CATALOG.models[model]
    if length > arch.max_position_embeddings:
        return
    small = _plan_or_none(request(model, quant, length, seqs, (itype,)))
    big = _plan_or_none(request(model, quant, length, seqs + more, (itype,)))
    if small is None:
        assert big is None
        return
    if big is not None:
        assert big.layout.gpus_per_replica >= small.layout.gpus_per_replica


def test_time_to_ready_orders_sources_by_throughput() -> None:
    plan = make_plan(request("llama-3.1-70b", "fp16"))
    by_source = plan.time_to_ready_by_source
    speeds = {name: src.throughput_mb_s for name, src in CATALOG.weight_sources.items()}
    ordered = sorted(by_source, key=lambda s: by_source[s])
    assert ordered == sorted(speeds, key=lambda s: -speeds[s])
    assert plan.startup_timeout_s >= plan.time_to_ready.total_s
