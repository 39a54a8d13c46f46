"""Pure memory math for vLLM serving: the formulas vLLM itself uses, nothing else.

Kept apart from the planner so the formulas can be property-tested and checked against
vLLM's own log lines (tests/test_vllm_server.py compares kv_cache_bytes_per_token with
vLLM's ``KV cache size: N tokens``).
"""

from __future__ import annotations

from infra.facts.catalog import ModelArch, Quantization


def kv_heads_per_gpu(arch: ModelArch, tensor_parallel_size: int) -> int:
    """vLLM replicates KV heads when TP exceeds them: each GPU holds at least one."""
    return max(1, arch.num_kv_heads // tensor_parallel_size)


def layers_per_stage(arch: ModelArch, pipeline_parallel_size: int) -> int:
    """The largest pipeline stage bounds memory; vLLM splits layers as evenly as it can."""
    return -(-arch.num_layers // pipeline_parallel_size)


def kv_cache_bytes_per_token(
    arch: ModelArch,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    dtype_bytes: int = 2,
) -> int:
    """Bytes of KV cache one token occupies on one GPU: 2 (K and V) × layers × KV heads × head_dim × bytes.

    With tensor_parallel_size = pipeline_parallel_size = 1 this is the whole model's figure.
    """
    return (
        2
        * layers_per_stage(arch, pipeline_parallel_size)
        * kv_heads_per_gpu(arch, tensor_parallel_size)
        * arch.head_dim
        * dtype_bytes
    )


def weights_bytes(arch: ModelArch, quant: Quantization) -> int:
    """All weights of the model: quantized linear layers plus the layers that stay 16-bit."""
    sixteen_bit = arch.embedding_params if quant.sixteen_bit_layers else 0
    quantized = arch.params - sixteen_bit
    return int(quantized * quant.weight_bytes + sixteen_bit * 2)
