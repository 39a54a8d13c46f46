"""The ``vllm serve`` argument list, built from the plan and the stack config.

Flag names are exactly those of the pinned vLLM (infra/facts/data/vllm.yaml); the whole list is
checked by vLLM's own parser (infra/plan/node/vllm_cli.py) before anything is rendered. The
API key is never here: the node appends ``--config`` naming a systemd credential (a root-only
tmpfs file fetched from Secrets Manager) that carries the key(s); see docs/node.md.
"""

from __future__ import annotations

from infra.config import StackConfig
from infra.plan.planner import Candidate, Plan

# Where staged weights live on an image that carries them (images/ writes them here).
STAGED_MODELS_DIR = "/opt/models"
# Where vLLM downloads weights at boot when they are not staged (a writable cache dir).
DOWNLOAD_DIR = "/var/cache/vllm/models"
# Sources that put the weights on local disk before vLLM starts.
LOCAL_WEIGHT_SOURCES = ("ebs-initialized", "ebs-lazy", "local-nvme")
# Sources the node copies to local disk at boot (vllm-fleet-fetch-weights.service), into
# DOWNLOAD_DIR/<model name>, before vLLM starts and serves from there.
FETCHED_WEIGHT_SOURCES = ("s3",)


def fetched_weights_dir(model_name: str) -> str:
    return f"{DOWNLOAD_DIR}/{model_name}"


def served_model_name(config: StackConfig, model_name: str) -> str:
    return config.model.served_name or config.model.repo or model_name


def model_reference(config: StackConfig, plan: Plan) -> tuple[str, list[str]]:
    """The positional model argument and the flags that pin it."""
    repo = config.model.repo or plan.request.arch.hf_repo
    if config.serving.weights_source in LOCAL_WEIGHT_SOURCES:
        return f"{STAGED_MODELS_DIR}/{plan.request.model_name}", []
    if config.serving.weights_source in FETCHED_WEIGHT_SOURCES:
        # The S3 prefix already names the repo and revision (default_weights_s3_uri).
        return fetched_weights_dir(plan.request.model_name), []
    return repo, ["--revision", config.model.revision]


def build_serve_argv(
    config: StackConfig, plan: Plan, candidate: Candidate | None = None, replica_index: int = 0
) -> list[str]:
    """Production argv for one replica; ``candidate`` picks a fallback type's settings."""
    chosen = candidate or plan.chosen
    layout = chosen.layout
    quant = plan.quantization
    model, pin = model_reference(config, plan)
    argv = [
        "vllm", "serve", model, *pin,
        "--served-model-name", served_model_name(config, plan.request.model_name),
        "--host", "0.0.0.0",
        "--port", str(config.serving.port + replica_index),
        "--tensor-parallel-size", str(layout.tensor_parallel_size),
        "--pipeline-parallel-size", str(layout.pipeline_parallel_size),
    ]
    if layout.nodes_per_replica > 1:
        argv += ["--distributed-executor-backend", "ray"]
    argv += [
        "--max-model-len", str(plan.request.max_model_len),
        "--max-num-seqs", str(chosen.max_num_seqs),
        "--max-num-batched-tokens", str(chosen.max_num_batched_tokens),
        "--gpu-memory-utilization", f"{plan.gpu_memory_utilization:g}",
        # Explicit, so a change of vLLM's default never silently changes the fleet.
        "--enable-prefix-caching",
        "--dtype", quant.vllm_dtype,
    ]
    # A checkpoint quantized as fp8 declares it in config.json; vLLM reads the method from there
    # and rejects a different --quantization (fp8_per_tensor quantizes 16-bit weights at load).
    prequantized_fp8 = plan.request.arch.checkpoint_quantization == "fp8"
    if quant.vllm_quantization and not prequantized_fp8:
        argv += ["--quantization", quant.vllm_quantization]
    argv += [
        "--download-dir", DOWNLOAD_DIR,
        # Drain in-flight requests on SIGTERM instead of aborting them (vLLM's default 0).
        "--shutdown-timeout", str(config.serving.shutdown_timeout_s),
    ]
    argv += config.serving.extra_args
    return argv
