"""Plan → NodeSpec: what one node of a given instance type runs, from the sizing plan.

Every rung of the fallback ladder gets its own spec, because vLLM's parallelism differs
per instance type (a 4×L40S node runs TP 4 where an 8×A100 node runs two TP 4 replicas).
"""

from __future__ import annotations

from infra.catalog import default_catalog
from infra.config import StackConfig
from infra.drain import deregistration_delay_s
from infra.node.serve_args import LOCAL_WEIGHT_SOURCES, build_serve_argv
from infra.node.spec import LifecycleHooks, NodeSpec, ReplicaSpec
from infra.planner import Candidate, Plan


def vllm_environment(config: StackConfig, plan: Plan) -> dict[str, str]:
    env = {
        # vLLM waits 600 s by default for the engine (vllm/envs.py); a big model's load
        # and compile take longer, so the plan's own startup budget applies instead.
        "VLLM_ENGINE_READY_TIMEOUT_S": str(plan.startup_timeout_s),
    }
    if config.serving.weights_source in LOCAL_WEIGHT_SOURCES:
        # Staged weights: never reach out to the hub at boot.
        env["HF_HUB_OFFLINE"] = "1"
    return env


def node_spec(config: StackConfig, plan: Plan, candidate: Candidate, *, api_key_secret_id: str) -> NodeSpec:
    layout = candidate.layout
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
        # The target groups' delay (infra/drain.py): the watcher waits for it, not for vLLM's.
        lifecycle_hooks=LifecycleHooks(deregistration_delay_s=deregistration_delay_s(config)),
        gpus_per_node=gpus_per_node,
        vllm_env=vllm_environment(config, plan),
        nodes=layout.nodes_per_replica,
    )
