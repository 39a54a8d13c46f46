"""Plan → NodeSpec: what one node of a given instance type runs, from the sizing plan.

Every rung of the fallback ladder gets its own spec, because vLLM's parallelism differs
per instance type (a 4×L40S node runs TP 4 where an 8×A100 node runs two TP 4 replicas).
"""

from __future__ import annotations

import math

from infra.config import StackConfig
from infra.facts.catalog import default_catalog
from infra.plan.drain import deregistration_delay_s
from infra.plan.node.serve_args import (
    FETCHED_WEIGHT_SOURCES,
    LOCAL_WEIGHT_SOURCES,
    build_serve_argv,
    fetched_weights_dir,
)
from infra.plan.node.spec import GangDiscovery, LifecycleHooks, NodeSpec, ReplicaSpec
from infra.plan.planner import Candidate, Plan


def vllm_environment(config: StackConfig, plan: Plan) -> dict[str, str]:
    env = {
        # vLLM waits 600 s by default for the engine (vllm/envs.py); a big model's load
        # and compile take longer, so the plan's own startup budget applies instead.
        "VLLM_ENGINE_READY_TIMEOUT_S": str(plan.startup_timeout_s),
    }
    if config.serving.weights_source in LOCAL_WEIGHT_SOURCES + FETCHED_WEIGHT_SOURCES:
        # Weights on local disk: never reach out to the hub at boot.
        env["HF_HUB_OFFLINE"] = "1"
    # vLLM closes idle HTTP keep-alive connections after 5 s by default (vllm/envs.py
    # VLLM_HTTP_TIMEOUT_KEEP_ALIVE). A target must keep them open longer than the load
    # balancer's idle timeout, or the ALB reuses a connection the target just closed and
    # answers 502 ("HTTP 502: Target connection error", ALB troubleshooting guide:
    # "configure the idle timeout of your target ... greater than the idle timeout of the
    # load balancer"). An NLB's TCP idle timeout is 350 s by default, below this too.
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(config.endpoint.idle_timeout_s + KEEP_ALIVE_MARGIN_S)
    return env


def gang_discovery(plan: Plan) -> GangDiscovery:
    """The head waits for Ray's GPUs inside vllm.service's start timeout, so the wait gets what
    that budget leaves once vLLM's own modeled load (weights, import, engine init) is set
    aside; it is always below the timeout, which is 1.5 × the modeled total including boot."""
    ttr = plan.time_to_ready
    after_ray = math.ceil(ttr.weights_download_s + ttr.import_vllm_s + ttr.engine_init_s)
    return GangDiscovery(ray_wait_timeout_s=max(60, plan.startup_timeout_s - after_ray))


# How much longer than the load balancer's idle timeout vLLM keeps a connection open.
KEEP_ALIVE_MARGIN_S = 60


def hf_token_secret_name(stack: str) -> str:
    """Where a stack's Hugging Face token lives (optional; the operator creates it for gated repos)."""
    return f"vllm-fleet/{stack}/hf-token"


def node_spec(config: StackConfig, plan: Plan, candidate: Candidate, *, api_key_secret_id: str) -> NodeSpec:
    # infra.plan.scaling builds on the stack plan, which builds on this module: import at call time.
    from infra.plan.scaling import node_scaling_environment, node_scaling_interval_s

    layout = candidate.layout
    source = config.serving.weights_source
    gpus_per_node = default_catalog().instances[layout.instance_type].gpu_count
    replicas = []
    for index in range(layout.replicas_per_node):
        packed = layout.replicas_per_node > 1
        replicas.append(
            ReplicaSpec(
                serve_argv=tuple(build_serve_argv(config, plan, candidate, replica_index=index)),
                port=config.serving.port + index,
                # Packed replicas each own a disjoint slice of the node's GPUs.
                gpu_indices=tuple(
                    range(index * layout.gpus_per_replica, (index + 1) * layout.gpus_per_replica)
                ) if packed else (),
            )
        )
    return NodeSpec(
        stack=config.stack,
        region=config.region,
        replicas=tuple(replicas),
        api_key_secret_id=api_key_secret_id,
        start_timeout_s=plan.startup_timeout_s,
        shutdown_timeout_s=config.serving.shutdown_timeout_s,
        # The target groups' delay (infra/plan/drain.py): the watcher waits for it, not for vLLM's.
        lifecycle_hooks=LifecycleHooks(deregistration_delay_s=deregistration_delay_s(config)),
        gpus_per_node=gpus_per_node,
        vllm_env=vllm_environment(config, plan),
        nodes=layout.nodes_per_replica,
        gang_discovery=gang_discovery(plan),
        weights_source=source,
        weights_dir=fetched_weights_dir(plan.request.model_name) if source in FETCHED_WEIGHT_SOURCES else None,
        # None: the node reads the Fleet's instance tag (the default URI names the account).
        weights_s3_uri=config.serving.weights_s3_uri if source == "s3" else None,
        hf_token_secret_id=hf_token_secret_name(config.stack) if source == "huggingface" else None,
        scaling_environment=node_scaling_environment(
            config.stack, config.region, [r.port for r in replicas], layout.nodes_per_replica > 1
        ),
        scaling_interval_s=node_scaling_interval_s(),
    )
